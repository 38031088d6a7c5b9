"""Run-length encoding of SIIM masks, and reading RLE CSV files.

The competition's RLE runs over the **column-major** flattening of the H×W mask (pixel index
``col * H + row``). Two start conventions exist:

* ``relative=True`` (the competition's ``train-rle.csv``): each start counts the pixels skipped since
  the end of the previous run, the first from pixel 0;
* ``relative=False`` (absolute, 1-indexed, as in most other Kaggle competitions).

An empty mask is the single token ``-1``. Masks in memory are row-major uint8 0/1 H×W arrays in
image orientation; this module is the only place that knows about column-major order.

Both directions are numba kernels compiled with ``cache=True``, so the compile cost is paid once per
machine (not per process, and never inside a per-image loop).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numba
import numpy as np

log = logging.getLogger(__name__)

EMPTY = "-1"
DEFAULT_SHAPE = (1024, 1024)

# Error codes returned by the numba kernels (they cannot raise formatted errors themselves).
_OK, _ERR_CHAR, _ERR_ODD, _ERR_NEG, _ERR_PAST_END, _ERR_ZERO_LEN, _ERR_OVERFLOW = range(7)
_ERR_TEXT = {
    _ERR_CHAR: "non-integer token",
    _ERR_ODD: "odd number of tokens (starts and lengths must pair up)",
    _ERR_NEG: "negative start or length",
    _ERR_PAST_END: "run goes past the end of the image",
    _ERR_ZERO_LEN: "zero-length run",
    _ERR_OVERFLOW: "number too large",
}


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
def _fill_runs(tokens, n_tokens, relative, height, width, out):  # pragma: no cover - compiled
    """Paint the runs into the row-major ``out`` (H×W uint8). Returns ``(error_code, run_index)``.

    Runs are column-major: flat index ``p`` is pixel ``(p % H, p // H)``. Writing straight into the
    row-major array avoids a full-image transpose copy.
    """
    if n_tokens % 2 != 0:
        return _ERR_ODD, n_tokens // 2
    total = height * width
    pos = 0
    for k in range(n_tokens // 2):
        s = tokens[2 * k]
        length = tokens[2 * k + 1]
        if s < 0 or length < 0:
            return _ERR_NEG, k
        if length == 0:
            return _ERR_ZERO_LEN, k
        if relative:
            start = pos + s
        else:
            if s < 1:
                return _ERR_NEG, k  # absolute starts are 1-indexed
            start = s - 1
        end = start + length
        if end > total:
            return _ERR_PAST_END, k
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
def _runs_to_ascii(starts, ends, relative, buf):  # pragma: no cover - compiled
    """Sort the edges, merge runs that wrap from one column's bottom into the next column's top,
    and write "start length start length ..." as ASCII into ``buf``. Returns the byte count."""
    starts = np.sort(starts)
    ends = np.sort(ends)
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
        raise ValueError(f"malformed RLE: {_ERR_TEXT[err]} (token {idx}: {bad[:30]!r})")
    return out[:n]


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
    several instances without allocating). Raises ``ValueError`` describing malformed input.
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
        form = "relative" if relative else "absolute"
        detail = ""
        if err != _ERR_ODD:
            detail = f" (run {k}: start {tokens[2 * k]}, length {tokens[2 * k + 1]})"
        raise ValueError(
            f"malformed RLE: {_ERR_TEXT[err]}{detail}; {form} form, image {height}x{width}"
        )
    return out


def rle_encode(mask: np.ndarray, relative: bool = True) -> str:
    """Encode an H×W mask (any dtype; nonzero = foreground) to an RLE string; ``"-1"`` if empty."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        mask = (mask != 0).view(np.uint8)
    height, width = mask.shape
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


def read_rle_csv(
    path: str | Path,
    shape: Sequence[int] | None = DEFAULT_SHAPE,
    relative: bool = True,
) -> dict[str, list[str]]:
    """Read a SIIM RLE CSV into ``{ImageId: [rle, ...]}`` in file order.

    Handles every variant the competition shipped: UTF-8 BOM, no header (``train-rle-sample.csv``),
    the ``ImageId, EncodedPixels`` header with its space (``train-rle.csv``), leading spaces, CRLF,
    ``-1`` rows and several rows per image (instances, kept as a list; see :func:`union_mask`).
    A negative image maps to ``[]``. Duplicate ``-1`` rows collapse; an id with both positive and
    ``-1`` rows is logged and the positive rows win.

    Every RLE is validated (against ``shape`` when given); errors name the file, line and ImageId.
    """
    path = Path(path)
    result: dict[str, list[str]] = {}
    seen_empty: set[str] = set()
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise FileNotFoundError(f"cannot open RLE CSV {path}: {e}") from e
    with fh:
        reader = csv.reader(fh)
        for lineno, row in enumerate(reader, start=1):
            if not row or all(not c.strip() for c in row):
                continue
            cells = [c.strip() for c in row]
            if lineno == 1 and cells[0].lower() in _ID_NAMES:
                continue  # header
            if len(cells) != 2:
                raise ValueError(
                    f"{path}:{lineno}: expected 2 columns (ImageId, EncodedPixels), got {len(cells)}"
                )
            image_id, rle = cells
            if not image_id:
                raise ValueError(f"{path}:{lineno}: empty ImageId")
            rles = result.setdefault(image_id, [])
            if is_empty_rle(rle):
                seen_empty.add(image_id)
                continue
            try:
                if shape is not None:
                    rle_decode(rle, shape, relative)
                else:
                    _parse(rle)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: ImageId {image_id}: {e}") from None
            rles.append(rle)
    for image_id in sorted(i for i in seen_empty if result[i]):
        log.warning(
            "%s: ImageId %s has both -1 and positive rows; keeping the %d positive row(s)",
            path,
            image_id,
            len(result[image_id]),
        )
    return result
