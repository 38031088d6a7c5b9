"""File I/O: DICOM and PNG reading, and atomic writes (temp file in the same folder + rename).

* :func:`read_dicom_tags` reads only a DICOM's header (``stop_before_pixels``), for manifests;
  :func:`png_size` a PNG's size from its header. Pixels are read by
  :mod:`pneumoseg.data.intake` (the one image intake of every path).

Every error names the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pneumoseg.errors import DataError, MissingFileError, OutputExistsError

# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``.

    If the block raises (or the process dies), ``path`` is untouched and the temp file removed
    (or, after a hard kill, left as a ``.tmp`` sibling that nothing reads).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(
            f"{path} is a folder, but this step writes a file there: move the folder away"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _named(e, path.parent) from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with _open(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:
            raise _named(e, path) from None
        raise


def _open(fd: int, mode: str, **kwargs) -> IO:
    """The temp file of :func:`atomic_write` (a seam: the tests make writes fail here)."""
    return os.fdopen(fd, mode, **kwargs)


def _named(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (a write's ENOSPC names no file): the message says where."""
    if e.filename or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


def atomic_save(path: str | Path, writer, binary: bool = True) -> Path:
    """Call ``writer(fh)`` on a temp file and rename it to ``path`` (e.g. ``np.save``, ``torch.save``)."""
    with atomic_write(path, "wb" if binary else "w") as fh:
        writer(fh)
    return Path(path)


def replace_together(
    folder: str | Path, name: str, writers: dict[str, Callable[[Path], Any]]
) -> None:
    """Replace the files ``writers`` names (``{file name in folder: writer(temp path)}``) as one
    set: after a crash at any moment, readers find the old set or the new one, never a mix.

    Each writer writes its own temp file; once all are complete, a journal listing the renames is
    written atomically (the commit point); then the renames run and the journal goes. A journal
    left by a killed process is rolled forward, and temp files of an uncommitted set removed, by
    :func:`recover_together`, which the next write (and readers of the set) call first.
    """
    folder = Path(folder)
    require_file_targets(folder, writers)
    folder.mkdir(parents=True, exist_ok=True)
    recover_together(folder, name, writers)
    token = secrets.token_hex(6)
    pairs: list[tuple[str, str]] = []
    try:
        for final, write in writers.items():
            tmp = folder / f".{final}.{token}.settmp"
            pairs.append((tmp.name, final))
            try:
                write(tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as e:
                raise _named(e, folder / final) from None
        with atomic_write(_journal(folder, name), "w", encoding="utf-8") as fh:
            json.dump({"renames": pairs}, fh)
    except BaseException:
        for tmp_name, _ in pairs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / tmp_name)
        raise
    recover_together(folder, name, writers)  # the renames, now that the set is committed


def require_file_targets(folder: Path, names: Iterable[str]) -> None:
    """Refuse (before anything is written) when a file to be written is a folder."""
    for name in names:
        if (Path(folder) / name).is_dir():
            raise OutputExistsError(
                f"{Path(folder) / name} is a folder, but this step writes a file there: move "
                "the folder away (nothing was written)"
            )


def recover_together(folder: str | Path, name: str, files: Iterable[str]) -> None:
    """Finish a committed :func:`replace_together` of ``name`` (its journal is there) and remove
    the temp files of uncommitted ones; only file names of ``files`` are ever touched."""
    folder = Path(folder)
    files = list(files)
    journal = _journal(folder, name)
    if journal.is_file():
        plan = json.loads(journal.read_text(encoding="utf-8"))  # written atomically: whole
        for tmp_name, final in plan["renames"]:
            ours = final in files and re.fullmatch(
                rf"\.{re.escape(final)}\.[0-9a-f]+\.settmp", tmp_name
            )
            if ours and (folder / tmp_name).is_file():
                os.replace(folder / tmp_name, folder / final)
        _fsync_dir(folder)
        journal.unlink()
    # ours by name: the set's temp files, and atomic_write's temps of the set's files (its
    # writers', the journal's, and those an older version left when it was killed)
    names = [*files, journal.name]
    for final in names:
        esc = glob.escape(final)
        for pattern in (f".{esc}.*.settmp", f"..{esc}.*.settmp.*.tmp", f".{esc}.*.tmp"):
            for stray in folder.glob(pattern):
                stray.unlink(missing_ok=True)


def _journal(folder: Path, name: str) -> Path:
    return folder / f".{name}.commit.json"


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------
DICOM_SUFFIXES = (".dcm", ".dicom")
TAG_NAMES = ("PatientID", "PatientAge", "PatientSex", "ViewPosition", "Rows", "Columns")
_HEADER_TAGS = [*TAG_NAMES, "SeriesDescription"]
_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_VIEW_RE = re.compile(r"view\s*:\s*([A-Za-z]+)", re.IGNORECASE)


class DicomReadError(DataError):
    """A DICOM file that cannot be read or decoded (the message names the file)."""


def parse_age(value: Any) -> float:
    """DICOM Age String (``'038Y'``, ``'6M'``; SIIM writes bare ``'38'``) -> years, NaN if unknown."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    m = _AGE_RE.match(str(value))
    if not m:
        return math.nan
    return float(m.group(1)) * _AGE_UNITS[(m.group(2) or "Y").upper()]


def _tags(ds) -> dict[str, Any]:
    view = str(ds.get("ViewPosition", "") or "").strip()
    if not view:  # SIIM also writes the view into the series description ('view: PA')
        m = _VIEW_RE.search(str(ds.get("SeriesDescription", "") or ""))
        view = m.group(1).upper() if m else ""
    return {
        "PatientID": str(ds.get("PatientID", "") or "").strip(),
        "PatientAge": parse_age(ds.get("PatientAge")),
        "PatientSex": str(ds.get("PatientSex", "") or "").strip(),
        "ViewPosition": view,
        "Rows": int(ds.get("Rows", 0) or 0),
        "Columns": int(ds.get("Columns", 0) or 0),
    }


def _dcmread(path: Path, **kwargs):
    import pydicom  # deferred: pydicom's import is slow-ish and not every caller needs it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncation warnings: we report them ourselves
            return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError:
        raise MissingFileError(f"DICOM file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a DICOM file") from None
    except pydicom.errors.InvalidDicomError:
        size = path.stat().st_size if path.is_file() else 0
        what = "an empty file" if size == 0 else f"{size} bytes without the DICOM 'DICM' header"
        raise DicomReadError(f"{path}: not a DICOM file ({what})") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DicomReadError(
            f"{path}: not a readable DICOM file ({type(e).__name__}: {first})"
        ) from e


def _require_size(path: Path, tags: dict) -> None:
    if tags["Rows"] <= 0 or tags["Columns"] <= 0:
        raise DicomReadError(
            f"{path}: DICOM header has no Rows/Columns (truncated or not an image)"
        )


def read_dicom_tags(path: str | Path) -> dict[str, Any]:
    """Header only (fast): PatientID, PatientAge (float years or NaN), PatientSex, ViewPosition,
    Rows, Columns. Raises :class:`DicomReadError` naming the file when it is not a DICOM image."""
    path = Path(path)
    ds = _dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    tags = _tags(ds)
    _require_size(path, tags)
    return tags


# --------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------
def png_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a PNG from its header, without decoding the pixels."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file")
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    return height, width


# --------------------------------------------------------------------------------------------------
# CSV tables
# --------------------------------------------------------------------------------------------------
def read_csv(path: str | Path, what: str, hint: str = "", **kwargs):
    """``pandas.read_csv`` whose failures are typed errors naming the file and ``what`` it is.

    Missing -> :class:`MissingFileError` (``hint`` says which step makes it); empty, binary,
    not UTF-8, or malformed -> :class:`DataError`.
    """
    import pandas as pd

    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, expected a CSV file{tail}")
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}{tail}")
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} {path} is empty (no header, no rows){tail}") from None
    except UnicodeDecodeError:
        raise DataError(
            f"{what} {path} is not a UTF-8 text CSV (binary or another encoding)"
        ) from None
    except (pd.errors.ParserError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{what} {path} is not a valid CSV: {first}{tail}") from None
