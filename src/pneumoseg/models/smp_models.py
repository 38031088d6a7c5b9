"""The smp family's networks: an architecture of segmentation-models-pytorch over an smp or timm
encoder (:func:`build_smp`), optionally with ImageNet-style encoder weights from a local file.

Encoders: any smp encoder (``resnet34``, ``se_resnext50_32x4d``, ``efficientnet-b4``, ...) or any
timm model as ``tu-<name>``. ``encoder_weights: imagenet`` downloads weights (Hugging Face hub);
where that is impossible, point ``encoder_weights_path`` at a local file (the smp-hub
``model.safetensors``, or any encoder state dict saved with ``torch.save``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import segmentation_models_pytorch as smp
from torch import nn

from pneumoseg.errors import DownloadError, ModelFileError, UnknownNameError
from pneumoseg.models.weights import read_weights_file

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
}


def _lookup(registry: dict, name: str, what: str):
    try:
        return registry[name.lower()]
    except KeyError:
        raise UnknownNameError(
            f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}"
        ) from None


def check_encoder(name: str) -> None:
    """Raise ``KeyError`` listing the valid names when ``name`` is no smp/timm encoder."""
    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            raise UnknownNameError(
                f"unknown timm encoder {name!r} (timm has no model {name[3:]!r})"
            )
        return
    from segmentation_models_pytorch.encoders import encoders

    if name not in encoders:
        raise UnknownNameError(
            f"unknown encoder {name!r}; valid smp encoders: {', '.join(sorted(encoders))}, "
            "or any timm model as 'tu-<name>'"
        )


def build_smp(cfg: dict) -> nn.Module:
    """An smp architecture (``ARCHITECTURES``) over an smp/timm encoder."""
    arch = _lookup(ARCHITECTURES, cfg["arch"], "architecture")
    encoder = cfg["encoder"]
    check_encoder(encoder)
    weights = cfg.get("encoder_weights")
    weights_path = cfg.get("encoder_weights_path")
    kwargs = {}
    if cfg.get("decoder_channels"):
        # Smaller decoders make CPU demos and tests fast; smp's default is (256, 128, 64, 32, 16).
        kwargs["decoder_channels"] = tuple(int(c) for c in cfg["decoder_channels"])
    if cfg.get("aux_head"):
        kwargs["aux_params"] = {"classes": 1, "dropout": float(cfg.get("aux_dropout", 0.0))}
    try:
        model = arch(
            encoder_name=encoder,
            encoder_weights=None if weights_path else weights,
            in_channels=int(cfg.get("in_channels", 3)),
            classes=1,
            **kwargs,
        )
    except (OSError, ConnectionError, RuntimeError) as e:
        if weights and not weights_path and _looks_like_download_error(e):
            raise DownloadError(
                f"could not download {weights!r} weights for encoder {encoder!r} "
                f"({type(e).__name__}: {str(e)[:200]}). This machine looks offline. Download the "
                f"weights where there is internet (smp-hub/{encoder}.{weights} on the Hugging Face "
                "hub, file model.safetensors) and set model.encoder_weights_path=/path/to/file, "
                "or train from scratch with model.encoder_weights=null."
            ) from e
        raise
    if weights_path:
        load_encoder_weights(model, weights_path)
    return model


def _looks_like_download_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    keys = ("connection", "network", "resolve", "hub", "internet", "url", "offline", "timed out")
    return isinstance(e, (OSError, ConnectionError)) or any(k in text for k in keys)


def load_encoder_weights(model: nn.Module, path: str | Path) -> None:
    """Load an encoder state dict from ``path`` into ``model.encoder``.

    Accepts ``.safetensors`` or ``torch.save`` files (loaded with ``weights_only=True``); keys of a
    classifier head (``fc.``, ``classifier.``, ``head.``) are ignored. A 3-channel first conv is
    summed to 1 channel when the model takes grey images (what smp does for ImageNet weights).
    """
    path = Path(path)
    state = read_weights_file(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"model.encoder_weights_path {path}: holds no state dict")
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "head."))}
    own = model.encoder.state_dict()
    for key, value in list(state.items()):
        target = own.get(key)
        if target is not None and value.ndim == 4 and value.shape[1] != target.shape[1]:
            if target.shape[1] == 1:
                state[key] = value.sum(1, keepdim=True)
            else:
                raise ModelFileError(
                    f"{path}: {key} has {value.shape[1]} input channels, model expects "
                    f"{target.shape[1]}"
                )
    # smp encoders override load_state_dict without returning the key report: call the base.
    missing, unexpected = nn.Module.load_state_dict(model.encoder, state, strict=False)
    if missing:
        raise ModelFileError(
            f"{path}: {len(missing)} encoder weights missing, e.g. {missing[:3]} "
            "(is this the right encoder?)"
        )
    if unexpected:
        log.warning(
            "%s: ignored %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3]
        )
    log.info("loaded encoder weights from %s", path)
