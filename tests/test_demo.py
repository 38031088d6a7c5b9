"""The demo's result as data, and the summary ``make demo`` prints from it (digit for digit)."""

import pandas as pd
import pytest

from pneumoseg.demo import DemoResult
from pneumoseg.demo.run import REPO

# A tiny demo's summary as src/demo.py printed it before the demo became pneumoseg.demo.run_demo
# (its outputs here inside the repository, so their paths are shown relative to it).
SUMMARY = """
========================================================================
pneumoseg demo: summary
========================================================================
Out-of-fold mean Dice per fold (all-empty = predict nothing anywhere):
fold                                      fold0  fold1   mean    std
all-empty (p>1, min_area 0)              0.7143 0.8000 0.7571 0.0429
raw 0.5 (p>0.5, min_area 0)              0.0120 0.0086 0.0103 0.0017
best threshold (p>0.6, min_area 0)       0.7143 0.8000 0.7571 0.0429
best triplet (top 0.6×256px, bottom 0.2) 0.7143 0.8000 0.7571 0.0429
Tuned post-processing (runs/demo/postprocess.yaml): method=threshold, threshold=0.6, min_area=0, cv_dice=0.75
Submission submissions/demo.csv vs the synthetic test truth (3 images): mean Dice 0.6667 (all-empty baseline 0.6667), Dice on positives 0.0000
Wall time per stage: synthetic data 15 s, preprocess 59 s, folds 58 s, train 77 s, tune 20 s, predict 31 s, validate 9 s, total 270 s
Machine: AMD EPYC, torch 2.14.1+cu130 AVX2, 2 thread(s) (numbers reproduce bit for bit on the same machine only)"""


def tiny_result() -> DemoResult:
    oof = pd.DataFrame(
        [
            [0.714285714, 0.8, 0.757142857, 0.042857143],
            [0.012, 0.0086, 0.0103, 0.0017],
            [0.714285714, 0.8, 0.757142857, 0.042857143],
            [0.714285714, 0.8, 0.757142857, 0.042857143],
        ],
        index=[
            "all-empty (p>1, min_area 0)",
            "raw 0.5 (p>0.5, min_area 0)",
            "best threshold (p>0.6, min_area 0)",
            "best triplet (top 0.6×256px, bottom 0.2)",
        ],
        columns=pd.Index(["fold0", "fold1", "mean", "std"], name="fold"),
    )
    tuned = {"method": "threshold", "threshold": 0.6, "min_area": 0, "top_threshold": None,
             "cv_dice": 0.75}  # fmt: skip
    scores = {"dice": 2 / 3, "pos_dice": 0.0, "n": 3, "n_pos": 1, "n_pred_pos": 0}
    timings = {"synthetic data": 15.2, "preprocess": 59.0, "folds": 58.4, "train": 77.0,
               "tune": 20.1, "predict": 31.0, "validate": 9.3, "total": 270.0}  # fmt: skip
    return DemoResult(
        "run", [], REPO / "data" / "synthetic", REPO / "runs" / "demo",
        REPO / "submissions" / "demo.csv", oof=oof, tuned=tuned, scores=scores, timings=timings,
        machine="AMD EPYC, torch 2.14.1+cu130 AVX2, 2 thread(s)",
    )  # fmt: skip


def test_summary_digit_for_digit():
    result = tiny_result()
    assert result.ran and result.tuning == REPO / "runs" / "demo" / "postprocess.yaml"
    assert result.empty_baseline == pytest.approx(2 / 3)
    assert result.tuned_setting() == "method=threshold, threshold=0.6, min_area=0, cv_dice=0.75"
    assert result.summary() == SUMMARY


def test_clean_has_no_summary():
    result = DemoResult("clean", ["/x/data"])
    assert not result.ran
    with pytest.raises(ValueError, match="no summary"):
        result.summary()


def test_summary_prints_the_report_headline():
    result = tiny_result()
    result.report = "CV Dice 0.757 [0.700, 0.800] (95% bootstrap over 9 patients, 9 images)"
    lines = result.summary().splitlines()
    at = lines.index(next(x for x in lines if x.startswith("Tuned post-processing")))
    assert lines[at + 1] == (
        "OOF report (runs/demo/report/report.html): CV Dice 0.757 [0.700, 0.800] (95% bootstrap "
        "over 9 patients, 9 images)"
    )
    assert [x for x in lines if not x.startswith("OOF report")] == SUMMARY.splitlines()
