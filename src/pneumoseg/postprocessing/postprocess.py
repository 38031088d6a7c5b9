"""Post-processing of probability maps, and the fast search for its settings on OOF predictions.

Two methods turn one H×W probability map into a uint8 0/1 mask (:func:`apply_postprocess`):

* ``threshold``: ``mask = p > threshold``, then connected components (8-connectivity) smaller than
  ``min_area`` pixels are dropped;
* ``triplet`` (the 1st-place SIIM recipe): the image is empty unless at least ``top_area`` pixels
  have ``p > top_threshold``; otherwise ``mask = p > bottom_threshold`` (then ``min_area`` if set).

Either may be gated by the aux head's image-level probability: the mask is empty when
``cls_prob < cls_threshold``.

**Areas are pixels at 1024×1024** (the original SIIM size), in parameters and config grids alike.
At side ``S`` they are multiplied by ``area_scale_for(S) = (S / 1024) ** 2``: callers pass that as
``area_scale``. A component is kept when ``area >= min_area * area_scale``; the triplet fires when
``count >= top_area * area_scale``.

Probabilities are float in [0, 1] or uint8 ``round(p × 255)`` (the OOF convention). For uint8 input
``p > t`` is evaluated exactly as ``u > u8_cut(t)`` with ``u8_cut(t) = floor(255 t)`` (the same
pixels as ``u / 255 > t``), so the search on uint8 OOF maps and the deployed function agree to the
pixel.

The settings live in ``runs/<exp>/postprocess.yaml`` as a plain dict (:func:`load_params`,
:func:`save_params`)::

    method: triplet            # threshold | triplet
    threshold: null            # threshold method: pixel threshold
    min_area: 0                # components smaller than this are dropped (pixels at 1024²)
    top_threshold: 0.8         # triplet
    top_area: 1024             # triplet (pixels at 1024²)
    bottom_threshold: 0.3      # triplet
    cls_threshold: null        # aux-head gate (null = none)
    oof_size: 256              # side of the OOF maps the search ran on
    cv_dice: 0.85              # mean competition Dice over every OOF image
    cv_dice_std: 0.01          # std over folds of the per-fold mean Dice
    ...

:func:`search` evaluates the mean competition Dice of every combination of the grids in one pass
over the OOF memmaps (memory flat in the number of images): a compiled kernel builds, per image,
the component tree of the probability map once (union-find over the pixels in decreasing order of
probability), reads off every component's area and intersection with the truth at each threshold,
and evaluates every ``min_area`` from those; the triplet's counts for every threshold come from one
joint histogram of (probability, truth) per image. :func:`naive_search` is the slow reference that
calls :func:`apply_postprocess` for every combination and image (tests, benchmark).
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numba
import numpy as np
import pandas as pd
import yaml

from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import SegConfusion, dice_from_areas
from pneumoseg.io import atomic_write

log = logging.getLogger(__name__)

REFERENCE_SIZE = 1024
METHODS = ("threshold", "triplet")
FAMILIES = ("threshold", "triplet", "threshold+gate", "triplet+gate")
GRID_KEYS = (
    "thresholds",
    "min_areas",
    "top_thresholds",
    "top_areas",
    "bottom_thresholds",
    "cls_thresholds",
)
PARAM_KEYS = (
    "method",
    "threshold",
    "min_area",
    "top_threshold",
    "top_area",
    "bottom_threshold",
    "cls_threshold",
)
# Bookkeeping written by oof_tune.py next to the parameters; informative only.
INFO_KEYS = (
    "oof_size",
    "experiments",
    "cv_dice",
    "cv_dice_std",
    "cv_dice_folds",
    "folds",
    "n_images",
    "exp",
    "source",  # what the tuning was made from (pneumoseg.tuning.provenance): checked before use
)
_REQUIRED = {
    "threshold": ("threshold",),
    "triplet": ("top_threshold", "top_area", "bottom_threshold"),
}


class ParamsError(ConfigError):
    """Malformed post-processing parameters."""


# --------------------------------------------------------------------------------------------------
# applying one setting
# --------------------------------------------------------------------------------------------------
def area_scale_for(size: int | float) -> float:
    """Factor turning areas in pixels at 1024² into pixels at side ``size``: ``(size/1024)**2``."""
    return (float(size) / REFERENCE_SIZE) ** 2


def u8_cut(t: float) -> int:
    """The uint8 level ``c`` with ``u > c`` ⇔ ``u / 255 > t`` (``floor(255 t)``, clamped)."""
    return int(min(255, max(-1, math.floor(float(t) * 255 + 1e-6))))


def binarize(probs: np.ndarray, t: float) -> np.ndarray:
    """``p > t`` as a bool array; uint8 input is read as ``round(p × 255)``."""
    if probs.dtype == np.uint8:
        return probs > u8_cut(t)
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probabilities must be float in [0, 1] or uint8 0..255, got {probs.dtype}")
    return probs > t


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_pixels`` pixels (uint8 0/1 in and out)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if min_pixels <= 1 or not mask.any():
        return mask  # every component has at least one pixel
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # background
    return keep[labels].astype(np.uint8)


def apply_postprocess(
    probs: np.ndarray,
    params: Mapping[str, Any],
    area_scale: float = 1.0,
    cls_prob: float | None = None,
) -> np.ndarray:
    """One H×W probability map -> uint8 0/1 mask with the setting ``params``.

    Args:
        probs: H×W float probabilities in [0, 1], or uint8 ``round(p × 255)``.
        params: a dict as stored in ``postprocess.yaml`` (see the module docstring); only
            ``method``, ``threshold``, ``min_area``, ``top_threshold``, ``top_area``,
            ``bottom_threshold`` and ``cls_threshold`` are read.
        area_scale: multiplies the areas of ``params`` (pixels at 1024²) into pixels of ``probs``:
            ``area_scale_for(side)``; 1.0 for 1024² maps.
        cls_prob: the aux head's image probability; with ``params["cls_threshold"]`` set, the mask
            is empty when ``cls_prob < cls_threshold``. Ignored when None.

    This is the function the search is verified against and inference applies at the original size.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"apply_postprocess takes one H×W map, got shape {probs.shape}")
    empty = np.zeros(probs.shape, dtype=np.uint8)
    cls_t = params.get("cls_threshold")
    if cls_t is not None and cls_prob is not None and cls_prob < cls_t:
        return empty
    method = params.get("method")
    min_area = params.get("min_area") or 0
    if method == "threshold":
        mask = binarize(probs, params["threshold"])
    elif method == "triplet":
        n_top = int(np.count_nonzero(binarize(probs, params["top_threshold"])))
        if n_top < float(params["top_area"]) * area_scale:
            return empty
        mask = binarize(probs, params["bottom_threshold"])
    else:
        raise ParamsError(f"unknown post-processing method {method!r}; valid: {', '.join(METHODS)}")
    return remove_small(mask.view(np.uint8), float(min_area) * area_scale)


# --------------------------------------------------------------------------------------------------
# parameters on disk
# --------------------------------------------------------------------------------------------------
def _num(value: Any, key: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParamsError(f"'{key}' must be a number, got {value!r}")
    value = float(value)
    if not lo <= value <= hi:
        raise ParamsError(f"'{key}' must lie in [{lo}, {hi}], got {value}")
    return value


def validate_params(params: Mapping[str, Any]) -> dict:
    """Check a parameter dict; returns a plain copy (numbers as Python floats/ints)."""
    if not isinstance(params, Mapping):
        raise ParamsError(
            f"post-processing parameters must be a mapping, got {type(params).__name__}"
        )
    unknown = sorted(set(params) - set(PARAM_KEYS) - set(INFO_KEYS) - {"model_options"})
    if unknown:
        raise ParamsError(
            f"unknown post-processing key(s) {unknown}; valid: {', '.join(PARAM_KEYS + INFO_KEYS)}"
        )
    method = params.get("method")
    if method not in METHODS:
        raise ParamsError(f"'method' must be one of {', '.join(METHODS)}, got {method!r}")
    missing = [k for k in _REQUIRED[method] if params.get(k) is None]
    if missing:
        raise ParamsError(f"method {method!r} needs {missing} (missing or null)")
    out = {k: params.get(k) for k in PARAM_KEYS}
    for key in ("threshold", "top_threshold", "bottom_threshold", "cls_threshold"):
        if out[key] is not None:
            out[key] = _num(out[key], key, 0.0, 1.0)
    for key in ("min_area", "top_area"):
        if out[key] is not None:
            v = _num(out[key], key, 0.0, float("inf"))
            out[key] = int(v) if v.is_integer() else v
    out["min_area"] = out["min_area"] or 0
    for key in INFO_KEYS:
        if key in params:
            out[key] = _plain(params[key])
    if params.get("model_options"):
        opts = params["model_options"]
        if not isinstance(opts, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in opts.values()
        ):
            raise ParamsError(f"'model_options' must map option names to numbers, got {opts!r}")
        out["model_options"] = {str(k): float(v) for k, v in opts.items()}
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def params_yaml(params: Mapping[str, Any]) -> str:
    """The YAML text :func:`save_params` writes (validated)."""
    return yaml.safe_dump(validate_params(params), sort_keys=False, default_flow_style=None)


def save_params(params: Mapping[str, Any], path: str | Path) -> Path:
    """Validate and write ``params`` as YAML, atomically."""
    text = params_yaml(params)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def pixel_threshold(params: Mapping[str, Any]) -> float:
    """The pixel threshold of a post-processing (the triplet's bottom threshold; 0.5 when it has
    none): where the page's slider starts, and where exported models' masks are compared."""
    t = params.get("threshold") if params.get("method") == "threshold" else None
    t = params.get("bottom_threshold") if t is None else t
    return float(0.5 if t is None else t)


def load_params(path: str | Path) -> dict:
    """Read and validate a ``postprocess.yaml``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {e}") from None
    try:
        return validate_params(data)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    thresholds: tuple[float, ...]
    min_areas: tuple[float, ...]
    top_thresholds: tuple[float, ...]
    top_areas: tuple[float, ...]
    bottom_thresholds: tuple[float, ...]
    cls_thresholds: tuple[float, ...]

    @classmethod
    def from_mapping(cls, grids: Mapping[str, Any]) -> Grid:
        """From the ``tune`` config section (extra keys such as ``folds`` are ignored)."""
        values = {}
        for key in GRID_KEYS:
            v = grids.get(key) or ()
            values[key] = tuple(float(x) for x in v)
        g = cls(**values)
        for key in ("thresholds", "top_thresholds", "bottom_thresholds", "cls_thresholds"):
            bad = [t for t in getattr(g, key) if not 0.0 <= t <= 1.0]
            if bad:
                raise ParamsError(f"grid '{key}' holds values outside [0, 1]: {bad}")
        for key in ("min_areas", "top_areas"):
            bad = [a for a in getattr(g, key) if a < 0]
            if bad:
                raise ParamsError(f"grid '{key}' holds negative areas: {bad}")
        if not (g.thresholds and g.min_areas) and not (
            g.top_thresholds and g.top_areas and g.bottom_thresholds
        ):
            raise ParamsError("empty grids: nothing to search")
        return g

    @property
    def n_threshold(self) -> int:
        return len(self.thresholds) * len(self.min_areas)

    @property
    def n_triplet(self) -> int:
        return len(self.top_thresholds) * len(self.top_areas) * len(self.bottom_thresholds)

    def combos(self, gates: bool) -> list[dict]:
        """Every setting, in the order of the search's columns: threshold × min_area, then
        top × area × bottom; then, per gate threshold, the same again with the gate."""
        base = [
            {"method": "threshold", "threshold": t, "min_area": _area(m)}
            for t in self.thresholds
            for m in self.min_areas
        ] + [
            {
                "method": "triplet",
                "min_area": 0,
                "top_threshold": tt,
                "top_area": _area(a),
                "bottom_threshold": b,
            }
            for tt in self.top_thresholds
            for a in self.top_areas
            for b in self.bottom_thresholds
        ]
        out = [{**c, "cls_threshold": None} for c in base]
        if gates:
            for ct in self.cls_thresholds:
                out += [{**c, "cls_threshold": ct} for c in base]
        return out


def _area(a: float) -> int | float:
    return int(a) if float(a).is_integer() else float(a)


@dataclass
class Source:
    """One set of OOF maps (a fold): uint8 N×S×S probabilities, N×S×S truth, optional N cls."""

    probs: np.ndarray
    truth: np.ndarray
    cls: np.ndarray | None = None
    name: str = ""


def _as_sources(sources: Iterable[Any], names: Sequence[str] | None) -> list[Source]:
    out = []
    for i, s in enumerate(sources):
        if isinstance(s, Source):
            src = Source(s.probs, s.truth, s.cls, s.name)
        elif hasattr(s, "probs") and hasattr(s, "truth"):  # pneumoseg.training.oof.Oof
            src = Source(s.probs, s.truth, getattr(s, "cls", None))
        elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
            src = Source(s[0], s[1], s[2] if len(s) == 3 else None)
        else:
            raise TypeError(f"source {i}: expected an Oof, a Source or (probs, truth[, cls])")
        if names is not None:
            src.name = names[i]
        src.name = src.name or f"src{i}"
        if src.probs.ndim != 3 or src.truth.shape != src.probs.shape:
            raise ValueError(
                f"{src.name}: probabilities {src.probs.shape} and truth {src.truth.shape} "
                "must both be N×H×W"
            )
        if src.cls is not None and len(src.cls) != len(src.probs):
            raise ValueError(f"{src.name}: {len(src.cls)} cls values for {len(src.probs)} images")
        out.append(src)
    if not out:
        raise ValueError("no OOF sources to search")
    sides = {s.probs.shape[1:] for s in out}
    if len(sides) != 1:
        raise ValueError(f"OOF sources have different image sizes: {sorted(sides)}")
    return out


def _drop_pages(arr: np.ndarray, a: int, b: int) -> None:
    """Unmap rows ``a:b`` of a read-only ``np.memmap`` once read: the pages stay in the page cache
    but leave this process's resident set, which then stays flat in the number of images."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row = int(np.prod(arr.shape[1:])) * arr.itemsize
    rel = int(arr.offset) % mmap.ALLOCATIONGRANULARITY + a * row
    first = rel - rel % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(mmap.MADV_DONTNEED, first, rel + (b - a) * row - first)


def _as_u8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return np.round(np.clip(np.asarray(a, dtype=np.float32), 0, 1) * 255).astype(np.uint8)


def _frame(combos: list[dict], sums: np.ndarray, counts: np.ndarray, names: list[str]):
    """Rows = settings; mean Dice pooled over every image, per source, and its std over sources."""
    df = pd.DataFrame(combos)
    for key in PARAM_KEYS:
        if key not in df:
            df[key] = None
    df["family"] = [
        c["method"] + ("+gate" if c["cls_threshold"] is not None else "") for c in combos
    ]
    per = sums / np.maximum(counts, 1)[:, None]  # (sources, combos)
    df["dice"] = sums.sum(0) / max(int(counts.sum()), 1)
    df["dice_std"] = per.std(0) if len(names) > 1 else 0.0
    for name, row in zip(names, per, strict=True):
        df[f"dice_{name}"] = row
    df["n_images"] = int(counts.sum())
    return df[["family", *PARAM_KEYS, *[c for c in df.columns if c.startswith(("dice", "n_"))]]]


# --------------------------------------------------------------------------------------------------
# the compiled kernel
# --------------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _find(parent, x):  # pragma: no cover - compiled
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _image_stats(
    u, t, cuts, mpx, hist, pa, pi, parent, size, inter, order, start
):  # pragma: no cover
    """Joint histogram + per-threshold, per-min-area |P| and |P∩T| of one image.

    ``cuts`` (int64, descending): the uint8 levels of the thresholds, mask = u > cut. ``mpx``:
    min areas in pixels. Outputs ``hist`` (2, 256), ``pa``/``pi`` (K, M): |P| and |P∩T|, zeroed by the caller.
    Pixels above the lowest cut are added in decreasing order of value into a union-find forest
    (8-connectivity); after all pixels above a cut are in, each root is one connected component of
    ``u > cut`` with its area and truth overlap.
    """
    H, W = u.shape
    for r in range(H):
        for c in range(W):
            hist[1 if t[r, c] != 0 else 0, u[r, c]] += 1
    K = cuts.shape[0]
    M = mpx.shape[0]
    cut_min = cuts[K - 1]
    pos = 0
    for v in range(255, cut_min, -1):
        start[v] = pos
        pos += hist[0, v] + hist[1, v]
    if pos == 0:
        return
    for r in range(H):
        for c in range(W):
            v = u[r, c]
            if v > cut_min:
                p = r * W + c
                order[start[v]] = p
                start[v] += 1
                parent[p] = -1
    done = 0
    for k in range(K):
        cut = cuts[k]
        n_above = 0
        for v in range(255, cut, -1):
            n_above += hist[0, v] + hist[1, v]
        for idx in range(done, n_above):
            p = order[idx]
            r = p // W
            c = p - r * W
            parent[p] = p
            size[p] = 1
            inter[p] = 1 if t[r, c] != 0 else 0
            for dr in range(-1, 2):
                rr = r + dr
                if rr < 0 or rr >= H:
                    continue
                for dc in range(-1, 2):
                    cc = c + dc
                    if cc < 0 or cc >= W or (dr == 0 and dc == 0):
                        continue
                    if u[rr, cc] <= cut_min:
                        continue
                    q = rr * W + cc
                    if parent[q] < 0:
                        continue  # not added yet
                    a = _find(parent, p)
                    b = _find(parent, q)
                    if a != b:
                        if size[a] < size[b]:
                            a, b = b, a
                        parent[b] = a
                        size[a] += size[b]
                        inter[a] += inter[b]
        done = n_above
        for idx in range(n_above):
            p = order[idx]
            if parent[p] == p:
                s = size[p]
                i = inter[p]
                for m in range(M):
                    if s >= mpx[m]:
                        pa[k, m] += s
                        pi[k, m] += i


@numba.njit(cache=True, nogil=True)
def _chunk_stats(U, T, cuts, mpx):  # pragma: no cover - compiled
    n, H, W = U.shape
    K = cuts.shape[0]
    M = mpx.shape[0]
    hist = np.zeros((n, 2, 256), np.int64)
    pa = np.zeros((n, K, M), np.int64)
    pi = np.zeros((n, K, M), np.int64)
    parent = np.empty(H * W, np.int64)
    size = np.empty(H * W, np.int64)
    inter = np.empty(H * W, np.int64)
    order = np.empty(H * W, np.int64)
    start = np.zeros(257, np.int64)
    for j in range(n):
        _image_stats(
            U[j], T[j], cuts, mpx, hist[j], pa[j], pi[j], parent, size, inter, order, start
        )
    return hist, pa, pi


# --------------------------------------------------------------------------------------------------
# the fast search
# --------------------------------------------------------------------------------------------------
def _dice(inter, pred, truth):
    denom = (pred + truth).astype(np.float64)
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1.0), 1.0)


def _chunk_dice(u, t, grid: Grid, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice of every non-gated setting (n, combos) and the Dice of an empty mask (n,)."""
    n = u.shape[0]
    thr = np.asarray(grid.thresholds, dtype=np.float64)
    cuts = np.array([u8_cut(x) for x in thr], dtype=np.int64)
    if len(cuts) == 0:  # triplet only: the histogram is all that's needed
        cuts = np.array([255], dtype=np.int64)
    desc = np.argsort(-cuts, kind="stable")
    mpx = np.asarray(grid.min_areas or (0.0,), dtype=np.float64) * scale
    hist, pa, pi = _chunk_stats(u, t, cuts[desc], mpx)
    truth_area = hist[:, 1].sum(1)  # (n,)
    empty = (truth_area == 0).astype(np.float64)
    parts = []
    if grid.n_threshold:
        inv = np.empty_like(desc)
        inv[desc] = np.arange(len(desc))
        d = _dice(pi[:, inv], pa[:, inv], truth_area[:, None, None])  # (n, K, M)
        parts.append(d.reshape(n, -1))
    if grid.n_triplet:
        # above[:, c] = pixels with u > c: total minus the cumulative histogram up to c
        cum_all = np.cumsum(hist.sum(1), axis=1)
        cum_pos = np.cumsum(hist[:, 1], axis=1)
        above_all = cum_all[:, -1:] - cum_all
        above_pos = cum_pos[:, -1:] - cum_pos

        tops = np.array([u8_cut(x) for x in grid.top_thresholds])
        bots = np.array([u8_cut(x) for x in grid.bottom_thresholds])
        total = cum_all[:, -1]
        n_top = np.stack([above_all[:, c] if c >= 0 else total for c in tops], 1)  # (n, Tt)
        pb = np.stack([above_all[:, c] if c >= 0 else total for c in bots], 1)  # (n, B)
        ib = np.stack([above_pos[:, c] if c >= 0 else truth_area for c in bots], 1)
        db = _dice(ib, pb, truth_area[:, None])  # (n, B)
        apx = np.asarray(grid.top_areas, dtype=np.float64) * scale
        fires = n_top[:, :, None] >= apx[None, None, :]  # (n, Tt, A)
        d = np.where(fires[..., None], db[:, None, None, :], empty[:, None, None, None])
        parts.append(d.reshape(n, -1))
    return np.concatenate(parts, axis=1), empty


def search(
    sources: Iterable[Any],
    grids: Mapping[str, Any] | Grid,
    area_scale: float | None = None,
    names: Sequence[str] | None = None,
    chunk: int = 64,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Mean competition Dice of every post-processing setting of ``grids`` on OOF maps.

    Args:
        sources: folds' OOF sets: :class:`pneumoseg.training.oof.Oof` objects (memmaps), :class:`Source`
            or ``(probs, truth[, cls])`` tuples; probabilities uint8 (float is converted).
        grids: the ``tune`` config section (``thresholds``, ``min_areas``, ``top_thresholds``,
            ``top_areas``, ``bottom_thresholds``, ``cls_thresholds``) or a :class:`Grid`.
        area_scale: pixels per 1024²-pixel; default ``area_scale_for(side of the maps)``.
        names: a name per source (columns ``dice_<name>``); default ``src<i>``.
        chunk: images read from the memmaps at a time (memory ∝ chunk × n_jobs, flat in N).
        n_jobs: threads (the kernel releases the GIL); default all cores.

    Returns one row per setting, in :meth:`Grid.combos` order: ``family`` (threshold, triplet,
    threshold+gate, triplet+gate), the parameters, ``dice`` (mean over every image), ``dice_std``
    (std over sources of their mean), ``dice_<name>`` per source and ``n_images``. Gated rows
    appear only when every source has ``cls`` probabilities.
    """
    grid = grids if isinstance(grids, Grid) else Grid.from_mapping(grids)
    srcs = _as_sources(sources, names)
    side = srcs[0].probs.shape[1]
    scale = area_scale_for(side) if area_scale is None else float(area_scale)
    gates = bool(grid.cls_thresholds) and all(s.cls is not None for s in srcs)
    if grid.cls_thresholds and not gates:
        log.warning(
            "cls_thresholds given but some OOF sets have no aux-head probabilities: no gate"
        )
    combos = grid.combos(gates)
    n_base = grid.n_threshold + grid.n_triplet
    cls_t = np.asarray(grid.cls_thresholds if gates else (), dtype=np.float64)
    n_jobs = n_jobs or os.cpu_count() or 1

    def work(job):
        s, a, b = job
        src = srcs[s]
        u = _as_u8(src.probs[a:b])
        t = np.ascontiguousarray(src.truth[a:b], dtype=np.uint8)
        d, empty = _chunk_dice(u, t, grid, scale)  # u, t may be views of the memmaps
        _drop_pages(src.probs, a, b)
        _drop_pages(src.truth, a, b)
        out = np.empty(len(combos), dtype=np.float64)
        out[:n_base] = d.sum(0)
        if gates:
            c = np.asarray(src.cls[a:b], dtype=np.float64)
            for g, ct in enumerate(cls_t):
                closed = c < ct  # NaN: never closed, as in apply_postprocess
                gd = np.where(closed[:, None], empty[:, None], d)
                out[n_base * (g + 1) : n_base * (g + 2)] = gd.sum(0)
        return s, out

    jobs = [(s, a, min(a + chunk, len(src.probs))) for s, src in enumerate(srcs)
            for a in range(0, len(src.probs), chunk)]  # fmt: skip
    sums = np.zeros((len(srcs), len(combos)), dtype=np.float64)
    if n_jobs > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            for s, out in pool.map(work, jobs):
                sums[s] += out
    else:
        for job in jobs:
            s, out = work(job)
            sums[s] += out
    counts = np.array([len(s.probs) for s in srcs], dtype=np.int64)
    return _frame(combos, sums, counts, [s.name for s in srcs])


def naive_search(
    sources: Iterable[Any],
    grids: Mapping[str, Any] | Grid,
    area_scale: float | None = None,
    names: Sequence[str] | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Reference for :func:`search`: :func:`apply_postprocess` for every setting and image.

    Same arguments and result; ``limit`` evaluates only the first ``limit`` images of each source.
    """
    grid = grids if isinstance(grids, Grid) else Grid.from_mapping(grids)
    srcs = _as_sources(sources, names)
    scale = area_scale_for(srcs[0].probs.shape[1]) if area_scale is None else float(area_scale)
    gates = bool(grid.cls_thresholds) and all(s.cls is not None for s in srcs)
    combos = grid.combos(gates)
    sums = np.zeros((len(srcs), len(combos)), dtype=np.float64)
    counts = np.zeros(len(srcs), dtype=np.int64)
    for s, src in enumerate(srcs):
        n = len(src.probs) if limit is None else min(limit, len(src.probs))
        counts[s] = n
        for i in range(n):
            u = _as_u8(src.probs[i])
            t = np.asarray(src.truth[i]) != 0
            cls = None if src.cls is None else float(src.cls[i])
            ta = int(t.sum())
            for j, params in enumerate(combos):
                m = apply_postprocess(u, params, scale, cls).astype(bool)
                sums[s, j] += float(dice_from_areas(np.count_nonzero(m & t), m.sum(), ta))
    return _frame(combos, sums, counts, [s.name for s in srcs])


# --------------------------------------------------------------------------------------------------
# choosing and checking
# --------------------------------------------------------------------------------------------------
def best_rows(results: pd.DataFrame, tol: float = 1e-12) -> pd.DataFrame:
    """The best setting of each family present (index = family). Ties go to the first row in grid
    order (lower threshold, smaller area first)."""
    rows = {}
    for fam in FAMILIES:
        sub = results[results["family"] == fam]
        if len(sub):
            rows[fam] = sub[sub["dice"] >= sub["dice"].max() - tol].iloc[0]
    return pd.DataFrame(rows).T


def pick_best(results: pd.DataFrame, tol: float = 1e-12) -> pd.Series:
    """The best setting overall; ties go to the simpler family (threshold, triplet, then gated)."""
    best = best_rows(results, tol)
    top = best["dice"].astype(float).max()
    return best[best["dice"].astype(float) >= top - tol].iloc[0]


def row_params(row: Mapping[str, Any]) -> dict:
    """The parameter dict of a :func:`search` row (NaN/None fields -> None)."""
    out = {}
    for key in PARAM_KEYS:
        v = row.get(key)
        if v is not None and not isinstance(v, str) and pd.isna(v):
            v = None
        out[key] = v
    return validate_params(out)


_CONF_SUMS = (
    ("inter", "intersect"),
    ("union", "union"),
    ("pred", "pred_area"),
    ("truth", "truth_area"),
)


def pooled_miou(rows: pd.DataFrame) -> dict:
    """MMSeg-style IoU/Dice per class and their means, from the confusion sums of several rows of
    :func:`evaluate_params` pooled (all validation pixels of all folds, as MMSeg computes them)."""
    conf = SegConfusion()
    for k, a in _CONF_SUMS:
        setattr(conf, a, np.array([rows[f"{k}_bg"].sum(), rows[f"{k}_ptx"].sum()], dtype=float))
    return conf.compute()


def evaluate_params(
    sources: Iterable[Any],
    params: Mapping[str, Any],
    area_scale: float | None = None,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score one setting from scratch with :func:`apply_postprocess`, image by image.

    One row per source: ``n_images``, ``dice`` (mean competition Dice), ``dice_sum``, ``pos_dice``
    (images with a mask), ``empty_acc`` (accuracy of empty / non-empty), MMSeg-style ``mIoU``,
    ``mDice`` (background + pneumothorax over the whole source) and ``ptx_IoU``/``ptx_Dice``.
    """
    srcs = _as_sources(sources, names)
    scale = area_scale_for(srcs[0].probs.shape[1]) if area_scale is None else float(area_scale)
    rows = []
    for src in srcs:
        conf = SegConfusion()
        dice = np.zeros(len(src.probs))
        pos = np.zeros(len(src.probs), dtype=bool)
        right = 0
        for i in range(len(src.probs)):
            t = (np.asarray(src.truth[i]) != 0).astype(np.uint8)
            cls = None if src.cls is None else float(src.cls[i])
            m = apply_postprocess(_as_u8(src.probs[i]), params, scale, cls)
            _drop_pages(src.probs, i, i + 1)
            _drop_pages(src.truth, i, i + 1)
            inter = np.count_nonzero(m & t)
            pa, ta = int(m.sum()), int(t.sum())
            dice[i] = float(dice_from_areas(inter, pa, ta))
            pos[i] = ta > 0
            right += (pa > 0) == (ta > 0)
            conf.update(m, t)
        c = conf.compute()
        n = len(dice)
        rows.append(
            {
                "source": src.name,
                "n_images": n,
                "dice": float(dice.mean()) if n else float("nan"),
                "dice_sum": float(dice.sum()),
                "pos_dice": float(dice[pos].mean()) if pos.any() else float("nan"),
                "empty_acc": right / n if n else float("nan"),
                "mIoU": c["mIoU"],
                "mDice": c["mDice"],
                "ptx_IoU": c["IoU"][1],
                "ptx_Dice": c["Dice"][1],
                "bg_IoU": c["IoU"][0],
                "bg_Dice": c["Dice"][0],
                # the per-class sums behind mIoU/mDice, so that folds can be pooled exactly
                **{
                    f"{k}_{c_}": float(getattr(conf, a)[j])
                    for k, a in _CONF_SUMS
                    for j, c_ in enumerate(("bg", "ptx"))
                },
            }
        )
    return pd.DataFrame(rows)
