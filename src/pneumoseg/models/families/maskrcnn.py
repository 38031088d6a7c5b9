"""The Mask R-CNN family (``model.arch: maskrcnn``): torchvision's Mask R-CNN over a ResNet-FPN or
MobileNetV3-FPN backbone, 2 classes (background, pneumothorax), trained on the instances (one per
RLE row) and read out as a probability map: per pixel, the max over the detections scoring
``>= min_score`` of score × mask probability (0 where nothing is detected).

Config (the ``model`` section):

``encoder``
    ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101`` | ``mobilenet_v3_large``
    (resnet50 for real runs; resnet18 or mobilenet_v3_large for CPU demos and tests).
``encoder_weights``
    ``null`` (scratch), ``imagenet`` (torchvision's ImageNet backbone) or ``coco`` (torchvision's
    full COCO ``maskrcnn_resnet50_fpn``, resnet50 only; the box and mask predictors are replaced
    by 2-class ones). A download that fails raises :class:`DownloadError` saying what to fetch.
``encoder_weights_path``
    a local state dict (``torch.save`` file or ``.safetensors``; wins over ``encoder_weights``).
    What it holds is read from its keys: any ``rpn.*`` / ``roi_heads.*`` key -> a full Mask R-CNN
    (e.g. the COCO file; predictors of another shape are replaced); ``backbone.body.*`` or
    ``body.*`` keys -> an FPN backbone; anything else -> a torchvision classification network
    (e.g. ``resnet50-0676ba61.pth``; ``fc.*`` / ``classifier.*`` ignored).
``input_size``
    S, the side of the images (``cache.size``; default 512). The model's internal
    ``GeneralizedRCNNTransform`` gets ``min_size = max_size = S`` and an identity normalisation
    (mean 0, std 1): the pipeline already resizes and normalises, so nothing is rescaled twice.
``min_score``
    detections below it are left out of the probability map (default 0.05; tunable, see
    :meth:`MaskRCNNFamily.set_option`).
``trainable_layers``
    backbone stages left trainable (torchvision's ``trainable_backbone_layers``); default: 3 with
    pretrained weights, all without.
``freeze_bn``
    keep the backbone's BatchNorm statistics and affine parameters fixed in training (what
    torchvision's FrozenBatchNorm2d does for pretrained backbones; right for small batches);
    default: true with pretrained weights, false without.
``detections_per_img``
    at most this many detections per image (default 100).
``fpn_channels``, ``roi_samples``, ``rpn_proposals``
    a lighter model for CPUs (null = torchvision's 256, 512, 2000): the FPN and mask-head width
    (anything but 256 does not fit the COCO weights), the RoIs sampled per image for the box and
    mask losses, and the RPN proposals kept per image in training (half in inference).
``in_channels`` must be 3 (the pipeline replicates grey to 3 channels); ``aux_head`` is not
supported.

The layers never depend on where the weights came from: the backbone always uses plain
``BatchNorm2d`` (frozen by ``freeze_bn`` through :meth:`PneumoMaskRCNN.train`, not by a different
module type), so a checkpoint trained from ImageNet or COCO weights loads into a model rebuilt
with ``encoder_weights: null`` (what inference does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pneumoseg.errors import (
    ConfigError,
    DownloadError,
    ModelFileError,
    UnknownNameError,
)
from pneumoseg.models.families import Family, Output, register

log = logging.getLogger(__name__)

NUM_CLASSES = 2  # background, pneumothorax
DEFAULT_SIZE = 512
DEFAULT_MIN_SCORE = 0.05
FPN_CHANNELS = 256  # torchvision's FPN width (the COCO weights')
WEIGHTS = (None, "imagenet", "coco")

_M = torchvision.models
# backbone name -> (torchvision constructor name, ImageNet weights enum, max trainable layers)
BACKBONES: dict[str, tuple[str, Any, int]] = {
    "resnet18": ("resnet18", _M.ResNet18_Weights.IMAGENET1K_V1, 5),
    "resnet34": ("resnet34", _M.ResNet34_Weights.IMAGENET1K_V1, 5),
    "resnet50": ("resnet50", _M.ResNet50_Weights.IMAGENET1K_V1, 5),
    "resnet101": ("resnet101", _M.ResNet101_Weights.IMAGENET1K_V1, 5),
    "mobilenet_v3_large": ("mobilenet_v3_large", _M.MobileNet_V3_Large_Weights.IMAGENET1K_V1, 6),
}
COCO_WEIGHTS = _M.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
# keys of the class-specific predictors: of another shape in a COCO (91-class) file, replaced
_PREDICTORS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


# ----------------------------------------------------------------------------- targets
def instance_targets(instances: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's training target of one image from its instance masks ``(K, H, W)``.

    Returns ``boxes`` float32 ``(K', 4)`` xyxy in pixels with ``x2 = max_x + 1`` and
    ``y2 = max_y + 1`` (a 1-pixel-wide instance has width 1), ``labels`` int64 ``(K',)`` all 1 and
    ``masks`` uint8 ``(K', H, W)`` 0/1, where K' drops the instances left empty by augmentation or
    resizing. Every instance stays separate, overlapping or not. An image without instances gives
    ``(0, 4)`` / ``(0,)`` / ``(0, H, W)``: a negative example that torchvision trains on.
    """
    if instances.ndim != 3:
        raise ValueError(f"instances must be (K, H, W), got shape {tuple(instances.shape)}")
    fg = instances > 0
    fg = fg[fg.flatten(1).any(1)]
    _, h, w = fg.shape
    rows, cols = fg.any(2), fg.any(1)  # (K', H), (K', W) bool
    ys = torch.arange(h, device=fg.device)
    xs = torch.arange(w, device=fg.device)
    y0 = torch.where(rows, ys, h).amin(1)
    y1 = torch.where(rows, ys, -1).amax(1) + 1
    x0 = torch.where(cols, xs, w).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).to(torch.float32).reshape(-1, 4)
    labels = torch.ones(len(fg), dtype=torch.int64, device=fg.device)
    return {"boxes": boxes, "labels": labels, "masks": fg.to(torch.uint8)}


# ----------------------------------------------------------------------------- the model
class PneumoMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN that keeps the backbone's BatchNorm layers in eval mode in training
    when ``pneumoseg_freeze_bn`` is set (their parameters are frozen at build time)."""

    pneumoseg_min_score: float = DEFAULT_MIN_SCORE
    pneumoseg_freeze_bn: bool = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.pneumoseg_freeze_bn:
            for m in self.backbone.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DDP (``.module``) or torch.compile (``._orig_mod``)."""
    for _ in range(8):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _weights_name(mcfg: Mapping[str, Any]):
    w = mcfg.get("encoder_weights")
    if w is None or (isinstance(w, str) and w.strip().lower() in ("", "none", "null")):
        return None
    return w.strip().lower() if isinstance(w, str) else w


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        out = int(value)
    except (TypeError, ValueError):
        return None
    return out if out == value else None


def _check_min_score(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        return f"model.min_score must be a number in [0, 1], got {value!r}"
    return None


def _detections_thresh(min_score: float) -> float:
    # torchvision keeps scores > score_thresh; we keep scores >= min_score. Filtering before NMS
    # gives the same detections as filtering after it (a dropped box can only suppress lower ones).
    return math.nextafter(float(min_score), -math.inf)


def _download(weights, encoder: str, what: str) -> dict:
    """``weights.get_state_dict()``; a failure becomes a :class:`DownloadError` saying what to do."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        file = weights.url.rsplit("/", 1)[-1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file
        if isinstance(e, OSError):  # URLError, HTTPError, socket errors, ConnectionError
            why = "This machine looks offline (or the server is unreachable)."
        else:
            why = f"The downloaded file may be damaged: delete {cached} and retry, or:"
        raise DownloadError(
            f"could not download {what!r} weights for Mask R-CNN model.encoder {encoder!r} "
            f"({type(e).__name__}: {str(e)[:200]}). {why} Download {weights.url} where there is "
            f"internet and set model.encoder_weights_path=/path/to/{file} (or copy the file to "
            f"{cached}, where torchvision looks first), or train from scratch with "
            "model.encoder_weights=null."
        ) from e


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` / ``.safetensors`` file (unwrapping ``state_dict`` /
    ``model`` entries and DataParallel's ``module.`` prefix)."""
    from pneumoseg.models.weights import read_weights_file

    state = read_weights_file(path)
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        inner = next((state[k] for k in ("state_dict", "model") if k in state), None)
        if not isinstance(inner, Mapping):
            break
        state = inner
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise ModelFileError(f"model.encoder_weights_path {path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_kind(state: Mapping[str, Any]) -> str:
    """What a weights file holds, from its keys: ``full`` (a Mask R-CNN: ``rpn.*`` or
    ``roi_heads.*`` keys), ``backbone`` (an FPN backbone: ``backbone.body.*`` or ``body.*``) or
    ``classifier`` (a torchvision classification network, anything else)."""
    keys = list(state)
    if any(k.startswith(("rpn.", "roi_heads.")) for k in keys):
        return "full"
    if any(k.startswith(("backbone.body.", "body.")) for k in keys):
        return "backbone"
    return "classifier"


def _load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    replaceable: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module`` (not strict): keys of another shape are an error unless they
    start with one of ``replaceable`` (left as initialised); missing keys are an error unless they
    start with ``optional`` (warned about) or ``ignore`` (a classifier's head: dropped from the
    file, not missed); keys the module lacks are an error (e.g. resnet34
    weights offered to a resnet18, whose keys are a subset of resnet34's)."""
    own = module.state_dict()
    shapes = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad = [k for k in shapes if not k.startswith(replaceable)]
    if bad:
        k = bad[0]
        raise ModelFileError(
            f"{source}: {len(bad)} weights of another shape, e.g. {k}: {tuple(state[k].shape)} in "
            f"the file, {tuple(own[k].shape)} in the model (is this the right model.encoder?)"
        )
    state = {k: v for k, v in state.items() if k not in shapes and not k.startswith(ignore)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [
        k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith(ignore)
    ]
    lacking = [k for k in missing if not k.startswith((*replaceable, *optional))]
    if lacking:
        raise ModelFileError(
            f"{source}: {len(lacking)} weights missing, e.g. {lacking[:3]} "
            "(is this the right model.encoder?)"
        )
    if unexpected:
        raise ModelFileError(
            f"{source}: {len(unexpected)} weights this model does not have, e.g. "
            f"{unexpected[:3]} (is this the right model.encoder?)"
        )
    if missing and optional:
        log.warning("%s: %d weights not in the file stay initialised, e.g. %s", source,
                    len(missing), missing[:3])  # fmt: skip
    if shapes:
        log.info("%s: replaced %d weights of another shape (%s)", source, len(shapes), shapes[:4])


def _light_settings(backbone: nn.Module, mcfg: Mapping[str, Any]) -> dict[str, Any]:
    """MaskRCNN keyword arguments for ``fpn_channels``, ``roi_samples`` and ``rpn_proposals``
    (torchvision's defaults where null). A narrower FPN also narrows the mask head, whose four
    256-channel convs on every positive RoI are most of a CPU training step; ``backbone``'s FPN
    is rebuilt at that width."""
    kwargs: dict[str, Any] = {}
    width = _as_int(mcfg.get("fpn_channels"))
    if width and width != FPN_CHANNELS:
        ins = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(ins, width, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = width
        kwargs.update(  # torchvision's heads at this width (num_classes goes to the predictors)
            box_predictor=FastRCNNPredictor(1024, NUM_CLASSES),
            mask_head=MaskRCNNHeads(width, (width,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(width, width, NUM_CLASSES),
        )
    else:
        kwargs["num_classes"] = NUM_CLASSES
    proposals = _as_int(mcfg.get("rpn_proposals"))
    if proposals:
        test = max(proposals // 2, 1)  # torchvision's 2000 / 1000 ratio
        kwargs.update(
            rpn_pre_nms_top_n_train=proposals, rpn_post_nms_top_n_train=proposals,
            rpn_pre_nms_top_n_test=test, rpn_post_nms_top_n_test=test,
        )  # fmt: skip
    samples = _as_int(mcfg.get("roi_samples"))
    if samples:
        kwargs["box_batch_size_per_image"] = samples
    return kwargs


class MaskRCNNFamily(Family):
    name = "maskrcnn"
    needs_instances = True
    tunable = ("min_score",)
    has_eval_loss = False  # torchvision computes its losses only in train mode
    uses = (
        "encoder", "encoder_weights", "encoder_weights_path", "in_channels", "min_score",
        "trainable_layers", "freeze_bn", "detections_per_img",
        "fpn_channels", "roi_samples", "rpn_proposals",
    )  # fmt: skip
    checked = ("aux_head",)  # rejected with its own message
    hints: ClassVar[dict[str, str]] = {"decoder_channels": "its FPN width is model.fpn_channels"}

    # ---- config
    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        """The problems of a ``model`` section for this family (empty: it builds)."""
        problems = []
        encoder = str(mcfg.get("encoder", "resnet50"))
        if encoder.lower() not in BACKBONES:
            problems.append(
                f"unknown Mask R-CNN model.encoder {encoder!r}; valid: {', '.join(BACKBONES)}"
            )
        in_channels = mcfg.get("in_channels", 3)
        if in_channels is not None and in_channels != 3:
            problems.append(
                f"Mask R-CNN needs model.in_channels 3 (grey replicated to 3 channels), "
                f"got {in_channels!r}"
            )
        weights = _weights_name(mcfg)
        if weights not in WEIGHTS:
            problems.append(
                f"unknown Mask R-CNN model.encoder_weights {mcfg.get('encoder_weights')!r}; "
                "valid: null, imagenet, coco"
            )
        elif (
            weights == "coco"
            and encoder.lower() != "resnet50"
            and not mcfg.get("encoder_weights_path")
        ):
            problems.append(
                f"model.encoder_weights coco exists only for model.encoder resnet50 "
                f"(torchvision's maskrcnn_resnet50_fpn), not {encoder!r}: use imagenet or null"
            )
        if mcfg.get("aux_head"):
            problems.append("model.aux_head is not supported by Mask R-CNN: set it to false")
        size = mcfg.get("input_size", DEFAULT_SIZE)
        if size is not None and not (_as_int(size) or 0) > 0:
            problems.append(f"model.input_size must be a positive integer, got {size!r}")
        problem = _check_min_score(mcfg.get("min_score", DEFAULT_MIN_SCORE))
        if problem:
            problems.append(problem)
        layers = mcfg.get("trainable_layers")
        if layers is not None and encoder.lower() in BACKBONES:
            top = BACKBONES[encoder.lower()][2]
            value = _as_int(layers)
            if value is None or not 0 <= value <= top:
                problems.append(
                    f"model.trainable_layers must be an integer in [0, {top}] for {encoder}, "
                    f"got {layers!r}"
                )
        for key in ("detections_per_img", "fpn_channels", "roi_samples", "rpn_proposals"):
            value = mcfg.get(key)
            if value is not None and not (_as_int(value) or 0) > 0:
                problems.append(f"model.{key} must be null or a positive integer, got {value!r}")
        fpn = _as_int(mcfg.get("fpn_channels"))
        if (
            weights == "coco"
            and fpn not in (None, FPN_CHANNELS)
            and not mcfg.get("encoder_weights_path")
        ):
            problems.append(
                f"model.fpn_channels {fpn} does not fit the COCO weights (FPN width "
                f"{FPN_CHANNELS}): set it to null or use imagenet weights"
            )
        return problems

    # ---- build
    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        problems = self.check(mcfg)
        if problems:
            encoder = str(mcfg.get("encoder", "resnet50"))
            cls = UnknownNameError if encoder.lower() not in BACKBONES else ConfigError
            raise cls("; ".join(problems))
        encoder = str(mcfg.get("encoder", "resnet50")).lower()
        ctor, imagenet, top = BACKBONES[encoder]
        weights = _weights_name(mcfg)
        path = mcfg.get("encoder_weights_path")
        size = int(mcfg.get("input_size") or DEFAULT_SIZE)
        min_score = float(mcfg.get("min_score", DEFAULT_MIN_SCORE))

        state, kind, source = None, None, None
        if path:
            state, source = _read_state(path), f"model.encoder_weights_path {path}"
            kind = state_kind(state)
        elif weights == "imagenet":
            state, kind, source = _download(imagenet, encoder, "imagenet"), "classifier", imagenet
        elif weights == "coco":
            state, kind, source = _download(COCO_WEIGHTS, encoder, "coco"), "full", COCO_WEIGHTS
        pretrained = state is not None
        layers = mcfg.get("trainable_layers")
        layers = (3 if pretrained else top) if layers is None else int(layers)
        freeze_bn = mcfg.get("freeze_bn")
        freeze_bn = pretrained if freeze_bn is None else bool(freeze_bn)

        net = getattr(torchvision.models, ctor)(weights=None)  # plain BatchNorm2d, see module doc
        if kind == "classifier":
            _load_into(net, state, str(source), ignore=("fc.", "classifier."))
        kwargs: dict[str, Any] = {}
        if encoder.startswith("mobilenet"):
            backbone = _mobilenet_extractor(net, True, layers)
            # 2 feature maps + pool: torchvision's fasterrcnn_mobilenet_v3_large_fpn anchors
            anchor_sizes = ((32, 64, 128, 256, 512),) * 3
            kwargs["rpn_anchor_generator"] = AnchorGenerator(
                anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes)
            )
        else:
            backbone = _resnet_fpn_extractor(net, layers)
        kwargs.update(_light_settings(backbone, mcfg))
        model = PneumoMaskRCNN(
            backbone,
            min_size=size,
            max_size=size,
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
            box_score_thresh=_detections_thresh(min_score),
            box_detections_per_img=int(mcfg.get("detections_per_img") or 100),
            **kwargs,
        )
        if kind == "full":
            _load_into(model, state, str(source), replaceable=_PREDICTORS)
        elif kind == "backbone":
            state = {k.removeprefix("backbone."): v for k, v in state.items()}
            _load_into(model.backbone, state, str(source), optional=("fpn.",))
        if freeze_bn:
            for m in model.backbone.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
        model.pneumoseg_freeze_bn = freeze_bn
        model.pneumoseg_min_score = min_score
        model.train()  # applies freeze_bn to a model that is never switched to train explicitly
        if pretrained:
            log.info("Mask R-CNN %s: weights from %s (kind %s), trainable layers %d, freeze_bn %s",
                     encoder, source, kind, layers, freeze_bn)  # fmt: skip
        return model

    def set_option(self, model: nn.Module, name: str, value: Any) -> None:
        """Set an inference option of a built model (``min_score``)."""
        if name not in self.tunable:
            raise UnknownNameError(
                f"unknown Mask R-CNN option {name!r}; valid: {', '.join(self.tunable)}"
            )
        problem = _check_min_score(value)
        if problem:
            raise ConfigError(problem)
        core = _unwrap(model)
        core.pneumoseg_min_score = float(value)
        roi_heads = getattr(core, "roi_heads", None)
        if roi_heads is not None:
            roi_heads.score_thresh = _detections_thresh(value)

    # ---- training
    def train_loss(self, model: nn.Module, batch: Mapping, loss_fn) -> tuple[torch.Tensor, dict]:
        """torchvision's summed losses on the batch's images and instances (``loss_fn`` is not
        used); puts the model in train mode (torchvision computes losses only there)."""
        if not model.training:
            model.train()
        images = list(batch["image"])
        instances = batch["instances"]
        if len(instances) != len(images):
            raise ValueError(f"{len(images)} images but {len(instances)} instance stacks")
        targets = []
        for img, inst in zip(images, instances, strict=True):
            if tuple(inst.shape[-2:]) != tuple(img.shape[-2:]):
                raise ValueError(
                    f"instances of shape {tuple(inst.shape)} for an image of shape "
                    f"{tuple(img.shape)}: they must have the image's height and width"
                )
            targets.append(instance_targets(inst.to(img.device)))
        losses = model(images, targets)
        total = sum(losses.values())
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
        return total, dict(zip(losses, values, strict=True))

    # ---- inference
    def predict(self, model: nn.Module, x: torch.Tensor) -> Output:
        """Eval-mode detections of the images ``x`` -> probability map ``(B, 1, H, W)``: per pixel
        the max over detections with score >= min_score of score × mask probability."""
        if model.training:
            model.eval()
        detections = model(list(x))
        min_score = float(getattr(_unwrap(model), "pneumoseg_min_score", DEFAULT_MIN_SCORE))
        b, _, h, w = x.shape
        probs = torch.zeros((b, 1, h, w), dtype=torch.float32, device=x.device)
        for i, det in enumerate(detections):
            scores = det["scores"].float()
            keep = scores >= min_score
            if keep.any():
                masks = det["masks"][keep].float().reshape(-1, 1, h, w)
                probs[i] = (masks * scores[keep].reshape(-1, 1, 1, 1)).amax(0)
        return Output(probs.clamp_(0, 1), None, detections)

    def eval_loss(self, out: Output, batch: Mapping, loss_fn, n: int) -> torch.Tensor | None:
        return None  # torchvision computes losses only in train mode


MASKRCNN = register(MaskRCNNFamily(), "maskrcnn")
