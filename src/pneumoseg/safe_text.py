"""Text from untrusted files made safe to echo: image ids and CSV cells.

An image id comes from a DICOM (SOPInstanceUID) or a file name, both chosen by whoever made the
file. It ends up in JSON, in CSV rows, in download names. :func:`safe_id` keeps an id that is a
valid DICOM UID or a plain file-name stem (every real SIIM id is one of the two) and replaces
anything else by ``sha256-`` + the first 12 hex digits of the SHA-256 of the value (UTF-8, without
its DICOM padding): the same bad value always gets the same id, and the id shows nothing of it.

A CSV cell that starts with ``= + - @`` (or a tab or a carriage return) is a formula to
spreadsheet programs: ``=HYPERLINK(...)`` runs when the file is opened. :func:`csv_cell` prefixes
such a cell with ``'`` (shown, never evaluated) and quotes every cell, so a comma, a quote or a line
break inside a value cannot start a new cell or row. Plain numbers (``-1``: the empty-mask RLE of a
Kaggle submission) and RLE strings are left as they are. The page's ``static/csv.js`` applies the
same two rules in the browser; a test runs both on one table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

# PS3.5 9.1: at most 64 characters, components of digits separated by dots, no empty component and
# no leading zero in a component (except the component "0" itself)
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX = 64
# a file-name stem that is safe everywhere (JSON, CSV, a download name, a shell): Kaggle's
# "ID_0011fe81e" and every SIIM UID fit
_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# what spreadsheets read as the start of a formula (OWASP's list: = + - @, tab, carriage return)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# ASCII digits only ([0-9], not \d: Python's \d takes any script's digits, JavaScript's does not)
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_PADDING = " \t\r\n\x00"  # DICOM pads UIDs with NUL, other strings with a space


def is_dicom_uid(value: str) -> bool:
    """Whether ``value`` is a valid DICOM UID (PS3.5 9.1)."""
    return len(value) <= UID_MAX and _UID.fullmatch(value) is not None


def is_safe_stem(value: str) -> bool:
    """Whether ``value`` is a plain name: a letter or digit, then up to 127 of ``A-Za-z0-9._-``."""
    return _STEM.fullmatch(value) is not None


def hashed_id(value: str) -> str:
    """``sha256-<first 12 hex digits of SHA-256(value as UTF-8)>``: the replacement of an unsafe
    id. Deterministic, and it is itself a safe stem."""
    raw = value.encode("utf-8", "surrogatepass")
    return "sha256-" + hashlib.sha256(raw).hexdigest()[:12]


def safe_id(value: str | None, fallback: str) -> str:
    """``value`` (without its DICOM padding) when it is a valid DICOM UID or a safe stem;
    :func:`hashed_id` of it when it is anything else; ``fallback`` when it is missing or blank
    (``fallback`` must be a safe stem itself, e.g. ``image-3``)."""
    if not is_safe_stem(fallback):
        raise ValueError(f"the fallback id {fallback!r} is not a safe stem")
    text = "" if value is None else str(value).strip(_PADDING)
    if not text:
        return fallback
    if is_dicom_uid(text) or is_safe_stem(text):
        return text
    return hashed_id(text)


def neutralise(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would read it as a formula; plain numbers
    (``-1``, ``+3``, ``-2.5e3``) stay as they are."""
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_cell(value: object) -> str:
    """One CSV cell: :func:`neutralise`\\ d and always double-quoted (inner quotes doubled)."""
    text = neutralise("" if value is None else str(value))
    return '"' + text.replace('"', '""') + '"'


def csv_row(values: Iterable[object]) -> str:
    """One CSV line (no line break at the end) of :func:`csv_cell`\\ s."""
    return ",".join(csv_cell(v) for v in values)
