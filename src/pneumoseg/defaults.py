"""The defaults: ``configs/base.yaml``, read without validation (the lowest layer may use it).

:mod:`pneumoseg.config` merges experiment files and overrides onto these and validates the result;
modules below the config layer (readers, model families) read their defaults here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pneumoseg.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"


def read_yaml(path: Path, allow_empty: bool = False) -> dict:
    if path.is_dir():
        raise ConfigError(
            f"{path} is a folder; --config takes a YAML file such as configs/demo.yaml"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(
            f"{path} is empty: an experiment file states what differs from configs/base.yaml "
            "(e.g. 'exp: my_run'); run without --config to use the defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


# augment keys that bound the geometric transform instead of being a probability (the schema reads
# them without albumentations, which a serving install does not have)
AUGMENT_LIMITS = ("shift", "scale", "rotate")


# Keys with a non-null default that also take null, and what null means there.
NULLABLE: dict[str, str] = {
    "data.original_size": "image sizes are not checked",
    "data.sample_submission": "one row per test image",
    "model.encoder": "none: the family has its own (doubleunet, unet_classic)",
    "model.encoder_weights": "from scratch",
    "predict.tta": "no test-time augmentation",
}


def base_defaults() -> dict:
    """configs/base.yaml as a dict: every key with its default (a fresh copy on each call)."""
    return read_yaml(BASE_CONFIG)
