import numpy as np
import pytest
import torch

from pneumoseg.evaluation.metrics import (
    SegConfusion,
    dice_per_image,
    mean_dice,
    miou_mdice,
    positive_dice,
)


def _m(pixels, shape=(3, 4)):
    m = np.zeros(shape, np.uint8)
    for r, c in pixels:
        m[r, c] = 1
    return m


# (prediction pixels, truth pixels, Dice computed by hand)
DICE_CASES = [
    ([], [], 1.0),  # empty truth + empty prediction scores 1
    ([(0, 0)], [], 0.0),  # a false positive on an empty image scores 0
    ([], [(1, 1), (1, 2)], 0.0),  # missed pneumothorax
    ([(0, 0), (1, 1), (2, 3)], [(0, 0), (1, 1), (2, 3)], 1.0),
    ([(0, 0), (0, 1)], [(0, 1), (0, 2)], 0.5),  # 2*1 / (2+2)
    ([(0, 0), (0, 1), (0, 2)], [(0, 1)], 0.5),  # 2*1 / (3+1)
    ([(2, 2)], [(2, 2), (2, 3)], 2 / 3),  # 2*1 / (1+2)
    ([(0, 0)], [(2, 3)], 0.0),  # disjoint
]


@pytest.mark.parametrize("pred,truth,expected", DICE_CASES)
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_dice_hand_cases(pred, truth, expected, lib):
    p, t = _m(pred), _m(truth)
    if lib == "torch":
        p, t = torch.from_numpy(p), torch.from_numpy(t)
    d = dice_per_image(p, t)
    assert type(d) is (torch.Tensor if lib == "torch" else np.ndarray)
    assert float(d[0]) == pytest.approx(expected)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_dice_vectorised_over_batch(lib):
    preds = np.stack([_m(p) for p, _, _ in DICE_CASES])
    truths = np.stack([_m(t) for _, t, _ in DICE_CASES])
    expected = [e for _, _, e in DICE_CASES]
    if lib == "torch":
        preds, truths = torch.from_numpy(preds).bool(), torch.from_numpy(truths).float()
    np.testing.assert_allclose(np.asarray(dice_per_image(preds, truths)), expected)
    assert mean_dice(preds, truths) == pytest.approx(np.mean(expected))
    # positive-only: cases whose truth is non-empty
    pos = [e for _, t, e in DICE_CASES if t]
    assert positive_dice(preds, truths) == pytest.approx(np.mean(pos))


def test_positive_dice_nan_without_positives():
    assert np.isnan(positive_dice(_m([(0, 0)]), _m([])))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_image(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="must be"):
        dice_per_image(np.zeros(5), np.zeros(5))


def test_miou_mdice_hand():
    pred = np.array([[1, 0], [0, 0]], np.uint8)
    truth = np.array([[1, 1], [0, 0]], np.uint8)
    r = miou_mdice(pred, truth)
    # foreground: I=1, U=2 -> IoU .5, Dice 2/3; background: I=2, U=3 -> IoU 2/3, Dice 4/5
    assert r["IoU"] == pytest.approx([2 / 3, 0.5])
    assert r["Dice"] == pytest.approx([0.8, 2 / 3])
    assert r["mIoU"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert r["mDice"] == pytest.approx((0.8 + 2 / 3) / 2)
    rt = miou_mdice(torch.from_numpy(pred), torch.from_numpy(truth))
    assert _flat(rt) == pytest.approx(_flat(r))


def _flat(r):
    return [*r["IoU"], *r["Dice"], r["mIoU"], r["mDice"]]


def test_seg_confusion_accumulates_at_dataset_level():
    rng = np.random.default_rng(0)
    p = (rng.random((6, 8, 8)) < 0.3).astype(np.uint8)
    t = (rng.random((6, 8, 8)) < 0.3).astype(np.uint8)
    acc = SegConfusion()
    acc.update(p[:2], t[:2])
    acc.update(p[2:], t[2:])
    whole = miou_mdice(p, t)
    assert _flat(acc.compute()) == pytest.approx(_flat(whole))
    # and equals a direct per-class computation over all pixels
    fg_i, fg_u = (p & t).sum(), (p | t).sum()
    bg_i, bg_u = ((1 - p) & (1 - t)).sum(), ((1 - p) | (1 - t)).sum()
    assert whole["IoU"] == pytest.approx([bg_i / bg_u, fg_i / fg_u])


# ---------------------------------------------------------------- gated Dice (checkpoint selection)
# (inter (N, 5), pred area (N, 5), truth area (N,), pixels per image, expected (dice, thr, gate))
GATED_CASES = [
    # a perfect positive and a 3-pixel false positive on an empty image: gates below 3 px keep
    # the false positive (mean 0.5); the 0.005 gate (5 px) drops it and keeps the 10 px mask
    ([[10] * 5, [0] * 5], [[10] * 5, [3] * 5], [10, 0], 1000, (1.0, 0.3, 0.005)),
    # one positive whose Dice depends on the threshold: 20/30, 20/24, 16/18, 12/16, 8/14
    ([[10, 10, 8, 6, 4]], [[20, 14, 8, 6, 4]], [10], 100, (16 / 18, 0.5, 0.0)),
    # all empty and predicted empty: every cell scores 1, ties go to the first
    ([[0] * 5, [0] * 5], [[0] * 5, [0] * 5], [0, 0], 64, (1.0, 0.3, 0.0)),
    # a gate can also hurt: the 4 px true positive is dropped from 0.005 of 1000 px on
    ([[4] * 5], [[4] * 5], [4], 1000, (1.0, 0.3, 0.0)),
    # on the gate: a predicted area equal to gate x pixels is kept (area >= gate). A 5 px true
    # positive survives the 0.005 gate (5 px of 1000) that drops a 4 px false positive
    ([[5] * 5, [0] * 5], [[5] * 5, [4] * 5], [5, 0], 1000, (1.0, 0.3, 0.005)),
    # ... and a 5 px false positive survives it too: only the 0.01 gate (10 px) drops it, and
    # keeps the 10 px true positive sitting on that gate
    ([[10] * 5, [0] * 5], [[10] * 5, [5] * 5], [10, 0], 1000, (1.0, 0.3, 0.01)),
]


@pytest.mark.parametrize("inter,pa,ta,n_pixels,expected", GATED_CASES)
def test_gated_dice_hand_cases(inter, pa, ta, n_pixels, expected):
    from pneumoseg.evaluation.metrics import gated_dice

    dice, thr, gate = gated_dice(inter, pa, ta, n_pixels)
    assert dice == pytest.approx(expected[0])
    assert (thr, gate) == expected[1:]


def test_gated_dice_prefers_a_useful_model_over_all_empty():
    """The case that made it: at 0.5 the model's false positives put it below the all-empty
    baseline (the fixed-threshold Dice prefers an all-empty epoch); gated, it is above."""
    from pneumoseg.evaluation.metrics import dice_from_areas, gated_dice

    ta = np.array([50, 0, 0, 0])  # 1 positive, 3 empty images of 1000 px
    inter = np.tile([[40], [0], [0], [0]], (1, 5))
    pa = np.tile([[50], [4], [2], [0]], (1, 5))
    fixed = dice_from_areas(inter[:, 2], pa[:, 2], ta).mean()
    assert fixed == pytest.approx((0.8 + 0 + 0 + 1) / 4) and fixed < 0.75  # all-empty: 0.75
    dice, _, gate = gated_dice(inter, pa, ta, 1000)
    assert dice == pytest.approx((0.8 + 3) / 4) and gate == 0.005


def test_gated_dice_shape_error():
    from pneumoseg.evaluation.metrics import gated_dice

    with pytest.raises(ValueError, match="expected"):
        gated_dice([[1, 2]], [[1, 2]], [1], 10)


def test_evaluate_reports_gated_dice():
    """engine.evaluate on a model whose probability is its input: the gated Dice and its
    parameters come from the same areas as the hand cases."""
    from torch import nn

    from pneumoseg.training import engine

    class Probe(nn.Module):  # logit such that sigmoid(logit) == image channel 0
        def forward(self, x):
            p = x[:, :1].clamp(1e-6, 1 - 1e-6)
            return torch.log(p / (1 - p))

    img = torch.zeros(2, 1, 1, 20, 50)  # 2 batches of 1 image, 1000 px each
    mask = torch.zeros_like(img)
    img[0, 0, 0, :5, :10] = 0.9  # batch 0: 50 px predicted, 50 px true
    mask[0, 0, 0, :5, :10] = 1
    img[1, 0, 0, 0, :3] = 0.55  # batch 1: empty truth, 3 px above 0.5 but below 0.6
    batches = [{"image": img[i], "mask": mask[i]} for i in range(2)]
    out = engine.evaluate(Probe(), batches, torch.device("cpu"), threshold=0.5)
    assert out["dice"] == pytest.approx(0.5)
    assert out["dice_gated"] == pytest.approx(1.0)
    assert (out["gate_threshold"], out["gate_area"]) == (0.6, 0.0)  # threshold first, then gate
