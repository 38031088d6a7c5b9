"""Image-level detection, calibration and uncertainty: what a mean Dice alone does not say.

The competition score is one number, the mean per-image Dice. A report per experiment (and per
blend) also needs to say how well the model *finds* pneumothorax (image level: is the image
positive?), how far its image probability can be trusted (calibration), how uncertain the mean
Dice is (a bootstrap interval, over patients when they are known, because images of one patient
are not independent), and where the Dice comes from (per lesion-size bin, using the folds' bins).

Everything here is pure numpy (scikit-learn for the ranking curves, so the numbers are the ones
everybody else computes): 1-D arrays in, floats / arrays / small tables out, no files.

* A metric that is not defined on the data given (an AUROC with positive images only, a
  sensitivity without positives) is NaN **with a reason** (:class:`Value`, :class:`RocCurve`,
  :class:`PrCurve`), never an exception: a fold or a blend may legitimately lack a class, and a
  report must still be written.
* Inputs that cannot be right (lengths that differ, a NaN Dice, a label that is not 0/1) raise
  :class:`pneumoseg.errors.DataError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pneumoseg.data.folds import DEFAULT_AREA_BINS, area_bin
from pneumoseg.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

# at most this many drawn indices in memory at once in bootstrap_ci (x 8 bytes): 2000 resamples
# of 12k images would otherwise be a 192 MB matrix
_BOOT_CHUNK = 4_000_000


class Value(NamedTuple):
    """A metric that may be undefined on the data: ``value`` NaN and ``reason`` says why."""

    value: float
    reason: str = ""  # '' when value is defined


class RocCurve(NamedTuple):
    """ROC points (sklearn's ``roc_curve``): false/true positive rate at each ``thresholds``
    (``score >= threshold`` is positive; the first threshold is ``inf``: nothing positive)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    reason: str = ""  # '' when defined; else the arrays are empty


class PrCurve(NamedTuple):
    """Precision-recall points (sklearn's ``precision_recall_curve``), recall decreasing; the last
    point (recall 0, precision 1) has no threshold, so ``thresholds`` is one shorter."""

    recall: np.ndarray
    precision: np.ndarray
    thresholds: np.ndarray
    reason: str = ""


# --------------------------------------------------------------------------------------------------
# input checks (typed errors naming the field)
# --------------------------------------------------------------------------------------------------
def as_vector(values, field: str, kind: str = "float") -> np.ndarray:
    """``values`` as a 1-D array: ``kind`` ``"float"`` (finite float64) or ``"bool"`` (0/1 or
    True/False only). Anything else is a :class:`DataError` naming ``field``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{field} must be a 1-D array (one value per image), got shape {arr.shape}")
    if kind == "bool":
        if arr.dtype == bool:
            return arr
        try:
            num = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{field} must be 0/1 or True/False, got dtype {arr.dtype}") from None
        bad = num[(num != 0) & (num != 1)]
        if bad.size:
            raise DataError(f"{field} must be 0/1 or True/False, found {bad[:3].tolist()}")
        return num == 1
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{field} must be numbers, got dtype {arr.dtype}") from None
    bad = np.flatnonzero(~np.isfinite(num))
    if bad.size:
        raise DataError(
            f"{field} has {bad.size} non-finite value(s) (NaN or inf), first at index {bad[0]}"
        )
    return num


def same_length(**fields) -> int:
    """The common length of the named arrays; a :class:`DataError` listing them when they differ."""
    lengths = {name: len(v) for name, v in fields.items() if v is not None}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise DataError(f"one value per image expected, but the lengths differ: {listed}")
    return next(iter(lengths.values()), 0)


def _labels_scores(y, score) -> tuple[np.ndarray, np.ndarray, str]:
    """Checked labels and scores, and why a ranking metric is undefined on them ('' if it is)."""
    y = as_vector(y, "y", "bool")
    score = as_vector(score, "score")
    same_length(y=y, score=score)
    n_pos = int(y.sum())
    if len(y) == 0:
        return y, score, "no images"
    if n_pos == 0:
        return y, score, f"no positive images (all {len(y)} negative): needs both classes"
    if n_pos == len(y):
        return y, score, f"no negative images (all {len(y)} positive): needs both classes"
    return y, score, ""


# --------------------------------------------------------------------------------------------------
# ranking: ROC and precision-recall
# --------------------------------------------------------------------------------------------------
def roc_auc(y, score) -> Value:
    """Area under the ROC curve of ``score`` for the labels ``y`` (ties count half, as the
    Mann-Whitney U); NaN with a reason when ``y`` has a single class."""
    y, score, reason = _labels_scores(y, score)
    if reason:
        return Value(math.nan, reason)
    from sklearn.metrics import roc_auc_score

    return Value(float(roc_auc_score(y, score)))


def roc_curve_points(y, score) -> RocCurve:
    """The ROC curve's points (collinear ones dropped, as sklearn does by default)."""
    y, score, reason = _labels_scores(y, score)
    if reason:
        empty = np.empty(0)
        return RocCurve(empty, empty, empty, reason)
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, score)
    return RocCurve(fpr, tpr, thr)


def pr_auc(y, score) -> Value:
    """Area under the precision-recall curve as **average precision**, sklearn's definition:
    ``sum_n (R_n - R_{n-1}) P_n`` over the thresholds (a step function, no interpolation, so it
    is not the trapezoid area, which is optimistic). Its chance level is the prevalence, not 0.5.
    NaN with a reason when ``y`` has a single class (no positives: recall undefined; no
    negatives: every ranking is perfect, a number that says nothing)."""
    y, score, reason = _labels_scores(y, score)
    if reason:
        return Value(math.nan, reason)
    from sklearn.metrics import average_precision_score

    return Value(float(average_precision_score(y, score)))


def pr_curve_points(y, score) -> PrCurve:
    """The precision-recall curve's points (see :class:`PrCurve`)."""
    y, score, reason = _labels_scores(y, score)
    if reason:
        empty = np.empty(0)
        return PrCurve(empty, empty, empty, reason)
    from sklearn.metrics import precision_recall_curve

    precision, recall, thr = precision_recall_curve(y, score)
    return PrCurve(recall, precision, thr)


# --------------------------------------------------------------------------------------------------
# proportions: Wilson intervals and the confusion table
# --------------------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``; ``(nan, nan)`` when ``n == 0``.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and does not collapse
    to a zero width at 0/n or n/n, which is exactly where a sensitivity on a small fold lands::

        z = Φ⁻¹(1 - (1 - confidence) / 2),  p = k / n
        centre = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)
    """
    if not 0 < confidence < 1:
        raise DataError(f"confidence must be between 0 and 1, got {confidence}")
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise DataError(f"wilson_interval needs integers 0 <= k <= n, got k={k}, n={n}")
    k, n = int(k), int(n)
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact ends at 0/n and n/n (the formula gives them up to rounding)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def proportion(k: int, n: int, confidence: float = 0.95) -> dict:
    """``{"value", "lo", "hi", "k", "n"}``: ``k / n`` with its Wilson interval (NaN when n = 0)."""
    lo, hi = wilson_interval(k, n, confidence)
    return {"value": k / n if n else math.nan, "lo": lo, "hi": hi, "k": int(k), "n": int(n)}


def confusion_at(y_true_pos, y_pred_pos, confidence: float = 0.95) -> dict:
    """Image-level confusion table of a decision: ``tp, fp, tn, fn, n`` and ``sensitivity``
    (tp / positives), ``specificity`` (tn / negatives), ``ppv`` (tp / predicted positive) and
    ``npv`` (tn / predicted negative), each a :func:`proportion` dict with its Wilson interval
    (value NaN when its denominator is 0: e.g. no positive image, nothing predicted positive)."""
    t = as_vector(y_true_pos, "y_true_pos", "bool")
    p = as_vector(y_pred_pos, "y_pred_pos", "bool")
    same_length(y_true_pos=t, y_pred_pos=p)
    tp, fp = int(np.sum(t & p)), int(np.sum(~t & p))
    tn, fn = int(np.sum(~t & ~p)), int(np.sum(t & ~p))
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(t),
        "sensitivity": proportion(tp, tp + fn, confidence),
        "specificity": proportion(tn, tn + fp, confidence),
        "ppv": proportion(tp, tp + fp, confidence),
        "npv": proportion(tn, tn + fn, confidence),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
def _probabilities(y, prob, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = as_vector(y, "y", "bool")
    prob = as_vector(prob, "prob")
    same_length(y=y, prob=prob)
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise DataError(
            f"prob must be probabilities in [0, 1], got values from {prob.min():g} to "
            f"{prob.max():g}"
        )
    if int(bins) != bins or bins < 1:
        raise DataError(f"bins must be a positive integer, got {bins}")
    # equal-width bins [i/B, (i+1)/B); the last one also holds p = 1
    idx = np.minimum(np.floor(prob * bins).astype(np.int64), int(bins) - 1)
    return y, prob, idx


def reliability(y, prob, bins: int = 10) -> pd.DataFrame:
    """The reliability diagram's table: one row per equal-width bin of ``prob`` (bin ``i`` holds
    ``i/B <= p < (i+1)/B``, the last also ``p = 1``), columns ``bin, lo, hi, count,
    mean_predicted, observed`` (the fraction of positive images) and ``observed_lo, observed_hi``
    (its Wilson 95% interval). Empty bins are kept with count 0 and NaN means."""
    import pandas as pd

    y, prob, idx = _probabilities(y, prob, bins)
    count = np.bincount(idx, minlength=bins)
    pos = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    psum = np.bincount(idx, weights=prob, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred, observed = psum / count, pos / count
    ci = [wilson_interval(int(k), int(n)) for k, n in zip(pos, count, strict=True)]
    return pd.DataFrame(
        {
            "bin": np.arange(bins),
            "lo": np.arange(bins) / bins,
            "hi": np.arange(1, bins + 1) / bins,
            "count": count,
            "mean_predicted": mean_pred,
            "observed": observed,
            "observed_lo": [c[0] for c in ci],
            "observed_hi": [c[1] for c in ci],
        }
    )


def expected_calibration_error(y, prob, bins: int = 10) -> Value:
    """ECE: ``sum_b (n_b / N) · |mean predicted_b - observed fraction_b|`` over the equal-width
    bins of :func:`reliability` (empty bins weigh 0). 0 is perfectly calibrated; the number
    depends on ``bins`` (fewer, wider bins hide miscalibration), so compare ECEs at equal bins.
    NaN with a reason when there are no images. (A single class is fine: calibration is defined
    on all-negative images, it asks that the probabilities be low.)"""
    y, prob, idx = _probabilities(y, prob, bins)
    if len(y) == 0:
        return Value(math.nan, "no images")
    count = np.bincount(idx, minlength=bins)
    gap = np.abs(
        np.bincount(idx, weights=prob, minlength=bins)
        - np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    )  # per bin: count · |mean predicted - observed|
    return Value(float(gap.sum() / count.sum()))


# --------------------------------------------------------------------------------------------------
# bootstrap interval of the mean Dice, and the Dice per lesion size
# --------------------------------------------------------------------------------------------------
def _group_codes(groups, n: int) -> np.ndarray:
    """Integer codes 0..G-1 of ``groups`` (patient ids of any type); missing ones are an error."""
    import pandas as pd

    arr = np.asarray(groups, dtype=object)
    if arr.ndim != 1:
        raise DataError(
            f"groups must be a 1-D array (one patient per image), got shape {arr.shape}"
        )
    same_length(values=np.empty(n), groups=arr)
    codes, _ = pd.factorize(arr)
    missing = np.flatnonzero(codes < 0)
    if missing.size:
        raise DataError(
            f"groups has {missing.size} missing patient id(s), first at index {missing[0]}"
        )
    return codes


def bootstrap_ci(
    values_per_image,
    groups=None,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values_per_image`` (e.g. per-image Dice) and its
    percentile bootstrap interval.

    With ``groups`` (a patient id per image) the resampling unit is the patient: ``G`` patients
    are drawn with replacement and each drawn patient brings all of its images, so the interval
    reflects that one patient's images are alike (resampling images would pretend they are
    independent and give an interval too narrow). Each resample's mean is its images' mean.
    Without ``groups`` every image is its own unit. Deterministic for a given ``seed``.

    No interval (``lo = hi = nan``) with fewer than 2 units: resampling one patient always gives
    the same mean, a zero width that would look like certainty. All NaN when there are no values.
    """
    v = as_vector(values_per_image, "values_per_image")
    if not 0 < confidence < 1:
        raise DataError(f"confidence must be between 0 and 1, got {confidence}")
    if int(n_boot) != n_boot or n_boot < 1:
        raise DataError(f"n_boot must be a positive integer, got {n_boot}")
    if v.size == 0:
        return math.nan, math.nan, math.nan
    codes = np.arange(v.size) if groups is None else _group_codes(groups, v.size)
    # per unit: sum of its values and its number of images; a resample is then G draws of units,
    # and its mean = sum of the drawn sums / sum of the drawn counts (no loop over images)
    sums = np.bincount(codes, weights=v)
    counts = np.bincount(codes).astype(np.float64)
    n_units = sums.size
    mean = float(v.mean())
    if n_units < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    step = max(1, _BOOT_CHUNK // n_units)  # resamples per chunk, bounding memory
    for start in range(0, int(n_boot), step):
        size = min(step, int(n_boot) - start)
        drawn = rng.integers(0, n_units, size=(size, n_units))
        means[start : start + size] = sums[drawn].sum(1) / counts[drawn].sum(1)
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def dice_by_size_bin(
    dice,
    truth_area,
    bins: Sequence[float] = DEFAULT_AREA_BINS,
) -> pd.DataFrame:
    """Dice on the positive images (``truth_area > 0``) per lesion-area bin: one row per
    non-empty bin of the folds' definition (:func:`pneumoseg.data.folds.area_bin`: bin ``i`` is
    ``bins[i] <= area < bins[i+1]``, the first bin also holds any smaller positive area and the
    last is open-ended), columns ``bin, lo, hi`` (``lo`` 0 for the first, ``hi`` inf for the
    last), ``label``, ``count``, ``mean_dice`` (NaN for an empty bin).

    ``truth_area`` must be in the units of ``bins``: the default edges are pixels at the
    original 1024 × 1024 size, as the folds use them."""
    import pandas as pd

    d = as_vector(dice, "dice")
    area = as_vector(truth_area, "truth_area")
    same_length(dice=d, truth_area=area)
    if (area < 0).any():
        raise DataError(f"truth_area must be >= 0, found {area[area < 0][:3].tolist()}")
    edges = [float(e) for e in bins]
    b = area_bin(area > 0, area, edges)
    rows = []
    for i in range(1, len(edges)):
        sel = d[b == i]
        lo = edges[i] if i > 1 else 0.0  # the first bin holds every positive below edges[2]
        hi = edges[i + 1] if i + 1 < len(edges) else math.inf
        if i == 1:
            label = f"< {hi:g} px" if math.isfinite(hi) else "all"
        else:
            label = f"{lo:g}-{hi:g} px" if math.isfinite(hi) else f">= {lo:g} px"
        rows.append({"bin": i, "lo": lo, "hi": hi, "label": label, "count": int(sel.size),
                     "mean_dice": float(sel.mean()) if sel.size else math.nan})  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# which score ranks images
# --------------------------------------------------------------------------------------------------
def rank_score(cls_prob: np.ndarray | None, max_prob: np.ndarray) -> tuple[np.ndarray, str]:
    """The image-level score the ROC / PR / calibration use, and its name for the report.

    The aux (classifier) head's probability when the model has one (``cls_prob``): it is trained
    to answer "is there a pneumothorax", so it is the honest image score. Otherwise the maximum
    pixel probability of the mask (``max_prob``): the image is as positive as its most confident
    pixel. Both are in [0, 1], so the calibration plots apply to either.
    """
    if cls_prob is not None:
        return as_vector(cls_prob, "cls_prob"), "aux head"
    return as_vector(max_prob, "max_prob"), "max probability"
