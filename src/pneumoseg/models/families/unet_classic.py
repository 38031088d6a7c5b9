"""Ronneberger's U-Net as MMSegmentation's ``UNet`` backbone of ``fcn_unet_s5-d16``,
``model.arch: unet_classic``.

Five stages of two 3x3 conv + BN + ReLU (bias-free convs, as MMSeg's ``ConvModule`` with a norm),
base channels 64 doubling to 1024, 2x2 max-pool between stages; each decoder stage upsamples with
MMSeg's ``InterpConv`` (bilinear x2, then 1x1 conv + BN + ReLU halving the channels),
concatenates the skip and applies two 3x3 conv + BN + ReLU. No pretrained weights.

Head: a 1x1 conv to one logit on the last decoder stage (64 channels). MMSeg puts an ``FCNHead``
(3x3 conv + BN + ReLU + 1x1) there; it adds ~37 K parameters and is not needed.

Parameters (3 input channels, width 64): backbone 28,949,568 (MMSeg's UNet s5-d16: ~29.0 M),
+ 65 for the head = 28,949,633.

``model.width`` (null = 64) is the base channel count (16 gives a ~1.8 M model for CPU demos);
``model.depth`` (null = 5) the number of stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.models.families import Family, register

DEFAULT_WIDTH = 64
DEFAULT_STAGES = 5


def _conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, num_convs: int = 2):
        super().__init__(*(_conv(cin if i == 0 else cout, cout) for i in range(num_convs)))


class InterpConv(nn.Module):
    """Bilinear x2 upsampling, then 1x1 conv + BN + ReLU (MMSeg's default ``InterpConv``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv(cin, cout, 1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


class UpConvBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.upsample = InterpConv(cin, skip)
        self.conv_block = BasicConvBlock(2 * skip, cout)

    def forward(self, skip, x):
        return self.conv_block(torch.cat([skip, self.upsample(x, skip.shape[2:])], 1))


class UNetClassic(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = DEFAULT_WIDTH, stages: int = 5):
        super().__init__()
        chans = [width * 2**i for i in range(stages)]
        self.encoder = nn.ModuleList(
            BasicConvBlock(in_channels if i == 0 else chans[i - 1], c) for i, c in enumerate(chans)
        )
        self.decoder = nn.ModuleList(
            UpConvBlock(chans[i], chans[i - 1], chans[i - 1]) for i in range(stages - 1, 0, -1)
        )
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        skips = []
        for i, stage in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = block(skips.pop(), x)
        return self.head(x)


def _int_or_none(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


class UNetClassicFamily(Family):
    name = "unet_classic"
    uses = ("in_channels", "width", "depth")
    checked = ("encoder_weights", "encoder_weights_path")  # must be null: no pretrained encoder
    hints: ClassVar[dict[str, str]] = {
        "encoder": "its encoder is its own, sized by model.width",
        "decoder_channels": "use model.width",
    }

    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        problems = []
        width, depth = mcfg.get("width"), mcfg.get("depth")
        if not _int_or_none(width) or (width is not None and width < 1):
            problems.append(f"model.width must be null (= 64) or a positive integer, got {width!r}")
        if not _int_or_none(depth) or (depth is not None and not 2 <= depth <= 6):
            problems.append(f"model.depth must be null (= 5 stages) or 2..6, got {depth!r}")
        if mcfg.get("in_channels", 3) not in (1, 3):
            problems.append(f"model.in_channels must be 1 or 3, got {mcfg.get('in_channels')!r}")
        if mcfg.get("encoder_weights") or mcfg.get("encoder_weights_path"):
            problems.append(
                "unet_classic has no pretrained encoder: set model.encoder_weights=null "
                "(and model.encoder_weights_path=null)"
            )
        return problems

    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        self.require_valid(mcfg)
        width, depth = mcfg.get("width"), mcfg.get("depth")
        return UNetClassic(
            in_channels=int(mcfg.get("in_channels", 3)),
            width=DEFAULT_WIDTH if width is None else int(width),
            stages=DEFAULT_STAGES if depth is None else int(depth),
        )


UNET_CLASSIC = register(UNetClassicFamily(), "unet_classic")
