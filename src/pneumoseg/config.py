"""Configuration: one YAML of defaults, experiment files that state differences, CLI overrides.

* ``configs/base.yaml`` holds every key with its default: the one place to read what exists.
* An experiment file (``configs/demo.yaml``) is merged on top. It may only name keys that exist in
  the base, with values of the same type (an int is accepted where a float is expected; a key
  whose default is ``null`` takes any type). Unknown keys are errors that list the valid ones,
  because a typo silently ignored is a wasted GPU-day.
* Dotted overrides from the command line (``train.lr=1e-4``) follow the same rules; values are
  parsed as YAML (``true``, ``[1, 2]``, ``null`` work).

The resolved config is a plain nested ``dict``: logged once by the entry points, saved next to
every run (``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pneumoseg.errors import ConfigError
from pneumoseg.io import atomic_write

__all__ = ["ConfigError", "dump_config", "load_config", "log_config", "save_config"]

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"


def _read_yaml(path: Path, allow_empty: bool = False) -> dict:
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


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True  # null default = "any type"; null value = "disable / use built-in"
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float) and isinstance(value, int):
        return True
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _merge(base: dict, update: Mapping, where: str, source: str) -> None:
    for key, value in update.items():
        dotted = f"{where}{key}"
        if key not in base:
            valid = ", ".join(sorted(map(str, base)))
            raise ConfigError(f"{source}: unknown key '{dotted}'. Valid keys here: {valid}")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: '{dotted}' is a section; expected a mapping, got {value!r}"
                )
            _merge(default, value, f"{dotted}.", source)
            continue
        if not _type_ok(default, value):
            raise ConfigError(
                f"{source}: '{dotted}' must be {type(default).__name__} "
                f"(default {default!r}), got {type(value).__name__} {value!r}"
            )
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        base[key] = value


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["train.lr=1e-4", "data.size=256"]`` -> nested dict."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        # YAML reads "1e-4" as a string; accept it as the float people mean.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value) if any(c in value for c in ".eE") else value
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: str | Path | None = None,
    validate: bool | None = None,
) -> dict:
    """Base defaults + experiment file ``path`` + dotted ``overrides`` -> resolved nested dict.

    The values are then checked (:func:`pneumoseg.schema.validate_config`: registry names, ranges,
    devices); ``validate`` defaults to on with the project's base file (other bases are tests').
    """
    base_path = Path(base) if base else BASE_CONFIG
    cfg = _read_yaml(base_path)
    if path is not None:
        path = Path(path)
        exp = _read_yaml(path)
        _merge(cfg, exp, "", str(path))
        if "exp" in cfg and "exp" not in exp:
            cfg["exp"] = path.stem  # runs/<exp>/ defaults to the experiment file's name
    _merge(cfg, parse_overrides(overrides), "", "command line")
    if validate if validate is not None else base is None:
        from pneumoseg.schema import validate_config

        validate_config(cfg)
    return cfg


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Mapping, path: str | Path) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(dump_config(cfg))
    return Path(path)


def log_config(cfg: Mapping) -> None:
    log.info("resolved config:\n%s", dump_config(cfg).rstrip())


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return copy.deepcopy(obj)
