"""What ``src/export.py`` checks and measures beyond fp32 parity: an int8 model calibrated on the
experiment's own images, and every runtime × precision timed and compared on this CPU.

* **int8** (:func:`quantize_int8`): ONNX Runtime's static post-training quantization (QDQ,
  per-channel int8 weights, uint8 activations, MinMax ranges) calibrated on :data:`N_CALIB` of the
  experiment's cached training images that are not among the check images. Both runtimes run the
  QDQ model in int8.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.inference import cpu
from pneumoseg.inference.exported import PARITY_TOL
from pneumoseg.inference.runtime import (
    UNSUPPORTED,
    ExportedMember,
    agreement,
    open_session,
    predict_probs_np,
)

log = logging.getLogger("pneumoseg.export")

N_AGREE = 8  # images the runtimes are compared and timed on
N_CALIB = 16  # images the int8 ranges are calibrated on
MIN_DICE = 0.99  # a reduced precision's masks against torch fp32's
REPEATS = 3


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


def candidates(int8_ok: bool) -> list[tuple[str, str]]:
    """(runtime, precision) pairs worth measuring on this CPU."""
    out = [("onnxruntime", "fp32")]
    if int8_ok:
        out.append(("onnxruntime", "int8"))
    if _has_openvino():
        out.append(("openvino", "fp32"))
        if cpu.native_bf16():
            out.append(("openvino", "bf16"))
        if int8_ok:
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
    with the torch fp32 probabilities ``ref``; ``files``: ``{"fp32": [...], "int8": [...]}`` per
    fold. Returns the manifest's ``runtimes`` record."""
    rows = list(torch_rows)
    for runtime, precision in candidates(bool(files.get("int8"))):
        why = UNSUPPORTED.get((runtime, (head or {}).get("head", "probs")))
        if why:
            rows.append({"runtime": runtime, "precision": precision, "passed": False, "why": why})
            continue
        paths = files["int8" if precision == "int8" else "fp32"]
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
