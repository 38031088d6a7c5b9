import numpy as np
import pytest
import torch

from pneumoseg.metrics import (
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
