"""Model registry over segmentation-models-pytorch, and :func:`build_model` for every family.

``build_model(cfg["model"])`` builds any family's model (:mod:`pneumoseg.models.families`). The smp
family (:func:`build_smp`) maps images (N, C, H, W) float to ``mask`` logits (N, 1, H, W) and,
with ``aux_head: true``, image-level "is there a pneumothorax" logits (N, 1) from smp's
classification head (used by the empty-image gate); :func:`split_output` reads either form.

Encoders: any smp encoder (``resnet34``, ``se_resnext50_32x4d``, ``efficientnet-b4``, ...) or any
timm model as ``tu-<name>``. ``encoder_weights: imagenet`` downloads weights (Hugging Face hub);
where that is impossible, point ``encoder_weights_path`` at a local file (the smp-hub
``model.safetensors``, or any encoder state dict saved with ``torch.save``).
"""

from __future__ import annotations

import logging

from torch import nn

from pneumoseg.models.families import split_output
from pneumoseg.models.smp_models import (
    ARCHITECTURES,
    build_smp,
    check_encoder,
    load_encoder_weights,
)
from pneumoseg.models.weights import read_weights_file

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "build_smp",
    "check_encoder",
    "count_parameters",
    "load_encoder_weights",
    "model_cfg",
    "read_weights_file",
    "split_output",
]

log = logging.getLogger(__name__)


def build_model(cfg: dict) -> nn.Module:
    """Build the model the ``model`` config section describes, through its family
    (:mod:`pneumoseg.models.families`: smp, Mask R-CNN, Double U-Net, classic U-Net)."""
    from pneumoseg.models.families import family_for

    return family_for(cfg).build(cfg)


def model_cfg(cfg: dict) -> dict:
    """The ``model`` section of a resolved config plus ``input_size`` (= ``cache.size``, the side
    of every image the model sees; detectors size their internal transform to it)."""
    return {**cfg["model"], "input_size": int(cfg["cache"]["size"])}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
