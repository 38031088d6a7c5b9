import pytest

from pneumoseg.config import ConfigError, load_config, parse_overrides, save_config


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text(
        "exp: base\nseed: 1\n"
        "train:\n  lr: 0.001\n  epochs: 3\n  amp: true\n  size: [256, 256]\n  weights: null\n"
        "model:\n  arch: unet\n"
    )
    return p


def test_experiment_merges_and_names_run(base, tmp_path):
    exp = tmp_path / "my_exp.yaml"
    exp.write_text("train:\n  lr: 1\n")
    cfg = load_config(exp, base=base)
    assert cfg["train"] == {
        "lr": 1.0,
        "epochs": 3,
        "amp": True,
        "size": [256, 256],
        "weights": None,
    }
    assert isinstance(cfg["train"]["lr"], float)
    assert cfg["exp"] == "my_exp"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lr=1e-4", 1e-4),
        ("train.epochs=7", 7),
        ("train.amp=false", False),
        ("train.size=[64, 64]", [64, 64]),
        ("train.weights=x/y.pt", "x/y.pt"),
        ("model.arch=se_resnext50_32x4d", "se_resnext50_32x4d"),
    ],
)
def test_overrides(base, override, expected):
    cfg = load_config(None, [override], base=base)
    section, key = override.split("=")[0].split(".")
    assert cfg[section][key] == expected


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "train.lrr=1",
            r"unknown key 'train.lrr'. Valid keys here: amp, epochs, lr, size, weights",
        ),
        ("trian.lr=1", r"unknown key 'trian'"),
        ("train.epochs=1.5", r"'train.epochs' must be int"),
        ("train.amp=1", r"'train.amp' must be bool"),
        ("train.lr=fast", r"'train.lr' must be float"),
        ("train=3", r"'train' is a section"),
        ("train.lr", r"must look like section.key=value"),
    ],
)
def test_override_errors(base, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], base=base)


def test_experiment_typo_names_file(base, tmp_path):
    exp = tmp_path / "bad.yaml"
    exp.write_text("model:\n  archh: fpn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.archh'"):
        load_config(exp, base=base)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_roundtrip(base, tmp_path):
    cfg = load_config(None, ["train.lr=0.5"], base=base)
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(out, base=base) | {"exp": "base"} == cfg


def test_repo_base_config_loads():
    cfg = load_config()
    assert {"data", "cache", "folds"} <= set(cfg)


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
