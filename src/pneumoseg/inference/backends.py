"""Which runtime predicts, and the engines behind :class:`~.predictor.Predictor`'s one seam:
uint8 images at ``cache.size`` in, probabilities at each image's original size out.

``predict.backend`` × ``predict.precision`` (:func:`plan_runtime`):

* ``torch``: the fold models themselves (:class:`TorchEngine`); precision ``auto`` follows
  ``predict.amp``, ``fp32`` is amp off, ``bf16`` autocast (native-bf16 CPUs or a GPU).
* ``onnxruntime`` / ``openvino``: the exports of ``src/export.py`` (:class:`ExportEngine`,
  no torch imported), each checked against its digests first; ``int8`` only where the export's
  int8 model passed its agreement check, ``bf16`` only with OpenVINO on a native-bf16 CPU.
* ``auto``: with a GPU, torch. Else, when every experiment of the blend has an up-to-date export,
  the fastest runtime × precision that passed its check in the runtimes measured at export on a CPU
  like this one (fp32 ONNX Runtime when they were measured on another kind of CPU); without one,
  torch, and the log says once how much faster an export would be.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.config import blend_members
from pneumoseg.errors import ConfigError, MissingFileError, UserError
from pneumoseg.inference import cpu
from pneumoseg.inference.exported import EXPORT_DIR, ExportError, check_export, check_int8
from pneumoseg.inference.runtime import (
    RUNTIMES,
    UNSUPPORTED,
    ExportedMember,
    checked_as_run,
    open_session,
    predict_probs_np,
    resize_back_np,
)
from pneumoseg.tuning.provenance import model_key

log = logging.getLogger("pneumoseg.predict")

# benchmarks/bench_runtime.py on the README's CPU (ResNet34 U-Net at 512 × hflip, 2 threads): the
# fastest exported runtime that passed its checks against torch as predict.py ran it before
# exports existed. Quoted in the one log line that suggests exporting, never used to choose.
BENCH_SPEEDUP = (
    "2.2x (the trained demo) to 2.5x (a trained ResNet34 U-Net at 512), OpenVINO int8, "
    "against torch bf16 autocast, 2-core AMD EPYC"
)
BF16_REFUSED = (
    "predict.precision: bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one "
    "({cpu}) would emulate it, slower than fp32. Use fp32 or int8"
)


@dataclass
class Plan:
    """The runtime and precision to predict with, and why (logged, and shown by /health)."""

    backend: str
    precision: str
    reason: str
    exports: dict[str, tuple[Path, dict]] = field(default_factory=dict)
    threads: int | None = None


def plan_runtime(cfg: Mapping[str, Any]) -> Plan:
    p = cfg["predict"]
    backend, precision, threads = p["backend"], p["precision"], p["threads"]
    if backend == "torch":
        return Plan("torch", precision, "predict.backend: torch", threads=threads)
    if backend in RUNTIMES:
        exports = _exports(cfg, strict=True)
        prec = precision if precision != "auto" else _auto_precision(exports, backend)
        _require(backend, prec, exports)
        return Plan(backend, prec, f"predict.backend: {backend}", exports, threads)
    if _wants_gpu(cfg):
        return Plan("torch", precision, "a GPU: exports run on the CPU", threads=threads)
    exports = _exports(cfg, strict=False)
    if exports is None:
        if not _has_torch():
            raise ExportError("predict.backend auto: no up-to-date export of every experiment "
                              "and no torch in this install to predict without one; run python "
                              "src/export.py --config <config> where the training stack is")  # fmt: skip
        log.info("predicting with torch: no up-to-date export. `python src/export.py --config "
                 "<config>` exports the models and measures every runtime on this CPU; on the "
                 "benchmark CPU the fastest that passed its checks was %s (README, "
                 "benchmarks/bench_runtime.py)", BENCH_SPEEDUP)  # fmt: skip
        return Plan("torch", precision, "no up-to-date export", threads=threads)
    best = _fastest(exports, precision)
    if best is None:
        runtime, prec = _fallback(precision)
        why = "no runtime measured at export on this kind of CPU passed (or none was measured)"
        return Plan(runtime, prec, why, exports, threads)
    runtime, prec, seconds = best
    why = f"fastest that passed at export on this CPU ({seconds:.3g} s/image)"
    return Plan(runtime, prec, why, exports, threads)


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _wants_gpu(cfg: Mapping[str, Any]) -> bool:
    device = str(cfg["train"]["device"])
    if device == "cpu" or not _has_torch():
        return False
    if device != "auto":
        return True  # cuda, cuda:1, mps: the config asks for an accelerator
    import torch

    return bool(torch.cuda.is_available())


def _exports(cfg: Mapping[str, Any], strict: bool) -> dict[str, tuple[Path, dict]] | None:
    """``{exp: (folder, manifest)}`` for every experiment of the blend, each checked; when one is
    missing or unusable: an error (``strict``) or None, with the reason logged."""
    out_dir = Path(str(cfg["train"]["out_dir"]))
    found = {}
    for exp, _ in blend_members(cfg):
        folder = out_dir / exp / EXPORT_DIR
        try:
            if not folder.is_dir():
                raise ExportError(f"{folder} does not exist: export with python src/export.py "
                                  "--config <config>")  # fmt: skip
            found[exp] = (folder, check_export(folder, models_optional=True))
        except UserError as e:
            if strict:
                raise
            if folder.is_dir():  # an export that exists but cannot be used is worth a warning
                log.warning("not using the export of %s: %s", exp, e)
            return None
    return found


def _rows(exports: Mapping[str, tuple[Path, dict]]) -> dict[tuple[str, str], float] | None:
    """``{(runtime, precision): summed s/image}`` over the rows that passed in every manifest,
    measured on this kind of CPU; None when some manifest has none from this CPU."""
    key = cpu.cpu_key()
    totals: dict[tuple[str, str], list[float]] = {}
    for _folder, manifest in exports.values():
        runtimes = manifest.get("runtimes") or {}
        if runtimes.get("cpu_key") != key:
            return None
        for row in runtimes.get("measured") or []:
            if not checked_as_run(row):  # its check did not run it as it would run now
                continue
            if row.get("passed") and row.get("layout") != "NCHW" and "s_per_image" in row:
                totals.setdefault((row["runtime"], row["precision"]), []).append(
                    float(row["s_per_image"]))  # fmt: skip
    n = len(exports)
    return {k: sum(v) for k, v in totals.items() if len(v) == n}


def _fastest(exports, precision: str, runtime: str | None = None):
    rows = _rows(exports)
    if not rows:
        return None
    ok = [(s, r, p) for (r, p), s in rows.items()
          if (precision == "auto" or p == precision) and (runtime is None or r == runtime)
          and (r != "torch" or _has_torch()) and (p != "bf16" or cpu.native_bf16())]  # fmt: skip
    if not ok:
        return None
    seconds, r, p = min(ok)
    return r, p, seconds


def _fallback(precision: str) -> tuple[str, str]:
    if precision in ("auto", "fp32"):
        return "onnxruntime", "fp32"
    if precision == "bf16":
        return "openvino", "bf16"
    return "onnxruntime", precision


def _auto_precision(exports, runtime: str) -> str:
    best = _fastest(exports, "auto", runtime)
    return "fp32" if best is None else best[1]


def _require(runtime: str, precision: str, exports) -> None:
    """Refuse a precision this CPU or these exports cannot give, and a runtime that cannot run
    an export's graphs."""
    for _folder, manifest in exports.values():
        why = UNSUPPORTED.get((runtime, manifest.get("head", "probs")))
        if why:
            raise ConfigError(f"predict.backend {runtime}: experiment {manifest.get('exp')!r} "
                              f"({manifest.get('family')}) cannot run there: {why}")  # fmt: skip
    if precision == "bf16":
        if runtime != "openvino":
            raise ConfigError(f"predict.precision: bf16 runs with openvino (or torch), not "
                              f"{runtime}")  # fmt: skip
        if not cpu.native_bf16():
            raise ConfigError(BF16_REFUSED.format(cpu=cpu.describe()))
    # int8: ExportEngine's _files refuses an export without a passing int8 model for this
    # runtime (check_int8, which hashes every file: once, there)


# --------------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------------
class ExportEngine:
    """The exported fold models of every experiment of the blend in ONNX Runtime or OpenVINO."""

    def __init__(self, cfg: Mapping[str, Any], plan: Plan):
        self.backend, self.precision, self.threads = plan.backend, plan.precision, plan.threads
        self.device = "cpu"
        self.members: list[ExportedMember] = []
        self.digests: dict[str, str] = {}
        for exp, weight in blend_members(cfg):
            folder, manifest = plan.exports[exp]
            rows = select_folds(manifest, cfg, folder)
            files = _files(folder, manifest, rows, plan)
            head = {"head": manifest.get("head", "probs"),
                    "min_score": float(manifest.get("min_score", 0.0))}  # fmt: skip
            for row, path in zip(rows, files, strict=True):
                session = open_session(path, plan.backend, plan.precision, plan.threads)
                in_ch = int(manifest["input"]["channels"])
                self.members.append(ExportedMember(session, weight / len(rows), in_ch,
                                                   f"{exp}/{path.name}", **head))  # fmt: skip
                self.digests[model_key(folder.parent / row["model"])] = row["model_digest"]

    def apply_options(self, options: Mapping[str, Any]) -> None:
        """The tuned inference options (``model_options`` of postprocess.yaml): a detector's
        ``min_score``, applied outside its graph."""
        for name, value in options.items():
            detectors = [m for m in self.members if m.head == "detections"]
            if name != "min_score" or not detectors:
                raise ConfigError(f"model option {name!r} of the tuning has no meaning for these "
                                  "exported models; predict with predict.backend torch")  # fmt: skip
            for m in detectors:
                m.min_score = float(value)
            log.info("detector min_score = %g (tuned)", float(value))

    def probs(self, images: np.ndarray, sizes, tta: Sequence[str]):
        p, cls = predict_probs_np(self.members, images, tta)
        return resize_back_np(p, sizes), cls

    def model_paths(self) -> list[Path]:
        return []


def _files(folder: Path, manifest: Mapping, rows: list[dict], plan: Plan) -> list[Path]:
    if plan.precision != "int8":
        return [folder / r["file"] for r in rows]
    by_stem = {p.name.split(".")[0]: p for p in check_int8(folder, manifest, plan.backend)}
    return [by_stem[r["file"].split(".")[0]] for r in rows]


def select_folds(manifest: Mapping, cfg: Mapping[str, Any], folder: Path) -> list[dict]:
    """The manifest's fold rows that ``predict.folds`` names (as the torch path picks its
    ``model.pt`` files): None = every fold 0..n_folds-1 (an export missing one is refused) plus
    ``full`` when exported."""
    rows = {Path(r["model"]).parent.name: r for r in manifest["folds"]}
    folds = cfg["predict"].get("folds")
    n_folds = int(cfg["folds"]["n_folds"])
    if folds is None:
        names = [f"fold{k}" for k in range(n_folds)] + (["full"] if "full" in rows else [])
    else:
        folds = [folds] if isinstance(folds, (int, str)) else folds
        names = ["full" if str(f) in ("-1", "full") else f"fold{int(f)}" for f in folds]
    missing = [n for n in names if n not in rows]
    if missing:
        raise MissingFileError(f"{folder}: no exported model for {', '.join(missing)} (exported: "
                               f"{', '.join(sorted(rows))}); export again (src/export.py "
                               "--force) or name the folds with predict.folds")  # fmt: skip
    return [rows[n] for n in names]


class TorchEngine:
    """The fold models in torch (:mod:`.ensemble`), on ``train.device``."""

    def __init__(self, cfg: Mapping[str, Any], plan: Plan):
        import torch

        from pneumoseg.inference.ensemble import load_models
        from pneumoseg.training import engine

        self.backend, self.threads = "torch", plan.threads
        self.device = engine.get_device(cfg["train"]["device"])
        amp = {"auto": cfg["predict"]["amp"], "fp32": "none", "bf16": "bf16"}[plan.precision]
        if plan.precision == "bf16" and self.device.type == "cpu" and not cpu.native_bf16():
            raise ConfigError(BF16_REFUSED.format(cpu=cpu.describe()))
        self.dtype = engine.inference_dtype(self.device, amp)
        self.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        if plan.threads:
            torch.set_num_threads(int(plan.threads))
        self.members = load_models(cfg, self.device)
        self.digests: dict[str, str] = {}

    def probs(self, images: np.ndarray, sizes, tta: Sequence[str]):
        from pneumoseg.inference.ensemble import predict_probs, resize_to_original

        p, cls = predict_probs(self.members, images, tta, self.device, self.dtype)
        return resize_to_original(p, sizes), (None if cls is None else cls.float().cpu().numpy())

    def model_paths(self) -> list[Path]:
        return [m.path for m in self.members if m.path is not None]


def make_engine(cfg: Mapping[str, Any]):
    """The engine ``cfg`` asks for (:func:`plan_runtime`), logged with the reason."""
    plan = plan_runtime(cfg)
    engine = TorchEngine(cfg, plan) if plan.backend == "torch" else ExportEngine(cfg, plan)
    log.info("runtime: %s %s, %s thread(s) (%s)", engine.backend, engine.precision,
             plan.threads or "all", plan.reason)  # fmt: skip
    engine.reason = plan.reason
    return engine
