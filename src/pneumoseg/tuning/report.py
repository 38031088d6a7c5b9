"""The tuning's report: the settings compared, their metrics per fold / over folds / pooled, and
the text ``oof_tune.py`` logs from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

METRICS = ("dice", "pos_dice", "empty_acc", "mIoU", "mDice")


def describe(params: Mapping) -> str:
    """A post-processing setting in a few words, e.g. ``p>0.5, min_area 2048``."""
    gate = f", cls>={params['cls_threshold']:g}" if params.get("cls_threshold") is not None else ""
    if params["method"] == "threshold":
        return f"p>{params['threshold']:g}, min_area {params['min_area']:g}{gate}"
    extra = f", min_area {params['min_area']:g}" if params.get("min_area") else ""
    return (
        f"top {params['top_threshold']:g}×{params['top_area']:g}px, "
        f"bottom {params['bottom_threshold']:g}{extra}{gate}"
    )


def compared_settings(best: pd.DataFrame) -> dict[str, dict]:
    """The settings the report compares: the all-empty baseline, the raw 0.5 threshold and the
    best setting of each family of the search (``best`` from :func:`best_rows`)."""
    from pneumoseg.postprocessing.postprocess import row_params

    settings = {
        "all-empty": {"method": "threshold", "threshold": 1.0, "min_area": 0},
        "raw 0.5": {"method": "threshold", "threshold": 0.5, "min_area": 0},
    }
    for fam, row in best.iterrows():
        settings[f"best {fam}"] = row_params(row.to_dict())
    return settings


def report_table(oofs, names: Sequence[str], settings: Mapping[str, dict], scale: float):
    """Per-fold metrics of each named setting + mean/std over folds + pooled over all images."""
    import pandas as pd

    from pneumoseg.postprocessing.postprocess import evaluate_params, pooled_miou

    metrics = list(METRICS)
    rows = []
    for label, params in settings.items():
        ev = evaluate_params(oofs, params, scale, names=names)
        ev.insert(0, "setting", label)
        ev.insert(1, "params", describe(params))
        ev = ev.rename(columns={"source": "fold"})
        rows.append(ev)
        summary = {"setting": label, "params": describe(params)}
        rows.append(pd.DataFrame([{**summary, "fold": "mean", **ev[metrics].mean().to_dict()}]))
        rows.append(pd.DataFrame([{**summary, "fold": "std", **ev[metrics].std(ddof=0).to_dict()}]))
        n = int(ev["n_images"].sum())
        pooled = pooled_miou(ev)  # MMSeg: intersection and union summed over all pixels first
        all_row = {**summary, "fold": "all", "n_images": n, "dice": float(ev["dice_sum"].sum()) / n,
                   "dice_sum": float(ev["dice_sum"].sum()), "mIoU": pooled["mIoU"],
                   "mDice": pooled["mDice"], "ptx_IoU": pooled["IoU"][1],
                   "ptx_Dice": pooled["Dice"][1], "bg_IoU": pooled["IoU"][0],
                   "bg_Dice": pooled["Dice"][0]}  # fmt: skip
        rows.append(pd.DataFrame([all_row]))
    table = pd.concat(rows, ignore_index=True)
    cols = ["setting", "params", "fold", "n_images", *metrics, "ptx_IoU", "ptx_Dice", "bg_IoU",
            "bg_Dice", "dice_sum"]  # fmt: skip
    table = table[cols]
    table["n_images"] = table["n_images"].astype("Int64")
    return table


def pooled_row(table: pd.DataFrame, setting: str) -> pd.Series:
    """The row of ``setting`` pooled over all images (fold ``all``)."""
    return table[(table["setting"] == setting) & (table["fold"] == "all")].iloc[0]


def fold_summary(table: pd.DataFrame) -> str:
    """One line per setting: each metric's mean ± std over folds."""
    summary = table[table["fold"].isin(["mean", "std"])].pivot_table(
        index=["setting", "params"], columns="fold", values=list(METRICS), sort=False
    )
    lines = []
    for (setting, desc), r in summary.iterrows():
        cells = "  ".join(f"{m} {r[(m, 'mean')]:.4f}±{r[(m, 'std')]:.4f}" for m in METRICS)
        lines.append(f"  {setting:20s} {desc:40s} {cells}")
    return "\n".join(lines)


def pooled_summary(table: pd.DataFrame) -> str:
    """One line per setting: the competition Dice and the MMSeg-style numbers, pooled over all
    images' pixels."""
    pooled = table[table["fold"] == "all"]
    return "\n".join(
        f"  {r.setting:20s} competition Dice {r.dice:.4f}  mIoU {100 * r.mIoU:.2f} "
        f"mDice {100 * r.mDice:.2f}  (background IoU {100 * r.bg_IoU:.2f} Dice "
        f"{100 * r.bg_Dice:.2f}, pneumothorax IoU {100 * r.ptx_IoU:.2f} Dice "
        f"{100 * r.ptx_Dice:.2f})"
        for r in pooled.itertuples()
    )
