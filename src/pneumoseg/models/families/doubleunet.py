"""Double U-Net (Jha et al. 2020, "DoubleU-Net: A Deep Convolutional Neural Network for Medical
Image Segmentation", CBMS 2020), ``model.arch: doubleunet``.

Two stacked U-Nets. Network 1: a VGG19 encoder (torchvision's ``vgg19().features`` split at the
pooling layers; ImageNet weights with ``encoder_weights: imagenet``), ASPP (image pooling, 1x1,
3x3 at dilations 6/12/18; 64 filters), a decoder of conv blocks (two 3x3 conv + BN + ReLU, then
squeeze-and-excitation) and a 1x1 output: mask 1. Network 2 sees ``input * sigmoid(mask 1)``:
its own encoder of SE conv blocks (32, 64, 128, 256 filters), ASPP, and a decoder whose levels
concatenate the skips of **both** encoders; 1x1 output: mask 2, the prediction.

The layer widths follow the authors' Keras implementation (github.com/DebeshJha/2020-CBMS-
DoubleU-Net, ``model.py``): 3x3 convs with bias + BN, SE with ratio 8 and bias-free dense layers,
decoder filters 256/128/64/32, ASPP 64, bilinear x2 upsampling.

``model.depth`` = the number of encoder levels that give skips (each encoder also has one more,
deeper stage: VGG block ``depth + 1`` is encoder 1's bridge; encoder 2 pools after its last
block); ``null`` = 4, the paper's model. A shallower model is the paper's model without its
deepest ``4 - depth`` levels: every level it keeps has the paper's widths at that resolution
(VGG blocks 1..depth + 1; encoder 2 32, 64, ...; decoders ..., 64, 32, mirroring encoder 2).

Parameters (PyTorch ``numel``: conv weights and biases, BN weight and bias; Keras' summary also
counts the BN moving mean/variance, given in brackets), 3 input channels (the count does not
depend on the image size):

* depth 4 (the paper): 29,290,274 [29,297,570] -- the paper's 29.3 M.
* depth 3: 13,808,930;  depth 1: 712,610.
* depth 2: 3,466,274 [3,468,962]. The "2-block variant ~5.0 M" we were given is not reproduced
  by any consistent truncation: keeping the paper's deepest decoder widths instead (decoders
  256, 128 at 1/2 and 1/1) gives 6,356,066, and ASPP straight on VGG block 2 (no bridge) gives
  4,053,090 with those decoders; ~5.0 M needs mixed choices (e.g. encoder 2 128, 256 with
  decoders 64, 32: 4,952,066) that match no description of the model.

Training-mode forward returns ``(mask1_logits, mask2_logits)`` (both (B, 1, H, W)); eval mode
returns mask 2's logits alone (so code that expects one logit map works), unless called with
``both=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.errors import ConfigError, DownloadError, MissingFileError, ModelFileError
from pneumoseg.models.families import Family, Output, register

log = logging.getLogger(__name__)

# torchvision vgg19().features split at the pooling layers: block i = features[a:b] (block 1 has
# no pool in front, later blocks start with the pool of the block before).
VGG19_SLICES = ((0, 4), (4, 9), (9, 18), (18, 27), (27, 36))
VGG19_CHANNELS = (64, 128, 256, 512, 512)
ENC2_FILTERS = (32, 64, 128, 256)
DEC_FILTERS = (256, 128, 64, 32)  # deepest level first
ASPP_FILTERS = 64
MAX_DEPTH = 4


def _vgg19_features(in_channels: int) -> nn.Sequential:
    """torchvision's ``vgg19().features`` (same layer indices), without building the 120 M
    parameter classifier; initialised as torchvision's VGG does."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"])
    if in_channels != 3:
        features[0] = nn.Conv2d(in_channels, features[0].out_channels, 3, padding=1)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def _conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1, bias: bool = True):
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SqueezeExcite(nn.Module):
    """Global average pool -> dense (C/ratio, ReLU) -> dense (C, sigmoid) -> channel scaling."""

    def __init__(self, channels: int, ratio: int = 8):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // ratio, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // ratio, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        w = self.fc(x.mean((2, 3)))
        return x * w[:, :, None, None]


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BN + ReLU, then squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int):
        super().__init__(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout), SqueezeExcite(cout))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and 3x3 at dilations 6/12/18, fused by
    a 1x1 conv (all with BN + ReLU)."""

    def __init__(self, cin: int, cout: int = ASPP_FILTERS, dilations=(6, 12, 18)):
        super().__init__()
        self.pool_conv = nn.Conv2d(cin, cout, 1)
        self.pool_bn = nn.BatchNorm2d(cout)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout, 1, bias=False)]
            + [_conv_bn_relu(cin, cout, 3, d, bias=False) for d in dilations]
        )
        self.project = _conv_bn_relu(cout * (2 + len(dilations)), cout, 1, bias=False)

    def forward(self, x):
        y = self.pool_conv(x.mean((2, 3), keepdim=True))
        if self.training and y.shape[0] == 1:
            # BatchNorm of one 1x1 value per channel is undefined: use the running statistics.
            bn = self.pool_bn
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
        else:
            y = self.pool_bn(y)
        y = F.relu(y).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([y, *(b(x) for b in self.branches)], 1))


def _up(x, like):
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """Bilinear x2, concatenate the skips of this level, conv block; deepest level first."""

    def __init__(self, cin: int, skip_channels: list[list[int]], filters: tuple[int, ...]):
        super().__init__()
        blocks = []
        for skips, f in zip(skip_channels, filters, strict=True):
            blocks.append(ConvBlock(cin + sum(skips), f))
            cin = f
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *skip_lists):
        for i, block in enumerate(self.blocks):
            skips = [s[i] for s in skip_lists]
            x = block(torch.cat([_up(x, skips[0]), *skips], 1))
        return x


class DoubleUNet(nn.Module):
    def __init__(self, in_channels: int = 3, depth: int = MAX_DEPTH):
        super().__init__()
        if not 1 <= depth <= MAX_DEPTH:
            raise ConfigError(f"model.depth must be 1..{MAX_DEPTH} for doubleunet, got {depth}")
        self.depth = depth
        features = _vgg19_features(in_channels)
        # encoder 1: VGG19 blocks 1..depth (skips) and block depth + 1 (bridge)
        self.enc1 = nn.ModuleList(
            nn.Sequential(*features[a:b]) for a, b in VGG19_SLICES[: depth + 1]
        )
        skip1 = list(VGG19_CHANNELS[:depth])[::-1]  # deepest first
        filters = DEC_FILTERS[MAX_DEPTH - depth :]  # the paper's widths at these levels
        self.aspp1 = ASPP(VGG19_CHANNELS[depth])
        self.dec1 = Decoder(ASPP_FILTERS, [[c] for c in skip1], filters)
        self.head1 = nn.Conv2d(filters[-1], 1, 1)
        # encoder 2: SE conv blocks, max-pool after each
        enc2, cin = [], in_channels
        for f in ENC2_FILTERS[:depth]:
            enc2.append(ConvBlock(cin, f))
            cin = f
        self.enc2 = nn.ModuleList(enc2)
        skip2 = list(ENC2_FILTERS[:depth])[::-1]
        self.aspp2 = ASPP(cin)
        self.dec2 = Decoder(
            ASPP_FILTERS, [list(s) for s in zip(skip1, skip2, strict=True)], filters
        )
        self.head2 = nn.Conv2d(filters[-1], 1, 1)

    def forward(self, x, both: bool | None = None):
        skips1 = []
        h = x
        for i, block in enumerate(self.enc1):
            h = block(h)
            if i < self.depth:
                skips1.append(h)
        skips1 = skips1[::-1]
        out1 = self.head1(self.dec1(self.aspp1(h), skips1))

        h = x * torch.sigmoid(out1)
        skips2 = []
        for block in self.enc2:
            h = block(h)
            skips2.append(h)
            h = F.max_pool2d(h, 2)
        out2 = self.head2(self.dec2(self.aspp2(h), skips1, skips2[::-1]))
        if both if both is not None else self.training:
            return out1, out2
        return out2

    @property
    def vgg_features(self) -> list[nn.Module]:
        """The VGG19 layers of encoder 1, in torchvision's ``features`` order."""
        return [m for block in self.enc1 for m in block]


# ----------------------------------------------------------------------------- VGG19 weights
def _vgg_state_to_ours(model: DoubleUNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a torchvision ``vgg19`` state dict (``features.<i>.weight`` ...) into encoder 1."""
    state = {k.removeprefix("module.").removeprefix("vgg."): v for k, v in state.items()}
    layers = model.vgg_features
    loaded = 0
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        w, b = state.get(f"features.{i}.weight"), state.get(f"features.{i}.bias")
        if w is None or b is None:
            raise ModelFileError(
                f"{source}: no features.{i}.weight/bias; expected a state dict of torchvision's "
                "vgg19 (torch.save(torchvision.models.vgg19(weights=...).state_dict(), path))"
            )
        if w.ndim == 4 and layer.weight.shape[1] != w.shape[1] and layer.weight.shape[1] == 1:
            w = w.sum(1, keepdim=True)  # grey input: sum the RGB filters (as smp does)
        if tuple(w.shape) != tuple(layer.weight.shape) or tuple(b.shape) != tuple(layer.bias.shape):
            raise ModelFileError(
                f"{source}: features.{i}.weight has shape {tuple(w.shape)}, the model needs "
                f"{tuple(layer.weight.shape)} (is this torchvision's vgg19?)"
            )
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        loaded += 1
    log.info("loaded %d VGG19 conv layers from %s", loaded, source)


def _download_vgg19_state() -> dict:
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)


def load_vgg19_weights(model: DoubleUNet, weights: str | None, weights_path: str | None) -> None:
    if weights_path:
        from pneumoseg.models.weights import load_torch

        path = Path(weights_path)
        if not path.is_file():
            raise MissingFileError(f"model.encoder_weights_path: no such file {path}")
        state = load_torch(path, what="model.encoder_weights_path")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelFileError(f"model.encoder_weights_path {path}: holds no state dict")
        _vgg_state_to_ours(model, state, str(path))
        return
    if not weights:
        return
    try:
        state = _download_vgg19_state()
    except (OSError, ConnectionError, RuntimeError) as e:
        raise DownloadError(
            f"could not download the ImageNet weights of torchvision's vgg19 for doubleunet "
            f"({type(e).__name__}: {str(e)[:200]}). This machine looks offline. Where there is "
            "internet, fetch https://download.pytorch.org/models/vgg19-dcbb9e9d.pth (or run "
            "torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict(), "
            "'vgg19.pth')), copy the file here and set model.encoder_weights_path=/path/to/file, "
            "or train from scratch with model.encoder_weights=null."
        ) from e
    _vgg_state_to_ours(model, state, "torchvision VGG19_Weights.IMAGENET1K_V1")


# ----------------------------------------------------------------------------- family
def _loss_parts(prefix: str, loss: torch.Tensor, parts: Mapping[str, float]) -> dict[str, float]:
    out = {f"{prefix}_{k.removeprefix('loss_')}": v for k, v in parts.items()}
    out[f"{prefix}_loss"] = float(loss.detach())
    return out


def _two_losses(out1, out2, mask, loss_fn) -> tuple[torch.Tensor, dict]:
    l1, p1 = loss_fn(out1.float(), mask)
    l2, p2 = loss_fn(out2.float(), mask)
    return l1 + l2, {**_loss_parts("out1", l1, p1), **_loss_parts("out2", l2, p2)}


class DoubleUNetFamily(Family):
    name = "doubleunet"
    uses = ("in_channels", "encoder_weights", "encoder_weights_path", "depth")
    hints: ClassVar[dict[str, str]] = {
        "encoder": "its encoder is VGG19",
        "decoder_channels": "its decoders follow the paper",
    }

    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        problems = []
        depth = mcfg.get("depth")
        if depth is not None and (
            isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH
        ):
            problems.append(
                f"model.depth must be null (the paper's {MAX_DEPTH} levels) or an integer "
                f"1..{MAX_DEPTH} for doubleunet, got {depth!r}"
            )
        if mcfg.get("in_channels", 3) not in (1, 3):
            problems.append(f"model.in_channels must be 1 or 3, got {mcfg.get('in_channels')!r}")
        weights = mcfg.get("encoder_weights")
        if weights not in (None, "imagenet"):
            problems.append(
                f"model.encoder_weights must be imagenet or null for doubleunet, got {weights!r}"
            )
        return problems

    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        self.require_valid(mcfg)
        depth = mcfg.get("depth")
        model = DoubleUNet(
            in_channels=int(mcfg.get("in_channels", 3)),
            depth=MAX_DEPTH if depth is None else int(depth),
        )
        load_vgg19_weights(model, mcfg.get("encoder_weights"), mcfg.get("encoder_weights_path"))
        return model

    def train_loss(self, model: nn.Module, batch: Mapping, loss_fn) -> tuple[torch.Tensor, dict]:
        out1, out2 = model(batch["image"], both=True)
        return _two_losses(out1, out2, batch["mask"], loss_fn)

    def predict(self, model: nn.Module, x: torch.Tensor) -> Output:
        out1, out2 = model(x, both=True)
        return Output(torch.sigmoid(out2.float()), None, (out1, out2))

    def eval_loss(self, out: Output, batch: Mapping, loss_fn, n: int) -> torch.Tensor | None:
        out1, out2 = out.raw
        return _two_losses(out1[:n], out2[:n], batch["mask"], loss_fn)[0]


DOUBLEUNET = register(DoubleUNetFamily(), "doubleunet")
