"""Submission rows longer than csv's default field limit, and unreadable submission files."""

import csv
import importlib
import sys

import numpy as np
import pytest

from pneumoseg.data.rle import CSV_FIELD_LIMIT, max_rle_chars, read_rle_csv, rle_decode, rle_encode
from pneumoseg.errors import MissingFileError, SubmissionError
from pneumoseg.inference.submission import (
    read_sample_ids,
    score_submission,
    validate_submission,
    write_submission,
)

from conftest import REPO

sys.path.insert(0, str(REPO / "src"))
validate_cli = importlib.import_module("validate_submission")

DEFAULT_LIMIT = 131_072
SHAPE = (1024, 1024)


@pytest.fixture(autouse=True)
def default_csv_limit():
    """Each test starts from csv's default limit, as a fresh process does."""
    old = csv.field_size_limit(DEFAULT_LIMIT)
    yield
    csv.field_size_limit(old)


def _many_runs_mask(seed: int = 0) -> np.ndarray:
    """A valid 1024² mask whose RLE is far longer than 131,072 characters: a noisy patch."""
    rng = np.random.default_rng(seed)
    m = np.zeros(SHAPE, np.uint8)
    m[100:700, 200:600] = rng.random((600, 400)) < 0.5
    return m


@pytest.fixture()
def long_sub(tmp_path):
    mask = _many_runs_mask()
    rle = rle_encode(mask)
    assert len(rle) > DEFAULT_LIMIT
    sub = write_submission({"ID_long": rle, "ID_neg": "-1"}, tmp_path / "sub.csv")
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,EncodedPixels\nID_long,-1\nID_neg,-1\n")
    return sub, sample, mask, rle


def test_long_row_read_rle_csv(long_sub):
    sub, _, mask, rle = long_sub
    assert max(len(line) for line in sub.read_text().splitlines()) > DEFAULT_LIMIT
    rles = read_rle_csv(sub, shape=SHAPE)
    assert rles == {"ID_long": [rle], "ID_neg": []}
    np.testing.assert_array_equal(rle_decode(rles["ID_long"][0], SHAPE), mask)
    assert read_rle_csv(sub, shape=None)["ID_long"] == [rle]


def test_long_row_library_validate_read_ids_and_score(long_sub):
    sub, sample, _, _ = long_sub
    assert validate_submission(sub, sample, SHAPE) == []
    assert read_sample_ids(sub) == ["ID_long", "ID_neg"]
    s = score_submission(sub, sub, SHAPE)  # the file against itself: perfect
    assert s["dice"] == 1.0 and s["n"] == 2 and s["n_pos"] == 1


def test_long_row_cli(long_sub, capsys):
    sub, sample, _, _ = long_sub
    assert validate_cli.main([str(sub), "--sample", str(sample)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {sub}: 2 rows, 1 positive, relative RLE at 1024x1024")


def test_longest_possible_row(tmp_path):
    # Alternating pixels in every column: the most runs a 1024² image can have.
    m = np.zeros(SHAPE, np.uint8)
    m[::2] = 1
    for relative, form in ((True, "relative"), (False, "absolute")):
        rle = rle_encode(m, relative)
        assert len(rle) <= max_rle_chars(SHAPE) <= CSV_FIELD_LIMIT
        sub = write_submission({"ID_x": rle}, tmp_path / f"{form}.csv")
        assert validate_submission(sub, ["ID_x"], SHAPE, relative=relative) == []
        np.testing.assert_array_equal(
            rle_decode(read_rle_csv(sub, SHAPE, relative)["ID_x"][0], SHAPE, relative), m
        )
        assert validate_cli.main([str(sub), "--rle", form]) == 0


def test_field_limit_bound_fits_a_c_long():
    assert DEFAULT_LIMIT < max_rle_chars(SHAPE) < CSV_FIELD_LIMIT < 2**31


def test_competition_decoded_mask_roundtrip(tmp_path):
    # A mask decoded the competition's way is Fortran-ordered; its row must be the same.
    m = _many_runs_mask(1)
    comp = m.flatten(order="F").reshape(SHAPE[1], SHAPE[0]).T
    assert comp.flags.f_contiguous and not comp.flags.c_contiguous
    sub = write_submission({"ID_a": rle_encode(comp)}, tmp_path / "s.csv")
    np.testing.assert_array_equal(rle_decode(read_rle_csv(sub)["ID_a"][0]), m)


# ---------------------------------------------------------------- unreadable submissions
def test_not_utf8_submission(tmp_path):
    p = tmp_path / "sub.csv"
    p.write_bytes(b"ImageId,EncodedPixels\nID_a,-1\n\xff\xfe\x00garbage\n")
    problems = validate_submission(p, ["ID_a"])
    assert len(problems) == 1 and f"{p}:3: not UTF-8 text (byte 0xff)" in problems[0]
    with pytest.raises(SubmissionError, match=r"sub\.csv:3 \(byte 0xff\): not UTF-8 text"):
        read_sample_ids(p)
    assert validate_cli.main([str(p)]) == 1


def test_missing_sample_is_typed(tmp_path):
    with pytest.raises(MissingFileError, match=r"nope\.csv"):
        read_sample_ids(tmp_path / "nope.csv")


def test_relative_rows_validated_as_absolute(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 20:30] = 1
    sub = write_submission({"ID_a": rle_encode(m)}, tmp_path / "s.csv")
    problems = validate_submission(sub, ["ID_a"], (64, 64), relative=False)
    assert len(problems) == 1 and "overlaps or precedes" in problems[0]
    assert "looks like relative RLE" in problems[0]
    assert validate_submission(sub, ["ID_a"], (64, 64), relative=True) == []
