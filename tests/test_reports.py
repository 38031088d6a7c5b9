"""The per-experiment report: detection / calibration / bootstrap numbers against hand-computed
values and scikit-learn, and the report folder (PNGs, metrics.json, a self-contained HTML)."""

import json
import math
import re

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pneumoseg.errors import DataError
from pneumoseg.evaluation import detection as det
from pneumoseg.evaluation.cv_report import ReportData, compute_metrics, headline, write_report

# --------------------------------------------------------------------------------------------------
# ROC / PR
# --------------------------------------------------------------------------------------------------
# (labels, scores, AUROC by hand, average precision by hand)
# AUROC = P(score of a positive > score of a negative), ties half: count the (pos, neg) pairs.
# AP = sum_n (R_n - R_{n-1}) P_n walking the thresholds from the highest score down.
RANK_CASES = [
    # pairs (.35>.1 yes, .35>.4 no, .8>both) = 3/4; AP: .8 -> P 1 R 1/2; .35 -> P 2/3 R 1:
    # 1/2·1 + 1/2·2/3 = 5/6
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75, 5 / 6),
    # one tie: half a pair; AP: one threshold, R 1 P 1/2
    ([0, 1], [0.5, 0.5], 0.5, 0.5),
    ([0, 1], [0.2, 0.9], 1.0, 1.0),  # perfect ranking
    # inverted: no pair right; AP: .9 -> P 0 R 0; .1 -> P 1/2 R 1: 1·1/2
    ([1, 0], [0.1, 0.9], 0.0, 0.5),
    # pos .2: beats .1 not .3 (1); pos .4, .5 beat both (2 + 2): 5/6;
    # AP: .5 P 1 R 1/3; .4 P 1 R 2/3; .3 (neg); .2 P 3/4 R 1: 1/3 + 1/3 + 1/3·3/4 = 11/12
    ([0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5], 5 / 6, 11 / 12),
]


@pytest.mark.parametrize("y,score,auroc,ap", RANK_CASES)
def test_auroc_and_average_precision_hand_cases(y, score, auroc, ap):
    assert det.roc_auc(y, score) == (pytest.approx(auroc), "")
    assert det.pr_auc(y, score) == (pytest.approx(ap), "")
    assert det.roc_auc(y, score).value == pytest.approx(roc_auc_score(y, score))
    assert det.pr_auc(y, score).value == pytest.approx(average_precision_score(y, score))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_and_pairs_on_random_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    score = np.round(np.where(y, rng.normal(1, 1, 300), rng.normal(0, 1, 300)), 1)  # with ties
    pos, neg = score[y], score[~y]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert det.roc_auc(y, score).value == pytest.approx(pairs)
    assert det.roc_auc(y, score).value == pytest.approx(roc_auc_score(y, score))
    assert det.pr_auc(y, score).value == pytest.approx(average_precision_score(y, score))
    roc = det.roc_curve_points(y, score)
    assert roc.reason == "" and roc.fpr[0] == 0 and roc.tpr[-1] == 1
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(pairs)
    pr = det.pr_curve_points(y, score)
    assert len(pr.thresholds) == len(pr.recall) - 1 and pr.recall[-1] == 0


@pytest.mark.parametrize(
    "y,why",
    [([0, 0, 0], "no positive images"), ([1, 1], "no negative images"), ([], "no images")],
)
def test_one_class_gives_nan_with_a_reason(y, why):
    score = np.linspace(0, 1, len(y))
    for value in (det.roc_auc(y, score), det.pr_auc(y, score)):
        assert math.isnan(value.value) and why in value.reason
    for curve in (det.roc_curve_points(y, score), det.pr_curve_points(y, score)):
        assert why in curve.reason and all(len(a) == 0 for a in curve[:3])


# --------------------------------------------------------------------------------------------------
# Wilson intervals and the confusion table
# --------------------------------------------------------------------------------------------------
# z = 1.959964, z² = 3.841459; denom = 1 + z²/n = 1.384146 for n = 10.
# k=0:  p=0, centre = (z²/20)/denom = 0.192073/1.384146 = 0.138766 = half -> (0, 0.277533)
# k=5:  p=.5, centre = (.5 + .192073)/1.384146 = 0.5; half = z/denom·sqrt(.025 + z²/400)
#       = 1.416010·0.186020 = 0.263407 -> (0.236593, 0.763407)
# k=10: the mirror of k=0 -> (0.722467, 1)
WILSON_CASES = [
    (0, 10, (0.0, 0.277533)),
    (5, 10, (0.236593, 0.763407)),
    (10, 10, (0.722467, 1.0)),
    # n=1, k=1: denom = 1 + z² = 4.841459, centre = (1 + z²/2)/denom = 0.603277,
    # half = z/denom·sqrt(z²/4) = z²/(2·denom) = 0.396723 -> (0.206549, 1)
    (1, 1, (0.206549, 1.0)),
]


@pytest.mark.parametrize("k,n,expected", WILSON_CASES)
def test_wilson_interval_hand_cases(k, n, expected):
    lo, hi = det.wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(expected, abs=1e-6)


def test_wilson_interval_edges():
    assert all(math.isnan(v) for v in det.wilson_interval(0, 0))
    lo90, hi90 = det.wilson_interval(5, 10, confidence=0.90)
    lo95, hi95 = det.wilson_interval(5, 10)
    assert lo95 < lo90 < 0.5 < hi90 < hi95
    for k, n in ((11, 10), (-1, 3), (1.5, 3)):
        with pytest.raises(DataError, match="k <= n"):
            det.wilson_interval(k, n)
    with pytest.raises(DataError, match="confidence"):
        det.wilson_interval(1, 2, confidence=1.5)


def test_confusion_hand_case():
    # truth 3 positive 5 negative; predicted: 2 of the positives and 1 negative
    c = det.confusion_at([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0])
    assert (c["tp"], c["fp"], c["tn"], c["fn"], c["n"]) == (2, 1, 4, 1, 8)
    for key, k, n in (("sensitivity", 2, 3), ("specificity", 4, 5), ("ppv", 2, 3), ("npv", 4, 5)):
        assert c[key]["value"] == pytest.approx(k / n)
        assert (c[key]["k"], c[key]["n"]) == (k, n)
        assert (c[key]["lo"], c[key]["hi"]) == det.wilson_interval(k, n)


def test_confusion_without_positives_is_nan_not_an_error():
    c = det.confusion_at([False] * 4, [False, False, True, False])
    assert math.isnan(c["sensitivity"]["value"]) and math.isnan(c["sensitivity"]["lo"])
    assert math.isnan(c["ppv"]["value"]) is False and c["ppv"]["value"] == 0.0
    assert c["specificity"]["value"] == 0.75


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
# (labels, probabilities, bins, ECE by hand)
ECE_CASES = [
    # bin [0, .5): mean .15, observed 0; bin [.5, 1]: mean .85, observed 1: gaps .15 each
    ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 2, 0.15),
    # bin 0: 3 images, mean .2, observed 1/3, gap 2/15, weight 3/4 -> .1; bin 1: 1 image, mean .7,
    # observed 1, gap .3, weight 1/4 -> .075; ECE .175
    ([0, 1, 0, 1], [0.2, 0.2, 0.2, 0.7], 2, 0.175),
    ([0, 1], [0.0, 1.0], 10, 0.0),  # p = 1 goes to the last bin: perfectly calibrated
    ([0, 0], [0.3, 0.3], 10, 0.3),  # one class is fine for calibration
]


@pytest.mark.parametrize("y,prob,bins,ece", ECE_CASES)
def test_ece_hand_cases(y, prob, bins, ece):
    assert det.expected_calibration_error(y, prob, bins) == (pytest.approx(ece), "")


def test_reliability_table_hand_case():
    t = det.reliability([0, 1, 0, 1], [0.2, 0.2, 0.2, 0.7], bins=2)
    assert t["count"].tolist() == [3, 1]
    assert t["mean_predicted"].tolist() == pytest.approx([0.2, 0.7])
    assert t["observed"].tolist() == pytest.approx([1 / 3, 1.0])
    assert (t["observed_lo"][0], t["observed_hi"][0]) == det.wilson_interval(1, 3)
    t = det.reliability([0, 1], [0.05, 0.95], bins=10)
    assert t["count"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # empty bins kept
    assert math.isnan(t["observed"][4])
    assert math.isnan(det.expected_calibration_error([], [], 10).value)


# --------------------------------------------------------------------------------------------------
# bootstrap of the mean Dice
# --------------------------------------------------------------------------------------------------
def _one_big_patient():
    """Patient 0 has 20 images, all Dice 0; patients 1..20 have one image each, Dice 1."""
    dice = np.r_[np.zeros(20), np.ones(20)]
    groups = np.r_[np.zeros(20, int), np.arange(1, 21)]
    return dice, groups


def test_bootstrap_over_patients_is_wider_than_over_images():
    dice, groups = _one_big_patient()
    mean_i, lo_i, hi_i = det.bootstrap_ci(dice, n_boot=2000, seed=0)
    mean_p, lo_p, hi_p = det.bootstrap_ci(dice, groups, n_boot=2000, seed=0)
    assert mean_i == mean_p == 0.5  # the point estimate is the plain mean over images
    # images: ~ 0.5 ± 1.96·sqrt(.25/40) = [0.35, 0.65]; patients: 0, 1, 2 ... draws of patient 0
    # give means 1, 0.5, 0.32 ...: the interval must cover most of that
    assert 0.25 < hi_i - lo_i < 0.4
    assert hi_p - lo_p > 2 * (hi_i - lo_i)
    assert hi_p == 1.0 and lo_p < 0.35


def test_bootstrap_is_deterministic_by_seed_and_matches_a_slow_loop():
    dice, groups = _one_big_patient()
    a = det.bootstrap_ci(dice, groups, n_boot=500, seed=3)
    assert det.bootstrap_ci(dice, groups, n_boot=500, seed=3) == a
    smooth = np.random.default_rng(0).random(40)  # the data above has few distinct means
    assert det.bootstrap_ci(smooth, groups, seed=4) != det.bootstrap_ci(smooth, groups, seed=3)
    # the same draws, one resample at a time: each drawn patient brings all its images
    drawn = np.random.default_rng(3).integers(0, 21, size=(500, 21))
    means = [np.concatenate([dice[groups == g] for g in row]).mean() for row in drawn]
    assert a[1:] == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    # one patient per image is the image bootstrap
    assert det.bootstrap_ci(dice, np.arange(40), seed=1) == det.bootstrap_ci(dice, seed=1)


def test_bootstrap_chunks_give_the_same_numbers(monkeypatch):
    dice = np.random.default_rng(0).random(50)
    whole = det.bootstrap_ci(dice, n_boot=300, seed=2)
    monkeypatch.setattr(det, "_BOOT_CHUNK", 50 * 7)  # 7 resamples per chunk
    assert det.bootstrap_ci(dice, n_boot=300, seed=2) == whole


def test_bootstrap_edge_cases():
    assert det.bootstrap_ci([0.7, 0.7, 0.7]) == (pytest.approx(0.7),) * 3
    mean, lo, hi = det.bootstrap_ci([0.2, 0.4], groups=["p", "p"])  # one patient: no interval
    assert mean == pytest.approx(0.3) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in det.bootstrap_ci([]))


# --------------------------------------------------------------------------------------------------
# Dice per lesion size, rank score
# --------------------------------------------------------------------------------------------------
def test_dice_by_size_bin_hand_case():
    # default folds' bins (0, 1, 2000, 8000, 25000): <2000 | 2000-8000 | 8000-25000 | >=25000
    dice = [1.0, 0.5, 0.2, 0.8, 0.9]
    area = [500, 1500, 3000, 30000, 0]  # the last image is empty: not in any bin
    t = det.dice_by_size_bin(dice, area)
    assert t["bin"].tolist() == [1, 2, 3, 4]
    assert t["count"].tolist() == [2, 1, 0, 1]
    assert t["mean_dice"][[0, 1, 3]].tolist() == pytest.approx([0.75, 0.2, 0.8])
    assert math.isnan(t["mean_dice"][2])
    assert t["label"].tolist() == ["< 2000 px", "2000-8000 px", "8000-25000 px", ">= 25000 px"]
    t = det.dice_by_size_bin(dice, area, bins=(0, 1, 1000))  # other edges: two bins
    assert t["count"].tolist() == [1, 3] and t["mean_dice"].tolist() == pytest.approx([1.0, 0.5])


def test_rank_score_prefers_the_aux_head():
    aux, mx = np.array([0.1, 0.9]), np.array([0.5, 0.6])
    scores, name = det.rank_score(aux, mx)
    assert name == "aux head" and scores.tolist() == [0.1, 0.9]
    scores, name = det.rank_score(None, mx)
    assert name == "max probability" and scores.tolist() == [0.5, 0.6]


# --------------------------------------------------------------------------------------------------
# bad inputs: a DataError naming the field
# --------------------------------------------------------------------------------------------------
BAD_CALLS = [
    (lambda: det.roc_auc([0, 1, 1], [0.1, 0.2]), "lengths differ: y 3, score 2"),
    (lambda: det.roc_auc([0, 2], [0.1, 0.2]), "y must be 0/1"),
    (lambda: det.pr_auc([0, 1], [0.1, np.nan]), "score has 1 non-finite"),
    (lambda: det.confusion_at([0, 1], [1]), "y_true_pos 2, y_pred_pos 1"),
    (lambda: det.reliability([0, 1], [0.2, 1.2]), "prob must be probabilities"),
    (lambda: det.bootstrap_ci([0.5, np.nan]), "values_per_image has 1 non-finite"),
    (lambda: det.bootstrap_ci([0.5, 0.5], groups=["a"]), "groups 1"),
    (lambda: det.bootstrap_ci([0.5, 0.5], groups=["a", None]), "groups has 1 missing"),
    (lambda: det.dice_by_size_bin([0.5, np.nan], [10, 20]), "dice has 1 non-finite"),
    (lambda: det.dice_by_size_bin([0.5], [10, 20]), "dice 1, truth_area 2"),
    (lambda: det.dice_by_size_bin([[0.5]], [10]), "dice must be a 1-D array"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_bad_inputs_raise_a_data_error_naming_the_field(call, message):
    with pytest.raises(DataError, match=re.escape(message)):
        call()


# --------------------------------------------------------------------------------------------------
# the report folder
# --------------------------------------------------------------------------------------------------
def _data(n=80, seed=0, **overrides) -> ReportData:
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.35
    truth[:2] = (True, False)  # both classes
    area = np.where(truth, rng.choice([800, 4000, 12000, 40000], n), 0)
    score = np.clip(np.where(truth, rng.beta(4, 2, n), rng.beta(1, 4, n)), 0, 1)
    pred = score > 0.5
    dice = np.where(truth, np.where(pred, rng.uniform(0.3, 0.95, n), 0.0), np.where(pred, 0, 1.0))
    fields = dict(ids=[f"1.2.{i}" for i in range(n)], dice=dice, truth_pos=truth, pred_pos=pred,
                  score=score, score_name="aux head", truth_area=area,
                  groups=[f"patient{i // 3}" for i in range(n)], folds=np.arange(n) % 4,
                  cv={"dice, mean over folds": 0.8123, "dice, std over folds": 0.0123})  # fmt: skip
    return ReportData(**{**fields, **overrides})


def _no_links(page: str) -> str:
    """The page without its data URIs (base64 could spell 'http' by chance)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)


def test_write_report_writes_plots_json_and_a_self_contained_page(tmp_path):
    data = _data()
    paths = write_report(tmp_path / "rep", data, "fold <blend> & co", n_boot=300)
    assert set(paths) == {"roc", "pr", "reliability", "dice_by_size", "metrics", "html"}
    for name in ("roc", "pr", "reliability", "dice_by_size"):
        img = cv2.imread(str(paths[name]))
        assert img is not None and min(img.shape[:2]) > 250, name
        assert img.std() > 10  # not a blank canvas
    m = json.loads(paths["metrics"].read_text(), parse_constant=pytest.fail)  # strict JSON
    assert m["n_images"] == 80 and m["n_patients"] == 27 and m["dice"]["unit"] == "patients"
    assert m["dice"]["mean"] == pytest.approx(data.dice.mean())
    assert m["dice"]["lo"] < m["dice"]["mean"] < m["dice"]["hi"]
    assert m["image_level"]["auroc"]["value"] == pytest.approx(
        roc_auc_score(data.truth_pos, data.score)
    )
    assert len(m["per_fold"]) == 4 and len(m["calibration"]["table"]) == 10
    assert [r["count"] for r in m["dice_by_size"]["rows"]] == [
        int(((data.truth_area == a) & data.truth_pos).sum()) for a in (800, 4000, 12000, 40000)
    ]
    page = paths["html"].read_text()
    assert page.count("src='data:image/png;base64,") == 4
    assert "http" not in _no_links(page) and "<script" not in page and "<link" not in page
    assert "fold &lt;blend&gt; &amp; co" in page and "<blend>" not in page
    assert (
        f"{m['dice']['mean']:.4f}" in page and f"{m['image_level']['auroc']['value']:.3f}" in page
    )
    assert "0.8123" in page and "patient" in page
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.endswith(".tmp")]


def test_headline_paragraph():
    m = compute_metrics(_data(), n_boot=200)
    text = headline(m)
    d, sens = m["dice"], m["image_level"]["confusion"]["sensitivity"]
    assert text.startswith(f"CV Dice {d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]")
    assert "bootstrap over 27 patients" in text and "aux head" in text
    assert f"sensitivity {sens['value']:.2f} [{sens['lo']:.2f}, {sens['hi']:.2f}]" in text
    no_groups = compute_metrics(_data(groups=None), n_boot=200)
    assert "bootstrap over 80 images" in headline(no_groups)


def test_one_class_report_is_written_with_reasons(tmp_path):
    n = 30
    data = _data(n, truth_pos=np.zeros(n, bool), truth_area=np.zeros(n), dice=np.ones(n))
    paths = write_report(tmp_path, data, "all negative", n_boot=100)
    m = json.loads(paths["metrics"].read_text())
    assert m["image_level"]["auroc"]["value"] is None
    assert "no positive images" in m["image_level"]["auroc"]["reason"]
    assert m["image_level"]["confusion"]["sensitivity"]["value"] is None
    assert m["dice_positive"]["mean"] is None and m["calibration"]["ece"]["value"] is not None
    page = paths["html"].read_text()
    assert "n/a (no positive images" in page
    assert cv2.imread(str(paths["roc"])) is not None
    assert "AUROC n/a" in headline(compute_metrics(data, n_boot=50))


def test_a_score_that_is_not_a_probability_skips_calibration(tmp_path):
    data = _data(score_name="logit", score=np.linspace(-3, 3, 80))
    m = compute_metrics(data, n_boot=50)
    assert math.isnan(m["calibration"]["ece"]["value"]) and m["calibration"]["table"] == []
    assert "not a probability" in m["calibration"]["ece"]["reason"]
    assert cv2.imread(str(write_report(tmp_path, data, "t", n_boot=50)["reliability"])) is not None


BAD_DATA = [
    ({"score": np.zeros(79)}, "lengths differ", "score 79"),
    ({"dice": np.r_[np.nan, np.ones(79)]}, "dice has 1 non-finite", None),
    ({"dice": np.full(80, 1.5)}, "dice must be in [0, 1]", None),
    ({"truth_pos": np.full(80, 3)}, "truth_pos must be 0/1", None),
    ({"groups": ["a"] * 81}, "lengths differ", "groups 81"),
    ({"truth_area": np.zeros(80)}, "truth_area and truth_pos disagree", None),
    ({**{k: [] for k in ("ids", "dice", "truth_pos", "pred_pos", "score", "truth_area")},
      "groups": None, "folds": None}, "ids is empty", None),
]  # fmt: skip


@pytest.mark.parametrize("overrides,message,also", BAD_DATA)
def test_bad_report_data_raises_a_data_error_naming_the_field(overrides, message, also):
    with pytest.raises(DataError, match=re.escape(message)) as err:
        _data(**overrides)
    if also:
        assert also in str(err.value)
