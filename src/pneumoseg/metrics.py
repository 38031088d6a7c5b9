"""Segmentation metrics: the competition's Dice and MMSeg-style mIoU / mDice.

All functions take a batch of binary masks, shape (N, H, W) (or a single (H, W) mask), as numpy
arrays or torch tensors (any dtype; nonzero = foreground), and return the same library's type.

Competition Dice (per image): ``2|P∩T| / (|P| + |T|)``, defined as 1 when both are empty. So a
false positive on an empty image scores 0 and an empty prediction on a positive image scores 0.
The leaderboard score is the mean over images.

MMSeg-style metrics accumulate intersection and union over the whole dataset per class
(background = 0, pneumothorax = 1) before dividing, as ``mmseg.evaluation.IoUMetric`` does, so
numbers compare with published segmentation tables. Use :class:`SegConfusion` to accumulate over
batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

CLASS_NAMES = ("background", "pneumothorax")


def _as_batch(x):
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {tuple(x.shape)}")
    return x


def _check_pair(pred, truth):
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(
            f"prediction and truth shapes differ: {tuple(pred.shape)} vs {tuple(truth.shape)}"
        )
    return _as_batch(pred), _as_batch(truth)


def _areas(pred, truth):
    """Per-image |P∩T|, |P|, |T| as int64 (numpy) or float64 (torch) vectors of length N."""
    pred, truth = _check_pair(pred, truth)
    if isinstance(pred, torch.Tensor):
        p = (pred != 0).flatten(1)
        t = (truth != 0).flatten(1)
        inter = (p & t).sum(1, dtype=torch.float64)
        return inter, p.sum(1, dtype=torch.float64), t.sum(1, dtype=torch.float64)
    p = np.asarray(pred).reshape(pred.shape[0], -1) != 0
    t = np.asarray(truth).reshape(truth.shape[0], -1) != 0
    inter = np.count_nonzero(p & t, axis=1)
    return inter, np.count_nonzero(p, axis=1), np.count_nonzero(t, axis=1)


def dice_from_areas(inter, pred_area, truth_area):
    """Competition Dice from per-image areas (vectorised; empty/empty = 1)."""
    if isinstance(inter, torch.Tensor):
        denom = pred_area + truth_area
        return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
    inter = np.asarray(inter, dtype=np.float64)
    denom = np.asarray(pred_area, dtype=np.float64) + np.asarray(truth_area, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def dice_per_image(pred, truth):
    """Competition Dice of each image: a length-N vector (float64)."""
    return dice_from_areas(*_areas(pred, truth))


def mean_dice(pred, truth) -> float:
    """The leaderboard score: mean over images of the competition Dice."""
    return float(dice_per_image(pred, truth).mean())


def positive_dice(pred, truth) -> float:
    """Mean Dice over images whose truth is non-empty (NaN if there are none)."""
    inter, pa, ta = _areas(pred, truth)
    d = dice_from_areas(inter, pa, ta)
    keep = ta > 0
    if int(keep.sum()) == 0:
        return float("nan")
    return float(d[keep].mean())


@dataclass
class SegConfusion:
    """Dataset-level per-class intersection/union accumulator (MMSeg ``IoUMetric`` semantics).

    ``update(pred, truth)`` takes binary (N, H, W) or (H, W) masks; ``compute()`` returns
    ``{"IoU": [bg, ptx], "Dice": [bg, ptx], "mIoU": ..., "mDice": ...}``.
    """

    intersect: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float64))
    union: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float64))
    pred_area: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float64))
    truth_area: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float64))

    def update(self, pred, truth) -> None:
        inter, pa, ta = (float(v.sum()) for v in _areas(pred, truth))
        pred_b, _ = _check_pair(pred, truth)
        total = float(np.prod(tuple(pred_b.shape)))
        # Background areas follow from the foreground ones: no second pass over the pixels.
        bg_pred, bg_truth = total - pa, total - ta
        bg_inter = total - (pa + ta - inter)
        self.intersect += (bg_inter, inter)
        self.pred_area += (bg_pred, pa)
        self.truth_area += (bg_truth, ta)
        self.union += (bg_pred + bg_truth - bg_inter, pa + ta - inter)

    def compute(self) -> dict:
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = self.intersect / self.union
            dice = 2 * self.intersect / (self.pred_area + self.truth_area)
        return {
            "IoU": iou.tolist(),
            "Dice": dice.tolist(),
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mDice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
        }


def miou_mdice(pred, truth) -> dict:
    """MMSeg-style mIoU / mDice (background + pneumothorax) over a batch; see :class:`SegConfusion`."""
    acc = SegConfusion()
    acc.update(pred, truth)
    return acc.compute()
