import pytest
import torch

from pneumoseg.models.registry import ARCHITECTURES, build_model, load_encoder_weights, split_output

BASE = {
    "encoder_weights": None,
    "encoder_weights_path": None,
    "aux_head": False,
    "aux_dropout": 0.0,
}


def _smoke(cfg, in_channels, size=64):
    torch.manual_seed(0)
    model = build_model({**BASE, **cfg, "in_channels": in_channels})
    x = torch.randn(2, in_channels, size, size)
    mask, cls = split_output(model(x))
    assert mask.shape == (2, 1, size, size)
    loss = mask.mean() + (cls.mean() if cls is not None else 0)
    loss.backward()
    # The gradient reaches the first layer (some encoders keep unused classifier-side layers).
    first = next(p for p in model.encoder.parameters() if p.ndim == 4)
    assert first.grad is not None and first.grad.abs().sum() > 0
    head = list(model.segmentation_head.parameters())
    assert all(p.grad is not None for p in head)
    return mask, cls


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_architectures_forward_backward(arch, in_channels):
    _smoke({"arch": arch, "encoder": "resnet18"}, in_channels)


@pytest.mark.parametrize(
    "encoder", ["resnet34", "se_resnext50_32x4d", "efficientnet-b4", "tu-resnet10t"]
)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_encoder_families_forward_backward(encoder, in_channels):
    _smoke({"arch": "unet", "encoder": encoder}, in_channels)


def test_aux_head_outputs_image_logits():
    _, cls = _smoke({"arch": "unet", "encoder": "resnet18", "aux_head": True}, 3)
    assert cls.shape == (2, 1)


def test_unknown_names_list_valid_ones():
    with pytest.raises(
        KeyError,
        match="valid: deeplabv3plus, doubleunet, fpn, maskrcnn, unet, unet_classic, unetplusplus",
    ):
        build_model({**BASE, "arch": "unett", "encoder": "resnet34"})
    with pytest.raises(KeyError, match="resnet34"):
        build_model({**BASE, "arch": "unet", "encoder": "resnet35"})


def test_offline_imagenet_download_gives_clear_error(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="encoder_weights_path"):
        build_model({**BASE, "arch": "unet", "encoder": "resnet18", "encoder_weights": "imagenet"})


@pytest.mark.parametrize("in_channels", [1, 3])
def test_local_encoder_weights(tmp_path, in_channels):
    src = build_model({**BASE, "arch": "unet", "encoder": "resnet18", "in_channels": 3})
    state = {f"encoder.{k}": v for k, v in src.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 512)  # classifier keys are ignored
    path = tmp_path / "enc.pth"
    torch.save(state, path)
    cfg = {
        **BASE,
        "arch": "fpn",
        "encoder": "resnet18",
        "encoder_weights": "imagenet",
        "encoder_weights_path": str(path),
        "in_channels": in_channels,
    }
    model = build_model(cfg)
    w = model.encoder.conv1.weight
    expected = src.encoder.conv1.weight
    if in_channels == 1:
        expected = expected.sum(1, keepdim=True)
    torch.testing.assert_close(w, expected)


def test_local_encoder_weights_wrong_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    model = build_model({**BASE, "arch": "unet", "encoder": "resnet18"})
    with pytest.raises(ValueError, match="weights missing"):
        load_encoder_weights(model, path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_encoder_weights(model, tmp_path / "nope.pth")
