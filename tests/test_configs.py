from pathlib import Path

import pytest

from pneumoseg.config import load_config
from pneumoseg.models import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_resolves_and_builds_its_model(path):
    cfg = load_config(path)
    assert cfg["exp"] == (path.stem if path.stem != "base" else "base")
    for key in ("data", "cache", "folds", "model", "loss", "sampler", "train", "oof", "tune"):
        assert key in cfg
    # the architecture/encoder pair exists (weights are not downloaded here)
    build_model({**cfg["model"], "encoder_weights": None, "encoder_weights_path": None})


def test_real_configs_keep_imagenet_and_demo_does_not():
    names = {p.stem: load_config(p) for p in CONFIGS}
    assert names["demo"]["model"]["encoder_weights"] is None
    for real in ("r34_unet_512", "seresnext50_unetpp_512", "effb4_unet_gray_512"):
        assert names[real]["model"]["encoder_weights"] == "imagenet"
    assert "{fold}" in names["r34_unet_1024"]["train"]["init_from"]
