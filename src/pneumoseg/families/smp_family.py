"""The segmentation-models-pytorch family: U-Net, U-Net++, FPN, DeepLabV3+ over any smp/timm
encoder (``pneumoseg.models`` holds the encoder registry and the offline weight loading)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pneumoseg.families import Family, register


class SmpFamily(Family):
    name = "smp"

    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        from pneumoseg.models import build_smp

        return build_smp(dict(mcfg))

    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        from pneumoseg.models import check_encoder

        try:
            check_encoder(str(mcfg["encoder"]))
        except KeyError as e:
            return [f"model.encoder: {e.args[0]}"]
        return []


SMP = register(SmpFamily(), "unet", "unetplusplus", "fpn", "deeplabv3plus")
