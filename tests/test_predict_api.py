"""Predicting as library calls (``pneumoseg.inference.submit``), on the tiny data set: what
``predict_submission`` and ``predict_images`` return matches the files they write and what
``predict.py`` writes and prints; ``validate_submission_file`` is ``validate_submission.py``'s check."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from pneumoseg.config import load_config
from pneumoseg.data.rle import union_mask
from pneumoseg.errors import MissingFileError, OutputExistsError, SubmissionError
from pneumoseg.inference.submission import (
    read_sample_ids,
    score_submission,
    validate_submission,
    validate_submission_file,
)
from pneumoseg.inference.submit import (
    ImageResult,
    SubmissionResult,
    csv_row,
    predict_images,
    predict_submission,
    submission_path,
)

from conftest import REPO, run_cli, tiny_overrides

sys.path.insert(0, str(REPO / "src"))
import predict

DEMO = str(REPO / "configs" / "demo.yaml")
EXP = "predict_api"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """Experiment ``predict_api`` trained on fold 0 (one step), in its own runs folder."""
    runs = tmp_path_factory.mktemp("runs")
    code, out = run_cli("train", "--config", DEMO, "--fold", "0", "--quiet", *_over(tiny_data, runs),
                        "train.epochs=1", "train.max_steps_per_epoch=1", "train.top_k=1")  # fmt: skip
    assert code == 0, out
    return runs


def _over(tiny_data: Path, runs: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(tiny_data), f"train.out_dir={runs}", f"exp={EXP}", "predict.folds=[0]",
            *extra]  # fmt: skip


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_predict_submission_returns_what_it_wrote(tiny_data, runs, tmp_path):
    over = _over(tiny_data, runs, f"predict.out_dir={tmp_path / 'subs'}")
    cfg = load_config(DEMO, over)
    data = tiny_data / "data"
    sample, truth = data / "stage_2_sample_submission.csv", data / "test-rle.csv"

    r = predict_submission(cfg, quiet=True)
    assert isinstance(r, SubmissionResult)
    assert r.path == submission_path(cfg) == tmp_path / "subs" / f"{EXP}.csv"
    rows = _rows(r.path)
    assert rows[0] == ["ImageId", "EncodedPixels"]
    assert [row[0] for row in rows[1:]] == read_sample_ids(sample)  # the sample's ids, its order
    assert r.rows == r.predicted == len(rows) - 1 == 6
    assert r.positive == sum(row[1] != "-1" for row in rows[1:])
    assert (r.sample, r.missing, r.left_out, r.failed) == (sample, [], [], [])
    assert r.valid and r.relative and validate_submission(r.path, sample, (64, 64)) == []
    assert r.truth == truth and r.score == score_submission(r.path, truth, (64, 64))
    assert r.score["n"] == 6 and r.score["n_pred_pos"] == r.positive

    # the script writes the same file byte for byte
    cli = tmp_path / "cli"
    argv = ["--config", DEMO, "--submission", "--quiet", *over, f"predict.out_dir={cli}"]
    assert predict.main(argv) == 0
    assert (cli / f"{EXP}.csv").read_bytes() == r.path.read_bytes()

    before = r.path.read_bytes()
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        predict_submission(cfg, quiet=True)
    assert r.path.read_bytes() == before

    # absolute RLE, replacing the file: not scored (the truth is relative)
    a = predict_submission(cfg, force=True, rle="absolute", quiet=True)
    assert a.path == r.path and not a.relative and a.score is None and a.truth is None
    assert validate_submission(a.path, sample, (64, 64), relative=False) == []
    assert a.positive == r.positive and a.path.read_bytes() != before

    # a sample with an id without an image, to another path: -1 rows, not scored
    ids = [*read_sample_ids(sample)[:2], "ID_nothere"]
    mine = tmp_path / "sample.csv"
    mine.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in ids))
    m = predict_submission(cfg, out=tmp_path / "m.csv", sample=mine, allow_missing=True, quiet=True)
    assert m.path == tmp_path / "m.csv" and [row[0] for row in _rows(m.path)[1:]] == ids
    assert (m.rows, m.predicted, m.missing, m.sample) == (3, 2, ["ID_nothere"], mine)
    assert sorted(m.left_out) == sorted(set(read_sample_ids(sample)) - set(ids))
    assert _rows(m.path)[3] == ["ID_nothere", "-1"] and m.score is None


def test_predict_images_returns_rows_overlays_and_errors(tiny_data, runs, tmp_path, capsys):
    over = _over(tiny_data, runs)
    cfg = load_config(DEMO, over)
    good = sorted((tiny_data / "data" / "png_images").glob("*.png"))[:2]
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    paths = [good[0], bad, good[1]]
    seen: list[ImageResult] = []

    results = predict_images(cfg, paths, overlay_dir=tmp_path / "ov", on_result=seen.append)
    assert [r.path for r in results] == paths  # one result per path, in their order
    # each reported once, as it came: the unreadable image at once, the batch's predictions after
    assert [r.path for r in seen] == [bad, good[0], good[1]]
    assert all(any(s is r for r in results) for s in seen)
    assert results[1].error and "bad.png: not a DICOM, PNG or JPEG file" in results[1].error
    assert results[1].image_id is None and results[1].rle is None and results[1].overlay is None
    ok = [results[0], results[2]]
    assert [r.image_id for r in ok] == [p.stem for p in good]
    for r in ok:
        assert r.error is None and r.row == csv_row(r.image_id, r.rle)
        mask = union_mask([] if r.rle == "-1" else [r.rle], (64, 64))
        assert r.pixels == int(mask.sum()) and 0.0 <= r.prob <= 1.0
        assert r.overlay == tmp_path / "ov" / f"{r.image_id}.png"
        assert r.overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the script prints exactly these rows, and exits 1 for the unreadable image
    capsys.readouterr()
    code, out = run_cli("predict", "--config", DEMO, *over, *[a for p in paths for a in ("--image", str(p))])  # fmt: skip
    assert code == 1 and "1 of 3 image(s) could not be read" in out and str(bad) in out
    printed = [
        ln for ln in out.splitlines() if ln.startswith(("ImageId,", *(p.stem for p in good)))
    ]
    assert printed == ["ImageId,EncodedPixels", *[r.row for r in ok]]

    # absolute RLE of one image, without overlays; nothing readable -> only errors
    (a,) = predict_images(cfg, [good[0]], rle="absolute")
    mask = union_mask([] if a.rle == "-1" else [a.rle], (64, 64), relative=False)
    assert a.overlay is None and a.error is None and a.pixels == int(mask.sum())
    (b,) = predict_images(cfg, [bad])
    assert b.error and b.rle is None


def test_validate_submission_file(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,EncodedPixels\nID_a,-1\nID_b,-1\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageId,EncodedPixels\nID_a,1 3\nID_b,-1\n")
    check = validate_submission_file(sub, sample, (8, 8))
    assert check.valid and (check.rows, check.positive, check.problems) == (2, 1, [])
    assert (check.path, check.sample) == (sub, sample)
    bad = validate_submission_file(sub, sample, (1, 1))  # the RLE does not fit a 1x1 image
    assert not bad.valid and bad.rows == 0 and any("invalid RLE" in p for p in bad.problems)
    with pytest.raises(MissingFileError, match="submission not found"):
        validate_submission_file(tmp_path / "nope.csv")
    with pytest.raises(MissingFileError, match="sample submission not found"):
        validate_submission_file(sub, tmp_path / "nope.csv")
    with pytest.raises(SubmissionError, match="is a folder"):
        validate_submission_file(tmp_path)
