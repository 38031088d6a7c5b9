"""Segmentation losses as pure functions, with one thin ``nn.Module`` for the weighted combo.

Shapes: ``logits`` and ``target`` are (N, 1, H, W) (or any matching shape); ``target`` holds
0/1 floats. Every function returns a scalar tensor (mean over the batch).

The 1st-place SIIM solution trained with ``3·BCE + 1·Dice + 4·Focal``: BCE gives stable pixel
gradients, soft Dice optimises overlap directly (robust to the tiny foreground share) and focal
concentrates on the hard pixels at the lesion edge.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import LovaszLoss
from torch import nn

from pneumoseg.errors import UnknownNameError


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over all pixels."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the whole batch: ``1 - (2Σpt + s) / (Σp + Σt + s)`` with p = σ(logits).

    Summing over the batch (not per image) keeps the loss defined on all-empty images, where a
    per-image Dice would have a 0/0.
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum()
    return 1 - (2 * inter + smooth) / (p.sum() + t.sum() + smooth)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)^γ log p_t`` (times α for positives, 1 - α for negatives)."""
    logits = logits.float()
    t = target.float()
    logp_t = -F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    loss = -((1 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean()


_lovasz = LovaszLoss(mode="binary", per_image=True)


def lovasz_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász hinge (per image), from segmentation-models-pytorch."""
    return _lovasz(logits.float(), target.float())


LOSSES = {
    "bce": bce_loss,
    "dice": dice_loss,
    "focal": focal_loss,
    "lovasz": lovasz_loss,
}


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}"
        ) from None


class ComboLoss(nn.Module):
    """Weighted sum of registered losses plus BCE on the auxiliary "any pneumothorax" head.

    ``weights`` maps loss names to weights, e.g. ``{"bce": 3, "dice": 1, "focal": 4}``.
    ``forward(mask_logits, mask, cls_logits=None)`` returns ``(total, parts)`` where ``parts`` maps
    ``loss_<term>`` to the term's (unweighted) value, for logging.
    """

    def __init__(self, weights: Mapping[str, float], aux_weight: float = 0.0):
        super().__init__()
        self.terms = {name: (get_loss(name), float(w)) for name, w in weights.items() if w}
        if not self.terms:
            raise ValueError("loss weights are all zero; set at least one of " + ", ".join(LOSSES))
        self.aux_weight = float(aux_weight)

    def forward(self, logits, target, cls_logits=None):
        parts = {name: fn(logits, target) for name, (fn, _) in self.terms.items()}
        total = sum(w * parts[name] for name, (_, w) in self.terms.items())
        if cls_logits is not None and self.aux_weight:
            has = target.flatten(1).amax(1, keepdim=True).to(cls_logits.dtype)
            parts["aux_bce"] = F.binary_cross_entropy_with_logits(cls_logits, has)
            total = total + self.aux_weight * parts["aux_bce"]
        return total, {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
