"""What ``src/export.py`` checks and measures beyond fp32 parity: an int8 model calibrated on the
experiment's own images, and every runtime × precision timed and compared on this CPU.

* **int8**, one model per runtime, each calibrated on :data:`N_CALIB` of the experiment's cached
  training images that are not among the check images:

  - ONNX Runtime (:func:`quantize_int8`, ``fold<k>.int8.onnx``): its static post-training
    quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges);
  - OpenVINO (:func:`quantize_int8_openvino`, ``fold<k>.int8-ov.xml`` + ``.bin``): NNCF's
    quantization with accuracy control. OpenVINO's int8 kernels run ONNX Runtime's QDQ model
    (and NNCF's plain int8 model) with masks that agree less with fp32 (Dice 0.96-0.97 on the
    trained demo, against 0.996 for ONNX Runtime), so NNCF puts back in fp32 the operations whose
    int8 costs the most agreement until the calibration images' masks agree with fp32's at Dice
    >= :data:`CALIB_DICE` (a few of some 40 on the demo).
* **The runtime check** (:func:`check_runtimes`): the experiment's fold ensemble with its TTA on
  :data:`N_AGREE` cached training images (positives first), through torch fp32 (the reference),
  torch at the precision ``predict.amp`` gives on this CPU, ONNX Runtime fp32 and int8, and
  OpenVINO fp32, bf16 (native bf16 only) and int8, each timed (median of :data:`REPEATS`
  after a warm-up). fp32 passes at max |Δp| ≤ ``PARITY_TOL``; a reduced precision passes when its
  masks agree with torch fp32's (Dice ≥ :data:`MIN_DICE` at the tuned threshold, pooled over the
  images). The rows go into the manifest with this CPU's :func:`~pneumoseg.inference.cpu.cpu_key`:
  ``predict.backend: auto`` picks the fastest row that passed, on a CPU of the same key.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.inference import cpu
from pneumoseg.inference.exported import PARITY_TOL
from pneumoseg.inference.runtime import (
    UNSUPPORTED,
    ExportedMember,
    OvSession,
    agreement,
    open_session,
    ov_precision_hint,
    predict_probs_np,
)

log = logging.getLogger("pneumoseg.export")

N_AGREE = 8  # images the runtimes are compared and timed on
N_CALIB = 16  # images the int8 ranges are calibrated on
MIN_DICE = 0.99  # a reduced precision's masks against torch fp32's
# NNCF's accuracy-control target on the calibration images: above MIN_DICE, which the check
# images (others) must then reach
CALIB_DICE = 0.995
REPEATS = 3
INT8_METHODS = {
    "onnxruntime": "onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 "
    "activations, MinMax",
    "openvino": f"NNCF post-training quantization with accuracy control (OpenVINO IR): "
    f"operations back in fp32 until the calibration masks agree with fp32 at Dice >= {CALIB_DICE}; "
    "run with its floating-point operations in bf16 on CPUs with native bf16",
}


def int8_name(stem: str, runtime: str, tmp: bool = False) -> str:
    """The file of a fold's int8 model for ``runtime`` (its temporary name while exporting)."""
    base, ext = (f"{stem}.int8-ov", ".xml") if runtime == "openvino" else (f"{stem}.int8", ".onnx")
    return f".{base}.tmp{ext}" if tmp else f"{base}{ext}"


def int8_files(path: Path) -> list[Path]:
    """An int8 model's files: an OpenVINO IR is its ``.xml`` and the ``.bin`` beside it."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def int8_runtimes() -> dict[str, str | None]:
    """Per runtime, why no int8 model can be made for it here (None: it can)."""
    import importlib.util

    if not _has_openvino():
        return {"onnxruntime": None}
    nncf = importlib.util.find_spec("nncf") is not None
    return {"onnxruntime": None,
            "openvino": None if nncf else "nncf is not installed (pip install nncf)"}  # fmt: skip


def quantize(runtime: str, src: Path, dst: Path, calib: np.ndarray, threshold: float) -> dict:
    """``runtime``'s int8 model of ``src`` into ``dst``; what the quantization reports."""
    if runtime == "openvino":
        return quantize_int8_openvino(src, dst, calib, threshold)
    quantize_int8(src, dst, calib)
    return {}


def quantize_int8(src: Path, dst: Path, calib: np.ndarray) -> None:
    """Static int8 quantization of the fp32 model ``src`` into ``dst``, calibrated on the
    normalised images ``calib`` (N, C, H, W)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": np.ascontiguousarray(calib[i : i + 4])}
                                 for i in range(0, len(calib), 4)])  # fmt: skip

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="pneumoseg-int8-", dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:  # shape inference and graph clean-up before quantizing, as ONNX Runtime advises
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            log.info("int8: pre-processing skipped (%s)", type(e).__name__)
            pre = src
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)  # fmt: skip


def quantize_int8_openvino(src: Path, dst: Path, calib: np.ndarray, threshold: float) -> dict:
    """int8 OpenVINO IR ``dst`` (``.xml`` + ``.bin``) of the fp32 model ``src`` by NNCF with
    accuracy control, calibrated on ``calib`` (N, C, H, W) and validated on the same images
    against ``src``'s fp32 masks at ``threshold``; ``{"reverted": "k of n"}`` operations put back
    in fp32 (as NNCF reports it; ``"none"``). Run in a child process (:mod:`.nncf_quantize`: NNCF's
    own OpenVINO plugins can break this process's signal handling); its failure is an error."""
    import json
    import os
    import subprocess  # nosec B404  (our own module, fixed argv)
    import sys

    import pneumoseg

    with tempfile.TemporaryDirectory(prefix="pneumoseg-nncf-") as tmp:  # not in the export folder
        np.save(Path(tmp) / "calib.npy", np.ascontiguousarray(calib, dtype=np.float32))
        result = Path(tmp) / "result.json"
        # pneumoseg importable as here; no empty entry (it would put the working folder first)
        path = os.pathsep.join(p for p in [str(Path(pneumoseg.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")] if p)  # fmt: skip
        # NNCF_CI: NNCF's switch for its usage telemetry (events to Google Analytics): offline
        env = {**os.environ, "NNCF_CI": "1", "PYTHONPATH": path}
        argv = [sys.executable, "-m", "pneumoseg.inference.nncf_quantize", str(src), str(dst),
                str(Path(tmp) / "calib.npy"), repr(float(threshold)), str(result)]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)  # nosec B603
        if proc.returncode != 0 or not result.is_file():
            log.debug("NNCF's process: %s", proc.stderr[-2000:])
            raise RuntimeError(f"NNCF's quantization process failed (exit {proc.returncode})")
        return json.loads(result.read_text(encoding="utf-8"))


def quantize_openvino_here(src: Path, dst: Path, calib: np.ndarray, threshold: float) -> dict:
    """:func:`quantize_int8_openvino` in this process (the child's side)."""
    import os

    os.environ.setdefault("NNCF_CI", "1")  # see quantize_int8_openvino
    import nncf

    from pneumoseg.inference.openvino_core import ov_core

    ref = OvSession(src, precision="fp32")
    items = [(calib[i : i + 1], ref.run(calib[i : i + 1])[0]) for i in range(len(calib))]
    data = nncf.Dataset(items, lambda item: item[0])

    def validate(compiled, batch) -> float:
        pairs = [(np.asarray(compiled(x)[0]), r) for x, r in batch]
        return agreement(np.concatenate([r for _, r in pairs]),
                         np.concatenate([p for p, _ in pairs]), threshold)["dice"]  # fmt: skip

    report = _NncfReport()
    logging.getLogger("nncf").addHandler(report)
    try:
        model = nncf.quantize_with_accuracy_control(
            ov_core().read_model(str(src)), data, data, validate, max_drop=1 - CALIB_DICE,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(items))  # fmt: skip
    finally:
        logging.getLogger("nncf").removeHandler(report)
    import openvino as ov

    ov.save_model(model, str(dst))
    return {"reverted": report.reverted}


class _NncfReport(logging.Handler):
    """NNCF's count of operations put back in fp32 ("k out of n were reverted"), from its log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reverted = "none"  # NNCF says nothing when it reached the target without reverting

    def emit(self, record: logging.LogRecord) -> None:
        import re

        found = re.search(r"(\d+) out of (\d+) were reverted", record.getMessage())
        if found:
            self.reverted = f"{found[1]} of {found[2]}"


def candidates(int8: Container[str]) -> list[tuple[str, str]]:
    """(runtime, precision) pairs worth measuring on this CPU; ``int8``: the runtimes that have
    an int8 model."""
    out = [("onnxruntime", "fp32")]
    if "onnxruntime" in int8:
        out.append(("onnxruntime", "int8"))
    if _has_openvino():
        out.append(("openvino", "fp32"))
        if cpu.native_bf16():
            out.append(("openvino", "bf16"))
        if "openvino" in int8:
            out.append(("openvino", "int8"))
    return out


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def check_runtimes(
    files: Mapping[str, Sequence[Path]],
    weights: Sequence[float],
    in_channels: int,
    images: np.ndarray,
    tta: Sequence[str],
    threshold: float,
    torch_rows: Sequence[dict],
    ref: np.ndarray,
    threads: int | None,
    head: Mapping[str, Any] | None = None,
) -> dict:
    """Every candidate runtime × precision on ``images`` (uint8 (N, S, S)): timed, and compared
    with the torch fp32 probabilities ``ref``; ``files``: ``{"fp32": [...], "int8": {runtime:
    [...]}}``, one per fold. Returns the manifest's ``runtimes`` record."""
    rows = list(torch_rows)
    int8 = {r: p for r, p in (files.get("int8") or {}).items() if p}
    for runtime, precision in candidates(int8):
        why = UNSUPPORTED.get((runtime, (head or {}).get("head", "probs")))
        if why:
            rows.append({"runtime": runtime, "precision": precision, "passed": False, "why": why})
            continue
        paths = int8[runtime] if precision == "int8" else files["fp32"]
        try:
            members = [ExportedMember(open_session(p, runtime, precision, threads), w, in_channels,
                                      p.name, **(head or {}))
                       for p, w in zip(paths, weights, strict=True)]  # fmt: skip
        except Exception as e:
            rows.append({"runtime": runtime, "precision": precision, "passed": False,
                         "why": f"cannot load ({type(e).__name__})"})  # fmt: skip
            continue
        seconds, probs = time_it(lambda ms=members: predict_probs_np(ms, images, tta)[0])
        row = {"runtime": runtime, "precision": precision,
               "s_per_image": seconds / len(images), **agreement(ref, probs, threshold)}  # fmt: skip
        if runtime == "openvino":
            row["ov_hint"] = ov_precision_hint(precision)
        row["passed"] = _passes(row, precision, PARITY_TOL)
        rows.append(row)
        log.info("%s %s: %.4f s/image, max |Δp| %.2g, mask Dice %.4f%s", runtime, precision,
                 row["s_per_image"], row["max_abs_dp"], row["dice"],
                 "" if row["passed"] else " (failed its check)")  # fmt: skip
    return {"cpu": cpu.describe(), "cpu_key": cpu.cpu_key(), "threads": threads,
            "images": len(images), "threshold": threshold, "min_dice": MIN_DICE,
            "measured": rows}  # fmt: skip


def _passes(row: Mapping[str, Any], precision: str, parity_tol: float) -> bool:
    if precision == "fp32":
        return bool(row["max_abs_dp"] <= parity_tol)
    return bool(row["dice"] >= MIN_DICE)


def time_it(fn, repeats: int = REPEATS):
    """(median seconds of ``repeats`` calls after one warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def torch_rows(members: Sequence, images: np.ndarray, tta: Sequence[str], amp: str,
               threshold: float) -> tuple[list[dict], np.ndarray]:  # fmt: skip
    """torch fp32 NCHW (the reference: its probabilities are returned too), fp32 channels_last
    (how predict.py runs fp32) and, when ``predict.amp`` gives a reduced precision on this CPU,
    that too (today's default there), timed on ``images``."""
    import torch

    from pneumoseg.inference.ensemble import predict_probs
    from pneumoseg.training.engine import inference_dtype

    cpu_dev = torch.device("cpu")
    seconds, ref = time_it(lambda: predict_probs(members, images, tta, cpu_dev, None,
                                                 channels_last=False)[0].numpy())  # fmt: skip
    rows = [{"runtime": "torch", "precision": "fp32", "layout": "NCHW",
             "s_per_image": seconds / len(images), "dice": 1.0, "same_side": 1.0,
             "max_abs_dp": 0.0, "passed": True}]  # fmt: skip
    dtype = inference_dtype(cpu_dev, amp)
    for m in members:
        m.model.to(memory_format=torch.channels_last)
    try:
        for dt in [None] + ([dtype] if dtype is not None else []):
            seconds, probs = time_it(lambda d=dt: predict_probs(members, images, tta, cpu_dev, d)[0]
                                     .float().numpy())  # fmt: skip
            precision = "fp32" if dt is None else "bf16"
            row = {"runtime": "torch", "precision": precision, "layout": "channels_last",
                   "amp_default": dt == dtype, "s_per_image": seconds / len(images),
                   **agreement(ref, probs, threshold)}  # fmt: skip
            row["passed"] = _passes(row, precision, PARITY_TOL)
            rows.append(row)
    finally:
        for m in members:
            m.model.to(memory_format=torch.contiguous_format)
    return rows, ref
