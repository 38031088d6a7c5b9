import re
from pathlib import Path

import pytest

from pneumoseg.config import load_config
from pneumoseg.models.registry import build_model

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


# ---------------------------------------------------------------- base.yaml's comments = the code
def _choice_comments() -> dict[str, list[str]]:
    """``section.key -> [first word of each alternative]`` for every comment of base.yaml that
    lists choices as ``a | b (why) | c: what; more words``."""
    out, section = {}, None
    for line in (CONFIGS[0].parent / "base.yaml").read_text().splitlines():
        m = re.match(r"^(\s*)([a-z_]+):([^#]*)(?:#\s*(.*))?$", line)
        if not m:
            continue
        indent, key, _value, comment = m.groups()
        if not indent:
            section = key
        dotted = key if not indent else f"{section}.{key}"
        if comment and " | " in comment:
            out[dotted] = [re.match(r"\s*([\w:.-]+?):?(?:\s|$)", alt).group(1)
                           for alt in comment.split(";")[0].split(" | ")]  # fmt: skip
    return out


def test_base_choice_comments_match_the_registries():
    from pneumoseg import schema
    from pneumoseg.models.families import archs

    registries = {
        "data.layout": schema.LAYOUTS, "data.rle_format": schema.RLE_FORMATS,
        "model.arch": archs(), "sampler.kind": schema.SAMPLERS,
        "train.optimizer": schema.OPTIMIZERS, "train.scheduler": schema.SCHEDULERS,
        "train.amp": schema.AMP_MODES, "train.select": schema.SELECT_METRICS,
        "predict.amp": schema.AMP_MODES, "predict.rle": schema.RLE_FORMATS,
        "predict.backend": schema.BACKENDS, "predict.precision": schema.PRECISIONS,
    }  # fmt: skip
    comments = _choice_comments()
    for key, names in registries.items():
        assert sorted(comments[key]) == sorted(names), key
    # the other choice lists: each value listed is accepted, and nothing is left unchecked
    assert set(comments) - set(registries) == {"train.device", "model.in_channels"}
    for device in comments["train.device"]:
        assert schema._DEVICE_RE.match(device), device
    assert sorted(int(c) for c in comments["model.in_channels"]) == [1, 3]


def test_choice_comment_parser_reads_the_forms_used():
    assert len(_choice_comments()) == 14
    assert _choice_comments()["data.layout"] == ["siim", "png"]
    assert _choice_comments()["train.select"] == ["dice", "dice_gated", "val_loss"]
