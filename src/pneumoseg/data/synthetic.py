"""A built-in synthetic SIIM-format dataset: chest-X-ray-like phantoms with pneumothorax-like regions.

:func:`generate_case` draws one phantom (``uint8`` H×W image + instance masks); :func:`write_dataset`
writes a whole data set in the exact layout of the Kaggle data (nested DICOM tree, ``train-rle.csv``
with its quirks, flat stage-2 test folder, sample submission, ``nih_id.csv``) plus, optionally, the
vbookshelf PNG layout, so that every stage of the pipeline can be run end to end without the real
data.

Phantoms: a body outline, two lungs (dark) with branching vessel markings and a fine parenchymal
texture, posterior/anterior ribs, spine, heart and mediastinum, clavicles, an optional gastric
bubble, skin folds and text markers, then a per-image window/gamma, noise and a small random
rotation/scale/shift. A pneumothorax instance is a crescent of air along the lateral/apical chest
wall inside one lung: darker than the lung and without its markings, bounded medially by a thin
bright visceral pleural line. The mask is the air region, one mask per instance (instances may
overlap).

Everything is deterministic from the seed: each case draws from its own generator
(``default_rng([seed, split, index])``), UIDs and UUIDs derive from the seed, dates are fixed and
no timestamp is written, so the same seed gives byte-identical files, serial or parallel.

Ownership: the generator writes its marker ``.pneumoseg-synthetic`` (the plan parameters) into
the folder before any data file, and only ever deletes in a folder that carries it (or the
``synthetic_info.json`` of a set finished by an earlier version), and there only the files that
plan names. A folder holding anything else is refused, ``--force`` or not: real data is never
touched.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pneumoseg.data.rle import rle_encode
from pneumoseg.errors import ConfigError, OutputExistsError
from pneumoseg.io import atomic_write

log = logging.getLogger(__name__)

# Outputs this module writes under ``out``. ``--force`` removes only the files of these that the
# previous set's plan names (see remove_generated), nothing else.
TRAIN_DIR = "dicom-images-train"
TEST_DIR = "dicom-images-test"
PNG_IMAGES = "png_images"
PNG_MASKS = "png_masks"
TRAIN_RLE = "train-rle.csv"
TEST_RLE = "test-rle.csv"
SAMPLE_SUB = "stage_2_sample_submission.csv"
NIH_IDS = "nih_id.csv"
PNG_TRAIN_CSV = "stage_1_train_images.csv"
PNG_TEST_CSV = "stage_1_test_images.csv"
INFO = "synthetic_info.json"  # written last: its presence means the data set is complete
OUTPUTS = (
    TRAIN_DIR,
    TEST_DIR,
    PNG_IMAGES,
    PNG_MASKS,
    TRAIN_RLE,
    TEST_RLE,
    SAMPLE_SUB,
    NIH_IDS,
    PNG_TRAIN_CSV,
    PNG_TEST_CSV,
    INFO,
)
OUTPUT_DIRS = (TRAIN_DIR, TEST_DIR, PNG_IMAGES, PNG_MASKS)
# Written first, before any data file: a folder that carries it (or, from before the marker
# existed, the generator's synthetic_info.json) is the generator's, and only such a folder is ever
# cleared. JSON: the generator, a version and the plan parameters, which name every file written.
MARKER = ".pneumoseg-synthetic"
GENERATOR = "pneumoseg.synthetic"  # stored in every set written: kept when the module moved
PLAN_KEYS = ("n_train", "n_test", "seed", "positive_rate", "png")

UID_ROOT = "1.2.276.0.7230010.3.1"  # the competition's UID root (…3.1.{2,3,4}.8323329.n.t.r)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "pneumoseg-synthetic").int)
IMPLEMENTATION_VERSION = "PNEUMOSEG_SYN_1"
JPEG_QUALITY = 95

_SPLIT_CODE = {"train": 0, "test": 1}


# --------------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------------
def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Patient-level anatomy parameters (normalized image coordinates, x right, y down)."""
    return {
        "cx": rng.uniform(0.47, 0.53),
        "body_half_w": rng.uniform(0.40, 0.50),
        "lung_top": rng.uniform(0.09, 0.17),
        "lung_bottom": rng.uniform(0.68, 0.80),
        "lung_w": rng.uniform(0.25, 0.33),
        "med_half_w": rng.uniform(0.045, 0.075),
        "dome": rng.uniform(0.04, 0.09),
        "heart_rx": rng.uniform(0.12, 0.18),
        "heart_ry": rng.uniform(0.09, 0.13),
        "heart_dx": rng.uniform(0.03, 0.07),
        "rib_gap": rng.uniform(0.056, 0.07),
        "rib_th": rng.uniform(0.016, 0.024),
        "soft": rng.uniform(0.50, 0.62),
        "lung_d": rng.uniform(0.16, 0.26),
        "vessel_d": rng.uniform(0.07, 0.12),
        "paren_d": rng.uniform(0.012, 0.028),
        "breast": rng.uniform(0.0, 0.12),
    }


def vary_anatomy(anatomy: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """The same patient on another day: every parameter jittered by about 2 %."""
    return {k: v * (1.0 + rng.normal(0.0, 0.02)) for k, v in anatomy.items()}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a cells×cells Gaussian grid, bicubically upsampled."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


@dataclass
class _Canvas:
    """Draws normalized-coordinate shapes into float32 maps through the per-image affine."""

    size: int
    affine: np.ndarray  # 2×3, normalized -> normalized
    scale: float
    shift_bits: int = 4
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    angle: float = 0.0  # the affine's rotation (radians): ellipses are drawn turned by it

    def px(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        t = pts @ self.affine[:, :2].T + self.affine[:, 2]
        return np.round(t * self.size * (1 << self.shift_bits)).astype(np.int32)

    def th(self, width: float) -> int:
        return max(1, round(width * self.size * self.scale))

    def fill(self, img: np.ndarray, pts: np.ndarray, value: float) -> None:
        cv2.fillPoly(img, [self.px(pts)], float(value), cv2.LINE_AA, self.shift_bits)

    def line(self, img: np.ndarray, pts: np.ndarray, value: float, width: float) -> None:
        self.lines(img, np.asarray(pts)[None], value, width)

    def lines(self, img: np.ndarray, pts: np.ndarray, value: float, width: float) -> None:
        """Draw K polylines of P points each (``pts`` K×P×2) with one value and width."""
        w = width * self.size * self.scale
        if w < 1.0:  # sub-pixel lines: 1 px wide, fainter
            value *= w
        k, p = pts.shape[:2]
        px = list(self.px(pts.reshape(-1, 2)).reshape(k, p, 2))
        cv2.polylines(img, px, False, float(value), self.th(width), cv2.LINE_AA, self.shift_bits)


def _lung_outline(a: dict[str, float], side: int) -> np.ndarray:
    """Closed outline of one lung; side -1 = image left (patient right), +1 = image right."""
    cx = a["cx"]
    med = cx + side * a["med_half_w"] * (1.25 if side > 0 else 1.0)
    lat = med + side * a["lung_w"] * (0.93 if side > 0 else 1.0)
    top, bottom = a["lung_top"] + (0.01 if side > 0 else 0.0), a["lung_bottom"]
    apex = med + 0.35 * (lat - med)
    # apex -> costophrenic angle: a quarter ellipse (rounded apex, near-vertical lateral wall)
    th = np.linspace(0.0, np.pi / 2, 40)
    lateral = np.stack(
        [apex + (lat - apex) * np.sin(th), top + (bottom - top) * (1 - np.cos(th))], 1
    )
    # diaphragm: rises steeply from the costophrenic angle, flat dome medially
    s = np.linspace(0.0, 1.0, 24)[1:]
    dome = a["dome"] * (1.15 if side < 0 else 1.0)
    diaphragm = np.stack([lat + (med - lat) * s, bottom - dome * (1 - (1 - s) ** 2.2)], 1)
    # medial border (mediastinum), curving laterally towards the apex
    u = np.linspace(0.0, 1.0, 24)[1:-1]
    y_med0 = bottom - dome
    medial = np.stack(
        [med + (apex - med) * u**3, y_med0 + (top + 0.03 - y_med0) * u],
        1,
    )
    return np.concatenate([lateral, diaphragm, medial], 0)


def _vessel_tree(
    cv: _Canvas,
    img: np.ndarray,
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
    width: float,
    value: float,
    depth: int,
) -> None:
    """Branching vessels: wiggly 4-segment branches that fork in two, thinner and shorter, level
    by level (all branches of a level drawn in one call)."""
    starts = np.asarray(start, dtype=np.float64).reshape(1, 2)
    angles = np.array([angle])
    for _ in range(depth + 1):
        k = len(starts)
        angs = angles[:, None] + np.cumsum(rng.normal(0.0, 0.12, (k, 4)), 1)
        steps = (length / 4) * np.stack([np.cos(angs), np.sin(angs)], -1)
        pts = np.concatenate([starts[:, None], starts[:, None] + np.cumsum(steps, 1)], 1)
        cv.lines(img, pts, value, width)
        if width < 0.0012:
            return
        spread = rng.uniform(0.25, 0.6, (k, 2)) * np.array([-1.0, 1.0])
        starts = np.repeat(pts[:, -1], 2, axis=0)
        angles = (angs[:, -1:] + spread).ravel()
        length *= rng.uniform(0.62, 0.8)
        width *= rng.uniform(0.62, 0.78)
        value *= 0.92


def _ptx_instance(
    rng: np.random.Generator,
    lung: np.ndarray,
    side: int,
    grid: tuple[np.ndarray, np.ndarray],
    min_area: int,
) -> np.ndarray | None:
    """One pneumothorax: a crescent hugging the lateral/apical wall of ``lung`` (uint8 0/1)."""
    m = cv2.moments(lung, binaryImage=True)
    if m["m00"] < 1:
        return None
    cyl, cxl = m["m01"] / m["m00"], m["m10"] / m["m00"]
    xs = np.nonzero(lung)[1]
    lung_w = float(xs.max() - xs.min() + 1)
    dist = cv2.distanceTransform(lung, cv2.DIST_L2, 5)
    yy, xx = grid
    # angle around the lung's centroid: 0 = lateral, +pi/2 = apical, -pi/2 = basal
    phi = np.arctan2(-(yy - cyl), (xx - cxl) * side)
    for _ in range(12):
        phi0 = rng.uniform(-0.3, 1.75)
        half = rng.uniform(0.25, 1.1)
        thick = lung_w * 0.045 * math.exp(rng.uniform(0.0, math.log(6.0)))
        d = (phi - phi0 + np.pi) % (2 * np.pi) - np.pi  # wrapped difference
        prof = np.clip(np.cos(np.pi / 2 * d / half), 0.0, 1.0) ** 0.6
        k, ph = rng.integers(2, 5), rng.uniform(0, 2 * np.pi)
        wobble = 1.0 + 0.15 * np.sin(k * d / half * np.pi + ph)
        region = (lung > 0) & (np.abs(d) < half) & (dist < thick * prof * wobble + 0.5)
        region = region.astype(np.uint8)
        if int(region.sum()) >= min_area:
            return region
    return None


def generate_case(
    rng: np.random.Generator,
    size: int = 1024,
    positive: bool = False,
    anatomy: dict[str, float] | None = None,
    view: str = "PA",
    return_lungs: bool = False,
):
    """One chest-X-ray phantom.

    Returns ``(image, masks)``: ``image`` uint8 H×W (MONOCHROME2: bright = dense), ``masks`` a list
    of uint8 0/1 H×W instance masks (empty when ``positive`` is false; 1–3 when true). With
    ``return_lungs`` a third item, the uint8 0/1 lung mask (for tests and plausibility checks).

    The drawing steps below run in this order and draw from ``rng`` in this order: the same
    generator state gives the same image, byte for byte.
    """
    if size < 32:
        raise ConfigError(f"size must be at least 32, got {size}")
    a = _view_anatomy(rng, anatomy, view)
    cv = _jittered_canvas(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body, dens = _draw_body(cv, a, yy, xx)
    med = _draw_mediastinum(cv, a)
    lungs, lung_any, lung_soft, dens = _draw_lungs(cv, rng, a, yy, med, dens)
    content = _draw_vessels(cv, rng, a)
    content = _add_parenchyma(rng, a, content)
    masks = _draw_pneumothoraces(rng, lungs, size) if positive else []
    if masks:
        _air_and_pleural_line(rng, a, masks, lung_any, dens, content)
    dens += content * lung_soft
    dens += _draw_bones(cv, a) * body
    _draw_distractors(cv, rng, a, dens)
    image = _expose(rng, dens)
    if return_lungs:
        return image, masks, lung_any
    return image, masks


def _view_anatomy(
    rng: np.random.Generator, anatomy: dict[str, float] | None, view: str
) -> dict[str, float]:
    """The case's anatomy (drawn when not given), adapted to the view."""
    a = sample_anatomy(rng) if anatomy is None else dict(anatomy)
    ap = view.upper() == "AP"
    if ap:  # AP: magnified heart, higher diaphragm
        a["heart_rx"] *= 1.15
        a["lung_bottom"] -= 0.03
    return a


def _jittered_canvas(rng: np.random.Generator, size: int) -> _Canvas:
    """Per-image geometry jitter: rotation, scale, shift about the image centre."""
    ang = math.radians(rng.uniform(-3.0, 3.0))
    sc = rng.uniform(0.92, 1.06)
    shift = rng.uniform(-0.03, 0.03, 2)
    rot = sc * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    affine = np.concatenate([rot, (np.array([0.5, 0.5]) - rot @ [0.5, 0.5] + shift)[:, None]], 1)
    return _Canvas(size, affine, sc, angle=ang)


def _draw_body(
    cv: _Canvas, a: dict[str, float], yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Body (soft tissue), thicker in the middle, with shoulders and neck -> (body, density)."""
    f32 = np.float32
    n = cv.size
    cx = a["cx"]
    hw = a["body_half_w"]
    body_pts = np.array(
        [
            [cx - 0.075, -0.1],
            [cx - 0.085, 0.07],
            [cx - hw * 0.8, 0.11],
            [cx - hw, 0.2],
            [cx - hw * 1.02, 0.55],
            [cx - hw * 0.98, 1.1],
            [cx + hw * 0.98, 1.1],
            [cx + hw * 1.02, 0.55],
            [cx + hw, 0.2],
            [cx + hw * 0.8, 0.11],
            [cx + 0.085, 0.07],
            [cx + 0.075, -0.1],
        ]
    )
    body = np.zeros((n, n), f32)
    cv.fill(body, body_pts, 1.0)
    body = cv2.GaussianBlur(body, (0, 0), 0.012 * n)
    thick = 1.0 - 0.35 * np.clip(np.abs(xx - cx) / hw, 0, 1.2) ** 3
    dens = body * a["soft"] * thick
    return body, dens


def _draw_mediastinum(cv: _Canvas, a: dict[str, float]) -> np.ndarray:
    """Mediastinum + heart: soft tissue that hides the lung behind it (0..1)."""
    n = cv.size
    cx = a["cx"]
    sc = cv.scale
    med = np.zeros((n, n), np.float32)
    mw = a["med_half_w"] * 0.9
    cv.fill(med, np.array([[cx - mw, -0.1], [cx + mw, -0.1], [cx + mw, 1.1], [cx - mw, 1.1]]), 1.0)
    cv2.ellipse(
        med,
        tuple(int(v) for v in cv.px([[cx + a["heart_dx"], 0.62]])[0]),
        (int(a["heart_rx"] * n * sc * 16), int(a["heart_ry"] * n * sc * 16)),
        math.degrees(cv.angle) - 15,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
        cv.shift_bits,
    )
    return np.minimum(cv2.GaussianBlur(med, (0, 0), 0.006 * n), 1.0)


def _draw_lungs(
    cv: _Canvas,
    rng: np.random.Generator,
    a: dict[str, float],
    yy: np.ndarray,
    med: np.ndarray,
    dens: np.ndarray,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """The two lungs (dark) -> (lung masks, their union, the soft lung weight, the density)."""
    f32 = np.float32
    n = cv.size
    lungs = [np.zeros((n, n), np.uint8) for _ in range(2)]
    for lm, side in zip(lungs, (-1, 1), strict=True):
        cv2.fillPoly(lm, [cv.px(_lung_outline(a, side))], 1, cv2.LINE_8, cv.shift_bits)
    lung_any = np.maximum(lungs[0], lungs[1])
    lung_soft = cv2.GaussianBlur(lung_any.astype(f32), (0, 0), 0.004 * n) * (1.0 - 0.9 * med)
    # the lung replaces most of the soft tissue; bases overlapped by breast/diaphragm soft tissue
    base = np.clip((yy - a["lung_top"]) / (a["lung_bottom"] - a["lung_top"]), 0, 1)
    lung_level = a["lung_d"] + a["breast"] * base**2 + 0.04 * _smooth_noise(rng, n, 4)
    dens = dens - lung_soft * np.clip(dens - lung_level, 0, None)
    return lungs, lung_any, lung_soft, dens


def _draw_vessels(cv: _Canvas, rng: np.random.Generator, a: dict[str, float]) -> np.ndarray:
    """Lung content: branching vessels from each hilum."""
    n = cv.size
    cx = a["cx"]
    content = np.zeros((n, n), np.float32)
    for side in (-1, 1):
        hil = np.array([cx + side * (a["med_half_w"] + 0.035), 0.43 + rng.uniform(-0.02, 0.02)])
        for ang0 in np.linspace(-1.25, 1.25, int(rng.integers(8, 13))):
            dir_ang = ang0 + rng.normal(0, 0.12)  # 0 = lateral
            angle = math.pi - dir_ang if side < 0 else dir_ang
            _vessel_tree(
                cv,
                content,
                rng,
                hil,
                angle,
                rng.uniform(0.06, 0.09),
                rng.uniform(0.006, 0.01),
                a["vessel_d"],
                5,
            )
    return cv2.GaussianBlur(content, (0, 0), max(0.5, 0.002 * n))


def _add_parenchyma(
    rng: np.random.Generator, a: dict[str, float], content: np.ndarray
) -> np.ndarray:
    """Lung content: the fine parenchymal texture over the vessels."""
    n = content.shape[0]
    paren = rng.standard_normal((n, n)).astype(np.float32)
    paren = cv2.GaussianBlur(paren, (0, 0), max(0.7, 0.003 * n))
    paren *= a["paren_d"] / (paren.std() + 1e-6)
    content += paren * (0.6 + 0.4 * _smooth_noise(rng, n, 6))
    return content


def _draw_pneumothoraces(
    rng: np.random.Generator, lungs: list[np.ndarray], n: int
) -> list[np.ndarray]:
    """1-3 pneumothorax instances (uint8 0/1 masks), mostly in one lung, sometimes the other."""
    f32 = np.float32
    masks: list[np.ndarray] = []
    grid = (np.mgrid[0:n, 0:n][0].astype(f32), np.mgrid[0:n, 0:n][1].astype(f32))
    n_inst = int(rng.choice([1, 2, 3], p=[0.72, 0.2, 0.08]))
    side_i = int(rng.integers(0, 2))
    min_area = max(12, int(0.0008 * n * n))
    for _ in range(n_inst):
        if rng.random() < 0.25:  # sometimes the other lung
            side_i = 1 - side_i
        inst = _ptx_instance(rng, lungs[side_i], (-1, 1)[side_i], grid, min_area)
        if inst is not None:
            masks.append(inst)
    return masks


def _air_and_pleural_line(
    rng: np.random.Generator,
    a: dict[str, float],
    masks: list[np.ndarray],
    lung_any: np.ndarray,
    dens: np.ndarray,
    content: np.ndarray,
) -> None:
    """Pneumothorax air (darker, without markings), its bright visceral pleural line and the
    denser collapsed lung beneath (``dens`` and ``content`` in place)."""
    f32 = np.float32
    n = dens.shape[0]
    ptx = np.zeros((n, n), np.uint8)
    for m in masks:
        ptx |= m
    ptx_soft = cv2.GaussianBlur(ptx.astype(f32), (0, 0), max(0.5, 0.001 * n))
    content *= 1.0 - ptx_soft
    dens -= ptx_soft * rng.uniform(0.6, 0.9) * a["lung_d"]
    r = max(1, round(0.0025 * n))
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    pleura = (cv2.dilate(ptx, ker) & lung_any & (1 - ptx)).astype(f32)
    pleura = cv2.GaussianBlur(pleura, (0, 0), max(0.5, 0.0008 * n))
    dens += pleura * rng.uniform(0.15, 0.25)
    # the collapsed lung beneath is a little denser
    near = cv2.dilate(ptx, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (8 * r + 1,) * 2))
    dens += (near & lung_any & (1 - ptx)).astype(f32) * 0.02


def _draw_bones(cv: _Canvas, a: dict[str, float]) -> np.ndarray:
    """Spine with vertebral end plates, clavicles, posterior and anterior ribs (blurred)."""
    n = cv.size
    cx = a["cx"]
    bone = np.zeros((n, n), np.float32)
    sw = 0.034
    cv.fill(
        bone, np.array([[cx - sw, -0.1], [cx + sw, -0.1], [cx + sw, 1.1], [cx - sw, 1.1]]), 0.05
    )
    for y in np.arange(0.02, 1.05, a["rib_gap"] * 0.8):  # vertebral end plates
        cv.line(bone, np.array([[cx - sw, y], [cx + sw, y]]), 0.03, 0.004)
    # clavicles
    for side in (-1, 1):
        t = np.linspace(0, 1, 20)
        pts = np.stack(
            [cx + side * (0.04 + 0.3 * t), 0.14 - 0.05 * t + 0.025 * np.sin(np.pi * t * 1.5)], 1
        )
        cv.line(bone, pts, 0.1, 0.022)
    for side in (-1, 1):
        _draw_ribs(cv, a, bone, side)
    return cv2.GaussianBlur(bone, (0, 0), max(0.5, 0.0015 * n))


def _draw_ribs(cv: _Canvas, a: dict[str, float], bone: np.ndarray, side: int) -> None:
    """Ribs of one side: posterior (bright arcs from the spine) and anterior (fainter, sloping
    down medially)."""
    cx = a["cx"]
    hw = a["body_half_w"]
    for i in range(11):
        y0 = a["lung_top"] - 0.03 + i * a["rib_gap"]
        if y0 > a["lung_bottom"] - 0.02:
            break
        ext = hw * (0.72 + 0.25 * min(1.0, i / 4))
        t = np.linspace(0, 1, 30)
        pts = np.stack(
            [
                cx + side * (0.03 + ext * np.sin(np.pi / 2 * t) ** 0.8),
                y0 - 0.04 * np.sin(np.pi * t * 0.7) + (0.13 + 0.01 * i) * t**2.5,
            ],
            1,
        )
        cv.line(bone, pts, 0.065, a["rib_th"])
        cv.line(bone, pts + np.array([0.0, a["rib_th"] * 0.45]), 0.035, a["rib_th"] * 0.2)  # cortex
        if i < 7:
            t2 = np.linspace(0, 1, 20)
            x_lat = cx + side * ext * 0.95
            pts2 = np.stack(
                [
                    x_lat + (cx + side * 0.1 - x_lat) * t2,
                    y0 + 0.07 + 0.12 * t2 - 0.03 * np.sin(np.pi * t2),
                ],
                1,
            )
            cv.line(bone, pts2, 0.03, a["rib_th"] * 1.1)


def _draw_distractors(
    cv: _Canvas, rng: np.random.Generator, a: dict[str, float], dens: np.ndarray
) -> None:
    """Look-alikes that are no pneumothorax (``dens`` in place): a gastric bubble under the
    (image-right) left hemidiaphragm, dark and textureless, and a skin fold, a faint curved edge
    over a lung that mimics a pleural line."""
    f32 = np.float32
    n = cv.size
    cx = a["cx"]
    if rng.random() < 0.5:
        bub = np.zeros((n, n), f32)
        bx = cx + a["med_half_w"] + a["lung_w"] * rng.uniform(0.35, 0.6)
        by = a["lung_bottom"] + rng.uniform(0.01, 0.04)
        t = np.linspace(0, 2 * np.pi, 30)
        rx, ry = rng.uniform(0.03, 0.06), rng.uniform(0.02, 0.035)
        cv.fill(
            bub,
            np.stack(
                [bx + rx * np.cos(t), by + ry * np.abs(np.sin(t)) ** 0.7 * np.sign(np.sin(t))], 1
            ),
            1.0,
        )
        dens -= cv2.GaussianBlur(bub, (0, 0), 0.003 * n) * 0.18
    if rng.random() < 0.2:
        side = int(rng.choice([-1, 1]))
        x0 = cx + side * (a["med_half_w"] + a["lung_w"] * rng.uniform(0.6, 0.9))
        t = np.linspace(0, 1, 20)
        pts = np.stack([x0 + side * 0.03 * np.sin(np.pi * t), 0.3 + 0.35 * t], 1)
        fold = np.zeros((n, n), f32)
        cv.line(fold, pts, 0.06, 0.003)
        dens += cv2.GaussianBlur(fold, (0, 0), max(0.5, 0.001 * n))


def _expose(rng: np.random.Generator, dens: np.ndarray) -> np.ndarray:
    """The film: window, gamma, heel effect, noise, and text markers as on many real films ->
    uint8 image."""
    f32 = np.float32
    n = dens.shape[0]
    dens = cv2.GaussianBlur(dens, (0, 0), max(0.4, 0.0008 * n))
    lo = rng.uniform(-0.02, 0.08)
    hi = rng.uniform(0.75, 0.95)
    img = np.clip((dens - lo) / (hi - lo), 0, 1)
    img = img ** rng.uniform(0.75, 1.35)
    img *= 1.0 + 0.06 * _smooth_noise(rng, n, 3)
    img = img * 255.0 + rng.normal(0, rng.uniform(1.5, 5.0), (n, n)).astype(f32)
    if rng.random() < 0.4:
        text = str(rng.choice(["L", "R", "AP", "PORTABLE", "SUPINE"]))
        scale = n / 700 * rng.uniform(0.8, 1.5)
        org = (int(n * rng.uniform(0.03, 0.8)), int(n * rng.uniform(0.06, 0.12)))
        mark = np.zeros((n, n), np.uint8)
        cv2.putText(mark, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, n // 300))
        img = np.maximum(img, mark.astype(f32))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# data set plan (ids, patients, labels) — all drawn up front from the seed
# --------------------------------------------------------------------------------------------------
def _patient_sizes(rng: np.random.Generator, n: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1])))
    if sizes:
        sizes[-1] -= sum(sizes) - n
    return sizes


def _uid_triplets(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """(study, series, sop) UIDs shaped like the competition's: ``…3.1.{2,3,4}.8323329.n.t.r``."""
    ns = rng.choice(np.arange(1, max(20000, 2 * count)), size=count, replace=False)
    out = []
    for n_ in ns:
        t = 1517875160 + int(n_) // 170 + int(rng.integers(0, 3))
        r = int(rng.integers(100002, 999999))
        tail = f"8323329.{int(n_)}.{t}"
        out.append(
            (
                f"{UID_ROOT}.2.{tail}.{r - 1}",
                f"{UID_ROOT}.3.{tail}.{r - 2}",
                f"{UID_ROOT}.4.{tail}.{r}",
            )
        )
    return out


def plan_dataset(
    n_train: int, n_test: int, seed: int, positive_rate: float
) -> list[dict[str, Any]]:
    """One record per image (train first, then test): ids, patient, tags, label, anatomy."""
    if n_train < 0 or n_test < 0:
        raise ConfigError("n_train and n_test must be >= 0")
    if not 0.0 <= positive_rate <= 1.0:
        raise ConfigError(f"positive_rate must be in [0, 1], got {positive_rate}")
    rng = np.random.default_rng([seed, 7919])
    uids = _uid_triplets(rng, n_train + n_test)
    test_ids: list[str] = []  # ordered by draw: a set's order varies with PYTHONHASHSEED
    seen: set[str] = set()
    while len(test_ids) < n_test:
        hex_id = f"{int(rng.integers(0, 16**9)):09x}"
        if hex_id not in seen:
            seen.add(hex_id)
            test_ids.append(hex_id)
    patient_nums = rng.choice(np.arange(1, 30806), size=n_train + n_test, replace=False)
    records: list[dict[str, Any]] = []
    p_next = 0
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for m in _patient_sizes(rng, count):
            pnum = int(patient_nums[p_next])
            p_next += 1
            anatomy = sample_anatomy(rng)
            sex = "M" if rng.random() < 0.55 else "F"
            age = int(rng.integers(18, 88))
            ks = np.sort(rng.choice(np.arange(0, 15), size=m, replace=False))
            for j, k in enumerate(ks):
                rows.append(
                    {
                        "patient": pnum,
                        "nih_id": f"{pnum:08d}_{int(k):03d}.png",
                        "anatomy": anatomy,
                        "sex": sex,
                        "age": str(min(age + j, 95)),
                        "view": "AP" if rng.random() < 0.3 else "PA",
                    }
                )
        order = rng.permutation(len(rows))  # patients' images scattered, as in the real files
        positives = np.zeros(len(rows), bool)
        positives[rng.permutation(len(rows))[: round(positive_rate * len(rows))]] = True
        for i, o in enumerate(order):
            rec = rows[int(o)]
            rec.update(
                split=split,
                index=i,
                positive=bool(positives[i]),
                patient_uuid=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                pixel_spacing=float(rng.choice([0.139, 0.143, 0.168, 0.171])),
            )
            study, series, sop = uids[len(records)]
            rec.update(study_uid=study, series_uid=series, sop_uid=sop)
            rec["image_id"] = sop if split == "train" else f"ID_{test_ids[i]}"
            records.append(rec)
    return records


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _jpeg_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def dicom_bytes(image: np.ndarray, rec: dict[str, Any], jpeg: bool = True) -> bytes:
    """A SIIM-like DICOM (8-bit MONOCHROME2 CR secondary capture) of ``image``, as bytes."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    size_h, size_w = image.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(rec["sop_uid"])
    meta.TransferSyntaxUID = UID(JPEG_BASELINE if jpeg else EXPLICIT_LE)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = pydicom.Dataset()
    ds.file_meta = meta
    # PatientAge '38': the SIIM files' (non-standard) form; pydicom both warns and logs about it.
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.PatientAge = rec["age"]
    finally:
        pydicom_log.setLevel(level)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(SECONDARY_CAPTURE)
    ds.SOPInstanceUID = UID(rec["sop_uid"])
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {rec['view']}"
    ds.PatientName = rec["patient_uuid"]
    ds.PatientID = rec["patient_uuid"]
    ds.PatientBirthDate = ""
    ds.PatientSex = rec["sex"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = rec["view"]
    ds.StudyInstanceUID = UID(rec["study_uid"])
    ds.SeriesInstanceUID = UID(rec["series_uid"])
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size_h
    ds.Columns = size_w
    spacing = round(rec["pixel_spacing"] * 1024 / max(size_h, size_w), 6)
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if jpeg:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([_jpeg_bytes(image)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError("PNG encoding failed")
    return enc.tobytes()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def dicom_relpath(rec: dict[str, Any]) -> str:
    """Where a record's DICOM lives under ``out`` (nested train tree, flat stage-2 test folder)."""
    if rec["split"] == "train":
        return f"{TRAIN_DIR}/{rec['study_uid']}/{rec['series_uid']}/{rec['sop_uid']}.dcm"
    return f"{TEST_DIR}/{rec['image_id']}.dcm"


def png_name(rec: dict[str, Any], has_pneumo: int) -> str:
    return f"{rec['index']}_{rec['split']}_{has_pneumo}_.png"


def case_rng(seed: int, rec: dict[str, Any]) -> np.random.Generator:
    """The generator a record's phantom is drawn from (independent of every other case)."""
    return np.random.default_rng([seed, _SPLIT_CODE[rec["split"]], rec["index"]])


def render_record(rec: dict[str, Any], size: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image and instance masks of one planned record (what :func:`write_dataset` writes)."""
    rng = case_rng(seed, rec)
    anatomy = vary_anatomy(rec["anatomy"], rng)
    return generate_case(rng, size, rec["positive"], anatomy=anatomy, view=rec["view"])


def _write_case(
    rec: dict[str, Any], out: Path, size: int, seed: int, jpeg: bool, png: bool
) -> tuple[str, list[str]]:
    image, masks = render_record(rec, size, seed)
    _write_bytes(out / dicom_relpath(rec), dicom_bytes(image, rec, jpeg))
    rles = [rle_encode(m) for m in masks]
    if png:
        name = png_name(rec, int(bool(masks)))
        union = np.zeros_like(image)
        for m in masks:
            union[m > 0] = 255
        _write_bytes(out / PNG_IMAGES / name, _png_bytes(image))
        _write_bytes(out / PNG_MASKS / name, _png_bytes(union))
    return rec["image_id"], rles


def _write_csv(path: Path, header: str, lines: list[str]) -> None:
    with atomic_write(path, "w", newline="") as fh:
        fh.write(header + "\n")
        for line in lines:
            fh.write(line + "\n")


# --------------------------------------------------------------------------------------------------
# ownership: the marker, and removing exactly what the generator wrote
# --------------------------------------------------------------------------------------------------
def _plan_params(data: Any) -> dict[str, Any] | None:
    """The plan parameters recorded in a marker (or in a finished set's ``synthetic_info.json``),
    or None when ``data`` is not the generator's record."""
    if not isinstance(data, dict) or data.get("generator") != GENERATOR:
        return None
    if "n_train" not in data:  # synthetic_info.json: the counts are in its summary
        try:
            data = {**data, "n_train": data["train"]["images"], "n_test": data["test"]["images"]}
        except (KeyError, TypeError):
            return None
    params = {k: data.get(k) for k in PLAN_KEYS}
    ints = [params[k] for k in ("n_train", "n_test", "seed")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        return None
    rate = params["positive_rate"]
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
        return None
    if not isinstance(params["png"], bool):
        return None
    return params


def read_marker(out: str | Path) -> dict[str, Any] | None:
    """The plan parameters (:data:`PLAN_KEYS`) of the synthetic set in ``out``, or None when the
    folder carries no marker of this generator.

    The marker :data:`MARKER` is written before any data file, so an interrupted generation is
    recognised too; folders written before it existed are recognised by their finished set's
    ``synthetic_info.json``. Anything else is data the generator did not write.
    """
    out = Path(out)
    for name in (MARKER, INFO):
        try:
            params = _plan_params(json.loads((out / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):  # missing, a folder, unreadable, not JSON
            continue
        if params is not None:
            return params
    return None


def synthetic_ids(params: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(train ids, test ids)`` of the set the plan parameters describe (nothing is rendered)."""
    records = plan_dataset(
        params["n_train"], params["n_test"], params["seed"], params["positive_rate"]
    )
    train = [r["image_id"] for r in records if r["split"] == "train"]
    return train, [r["image_id"] for r in records if r["split"] == "test"]


def generated_files(params: Mapping[str, Any]) -> set[str]:
    """Every file (POSIX path relative to ``out``) the generator writes for ``params``.

    A PNG's name holds whether the case drew a mask, known only once it is rendered: both
    spellings of each case's name are listed (the generator writes one of them).
    """
    records = plan_dataset(
        params["n_train"], params["n_test"], params["seed"], params["positive_rate"]
    )
    files = {name for name in OUTPUTS if name not in OUTPUT_DIRS}
    for rec in records:
        files.add(dicom_relpath(rec))
        if params["png"]:
            for has in (0, 1):
                files.update(f"{d}/{png_name(rec, has)}" for d in (PNG_IMAGES, PNG_MASKS))
    return files


def _is_ours(rel: str, files: set[str]) -> bool:
    """``rel`` is a generated file, or the temp file of one (``atomic_write``: ``.name.XXXX.tmp``)."""
    if rel in files:
        return True
    folder, _, name = rel.rpartition("/")
    if not (name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3):
        return False
    target = name[1:-4].rsplit(".", 1)[0]
    return (f"{folder}/{target}" if folder else target) in files


def remove_generated(out: str | Path, params: Mapping[str, Any]) -> list[str]:
    """Delete the files the generator wrote into ``out`` for ``params`` (and its temp files), then
    the generator's folders left empty; everything else stays. Returns the names left in ``out``
    (the marker aside).

    ``synthetic_info.json`` goes first, so a half-removed set never looks complete.
    """
    out = Path(out)
    (out / INFO).unlink(missing_ok=True)
    files = generated_files(params)
    for top in OUTPUTS:
        path = out / top
        if path.is_symlink() or not path.is_dir():
            if not path.is_symlink() and path.is_file() and top in files:
                path.unlink()
            continue
        # bottom-up, not following links: a folder is removed only once it is empty
        for parent, _dirs, names in os.walk(path, topdown=False):
            rel_parent = Path(parent).relative_to(out).as_posix()
            for name in names:
                if _is_ours(f"{rel_parent}/{name}", files):
                    os.unlink(os.path.join(parent, name))
            with contextlib.suppress(OSError):  # not empty: someone else's files are inside
                os.rmdir(parent)
    for entry in out.iterdir():  # temp files of the top-level CSVs (a killed run)
        if entry.is_file() and not entry.is_symlink() and _is_ours(entry.name, files):
            entry.unlink()
    return sorted(p.name for p in out.iterdir() if p.name != MARKER)


def remove_dataset(out: str | Path) -> list[str]:
    """Remove a synthetic set the generator wrote (``make clean-demo``, ``demo.py --fresh``):
    its files, then its marker and ``out`` itself once nothing else is left in it. Returns the
    names of the other files left in place. Refuses a folder without the marker."""
    out = Path(out)
    params = owned_params(out)
    _write_marker(out, params)  # an interrupted removal stays recognisable
    left = remove_generated(out, params)
    if left:
        log.warning("%s: left in place (not written by the generator): %s", out, left[:5])
        return left
    (out / MARKER).unlink()
    out.rmdir()
    return []


def owned_params(out: str | Path, what: str = "nothing was deleted") -> dict[str, Any]:
    """The plan parameters of the generator's set in the non-empty folder ``out``; raises
    :class:`OutputExistsError` saying why (and ``what`` happened) when ``out`` holds data the
    generator did not write: no marker, or a symbolic link among its names."""
    out = Path(out)
    params = read_marker(out)
    if params is None:
        raise OutputExistsError(_not_ours(out, what))
    _check_links(out)
    return params


def _not_ours(out: Path, what: str) -> str:
    return (
        f"{out} is not empty and holds data the synthetic generator did not write (it carries "
        f"no {MARKER} marker and no {INFO} of the generator): {what}. Choose another --out "
        "(or data.root), or remove that folder yourself if its data is no longer needed"
    )


def _check_links(out: Path) -> None:
    """The generator never writes symbolic links: one among its names points at someone else's
    data, which neither a removal nor a rebuild may touch."""
    links = [name for name in (*OUTPUTS, MARKER) if (out / name).is_symlink()]
    if links:
        raise OutputExistsError(
            f"{out}: {', '.join(links)} is a symbolic link, which the synthetic generator never "
            "writes: nothing was deleted; remove the link yourself or choose another --out"
        )


def _write_marker(out: Path, params: Mapping[str, Any]) -> None:
    with atomic_write(out / MARKER, "w", encoding="utf-8") as fh:
        json.dump({"generator": GENERATOR, "version": 1, **params}, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _prepare_out(out: Path, force: bool, params: Mapping[str, Any]) -> None:
    """Claim ``out`` for a new set: refuse a folder holding data the generator did not write
    (even with ``force``); with ``force`` remove the previous set's own files; then write the
    marker, before any data file."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        what = (
            "refusing --force, nothing was deleted"
            if force
            else "nothing was deleted (--force would not change that: only a folder the generator wrote is rebuilt)"
        )
        old = owned_params(out, what)
        if not force:
            raise OutputExistsError(
                f"{out} is not empty; pass force=True (--force) to rebuild it (only the "
                "generator's own files are replaced)"
            )
        _write_marker(out, old)  # a folder of an older version gets its marker before removal
        left = remove_generated(out, old)
        if left:
            log.warning("%s: left in place (not written by the generator): %s", out, left[:5])
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, params)


def write_dataset(
    out: str | Path,
    n_train: int = 300,
    n_test: int = 60,
    size: int = 1024,
    seed: int = 0,
    positive_rate: float = 0.22,
    jpeg: bool = True,
    png: bool = True,
    force: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Write a synthetic data set in the Kaggle SIIM layout under ``out``; return a summary dict.

    Refuses a non-empty ``out`` unless ``force``; even then, a folder without the generator's
    marker (:data:`MARKER`, written first) is refused and nothing in it is touched, and in a
    marked folder only the previous set's own files are deleted before the rebuild. Every file is
    written atomically; ``synthetic_info.json`` is written last. The files depend only on the
    arguments (not on ``workers``).
    """
    out = Path(out)
    if size < 32:
        raise ConfigError(f"size must be at least 32, got {size}")
    records = plan_dataset(n_train, n_test, seed, positive_rate)  # checks them before any write
    params = {"n_train": n_train, "n_test": n_test, "seed": seed}
    _prepare_out(out, force, {**params, "positive_rate": positive_rate, "png": png})
    results = _write_cases(records, (out, size, seed, jpeg, png), workers)

    summary: dict[str, Any] = {
        "generator": GENERATOR,
        "version": 1,
        "seed": seed,
        "size": size,
        "positive_rate": positive_rate,
        "jpeg": jpeg,
        "png": png,
    }
    for split, rle_name, png_csv in (
        ("train", TRAIN_RLE, PNG_TRAIN_CSV),
        ("test", TEST_RLE, PNG_TEST_CSV),
    ):
        pairs = [
            (rec, rles)
            for rec, (_, rles) in zip(records, results, strict=True)
            if rec["split"] == split
        ]
        summary[split] = _write_split_csvs(out, pairs, rle_name, png_csv if png else None)
    _write_id_lists(out, records)
    # last: its presence means the data set is complete
    with atomic_write(out / INFO, "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return {"out": str(out), **summary}


def _write_cases(records: list[dict[str, Any]], args: tuple, workers: int) -> list:
    """``_write_case(record, *args)`` for every record, in order: in ``workers`` processes when
    there are several (the files do not depend on it), with a progress bar."""
    from tqdm.auto import tqdm

    bar = dict(total=len(records), desc="synthetic", unit="img", disable=None)
    if workers > 1 and len(records) > 1:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=workers, return_as="generator")
        jobs = par(delayed(_write_case)(r, *args) for r in records)
        return list(tqdm(jobs, **bar))
    return [_write_case(r, *args) for r in tqdm(records, **bar)]


def _write_split_csvs(
    out: Path, pairs: list[tuple[dict[str, Any], list[str]]], rle_name: str, png_csv: str | None
) -> dict[str, int]:
    """One split's RLE CSV (a ``-1`` row for an image without a mask) and, unless ``png_csv``
    is None, its PNG index; returns the split's counts for the summary."""
    lines = []
    for rec, rles in pairs:
        lines.extend(f"{rec['image_id']}, {r}" for r in rles or ["-1"])
    _write_csv(out / rle_name, "ImageId, EncodedPixels", lines)
    if png_csv is not None:
        _write_csv(
            out / png_csv,
            "new_filename,ImageId,has_pneumo",
            [
                f"{png_name(rec, int(bool(rles)))},{rec['image_id']},{int(bool(rles))}"
                for rec, rles in pairs
            ],
        )
    return {
        "images": len(pairs),
        "positive": sum(bool(r) for _, r in pairs),
        "instances": sum(len(r) for _, r in pairs),
        "patients": len({rec["patient"] for rec, _ in pairs}),
    }


def _write_id_lists(out: Path, records: list[dict[str, Any]]) -> None:
    """The sample submission (every test image ``-1``) and the Kaggle -> NIH id map (train)."""
    test_recs = [r for r in records if r["split"] == "test"]
    _write_csv(
        out / SAMPLE_SUB, "ImageId,EncodedPixels", [f"{r['image_id']},-1" for r in test_recs]
    )
    _write_csv(
        out / NIH_IDS,
        "Kaggle_ID,NIH_ID",
        [f"{r['image_id']},{r['nih_id']}" for r in records if r["split"] == "train"],
    )
