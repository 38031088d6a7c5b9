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
from pathlib import Path

from pneumoseg.cli import config_from_args, make_parser, run, setup_logging

log = logging.getLogger("make_folds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "folds.n_folds=4")
    ap.add_argument("--force", action="store_true", help="overwrite a different folds file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.data.folds import (
        fold_report,
        folds_csv,
        import_folds,
        make_folds,
        patients_split,
        write_folds,
    )
    from pneumoseg.errors import FoldsError, OutputExistsError

    cfg = config_from_args(args)
    fcfg, dcfg = cfg["folds"], cfg["data"]
    out = Path(fcfg["file"])
    patient_map = None  # the manifest applies data.patient_map itself; imports without one need it
    if dcfg.get("patient_map"):
        patient_map = Path(dcfg["root"]) / dcfg["patient_map"]  # like data.py: relative to root
        if not patient_map.exists() and Path(dcfg["patient_map"]).exists():
            patient_map = Path(dcfg["patient_map"])

    manifest = None
    if fcfg["import_from"]:
        if Path(dcfg["root"]).is_dir():
            manifest = _build_manifest(dcfg)
        else:
            log.info("data.root %s not found: importing without an id check", dcfg["root"])
        folds = import_folds(
            fcfg["import_from"],
            manifest=manifest,
            patient_map=None if manifest is not None else patient_map,
            area_bins=fcfg["area_bins"],
        )
        log.info("imported %d ids from %s", len(folds), fcfg["import_from"])
        top = int(folds["fold"].max()) if len(folds) else -1
        if top >= int(fcfg["n_folds"]):
            raise FoldsError(
                f"{fcfg['import_from']} has folds 0..{top} but folds.n_folds={fcfg['n_folds']}: "
                f"set folds.n_folds={top + 1} in the experiment config"
            )
    else:
        manifest = _build_manifest(dcfg)
        folds = make_folds(
            manifest,
            n_folds=fcfg["n_folds"],
            seed=fcfg["seed"],
            area_bins=fcfg["area_bins"],
        )

    report = fold_report(folds, manifest)
    log.info("per-fold table:\n%s", report.to_string(float_format=lambda x: f"{x:.4g}"))
    leak = patients_split(folds)
    log.info("patients split across folds: %s", leak)
    if leak.patients:
        log.warning(
            "these folds leak patients between train and validation (e.g. %s): src/train.py "
            "refuses them unless folds.allow_patient_split=true",
            leak.examples,
        )

    text = folds_csv(folds)
    if out.exists():
        old = out.read_text(encoding="utf-8")
        if old == text:
            log.info("%s is already up to date: nothing written", out)
            return 0
        if not args.force:
            raise OutputExistsError(
                f"{out} exists and differs from these folds: pass --force to overwrite it (runs "
                "trained on the old folds then no longer match their OOF)"
            )
        log.warning("overwriting %s (--force)", out)
    write_folds(folds, out)
    n_cv = folds.loc[folds["fold"] >= 0, "fold"].nunique()
    n_train_only = int((folds["fold"] < 0).sum())
    extra = f", {n_train_only} train-only" if n_train_only else ""
    log.info("wrote %s (%d images, %d folds%s)", out, len(folds), n_cv, extra)
    return 0


def _build_manifest(dcfg: dict):
    from pneumoseg.data.dataset import build_manifest

    return build_manifest(dcfg, split="train")


if __name__ == "__main__":
    sys.exit(run(main))
