import csv
import logging
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pneumoseg.data.rle import (
    RLEError,
    absolute_to_relative,
    check_rle,
    read_rle_csv,
    relative_to_absolute,
    rle_decode,
    rle_encode,
    rle_to_runs,
    union_mask,
)
from pneumoseg.errors import DataError, MissingFileError

ID_301 = "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"
ID_307 = "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"


def _mask(shape, pixels):
    m = np.zeros(shape, np.uint8)
    for r, c in pixels:
        m[r, c] = 1
    return m


# (shape, foreground pixels as (row, col), relative RLE, absolute RLE) — computed by hand from
# the column-major index col * H + row.
HAND_CASES = [
    ((3, 3), [], "-1", "-1"),
    ((3, 3), [(0, 0)], "0 1", "1 1"),  # first pixel
    ((3, 3), [(2, 2)], "8 1", "9 1"),  # last pixel
    ((3, 3), [(r, c) for r in range(3) for c in range(3)], "0 9", "1 9"),  # full mask
    ((3, 3), [(2, 0), (0, 1), (1, 1)], "2 3", "3 3"),  # one run across a column boundary
    ((4, 5), [(1, 0), (2, 0), (3, 2), (0, 3)], "1 2 8 2", "2 2 12 2"),  # two runs, 2nd wraps
    ((4, 5), [(r, 4) for r in range(4)], "16 4", "17 4"),  # last column full
    ((4, 5), [(0, 0), (0, 1), (0, 2)], "0 1 3 1 3 1", "1 1 5 1 9 1"),  # row 0: one per column
    ((4, 5), [(3, 0)], "3 1", "4 1"),  # orientation: bottom-left
    ((4, 5), [(0, 4)], "16 1", "17 1"),  # orientation: top-right
    ((4, 5), [(3, 4)], "19 1", "20 1"),  # last pixel of a non-square image
]


@pytest.mark.parametrize("shape,pixels,rel,absolute", HAND_CASES)
def test_hand_cases(shape, pixels, rel, absolute):
    m = _mask(shape, pixels)
    assert rle_encode(m) == rel
    assert rle_encode(m, relative=False) == absolute
    f = np.asfortranarray(m)  # the column-major memory layout: the linear-scan path
    assert rle_encode(f) == rel
    assert rle_encode(f, relative=False) == absolute
    np.testing.assert_array_equal(rle_decode(rel, shape), m)
    np.testing.assert_array_equal(rle_decode(absolute, shape, relative=False), m)
    assert relative_to_absolute(rel, shape) == absolute
    assert absolute_to_relative(absolute, shape) == rel


def test_encode_accepts_bool_and_255():
    m = _mask((4, 5), [(1, 0), (2, 0)])
    assert rle_encode(m.astype(bool)) == "1 2"
    assert rle_encode(m * 255) == "1 2"


def test_decode_output_is_row_major_uint8():
    m = rle_decode("1 2", (4, 5))
    assert m.dtype == np.uint8 and m.flags.c_contiguous and m.shape == (4, 5)


MALFORMED = [
    ("1 2 3", "odd number of tokens"),
    ("1 a", "non-integer"),
    ("1 2.5", "non-integer"),
    ("-3 2", "negative"),
    ("1 -2", "negative"),
    ("- 2", "non-integer"),
    ("8 2", "past the end"),
    ("0 5 1 5", "past the end"),
    ("0 0", "zero-length"),
    ("1 99999999999999999999", "too large"),
]


@pytest.mark.parametrize("rle,message", MALFORMED)
def test_malformed_rle(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, (3, 3))


def test_absolute_starts_are_one_indexed():
    with pytest.raises(ValueError, match="negative"):
        rle_decode("0 1", (3, 3), relative=False)


def test_absolute_to_relative_rejects_overlap():
    with pytest.raises(ValueError, match="overlaps"):
        absolute_to_relative("5 3 6 1", (3, 3))


@settings(max_examples=300, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 24), st.integers(1, 24)),
        elements=st.integers(0, 1),
    )
)
def test_roundtrip_property(m):
    for relative in (True, False):
        rle = rle_encode(m, relative=relative)
        np.testing.assert_array_equal(rle_decode(rle, m.shape, relative=relative), m)
    rel = rle_encode(m)
    assert absolute_to_relative(relative_to_absolute(rel, m.shape), m.shape) == rel


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_roundtrip_blobs(seed, fill):
    # Sparse/dense blocky masks exercise the bounding-box fast path and runs that wrap columns.
    rng = np.random.default_rng(seed)
    m = (rng.random((8, 12)) < fill).astype(np.uint8).repeat(4, 0).repeat(3, 1)
    np.testing.assert_array_equal(rle_decode(rle_encode(m), m.shape), m)


# ---------------------------------------------------------------- real bytes
def test_real_301_matches_independent_png(real_dir):
    rles = read_rle_csv(real_dir / "train_extract" / "train-rle-extract.csv")
    mask = union_mask(rles[ID_301])
    png = np.asarray(Image.open(real_dir / "train_extract" / f"{ID_301}_mask.png")) > 0
    assert png.sum() == 10_133
    assert (mask.astype(bool) & ~png).sum() == 0  # lies entirely inside the PNG
    assert (mask.astype(bool) & png).sum() == 10_099
    # The same runs read row-major barely overlap: the orientation is really column-major.
    assert (mask.T.astype(bool) & png).sum() == 1_336


def _real_csvs(real_dir):
    return [
        real_dir / "sample_images" / "train-rle-sample.csv",
        real_dir / "train_extract" / "train-rle-extract.csv",
        real_dir / "stage2_test" / "stage_2_sample_submission.csv",
    ]


def test_real_rows_roundtrip(real_dir):
    n = 0
    for path in _real_csvs(real_dir):
        for rles in read_rle_csv(path).values():
            for rle in rles:
                m = rle_decode(rle)
                assert rle_encode(m) == " ".join(rle.split())
                absolute = relative_to_absolute(rle)
                np.testing.assert_array_equal(rle_decode(absolute, relative=False), m)
                assert absolute_to_relative(absolute) == " ".join(rle.split())
                assert rle_to_runs(rle)[:, 1].sum() == m.sum()
                n += 1
    assert n == 5 + 1 + 4  # sample positives, 301, and 307's four instances


def test_read_sample_csv_bom_no_header(real_dir):
    rles = read_rle_csv(real_dir / "sample_images" / "train-rle-sample.csv")
    assert len(rles) == 10
    assert all(k.startswith("1.2.276.") for k in rles)  # BOM stripped, no header row eaten
    assert sum(bool(v) for v in rles.values()) == 5
    assert all(not v[0].startswith(" ") for v in rles.values() if v)


def test_read_extract_csv_instances_union(real_dir):
    rles = read_rle_csv(real_dir / "train_extract" / "train-rle-extract.csv")
    assert list(rles) == [ID_301, ID_307]
    assert len(rles[ID_307]) == 4
    parts = [rle_decode(r) for r in rles[ID_307]]
    union = union_mask(rles[ID_307])
    np.testing.assert_array_equal(union, np.maximum.reduce(parts))
    assert union.sum() < sum(p.sum() for p in parts)  # the instances overlap


def test_read_stage2_sample_submission(real_dir):
    rles = read_rle_csv(real_dir / "stage2_test" / "stage_2_sample_submission.csv")
    assert len(rles) == 3_205
    assert all(v == [] for v in rles.values())


# ---------------------------------------------------------------- CSV edge cases
def test_csv_duplicates_and_conflicts(tmp_path, caplog):
    p = tmp_path / "x.csv"
    p.write_text("ImageId, EncodedPixels\na, -1\na, -1\nb, -1\nb, 1 2\nc, 0 1\nc, 3 1\n")
    with caplog.at_level(logging.WARNING):
        rles = read_rle_csv(p, shape=(3, 3))
    assert rles == {"a": [], "b": ["1 2"], "c": ["0 1", "3 1"]}
    assert "ImageId b has both -1 and positive rows" in caplog.text
    assert "ImageId a" not in caplog.text


@pytest.mark.parametrize(
    "body,message",
    [
        ("a,-1\nbad.id,1 2 3\n", r"x\.csv:2: ImageId bad\.id: malformed RLE: odd"),
        ("ImageId,EncodedPixels\na,1 x\n", r"x\.csv:2: ImageId a: .*non-integer"),
        ("a,-1\nb,8 5\n", r"x\.csv:2: ImageId b: .*past the end"),
        ("a,-1,3\n", r"x\.csv:1: expected 2 columns"),
        (",1 2\n", r"x\.csv:1: empty ImageId"),
    ],
)
def test_csv_errors_name_line_and_id(tmp_path, body, message):
    p = tmp_path / "x.csv"
    p.write_text(body)
    with pytest.raises(ValueError, match=message):
        read_rle_csv(p, shape=(3, 3))


def test_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        read_rle_csv(tmp_path / "nope.csv")


# ---------------------------------------------------------------- memory layouts
def _layouts(m):
    """The same mask as C-ordered, Fortran-ordered, a competition-style decode (a transposed
    column-major buffer), a bool array and a Fortran-ordered 0/255 array."""
    flat = m.flatten(order="F")
    comp = flat.reshape(m.shape[1], m.shape[0]).T  # how the competition's rle2mask builds masks
    assert np.array_equal(comp, m)
    return [m, np.asfortranarray(m), comp, m.astype(bool), np.asfortranarray(m) * 255]


def _views(m):
    """The mask as views into larger arrays: Fortran-ordered and C-ordered sub-blocks at an
    unaligned offset, and every second pixel of a twice-as-large array."""
    h, w = m.shape
    out = []
    for order in ("F", "C"):
        big = np.zeros((h + 3, w + 5), np.uint8, order=order)
        big[1 : 1 + h, 3 : 3 + w] = m
        out.append(big[1 : 1 + h, 3 : 3 + w])
    sparse = np.zeros((2 * h, 2 * w), np.uint8)
    sparse[::2, ::2] = m
    return [*out, sparse[::2, ::2]]


# (shape, foreground pixels as (row, col), relative RLE, absolute RLE), written by hand from the
# column-major index col * H + row, for shapes that exercise the encoders' paths: rows of 10, 20
# and 70 bytes (8-byte words with ragged tails), runs wrapping columns, one-row masks.
LAYOUT_CASES = [
    # rows 2..4 of columns 3..5 of a 16x20: starts 3*16+2 = 50, 66, 82
    ((16, 20), [(r, c) for r in range(2, 5) for c in range(3, 6)], "50 3 13 3 13 3",
     "51 3 67 3 83 3"),
    # 9x10: the bottom of column 0 and top of column 1 are one run (7..10), then the last pixel
    ((9, 10), [(7, 0), (8, 0), (0, 1), (1, 1), (8, 9)], "7 4 78 1", "8 4 90 1"),
    # 64x70: all of column 0 + 10 px of column 1 (one run of 74), then rows 60..63 of column 69
    ((64, 70), [(r, 0) for r in range(64)] + [(r, 1) for r in range(10)]
     + [(r, 69) for r in range(60, 64)], "0 74 4402 4", "1 74 4477 4"),
    # the diagonal of an 8x8: indices 0, 9, 18, ..., 63
    ((8, 8), [(i, i) for i in range(8)], "0 1" + " 8 1" * 7,
     "1 1 10 1 19 1 28 1 37 1 46 1 55 1 64 1"),
    # one row: the index is the column
    ((1, 37), [(0, 0), (0, 1), (0, 8), (0, 35), (0, 36)], "0 2 6 1 26 2", "1 2 9 1 36 2"),
    # the top row of a 3x5: one pixel per column
    ((3, 5), [(0, c) for c in range(5)], "0 1 2 1 2 1 2 1 2 1", "1 1 4 1 7 1 10 1 13 1"),
]  # fmt: skip


@pytest.mark.parametrize("shape,pixels,rel,absolute", LAYOUT_CASES, ids=lambda x: str(x)[:12])
def test_every_layout_gives_the_reference_string(shape, pixels, rel, absolute):
    m = _mask(shape, pixels)
    for arr in [*_layouts(m), *_views(m)]:
        assert rle_encode(arr) == rel, (arr.flags, arr.dtype, arr.strides)
        assert rle_encode(arr, relative=False) == absolute, (arr.flags, arr.dtype, arr.strides)
    np.testing.assert_array_equal(rle_decode(rel, shape), m)
    np.testing.assert_array_equal(rle_decode(absolute, shape, relative=False), m)


EDGE_MASKS = [
    np.zeros((7, 9), np.uint8),  # empty
    np.ones((7, 9), np.uint8),  # full
    np.ones((64, 64), np.uint8),  # full, whole 32-word blocks
    _mask((5, 6), [(0, 0)]),  # first pixel
    _mask((5, 6), [(4, 5)]),  # last pixel
    _mask((5, 6), [(2, 3)]),  # single pixel
    _mask((1, 1), [(0, 0)]),
    np.zeros((1, 1), np.uint8),
    _mask((1, 37), [(0, 0), (0, 1), (0, 8), (0, 35), (0, 36)]),  # 1xN, ends on the last pixel
    _mask((37, 1), [(0, 0), (1, 0), (16, 0), (36, 0)]),  # Nx1
    np.ones((1, 37), np.uint8),
    np.ones((37, 1), np.uint8),
    (np.arange(64 * 70).reshape(64, 70) % 2).astype(np.uint8),  # alternating: the most runs
]


@pytest.mark.parametrize("m", EDGE_MASKS, ids=lambda m: f"{m.shape}-{int(m.sum())}px")
def test_encode_same_for_every_layout(m):
    for relative in (True, False):
        want = rle_encode(m, relative=relative)
        for arr in _layouts(m):
            assert rle_encode(arr, relative=relative) == want, (arr.flags, arr.dtype)
        np.testing.assert_array_equal(rle_decode(want, m.shape, relative=relative), m)


def test_encode_strided_and_unaligned_views():
    rng = np.random.default_rng(1)
    big = np.asfortranarray((rng.random((63, 70)) < 0.4).astype(np.uint8))
    views = [
        big[:, 1:],  # Fortran-contiguous, data 63 bytes in: not 8-byte aligned
        big[:, 3:40],
        big[1:, :],  # not contiguous either way
        big[::2, ::3],
        big.T,  # C-contiguous, width 63
        np.ascontiguousarray(big)[:, 5:],
    ]
    for v in views:
        for relative in (True, False):
            assert rle_encode(v, relative) == rle_encode(np.ascontiguousarray(v), relative)


@settings(max_examples=300, deadline=None)
@given(
    arrays(
        np.uint8,
        st.one_of(
            st.tuples(st.integers(1, 40), st.integers(1, 40)),
            st.tuples(st.just(1), st.integers(1, 600)),  # 1xN
            st.tuples(st.integers(1, 600), st.just(1)),  # Nx1
        ),
        elements=st.integers(0, 1),
    )
)
def test_fortran_order_property(m):
    f = np.asfortranarray(m)
    for relative in (True, False):
        assert rle_encode(m, relative) == rle_encode(f, relative)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.integers(1, 9), st.integers(1, 9))
def test_fortran_order_blobs_property(seed, fill, ry, rx):
    # Long runs crossing 8-byte words and 256-byte blocks, with ragged tails (sizes % 8 != 0).
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 30)), int(rng.integers(1, 30))
    m = (rng.random((h, w)) < fill).astype(np.uint8).repeat(ry, 0).repeat(rx, 1)
    f = np.asfortranarray(m)
    for relative in (True, False):
        rle = rle_encode(m, relative)
        assert rle_encode(f, relative) == rle
        np.testing.assert_array_equal(rle_decode(rle, m.shape, relative), m)


def test_fortran_order_1024_random():
    rng = np.random.default_rng(2)
    for fill in (0.0, 0.001, 0.3, 0.5, 0.999, 1.0):
        m = (rng.random((1024, 1024)) < fill).astype(np.uint8)
        for relative in (True, False):
            assert rle_encode(m, relative) == rle_encode(np.asfortranarray(m), relative)


# ---------------------------------------------------------------- absolute RLE checks
@pytest.mark.parametrize(
    "rle",
    [
        "5 3 6 1",  # overlaps the previous run
        "5 3 7 1",  # starts inside the previous run (ends at 7, 1-indexed)
        "6 1 2 1",  # starts before the previous run
        "3 1 3 1",  # the same start twice
    ],
)
def test_absolute_runs_must_increase_without_overlap(rle):
    with pytest.raises(RLEError, match="overlaps or precedes the previous run"):
        rle_decode(rle, (4, 4), relative=False)
    with pytest.raises(RLEError, match="overlaps or precedes"):
        check_rle(rle, relative=False)  # the same check without the image size


def test_absolute_touching_runs_are_valid():
    # run 1 covers pixels 1-2 (1-indexed); the next may start at 3
    m = rle_decode("1 2 3 1 9 2", (4, 4), relative=False)
    assert m.sum() == 5
    check_rle("1 2 3 1 9 2", relative=False)


def test_relative_rle_read_as_absolute_is_an_error():
    # The bug: relative RLE decoded as absolute gave ~1% of the mask; now it is refused.
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 20:30] = 1
    rel = rle_encode(m)  # "1290 30 34 30 ..."
    with pytest.raises(RLEError, match="overlaps or precedes") as exc:
        rle_decode(rel, (64, 64), relative=False)
    assert exc.value.likely == "relative" and "looks like relative RLE" in str(exc.value)
    assert isinstance(exc.value, DataError) and isinstance(exc.value, ValueError)


def test_absolute_rle_read_as_relative_suggests_absolute():
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 20:30] = 1
    absolute = rle_encode(m, relative=False)
    with pytest.raises(RLEError, match="past the end") as exc:
        rle_decode(absolute, (64, 64), relative=True)
    assert exc.value.likely == "absolute" and "looks like absolute RLE" in str(exc.value)


def test_relative_past_end_suggests_checking_format_and_size():
    with pytest.raises(RLEError, match=r"check that the RLE is relative .* image is 3x3") as exc:
        rle_decode("7 1 0 5", (3, 3))  # fits neither form
    assert exc.value.likely is None


# ---------------------------------------------------------------- CSV: format, lines, errors
def _csv(tmp_path, body, name="x.csv"):
    p = tmp_path / name
    p.write_text(body)
    return p


@pytest.mark.parametrize("shape", [(64, 64), None])
def test_csv_relative_rows_with_absolute_format(tmp_path, shape):
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 20:30] = 1
    p = _csv(tmp_path, f"ImageId,EncodedPixels\na,-1\nimg7,{rle_encode(m)}\n")
    with pytest.raises(DataError) as exc:
        read_rle_csv(p, shape=shape, relative=False)
    text = str(exc.value)
    assert f"{p}:3: ImageId img7: malformed RLE: run overlaps" in text
    assert "looks like relative RLE" in text and "set data.rle_format=relative" in text
    assert read_rle_csv(p, shape=shape, relative=True)["img7"] == [rle_encode(m)]


def test_csv_absolute_rows_with_relative_format(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 20:30] = 1
    p = _csv(tmp_path, f"ImageId,EncodedPixels\nimg7,{rle_encode(m, relative=False)}\n")
    with pytest.raises(DataError, match=r"x\.csv:2: ImageId img7: .*past the end") as exc:
        read_rle_csv(p, shape=(64, 64), relative=True)
    assert "looks like absolute RLE" in str(exc.value)
    assert "set data.rle_format=absolute" in str(exc.value)
    assert read_rle_csv(p, shape=(64, 64), relative=False)["img7"]


def test_csv_relative_past_end_suggests_format_and_size(tmp_path):
    p = _csv(tmp_path, "a,7 1 0 5\n")
    with pytest.raises(DataError, match=r"x\.csv:1: ImageId a: .*past the end.*check that the RLE"):
        read_rle_csv(p, shape=(3, 3))


@pytest.mark.parametrize(
    "body,message",
    [
        ("a,-1\nbad.id,1 2 3\n", r"x\.csv:2: ImageId bad\.id: malformed RLE: odd"),
        ("a,-1\n\nb,1 0\n", r"x\.csv:3: ImageId b: malformed RLE: zero-length"),
        ("a,1 -2\n", r"x\.csv:1: ImageId a: malformed RLE: negative"),
        ("h,1 x\n", r"x\.csv:1: ImageId h: .*non-integer"),
    ],
)
def test_csv_without_shape_checks_what_it_can(tmp_path, body, message):
    # shape=None (the manifest builder's first pass) still refuses rows broken at any size
    p = _csv(tmp_path, body)
    with pytest.raises(DataError, match=message):
        read_rle_csv(p, shape=None)


def test_csv_lines_out_parameter(tmp_path):
    p = _csv(
        tmp_path,
        "ImageId, EncodedPixels\na, -1\nb, 1 2\n\nc, 0 1\nb, 5 1\na, -1\nd, -1\nd, 3 1\n",
    )
    lines: dict[str, list[int]] = {}
    rles = read_rle_csv(p, shape=(3, 3), lines=lines)
    assert rles == {"a": [], "b": ["1 2", "5 1"], "c": ["0 1"], "d": ["3 1"]}
    assert lines == {"a": [2, 7], "b": [3, 6], "c": [5], "d": [9]}  # aligned with the rows kept


def test_csv_typed_errors(tmp_path):
    with pytest.raises(MissingFileError, match=r"nope\.csv"):
        read_rle_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"x\.csv:1: expected 2 columns"):
        read_rle_csv(_csv(tmp_path, "a,-1,3\n"))


def test_csv_not_utf8_is_a_data_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"ImageId,EncodedPixels\na,-1\nb,1 2\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(DataError, match=r"x\.csv:4 \(byte 0x89\): not UTF-8 text"):
        read_rle_csv(p)
    p.write_bytes(bytes(range(256)) * 40)  # a binary file
    with pytest.raises(DataError, match=r"x\.csv:.*not UTF-8 text"):
        read_rle_csv(p)


def test_csv_nul_byte_is_a_data_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"a,-1\nb,1\x002\n")
    with pytest.raises(DataError, match=r"x\.csv:2"):
        read_rle_csv(p)


def test_csv_module_errors_are_data_errors(tmp_path, monkeypatch):
    import pneumoseg.data.rle as rle_mod

    p = _csv(tmp_path, "a,-1\nb,1 2 3 4 5 6 7 8 9 10 11 12\n")
    old = csv.field_size_limit()
    monkeypatch.setattr(rle_mod, "raise_csv_field_limit", lambda *a: None)
    try:
        csv.field_size_limit(10)  # provoke a _csv.Error
        with pytest.raises(DataError, match=r"x\.csv:2: not a readable CSV \(field larger"):
            read_rle_csv(p)
    finally:
        csv.field_size_limit(old)


# ---------------------------------------------------------------- the manifest's bad rows
def test_manifest_bad_rows_name_csv_line_and_id(real_dir, tmp_path, caplog):
    from pneumoseg.data.dataset import build_manifest

    src = real_dir / "sample_images"
    dcms = sorted(src.glob("*.dcm"))
    for f in dcms:
        shutil.copy(f, tmp_path / f.name)
    ids = [f.stem for f in dcms]
    # 7 rows (more than a summary's usual examples) that cannot fit a 1024x1024 image
    bad = {i: f"{1024 * 1024 - 5 + k} 10" for k, i in enumerate(ids[:7])}
    rows = ["ImageId,EncodedPixels"]
    for i in ids:
        rows.append(f"{i},{bad.get(i, '-1')}")
    (tmp_path / "rle.csv").write_text("\n".join(rows) + "\n")
    cfg = {"layout": "siim", "root": str(tmp_path), "train_images": ".", "rle_csv": "rle.csv"}
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.dataset"):
        df = build_manifest(cfg, "train", strict=False)
    assert sorted(df["id"]) == sorted(ids[7:])  # the bad rows are left out
    assert "7 mask(s) that do not fit their image" in caplog.text
    for k, i in enumerate(ids[:7]):  # every one listed, with its line
        assert f"{tmp_path / 'rle.csv'}:{k + 2}: ImageId {i}: malformed RLE: run goes past" in (
            caplog.text
        ), i
    with pytest.raises(ValueError, match=r"rle\.csv:2: ImageId .*past the end"):
        build_manifest({**cfg, "strict": True}, "train")


def test_manifest_csv_in_the_other_format(real_dir, tmp_path):
    from pneumoseg.data.dataset import build_manifest

    src = real_dir / "sample_images"
    for f in src.glob("*.dcm"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(src / "train-rle-sample.csv", tmp_path / "rle.csv")  # relative RLE
    cfg = {"layout": "siim", "root": str(tmp_path), "train_images": ".", "rle_csv": "rle.csv"}
    with pytest.raises(DataError, match=r"rle\.csv:\d+: ImageId .*set data.rle_format=relative"):
        build_manifest({**cfg, "rle_format": "absolute"}, "train")


def test_manifest_absolute_csv_read_as_relative(real_dir, tmp_path, caplog):
    from pneumoseg.data.dataset import build_manifest

    src = real_dir / "sample_images"
    for f in src.glob("*.dcm"):
        shutil.copy(f, tmp_path / f.name)
    rel = read_rle_csv(src / "train-rle-sample.csv")
    rows = ["ImageId,EncodedPixels"]
    for i, rles in rel.items():
        rows += [f"{i},{relative_to_absolute(r)}" for r in rles] or [f"{i},-1"]
    (tmp_path / "abs.csv").write_text("\n".join(rows) + "\n")
    cfg = {"layout": "siim", "root": str(tmp_path), "train_images": ".", "rle_csv": "abs.csv"}
    df = build_manifest({**cfg, "rle_format": "absolute"}, "train")
    assert int(df["has_mask"].sum()) == 5
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.dataset"):
        df = build_manifest(cfg, "train")  # relative (default): the positives do not fit
    assert len(df) == 5 and not df["has_mask"].any()
    assert caplog.text.count("it looks like absolute RLE: set data.rle_format=absolute") == 5
