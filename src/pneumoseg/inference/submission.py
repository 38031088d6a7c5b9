"""Kaggle submissions: writing (atomically, never clobbering), validating and scoring.

A submission is a CSV with the header ``ImageId,EncodedPixels`` and one row per test image; the
RLE is relative (competition form) and column-major, ``-1`` for an image without pneumothorax.

:func:`validate_submission` returns a list of problems (empty = valid): header, malformed rows,
empty ids, duplicate ids, ids missing from / not in the sample submission, RLEs that do not decode
inside the image, empty ``EncodedPixels`` (must be ``-1``). Each problem kind is reported once with
its count and the first few ids, so a broken 3,205-row file gives a short, readable list.
:func:`validate_submission_file` is the whole check before an upload (unreadable files raised,
rows counted); :func:`score_submission` scores a submission against a truth RLE CSV.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoseg.data.rle import (
    EMPTY,
    is_empty_rle,
    not_utf8_at,
    raise_csv_field_limit,
    read_rle_csv,
    rle_decode,
    union_mask,
)
from pneumoseg.errors import MissingFileError, SubmissionError
from pneumoseg.evaluation.metrics import dice_from_areas
from pneumoseg.io import atomic_write
from pneumoseg.safe_text import neutralise

log = logging.getLogger(__name__)

HEADER = ("ImageId", "EncodedPixels")
_SHOW = 5

Shape = tuple[int, int] | Mapping[str, tuple[int, int]]


def write_submission(
    rows: Iterable[tuple[str, str]] | Mapping[str, str], path: str | Path, force: bool = False
) -> Path:
    """Write ``(ImageId, rle)`` rows (or ``{id: rle}``) to ``path`` atomically.

    Empty RLEs (``""``, ``None``, ``-1``) are written as ``-1``. An existing ``path`` is an error
    unless ``force``; if anything fails while writing, ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    items = rows.items() if isinstance(rows, Mapping) else rows
    n = 0
    with atomic_write(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        for image_id, rle in items:
            image_id = str(image_id).strip()
            if not image_id:
                raise ValueError("write_submission: empty ImageId")
            # the csv module quotes commas, quotes and line breaks; a leading = + - @ would
            # still be a spreadsheet formula (no real Kaggle id starts so)
            rle = EMPTY if is_empty_rle(rle) else str(rle).strip()
            writer.writerow((neutralise(image_id), rle))
            n += 1
    log.info("wrote %s (%d rows)", path, n)
    return path


def read_sample_ids(path: str | Path) -> list[str]:
    """ImageIds of a sample submission (or any ``ImageId,...`` CSV), in file order, unique.

    Rows of any length are read (a valid 1024² RLE can pass csv's default field limit). A missing
    file raises :class:`~pneumoseg.errors.MissingFileError`; one that is not UTF-8 CSV text a
    :class:`~pneumoseg.errors.SubmissionError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"sample submission not found: {path}")
    raise_csv_field_limit()
    ids: list[str] = []
    seen: set[str] = set()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            for k, row in enumerate(reader):
                if not row or not row[0].strip():
                    continue
                image_id = row[0].strip()
                if k == 0 and image_id.lower() in ("imageid", "image_id", "id"):
                    continue
                if image_id not in seen:
                    seen.add(image_id)
                    ids.append(image_id)
        except UnicodeDecodeError:
            raise SubmissionError(
                f"{not_utf8_at(path)}: not UTF-8 text: is it really a CSV of ImageIds "
                "(ImageId,EncodedPixels)?"
            ) from None
        except csv.Error as e:
            raise SubmissionError(
                f"{path}:{reader.line_num}: not a readable CSV ({e}): is it really a CSV of "
                "ImageIds (ImageId,EncodedPixels)?"
            ) from None
    return ids


class _Problems:
    def __init__(self):
        self.items: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self.items.setdefault(kind, []).append(example)

    def texts(self) -> list[str]:
        out = []
        for kind, ex in self.items.items():
            more = f", ... and {len(ex) - _SHOW} more" if len(ex) > _SHOW else ""
            out.append(f"{len(ex)} {kind}: {', '.join(ex[:_SHOW])}{more}")
        return out


def _shape_of(shape: Shape, image_id: str) -> tuple[int, int]:
    if isinstance(shape, Mapping):
        return tuple(shape.get(image_id, (1024, 1024)))  # type: ignore[return-value]
    return int(shape[0]), int(shape[1])


def validate_submission(
    path: str | Path,
    sample: str | Path | Sequence[str] | None = None,
    shape: Shape = (1024, 1024),
    relative: bool = True,
) -> list[str]:
    """Problems of the submission at ``path``; an empty list means it is valid.

    ``sample``: a sample-submission CSV (or its ids): every id must appear exactly once and no
    other. ``shape``: (height, width) of every image, or ``{id: (h, w)}`` (ids not in it: 1024²).
    ``relative``: the RLE form to check (competition: relative).
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: file not found"]
    p = _Problems()
    seen: dict[str, int] = {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return [
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): a submission is a "
            f"UTF-8 CSV starting with {','.join(HEADER)}"
        ]
    if text.startswith("\ufeff"):
        p.add("file(s) starting with a UTF-8 byte-order mark", path.name)
        text = text[1:]
    lines = text.splitlines()
    if not lines:
        return [f"{path}: empty file (expected the header {','.join(HEADER)})"]
    if lines[0] != ",".join(HEADER):
        p.add(f"wrong header (expected exactly {','.join(HEADER)!r})", repr(lines[0][:60]))
    raise_csv_field_limit()  # a valid 1024² RLE can pass csv's default 131,072 characters
    rows = csv.reader(lines[1:])
    lineno = 1
    while True:
        lineno += 1
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            p.add("unreadable CSV line(s)", f"line {lineno} ({e})")
            continue
        if not row or all(not c.strip() for c in row):
            p.add("blank line(s)", f"line {lineno}")
            continue
        if len(row) != 2:
            p.add("row(s) without exactly 2 columns", f"line {lineno}")
            continue
        image_id, rle = row[0].strip(), row[1].strip()
        if not image_id:
            p.add("row(s) with an empty ImageId", f"line {lineno}")
            continue
        if image_id in seen:
            p.add("duplicate ImageId(s)", f"{image_id} (lines {seen[image_id]} and {lineno})")
            continue
        seen[image_id] = lineno
        if rle == "":
            p.add("empty EncodedPixels (write -1 for no pneumothorax)", image_id)
        elif rle != EMPTY:
            try:
                rle_decode(rle, _shape_of(shape, image_id), relative)
            except ValueError as e:
                p.add("invalid RLE(s)", f"{image_id} ({e})")
    if not seen and not p.items:
        p.add("submission(s) without any rows", path.name)
    if sample is not None:
        ids = read_sample_ids(sample) if isinstance(sample, (str, Path)) else list(sample)
        expected = set(ids)
        missing = [i for i in ids if i not in seen]
        extra = [i for i in seen if i not in expected]
        for i in missing:
            p.add("ImageId(s) of the sample submission missing", i)
        for i in extra:
            p.add("ImageId(s) not in the sample submission", i)
    return p.texts()


@dataclass
class SubmissionCheck:
    """What :func:`validate_submission_file` found: the problems (none: valid) and, for a valid
    file, its rows and how many of them are positive."""

    path: Path
    sample: Path | None = None
    problems: list[str] = field(default_factory=list)
    rows: int = 0
    positive: int = 0

    @property
    def valid(self) -> bool:
        return not self.problems


def validate_submission_file(
    path: str | Path,
    sample: str | Path | None = None,
    shape: Shape = (1024, 1024),
    relative: bool = True,
) -> SubmissionCheck:
    """The check before an upload (``validate_submission.py``): :func:`validate_submission` of
    the file at ``path`` against the ``sample`` submission CSV, and for a valid file its rows and
    positive rows. A missing submission or sample, a folder in their place, or a sample that is
    not CSV text raises a :class:`~pneumoseg.errors.UserError` (a submission that is not UTF-8
    text is a problem in the list)."""
    path = Path(path)
    sample = Path(sample) if sample is not None else None
    for what, p in (("submission", path), ("sample submission", sample)):
        if p is not None and p.is_dir():
            raise SubmissionError(f"{what} {p} is a folder, expected a CSV file")
        if p is not None and not p.is_file():
            raise MissingFileError(f"{what} not found: {p}")
    problems = validate_submission(path, sample, shape, relative)
    if problems:
        return SubmissionCheck(path, sample, problems)
    # Read with the csv module (rows of any length: a valid 1024² RLE can pass 131,072 chars).
    rows = read_rle_csv(path, shape=None, relative=relative)
    n_pos = sum(1 for rles in rows.values() if rles)
    return SubmissionCheck(path, sample, [], len(rows), n_pos)


def check_submission(path, sample=None, shape: Shape = (1024, 1024), relative: bool = True):
    """:func:`validate_submission`, raising ``ValueError`` that lists the problems."""
    problems = validate_submission(path, sample, shape, relative)
    if problems:
        raise ValueError(f"{path}: invalid submission:\n  " + "\n  ".join(problems))
    return path


def score_submission(
    sub_path: str | Path,
    truth_csv: str | Path,
    shape: Shape = (1024, 1024),
    relative: bool = True,
) -> dict:
    """Competition score of a submission against a truth RLE CSV (e.g. the synthetic
    ``test-rle.csv``): per-image Dice of the union of each side's rows (empty/empty = 1).

    Returns ``{"dice": mean Dice, "pos_dice": mean over images with truth, "n": images,
    "n_pos": positive images, "n_pred_pos": images predicted positive}``. Truth ids without a
    submission row are an error; submission ids without truth are ignored (logged).
    """
    truth = read_rle_csv(truth_csv, shape=None, relative=relative, format_option="predict.rle")
    sub = read_rle_csv(sub_path, shape=None, relative=relative, format_option="predict.rle")
    missing = [i for i in truth if i not in sub]
    if missing:
        raise ValueError(
            f"{sub_path}: {len(missing)} id(s) of {truth_csv} have no row, e.g. {missing[:_SHOW]}"
        )
    extra = [i for i in sub if i not in truth]
    if extra:
        log.warning("%s: %d id(s) not in %s ignored", sub_path, len(extra), truth_csv)
    inter, pa, ta = (np.zeros(len(truth), dtype=np.int64) for _ in range(3))
    for k, image_id in enumerate(truth):
        hw = _shape_of(shape, image_id)
        t = union_mask(truth[image_id], hw, relative)
        pr = union_mask(sub[image_id], hw, relative)
        inter[k] = np.count_nonzero(t & pr)
        pa[k], ta[k] = np.count_nonzero(pr), np.count_nonzero(t)
    dice = dice_from_areas(inter, pa, ta)
    pos = ta > 0
    return {
        "dice": float(dice.mean()) if len(dice) else float("nan"),
        "pos_dice": float(dice[pos].mean()) if pos.any() else float("nan"),
        "n": len(dice),
        "n_pos": int(pos.sum()),
        "n_pred_pos": int((pa > 0).sum()),
    }


def publish_submission(
    rows: Iterable[tuple[str, str]],
    path: str | Path,
    expected_ids: Sequence[str] | None,
    shape: Shape,
    relative: bool = True,
) -> Path:
    """Write ``rows`` to a temporary file next to ``path``, validate it, and only then rename it
    over ``path``: an existing (good) submission is never replaced by an invalid one.

    Raises :class:`~pneumoseg.errors.SubmissionError` with the problems (and says the old file
    was kept) when the new file does not validate against ``expected_ids`` and ``shape``.
    """
    import os

    from pneumoseg.errors import SubmissionError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.candidate")
    try:
        write_submission(rows, tmp, force=True)
        problems = validate_submission(tmp, expected_ids, shape, relative)
        if not problems and expected_ids is not None and not list(expected_ids):
            problems = ["no rows: the sample submission lists no ImageId"]
        if problems:
            kept = f"; {path} was left as it was" if path.exists() else ""
            raise SubmissionError(
                f"the new submission for {path} is invalid{kept}:\n  " + "\n  ".join(problems)
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
