"""An experiment's folds file (``folds.file``): made from its training manifest, or imported.

:func:`make_folds` is the folds phase of the pipeline in one call (``src/make_folds.py`` is its
command line): without ``folds.import_from`` the training manifest is built from ``data.*`` and
split into ``folds.n_folds`` folds (:func:`pneumoseg.data.folds.make_folds`: stratified on mask
presence and area bins, grouped by patient); with it, a foreign folds file is imported instead
(ids checked against the manifest when ``data.root`` exists). The per-fold table and the patients
split across folds are logged and returned. An existing, different folds file is kept unless
``force``; an identical one is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pneumoseg.data import folds as _folds
from pneumoseg.errors import FoldsError, OutputExistsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldsResult:
    """What :func:`make_folds` made, and what it did with ``path``."""

    path: Path  # the folds file (folds.file)
    folds: pd.DataFrame  # id, fold, has_mask, area_bin, patient
    report: pd.DataFrame  # per fold, and "all": n_images, n_patients, positives, pos_rate, ...
    leakage: _folds.Leakage  # patients whose images sit in more than one fold
    imported: bool  # read from folds.import_from (not split here)
    written: bool  # False: an identical file was there and was left alone
    replaced: bool = False  # a different file was there and was overwritten (force)

    @property
    def n_cv(self) -> int:
        """Folds that are validated on (train-only images, fold -1, aside)."""
        return int(self.folds.loc[self.folds["fold"] >= 0, "fold"].nunique())

    @property
    def n_train_only(self) -> int:
        """Images trained on in every fold and never validated (imported files only)."""
        return int((self.folds["fold"] < 0).sum())

    def report_text(self) -> str:
        """The per-fold table as logged."""
        return _table(self.report)


def make_folds(cfg: Mapping[str, Any], force: bool = False) -> FoldsResult:
    """Make (or import) the folds of experiment config ``cfg`` and write them to ``folds.file``.

    Raises :class:`~pneumoseg.errors.OutputExistsError` when a different folds file is there and
    ``force`` is false (runs trained on the old folds would no longer match their OOF), and
    :class:`~pneumoseg.errors.FoldsError` for folds that cannot be made or imported.
    """
    fcfg, dcfg = cfg["folds"], cfg["data"]
    if fcfg["import_from"]:
        folds, manifest = _import(fcfg, dcfg)
    else:
        manifest = _build_manifest(dcfg)
        folds = _folds.make_folds(
            manifest, n_folds=fcfg["n_folds"], seed=fcfg["seed"], area_bins=fcfg["area_bins"]
        )
    report = _folds.fold_report(folds, manifest)
    log.info("per-fold table:\n%s", _table(report))
    leak = _folds.patients_split(folds)
    log.info("patients split across folds: %s", leak)
    if leak.patients:
        log.warning(
            "these folds leak patients between train and validation (e.g. %s): src/train.py "
            "refuses them unless folds.allow_patient_split=true",
            leak.examples,
        )
    out = Path(fcfg["file"])
    written, replaced = _write(folds, out, force)
    return FoldsResult(out, folds, report, leak, bool(fcfg["import_from"]), written, replaced)


def _table(report: pd.DataFrame) -> str:
    return report.to_string(float_format=lambda x: f"{x:.4g}")


def _import(fcfg: Mapping[str, Any], dcfg: Mapping[str, Any]):
    """``(folds, manifest or None)`` of ``folds.import_from``: ids checked against the manifest
    when ``data.root`` exists, patients from ``data.patient_map`` otherwise."""
    patient_map = None  # the manifest applies data.patient_map itself; imports without one need it
    if dcfg.get("patient_map"):
        patient_map = Path(dcfg["root"]) / dcfg["patient_map"]  # like data.py: relative to root
        if not patient_map.exists() and Path(dcfg["patient_map"]).exists():
            patient_map = Path(dcfg["patient_map"])
    manifest = None
    if Path(dcfg["root"]).is_dir():
        manifest = _build_manifest(dcfg)
    else:
        log.info("data.root %s not found: importing without an id check", dcfg["root"])
    folds = _folds.import_folds(
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
    return folds, manifest


def _write(folds: pd.DataFrame, out: Path, force: bool) -> tuple[bool, bool]:
    """Write ``folds`` to ``out`` unless an identical file is there -> ``(written, replaced)``;
    a different file is refused unless ``force``."""
    text = _folds.folds_csv(folds)
    replaced = False
    if out.exists():
        old = out.read_text(encoding="utf-8")
        if old == text:
            return False, False
        if not force:
            raise OutputExistsError(
                f"{out} exists and differs from these folds: pass --force to overwrite it (runs "
                "trained on the old folds then no longer match their OOF)"
            )
        log.warning("overwriting %s (--force)", out)
        replaced = True
    _folds.write_folds(folds, out)
    return True, replaced


def _build_manifest(dcfg: Mapping[str, Any]) -> pd.DataFrame:
    from pneumoseg.data.dataset import build_manifest

    return build_manifest(dcfg, split="train")
