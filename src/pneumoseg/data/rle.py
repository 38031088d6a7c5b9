"""Run-length encoding of SIIM masks, and reading RLE CSV files.

The competition's RLE runs over the **column-major** flattening of the H×W mask (pixel index
``col * H + row``). Two start conventions exist:

* ``relative=True`` (the competition's ``train-rle.csv``): each start counts the pixels skipped since
  the end of the previous run, the first from pixel 0;
* ``relative=False`` (absolute, 1-indexed, as in most other Kaggle competitions).

An empty mask is the single token ``-1``. Masks in memory are row-major uint8 0/1 H×W arrays in
image orientation; this module is the only place that knows about column-major order.

Both directions are numba kernels compiled with ``cache=True``, so the compile cost is paid once per
machine (not per process, and never inside a per-image loop). The encoder reads row-major masks
row by row and Fortran-ordered ones (whose memory already is the column-major order, e.g. a mask
decoded the competition's way, ``flat.reshape(w, h).T``) in one linear scan, at the same speed.

Malformed input raises :class:`RLEError` (a :class:`~pneumoseg.errors.DataError`, so a
``ValueError``). Absolute runs must be sorted and must not overlap: relative RLE read as absolute
(which once gave masks ~1% of their size) is refused, and messages say when the tokens are valid
in the other form.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numba
import numpy as np

from pneumoseg.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

EMPTY = "-1"
DEFAULT_SHAPE = (1024, 1024)

# Error codes returned by the numba kernels (they cannot raise formatted errors themselves).
_OK, _ERR_CHAR, _ERR_ODD, _ERR_NEG, _ERR_PAST_END, _ERR_ZERO_LEN, _ERR_OVERFLOW = range(7)
_ERR_ORDER = 7
_ERR_TEXT = {
    _ERR_CHAR: "non-integer token",
    _ERR_ODD: "odd number of tokens (starts and lengths must pair up)",
    _ERR_NEG: "negative start or length",
    _ERR_PAST_END: "run goes past the end of the image",
    _ERR_ZERO_LEN: "zero-length run",
    _ERR_OVERFLOW: "number too large",
    _ERR_ORDER: "run overlaps or precedes the previous run (absolute starts must increase, each "
    "at or after the end of the previous run)",
}
_FORM_TEXT = {
    "relative": "starts counted from the end of the previous run",
    "absolute": "1-indexed starts counted from the first pixel",
}

# csv's default field limit (131,072 characters) is below a valid 1024² RLE with many runs. The
# longest possible RLE of an image of MAX_IMAGE_SIDE² pixels bounds what we accept; it fits a C
# long on every platform (unlike sys.maxsize on Windows).
MAX_IMAGE_SIDE = 8192


class RLEError(DataError):
    """A malformed RLE string. ``reason``: the problem without the advice; ``likely``: the other
    RLE form (``"relative"``/``"absolute"``) when the same tokens are valid in it, else None."""

    def __init__(self, reason: str, likely: str | None = None, advice: str = ""):
        super().__init__(f"{reason}{advice}")
        self.reason = reason
        self.likely = likely
        self.advice = advice


# --------------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _parse_tokens(buf, out):  # pragma: no cover - compiled
    """Parse ASCII whitespace-separated integers from ``buf`` (uint8) into ``out`` (int64).

    Returns ``(n_tokens, error_code, error_token_index)``. A leading '-' is accepted and yields a
    negative number so that the caller can report it as "negative" rather than "non-integer".
    """
    n = 0
    i = 0
    size = buf.shape[0]
    while i < size:
        c = buf[i]
        if c == 32 or c == 9 or c == 10 or c == 13:
            i += 1
            continue
        neg = False
        if c == 45:  # '-'
            neg = True
            i += 1
            if i >= size:
                return n, _ERR_CHAR, n
        value = 0
        digits = 0
        while i < size:
            c = buf[i]
            if c == 32 or c == 9 or c == 10 or c == 13:
                break
            if c < 48 or c > 57:
                return n, _ERR_CHAR, n
            value = value * 10 + (c - 48)
            digits += 1
            if digits > 15:
                return n, _ERR_OVERFLOW, n
            i += 1
        if digits == 0:
            return n, _ERR_CHAR, n
        if n >= out.shape[0]:
            return n, _ERR_OVERFLOW, n  # caller sizes ``out`` generously; cannot happen
        out[n] = -value if neg else value
        n += 1
    return n, _OK, 0


@numba.njit(cache=True, nogil=True)
def _run_start(s, length, pos, relative):  # pragma: no cover - compiled
    """``(error_code, 0-based start)`` of a run given as token ``s`` after the previous run ended
    at ``pos``: relative offsets add to ``pos``; absolute starts are 1-indexed and must not go back
    (unsorted or overlapping runs are no valid absolute RLE)."""
    if s < 0 or length < 0:
        return _ERR_NEG, 0
    if length == 0:
        return _ERR_ZERO_LEN, 0
    if relative:
        return _OK, pos + s
    if s < 1:
        return _ERR_NEG, 0
    if s - 1 < pos:
        return _ERR_ORDER, 0
    return _OK, s - 1


@numba.njit(cache=True, nogil=True)
def _check_runs(tokens, n_tokens, relative, total):  # pragma: no cover - compiled
    """The checks of :func:`_fill_runs` without painting; ``total < 0``: image size unknown (no
    past-the-end check). Returns ``(error_code, run_index)``."""
    if n_tokens % 2 != 0:
        return _ERR_ODD, n_tokens // 2
    pos = 0
    for k in range(n_tokens // 2):
        length = tokens[2 * k + 1]
        err, start = _run_start(tokens[2 * k], length, pos, relative)
        if err != _OK:
            return err, k
        pos = start + length
        if total >= 0 and pos > total:
            return _ERR_PAST_END, k
    return _OK, 0


@numba.njit(cache=True, nogil=True)
def _fill_runs(tokens, n_tokens, relative, height, width, out):  # pragma: no cover - compiled
    """Paint the runs into the row-major ``out`` (H×W uint8). Returns ``(error_code, run_index)``.

    Runs are column-major: flat index ``p`` is pixel ``(p % H, p // H)``. Writing straight into the
    row-major array avoids a full-image transpose copy.
    """
    err, k = _check_runs(tokens, n_tokens, relative, height * width)
    if err != _OK:
        return err, k
    pos = 0
    for k in range(n_tokens // 2):
        length = tokens[2 * k + 1]
        start = pos + tokens[2 * k] if relative else tokens[2 * k] - 1
        end = start + length
        col = start // height
        row = start - col * height
        for _ in range(length):
            out[row, col] = 1
            row += 1
            if row == height:
                row = 0
                col += 1
        pos = end
    return _OK, 0


@numba.njit(cache=True, nogil=True)
def _decode_bytes(buf, relative, height, width, out):  # pragma: no cover - compiled
    """Parse and paint in one compiled call (the common case: well-formed input).

    Returns 0 on success, else a non-zero code; the caller then re-parses with the checking path
    (:func:`_parse` + :func:`_fill_runs`) to build a precise error message.
    """
    tokens = np.empty(buf.shape[0] // 2 + 1, dtype=np.int64)
    n, err, _ = _parse_tokens(buf, tokens)
    if err != _OK:
        return err
    err, _ = _fill_runs(tokens, n, relative, height, width, out)
    return err


@numba.njit(cache=True, nogil=True)
def _vertical_edges(mask, words, starts, ends):  # pragma: no cover - compiled
    """Find where vertical (column-major) runs start and end, scanning in row-major order.

    ``mask`` is H×W uint8 and ``words`` the same bytes viewed as H×(W/8) uint64. Row ``r`` is
    compared with row ``r - 1`` one 8-byte word at a time, so the (contiguous, cache-friendly)
    scan only looks at single pixels where a word differs, i.e. along the mask's top and bottom
    edges. Reading the image column by column instead would touch a new cache line per pixel.
    Returns the number of starts/ends written (unsorted flat column-major indices).
    """
    height = mask.shape[0]
    n_words = words.shape[1]
    zero = np.uint64(0)  # a plain 0 would unify uint64 with int64 to float64 and lose bits
    n_s = 0
    n_e = 0
    for r in range(height + 1):
        for w in range(n_words):
            cur = words[r, w] if r < height else zero
            prev = words[r - 1, w] if r > 0 else zero
            if cur == prev:
                continue
            for c in range(w * 8, w * 8 + 8):
                a = r < height and mask[r, c] != 0
                b = r > 0 and mask[r - 1, c] != 0
                if a and not b:
                    starts[n_s] = c * height + r
                    n_s += 1
                elif b and not a:
                    ends[n_e] = c * height + r
                    n_e += 1
    return n_s, n_e


@numba.njit(cache=True, nogil=True)
def _scan_bytes(flat, lo_i, hi_i, starts, ends, n, inside):  # pragma: no cover - compiled
    """Byte by byte over ``flat[lo_i:hi_i]``: record run starts/ends; returns ``(n, inside)``."""
    for i in range(lo_i, hi_i):
        if flat[i] != 0:
            if not inside:
                starts[n] = i
                inside = True
        elif inside:
            ends[n] = i
            n += 1
            inside = False
    return n, inside


@numba.njit(cache=True, nogil=True)
def _linear_edges(flat, words, starts, ends):  # pragma: no cover - compiled
    """Runs of the 1-D ``flat`` (uint8, already in column-major order: a Fortran-ordered mask's
    memory), in order. ``words`` is ``flat``'s first ``8 * len(words)`` bytes viewed as uint64.
    Outside a run, all-zero words are skipped; inside one, words without a zero byte; first whole
    blocks of 32 words at a time (a branch-free, vectorised test), then single words, and only
    the words that hold an edge are looked at byte by byte. Returns the number of runs; run ``k``
    is ``[starts[k], ends[k])``."""
    zero = np.uint64(0)
    lo = np.uint64(0x0101010101010101)
    hi = np.uint64(0x8080808080808080)  # (v - lo) & ~v & hi != 0  <=>  v has a zero byte
    block = 32
    n = 0
    inside = False
    n_words = words.shape[0]
    w = 0
    while w < n_words:
        if w % block == 0 and w + block <= n_words:
            acc = zero
            if inside:
                for j in range(w, w + block):
                    v = words[j]
                    acc |= (v - lo) & ~v
                acc &= hi
            else:
                for j in range(w, w + block):
                    acc |= words[j]
            if acc == zero:
                w += block
                continue
        v = words[w]
        if inside:
            if ((v - lo) & ~v & hi) == zero:  # no zero byte: the run goes on
                w += 1
                continue
        elif v == zero:
            w += 1
            continue
        n, inside = _scan_bytes(flat, w * 8, w * 8 + 8, starts, ends, n, inside)
        w += 1
    n, inside = _scan_bytes(flat, n_words * 8, flat.shape[0], starts, ends, n, inside)
    if inside:
        ends[n] = flat.shape[0]
        n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _runs_to_ascii(starts, ends, relative, buf):  # pragma: no cover - compiled
    """Sort the edges found by :func:`_vertical_edges`, then :func:`_write_runs`."""
    return _write_runs(np.sort(starts), np.sort(ends), relative, buf)


@numba.njit(cache=True, nogil=True)
def _write_runs(starts, ends, relative, buf):  # pragma: no cover - compiled
    """Merge runs that wrap from one column's bottom into the next column's top, and write
    "start length start length ..." as ASCII into ``buf``. ``starts``/``ends`` are sorted.
    Returns the byte count."""
    n = starts.shape[0]
    pos = 0
    prev_end = 0
    k = 0
    digits = np.empty(20, dtype=np.uint8)
    while k < n:
        s = starts[k]
        e = ends[k]
        # A run ending at the bottom of column c (flat index (c + 1) * H) and one starting at
        # the top of column c + 1 (the same flat index) are one column-major run.
        while k + 1 < n and starts[k + 1] == e:
            k += 1
            e = ends[k]
        k += 1
        first = s - prev_end if relative else s + 1
        for value in (first, e - s):
            if pos > 0:
                buf[pos] = 32
                pos += 1
            nd = 0
            v = value
            while True:
                digits[nd] = 48 + v % 10
                nd += 1
                v //= 10
                if v == 0:
                    break
            for i in range(nd):
                buf[pos + i] = digits[nd - 1 - i]
            pos += nd
        prev_end = e
    return pos


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise ValueError(f"shape must be (height, width) with positive sizes, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _parse(rle: str) -> np.ndarray:
    buf = np.frombuffer(rle.encode("ascii", errors="replace"), dtype=np.uint8)
    out = np.empty(buf.shape[0] // 2 + 1, dtype=np.int64)
    n, err, idx = _parse_tokens(buf, out)
    if err != _OK:
        tokens = rle.split()
        bad = tokens[idx] if idx < len(tokens) else "?"
        raise RLEError(f"malformed RLE: {_ERR_TEXT[err]} (token {idx}: {bad[:30]!r})")
    return out[:n]


def _runs_error(
    tokens: np.ndarray, err: int, k: int, relative: bool, shape: tuple[int, int] | None
) -> RLEError:
    """The :class:`RLEError` for kernel error ``err`` at run ``k``, saying which RLE form the
    tokens look like when they are valid in the other one."""
    form, other = ("relative", "absolute") if relative else ("absolute", "relative")
    detail = ""
    if err != _ERR_ODD:
        detail = f" (run {k}: start {tokens[2 * k]}, length {tokens[2 * k + 1]})"
    size = f", image {shape[0]}x{shape[1]}" if shape is not None else ""
    reason = f"malformed RLE: {_ERR_TEXT[err]}{detail}; {form} form{size}"
    total = shape[0] * shape[1] if shape is not None else -1
    likely = None
    if err in (_ERR_NEG, _ERR_PAST_END, _ERR_ORDER):
        other_err, _ = _check_runs(tokens, tokens.shape[0], not relative, total)
        likely = other if other_err == _OK else None
    if likely:
        advice = f"; it looks like {other} RLE ({_FORM_TEXT[other]}): decode it as {other}"
    elif err == _ERR_PAST_END:
        advice = f"; check that the RLE is {form} and that the image is {shape[0]}x{shape[1]}"
    else:
        advice = ""
    return RLEError(reason, likely, advice)


def check_rle(rle: str, relative: bool = True, shape: Sequence[int] | None = None) -> None:
    """Raise :class:`RLEError` unless ``rle`` is a valid RLE of the given form; with ``shape``
    also check that it fits the image (this is what :func:`rle_decode` checks, without painting).
    Without ``shape`` every check that does not depend on the image size is made: integer
    tokens in pairs, positive lengths, and (absolute) strictly increasing, non-overlapping runs.
    """
    if is_empty_rle(rle):
        return
    hw = _check_shape(shape) if shape is not None else None
    tokens = _parse(rle)
    total = hw[0] * hw[1] if hw is not None else -1
    err, k = _check_runs(tokens, tokens.shape[0], bool(relative), total)
    if err != _OK:
        raise _runs_error(tokens, err, k, bool(relative), hw)


def is_empty_rle(rle: str | float | None) -> bool:
    """True for the empty-mask marker (``-1``), an empty string, or a missing (NaN) value."""
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return True
    s = str(rle).strip()
    return s in ("", EMPTY)


def rle_decode(
    rle: str,
    shape: Sequence[int] = DEFAULT_SHAPE,
    relative: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one RLE string to an H×W uint8 0/1 mask (row-major, image orientation).

    ``out``, if given, is an H×W uint8 array the runs are OR-ed into (used to take the union of
    several instances without allocating). Raises :class:`RLEError` (a ``ValueError``) describing
    malformed input, with a hint when the tokens are valid in the other RLE form.
    """
    height, width = _check_shape(shape)
    if out is None:
        out = np.zeros((height, width), dtype=np.uint8)
    elif out.shape != (height, width) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(height, width)}, got {out.dtype} {out.shape}")
    if is_empty_rle(rle):
        return out
    buf = np.frombuffer(rle.encode("ascii", errors="replace"), dtype=np.uint8)
    if _decode_bytes(buf, bool(relative), height, width, out) == _OK:
        return out
    tokens = _parse(rle)  # raises for token-level problems
    err, k = _fill_runs(tokens, tokens.shape[0], bool(relative), height, width, out)
    if err != _OK:
        raise _runs_error(tokens, err, k, bool(relative), (height, width))
    return out


def rle_encode(mask: np.ndarray, relative: bool = True) -> str:
    """Encode an H×W mask (any dtype; nonzero = foreground) to an RLE string; ``"-1"`` if empty.

    Row-major (C-ordered) masks are scanned row by row, comparing 8-byte words of neighbouring
    rows; Fortran-ordered ones (e.g. ``flat.reshape(w, h).T``) hold the column-major order in
    memory, so their runs are one linear scan. Other layouts (strided views) are copied first.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        mask = (mask != 0).view(np.uint8)  # elementwise: keeps a Fortran order
    height, width = mask.shape
    if mask.flags.f_contiguous and (width % 8 or not mask.flags.c_contiguous):
        return _encode_linear(mask.T.reshape(-1), relative)
    if width % 8 or not mask.flags.c_contiguous:
        # Zero columns appended on the right come after every real pixel in column-major
        # order, so they change no run; they let the kernel read whole 8-byte words.
        padded = np.zeros((height, -(-width // 8) * 8), dtype=np.uint8)
        padded[:, :width] = mask
        mask = padded
    cap = mask.size // 2 + mask.shape[1] + 1  # alternating pixels: the most edges possible
    starts = np.empty(cap, dtype=np.int64)
    ends = np.empty(cap, dtype=np.int64)
    n_s, n_e = _vertical_edges(mask, mask.view(np.uint64), starts, ends)
    if n_s == 0:
        return EMPTY
    if n_s != n_e:  # cannot happen: every run that starts also ends (at the latest at r == H)
        raise RuntimeError(f"RLE encoder found {n_s} run starts but {n_e} ends")
    # Each run needs at most 2 * 20 digits + 2 spaces.
    buf = np.empty(n_s * 42, dtype=np.uint8)
    n = _runs_to_ascii(starts[:n_s], ends[:n_e], bool(relative), buf)
    return buf[:n].tobytes().decode("ascii")


def _encode_linear(flat: np.ndarray, relative: bool) -> str:
    """RLE of a 1-D uint8 array already in column-major order (a view of a Fortran mask)."""
    n_words = flat.shape[0] // 8
    words = flat[: n_words * 8].view(np.uint64)
    cap = (flat.shape[0] + 1) // 2  # alternating pixels: the most runs possible
    starts = np.empty(cap, dtype=np.int64)
    ends = np.empty(cap, dtype=np.int64)
    n_runs = _linear_edges(flat, words, starts, ends)
    if n_runs == 0:
        return EMPTY
    buf = np.empty(n_runs * 42, dtype=np.uint8)
    n = _write_runs(starts[:n_runs], ends[:n_runs], bool(relative), buf)
    return buf[:n].tobytes().decode("ascii")


def rle_to_runs(
    rle: str, shape: Sequence[int] = DEFAULT_SHAPE, relative: bool = True
) -> np.ndarray:
    """Return the runs of an RLE as an (N, 2) int64 array of (0-indexed absolute start, length)."""
    if is_empty_rle(rle):
        return np.zeros((0, 2), dtype=np.int64)
    height, width = _check_shape(shape)
    tokens = _parse(rle)
    # Validate exactly like decoding does (cheap: the mask is thrown away).
    rle_decode(rle, (height, width), relative)
    pairs = tokens.reshape(-1, 2).copy()
    if relative:
        ends = np.cumsum(pairs[:, 0] + pairs[:, 1])
        pairs[:, 0] = ends - pairs[:, 1]
    else:
        pairs[:, 0] -= 1
    return pairs


def relative_to_absolute(rle: str, shape: Sequence[int] = DEFAULT_SHAPE) -> str:
    """Convert a relative (competition) RLE to absolute 1-indexed starts, keeping the runs as is."""
    if is_empty_rle(rle):
        return EMPTY
    runs = rle_to_runs(rle, shape, relative=True)
    runs[:, 0] += 1
    return " ".join(map(str, runs.ravel().tolist()))


def absolute_to_relative(rle: str, shape: Sequence[int] = DEFAULT_SHAPE) -> str:
    """Convert an absolute 1-indexed RLE to the relative (competition) form, keeping the runs as is.

    Runs must be sorted and non-overlapping for the relative form to exist.
    """
    if is_empty_rle(rle):
        return EMPTY
    runs = rle_to_runs(rle, shape, relative=False)
    ends = runs[:, 0] + runs[:, 1]
    prev_end = np.concatenate([[0], ends[:-1]])
    gaps = runs[:, 0] - prev_end
    if (gaps < 0).any():
        k = int(np.flatnonzero(gaps < 0)[0])
        raise ValueError(f"malformed RLE: run {k} overlaps or precedes the previous run")
    runs[:, 0] = gaps
    return " ".join(map(str, runs.ravel().tolist()))


def union_mask(
    rles: Iterable[str], shape: Sequence[int] = DEFAULT_SHAPE, relative: bool = True
) -> np.ndarray:
    """Union of several instance RLEs (the competition's several-rows-per-image convention)."""
    height, width = _check_shape(shape)
    out = np.zeros((height, width), dtype=np.uint8)
    for rle in rles:
        rle_decode(rle, (height, width), relative, out=out)
    return out


# --------------------------------------------------------------------------------------------------
# CSV reading
# --------------------------------------------------------------------------------------------------
_ID_NAMES = {"imageid", "image_id", "id"}


def max_rle_chars(shape: Sequence[int]) -> int:
    """An upper bound on the length of one RLE string (either form) for an image of ``shape``:
    at most ``ceil(H*W / 2)`` runs, each two numbers of at most ``len(str(H*W))`` digits plus
    two separators."""
    height, width = _check_shape(shape)
    pixels = height * width
    return (pixels + 1) // 2 * 2 * (len(str(pixels)) + 1) + 16


CSV_FIELD_LIMIT = max_rle_chars((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))


def raise_csv_field_limit(limit: int = CSV_FIELD_LIMIT) -> None:
    """Let :mod:`csv` read RLE fields up to ``limit`` characters (the default: any RLE of an
    image up to ``MAX_IMAGE_SIDE``² pixels). Only ever raises the process-wide limit."""
    limit = min(int(limit), 2**31 - 1)  # a C long everywhere
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def not_utf8_at(path: Path) -> str:
    """``path:line (byte 0x..)`` of the first byte of ``path`` that is not UTF-8 (for messages:
    a text reader fails a whole read-ahead chunk, so its own position is no help)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"{path}:{line} (byte 0x{raw[e.start]:02x})"
    return str(path)


def read_rle_csv(
    path: str | Path,
    shape: Sequence[int] | None = DEFAULT_SHAPE,
    relative: bool = True,
    lines: dict[str, list[int]] | None = None,
    format_option: str = "data.rle_format",
) -> dict[str, list[str]]:
    """Read a SIIM RLE CSV into ``{ImageId: [rle, ...]}`` in file order.

    Handles every variant the competition shipped: UTF-8 BOM, no header (``train-rle-sample.csv``),
    the ``ImageId, EncodedPixels`` header with its space (``train-rle.csv``), leading spaces, CRLF,
    ``-1`` rows and several rows per image (instances, kept as a list; see :func:`union_mask`).
    A negative image maps to ``[]``. Duplicate ``-1`` rows collapse; an id with both positive and
    ``-1`` rows is logged and the positive rows win. Rows of any length are read (a valid 1024²
    RLE can pass csv's default 131,072-character field limit).

    Every RLE is validated: against ``shape`` when given; with ``shape=None`` every check that
    does not need the image size (see :func:`check_rle`: an absolute RLE whose runs are unsorted
    or overlap fails here). Problems raise :class:`~pneumoseg.errors.DataError` naming the file,
    line and ImageId; when the RLE is valid in the other form, the message says so and to set
    ``format_option`` (``data.rle_format``) to it. A missing file raises
    :class:`~pneumoseg.errors.MissingFileError`.

    ``lines``, when given, is filled with ``{ImageId: [line number, ...]}`` (1-based): for an id
    with positive rows, ``lines[id][k]`` is the line of ``result[id][k]``; for a negative id, the
    lines of its ``-1`` rows.
    """
    path = Path(path)
    result: dict[str, list[str]] = {}
    seen_empty: set[str] = set()
    where: dict[str, list[int]] = {}
    empty_lines: dict[str, list[int]] = {}
    raise_csv_field_limit()
    with _open_rle_csv(path) as fh:
        reader = csv.reader(fh)
        lineno = 0
        try:
            for row in reader:
                lineno = reader.line_num
                cells = _row_cells(row, lineno, path)
                if cells is None:  # blank line or header
                    continue
                image_id, rle = cells
                rles = result.setdefault(image_id, [])
                if is_empty_rle(rle):
                    seen_empty.add(image_id)
                    empty_lines.setdefault(image_id, []).append(lineno)
                    continue
                try:
                    if shape is not None:
                        rle_decode(rle, shape, relative)
                    else:
                        check_rle(rle, relative)
                except RLEError as e:
                    raise _row_rle_error(e, path, lineno, image_id, format_option) from None
                rles.append(rle)
                where.setdefault(image_id, []).append(lineno)
        except UnicodeDecodeError:
            raise DataError(
                f"{not_utf8_at(path)}: not UTF-8 text: is this really an RLE CSV "
                "(ImageId,EncodedPixels)? Save it as UTF-8 text"
            ) from None
        except csv.Error as e:
            raise DataError(
                f"{path}:{reader.line_num or lineno + 1}: not a readable CSV ({e}): is this "
                "really an RLE CSV (ImageId,EncodedPixels)?"
            ) from None
    _warn_mixed_rows(path, result, seen_empty)
    if lines is not None:
        for image_id in result:
            lines[image_id] = where.get(image_id) or empty_lines.get(image_id, [])
    return result


def _open_rle_csv(path: Path):
    """The CSV as text (a BOM dropped, newlines left to :mod:`csv`). A missing file raises
    :class:`~pneumoseg.errors.MissingFileError`, an unreadable one a
    :class:`~pneumoseg.errors.DataError`; both say what to check."""
    try:
        return path.open(newline="", encoding="utf-8-sig")
    except (FileNotFoundError, NotADirectoryError):
        raise MissingFileError(
            f"RLE CSV not found: {path} (check the path; for a dataset: data.root and "
            "data.rle_csv / data.test_rle_csv)"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read RLE CSV {path}: {e.strerror or e}") from None


def _row_cells(row: list[str], lineno: int, path: Path) -> list[str] | None:
    """``[ImageId, rle]`` of a CSV row, stripped; None for a blank line or the header."""
    if not row or all(not c.strip() for c in row):
        return None
    cells = [c.strip() for c in row]
    if lineno == 1 and cells[0].lower() in _ID_NAMES:
        return None  # header
    if len(cells) != 2:
        raise DataError(
            f"{path}:{lineno}: expected 2 columns (ImageId, EncodedPixels), got "
            f"{len(cells)}: fix or remove the line"
        )
    if not cells[0]:
        raise DataError(f"{path}:{lineno}: empty ImageId: fix or remove the line")
    return cells


def _row_rle_error(
    e: RLEError, path: Path, lineno: int, image_id: str, format_option: str
) -> DataError:
    """The error for a row whose RLE is malformed: file, line and ImageId, and, when the tokens
    are valid in the other RLE form, the setting that reads them that way."""
    advice = e.advice
    if e.likely:
        advice = (
            f"; it looks like {e.likely} RLE ({_FORM_TEXT[e.likely]}): "
            f"set {format_option}={e.likely}"
        )
    return DataError(f"{path}:{lineno}: ImageId {image_id}: {e.reason}{advice}")


def _warn_mixed_rows(path: Path, result: dict[str, list[str]], seen_empty: set[str]) -> None:
    """Log the ids that have both ``-1`` and positive rows (the positive rows were kept)."""
    for image_id in sorted(i for i in seen_empty if result[i]):
        log.warning(
            "%s: ImageId %s has both -1 and positive rows; keeping the %d positive row(s)",
            path,
            image_id,
            len(result[image_id]),
        )
