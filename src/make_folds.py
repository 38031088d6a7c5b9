"""Make (or import) the cross-validation folds -> ``folds.file`` (default folds/folds.csv).

    python src/make_folds.py [--config configs/x.yaml] [section.key=value ...] [--force]

Without ``folds.import_from`` the training manifest is built from ``data.*`` and split into
``folds.n_folds`` folds, stratified on mask presence and area bins and grouped by patient. With
``folds.import_from=path/to/2nd_stage_folds.csv`` a foreign folds file is imported instead (ids
checked against the manifest when ``data.root`` exists). Either way the per-fold table and the
number of patients split across folds are logged. An existing, different folds file is kept
unless ``--force``; an identical one is left alone.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pneumoseg.cli import config_from_args, make_parser, run, setup_logging

log = logging.getLogger("make_folds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "folds.n_folds=4")
    ap.add_argument("--force", action="store_true", help="overwrite a different folds file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.data.folds_file import make_folds

    result = make_folds(config_from_args(args), force=args.force)
    if not result.written:
        log.info("%s is already up to date: nothing written", result.path)
        return 0
    extra = f", {result.n_train_only} train-only" if result.n_train_only else ""
    log.info("wrote %s (%d images, %d folds%s)", result.path, len(result.folds), result.n_cv, extra)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
