"""Exported fold models run without torch: ONNX Runtime and OpenVINO sessions, and the ensemble ×
TTA in numpy, view for view what :func:`pneumoseg.inference.ensemble.predict_probs` does in torch.

Nothing here imports torch (a test checks ``sys.modules`` in a fresh process), so a serving
install without the training stack predicts with it. The same arithmetic as the torch path:

* normalisation: ``(x / 255 - mean) / std`` in float32 (:func:`normalize_np`, the values of
  ``pneumoseg.data.dataset.normalize``);
* TTA views: the same plan (:func:`view_plan`), flips, edge-replicated padding to a multiple of 32;
  a shrinking resize is antialiased like torch's ``antialias=True`` (Pillow's bilinear filter, which
  torch's was written to match), others are plain bilinear with half-pixel centres (OpenCV,
  like ``F.interpolate(align_corners=False)``);
* the weighted mean over members and views, then the resize back to each image's original size.

Precisions: ``fp32`` (``fold<k>.onnx``), ``int8`` (the models ``src/export.py`` calibrated:
``fold<k>.int8.onnx``, ONNX Runtime's QDQ model, and ``fold<k>.int8-ov.xml``, NNCF's OpenVINO IR)
and ``bf16`` (OpenVINO only, on CPUs with native bf16: the fp32 model compiled with
``INFERENCE_PRECISION_HINT=bf16``). OpenVINO runs an int8 model's floating-point remainder in bf16
where the CPU has it natively (:func:`ov_precision_hint`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoseg.errors import ModelFileError
from pneumoseg.schema import parse_tta

STRIDE = 32  # smp encoders need sides divisible by 32
CPU_FORWARD = 4  # images per forward pass on CPU (the fastest on a 2-core box at 256²)
RUNTIMES = ("onnxruntime", "openvino")
# Runtimes that cannot run a head's graphs, and why (measured: the name is the error).
UNSUPPORTED = {
    ("openvino", "detections"): (
        "OpenVINO's CPU plugin fails a Reshape in torchvision Mask R-CNN's RoI heads whenever an "
        "image has few detections (seen with 1); use predict.backend onnxruntime"
    ),
}
_MEAN = (0.485, 0.456, 0.406)  # ImageNet, as pneumoseg.data.dataset normalises (a test compares)
_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# the TTA plan, shared with the torch path
# --------------------------------------------------------------------------------------------------
def flips(hflip: bool, vflip: bool) -> list[tuple[int, ...]]:
    dims: list[tuple[int, ...]] = [()]
    if hflip:
        dims.append((-1,))
    if vflip:
        dims.append((-2,))
    if hflip and vflip:
        dims.append((-2, -1))
    return dims


def ceil_to(n: int, k: int = STRIDE) -> int:
    return -(-n // k) * k


def view_plan(size: tuple[int, int], scales: list[float]) -> dict[tuple[int, int], list]:
    """``{canvas (H, W): [(scale, (h, w) scaled size), ...]}``: views grouped by padded size."""
    h, w = size
    plan: dict[tuple[int, int], list] = {}
    for s in [1.0, *scales]:
        sh, sw = (h, w) if s == 1.0 else (max(1, round(h * s)), max(1, round(w * s)))
        canvas = (ceil_to(max(h, sh)), ceil_to(max(w, sw)))
        plan.setdefault(canvas, []).append((s, (sh, sw)))
    return plan


# --------------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------------
class OrtSession:
    """One ``.onnx`` in ONNX Runtime (CPU); ``run`` is thread-safe."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default, every core
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # no warnings on the console: failures raise
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph...)
            raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}); "
                                 "export again (src/export.py --force)") from None  # fmt: skip

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"image": x})


class OvSession:
    """One ``.onnx`` (or OpenVINO IR ``.xml``, its ``.bin`` beside it) compiled by OpenVINO for
    the CPU at ``precision``; one infer request per thread (a request is not thread-safe, the
    compiled model is)."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32"):
        from pneumoseg.inference.openvino_core import ov_core

        config = {"INFERENCE_PRECISION_HINT": ov_precision_hint(precision),
                  "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov_core()  # one per process: see pneumoseg.inference.openvino_core
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError/its own types for bad models
            raise ModelFileError(f"{path}: OpenVINO cannot load it ({type(e).__name__}); "
                                 "export again (src/export.py --force)") from None  # fmt: skip
        self._local = threading.local()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        try:
            result = request.infer({0: x})
        except RuntimeError as e:  # the CPU plugin's own shape checks, for one input
            raise ModelFileError(f"OpenVINO could not run this model on an input of shape "
                                 f"{tuple(x.shape)} ({type(e).__name__}); predict with "
                                 "predict.backend onnxruntime or torch") from None  # fmt: skip
        return [np.array(result[out]) for out in self.compiled.outputs]


def ov_precision_hint(precision: str) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for a precision. fp32 says ``f32`` explicitly: on
    CPUs with native bf16 OpenVINO's default is bf16. An int8 model's operations left in floating
    point (those NNCF's accuracy control put back, the decoder's resizes, the sigmoid) run in bf16
    where the CPU has it natively, as OpenVINO does by default and as NNCF validated them: 20% faster
    on the demo's models (AMD EPYC, AVX-512 BF16) at the same calibration Dice; the export's check
    (masks against torch fp32's) judges the model so run."""
    if precision == "bf16":
        return "bf16"
    if precision == "int8":
        from pneumoseg.inference import cpu

        return "bf16" if cpu.native_bf16() else "f32"
    return "f32"


def checked_as_run(row) -> bool:
    """Whether a manifest's row was measured and checked as it would run today: an OpenVINO row
    records its precision hint (``ov_hint``; exports made before it was recorded ran int8 and
    fp32 at f32), which must be the one :func:`ov_precision_hint` gives now."""
    if row.get("runtime") != "openvino":
        return True
    precision = str(row.get("precision"))
    hint = row.get("ov_hint") or ("bf16" if precision == "bf16" else "f32")
    return hint == ov_precision_hint(precision)


def open_session(path: Path, runtime: str, precision: str, threads: int | None = None):
    if runtime == "onnxruntime":
        return OrtSession(path, threads)
    if runtime == "openvino":
        return OvSession(path, threads, precision)
    raise ValueError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")


@dataclass
class ExportedMember:
    """One exported fold model: its session, ensemble weight and input channels; ``head``:
    ``probs`` (the graph gives probabilities) or ``detections`` (a detector's graph gives each
    image's masks and scores: :func:`detections_to_probs` with ``min_score``)."""

    session: OrtSession | OvSession
    weight: float
    in_channels: int
    name: str  # <exp>/<fold>: for logs
    head: str = "probs"
    min_score: float = 0.0


def detections_to_probs(masks: np.ndarray, scores: np.ndarray, min_score: float,
                        shape: tuple[int, int]) -> np.ndarray:  # fmt: skip
    """A detector's masks (K, 1, H, W) and scores (K,) -> its probability map (1, H, W): per pixel
    the max over detections scoring >= ``min_score`` of score × mask probability (what the
    Mask R-CNN family's ``predict`` computes in torch)."""
    keep = np.asarray(scores, np.float32) >= np.float32(min_score)
    if not keep.any():
        return np.zeros((1, *shape), np.float32)
    m = np.asarray(masks, np.float32)[keep].reshape(-1, 1, *shape)
    return np.clip((m * np.asarray(scores, np.float32)[keep].reshape(-1, 1, 1, 1)).max(0), 0, 1)


# --------------------------------------------------------------------------------------------------
# the ensemble × TTA in numpy
# --------------------------------------------------------------------------------------------------
def normalize_np(images: np.ndarray, in_channels: int) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, C, H, W), as ``pneumoseg.data.dataset.normalize``."""
    x = np.asarray(images).astype(np.float32) / np.float32(255.0)
    x = x[:, None]
    if in_channels == 3:
        mean = np.asarray(_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(_STD, np.float32).reshape(1, 3, 1, 1)
        return (np.broadcast_to(x, (x.shape[0], 3, *x.shape[2:])) - mean) / std
    return (x - np.float32(np.mean(_MEAN))) / np.float32(np.mean(_STD))


def resize_np(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, C, *size): antialiased when shrinking, as the torch path."""
    import cv2

    h, w = int(size[0]), int(size[1])
    if x.shape[-2:] == (h, w):
        return x
    out = np.empty((*x.shape[:2], h, w), np.float32)
    if h < x.shape[-2] or w < x.shape[-1]:
        from PIL import Image

        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                plane = Image.fromarray(np.ascontiguousarray(x[i, c]), mode="F")
                out[i, c] = np.asarray(plane.resize((w, h), Image.Resampling.BILINEAR))
        return out
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[i, c] = cv2.resize(x[i, c], (w, h), interpolation=cv2.INTER_LINEAR)
    return out


def predict_probs_np(
    members: Sequence[ExportedMember],
    images: np.ndarray,
    tta: Sequence[str] | None = ("hflip",),
    max_forward: int = CPU_FORWARD,
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, H, W) -> (probabilities (N, H, W) float32, image probabilities (N,) or None):
    the weighted mean over ``members`` × TTA views."""
    if not members:
        raise ValueError("predict_probs_np: no models")
    x8 = np.asarray(images)
    x8 = x8[None] if x8.ndim == 2 else x8
    if x8.ndim != 3:
        raise ValueError(f"images must be (N, H, W) uint8, got shape {x8.shape}")
    n, h, w = x8.shape
    hflip, vflip, scales = parse_tta(list(tta or []))
    dims = flips(hflip, vflip)
    plan = view_plan((h, w), scales)
    n_views = len(dims) * (1 + len(scales))
    total = np.zeros((n, 1, h, w), np.float32)
    cls_total = np.zeros((n, 1), np.float32)
    weight_sum = cls_weight = 0.0
    normalized: dict[int, np.ndarray] = {}
    for m in members:
        if m.in_channels not in normalized:
            normalized[m.in_channels] = normalize_np(x8, m.in_channels)
        acc = np.zeros_like(total)
        cls_acc = None
        for canvas, views in plan.items():  # the views of one padded size: one batch
            inp = _canvas_batch(normalized[m.in_channels], canvas, views, dims)
            probs, cls = _forward(m, inp, max_forward)
            _add_unviewed(acc, probs, views, dims, n, (h, w))
            if cls is not None:
                c = cls.astype(np.float32).reshape(-1, n, 1).sum(0)
                cls_acc = c if cls_acc is None else cls_acc + c
        total += acc * np.float32(m.weight / n_views)
        weight_sum += m.weight
        if cls_acc is not None:
            cls_total += cls_acc * np.float32(m.weight / n_views)
            cls_weight += m.weight
    probs = np.clip((total / np.float32(weight_sum))[:, 0], 0, 1)
    cls_p = (cls_total / np.float32(cls_weight))[:, 0] if cls_weight > 0 else None
    return probs, cls_p


def _canvas_batch(x, canvas, views, dims) -> np.ndarray:
    batch = []
    for _scale, sz in views:
        xs = resize_np(x, sz)
        pad = ((0, 0), (0, 0), (0, canvas[0] - sz[0]), (0, canvas[1] - sz[1]))
        if any(p[1] for p in pad):
            xs = np.pad(xs, pad, mode="edge")
        batch.extend(np.flip(xs, axis=d) if d else xs for d in dims)
    return np.ascontiguousarray(np.concatenate(batch), dtype=np.float32)


def _forward(member: ExportedMember, inp: np.ndarray, chunk: int):
    if member.head == "detections":  # a detector's graph takes one image at a time
        shape = inp.shape[-2:]
        probs = [detections_to_probs(*member.session.run(inp[i : i + 1])[:2], member.min_score,
                                     shape) for i in range(len(inp))]  # fmt: skip
        return np.stack(probs), None
    session = member.session
    step = chunk if chunk and chunk > 0 else len(inp)
    pieces = [inp[i : i + step] for i in range(0, len(inp), step)]
    outs = [session.run(np.ascontiguousarray(p)) for p in pieces]
    probs = np.concatenate([o[0] for o in outs]).astype(np.float32, copy=False)
    cls = np.concatenate([o[1] for o in outs]) if len(outs[0]) > 1 else None
    return probs, cls


def _add_unviewed(acc, probs, views, dims, n: int, size: tuple[int, int]) -> None:
    k = 0
    for _scale, sz in views:
        for d in dims:
            p = probs[k * n : (k + 1) * n]
            p = np.flip(p, axis=d) if d else p
            acc += resize_np(np.ascontiguousarray(p[..., : sz[0], : sz[1]]), size)
            k += 1


def resize_back_np(probs: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """(N, S, S) probabilities -> a float32 (h, w) array per image (bilinear, half-pixel centres,
    not antialiased: as ``pneumoseg.inference.ensemble.resize_to_original``)."""
    import cv2

    if len(sizes) != len(probs):
        raise ValueError(f"{len(probs)} probability maps but {len(sizes)} sizes")
    out = []
    for p, (h, w) in zip(probs, sizes, strict=True):
        if p.shape != (int(h), int(w)):
            p = cv2.resize(p, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        out.append(np.clip(p, 0, 1).astype(np.float32, copy=False))
    return out


def agreement(a: np.ndarray, b: np.ndarray, threshold: float) -> dict:
    """How far two stacks of probability maps give the same masks at ``threshold``: the Dice of
    the masks pooled over the stack (1 when both are empty), the share of pixels on the same side
    of the threshold, and max |Δp|."""
    ma, mb = a > threshold, b > threshold
    inter, total = int(np.logical_and(ma, mb).sum()), int(ma.sum()) + int(mb.sum())
    return {
        "dice": 1.0 if total == 0 else 2.0 * inter / total,
        "same_side": float((ma == mb).mean()),
        "max_abs_dp": float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()),
    }
