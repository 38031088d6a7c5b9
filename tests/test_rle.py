import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pneumoseg.rle import (
    absolute_to_relative,
    read_rle_csv,
    relative_to_absolute,
    rle_decode,
    rle_encode,
    rle_to_runs,
    union_mask,
)

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
