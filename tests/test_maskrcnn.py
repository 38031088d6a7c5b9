"""The Mask R-CNN family: instance targets, build options, training loss, probability maps and
the offline weight handling (fast: 64 px, resnet18 / mobilenet_v3_large from scratch, CPU)."""

import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from pneumoseg.models import families

families.archs()  # fill the registry with every family first (it is loaded once, on first use)

from pneumoseg.errors import (  # noqa: E402
    ConfigError,
    DownloadError,
    ModelFileError,
    UnknownNameError,
)
from pneumoseg.models.families import maskrcnn as mr  # noqa: E402

S = 64
FAM = mr.MASKRCNN


def mcfg(**kw):
    base = {
        "arch": "maskrcnn",
        "encoder": "resnet18",
        "encoder_weights": None,
        "encoder_weights_path": None,
        "in_channels": 3,
        "aux_head": False,
        "input_size": S,
    }
    return {**base, **kw}


def light(model):
    """Fewer proposals and sampled RoIs than torchvision's defaults: fast CPU tests."""
    model.rpn._pre_nms_top_n = {"training": 300, "testing": 150}
    model.rpn._post_nms_top_n = {"training": 150, "testing": 50}
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    model.roi_heads.detections_per_img = 10
    return model


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return light(FAM.build(mcfg()))


def _instances(*boxes, h=S, w=S):
    """uint8 (K, h, w) with one filled rectangle (y0, y1, x0, x1) per instance."""
    out = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        out[k, y0:y1, x0:x1] = 1
    return out


# ----------------------------------------------------------------------------- targets
def test_overlapping_instances_stay_separate():
    inst = _instances((2, 10, 3, 12), (5, 20, 8, 30))  # they overlap on rows 5..9, cols 8..11
    t = mr.instance_targets(inst)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, S, S)
    assert t["boxes"].tolist() == [[3, 2, 12, 10], [8, 5, 30, 20]]
    assert t["labels"].tolist() == [1, 1]
    assert torch.equal(t["masks"], inst)


def test_one_pixel_wide_line_gets_a_box_of_width_one():
    inst = torch.zeros((1, S, S), dtype=torch.uint8)
    inst[0, 4:12, 7] = 1  # vertical line x = 7, y = 4..11
    t = mr.instance_targets(inst)
    assert t["boxes"].tolist() == [[7, 4, 8, 12]]
    single = torch.zeros((1, S, S), dtype=torch.uint8)
    single[0, 0, S - 1] = 255  # one pixel in the corner, any non-zero value
    t = mr.instance_targets(single)
    assert t["boxes"].tolist() == [[S - 1, 0, S, 1]]
    assert t["masks"].max() == 1


def test_empty_image_and_emptied_instances():
    t = mr.instance_targets(torch.zeros((0, S, S), dtype=torch.uint8))
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["masks"].shape == (0, S, S) and t["boxes"].dtype == torch.float32
    inst = _instances((1, 3, 1, 3), (0, 0, 0, 0), (10, 12, 20, 22))  # the 2nd one is empty
    t = mr.instance_targets(inst)
    assert t["boxes"].tolist() == [[1, 1, 3, 3], [20, 10, 22, 12]]
    assert torch.equal(t["masks"], inst[[0, 2]])
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        mr.instance_targets(torch.zeros((S, S), dtype=torch.uint8))


# ----------------------------------------------------------------------------- config
def test_check_problems():
    assert FAM.check(mcfg()) == []
    assert FAM.check(mcfg(encoder="resnet50", encoder_weights="coco")) == []
    problems = FAM.check(
        mcfg(encoder="vgg16", in_channels=1, aux_head=True, encoder_weights="coco")
    )
    text = " | ".join(problems)
    assert "unknown Mask R-CNN model.encoder 'vgg16'" in text
    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large"):
        assert name in text
    assert "in_channels 3" in text and "aux_head" in text and "coco" in text
    assert any("coco" in p for p in FAM.check(mcfg(encoder_weights="coco")))  # resnet18
    assert any("encoder_weights" in p for p in FAM.check(mcfg(encoder_weights="ssl")))
    assert any("min_score" in p for p in FAM.check(mcfg(min_score=1.5)))
    assert any("input_size" in p for p in FAM.check(mcfg(input_size=0)))
    assert any("trainable_layers" in p for p in FAM.check(mcfg(trainable_layers=9)))
    with pytest.raises(UnknownNameError, match="valid: resnet18"):
        FAM.build(mcfg(encoder="vgg16"))
    with pytest.raises(ConfigError, match="in_channels"):
        FAM.build(mcfg(in_channels=1))


def test_registered_and_transform_does_not_rescale(r18):
    assert families.family_for({"arch": "maskrcnn"}) is FAM
    assert FAM.needs_instances and FAM.tunable == ("min_score",)
    tr = r18.transform
    assert tuple(tr.min_size) == (S,) and tr.max_size == S
    assert list(tr.image_mean) == [0, 0, 0] and list(tr.image_std) == [1, 1, 1]
    r18.eval()
    img = torch.randn(3, S, S)
    batched, _ = tr([img])
    assert batched.image_sizes == [(S, S)]
    torch.testing.assert_close(batched.tensors[0, :, :S, :S], img)
    assert r18.pneumoseg_min_score == mr.DEFAULT_MIN_SCORE


# ----------------------------------------------------------------------------- training
def _batch():
    torch.manual_seed(1)
    pos = _instances((10, 30, 12, 28), (20, 40, 20, 44))
    return {
        "image": torch.randn(2, 3, S, S),
        "instances": [torch.zeros((0, S, S), dtype=torch.uint8), pos],
    }


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v3_large"])
def test_train_step_with_an_empty_and_a_positive_image(encoder, r18):
    model = r18 if encoder == "resnet18" else light(FAM.build(mcfg(encoder=encoder)))
    model.zero_grad()
    model.eval()
    loss, parts = FAM.train_loss(model, _batch(), loss_fn=None)
    assert model.training
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
            "loss_rpn_box_reg"} <= set(parts)  # fmt: skip
    assert all(math.isfinite(v) for v in parts.values())
    assert parts["loss_mask"] > 0  # the gt boxes are among the proposals
    assert math.isclose(float(loss.detach()), sum(parts.values()), rel_tol=1e-4)
    loss.backward()
    mask_grad = model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert mask_grad is not None and torch.isfinite(mask_grad).all() and mask_grad.abs().sum() > 0
    first = next(p for p in model.backbone.body.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0  # reaches the backbone
    assert FAM.eval_loss(None, {}, None, 2) is None


def test_predict_shape_and_range(r18):
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        out = FAM.predict(r18, x)
    assert not r18.training
    assert out.probs.shape == (2, 1, S, S) and out.probs.dtype == torch.float32
    assert float(out.probs.min()) >= 0 and float(out.probs.max()) <= 1
    assert out.cls is None and isinstance(out.raw, list) and len(out.raw) == 2
    assert {"boxes", "scores", "masks", "labels"} <= set(out.raw[0])


class FakeDetector(nn.Module):
    """Returns fixed detections in eval mode (what torchvision's MaskRCNN gives)."""

    def __init__(self, detections):
        super().__init__()
        self.detections = detections

    def forward(self, images):
        assert not self.training and len(images) == len(self.detections)
        return self.detections


def test_probability_map_is_max_of_score_times_mask():
    h = w = 4
    m1 = torch.full((h, w), 0.5)
    m1[0, 0], m1[3, 3], m1[1, 2] = 1.0, 0.2, 0.0
    m2 = torch.zeros((h, w))
    m2[3, 3] = 1.0
    m3 = torch.ones((h, w))
    det = {
        "scores": torch.tensor([0.9, 0.3, 0.04]),
        "masks": torch.stack([m1, m2, m3])[:, None],
        "boxes": torch.zeros((3, 4)),
        "labels": torch.ones(3, dtype=torch.int64),
    }
    none = {
        "scores": torch.zeros(0),
        "masks": torch.zeros((0, 1, h, w)),
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    fake = FakeDetector([det, none])
    x = torch.zeros(2, 3, h, w)
    probs = FAM.predict(fake, x).probs  # default min_score 0.05: the 0.04 one is left out
    expected = torch.full((h, w), 0.45)
    expected[0, 0], expected[3, 3], expected[1, 2] = 0.9, 0.3, 0.0
    torch.testing.assert_close(probs[0, 0], expected)
    assert probs.shape == (2, 1, h, w) and not probs[1].any()
    FAM.set_option(fake, "min_score", 0.01)
    assert FAM.predict(fake, x).probs[0, 0, 1, 2] == pytest.approx(0.04)
    FAM.set_option(fake, "min_score", 0.5)
    torch.testing.assert_close(FAM.predict(fake, x).probs[0, 0], 0.9 * m1)
    FAM.set_option(fake, "min_score", 0.3)  # >= min_score counts
    assert FAM.predict(fake, x).probs[0, 0, 3, 3] == pytest.approx(0.3)


def test_set_option(r18):
    FAM.set_option(r18, "min_score", 0.2)
    assert r18.pneumoseg_min_score == 0.2
    assert r18.roi_heads.score_thresh < 0.2 and r18.roi_heads.score_thresh == pytest.approx(0.2)
    with pytest.raises(UnknownNameError, match="min_score"):
        FAM.set_option(r18, "nms", 0.5)
    with pytest.raises(ConfigError, match="min_score"):
        FAM.set_option(r18, "min_score", -1)
    FAM.set_option(r18, "min_score", mr.DEFAULT_MIN_SCORE)
    built = FAM.build(mcfg(min_score=0.3))
    assert built.pneumoseg_min_score == 0.3
    assert built.roi_heads.score_thresh == pytest.approx(0.3)


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize(
    "exc, text",
    [
        (urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), "offline"),
        (RuntimeError("invalid hash value"), "damaged"),
    ],
)
@pytest.mark.parametrize("encoder, weights", [("resnet18", "imagenet"), ("resnet50", "coco")])
def test_failed_download_is_a_download_error(monkeypatch, exc, text, encoder, weights):
    def fail(url, *args, **kwargs):
        raise exc

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fail)
    with pytest.raises(DownloadError) as err:
        FAM.build(mcfg(encoder=encoder, encoder_weights=weights))
    msg = str(err.value)
    url = (mr.COCO_WEIGHTS if weights == "coco" else mr.BACKBONES[encoder][1]).url
    assert url in msg and url.rsplit("/", 1)[-1] in msg
    assert "model.encoder_weights_path" in msg and "model.encoder_weights=null" in msg
    assert text in msg and repr(weights) in msg


def test_weights_path_kinds_and_frozen_bn(tmp_path, r18):
    # a torchvision classification network (like resnet18-f37072fd.pth)
    torch.manual_seed(2)
    clf = torchvision.models.resnet18().state_dict()
    torch.save(clf, tmp_path / "r18.pth")
    model = light(
        FAM.build(mcfg(encoder_weights="imagenet", encoder_weights_path=str(tmp_path / "r18.pth")))
    )
    assert torch.equal(model.backbone.body.conv1.weight, clf["conv1.weight"])
    assert model.pneumoseg_freeze_bn and not model.backbone.body.bn1.weight.requires_grad
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable layers
    assert model.backbone.body.layer4[0].conv1.weight.requires_grad
    # frozen BatchNorm: statistics do not move in training
    before = model.backbone.body.bn1.running_mean.clone()
    model.eval().train()
    model.backbone(torch.randn(2, 3, S, S))
    assert model.training and not model.backbone.body.bn1.training
    assert torch.equal(model.backbone.body.bn1.running_mean, before)
    # the layers do not depend on the weights' origin: a checkpoint loads into a scratch model
    r18.load_state_dict(model.state_dict(), strict=True)

    # a full Mask R-CNN with class-specific predictors of another shape (like the COCO file)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(91, 1024)
    full["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(91)
    torch.save({"model": full}, tmp_path / "full.pth")
    assert mr.state_kind(full) == "full"
    other = FAM.build(mcfg(encoder_weights_path=str(tmp_path / "full.pth")))
    assert torch.equal(
        other.roi_heads.mask_head[0][0].weight, full["roi_heads.mask_head.0.0.weight"]
    )
    assert other.roi_heads.box_predictor.cls_score.weight.shape == (2, 1024)

    # an FPN backbone
    bb = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    torch.save(bb, tmp_path / "bb.pth")
    assert mr.state_kind(bb) == "backbone"
    other = FAM.build(mcfg(encoder_weights_path=str(tmp_path / "bb.pth")))
    assert torch.equal(other.backbone.fpn.inner_blocks[0][0].weight,
                       model.backbone.fpn.inner_blocks[0][0].weight)  # fmt: skip

    # weights of another encoder
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ModelFileError, match=r"right model\.encoder"):
        FAM.build(mcfg(encoder_weights_path=str(tmp_path / "r34.pth")))  # keys: a superset
    with pytest.raises(ModelFileError, match="another shape"):
        FAM.build(mcfg(encoder="resnet50", encoder_weights_path=str(tmp_path / "r18.pth")))


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v3_large"])
def test_light_settings_build_and_train(encoder):
    """model.fpn_channels / roi_samples / rpn_proposals: a narrower FPN and mask head, fewer
    sampled RoIs and proposals, and the model still trains and predicts."""
    torch.manual_seed(0)
    model = FAM.build(mcfg(encoder=encoder, fpn_channels=32, roi_samples=24, rpn_proposals=200))
    assert model.backbone.out_channels == 32
    assert model.backbone.fpn.layer_blocks[0][0].out_channels == 32
    assert [m.out_channels for m in model.roi_heads.mask_head.modules()
            if isinstance(m, nn.Conv2d)] == [32] * 4  # fmt: skip
    assert model.roi_heads.box_predictor.cls_score.out_features == mr.NUM_CLASSES
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == mr.NUM_CLASSES
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 24
    assert model.rpn._pre_nms_top_n == {"training": 200, "testing": 100}
    assert model.rpn._post_nms_top_n == {"training": 200, "testing": 100}
    full = sum(p.numel() for p in FAM.build(mcfg(encoder=encoder)).parameters())
    assert sum(p.numel() for p in model.parameters()) < full
    loss, _ = FAM.train_loss(model, _batch(), loss_fn=None)
    loss.backward()
    assert model.roi_heads.mask_head[0][0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = FAM.predict(model, torch.randn(2, 3, S, S))
    assert out.probs.shape == (2, 1, S, S)


def test_light_settings_checked():
    problems = FAM.check(mcfg(encoder="resnet50", encoder_weights="coco", fpn_channels=64,
                              roi_samples=0, rpn_proposals="many"))  # fmt: skip
    assert any("model.roi_samples must be null or a positive integer, got 0" in p for p in problems)
    assert any("model.rpn_proposals" in p and "'many'" in p for p in problems)
    assert any("fpn_channels 64 does not fit the COCO weights" in p for p in problems)
    assert FAM.check(mcfg(encoder="resnet50", encoder_weights="coco", fpn_channels=256)) == []
