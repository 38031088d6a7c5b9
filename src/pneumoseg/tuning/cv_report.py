"""The tuned experiment's (or blend's) report folder, ``runs/<exp>/report/``: the chosen
post-processing applied to every OOF image, then :func:`pneumoseg.evaluation.cv_report.write_report`
(CV Dice with a bootstrap interval over patients, ROC / PR, sensitivity and specificity at the
tuned decision, Dice by lesion size, calibration; PNGs, ``metrics.json``, ``report.html``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("oof_tune")

REPORT_DIR = "report"


def per_image(oofs: Sequence, params: Mapping, scale: float) -> dict[str, np.ndarray]:
    """Each OOF image after ``params``: its Dice, whether truth and final mask are non-empty, the
    truth's area (pixels of the OOF map), its highest pixel probability and aux-head score."""
    from pneumoseg.evaluation.metrics import dice_from_areas
    from pneumoseg.postprocessing.postprocess import apply_postprocess

    cols: dict[str, list] = {k: [] for k in ("dice", "truth_pos", "pred_pos", "area", "max", "cls")}
    for o in oofs:
        for i in range(len(o.ids)):
            p = np.asarray(o.probs[i])
            t = np.asarray(o.truth[i]) != 0
            c = None if o.cls is None else float(o.cls[i])
            m = apply_postprocess(p, params, scale, c) != 0
            ta, pa = int(t.sum()), int(m.sum())
            cols["dice"].append(float(dice_from_areas(int(np.count_nonzero(m & t)), pa, ta)))
            cols["truth_pos"].append(ta > 0)
            cols["pred_pos"].append(pa > 0)
            cols["area"].append(ta)
            cols["max"].append(float(p.max()) / 255.0)
            cols["cls"].append(np.nan if c is None else c)
    return {k: np.asarray(v) for k, v in cols.items()}


def patients_of(cfg: Mapping, ids: Sequence[str]) -> list[str] | None:
    """The patient of each id from the folds file's ``patient`` column (None when there is
    none, or an id is not in it: the bootstrap then resamples images)."""
    import pandas as pd

    path = Path(str(cfg["folds"]["file"]))
    try:
        table = pd.read_csv(path, dtype=str, usecols=["id", "patient"])
    except (OSError, ValueError):
        return None
    by_id = dict(zip(table["id"], table["patient"], strict=True))
    if any(i not in by_id for i in ids):
        return None
    return [by_id[i] for i in ids]


def write_cv_report(cfg: Mapping, exp_dir: Path, oofs: Sequence, folds: Sequence[int],
                    params: Mapping, title: str,
                    nested: float | None = None,
                    more_cv: Mapping[str, float] | None = None,
                    ) -> tuple[dict[str, Path], str]:  # fmt: skip
    """Write ``exp_dir/report/`` for the tuned ``params``; returns its files and headline.
    ``more_cv``: further named CV numbers for the report's cross-validation table."""
    from pneumoseg.evaluation.cv_report import ReportData, compute_metrics, headline, write_report
    from pneumoseg.evaluation.detection import rank_score
    from pneumoseg.postprocessing.postprocess import area_scale_for

    size = int(oofs[0].probs.shape[1])
    rows = per_image(oofs, params, area_scale_for(size))
    ids = [i for o in oofs for i in o.ids]
    fold_of = [k for o, k in zip(oofs, folds, strict=True) for _ in o.ids]
    cls = None if np.isnan(rows["cls"]).any() else rows["cls"]
    score, name = rank_score(cls, rows["max"])
    original = float(cfg["data"]["original_size"] or 1024)
    data = ReportData(
        ids=ids, dice=rows["dice"], truth_pos=rows["truth_pos"], pred_pos=rows["pred_pos"],
        score=score, score_name=name, truth_area=rows["area"] * (original / size) ** 2,
        groups=patients_of(cfg, ids), folds=fold_of,
        cv={k: v for k, v in (("CV Dice (mean over OOF images)", params.get("cv_dice")),
                              ("std over folds", params.get("cv_dice_std")),
                              ("nested CV Dice (tuned without the fold scored)", nested))
            if v is not None} | dict(more_cv or {}),
    )  # fmt: skip
    files = write_report(exp_dir / REPORT_DIR, data, title)
    line = headline(compute_metrics(data, title))
    log.info("report %s: %s", files["html"], line)
    return files, line
