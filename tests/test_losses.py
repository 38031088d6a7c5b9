import math

import pytest
import torch

from pneumoseg.models.losses import (
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


# A 2x2 Lovász case by hand. logits [[2, 0.5], [0, -1]], truth [[1, 0], [1, 0]]: hinge errors
# 1 - logit * (2t - 1) = [-1, 1.5, 1, 0]; sorted (1.5 f, 1 t, 0 f, -1 t) the truth reads
# [0, 1, 0, 1], whose Jaccard losses 1 - (2 - cum t) / (2 + cum f) are 1/3, 2/3, 3/4, 1: steps
# 1/3, 1/3, 1/12, 1/4. Loss = 1.5/3 + 1/3 = 5/6; d/dlogit = -sign x step where the error is > 0.
LOGITS_2X2 = [2.0, 0.5, 0.0, -1.0]
TRUTH_2X2 = [1.0, 0.0, 1.0, 0.0]
LOVASZ_2X2 = 5 / 6
GRAD_2X2 = [0.0, 1 / 3, -1 / 3, 0.0]
BCE_2X2 = (
    math.log1p(math.exp(-2)) + math.log1p(math.exp(0.5)) + LN2 + math.log1p(math.exp(-1))
) / 4


def test_lovasz_2x2_value_and_gradient_by_hand():
    logits = t(LOGITS_2X2).requires_grad_()
    loss = lovasz_loss(logits, t(TRUTH_2X2))
    assert float(loss.detach()) == pytest.approx(LOVASZ_2X2, abs=1e-6)
    loss.backward()
    assert logits.grad.flatten().tolist() == pytest.approx(GRAD_2X2, abs=1e-6)
    # per image: a perfect second image (errors all <= 0) halves the batch mean
    two = torch.cat([t(LOGITS_2X2), t([5.0, -5.0, 5.0, -5.0])])
    assert float(lovasz_loss(two, torch.cat([t(TRUTH_2X2)] * 2))) == pytest.approx(
        LOVASZ_2X2 / 2, abs=1e-6
    )


@pytest.mark.parametrize("w", [0.25, 1.0, 3.0])
def test_combo_with_lovasz_adds_exactly_weight_times_the_term(w):
    logits, target = t(LOGITS_2X2).requires_grad_(), t(TRUTH_2X2)
    total, parts = ComboLoss({"bce": 2, "lovasz": w})(logits, target)
    assert float(total.detach()) == pytest.approx(2 * BCE_2X2 + w * LOVASZ_2X2, abs=1e-6)
    assert parts == pytest.approx({"loss_bce": BCE_2X2, "loss_lovasz": LOVASZ_2X2}, abs=1e-6)
    base, _ = ComboLoss({"bce": 2})(logits, target)
    assert float((total - base).detach()) == pytest.approx(w * LOVASZ_2X2, abs=1e-6)
    # the gradient: the BCE part's plus w times the Lovász one
    total.backward()
    bce_grad = (torch.sigmoid(t(LOGITS_2X2)) - target).flatten() * 2 / 4
    want = bce_grad + w * torch.tensor(GRAD_2X2)
    torch.testing.assert_close(logits.grad.flatten(), want, rtol=1e-5, atol=1e-6)


def test_combo_lovasz_alone_is_zero_on_a_perfect_prediction():
    total, parts = ComboLoss({"lovasz": 2.0})(t([3.0, -3.0, 1.5, -1.5]), t(TRUTH_2X2))
    assert float(total) == 0.0 and parts == {"loss_lovasz": 0.0}


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
