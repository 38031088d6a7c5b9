import math

import pytest
import torch

from pneumoseg.losses import (
    LOSSES,
    ComboLoss,
    bce_loss,
    dice_loss,
    focal_loss,
    get_loss,
    lovasz_loss,
)


def t(values, shape=(1, 1, 2, 2)):
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


LN2 = math.log(2)
ZERO = t([0.0, 0.0, 0.0, 0.0])
ONE_POS = t([1.0, 0.0, 0.0, 0.0])

# (function, kwargs, logits, target, value computed by hand)
CASES = [
    (bce_loss, {}, ZERO, ONE_POS, LN2),  # p = .5 everywhere
    (bce_loss, {}, t([math.log(3)] * 4), t([1.0] * 4), -math.log(0.75)),  # p = .75
    (dice_loss, {"smooth": 1.0}, ZERO, ONE_POS, 1 - (2 * 0.5 + 1) / (2 + 1 + 1)),
    (dice_loss, {"smooth": 0.0}, ZERO, ONE_POS, 1 - 1 / 3),
    (dice_loss, {"smooth": 1.0}, t([-50.0] * 4), t([0.0] * 4), 0.0),  # all empty: no 0/0
    (focal_loss, {"gamma": 2.0}, ZERO, ONE_POS, 0.25 * LN2),  # (1 - .5)^2 ln 2
    (focal_loss, {"gamma": 0.0}, ZERO, ONE_POS, LN2),  # gamma 0 = BCE
    (focal_loss, {"gamma": 2.0, "alpha": 0.25}, ZERO, t([1.0] * 4), 0.25 * 0.25 * LN2),
    (lovasz_loss, {}, t([2.0, -2.0], (1, 1, 1, 2)), t([1.0, 0.0], (1, 1, 1, 2)), 0.0),
    (lovasz_loss, {}, t([0.0, 0.0], (1, 1, 1, 2)), t([1.0, 0.0], (1, 1, 1, 2)), 1.0),
]


@pytest.mark.parametrize("fn,kwargs,logits,target,expected", CASES)
def test_loss_hand_values(fn, kwargs, logits, target, expected):
    assert float(fn(logits, target, **kwargs)) == pytest.approx(expected, abs=1e-6)


def test_combo_matches_weighted_sum_and_aux():
    loss = ComboLoss({"bce": 3, "dice": 1, "focal": 4}, aux_weight=0.5)
    total, parts = loss(ZERO, ONE_POS, cls_logits=torch.zeros(1, 1))
    expected = 3 * LN2 + (1 - 2 / 4) + 4 * 0.25 * LN2 + 0.5 * LN2
    assert float(total) == pytest.approx(expected, abs=1e-6)
    assert set(parts) == {"loss_bce", "loss_dice", "loss_focal", "loss_aux_bce"}
    assert parts["loss_aux_bce"] == pytest.approx(LN2)


def test_combo_gradients_flow():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    total, _ = ComboLoss({"bce": 3, "dice": 1, "focal": 4, "lovasz": 1})(logits, target)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_registry_errors_list_names():
    with pytest.raises(KeyError, match="valid: bce, dice, focal, lovasz"):
        get_loss("dise")
    with pytest.raises(ValueError, match="all zero"):
        ComboLoss({"bce": 0})
    assert set(LOSSES) == {"bce", "dice", "focal", "lovasz"}
