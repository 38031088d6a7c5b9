"""The report of one experiment or one blend: its cross-validation numbers with intervals, how it
detects and how calibrated it is, in one folder a person can open.

:func:`write_report` takes the out-of-fold result per image (:class:`ReportData`) and writes::

    folder/roc.png            ROC of the image score, AUROC in the legend, the operating point
    folder/pr.png             precision-recall, average precision in the legend, chance level
    folder/reliability.png    reliability diagram (Wilson error bars) over a histogram, ECE
    folder/dice_by_size.png   mean Dice of the positive images per lesion-area bin (folds' bins)
    folder/metrics.json       every number (NaN written as null, with its reason next to it)
    folder/report.html        one self-contained page: the tables, the PNGs as data URIs

Every file is written atomically; ``report.html`` last. :func:`headline` is the paragraph a script
prints. The numbers come from :mod:`pneumoseg.evaluation.detection`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoseg.data.folds import DEFAULT_AREA_BINS, area_bin
from pneumoseg.errors import DataError
from pneumoseg.evaluation import detection as det
from pneumoseg.io import atomic_write

PLOTS = ("roc", "pr", "reliability", "dice_by_size")


@dataclass
class ReportData:
    """The out-of-fold result of one experiment or blend, one entry per image.

    ``dice`` the competition Dice of the final (post-processed) mask; ``truth_pos`` whether the
    truth has a mask; ``pred_pos`` whether the final mask is non-empty (the decision the
    confusion table scores); ``score`` the image score that ranks images (ROC, PR, calibration;
    see :func:`pneumoseg.evaluation.detection.rank_score`) and ``score_name`` what it is;
    ``truth_area`` the truth's mask area in pixels at the original size (the units of
    ``area_bins``); ``groups`` the patient of each image (the bootstrap then resamples patients);
    ``folds`` the fold of each image (a per-fold table); ``cv`` the headline CV numbers as the
    caller computed them (e.g. ``{"dice mean over folds": 0.85, "std": 0.01}``), shown as given.

    Checked on creation: a :class:`DataError` names the field that is wrong.
    """

    ids: Sequence[str]
    dice: np.ndarray
    truth_pos: np.ndarray
    pred_pos: np.ndarray
    score: np.ndarray
    score_name: str
    truth_area: np.ndarray
    groups: Sequence | None = None
    folds: Sequence | None = None
    cv: Mapping[str, float | str] = field(default_factory=dict)
    area_bins: Sequence[float] = DEFAULT_AREA_BINS

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in np.asarray(self.ids, dtype=object).ravel()]
        self.dice = det.as_vector(self.dice, "dice")
        self.truth_pos = det.as_vector(self.truth_pos, "truth_pos", "bool")
        self.pred_pos = det.as_vector(self.pred_pos, "pred_pos", "bool")
        self.score = det.as_vector(self.score, "score")
        self.truth_area = det.as_vector(self.truth_area, "truth_area")
        for name in ("groups", "folds"):
            if getattr(self, name) is not None:
                setattr(self, name, np.asarray(getattr(self, name), dtype=object))
        det.same_length(ids=self.ids, dice=self.dice, truth_pos=self.truth_pos,
                        pred_pos=self.pred_pos, score=self.score, truth_area=self.truth_area,
                        groups=self.groups, folds=self.folds)  # fmt: skip
        if len(self.ids) == 0:
            raise DataError("ids is empty: a report needs at least one image")
        bad = np.flatnonzero((self.dice < 0) | (self.dice > 1))
        if bad.size:
            raise DataError(
                f"dice must be in [0, 1], found {self.dice[bad[0]]:g} at {self.ids[bad[0]]}"
            )
        bad = np.flatnonzero((self.truth_area > 0) != self.truth_pos)
        if bad.size:
            raise DataError(
                f"truth_area and truth_pos disagree on {bad.size} image(s), e.g. "
                f"{self.ids[bad[0]]}: area {self.truth_area[bad[0]]:g}, positive "
                f"{bool(self.truth_pos[bad[0]])}"
            )


# --------------------------------------------------------------------------------------------------
# the numbers
# --------------------------------------------------------------------------------------------------
def _interval(values, groups, n_boot: int, seed: int, confidence: float) -> dict:
    mean, lo, hi = det.bootstrap_ci(values, groups, n_boot=n_boot, seed=seed, confidence=confidence)
    n_units = len(values) if groups is None else len(set(groups))
    return {"mean": mean, "lo": lo, "hi": hi, "n_images": len(values),
            "unit": "images" if groups is None else "patients", "n_units": n_units}  # fmt: skip


def _calibration(d: ReportData, bins: int) -> dict:
    if d.score.min() < 0 or d.score.max() > 1:
        why = f"the score ({d.score_name}) is not a probability in [0, 1]"
        return {"bins": bins, "ece": {"value": math.nan, "reason": why}, "table": []}
    ece = det.expected_calibration_error(d.truth_pos, d.score, bins)
    table = det.reliability(d.truth_pos, d.score, bins)
    return {"bins": bins, "ece": ece._asdict(), "table": table.to_dict("records")}


def _per_fold(d: ReportData) -> list[dict]:
    if d.folds is None:
        return []
    try:
        folds = sorted(set(d.folds))  # fold 10 after fold 2
    except TypeError:  # labels of mixed types
        folds = sorted(set(d.folds), key=str)
    rows = []
    for fold in folds:
        sel = d.folds == fold
        rows.append({"fold": str(fold), "n_images": int(sel.sum()),
                     "n_positive": int(d.truth_pos[sel].sum()),
                     "dice": float(d.dice[sel].mean()),
                     "auroc": det.roc_auc(d.truth_pos[sel], d.score[sel])._asdict()})  # fmt: skip
    return rows


def compute_metrics(
    data: ReportData,
    title: str = "",
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    calibration_bins: int = 10,
) -> dict:
    """Every number of the report, as a JSON-ready dict (NaN stays NaN here; ``metrics.json``
    writes it as null). Keys: ``title, n_images, n_positive, n_patients, confidence, n_boot,
    seed, cv`` (as given), ``dice`` and ``dice_positive`` (mean + bootstrap interval over
    patients, or images without ``groups``), ``image_level`` (``score_name``, ``auroc``,
    ``pr_auc`` with ``prevalence``, ``confusion``: :func:`~detection.confusion_at` of
    ``truth_pos`` vs ``pred_pos``), ``calibration`` (``bins``, ``ece``, ``table``),
    ``dice_by_size`` (``edges``, ``unit``, ``rows`` with a bootstrap interval each) and
    ``per_fold`` (empty without ``folds``)."""
    d = data
    pos = d.truth_pos
    groups = d.groups
    boot = {"n_boot": n_boot, "seed": seed, "confidence": confidence}
    size = det.dice_by_size_bin(d.dice, d.truth_area, d.area_bins).to_dict("records")
    bin_of = area_bin(pos, d.truth_area, d.area_bins)
    for row in size:  # the interval of each bin's mean, same resampling unit as the headline
        sel = pos & (bin_of == row["bin"])
        ci = _interval(d.dice[sel], None if groups is None else groups[sel], **boot)
        row.update(lo_ci=ci["lo"], hi_ci=ci["hi"])
    return {
        "title": title,
        "n_images": len(d.ids),
        "n_positive": int(pos.sum()),
        "n_patients": None if groups is None else len(set(groups)),
        **boot,
        "cv": dict(d.cv),
        "dice": _interval(d.dice, groups, **boot),
        "dice_positive": _interval(d.dice[pos], None if groups is None else groups[pos], **boot),
        "image_level": {
            "score_name": d.score_name,
            "auroc": det.roc_auc(pos, d.score)._asdict(),
            "pr_auc": {**det.pr_auc(pos, d.score)._asdict(), "prevalence": float(pos.mean())},
            "confusion": det.confusion_at(pos, d.pred_pos, confidence),
        },
        "calibration": _calibration(d, calibration_bins),
        "dice_by_size": {"edges": [float(e) for e in d.area_bins], "unit": "pixels", "rows": size},
        "per_fold": _per_fold(d),
    }


def _plain(obj):
    """``obj`` with numpy scalars as Python numbers and NaN / inf as None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------
def _f(x, digits: int = 3) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
    )


def _ci(lo, hi, digits: int = 3) -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval"
    return f"[{_f(lo, digits)}, {_f(hi, digits)}]"


def _value(v: Mapping, digits: int = 3) -> str:
    """A :class:`~detection.Value` dict as text: the number, or n/a and the reason."""
    return _f(v["value"], digits) if not v.get("reason") else f"n/a ({v['reason']})"


def headline(metrics: Mapping) -> str:
    """One paragraph of the report's main numbers, for a script to print."""
    dice, img, conf = metrics["dice"], metrics["image_level"], metrics["image_level"]["confusion"]
    pct = round(100 * metrics.get("confidence", 0.95))
    parts = [
        f"CV Dice {_f(dice['mean'])} {_ci(dice['lo'], dice['hi'])} ({pct}% bootstrap over "
        f"{dice['n_units']} {dice['unit']}, {metrics['n_images']} images)",
        f"Dice on the {metrics['n_positive']} positive images {_f(metrics['dice_positive']['mean'])} "
        f"{_ci(metrics['dice_positive']['lo'], metrics['dice_positive']['hi'])}",
    ]
    image = [f"image level ({img['score_name']}): AUROC {_value(img['auroc'])}",
             f"average precision {_value(img['pr_auc'])}"]  # fmt: skip
    for key, name in (("sensitivity", "sensitivity"), ("specificity", "specificity")):
        p = conf[key]
        image.append(f"{name} {_f(p['value'], 2)} {_ci(p['lo'], p['hi'], 2)} ({p['k']}/{p['n']})")
    ece = metrics["calibration"]["ece"]
    image.append(f"ECE {_value(ece)} ({metrics['calibration']['bins']} bins)")
    return "; ".join(parts) + "; " + ", ".join(image) + "."


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def write_report(
    folder: str | Path,
    data: ReportData,
    title: str,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    calibration_bins: int = 10,
) -> dict[str, Path]:
    """Compute the metrics of ``data`` and write the report folder (see the module docstring);
    returns ``{"roc", "pr", "reliability", "dice_by_size", "metrics", "html": path}``."""
    folder = Path(folder)
    metrics = compute_metrics(data, title, n_boot, seed, confidence, calibration_bins)
    paths = {name: folder / f"{name}.png" for name in PLOTS}
    plot_roc(data, metrics, paths["roc"])
    plot_pr(data, metrics, paths["pr"])
    plot_reliability(metrics, paths["reliability"])
    plot_dice_by_size(metrics, paths["dice_by_size"])
    paths["metrics"] = folder / "metrics.json"
    with atomic_write(paths["metrics"], "w", encoding="utf-8") as fh:
        json.dump(_plain(metrics), fh, indent=1, allow_nan=False)
        fh.write("\n")
    images = {name: paths[name].read_bytes() for name in PLOTS}
    paths["html"] = folder / "report.html"
    with atomic_write(paths["html"], "w", encoding="utf-8") as fh:
        fh.write(render_html(metrics, images))
    return paths


# --------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg: pneumoseg.visualize sets it; each written atomically)
# --------------------------------------------------------------------------------------------------
def _undefined(ax, reason: str) -> None:
    """Say on the plot why it is empty (a single class, a score that is not a probability)."""
    ax.text(0.5, 0.5, f"not defined:\n{reason}", ha="center", va="center", wrap=True,
            transform=ax.transAxes, fontsize=9, color="#a00")  # fmt: skip


def _square(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_roc(data: ReportData, metrics: Mapping, path: str | Path) -> Path:
    """ROC of the image score; AUROC in the legend; the final masks' operating point."""
    import matplotlib.pyplot as plt

    from pneumoseg.visualize import save_figure

    img = metrics["image_level"]
    curve = det.roc_curve_points(data.truth_pos, data.score)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUROC 0.5)")
    if curve.reason:
        _undefined(ax, curve.reason)
    else:
        ax.plot(
            curve.fpr, curve.tpr, lw=2, label=f"{img['score_name']}: AUROC {_value(img['auroc'])}"
        )
        sens, spec = img["confusion"]["sensitivity"], img["confusion"]["specificity"]
        if math.isfinite(sens["value"]) and math.isfinite(spec["value"]):
            ax.plot(1 - spec["value"], sens["value"], "o", color="red", ms=7,
                    label="final masks (non-empty = positive)")  # fmt: skip
    _square(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)",
            f"{metrics['title']}\nROC, {metrics['n_images']} images".strip())  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_pr(data: ReportData, metrics: Mapping, path: str | Path) -> Path:
    """Precision-recall of the image score; average precision and chance level in the legend."""
    import matplotlib.pyplot as plt

    from pneumoseg.visualize import save_figure

    img = metrics["image_level"]
    prev = img["pr_auc"]["prevalence"]
    curve = det.pr_curve_points(data.truth_pos, data.score)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.axhline(prev, ls="--", color="grey", lw=1, label=f"chance (prevalence {prev:.3f})")
    if curve.reason:
        _undefined(ax, curve.reason)
    else:
        ax.step(curve.recall, curve.precision, where="post", lw=2,
                label=f"{img['score_name']}: AP {_value(img['pr_auc'])}")  # fmt: skip
        sens, ppv = img["confusion"]["sensitivity"], img["confusion"]["ppv"]
        if math.isfinite(sens["value"]) and math.isfinite(ppv["value"]):
            ax.plot(sens["value"], ppv["value"], "o", color="red", ms=7, label="final masks")
    _square(ax, "recall (sensitivity)", "precision (PPV)",
            f"{metrics['title']}\nprecision-recall, {metrics['n_positive']} positive".strip())  # fmt: skip
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def plot_reliability(metrics: Mapping, path: str | Path) -> Path:
    """Reliability diagram (observed fraction vs mean predicted, Wilson error bars) over the
    number of images per bin; the ECE in the legend."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from pneumoseg.visualize import save_figure

    cal = metrics["calibration"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6.4), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    table = pd.DataFrame(cal["table"])
    if cal["ece"]["reason"] or table.empty:
        _undefined(ax, cal["ece"]["reason"] or "no images")
    else:
        t = table[table["count"] > 0]
        err = np.vstack([t["observed"] - t["observed_lo"], t["observed_hi"] - t["observed"]])
        ax.errorbar(t["mean_predicted"], t["observed"], yerr=err, fmt="o-", capsize=3,
                    label=f"ECE {_value(cal['ece'])} ({cal['bins']} bins)")  # fmt: skip
        axn.bar(table["lo"], table["count"], width=1 / cal["bins"], align="edge",
                color="#8ab", edgecolor="white")  # fmt: skip
        axn.set_yscale("symlog")  # the empty-image bin near 0 dwarfs the others
    score = metrics["image_level"]["score_name"]
    _square(ax, "", "observed fraction of positive images", f"{metrics['title']}\nreliability "
            f"of the {score}".strip())  # fmt: skip
    ax.set_aspect("auto")
    ax.legend(loc="upper left", fontsize=8)
    axn.set_xlabel(f"predicted probability ({score})")
    axn.set_ylabel("images")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dice_by_size(metrics: Mapping, path: str | Path) -> Path:
    """Mean Dice of the positive images per lesion-area bin, its interval, the count per bar."""
    import matplotlib.pyplot as plt

    from pneumoseg.visualize import save_figure

    rows = metrics["dice_by_size"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(rows))
    mean = np.array([r["mean_dice"] for r in rows], dtype=float)
    lo = np.array([r["lo_ci"] for r in rows], dtype=float)
    hi = np.array([r["hi_ci"] for r in rows], dtype=float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.bar(x, np.nan_to_num(mean), color="#4a7", label="mean Dice")
    ax.errorbar(x[ok], mean[ok], yerr=[mean[ok] - lo[ok], hi[ok] - mean[ok]], fmt="none",
                ecolor="black", capsize=4, label="bootstrap interval")  # fmt: skip
    for xi, r in zip(x, rows, strict=True):
        txt = f"n={r['count']}" if r["count"] else "no images"
        ax.text(
            xi,
            0.02,
            txt,
            ha="center",
            va="bottom",
            fontsize=8,
            color="white" if r["count"] else "black",
        )
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_xlabel("truth mask area (pixels at original size)")
    ax.set_ylabel("mean Dice (positive images)")
    ax.set_title(f"{metrics['title']}\nDice by lesion size".strip(), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.why{color:#777;font-size:.9em}"""


def _table(header: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[int] = ()) -> str:
    """An HTML table, every cell escaped; the columns ``numeric`` right-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if j in numeric else ''}>{html.escape(str(c))}</td>"
            for j, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _headline_rows(m: Mapping) -> list[list[str]]:
    img, conf = m["image_level"], m["image_level"]["confusion"]
    dice, dpos = m["dice"], m["dice_positive"]
    rows = [
        ["mean Dice (competition)", _f(dice["mean"], 4), _ci(dice["lo"], dice["hi"], 4),
         f"bootstrap over {dice['n_units']} {dice['unit']}"],
        ["Dice on positive images", _f(dpos["mean"], 4), _ci(dpos["lo"], dpos["hi"], 4),
         f"{dpos['n_images']} images, over {dpos['n_units']} {dpos['unit']}"],
        ["AUROC", _value(img["auroc"]), "", img["score_name"]],
        ["average precision (PR-AUC)", _value(img["pr_auc"]), "",
         f"chance = prevalence {_f(img['pr_auc']['prevalence'])}"],
    ]  # fmt: skip
    for key, name in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                      ("ppv", "positive predictive value"), ("npv", "negative predictive value")):  # fmt: skip
        p = conf[key]
        rows.append([name, _f(p["value"]), _ci(p["lo"], p["hi"]), f"{p['k']}/{p['n']}, Wilson"])
    ece = m["calibration"]["ece"]
    rows.append(["expected calibration error", _value(ece), "", f"{m['calibration']['bins']} bins"])
    return rows


def render_html(metrics: Mapping, images: Mapping[str, bytes]) -> str:
    """The self-contained page: headline, tables, the PNGs (``images``, name -> bytes) inline."""
    m = metrics
    e = html.escape
    title = m.get("title") or "cross-validation report"
    pct = round(100 * m["confidence"])
    conf = m["image_level"]["confusion"]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{e(title)}</h1>",
        f"<p>{e(headline(m))}</p>",
        f"<h2>Headline numbers ({pct}% intervals)</h2>",
        _table(["metric", "value", "interval", "basis"], _headline_rows(m), (1, 2)),
        f"<p class=why>Image-level decision: the final mask is non-empty. TP {conf['tp']}, "
        f"FP {conf['fp']}, TN {conf['tn']}, FN {conf['fn']}. Dice intervals: percentile "
        f"bootstrap, {m['n_boot']} resamples (seed {m['seed']}); proportions: Wilson score "
        f"intervals; ECE: |mean predicted - observed| per equal-width bin of the "
        f"{m['image_level']['score_name']}, weighted by the bin's number of images.</p>",
    ]
    if m["cv"]:
        parts += ["<h2>Cross-validation (as reported by the run)</h2>",
                  _table(["number", "value"], [[k, v] for k, v in m["cv"].items()], (1,))]  # fmt: skip
    if m["per_fold"]:
        rows = [[r["fold"], r["n_images"], r["n_positive"], _f(r["dice"], 4), _value(r["auroc"])]
                for r in m["per_fold"]]  # fmt: skip
        parts += ["<h2>Per fold</h2>",
                  _table(["fold", "images", "positive", "mean Dice", "AUROC"], rows, (1, 2, 3, 4))]  # fmt: skip
    size = [[r["label"], r["count"], _f(r["mean_dice"]), _ci(r["lo_ci"], r["hi_ci"])]
            for r in m["dice_by_size"]["rows"]]  # fmt: skip
    parts += ["<h2>Dice by lesion size (positive images, the folds' area bins)</h2>",
              _table(["truth area", "images", "mean Dice", "interval"], size, (1, 2, 3))]  # fmt: skip
    for name in PLOTS:
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(f"<div><img alt='{e(name)}' src='data:image/png;base64,{data}'></div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
