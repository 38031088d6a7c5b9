"""How optimistic a tuned CV Dice is: the post-processing tuned on K-1 folds and scored on the
held-out one, for each fold (nested cross-validation of the tuning alone; the ensemble
selection's nested CV, :func:`pneumoseg.ensembling.select.nested_cv`, wraps the selection too)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("oof_tune")


def best_setting(oofs: Sequence[Any], tune_cfg: Mapping, scale: float, names: Sequence[str],
                 jobs: int | None = None) -> tuple[float, dict]:  # fmt: skip
    """(mean Dice over all images, setting) of the best post-processing on ``oofs``."""
    from pneumoseg.postprocessing.postprocess import pick_best, row_params, search

    results = search(oofs, tune_cfg, area_scale=scale, names=names, n_jobs=jobs)
    row = pick_best(results)
    return float(row["dice"]), row_params(row.to_dict())


def held_out_score(oof: Any, setting: Mapping, scale: float, name: str) -> tuple[int, float]:
    """(images, Dice sum) of ``setting`` applied from scratch to one held-out fold's maps."""
    from pneumoseg.postprocessing.postprocess import evaluate_params

    ev = evaluate_params([oof], setting, scale, [name])
    return int(ev["n_images"].iloc[0]), float(ev["dice_sum"].iloc[0])


def nested_tuning(oofs: Sequence[Any], folds: Sequence[int], tune_cfg: Mapping, scale: float,
                  jobs: int | None = None) -> tuple[float, list[dict]]:  # fmt: skip
    """Mean Dice over every image when each fold is scored with the setting tuned on the other
    folds, and a row per held-out fold (fold, n_images, dice, setting)."""
    if len(oofs) < 2:
        raise ValueError("nested CV needs at least 2 folds")
    rows, total, n_total = [], 0.0, 0
    for i, k in enumerate(folds):
        inner = [j for j in range(len(oofs)) if j != i]
        _, setting = best_setting([oofs[j] for j in inner], tune_cfg, scale,
                                  [f"fold{folds[j]}" for j in inner], jobs)  # fmt: skip
        n, dice_sum = held_out_score(oofs[i], setting, scale, f"fold{k}")
        total, n_total = total + dice_sum, n_total + n
        rows.append({"fold": int(k), "n_images": n, "dice": dice_sum / n, "setting": setting})
    return total / n_total, rows
