"""Datasets: manifests for each data layout, and the torch Dataset over the preprocessing cache.

A **manifest** is one row per image with the columns in :data:`MANIFEST_COLUMNS`:

``id`` Kaggle ImageId (SOPInstanceUID = DICOM file stem, or ``ID_xxxxxxxxx`` in stage 2) ·
``image_path`` · ``has_mask`` (the image has a pneumothorax; False when there is no truth) ·
``mask_area`` (pixels at original size) · ``n_instances`` (RLE rows; connected components for PNG
masks) · ``patient_id`` · ``view`` · ``sex`` · ``age`` (years, NaN unknown) · ``height``/``width``
(original size) · ``source`` (``siim``/``png``) · ``mask_path`` (png layout) · ``rle_csv`` (the RLE
CSV holding this image's rows, ``""`` if none) · ``rle_format`` (``relative``/``absolute``).

Layouts (``data.layout``):

* ``siim``: the Kaggle DICOM tree ``root/train_images`` (nested ``<study>/<series>/<id>.dcm`` or
  flat) + the RLE CSV ``root/rle_csv``; test: ``root/test_images`` + optional ``root/test_rle_csv``.
* ``png``: vbookshelf's ``png_images/``, ``png_masks/`` and ``stage_1_{train,test}_images.csv``
  (``new_filename,ImageId,has_pneumo``).

Patients: with ``data.patient_map`` (``Kaggle_ID,NIH_ID``), ``patient_id`` is the NIH file name's
prefix (``00028864_007.png`` -> ``00028864``); otherwise the DICOM PatientID (a per-image UUID in the
real data: it groups nothing) or, for PNGs, the ImageId.

Problems (missing files, images not in the CSV, corrupt DICOMs, RLEs that do not fit, odd sizes) are
collected while building, logged as one summary with counts and the first few names, and the bad
rows left out; ``strict`` turns the summary into a ``ValueError``. Odd-sized images are reported but
kept (everything downstream works at each row's own ``height``/``width``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pneumoseg import io as pio
from pneumoseg.data import intake
from pneumoseg.data.rle import read_rle_csv, rle_decode, union_mask
from pneumoseg.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

# ==================================================================================================
# Manifest schema
# ==================================================================================================
MANIFEST_COLUMNS: tuple[str, ...] = (
    "id",
    "image_path",
    "has_mask",
    "mask_area",
    "n_instances",
    "patient_id",
    "view",
    "sex",
    "age",
    "height",
    "width",
    "source",
    "mask_path",
    "rle_csv",
    "rle_format",
)
_STR_COLS = ("id", "image_path", "patient_id", "view", "sex", "source", "mask_path", "rle_csv")
_INT_COLS = ("mask_area", "n_instances", "height", "width")
SPLITS = ("train", "test")
RLE_FORMATS = ("relative", "absolute")
_SHOW = 5  # names listed per problem kind in the summary


def _empty_manifest() -> pd.DataFrame:
    return _coerce(pd.DataFrame({c: [] for c in MANIFEST_COLUMNS}))


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Column order and dtypes of a manifest (str / bool / int64 / float64)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    df = df.loc[:, list(MANIFEST_COLUMNS)].copy()
    for c in (*_STR_COLS, "rle_format"):
        df[c] = df[c].fillna("").astype(str)
    for c in _INT_COLS:
        df[c] = df[c].astype(np.int64)
    df["has_mask"] = df["has_mask"].map(_to_bool).astype(bool)
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype(np.float64)
    return df.reset_index(drop=True)


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


# ==================================================================================================
# Problem collection
# ==================================================================================================
_KINDS = {
    # kind: (description, excluded from the manifest?)
    "missing": ("listed id(s) with no image file", True),
    "unlisted": ("image file(s) not listed in the CSV", True),
    "unlisted_test": ("test image(s) with no truth rows (kept, no truth)", False),
    "duplicate": ("duplicate id(s) on disk (first file kept)", True),
    "unreadable": ("unreadable or corrupt image(s)", True),
    "bad_mask": ("mask(s) that do not fit their image", True),
    "size": ("image(s) of unexpected size (kept)", False),
    "label_mismatch": ("has_pneumo label(s) contradicting the mask (kept, mask wins)", False),
}


@dataclass
class ManifestProblems:
    """Problems found while building a manifest: ``kind -> [(name, detail)]``."""

    where: str
    items: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, kind: str, name: str, detail: str = "") -> None:
        if kind not in _KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.items.setdefault(kind, []).append((name, detail))

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return sum(len(v) for v in self.items.values())
        return len(self.items.get(kind, []))

    def __bool__(self) -> bool:
        return self.count() > 0

    def summary(self) -> str:
        lines = [f"{self.where}: {self.count()} problem(s)"]
        for kind, (text, _) in _KINDS.items():
            entries = self.items.get(kind, [])
            if not entries:
                continue
            if kind == "bad_mask":  # each is a row to fix (CSV line, ImageId, why): list all
                lines.append(f"  {len(entries)} {text}:")
                lines.extend(f"    {n}: {d}" if d else f"    {n}" for n, d in entries)
                continue
            shown = [f"{n} ({d})" if d else n for n, d in entries[:_SHOW]]
            more = f", ... and {len(entries) - _SHOW} more" if len(entries) > _SHOW else ""
            lines.append(f"  {len(entries)} {text}: {', '.join(shown)}{more}")
        return "\n".join(lines)


# ==================================================================================================
# Helpers
# ==================================================================================================
def data_defaults() -> dict[str, Any]:
    """The ``data:`` section of configs/base.yaml: the one place defaults live."""
    from pneumoseg.defaults import base_defaults

    return dict(base_defaults()["data"])


def _resolve_cfg(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**data_defaults(), **dict(data_cfg)}
    if cfg["layout"] not in ("siim", "png"):
        raise ValueError(f"data.layout must be 'siim' or 'png', got {cfg['layout']!r}")
    if cfg["rle_format"] not in RLE_FORMATS:
        raise ValueError(f"data.rle_format must be one of {RLE_FORMATS}, got {cfg['rle_format']!r}")
    return cfg


def dataset_name(data_cfg: Mapping[str, Any]) -> str:
    """Name of the dataset: the folder name of ``data.root`` (``data/siim`` -> ``siim``), with
    ``-png`` appended for the png layout (a folder holding both layouts gets two caches)."""
    root = Path(str(data_cfg.get("root") or data_defaults()["root"]))
    name = root.resolve().name or "data"
    return f"{name}-png" if data_cfg.get("layout") == "png" else name


def _under(root: Path, rel: str | os.PathLike | None) -> Path | None:
    if rel is None or str(rel) == "":
        return None
    return root / rel  # an absolute ``rel`` wins over ``root``


def _parallel_map(
    fn: Callable[[Any], Any], items: Sequence[Any], n_jobs: int, desc: str
) -> list[tuple[bool, Any]]:
    """``fn`` over ``items`` in joblib threads with a tqdm bar; ``(ok, result_or_error_text)``."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    def safe(x):
        try:
            return True, fn(x)
        except Exception as e:
            return False, str(e)

    if not items:
        return []
    n_jobs = max(1, min(int(n_jobs), len(items)))
    # warnings filters are process-global (catch_warnings inside threads races): silence pydicom's
    # truncation warnings here, once, around all threads; the problems are reported by us.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        gen = Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")(
            delayed(safe)(x) for x in items
        )
        return list(tqdm(gen, total=len(items), desc=desc, unit="img", disable=None, leave=False))


def _default_threads() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


# ==================================================================================================
# Patients
# ==================================================================================================
def load_patient_map(path: str | Path) -> dict[str, str]:
    """``Kaggle_ID,NIH_ID`` CSV -> ``{Kaggle_ID: patient}`` with the NIH name's prefix as patient."""
    path = Path(path)
    df = pio.read_csv(path, "patient map (data.patient_map)", dtype=str, keep_default_na=False,
                      encoding="utf-8-sig")  # fmt: skip
    cols = {c.strip().lower(): c for c in df.columns}
    if "kaggle_id" not in cols or "nih_id" not in cols:
        raise DataError(f"{path}: expected columns Kaggle_ID,NIH_ID, got {list(df.columns)}")
    kaggle = df[cols["kaggle_id"]].str.strip()
    patient = df[cols["nih_id"]].str.strip().str.split("_", n=1).str[0]
    return dict(zip(kaggle, patient, strict=True))


def _apply_patient_map(rows: list[dict], cfg: Mapping[str, Any], root: Path, split: str) -> None:
    map_path = _under(root, cfg.get("patient_map"))
    if map_path is None or not rows:
        return
    pmap = load_patient_map(map_path)
    uncovered = 0
    for r in rows:
        p = pmap.get(r["id"])
        if p:
            r["patient_id"] = p
        else:
            uncovered += 1
    if uncovered:
        # The real map covers the train images only: test ids falling back is expected.
        (log.warning if split == "train" else log.info)(
            "patient map %s covers %d/%d ids; the other %d keep their DICOM PatientID/ImageId",
            map_path,
            len(rows) - uncovered,
            len(rows),
            uncovered,
        )
    else:
        log.info("patient map %s covers all %d ids", map_path, len(rows))


# ==================================================================================================
# Layout: siim (DICOM tree + RLE CSV)
# ==================================================================================================
def _find_dicoms(folder: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(folder, followlinks=True):
        for f in files:
            if f.lower().endswith(pio.DICOM_SUFFIXES) and not f.startswith("."):
                out.append(Path(dirpath) / f)
    return sorted(out)


def _siim_rows(
    cfg: dict, root: Path, split: str, problems: ManifestProblems, n_jobs: int
) -> list[dict]:
    img_dir = _under(root, cfg["train_images"] if split == "train" else cfg["test_images"])
    if img_dir is None or not img_dir.is_dir():
        raise MissingFileError(f"DICOM folder not found: {img_dir} (data.root={root})")
    csv_path = _under(root, cfg["rle_csv"] if split == "train" else cfg["test_rle_csv"])
    relative = cfg["rle_format"] == "relative"

    by_id = _dicoms_by_id(img_dir, problems)
    log.info("%s: %d DICOM file(s) under %s", split, len(by_id), img_dir)

    truth: dict[str, list[str]] | None = None
    row_lines: dict[str, list[int]] = {}  # ImageId -> CSV line of each of its RLE rows
    if csv_path is not None:
        truth = read_rle_csv(csv_path, shape=None, relative=relative, lines=row_lines)
        log.info("%s: %d id(s) in %s", split, len(truth), csv_path)
        _report_csv_vs_dicoms(truth, by_id, csv_path, split, problems)
        if split == "train":
            by_id = {i: p for i, p in by_id.items() if i in truth}
    elif split == "train":
        raise ConfigError("data.rle_csv is required for the train split of the siim layout")

    ids = sorted(by_id)
    src = _RleSource(csv_path, row_lines, relative, cfg["rle_format"])

    def work(image_id: str) -> dict:
        rles = truth.get(image_id) if truth is not None else None
        return _siim_row(image_id, by_id[image_id], rles, src)

    rows = []
    results = _parallel_map(_tagged(work), ids, n_jobs, f"{split} DICOM headers")
    for image_id, (ok, res) in zip(ids, results, strict=True):
        if ok:
            rows.append(res)
        elif res.startswith(_MaskError.PREFIX):
            problems.add("bad_mask", f"{image_id}.dcm", res[len(_MaskError.PREFIX) :])
        else:
            problems.add("unreadable", by_id[image_id].name, _short(res, by_id[image_id]))
    return rows


def _dicoms_by_id(img_dir: Path, problems: ManifestProblems) -> dict[str, Path]:
    """``{ImageId (file stem): path}`` of the DICOMs under ``img_dir``; a second file of the
    same id is reported as a duplicate and left out."""
    by_id: dict[str, Path] = {}
    for p in _find_dicoms(img_dir):
        if p.stem in by_id:
            problems.add("duplicate", p.name, str(p.parent))
            continue
        by_id[p.stem] = p
    return by_id


def _report_csv_vs_dicoms(
    truth: dict[str, list[str]],
    by_id: dict[str, Path],
    csv_path: Path,
    split: str,
    problems: ManifestProblems,
) -> None:
    """Report ids of the RLE CSV without a DICOM, and DICOMs the CSV does not list."""
    for image_id in truth:
        if image_id not in by_id:
            problems.add("missing", f"{image_id}.dcm", f"listed in {csv_path.name}")
    for image_id, p in by_id.items():
        if image_id not in truth:
            kind = "unlisted" if split == "train" else "unlisted_test"
            problems.add(kind, p.name, f"not in {csv_path.name}")


@dataclass(frozen=True)
class _RleSource:
    """Where the images' RLE rows come from: the CSV (None without one), the CSV line of each
    of an image's rows, and the RLE form."""

    csv_path: Path | None
    lines: dict[str, list[int]]
    relative: bool
    rle_format: str


def _siim_row(image_id: str, path: Path, rles: list[str] | None, src: _RleSource) -> dict:
    """The manifest row of one DICOM (worker: header tags, and the mask area from ``rles``,
    None when the image is in no CSV)."""
    tags = intake.check_dicom(path)
    h, w = tags["Rows"], tags["Columns"]
    area = _rle_area(image_id, rles, h, w, src) if rles else 0
    return {
        "id": image_id,
        "image_path": str(path),
        "has_mask": area > 0,
        "mask_area": area,
        "n_instances": len(rles) if rles else 0,
        # Stage-2 test DICOMs have an empty PatientID: each image is then its own patient.
        "patient_id": tags["PatientID"] or image_id,
        "view": tags["ViewPosition"],
        "sex": tags["PatientSex"],
        "age": tags["PatientAge"],
        "height": h,
        "width": w,
        "source": "siim",
        "mask_path": "",
        "rle_csv": str(src.csv_path) if (rles is not None and src.csv_path is not None) else "",
        "rle_format": src.rle_format,
    }


def _rle_area(image_id: str, rles: list[str], h: int, w: int, src: _RleSource) -> int:
    """Mask pixels of the union of ``rles`` on an ``h``×``w`` image; an RLE that does not fit
    is a :class:`_MaskError` naming its CSV line."""
    try:
        return int(union_mask(rles, (h, w), src.relative).sum(dtype=np.int64))
    except ValueError:
        # Name the row that does not fit this image: "<csv>:<line>: ImageId <id>: why".
        for k, rle in enumerate(rles):
            try:
                rle_decode(rle, (h, w), src.relative)
            except ValueError as e:
                at = src.lines.get(image_id, [])
                where = f"{src.csv_path}:{at[k]}" if k < len(at) else str(src.csv_path)
                why = str(e)
                likely = getattr(e, "likely", None)  # valid in the other RLE form
                if likely:
                    why = f"{e.reason}; it looks like {likely} RLE: "
                    why += f"set data.rle_format={likely}"
                raise _MaskError(f"{where}: ImageId {image_id}: {why}") from None
        raise


class _MaskError(ValueError):
    PREFIX = "\x00mask:"


def _tagged(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Mark mask errors so that ``_parallel_map``'s string results keep the kind."""

    def inner(x):
        try:
            return fn(x)
        except _MaskError as e:
            raise ValueError(f"{_MaskError.PREFIX}{e}") from None

    return inner


def _short(text: str, path: Path) -> str:
    """Error text without the (already shown) file path, first line, clipped."""
    text = text.replace(f"{path}: ", "").replace(str(path), "").strip().splitlines()[0]
    return text[:160]


# ==================================================================================================
# Layout: png (vbookshelf)
# ==================================================================================================
def _png_rows(
    cfg: dict, root: Path, split: str, problems: ManifestProblems, n_jobs: int
) -> list[dict]:
    index_path = _under(root, cfg["train_index"] if split == "train" else cfg["test_index"])
    img_dir = _under(root, cfg["train_images"] if split == "train" else cfg["test_images"])
    mask_dir = _under(root, cfg["train_masks"])
    index = _read_png_index(index_path, img_dir, root)
    log.info("%s: %d row(s) in %s", split, len(index), index_path)
    _report_unlisted_pngs(index, img_dir, index_path, split, problems)
    entries = _png_entries(index, img_dir, index_path, problems)

    def work(entry: tuple[str, str, str]) -> dict:
        return _png_row(entry[0], entry[1], img_dir, mask_dir, split, cfg["rle_format"])

    rows = []
    results = _parallel_map(_tagged(work), entries, n_jobs, f"{split} PNG masks")
    for (fname, _image_id, label), (ok, res) in zip(entries, results, strict=True):
        if not ok:
            if res.startswith(_MaskError.PREFIX):
                problems.add("bad_mask", fname, res[len(_MaskError.PREFIX) :])
            else:
                problems.add("unreadable", fname, _short(res, img_dir / fname))
            continue
        if label in ("0", "1") and res["mask_path"] and (label == "1") != res["has_mask"]:
            problems.add(
                "label_mismatch", fname, f"has_pneumo={label}, mask area {res['mask_area']}"
            )
        rows.append(res)
    return rows


def _read_png_index(index_path: Path | None, img_dir: Path | None, root: Path) -> pd.DataFrame:
    """The ``new_filename,ImageId[,has_pneumo]`` index CSV (cells as strings, names stripped),
    once the index and the image folder are known to exist."""
    if index_path is None or not index_path.is_file():
        raise MissingFileError(f"png index CSV not found: {index_path} (data.root={root})")
    if img_dir is None or not img_dir.is_dir():
        raise MissingFileError(f"png image folder not found: {img_dir} (data.root={root})")
    index = pio.read_csv(index_path, "png index CSV", dtype=str, keep_default_na=False,
                         encoding="utf-8-sig")  # fmt: skip
    index.columns = [c.strip() for c in index.columns]
    need = {"new_filename", "ImageId"}
    if not need <= set(index.columns):
        raise DataError(
            f"{index_path}: expected columns new_filename,ImageId[,has_pneumo], got {list(index.columns)}"
        )
    return index


def _report_unlisted_pngs(
    index: pd.DataFrame, img_dir: Path, index_path: Path, split: str, problems: ManifestProblems
) -> None:
    """Report the split's PNGs in ``img_dir`` (``_<split>_`` in the name) that the index lacks."""
    listed = set(index["new_filename"].str.strip())
    marker = f"_{split}_"
    for f in sorted(os.listdir(img_dir)):
        if marker in f and f.lower().endswith(".png") and f not in listed:
            problems.add("unlisted", f, f"not in {index_path.name}")


def _png_entries(
    index: pd.DataFrame, img_dir: Path, index_path: Path, problems: ManifestProblems
) -> list[tuple[str, str, str]]:
    """``(file name, ImageId, has_pneumo label)`` per index row whose image exists; a repeated
    ImageId or a missing file is reported and left out."""
    entries: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for fname, image_id, label in zip(
        index["new_filename"].str.strip(),
        index["ImageId"].str.strip(),
        index.get("has_pneumo", pd.Series([""] * len(index))),
        strict=True,
    ):
        if image_id in seen:
            problems.add("duplicate", fname, f"ImageId {image_id} listed twice")
            continue
        seen.add(image_id)
        if not (img_dir / fname).is_file():
            problems.add("missing", fname, f"listed in {index_path.name}")
            continue
        entries.append((fname, image_id, str(label).strip()))
    return entries


def _png_row(
    fname: str, image_id: str, img_dir: Path, mask_dir: Path | None, split: str, rle_format: str
) -> dict:
    """The manifest row of one PNG (worker: image size, and the mask's area and connected
    components; a train image needs its mask)."""
    path = img_dir / fname
    h, w = pio.png_size(path)
    mpath = mask_dir / fname if mask_dir is not None else None
    area = n_inst = 0
    has_truth = mpath is not None and mpath.is_file()
    if not has_truth and split == "train":
        raise _MaskError(f"mask file not found: {mpath}")
    if has_truth:
        mask = intake.read_mask_png(mpath)
        if mask.shape != (h, w):
            raise _MaskError(f"mask {mask.shape[0]}x{mask.shape[1]} != image {h}x{w}")
        area = int(mask.sum(dtype=np.int64))
        if area:
            n_inst = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)[0] - 1
    return {
        "id": image_id,
        "image_path": str(path),
        "has_mask": area > 0,
        "mask_area": area,
        "n_instances": int(n_inst),
        "patient_id": image_id,
        "view": "",
        "sex": "",
        "age": math.nan,
        "height": h,
        "width": w,
        "source": "png",
        "mask_path": str(mpath) if has_truth else "",
        "rle_csv": "",
        "rle_format": rle_format,
    }


# ==================================================================================================
# Building, saving, loading
# ==================================================================================================
def build_manifest(
    data_cfg: Mapping[str, Any],
    split: str = "train",
    strict: bool | None = None,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Scan the dataset described by the ``data:`` config section into a manifest DataFrame.

    ``strict`` (default ``data.strict``): raise ``ValueError`` with the problem summary instead of
    logging it and leaving the bad rows out. ``n_jobs``: threads reading headers (default
    ``min(32, 4 × cores)``). Rows are sorted by ``id``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = _resolve_cfg(data_cfg)
    strict = bool(cfg["strict"]) if strict is None else bool(strict)
    root = Path(str(cfg["root"]))
    if not root.is_dir():
        raise MissingFileError(
            f"data.root not found: {root} (run from the repo root, or fix data.root)"
        )
    problems = ManifestProblems(f"manifest ({cfg['layout']} layout, {split} split, {root})")
    n_jobs = n_jobs or _default_threads()

    if cfg["layout"] == "siim":
        rows = _siim_rows(cfg, root, split, problems, n_jobs)
    else:
        rows = _png_rows(cfg, root, split, problems, n_jobs)

    size = cfg.get("original_size")
    if size:
        for r in rows:
            if (r["height"], r["width"]) != (int(size), int(size)):
                name = Path(r["image_path"]).name
                problems.add("size", name, f"{r['height']}x{r['width']}, expected {size}x{size}")

    _apply_patient_map(rows, cfg, root, split)
    df = _coerce(pd.DataFrame(rows)) if rows else _empty_manifest()
    df = df.sort_values("id", kind="stable").reset_index(drop=True)

    if problems:
        text = problems.summary()
        if strict:
            raise DataError(f"{text}\n(strict mode: fix the data or set data.strict=false)")
        excluded = sum(len(v) for k, v in problems.items.items() if _KINDS[k][1])
        log.warning("%s\n  -> %d row(s) left out; %d kept", text, excluded, len(df))
    log.info(
        "%s manifest: %d image(s), %d with a mask, %d patient(s)",
        split,
        len(df),
        int(df["has_mask"].sum()),
        df["patient_id"].nunique(),
    )
    return df


def save_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest CSV atomically (columns checked and ordered)."""
    df = _coerce(df)
    with pio.atomic_write(path, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    return Path(path)


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV written by :func:`save_manifest` with the right dtypes."""
    path = Path(path)
    try:
        df = pd.read_csv(
            path,
            dtype={c: str for c in (*_STR_COLS, "rle_format")},
            keep_default_na=False,
            na_values={"age": ["", "nan", "NaN"]},
        )
    except FileNotFoundError:
        raise MissingFileError(f"manifest not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a valid manifest ({type(e).__name__})") from None
    try:
        return _coerce(df)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: not a valid manifest: {e}") from None


# ==================================================================================================
# Per-row readers (image and mask at original size)
# ==================================================================================================
def _get(row: Mapping[str, Any] | pd.Series, key: str) -> Any:
    if key == "id" and isinstance(row, pd.Series) and "id" not in row.index:
        return row.name  # a row of ``manifest.set_index("id")``
    try:
        return row[key]
    except KeyError:
        raise KeyError(f"manifest row lacks column {key!r}") from None


@functools.lru_cache(maxsize=8)
def _rle_table(path: str, mtime_ns: int, relative: bool) -> dict[str, list[str]]:
    # Validated when the manifest was built; here only parsed (shape=None).
    return read_rle_csv(path, shape=None, relative=relative)


def rle_table(path: str | Path, relative: bool = True) -> dict[str, list[str]]:
    """``read_rle_csv`` cached per (path, modification time, format) for per-image lookups."""
    p = Path(path)
    return _rle_table(str(p), p.stat().st_mtime_ns, bool(relative))


def read_image(row: Mapping[str, Any] | pd.Series) -> np.ndarray:
    """The row's image as uint8 H×W at original size."""
    path = str(_get(row, "image_path"))
    img = intake.read_image(path)
    expect = (int(_get(row, "height")), int(_get(row, "width")))
    if img.shape != expect:
        raise DataError(f"{path}: image is {img.shape}, manifest says {expect}")
    return img


def read_mask(row: Mapping[str, Any] | pd.Series) -> np.ndarray:
    """The row's mask as uint8 0/1 H×W at original size (zeros when it has no truth rows)."""
    h, w = int(_get(row, "height")), int(_get(row, "width"))
    if _get(row, "source") == "png":
        mpath = str(_get(row, "mask_path") or "")
        if not mpath:
            return np.zeros((h, w), dtype=np.uint8)
        mask = intake.read_mask_png(mpath).astype(np.uint8)
        if mask.shape != (h, w):
            raise DataError(f"{mpath}: mask is {mask.shape}, manifest says {(h, w)}")
        return mask
    csv_path = str(_get(row, "rle_csv") or "")
    if not csv_path:
        return np.zeros((h, w), dtype=np.uint8)
    relative = str(_get(row, "rle_format") or "relative") == "relative"
    rles = rle_table(csv_path, relative).get(str(_get(row, "id")), [])
    try:
        return union_mask(rles, (h, w), relative)
    except ValueError as e:
        raise DataError(f"{csv_path}: ImageId {_get(row, 'id')}: {e}") from None


def iter_rows(df: pd.DataFrame) -> Iterable[dict[str, Any]]:
    """Manifest rows as plain dicts (cheap to pickle to worker processes)."""
    return df.to_dict("records")


# ==================================================================================================
# torch Dataset over the preprocessing cache
# ==================================================================================================
# ImageNet statistics for 3-channel input (grey replicated), their mean for 1 channel: encoders
# pretrained on ImageNet expect inputs on that scale.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def normalize(images, in_channels: int):
    """uint8 images (..., H, W), a numpy array or a tensor on any device -> float32 tensor
    (..., C, H, W) on the same device, ImageNet-normalised. Training and inference share it."""
    import torch

    if isinstance(images, torch.Tensor):
        x = images
    else:
        x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float().div_(255.0).unsqueeze(-3)
    if in_channels == 3:
        mean = torch.tensor(_MEAN, device=x.device).view(3, 1, 1)
        std = torch.tensor(_STD, device=x.device).view(3, 1, 1)
        return (x.expand(*x.shape[:-3], 3, *x.shape[-2:]) - mean) / std
    if in_channels != 1:
        raise ConfigError(f"model.in_channels must be 1 or 3, got {in_channels}")
    return (x - float(np.mean(_MEAN))) / float(np.mean(_STD))


class SegDataset:
    """Items of a cache as ``{"image": (C, S, S) float, "mask": (1, S, S) float, "index": int,
    "has_mask": bool}``; ``indices`` select cache rows (a fold's train or validation part).

    Positive and negative images may use different albumentations pipelines (``transforms`` =
    ``(pos, neg)``, or one pipeline for both, or None).
    """

    def __init__(self, cache, indices, in_channels: int = 3, transforms=None, instances=False):
        self.cache = cache
        self.instances = bool(instances)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.in_channels = int(in_channels)
        if transforms is None or isinstance(transforms, tuple):
            self.transforms = transforms
        else:
            self.transforms = (transforms, transforms)
        self.has_mask = cache.manifest["has_mask"].to_numpy(dtype=bool)[self.indices]
        # Failed (undecodable) or unbuilt entries hold zeros, not data: refuse them rather than
        # train on blank images. ``Cache.ok``; stand-in caches without it are taken as complete.
        ok = getattr(cache, "ok", None)
        if ok is not None and len(self.indices):
            bad = self.indices[~np.asarray(ok, dtype=bool)[self.indices]]
            if len(bad):
                from pneumoseg.errors import CacheError

                ids = [str(x) for x in cache.manifest["id"].to_numpy()[bad[:_SHOW]]]
                raise CacheError(
                    f"{getattr(cache, 'path', 'cache')}: {len(bad)} of the {len(self.indices)} "
                    f"selected entries failed to decode or are not built ({', '.join(ids)}"
                    f"{', ...' if len(bad) > _SHOW else ''}): leave them out with "
                    "cache.usable(indices), or fix the images and run src/preprocess.py again"
                )

    def __len__(self) -> int:
        return len(self.indices)

    def reseed(self, seed: int) -> None:
        """Seed each distinct augmentation pipeline (the same one may serve both classes)."""
        for t in {id(t): t for t in self.transforms or ()}.values():
            t.set_random_seed(seed)

    def __getitem__(self, i: int) -> dict:
        import torch

        k = int(self.indices[i])
        image = np.array(self.cache.images[k])  # copies out of the read-only memmap
        mask = np.array(self.cache.masks[k])
        parts = instance_masks(self.cache, k, mask) if self.instances else None
        if self.transforms is not None:
            t = self.transforms[0] if self.has_mask[i] else self.transforms[1]
            # every instance mask goes through the same geometric transform as the image
            out = t(image=image, mask=mask, masks=parts) if parts else t(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            parts = out.get("masks", parts)
        item = {
            "image": normalize(image, self.in_channels),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0),
            "index": k,
            "has_mask": bool(self.has_mask[i]),
        }
        if self.instances:
            stack = np.stack(parts) if parts else np.zeros((0, *mask.shape), dtype=np.uint8)
            item["instances"] = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.uint8))
        return item


def instance_masks(cache, k: int, union: np.ndarray) -> list[np.ndarray]:
    """Cache entry ``k``'s instances at cache size: one uint8 0/1 mask per RLE row (rows that
    overlap stay separate), resized like the union mask; for PNG masks (no rows), the union's
    8-connected components. Empty image: ``[]``."""
    row = cache.manifest.iloc[k]
    if not union.any():
        return []
    size = union.shape[0]
    csv_path = str(row.get("rle_csv", "") or "")
    if row.get("source") != "png" and csv_path:
        from pneumoseg.data.resize import resize_mask

        relative = str(row.get("rle_format") or "relative") == "relative"
        shape = (int(row["height"]), int(row["width"]))
        rles = rle_table(csv_path, relative).get(str(row["id"]), [])
        out = [resize_mask(rle_decode(r, shape, relative), size) for r in rles]
        return [m for m in out if m.any()]
    n, labels = cv2.connectedComponents(union.astype(np.uint8), connectivity=8)
    return [(labels == j).astype(np.uint8) for j in range(1, n)]


def collate(items: list[dict]) -> dict:
    """``default_collate``, except ``instances`` (a different count per image) stays a list."""
    from torch.utils.data import default_collate

    rest = [{k: v for k, v in it.items() if k != "instances"} for it in items]
    batch = default_collate(rest)
    if "instances" in items[0]:
        batch["instances"] = [it["instances"] for it in items]
    return batch
