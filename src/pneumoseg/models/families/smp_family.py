"""The segmentation-models-pytorch family: U-Net, U-Net++, FPN, DeepLabV3+ over any smp/timm
encoder (``pneumoseg.models.registry`` holds the encoder registry and the offline weight loading)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from pneumoseg.models.families import Family, register


class SmpFamily(Family):
    name = "smp"
    uses = (
        "encoder", "encoder_weights", "encoder_weights_path", "in_channels",
        "decoder_channels", "aux_head", "aux_dropout",
    )  # fmt: skip
    hints: ClassVar[dict[str, str]] = {"aux_dropout": "only with model.aux_head=true"}

    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        from pneumoseg.models.smp_models import build_smp

        return build_smp(dict(mcfg))

    def used_keys(self, mcfg: Mapping[str, Any]) -> set[str]:
        # the dropout is the aux head's: without the head it changes nothing
        return set(self.uses) - (set() if mcfg.get("aux_head") else {"aux_dropout"})

    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        from pneumoseg.models.smp_models import check_encoder

        if mcfg.get("encoder") is None:
            return ["model.encoder: smp models need an encoder (e.g. resnet34), got null"]
        encoder = str(mcfg["encoder"])
        try:
            check_encoder(encoder)
        except KeyError as e:
            return [f"model.encoder: {e.args[0]}"]
        weights = mcfg.get("encoder_weights")
        valid = encoder_weight_names(encoder)
        if weights is not None and not mcfg.get("encoder_weights_path") and weights not in valid:
            return [
                f"model.encoder_weights: {weights!r} does not exist for encoder {encoder}; "
                f"valid: {', '.join(valid)}, or null (from scratch)"
            ]
        return []


def encoder_weight_names(encoder: str) -> list[str]:
    """The pretrained weights smp offers for ``encoder`` (timm encoders, ``tu-*``: imagenet)."""
    if encoder.startswith("tu-"):
        return ["imagenet"]
    from segmentation_models_pytorch.encoders import encoders

    return sorted(encoders[encoder]["pretrained_settings"])


SMP = register(SmpFamily(), "unet", "unetplusplus", "fpn", "deeplabv3plus")
