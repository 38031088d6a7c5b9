"""Cross-validation folds: stratified on mask presence and area, grouped by patient.

* :func:`make_folds` assigns every image of a manifest to one of ``n_folds`` folds with
  :class:`sklearn.model_selection.StratifiedGroupKFold`: the stratum of an image is its mask-area
  bin (0 = empty), the group its patient, so no patient is ever on both sides of a split. A few
  shuffles (derived deterministically from ``seed``) are scored on how far each fold's positive
  rate, area-bin mix and size stray from the whole set, and the best is kept.
* :func:`import_folds` reads a foreign folds file: the 1st-place solution's ``fname,fold,
  exist_labels`` (``fname`` = ``<ImageId>.png``) or our own ``id,fold,...`` and checks its ids
  against a manifest.
* :func:`patients_split` counts patients that a fold file puts in more than one fold (leakage);
  :func:`fold_report` is the per-fold table the CLI logs.

The folds table (``folds/folds.csv``) has the columns ``id, fold, has_mask, area_bin, patient``.
``area_bin`` is the index of the bin in ``area_bins`` (edges in pixels at original size; bin 0 =
empty), or ``-1`` for a positive image whose mask area is unknown (e.g. imported folds without a
manifest); in that case the split is stratified on mask presence only for those images.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pneumoseg.errors import FoldsError

log = logging.getLogger(__name__)

FOLD_COLUMNS = ["id", "fold", "has_mask", "area_bin", "patient"]
DEFAULT_AREA_BINS = (0, 1, 2000, 8000, 25000)
UNKNOWN_AREA_BIN = -1
TRAIN_ONLY = -1  # fold of images trained on in every fold and never validated (imported files)

# column names accepted for the image id in foreign fold files, in order of preference
_ID_COLUMNS = ("id", "ImageId", "image_id", "fname", "Kaggle_ID", "filename")
_MASK_COLUMNS = ("has_mask", "exist_labels", "has_pneumo", "label")
_ID_SUFFIXES = (".png", ".dcm", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------
# area bins and patients
# --------------------------------------------------------------------------------------------
def area_bin(
    has_mask: Sequence | np.ndarray | pd.Series,
    mask_area: Sequence | np.ndarray | pd.Series | None,
    area_bins: Sequence[float] = DEFAULT_AREA_BINS,
) -> np.ndarray:
    """Bin index per image: 0 = empty, ``i`` = ``area_bins[i] <= area < area_bins[i+1]``.

    Positive images always get a bin >= 1 (an area of 0 on a positive counts as the smallest
    bin); a positive with a missing area gets :data:`UNKNOWN_AREA_BIN`.
    """
    edges = np.asarray(area_bins, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise FoldsError(f"area_bins must be >= 2 increasing edges, got {list(area_bins)}")
    has = np.asarray(has_mask, dtype=bool)
    if mask_area is None:
        area = np.full(len(has), np.nan)
    else:
        area = pd.to_numeric(pd.Series(np.asarray(mask_area, dtype=object)), errors="coerce")
        area = area.to_numpy(dtype=float)
    bins = np.searchsorted(edges, np.nan_to_num(area, nan=0.0), side="right") - 1
    bins = np.clip(bins, 1, len(edges) - 1)  # positives: at least the first non-empty bin
    bins = np.where(np.isnan(area), UNKNOWN_AREA_BIN, bins)
    return np.where(has, bins, 0).astype(np.int64)


def patient_from_nih(nih_id: str) -> str:
    """``00028864_007.png`` -> ``00028864`` (NIH ChestX-ray14 file name -> patient)."""
    return str(nih_id).split("_", 1)[0]


def load_patient_map(path: str | Path) -> pd.Series:
    """Read a ``Kaggle_ID,NIH_ID`` CSV (or ``id,patient``) into a Series id -> patient."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if {"Kaggle_ID", "NIH_ID"} <= set(df.columns):
        s = pd.Series(df["NIH_ID"].map(patient_from_nih).to_numpy(), index=df["Kaggle_ID"])
    elif {"id", "patient"} <= set(df.columns):
        s = pd.Series(df["patient"].to_numpy(), index=df["id"])
    else:
        raise FoldsError(
            f"{path}: patient map needs columns Kaggle_ID,NIH_ID or id,patient; "
            f"got {list(df.columns)}"
        )
    s = s[~s.index.duplicated(keep="first")]
    s.index.name = "id"
    return s.rename("patient")


def _as_patient_series(patient_map: Mapping | pd.Series | str | Path) -> pd.Series:
    if isinstance(patient_map, (str, Path)):
        return load_patient_map(patient_map)
    if isinstance(patient_map, pd.Series):
        return patient_map.astype(str)
    return pd.Series(dict(patient_map), dtype=object).astype(str)


def _patients(manifest: pd.DataFrame) -> pd.Series:
    """Patient per row; images without one are their own patient."""
    if "patient_id" in manifest.columns:
        p = manifest["patient_id"]
    elif "patient" in manifest.columns:
        p = manifest["patient"]
    else:
        p = pd.Series(np.nan, index=manifest.index)
    p = p.astype(object).where(p.notna() & (p.astype(str) != ""), None)
    missing = p.isna()
    if missing.any():
        log.warning(
            "%d of %d images have no patient id: each is treated as its own patient",
            int(missing.sum()),
            len(p),
        )
        p = p.where(~missing, "img:" + manifest["id"].astype(str))
    return p.astype(str)


# --------------------------------------------------------------------------------------------
# making folds
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Balance:
    """How far the folds stray from the whole set (fractions, not points)."""

    pos_rate: float  # max |positive rate of a fold - overall positive rate|
    bin_share: float  # max |share of a bin in a fold - overall share| (all bins, empty included)
    size: float  # max |fold size - n / K| / (n / K)

    @property
    def score(self) -> float:
        return self.pos_rate + 0.5 * self.bin_share + 0.05 * self.size


def balance(fold: np.ndarray, strata: np.ndarray, has_mask: np.ndarray, n_folds: int) -> Balance:
    fold = np.asarray(fold)
    has = np.asarray(has_mask, dtype=bool)
    strata = np.asarray(strata)
    n = len(fold)
    sizes = np.bincount(fold, minlength=n_folds).astype(float)
    pos = np.bincount(fold, weights=has, minlength=n_folds)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(sizes > 0, pos / sizes, np.nan)
    pos_dev = float(np.nanmax(np.abs(rates - has.mean()))) if n else 0.0
    _, s_idx = np.unique(strata, return_inverse=True)
    table = np.zeros((n_folds, s_idx.max() + 1 if n else 1))
    np.add.at(table, (fold, s_idx), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = table / np.maximum(sizes[:, None], 1.0)
    overall = table.sum(0) / max(n, 1)
    bin_dev = float(np.abs(share - overall).max()) if n else 0.0
    size_dev = float(np.abs(sizes - n / n_folds).max() / (n / n_folds)) if n else 0.0
    return Balance(pos_dev, bin_dev, size_dev)


def _split(strata: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(strata), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # rare strata are merged already; what is left (too few positives) is logged by the caller
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, test) in enumerate(sgkf.split(np.zeros(len(strata)), strata, groups)):
            fold[test] = k
    return fold


def make_folds(
    manifest: pd.DataFrame,
    n_folds: int = 5,
    seed: int = 42,
    area_bins: Sequence[float] = DEFAULT_AREA_BINS,
    n_trials: int = 8,
    tolerance: float = 0.005,
) -> pd.DataFrame:
    """Assign each manifest image to a fold -> DataFrame ``id, fold, has_mask, area_bin, patient``.

    ``manifest`` needs ``id`` and ``has_mask``; ``mask_area`` (pixels at original size) and
    ``patient_id`` are used when present (no patient = the image is its own patient; no area =
    stratify on mask presence only). Rows are sorted by id first, so the result depends only on
    the data and ``seed``. Up to ``n_trials`` shuffles are tried (the first with ``seed``
    itself); the first whose positive-rate deviation is within ``tolerance`` wins, otherwise the
    best-scoring one.
    """
    n_folds = _check_manifest(manifest, n_folds)
    m = manifest.sort_values("id", kind="mergesort").reset_index(drop=True)
    has = m["has_mask"].fillna(False).astype(bool).to_numpy()
    area = m["mask_area"] if "mask_area" in m.columns else None
    bins = area_bin(has, area, area_bins)
    patient = _patients(m)
    n_patients = patient.nunique()
    if n_patients < n_folds:
        raise FoldsError(
            f"only {n_patients} patients for {n_folds} folds: every fold needs at least one "
            f"patient (lower folds.n_folds or add images)"
        )
    n_pos = int(has.sum())
    if 0 < n_pos < n_folds:
        log.warning("only %d positive images for %d folds: some folds have none", n_pos, n_folds)

    # stratum: the area bin; bins too rare to spread over the folds merge into their neighbour
    # (sklearn warns when a class has fewer members than folds)
    strata = _merge_rare(bins, n_folds)
    groups = pd.factorize(patient, sort=True)[0]

    fold, bal, trial = _best_split(strata, groups, bins, has, n_folds, seed, n_trials, tolerance)
    log.info(
        "folds: %d images, %d patients, %d positives -> %d folds (trial %d; positive rate "
        "within %.2f points, area-bin shares within %.2f points, sizes within %.1f%%)",
        len(m),
        n_patients,
        n_pos,
        n_folds,
        trial,
        100 * bal.pos_rate,
        100 * bal.bin_share,
        100 * bal.size,
    )
    if (np.bincount(fold, minlength=n_folds) == 0).any():  # pragma: no cover - guarded above
        raise FoldsError("a fold came out empty")
    return pd.DataFrame(
        {
            "id": m["id"].astype(str).to_numpy(),
            "fold": fold,
            "has_mask": has.astype(np.int64),
            "area_bin": bins,
            "patient": patient.to_numpy(),
        }
    )


def _check_manifest(manifest: pd.DataFrame, n_folds: int) -> int:
    """Refuse a manifest :func:`make_folds` cannot split; ``n_folds`` as an int."""
    for col in ("id", "has_mask"):
        if col not in manifest.columns:
            raise FoldsError(f"manifest lacks column '{col}' (has {list(manifest.columns)})")
    if int(n_folds) != n_folds or n_folds < 2:
        raise FoldsError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    n_folds = int(n_folds)
    if manifest.empty:
        raise FoldsError("manifest is empty: nothing to split")
    dup = manifest["id"][manifest["id"].duplicated()]
    if len(dup):
        raise FoldsError(f"{len(dup)} duplicate ids in manifest, e.g. {dup.iloc[0]!r}")
    return n_folds


def _best_split(
    strata: np.ndarray,
    groups: np.ndarray,
    bins: np.ndarray,
    has: np.ndarray,
    n_folds: int,
    seed: int,
    n_trials: int,
    tolerance: float,
) -> tuple[np.ndarray, Balance, int]:
    """``(fold, balance, trial)`` of the best of up to ``n_trials`` shuffles: the first with
    ``seed`` itself, the others with seeds drawn from it (so the result depends on ``seed``
    only); the first within ``tolerance`` of the overall positive rate stops the search."""
    seeds = [int(seed)]
    if n_trials > 1:
        rng = np.random.default_rng(int(seed))
        seeds += [int(s) for s in rng.integers(0, 2**31 - 1, size=n_trials - 1)]
    best: tuple[float, np.ndarray, Balance, int] | None = None
    for i, s in enumerate(seeds):
        fold = _split(strata, groups, n_folds, s)
        bal = balance(fold, bins, has, n_folds)
        if best is None or bal.score < best[0]:
            best = (bal.score, fold, bal, i)
        if bal.pos_rate <= tolerance:
            break
    if best is None:  # pragma: no cover - n_trials >= 1 guarantees one candidate
        raise FoldsError("n_trials must be >= 1")
    _, fold, bal, trial = best
    return fold, bal, trial


def _merge_rare(bins: np.ndarray, n_folds: int) -> np.ndarray:
    """Merge strata with fewer than ``n_folds`` members into the next smaller non-empty bin."""
    strata = bins.copy()
    while True:
        values, counts = np.unique(strata, return_counts=True)
        rare = [v for v, c in zip(values, counts, strict=True) if c < n_folds and v > 0]
        if not rare or len(values) == 1:
            return strata
        v = max(rare)
        lower = values[(values < v) & (values > 0)]
        target = (
            lower.max() if len(lower) else (values[values > v].min() if (values > v).any() else v)
        )
        if target == v:
            return strata
        strata[strata == v] = target


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
def fold_report(folds: pd.DataFrame, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per fold (index ``fold`` plus an ``all`` row): n_images, n_patients, positives, pos_rate,
    mean_area (mean mask area of the positives; needs ``mask_area`` in ``folds`` or a manifest)."""
    df = folds.copy()
    if "mask_area" not in df.columns and manifest is not None and "mask_area" in manifest:
        df = df.merge(manifest[["id", "mask_area"]], on="id", how="left")
    if "patient" not in df.columns:
        df["patient"] = df["id"]
    has = df["has_mask"].fillna(0).astype(bool) if "has_mask" in df else pd.Series(False, df.index)
    df["_pos"] = has.astype(int)
    df["_area"] = (
        pd.to_numeric(df["mask_area"], errors="coerce").where(has) if "mask_area" in df else np.nan
    )

    def summarise(g: pd.DataFrame) -> dict:
        return {
            "n_images": len(g),
            "n_patients": g["patient"].nunique(),
            "positives": int(g["_pos"].sum()),
            "pos_rate": float(g["_pos"].mean()) if len(g) else np.nan,
            "mean_area": float(g["_area"].mean()) if g["_area"].notna().any() else np.nan,
        }

    rows = {int(k): summarise(g) for k, g in df.groupby("fold", sort=True)}
    rows["all"] = summarise(df)
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "fold"
    return out


@dataclass(frozen=True)
class Leakage:
    """Patients a fold file puts in more than one fold."""

    patients: int  # patients in more than one fold
    images: int  # images of those patients
    unmapped: int  # ids without a patient in the map (ignored)
    examples: tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.patients} patients ({self.images} images) in more than one fold"
        return s + (f"; {self.unmapped} ids without a patient" if self.unmapped else "")


def patients_split(
    folds: pd.DataFrame, patient_map: Mapping | pd.Series | str | Path | None = None
) -> Leakage:
    """Count patients whose images sit in more than one fold.

    ``folds`` needs ``id`` and ``fold``; patients come from ``patient_map`` (id -> patient, or the
    path of a ``Kaggle_ID,NIH_ID`` CSV) or else the folds' own ``patient`` column.
    """
    if patient_map is not None:
        pm = _as_patient_series(patient_map)
        patient = folds["id"].astype(str).map(pm)
    elif "patient" in folds.columns:
        patient = folds["patient"].astype(object).where(folds["patient"].notna(), None)
    else:
        raise FoldsError("patients_split needs a patient_map or a 'patient' column")
    known = patient.notna()
    df = pd.DataFrame({"fold": folds["fold"].to_numpy(), "patient": patient.to_numpy()})[
        known.to_numpy()
    ]
    n_folds = df.groupby("patient")["fold"].nunique()
    split = n_folds[n_folds > 1].index
    return Leakage(
        patients=len(split),
        images=int(df["patient"].isin(split).sum()),
        unmapped=int((~known).sum()),
        examples=tuple(sorted(map(str, split))[:5]),
    )


# --------------------------------------------------------------------------------------------
# reading / writing
# --------------------------------------------------------------------------------------------
def _strip_suffix(s: pd.Series) -> pd.Series:
    out = s.astype(str).str.strip()
    for suf in _ID_SUFFIXES:
        out = out.str.removesuffix(suf)
    return out


def fold_assignment(
    path: str | Path, n_folds: int, allow_patient_split: bool = False
) -> dict[str, int]:
    """``{id: fold}`` from a folds file written by ``make_folds.py``, checked strictly for training:

    folds are integers in ``0..n_folds-1`` (or -1, train-only), ids are unique, and no patient
    sits in two folds (that would leak between train and validation and inflate the CV) unless
    ``allow_patient_split`` (``folds.allow_patient_split``, e.g. to reproduce imported folds).
    Errors name the file and line.
    """
    from pneumoseg.io import read_csv

    path = Path(path)
    df = read_csv(path, "folds file", "make it with src/make_folds.py", dtype=str,
                  keep_default_na=False)  # fmt: skip
    df.columns = [str(c).strip() for c in df.columns]
    if "id" not in df.columns or "fold" not in df.columns:
        raise FoldsError(f"{path}: needs columns id and fold, has {list(df.columns)}")
    if df.empty:
        raise FoldsError(f"{path}: no rows; rebuild it with src/make_folds.py --force")
    line = pd.Series(np.arange(len(df)) + 2, index=df.index)  # header is line 1
    fold = df["fold"].str.strip()
    ok = fold.str.fullmatch(r"-?\d+")
    if not ok.all():
        i = ok.idxmin()
        raise FoldsError(
            f"{path}:{line[i]}: id {df['id'][i]!r} has fold {df['fold'][i]!r}; folds are integers "
            f"0..{n_folds - 1} (-1 = train-only)"
        )
    num = fold.astype(np.int64)
    bad = (num < TRAIN_ONLY) | (num >= n_folds)
    if bad.any():
        i = bad.idxmax()
        raise FoldsError(
            f"{path}:{line[i]}: fold {num[i]} is outside 0..{n_folds - 1} (folds.n_folds="
            f"{n_folds}); remake the folds with the same folds.n_folds as this config"
        )
    ids = df["id"].str.strip()
    dup = ids.duplicated(keep="first")
    if dup.any():
        i = dup.idxmax()
        first = line[ids[ids == ids[i]].index[0]]
        raise FoldsError(f"{path}:{line[i]}: id {ids[i]!r} already appears on line {first}")
    if "patient" in df.columns and not allow_patient_split:
        cv = num >= 0
        per = pd.DataFrame({"p": df["patient"][cv], "f": num[cv]}).groupby("p")["f"].nunique()
        split = per[per > 1]
        if len(split):
            p0 = split.index[0]
            where = sorted(set(num[cv & (df["patient"] == p0)].tolist()))
            raise FoldsError(
                f"{path}: {len(split)} patient(s) have images in more than one fold, e.g. patient "
                f"{p0!r} in folds {where}: validation would see patients trained on. Remake the "
                "folds with src/make_folds.py, or set folds.allow_patient_split=true to use "
                "them anyway (e.g. imported 1st-place folds)"
            )
    return dict(zip(ids, num.tolist(), strict=True))


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds CSV written by :func:`write_folds` (ids and patients kept as strings)."""
    return import_folds(path)


def import_folds(
    path: str | Path,
    manifest: pd.DataFrame | None = None,
    patient_map: Mapping | pd.Series | str | Path | None = None,
    area_bins: Sequence[float] = DEFAULT_AREA_BINS,
    allow_missing: bool = False,
) -> pd.DataFrame:
    """Read a folds CSV (ours or foreign) -> DataFrame ``id, fold, has_mask, area_bin, patient``.

    Accepted: our ``id,fold[,has_mask,area_bin,patient]`` and the 1st-place
    ``fname,fold,exist_labels`` (``fname`` = ``<ImageId>.png``; the suffix is dropped). With a
    ``manifest``, ids are checked against it: extra ids (not in the manifest) are dropped with a
    warning, missing ones (in the manifest, in no fold) are an error unless ``allow_missing``;
    ``has_mask``, ``area_bin`` and patients then come from the manifest, and disagreements with
    the file's labels are logged. Patients come from ``patient_map`` when given, else the
    manifest, else the file's ``patient`` column, else each image is its own patient. The result
    carries ``attrs["import"]`` = {"missing": [...], "extra": [...], "label_mismatch": n}.
    """
    path = Path(path)
    raw, id_col = _read_fold_file(path)
    df = pd.DataFrame({"id": _strip_suffix(raw[id_col])})
    df["fold"] = _fold_numbers(raw, path)
    _check_fold_ids(df, path)
    file_has = _file_mask_labels(raw)
    report: dict = {"missing": [], "extra": [], "label_mismatch": 0}
    if manifest is not None:  # the manifest is the truth for ids, labels, areas and patients
        df = _labels_from_manifest(df, manifest, file_has, path, area_bins, allow_missing, report)
    else:
        df = _labels_from_file(df, raw, file_has, area_bins)
    if patient_map is not None:
        df["patient"] = _mapped_patients(df, patient_map)
    df = df[FOLD_COLUMNS]
    df.attrs["import"] = report
    return df


def _read_fold_file(path: Path) -> tuple[pd.DataFrame, str]:
    """The file's cells as strings (column names stripped) and the name of its id column."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FoldsError(f"folds file not found: {path}") from None
    raw.columns = [c.strip() for c in raw.columns]
    id_col = next((c for c in _ID_COLUMNS if c in raw.columns), None)
    if id_col is None or "fold" not in raw.columns:
        raise FoldsError(
            f"{path}: need an id column ({', '.join(_ID_COLUMNS)}) and 'fold'; "
            f"got {list(raw.columns)}"
        )
    return raw, id_col


def _fold_numbers(raw: pd.DataFrame, path: Path) -> np.ndarray:
    """The ``fold`` column as int64; one non-numeric label at most, read as :data:`TRAIN_ONLY`."""
    fold = pd.to_numeric(raw["fold"], errors="coerce")
    bad = fold.notna() & ((fold % 1 != 0) | (fold < TRAIN_ONLY))
    if bad.any():
        raise FoldsError(f"{path}: folds must be integers >= 0, found {raw['fold'][bad].iloc[0]!r}")
    named = fold.isna()
    if named.any():
        # e.g. the 1st-place file's 'stage_2' rows (the stage-1 test images added in stage 2):
        # trained on in every fold, never validated
        labels = sorted(raw["fold"][named].unique())
        if len(labels) > 1 or labels == [""]:
            raise FoldsError(
                f"{path}: folds must be integers (one named train-only group at most), "
                f"found {labels[:5]}"
            )
        log.info(
            "%s: %d ids with fold %r are train-only (fold %d: in the training set of every fold)",
            path,
            int(named.sum()),
            labels[0],
            TRAIN_ONLY,
        )
    return fold.fillna(TRAIN_ONLY).astype(np.int64).to_numpy()


def _check_fold_ids(df: pd.DataFrame, path: Path) -> None:
    """Refuse repeated ids; warn about fold numbers that are not ``0..K-1``."""
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise FoldsError(f"{path}: {len(dup)} ids appear more than once, e.g. {dup.iloc[0]!r}")
    present = sorted(df.loc[df["fold"] != TRAIN_ONLY, "fold"].unique())
    if present != list(range(len(present))):
        log.warning("%s: fold numbers are %s, not 0..K-1", path, present)


def _file_mask_labels(raw: pd.DataFrame) -> np.ndarray | None:
    """The file's own mask labels (bool per row), None when it has no such column."""
    mask_col = next((c for c in _MASK_COLUMNS if c in raw.columns), None)
    return (
        pd.to_numeric(raw[mask_col], errors="coerce").fillna(0).astype(bool).to_numpy()
        if mask_col
        else None
    )


def _labels_from_manifest(
    df: pd.DataFrame,
    manifest: pd.DataFrame,
    file_has: np.ndarray | None,
    path: Path,
    area_bins: Sequence[float],
    allow_missing: bool,
    report: dict,
) -> pd.DataFrame:
    """The file's rows whose ids the manifest knows, with the manifest's ``has_mask``,
    ``area_bin`` and patients; fills ``report`` (extra and missing ids, label mismatches)."""
    mids = manifest["id"].astype(str)
    known = _match_manifest_ids(df, mids, path, allow_missing, report)
    if file_has is not None:
        file_has = file_has[known.to_numpy()]
    df = df[known].reset_index(drop=True)
    m = manifest.assign(id=mids).set_index("id").loc[df["id"]]
    has = m["has_mask"].fillna(False).astype(bool).to_numpy()
    if file_has is not None:
        report["label_mismatch"] = int((file_has != has).sum())
        if report["label_mismatch"]:
            log.warning(
                "%s: %d images' mask labels differ from the manifest (manifest wins)",
                path,
                report["label_mismatch"],
            )
    area = m["mask_area"].to_numpy() if "mask_area" in m.columns else None
    df["has_mask"] = has.astype(np.int64)
    df["area_bin"] = area_bin(has, area, area_bins)
    df["patient"] = _patients(m.reset_index()).to_numpy()
    return df


def _match_manifest_ids(
    df: pd.DataFrame, mids: pd.Series, path: Path, allow_missing: bool, report: dict
) -> pd.Series:
    """Which of the file's ids the manifest knows. Extra ids are dropped with a warning;
    manifest ids in no fold are an error unless ``allow_missing``."""
    known = df["id"].isin(set(mids))
    extra = df.loc[~known, "id"].tolist()
    missing = sorted(set(mids) - set(df["id"]))
    report["extra"], report["missing"] = extra, missing
    if extra:
        log.warning(
            "%s: %d ids are not in the manifest and are dropped (e.g. %s)",
            path,
            len(extra),
            extra[0],
        )
    if missing:
        msg = f"{path}: {len(missing)} manifest ids are in no fold (e.g. {missing[0]})"
        if not allow_missing:
            raise FoldsError(msg)
        log.warning(msg)
    return known


def _labels_from_file(
    df: pd.DataFrame, raw: pd.DataFrame, file_has: np.ndarray | None, area_bins: Sequence[float]
) -> pd.DataFrame:
    """Without a manifest: the file's own labels, area bins and patients (else: no mask, area
    unknown, each image its own patient)."""
    has = file_has if file_has is not None else np.zeros(len(df), dtype=bool)
    df["has_mask"] = has.astype(np.int64)
    if "area_bin" in raw.columns:
        df["area_bin"] = pd.to_numeric(raw["area_bin"], errors="coerce").fillna(UNKNOWN_AREA_BIN)
        df["area_bin"] = df["area_bin"].astype(np.int64).to_numpy()
    else:
        df["area_bin"] = area_bin(has, None, area_bins)
    df["patient"] = raw["patient"].to_numpy() if "patient" in raw.columns else df["id"].to_numpy()
    return df


def _mapped_patients(df: pd.DataFrame, patient_map: Mapping | pd.Series | str | Path) -> pd.Series:
    """Patients from ``patient_map``; ids it lacks keep the patient they have."""
    pm = _as_patient_series(patient_map)
    mapped = df["id"].map(pm)
    if mapped.isna().any():
        log.warning(
            "%d of %d ids are not in the patient map: kept with their own patient",
            int(mapped.isna().sum()),
            len(df),
        )
    return mapped.fillna(df["patient"]).astype(str)


def folds_csv(folds: pd.DataFrame) -> str:
    """The canonical CSV text of a folds table (sorted by id; what :func:`write_folds` writes)."""
    df = folds[FOLD_COLUMNS].sort_values("id", kind="mergesort")
    df = df.astype({"fold": np.int64, "has_mask": np.int64, "area_bin": np.int64})
    return df.to_csv(index=False, lineterminator="\n")


def write_folds(folds: pd.DataFrame, path: str | Path) -> Path:
    from pneumoseg.io import atomic_write

    with atomic_write(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(folds_csv(folds))
    return Path(path)
