"""Fold models exported to ONNX (``src/export.py``), each checked against torch before it is kept.

``<train.out_dir>/<exp>/export/``::

    fold<k>.onnx     the fold's model and its family's probability head as one graph: normalised
                     float32 images (N, C, H, W) in, probabilities (N, 1, H, W) out (and the
                     image-level probability (N, 1) with an aux head); opset 17, dynamic N, H, W
    manifest.json    family, input channels and size, normalisation, the experiment's TTA views
                     and post-processing, and per fold the digests (first 16 hex digits of
                     SHA-256, as tunings record) of the model.pt it was made from and of the
                     .onnx, and the parity measured

An export is kept only if ONNX Runtime's probabilities on a batch of the experiment's own cached
training images match torch fp32 within :data:`PARITY_TOL` (else it is an error and nothing is
written). The manifest's checksums make a stale export (its ``model.pt`` retrained since) or a
damaged ``.onnx`` detectable: :func:`check_export` refuses both. The export folder is replaced as
one set: the ``.onnx`` files are renamed into place first, the manifest last, so a folder whose
manifest does not match its files is never taken for a good export.

This module is the first part of issue 18 (ONNX Runtime / OpenVINO backends): prediction does not
use the exports yet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoseg.errors import DataError, ModelFileError, OutputExistsError, UserError
from pneumoseg.tuning.provenance import file_digest  # the model.pt digest tunings record too

log = logging.getLogger("pneumoseg.export")

EXPORT_DIR = "export"
MANIFEST = "manifest.json"
OPSET = 17
PARITY_TOL = 1e-4  # max |Δp| against torch fp32 on the check images
N_CHECK = 4  # cached training images the parity is measured on
# Families whose probability map is not one traceable graph, and why (the name is the error).
NOT_EXPORTABLE = {
    "maskrcnn": (
        "its probability map is pasted in Python from a variable number of detections "
        "(MaskRCNNFamily.predict), which one traced ONNX graph cannot hold yet; predict it with "
        "the torch backend"
    ),
}


class ExportError(UserError):
    """An export that cannot be made, or an existing one that cannot be used."""


class _ProbsNet(nn.Module):
    """A fold model and its family's probability head (``Family.predict``) as one module, so the
    exported graph gives what the pipeline uses: probabilities, not the family's raw outputs."""

    def __init__(self, family: Any, model: nn.Module) -> None:
        super().__init__()
        self.family, self.model = family, model
        # eval mode for the wrapper too: torch.onnx.export restores the wrapper's mode after
        # tracing, recursively, and a wrapper left in train mode would switch the fold model's
        # BatchNorm layers to batch statistics for everything computed after the export
        self.eval()

    def forward(self, x: torch.Tensor):
        out = self.family.predict(self.model, x)
        return out.probs if out.cls is None else (out.probs, out.cls)


@dataclass
class ExportResult:
    """One experiment's export folder."""

    exp: str
    folder: Path
    manifest: dict
    files: list[Path] = field(default_factory=list)

    @property
    def max_dp(self) -> float:
        return max(f["max_abs_dp"] for f in self.manifest["folds"])


def export_experiments(cfg: Mapping[str, Any], force: bool = False) -> list[ExportResult]:
    """Export every fold model of each experiment ``cfg`` predicts (``predict.experiments``,
    else ``ensemble.yaml``, else ``exp``) to ``runs/<exp>/export/``. An existing export is kept
    (:class:`OutputExistsError`) unless ``force``; everything is checked before anything is
    written."""
    from pneumoseg.config import blend_members

    out_dir = Path(str(cfg["train"]["out_dir"]))
    plans = []
    for exp, _ in blend_members(cfg):
        folder = out_dir / exp / EXPORT_DIR
        if folder.exists() and not force:
            raise OutputExistsError(f"{folder} exists; pass --force to export {exp} again")
        if folder.exists() and not folder.is_dir():
            raise OutputExistsError(f"{folder} is a file: move it away (nothing was written)")
        plans.append((exp, folder))
    from pneumoseg.locks import exclusive, lock_file_for

    results = []
    for exp, folder in plans:  # one export of an experiment at a time: temp names would collide
        with exclusive(lock_file_for(folder), f"the export of {exp} ({folder})"):
            results.append(_export_one(cfg, exp, folder))
    return results


def _members_of(cfg: Mapping[str, Any], exp: str) -> list:
    """The fold models of one experiment, fp32 NCHW on the CPU (what the export is checked on)."""
    import copy

    from pneumoseg.inference.ensemble import load_models

    one = copy.deepcopy(dict(cfg))
    one["predict"] = {**one["predict"], "experiments": [[exp, 1.0]]}
    return load_models(one, device="cpu", channels_last=False)


def _check_images(cfg: Mapping[str, Any], in_channels: int) -> torch.Tensor:
    """:data:`N_CHECK` of the experiment's cached training images, normalised as in training
    (positives first: a check on empty-looking maps alone would prove little)."""
    from pneumoseg.data.cache import cache_dir, open_cache
    from pneumoseg.data.dataset import normalize

    cache = open_cache(cache_dir(cfg, "train"), allow_failed=True)
    ok = np.flatnonzero(cache.ok)
    if not len(ok):
        raise DataError(f"{cache_dir(cfg, 'train')}: no usable cached image to check the export on")
    has = cache.manifest["has_mask"].to_numpy(bool)[ok] if "has_mask" in cache.manifest else None
    order = ok if has is None else np.concatenate([ok[has], ok[~has]])
    rows = np.sort(order[:N_CHECK])
    return normalize(np.asarray(cache.images[rows]), in_channels)


def _export_one(cfg: Mapping[str, Any], exp: str, folder: Path) -> ExportResult:
    from pneumoseg.models.families import family_for

    members = _members_of(cfg, exp)
    fam = family_for(members[0].cfg)
    if fam.name in NOT_EXPORTABLE:
        raise ExportError(f"{exp}: the {fam.name} family cannot be exported: "
                          f"{NOT_EXPORTABLE[fam.name]}")  # fmt: skip
    in_ch = int(members[0].cfg.get("in_channels", 3))
    x = _check_images(cfg, in_ch)
    folder.mkdir(parents=True, exist_ok=True)
    temps, rows = [], []
    try:
        for m in members:
            name = f"{m.path.parent.name}.onnx"
            tmp = folder / f".{name}.tmp"
            temps.append((tmp, folder / name))
            rows.append(_export_member(fam, m, x, tmp, name))
        manifest = _manifest(cfg, exp, fam.name, in_ch, rows)
        for tmp, final in temps:
            tmp.replace(final)
        _write_manifest(folder / MANIFEST, manifest)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    log.info("exported %s: %d fold model(s) to %s, max |Δp| %.2g", exp, len(rows), folder,
             max(r["max_abs_dp"] for r in rows))  # fmt: skip
    return ExportResult(exp, folder, manifest, [final for _, final in temps])


def _export_member(fam: Any, member: Any, x: torch.Tensor, tmp: Path, name: str) -> dict:
    """Export one fold model to ``tmp`` and measure its parity on ``x``; an error above
    :data:`PARITY_TOL`."""
    net = _ProbsNet(fam, member.model.float().eval())
    with torch.no_grad():
        ref = net(x)
    outputs = ["probs", "cls"] if isinstance(ref, tuple) else ["probs"]
    dyn = {"image": {0: "n", 2: "h", 3: "w"}, "probs": {0: "n", 2: "h", 3: "w"}, "cls": {0: "n"}}
    try:
        torch.onnx.export(net, (x,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={k: dyn[k] for k in ["image", *outputs]})  # fmt: skip
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:  # the exporter's own reasons
        raise ExportError(f"{member.path}: ONNX export failed ({type(e).__name__}); "
                          "predict this experiment with the torch backend") from None  # fmt: skip
    got = run_onnx(tmp, x.numpy())
    refs = ref if isinstance(ref, tuple) else (ref,)
    dp = max(float(np.abs(r.numpy() - g).max()) for r, g in zip(refs, got, strict=True))
    if not dp <= PARITY_TOL:
        raise ExportError(f"{member.path}: the ONNX model differs from torch by max |Δp| {dp:.3g} "
                          f"> {PARITY_TOL:g} on {len(x)} cached images; not exported")  # fmt: skip
    model = f"{member.path.parent.name}/{member.path.name}"  # relative to runs/<exp>/
    return {"file": name, "model": model, "model_digest": file_digest(member.path),
            "onnx_digest": file_digest(tmp), "max_abs_dp": dp, "outputs": outputs}  # fmt: skip


def run_onnx(path: str | Path, x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """The outputs of an exported model on normalised images ``x`` with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # no warnings on the console: failures raise
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph...)
        raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}); "
                             "export again (src/export.py --force)") from None  # fmt: skip
    return sess.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})


def _manifest(cfg: Mapping[str, Any], exp: str, family: str, in_ch: int, rows: list) -> dict:
    from pneumoseg.data.dataset import _MEAN, _STD

    # what pneumoseg.data.dataset.normalize does: (x / 255 - mean) / std per channel; one
    # channel uses the means of the ImageNet values
    mean = list(_MEAN) if in_ch == 3 else [float(np.mean(_MEAN))]
    std = list(_STD) if in_ch == 3 else [float(np.mean(_STD))]
    norm = {"scale": 1 / 255, "mean": mean, "std": std}
    return {
        "format": 1,
        "exp": exp,
        "family": family,
        "opset": OPSET,
        "input": {
            "name": "image",
            "channels": in_ch,
            "size": int(cfg["cache"]["size"]),
            "dtype": "float32",
            "layout": "NCHW",
            "normalise": norm,
        },
        "tta": list(cfg["predict"].get("tta") or []),
        "postprocess": "postprocess.yaml",
        "parity_tol": PARITY_TOL,
        "folds": rows,
    }


def _write_manifest(path: Path, manifest: dict) -> None:
    from pneumoseg.io import atomic_write

    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)


def check_export(folder: str | Path) -> dict:
    """The manifest of an export folder, after checking that every ``.onnx`` and every source
    ``model.pt`` still has the checksum it was exported with; a typed error otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST}; export with src/export.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        rows = list(manifest["folds"])
        pairs = [(folder / r["file"], r["onnx_digest"], folder.parent / r["model"],
                  r["model_digest"]) for r in rows]  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is damaged ({type(e).__name__}); export again "
                          "(src/export.py --force)") from None  # fmt: skip
    for onnx_file, onnx_sum, model, model_sum in pairs:
        if not onnx_file.is_file() or file_digest(onnx_file) != onnx_sum:
            raise ExportError(f"{onnx_file} is missing or changed since it was exported; export "
                              "again (src/export.py --force)")  # fmt: skip
        if not model.is_file() or file_digest(model) != model_sum:
            raise ExportError(f"{onnx_file} is stale: {model} changed since it was exported; "
                              "export again (src/export.py --force)")  # fmt: skip
    return manifest
