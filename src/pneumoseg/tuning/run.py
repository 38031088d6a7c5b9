"""The tuning phase as one call: :func:`tune` (what ``src/oof_tune.py`` runs).

Reads the OOF maps of ``tune.folds``, or of every fold ``0..folds.n_folds-1`` (all must have
complete OOF files), searches the ``tune`` grids (and the model's ``tune.options``) for the best
mean competition Dice over all OOF images, checks the chosen setting against
``apply_postprocess`` recomputed from scratch, and writes ``postprocess.yaml`` with its report
(:data:`~pneumoseg.tuning.outputs.TUNING_FILES`) as one set, under the tuning's lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoseg.tuning.cv_report import write_cv_report
from pneumoseg.tuning.outputs import TUNING_FILES, write_outputs
from pneumoseg.tuning.report import compared_settings, describe, pooled_row, report_table
from pneumoseg.tuning.sources import fold_sources, map_size, tuned_folds, tuning_plan

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("oof_tune")


@dataclass(frozen=True)
class TuneResult:
    """What a tuning chose and wrote.

    ``params`` is ``postprocess.yaml`` as written (the setting plus its bookkeeping: ``cv_dice``,
    ``folds``, ``source``...), ``family`` the search family it came from (``threshold``,
    ``triplet``, ``...+gate``), ``table`` the report (``oof_report.csv``: per fold, mean / std
    and pooled ``all`` rows of each compared setting), ``grid`` every setting searched
    (``oof_grid.csv``) and ``files`` the paths written, by name.
    """

    exp_dir: Path
    family: str
    params: dict[str, Any]
    folds: list[int]
    n_images: int
    table: pd.DataFrame
    grid: pd.DataFrame
    files: dict[str, Path]
    report: dict[str, Path] = field(default_factory=dict)  # report/: plots, metrics.json, HTML
    headline: str = ""  # the report's numbers in one paragraph
    cv_dice_nested: float | None = None  # tuned on K-1 folds, scored on the held-out one

    @property
    def cv_dice(self) -> float:
        """Mean competition Dice of the chosen setting over all OOF images."""
        return self.params["cv_dice"]

    @property
    def cv_dice_std(self) -> float:
        """Standard deviation over the folds of their mean Dice."""
        return self.params["cv_dice_std"]

    @property
    def postprocess(self) -> Path:
        """The ``postprocess.yaml`` written (what prediction applies)."""
        return self.files["postprocess.yaml"]

    @property
    def setting(self) -> str:
        """The chosen setting in a few words, e.g. ``p>0.5, min_area 2048``."""
        return describe(self.params)


@dataclass
class _Found:
    """The search's outcome: the OOF maps it chose (the options' variant), every setting's
    Dice on them, the best row and the model options it needs."""

    oofs: list
    results: pd.DataFrame
    choice: pd.Series
    options: dict


def tune(cfg: dict, force: bool = False, jobs: int | None = None,
         report_cv: Mapping[str, float] | None = None) -> TuneResult:  # fmt: skip
    """Tune the post-processing of ``cfg``'s experiment (or blend) on its OOF maps and write
    ``<train.out_dir>/<exp>/postprocess.yaml`` with its report.

    An existing ``postprocess.yaml`` with another setting is kept (:class:`OutputExistsError`)
    unless ``force``; ``jobs`` search threads (default all cores). One tuning of an experiment
    at a time: another running one is refused (:class:`RunLockedError`). ``report_cv``: more
    named CV numbers for the report's table (the selection's nested CV of a selected blend).
    """
    from pneumoseg.locks import exclusive, lock_file_for

    exp_dir = Path(cfg["train"]["out_dir"]) / cfg["exp"]
    with exclusive(lock_file_for(exp_dir / "postprocess.yaml"), f"the tuning of {exp_dir}"):
        return _tune_locked(cfg, exp_dir, force, jobs, report_cv or {})


def _tune_locked(cfg: dict, exp_dir: Path, force: bool, jobs: int | None,
                 report_cv: Mapping[str, float]) -> TuneResult:  # fmt: skip
    from pneumoseg.io import recover_together, require_file_targets
    from pneumoseg.postprocessing.postprocess import area_scale_for, best_rows, row_params

    # a tuning killed half way is finished (committed) or dropped (not committed) first
    recover_together(exp_dir, "tuning", TUNING_FILES)
    require_file_targets(exp_dir, TUNING_FILES)
    members, blend, variants = tuning_plan(cfg)
    folds = tuned_folds(cfg, members, variants)
    names = [f"fold{k}" for k in folds]
    if blend:
        log.info("tuning the blend %s", ", ".join(f"{e} × {w:g}" for e, w in members))
    oofs = fold_sources(Path(cfg["train"]["out_dir"]), members, folds, "")
    size = map_size(oofs, exp_dir)
    scale = area_scale_for(size)
    n_images = sum(len(o.ids) for o in oofs)
    log.info(
        "%s: folds %s, %d OOF images at %d² (areas × %.4g from 1024²)",
        exp_dir, folds, n_images, size, scale,
    )  # fmt: skip

    found = search_variants(cfg, members, variants, folds, oofs, scale, jobs)
    best = best_rows(found.results)
    chosen = row_params(found.choice.to_dict())
    table = report_table(found.oofs, names, compared_settings(best), scale)
    check_recomputed(table, found.choice, chosen)

    params = tuned_params(cfg, found, chosen, size, folds, n_images, members, blend)
    title = f"{cfg['exp']}: OOF mean Dice, {n_images} images in folds {folds}"
    files = write_outputs(exp_dir, params, table, found.results, best, force=force, title=title)
    nested = _nested(cfg, found.oofs, folds, scale, jobs)
    # the report is derived from the set just written (rewritten by every tuning)
    report, line = write_cv_report(cfg, exp_dir, found.oofs, folds, params, str(cfg["exp"]),
                                   nested, report_cv)  # fmt: skip
    return TuneResult(exp_dir=exp_dir, family=str(found.choice["family"]), params=params,
                      folds=folds, n_images=n_images, table=table, grid=found.results,
                      files=files, report=report, headline=line, cv_dice_nested=nested)  # fmt: skip


def _nested(cfg: Mapping, oofs: list, folds: list[int], scale: float,
            jobs: int | None) -> float | None:  # fmt: skip
    """The nested CV Dice of the tuning (tuned on K-1 folds, scored on the held-out one)."""
    from pneumoseg.tuning.nested import nested_tuning

    if len(folds) < 2:
        return None
    dice, rows = nested_tuning(oofs, folds, cfg["tune"], scale, jobs)
    log.info("nested CV (tuned without the fold it scores): %.4f (%s)", dice,
             ", ".join(f"fold{r['fold']} {r['dice']:.4f}" for r in rows))  # fmt: skip
    return dice


def search_variants(cfg: Mapping, members, variants: Sequence[tuple[dict, str]],
                    folds: list[int], oofs: list, scale: float, jobs: int | None) -> _Found:  # fmt: skip
    """Search the ``tune`` grids on the maps as trained, then on the maps of each setting of
    the model's inference options (e.g. a detector's ``min_score``); the best one wins."""
    from pneumoseg.postprocessing.postprocess import pick_best, search

    tune_cfg, names = cfg["tune"], [f"fold{k}" for k in folds]
    out_root = Path(cfg["train"]["out_dir"])
    t0 = time.perf_counter()
    results = search(oofs, tune_cfg, area_scale=scale, names=names, n_jobs=jobs)
    found = _Found(oofs, results, pick_best(results), {})
    for opts, sub in variants[1:]:
        cand_oofs = fold_sources(out_root, members, folds, sub)
        cand = search(cand_oofs, tune_cfg, area_scale=scale, names=names, n_jobs=jobs)
        c = pick_best(cand)
        log.info("model options %s: best OOF Dice %.4f", opts, float(c["dice"]))
        if float(c["dice"]) > float(found.choice["dice"]):
            found = _Found(cand_oofs, cand, c, opts)
    log.info("searched %d settings in %.1f s", len(found.results) * len(variants),
             time.perf_counter() - t0)  # fmt: skip
    return found


def check_recomputed(table: pd.DataFrame, choice: pd.Series, chosen: dict) -> None:
    """The chosen setting, recomputed from scratch with apply_postprocess (the report's pooled
    row), must match the search."""
    pooled = pooled_row(table, f"best {choice['family']}")
    log.info(
        "chosen setting (%s: %s): search Dice %.6f, recomputed with apply_postprocess %.6f",
        choice["family"], describe(chosen), float(choice["dice"]), float(pooled["dice"]),
    )  # fmt: skip
    if abs(float(pooled["dice"]) - float(choice["dice"])) > 1e-9:
        raise RuntimeError(
            f"search Dice {float(choice['dice']):.9f} and recomputed Dice "
            f"{float(pooled['dice']):.9f} of {describe(chosen)} differ: a bug in the fast search"
        )


def tuned_params(cfg: Mapping, found: _Found, chosen: dict, size: int, folds: list[int],
                 n_images: int, members, blend: bool) -> dict:  # fmt: skip
    """``postprocess.yaml``: the chosen setting, its CV Dice and what it was tuned on."""
    from pneumoseg.postprocessing.postprocess import validate_params
    from pneumoseg.tuning.provenance import tuning_source

    choice = found.choice
    per_fold = [float(choice[f"dice_fold{k}"]) for k in folds]
    return validate_params(
        {
            **chosen,
            "oof_size": int(size),
            "cv_dice": round(float(choice["dice"]), 6),
            "cv_dice_std": round(float(choice["dice_std"]), 6),
            "cv_dice_folds": [round(d, 6) for d in per_fold],
            "folds": folds,
            "n_images": n_images,
            "exp": cfg["exp"],
            **({"experiments": [[e, w] for e, w in members]} if blend else {}),
            **({"model_options": found.options} if found.options else {}),
            "source": tuning_source(cfg, members, folds),
        }
    )
