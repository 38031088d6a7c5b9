"""Tune the post-processing on out-of-fold predictions -> ``runs/<exp>/postprocess.yaml``.

    python src/oof_tune.py --config configs/demo.yaml [section.key=value ...] [--force]

Reads the OOF maps of ``tune.folds``, or of every fold ``0..folds.n_folds-1`` (all must have
complete OOF files: tuning on a subset silently is an error), searches the ``tune`` grids (threshold × min_area; triplet top_threshold × top_area ×
bottom_threshold; each also with the aux-head gate when ``tune.cls_thresholds`` is set and the folds
have ``oof_cls.npy``) for the best mean competition Dice over all OOF images, and writes:

* ``postprocess.yaml``: the best setting (what predict.py applies); an existing file with other
  content is kept unless ``--force``;
* ``oof_report.csv``: per fold (and mean / std over folds, and pooled over all images) for the
  all-empty baseline, the raw 0.5 threshold and the best setting of each method: mean Dice,
  positive-only Dice, empty/non-empty accuracy, MMSeg-style mIoU / mDice;
* ``oof_grid.csv``: the mean Dice of every setting searched;
* ``oof_grid.png``: Dice heatmaps over threshold × min_area and top_threshold × top_area (at the
  best bottom threshold), best cells marked;
* ``report/``: CV Dice with a 95% bootstrap interval (over patients), ROC / PR curves, sensitivity,
  specificity, PPV, NPV at the tuned decision, Dice by lesion size, calibration: PNGs,
  ``metrics.json`` and a self-contained ``report.html``.

Areas in the grids and in postprocess.yaml are pixels at 1024²; they are scaled to the OOF size.
The Dice of the chosen setting is recomputed from scratch with ``apply_postprocess`` on every OOF
image and must match the search.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pneumoseg.cli import add_jobs, config_from_args, make_parser, run, setup_logging

log = logging.getLogger("oof_tune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "tune.folds=[0,1]")
    ap.add_argument("--force", action="store_true", help="overwrite a different postprocess.yaml")
    add_jobs(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.tuning import tune
    from pneumoseg.tuning.report import fold_summary, pooled_summary

    result = tune(config_from_args(args), force=args.force, jobs=args.jobs)
    log.info("mean ± std over folds %s:\n%s", result.folds, fold_summary(result.table))
    log.info(
        "MMSeg-style, intersection and union pooled over all %d OOF images' pixels "
        "(IoU/Dice per class, then the mean over background and pneumothorax):\n%s",
        result.n_images,
        pooled_summary(result.table),
    )
    log.info(
        "chose %s (%s): CV Dice %.4f ± %.4f -> %s",
        result.family, result.setting, result.cv_dice, result.cv_dice_std, result.postprocess,
    )  # fmt: skip
    if result.cv_dice_nested is not None:
        log.info("nested CV Dice (each fold scored with a setting tuned without it): %.4f",
                 result.cv_dice_nested)  # fmt: skip
    log.info("report %s: %s", result.report["html"], result.headline)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
