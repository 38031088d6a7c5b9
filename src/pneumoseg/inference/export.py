"""Fold models exported to ONNX (``src/export.py``), each checked against torch before it is kept.

``<train.out_dir>/<exp>/export/``::

    fold<k>.onnx       the fold's model and its family's probability head as one graph: normalised
                       float32 images (N, C, H, W) in, probabilities (N, 1, H, W) out (and the
                       image-level probability (N, 1) with an aux head); opset 17, dynamic N, H, W.
                       A detector (Mask R-CNN) takes one image and gives its masks and scores:
                       the probability map is made outside the graph (``head: detections``)
    fold<k>.int8.onnx  ONNX Runtime's int8 model (:mod:`.export_checks`), if ``export.int8`` asks
                       for it and it passed its check
    fold<k>.int8-ov.xml, .bin  OpenVINO's int8 model (NNCF), likewise
    manifest.json      family, head, input channels and size, normalisation, the experiment's TTA
                       views and post-processing, per fold the digests (first 16 hex digits of
                       SHA-256, as tunings record) of the model.pt it was made from and of the
                       .onnx and the parity measured, the int8 record, and every runtime ×
                       precision timed and checked on this CPU (``runtimes``)

An export is kept only if ONNX Runtime's probabilities on a batch of the experiment's own cached
training images match torch fp32 within :data:`PARITY_TOL` (else it is an error and nothing is
written). The manifest's checksums make a stale export (its ``model.pt`` retrained since) or a
damaged ``.onnx`` detectable: :func:`~.exported.check_export` refuses both. The export folder is
replaced as one set: the ``.onnx`` files are renamed into place first, the manifest last, so a
folder whose manifest does not match its files is never taken for a good export. Prediction uses
the exports through :mod:`.backends`.
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

from pneumoseg.errors import DataError, OutputExistsError
from pneumoseg.inference import cpu
from pneumoseg.inference import export_checks as checks
from pneumoseg.inference.exported import (  # noqa: F401 - the reading side, re-exported
    EXPORT_DIR,
    FORMAT,
    MANIFEST,
    PARITY_TOL,
    ExportError,
    check_export,
    check_int8,
)
from pneumoseg.inference.runtime import checked_as_run
from pneumoseg.tuning.provenance import file_digest  # the model.pt digest tunings record too

log = logging.getLogger("pneumoseg.export")

OPSET = 17
N_CHECK = 4  # cached training images the parity is measured on
# Families whose probability map is not one traceable graph, and why (the name is the error).
# Every family exports today; a new one that cannot goes here with its reason.
NOT_EXPORTABLE: dict[str, str] = {}
# Families whose graph gives detections (masks and scores per image), turned into a probability
# map outside the graph (pneumoseg.inference.runtime.detections_to_probs), one image at a time.
DETECTORS = ("maskrcnn",)


class _DetectorNet(nn.Module):
    """A detector (torchvision Mask R-CNN) for one image (1, C, H, W): its masks (K, 1, H, W) and
    scores (K,), pasted at the image's size inside the graph; the family's ``min_score`` and the
    max over detections are applied outside it, where the tuned ``min_score`` can change."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()  # see _ProbsNet

    def forward(self, x: torch.Tensor):
        det = self.model([x[0]])[0]
        return det["masks"], det["scores"]


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


def export_experiments(
    cfg: Mapping[str, Any],
    force: bool = False,
    update: bool = False,
    images: np.ndarray | None = None,
) -> list[ExportResult]:
    """Export every fold model of each experiment ``cfg`` predicts (``predict.experiments``,
    else ``ensemble.yaml``, else ``exp``) to ``runs/<exp>/export/``. An existing export is kept
    (:class:`OutputExistsError`) unless ``force``; with ``update`` an up-to-date one is kept and a
    stale or damaged one made again. Everything is checked before anything is written.
    ``images``: uint8 (N, S, S) images at ``cache.size`` to check, calibrate and time on instead
    of the experiment's cached training images (e.g. a benchmark's real X-rays)."""
    from pneumoseg.config import blend_members

    out_dir = Path(str(cfg["train"]["out_dir"]))
    plans = []
    for exp, _ in blend_members(cfg):
        folder = out_dir / exp / EXPORT_DIR
        if folder.exists() and not folder.is_dir():
            raise OutputExistsError(f"{folder} is a file: move it away (nothing was written)")
        if folder.exists() and update:
            try:
                _up_to_date(folder, cfg["export"]["int8"])
                log.info("%s: the export in %s is up to date", exp, folder)
                continue
            except ExportError as e:
                log.warning("%s: exporting again: %s", exp, e)
        elif folder.exists() and not force:
            raise OutputExistsError(f"{folder} exists; pass --force to export {exp} again "
                                    "(or --update: only if it is stale)")  # fmt: skip
        plans.append((exp, folder))
    from pneumoseg.locks import exclusive, lock_file_for

    results = []
    for exp, folder in plans:  # one export of an experiment at a time: temp names would collide
        with exclusive(lock_file_for(folder), f"the export of {exp} ({folder})"):
            results.append(_export_one(cfg, exp, folder, images))
    return results


NOT_ASKED = "not asked for (export.int8)"


def _up_to_date(folder: Path, asked: list[str]) -> None:
    """An error unless the export in ``folder`` is up to date and has tried the int8 models
    ``export.int8`` asks for (an fp32-only export is made again when int8 is asked for later;
    one that has int8 models no longer asked for keeps them)."""
    manifest = check_export(folder)
    records = manifest.get("int8") if isinstance(manifest.get("int8"), dict) else {}
    damaged = [rt for rt, r in records.items() if not isinstance(r, dict)]
    if damaged:
        raise ExportError(f"{folder / MANIFEST}: the int8 record of {', '.join(damaged)} is "
                          "damaged")  # fmt: skip
    missing = [rt for rt in asked if records.get(rt, {}).get("why") == NOT_ASKED]
    if missing:
        raise ExportError(f"{folder} has no int8 model for {', '.join(missing)} (exported "
                          "without it), which export.int8 asks for")  # fmt: skip
    runtimes = manifest.get("runtimes") if isinstance(manifest.get("runtimes"), dict) else {}
    if runtimes.get("cpu_key") == cpu.cpu_key():
        rows = runtimes.get("measured") if isinstance(runtimes.get("measured"), list) else []
        other = sorted({str(r.get("precision")) for r in rows
                        if isinstance(r, dict) and not checked_as_run(r)})  # fmt: skip
        if other:
            raise ExportError(f"{folder}: OpenVINO {', '.join(other)} was checked at another "
                              "precision than this version runs it at")  # fmt: skip


def _members_of(cfg: Mapping[str, Any], exp: str) -> list:
    """The fold models of one experiment, fp32 NCHW on the CPU (what the export is checked on)."""
    import copy

    from pneumoseg.inference.ensemble import load_models

    one = copy.deepcopy(dict(cfg))
    one["predict"] = {**one["predict"], "experiments": [[exp, 1.0]]}
    return load_models(one, device="cpu", channels_last=False)


def cached_images(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """Up to ``n`` of the experiment's cached training images, uint8 (N, S, S), positives first
    (a check on empty-looking maps alone would prove little)."""
    from pneumoseg.data.cache import cache_dir, open_cache

    cache = open_cache(cache_dir(cfg, "train"), allow_failed=True)
    ok = np.flatnonzero(cache.ok)
    if not len(ok):
        raise DataError(f"{cache_dir(cfg, 'train')}: no usable cached image to check the export on")
    has = cache.manifest["has_mask"].to_numpy(bool)[ok] if "has_mask" in cache.manifest else None
    order = ok if has is None else np.concatenate([ok[has], ok[~has]])
    rows = order[:n]
    return np.asarray(cache.images[np.sort(rows)])[np.argsort(np.argsort(rows))]


def _check_images(cfg: Mapping[str, Any], in_channels: int) -> torch.Tensor:
    """:data:`N_CHECK` cached training images (positives first), normalised as in training."""
    from pneumoseg.data.dataset import normalize

    return normalize(cached_images(cfg, N_CHECK), in_channels)


def _export_one(
    cfg: Mapping[str, Any], exp: str, folder: Path, images: np.ndarray | None = None
) -> ExportResult:
    from pneumoseg.data.dataset import normalize
    from pneumoseg.models.families import family_for

    members = _members_of(cfg, exp)
    fam = family_for(members[0].cfg)
    if fam.name in NOT_EXPORTABLE:
        raise ExportError(f"{exp}: the {fam.name} family cannot be exported: "
                          f"{NOT_EXPORTABLE[fam.name]}")  # fmt: skip
    in_ch = int(members[0].cfg.get("in_channels", 3))
    if images is None:
        images = cached_images(cfg, checks.N_AGREE + checks.N_CALIB)
    folder.mkdir(parents=True, exist_ok=True)
    stems = [m.path.parent.name for m in members]
    fp32 = [(folder / f".{k}.tmp.onnx", folder / f"{k}.onnx") for k in stems]
    int8 = {rt: [(folder / checks.int8_name(k, rt, tmp=True), folder / checks.int8_name(k, rt))
                 for k in stems] for rt in checks.int8_runtimes()}  # fmt: skip
    try:
        x = normalize(images[:N_CHECK], in_ch)
        rows = [_export_member(fam, m, x, tmp, final.name)
                for m, (tmp, final) in zip(members, fp32, strict=True)]  # fmt: skip
        threshold = _threshold(cfg, exp)
        records = (_int8(fp32, int8, images, in_ch, threshold, cfg["export"]["int8"])
                   if fam.name not in DETECTORS else
                   {rt: {"made": False, "why": "not tried for detectors", "calibration_images": 0}
                    for rt in int8})  # fmt: skip
        head = _head(fam, members[0])
        made = {rt: [t for t, _ in int8[rt]] for rt, r in records.items() if r["made"]}
        runtimes = _check_runtimes(cfg, members, fp32, made, images[: checks.N_AGREE], in_ch,
                                   head, threshold)  # fmt: skip
        for rt, record in records.items():
            record["passed"] = any(r["passed"] for r in runtimes["measured"]
                                   if r["precision"] == "int8" and r["runtime"] == rt)  # fmt: skip
        keep = [*fp32, *(pair for rt, r in records.items() if r["passed"] for pair in int8[rt])]
        manifest = {**_manifest(cfg, exp, fam.name, in_ch, rows), **head, "runtimes": runtimes,
                    "int8": {rt: _int8_rows(rt, r, int8[rt]) for rt, r in records.items()}}  # fmt: skip
        _replace(keep, [pair for rt, r in records.items() if not r["passed"] for pair in int8[rt]])
        _write_manifest(folder / MANIFEST, manifest)
    finally:
        for tmp, _ in [*fp32, *(pair for pairs in int8.values() for pair in pairs)]:
            for f in checks.int8_files(tmp):
                f.unlink(missing_ok=True)
    log.info("exported %s: %d fold model(s) to %s, max |Δp| %.2g; int8 %s", exp, len(rows),
             folder, max(r["max_abs_dp"] for r in rows),
             "; ".join(f"{rt} " + ("kept" if r["passed"] else f"not kept ({r['why']})")
                       for rt, r in records.items()))  # fmt: skip
    return ExportResult(exp, folder, manifest, [final for _, final in keep])


def _replace(keep: list, drop: list) -> None:
    """Rename the kept temporary files into place (an OpenVINO IR with its ``.bin``) and remove
    the int8 models of an earlier export that no longer hold."""
    for tmp, final in keep:
        for t, f in zip(checks.int8_files(tmp), checks.int8_files(final), strict=True):
            t.replace(f)
    for _, final in drop:
        for f in checks.int8_files(final):
            f.unlink(missing_ok=True)


def _int8(fp32: list, int8: dict, images: np.ndarray, in_ch: int, threshold: float,
          asked: list[str]) -> dict:  # fmt: skip
    """Quantize every fold model to int8 for each runtime ``asked`` for (``export.int8``),
    calibrated on the cached images after the check images (all of them when the cache is
    smaller). A failure is recorded, not raised: int8 is an option, fp32 is the export."""
    from pneumoseg.data.dataset import normalize

    calib = images[checks.N_AGREE :] if len(images) > checks.N_AGREE else images
    x = normalize(calib, in_ch).numpy()
    out = {}
    for runtime, why_not in checks.int8_runtimes().items():
        why_not = why_not if runtime in asked else NOT_ASKED
        record = {"made": False, "why": why_not,
                  "calibration_images": len(calib) if why_not is None else 0}  # fmt: skip
        if why_not is None:
            try:
                notes = [checks.quantize(runtime, src, dst, x, threshold)
                         for (src, _), (dst, _) in zip(fp32, int8[runtime], strict=True)]  # fmt: skip
                record.update(made=True, why="its masks disagree with fp32 (see runtimes)",
                              notes=notes)  # fmt: skip
            except Exception as e:  # any failure of a quantizer leaves the fp32 export good
                log.warning("%s int8 quantization failed (%s): not made", runtime,
                            type(e).__name__)  # fmt: skip
                record["why"] = f"quantization failed ({type(e).__name__})"
        out[runtime] = record
    return out


def _int8_rows(runtime: str, record: dict, pairs: list) -> dict:
    out = {"passed": record.get("passed", False), "min_dice": checks.MIN_DICE,
           "calibration_images": record["calibration_images"],
           "method": checks.INT8_METHODS[runtime]}  # fmt: skip
    if not out["passed"]:
        out["why"] = record["why"]
        return out
    out["folds"] = [{"file": final.name, **note,
                     "digests": {f.name: file_digest(t) for t, f in
                                 zip(checks.int8_files(tmp), checks.int8_files(final), strict=True)}}
                    for (tmp, final), note in zip(pairs, record["notes"], strict=True)]  # fmt: skip
    return out


def _head(fam: Any, member: Any) -> dict:
    """How the graph's outputs become probabilities (the manifest's ``head``, ``min_score``)."""
    if fam.name in DETECTORS:
        return {"head": "detections", "min_score": detector_min_score(member.model)}
    return {"head": "probs"}


def _threshold(cfg: Mapping[str, Any], exp: str) -> float:
    """The experiment's tuned pixel threshold (0.5 before it is tuned): masks are compared there."""
    from pneumoseg.postprocessing.postprocess import load_params, pixel_threshold

    post = Path(str(cfg["train"]["out_dir"])) / exp / "postprocess.yaml"
    return pixel_threshold(load_params(post)) if post.is_file() else 0.5


def _check_runtimes(cfg, members, fp32, int8, images, in_ch, head, threshold) -> dict:
    """Time and compare every runtime × precision on this CPU (:mod:`.export_checks`)."""
    tta = list(cfg["predict"].get("tta") or [])
    threads = cfg["predict"].get("threads")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        rows, ref = checks.torch_rows(members, images, tta, cfg["predict"]["amp"], threshold)
        files = {"fp32": [t for t, _ in fp32], "int8": int8}
        weights = [m.weight for m in members]
        return checks.check_runtimes(files, weights, in_ch, images, tta, threshold, rows, ref,
                                     threads, head)  # fmt: skip
    finally:
        torch.set_num_threads(before)


def _export_member(fam: Any, member: Any, x: torch.Tensor, tmp: Path, name: str) -> dict:
    """Export one fold model to ``tmp`` and measure its parity on ``x``; an error above
    :data:`PARITY_TOL`."""
    if fam.name in DETECTORS:
        return _export_detector(fam, member, x, tmp, name)
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
    return _parity_row(member, tmp, name, dp, len(x), outputs)


def _parity_row(member: Any, tmp: Path, name: str, dp: float, n: int, outputs: list) -> dict:
    if not dp <= PARITY_TOL:
        raise ExportError(f"{member.path}: the ONNX model differs from torch by max |Δp| {dp:.3g} "
                          f"> {PARITY_TOL:g} on {n} cached images; not exported")  # fmt: skip
    model = f"{member.path.parent.name}/{member.path.name}"  # relative to runs/<exp>/
    return {"file": name, "model": model, "model_digest": file_digest(member.path),
            "onnx_digest": file_digest(tmp), "max_abs_dp": dp, "outputs": outputs}  # fmt: skip


def detector_min_score(model: nn.Module) -> float:
    """The ``min_score`` a built Mask R-CNN applies (its config's, or the family default)."""
    from pneumoseg.models.families.maskrcnn import DEFAULT_MIN_SCORE

    core = getattr(model, "module", model)
    return float(getattr(core, "pneumoseg_min_score", DEFAULT_MIN_SCORE))


def _export_detector(fam: Any, member: Any, x: torch.Tensor, tmp: Path, name: str) -> dict:
    """A detector: one image per run; the probability map made from its detections in numpy
    must match the family's own ``predict`` on every check image."""
    from pneumoseg.inference.runtime import detections_to_probs

    model = member.model.float().eval()
    net = _DetectorNet(model)
    outputs = ["masks", "scores"]
    dyn = {"image": {2: "h", 3: "w"}, "masks": {0: "k", 2: "h", 3: "w"}, "scores": {0: "k"}}
    try:
        torch.onnx.export(net, (x[:1],), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=outputs, dynamic_axes=dyn)  # fmt: skip
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        raise ExportError(f"{member.path}: ONNX export failed ({type(e).__name__}); "
                          "predict this experiment with the torch backend") from None  # fmt: skip
    min_score = detector_min_score(model)
    dp = 0.0
    for i in range(len(x)):
        with torch.no_grad():
            ref = fam.predict(model, x[i : i + 1]).probs[0].numpy()
        masks, scores = run_onnx(tmp, x[i : i + 1].numpy())[:2]
        got = detections_to_probs(masks, scores, min_score, tuple(x.shape[-2:]))
        dp = max(dp, float(np.abs(ref - got).max()))
    return _parity_row(member, tmp, name, dp, len(x), outputs)


def run_onnx(path: str | Path, x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """The outputs of an exported model on normalised images ``x`` with ONNX Runtime (CPU)."""
    from pneumoseg.inference.runtime import OrtSession

    return OrtSession(Path(path), threads).run(np.ascontiguousarray(x, dtype=np.float32))


def _manifest(cfg: Mapping[str, Any], exp: str, family: str, in_ch: int, rows: list) -> dict:
    from pneumoseg.data.dataset import _MEAN, _STD

    # what pneumoseg.data.dataset.normalize does: (x / 255 - mean) / std per channel; one
    # channel uses the means of the ImageNet values
    mean = list(_MEAN) if in_ch == 3 else [float(np.mean(_MEAN))]
    std = list(_STD) if in_ch == 3 else [float(np.mean(_STD))]
    norm = {"scale": 1 / 255, "mean": mean, "std": std}
    return {
        "format": FORMAT,
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
