"""Configuration: one YAML of defaults, experiment files that state differences, CLI overrides.

* ``configs/base.yaml`` holds every key with its default: the one place to read what exists.
* An experiment file (``configs/demo.yaml``) is merged on top. It may only name keys that exist in
  the base, with values of the same type (an int is accepted where a float is expected). A key
  whose default is ``null`` has its type declared in :data:`NULL_DEFAULT_TYPES`; ``null`` itself
  is accepted only where it means "off / the built-in default": by those keys and by
  :data:`NULLABLE`. Unknown keys are errors that list the valid ones, because a typo silently
  ignored is a wasted GPU-day.
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

from pneumoseg.defaults import BASE_CONFIG, CONFIG_DIR, NULLABLE, base_defaults
from pneumoseg.defaults import read_yaml as _read_yaml
from pneumoseg.errors import ConfigError
from pneumoseg.io import atomic_write

__all__ = [
    "BASE_CONFIG",
    "CONFIG_DIR",
    "NULLABLE",
    "ConfigError",
    "base_defaults",
    "dump_config",
    "load_config",
    "log_config",
    "save_config",
]

log = logging.getLogger(__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_fold(v: Any) -> bool:  # a fold number, or "full" (predict.folds); the range is schema's
    return _is_int(v) or isinstance(v, str)


def _is_folds(v: Any) -> bool:
    return _is_fold(v) or (isinstance(v, list) and all(map(_is_fold, v)))


# (name shown in errors, test) of the value types a null-default key may declare.
_TYPES: dict[str, tuple[str, Any]] = {
    "bool": ("bool", lambda v: isinstance(v, bool)),
    "int": ("int", _is_int),
    "str": ("str", lambda v: isinstance(v, str)),
    "mapping": ("a mapping", lambda v: isinstance(v, Mapping)),
    "int list": ("a list of ints", lambda v: isinstance(v, list) and all(map(_is_int, v))),
    "folds": ("a fold number or a list of them", _is_folds),
}

# The type of every key whose default in base.yaml is null (null stays valid there: it means off
# or the built-in default). A test checks that every null default of base.yaml is listed.
NULL_DEFAULT_TYPES: dict[str, str] = {
    "data.test_rle_csv": "str",
    "data.patient_map": "str",
    "folds.import_from": "str",
    "model.encoder_weights_path": "str",
    "model.decoder_channels": "int list",
    "model.depth": "int",
    "model.width": "int",
    "model.trainable_layers": "int",
    "model.freeze_bn": "bool",
    "model.detections_per_img": "int",
    "model.fpn_channels": "int",
    "model.roi_samples": "int",
    "model.rpn_proposals": "int",
    "augment_neg": "mapping",
    "train.stop_after_epoch": "int",
    "train.init_from": "str",
    "tune.folds": "folds",
    "tune.options": "mapping",
    "predict.folds": "folds",
    "predict.threads": "int",
    "serve.concurrency": "int",
    "serve.queue": "int",
}


def _type_error(dotted: str, default: Any, value: Any) -> str | None:
    """Why ``value`` cannot replace ``default`` at key ``dotted`` (None: it can)."""
    if value is None:
        if default is None or dotted in NULLABLE:
            return None
        return f"must be {type(default).__name__} (default {default!r}), not null"
    got = f"got {type(value).__name__} {value!r}"
    if default is None:
        declared = NULL_DEFAULT_TYPES.get(dotted)
        if declared is None:
            return None  # a base file other than the project's: any type
        name, ok = _TYPES[declared]
        return None if ok(value) else f"must be {name} or null, {got}"
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float) and isinstance(value, int):
        ok = True
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    return None if ok else f"must be {type(default).__name__} (default {default!r}), {got}"


def _merge(base: dict, update: Mapping, where: str, source: str, defaults: Mapping) -> None:
    """Merge ``update`` into ``base`` (the config so far); types come from ``defaults`` (the base
    file as read): a key whose default is null stays nullable after an experiment sets it."""
    for key, value in update.items():
        dotted = f"{where}{key}"
        if key not in base:
            valid = ", ".join(sorted(map(str, base)))
            raise ConfigError(f"{source}: unknown key '{dotted}'. Valid keys here: {valid}")
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: '{dotted}' is a section; expected a mapping, got {value!r}"
                )
            _merge(base[key], value, f"{dotted}.", source, default)
            continue
        problem = _type_error(dotted, default, value)
        if problem:
            raise ConfigError(f"{source}: '{dotted}' {problem}")
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
    defaults = copy.deepcopy(cfg)
    if path is not None:
        path = Path(path)
        exp = _read_yaml(path)
        _merge(cfg, exp, "", str(path), defaults)
        if "exp" in cfg and "exp" not in exp:
            cfg["exp"] = path.stem  # runs/<exp>/ defaults to the experiment file's name
    _merge(cfg, parse_overrides(overrides), "", "command line", defaults)
    if validate if validate is not None else base is None:
        from pneumoseg.schema import validate_config

        validate_config(cfg)
    return cfg


ENSEMBLE_FILE = "ensemble.yaml"  # written by select_ensemble.py in runs/<exp>/


def ensemble_path(cfg: Mapping) -> Path:
    """``<train.out_dir>/<exp>/ensemble.yaml``: the blend ``select_ensemble.py`` chose."""
    return Path(str(cfg["train"]["out_dir"])) / str(cfg["exp"]) / ENSEMBLE_FILE


def blend_members(cfg: Mapping) -> list[tuple[str, float]]:
    """The experiments a prediction or tuning of ``cfg`` blends, ``[(exp, weight), ...]``:
    ``predict.experiments`` when given; else the blend in ``runs/<exp>/ensemble.yaml`` when
    ``select_ensemble.py`` wrote one; else ``[(exp, 1.0)]``. One rule for every stage, so that
    a tuning, a prediction and the web app of one config always mean the same models."""
    from pneumoseg.schema import experiment_list

    path = ensemble_path(cfg)
    if cfg["predict"].get("experiments") or not path.is_file():
        return experiment_list(cfg)
    data = _read_yaml(path)
    members = data.get("members") if isinstance(data, Mapping) else None
    redo = "run select_ensemble.py again with --force (or set predict.experiments)"
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{path} lists no members: {redo}")
    try:
        chosen = experiment_list({"exp": cfg["exp"], "predict": {"experiments": members}})
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: damaged member list ({e}); {redo}") from None
    log.debug("blend of %s from %s: %s", cfg["exp"], path, chosen)
    return chosen


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
