"""What a tuning was made from, so that it is never applied to something else.

``oof_tune.py`` records in ``postprocess.yaml`` (key ``source``) what its OOF maps came from: the
blend (experiments and weights), the folds and a digest of the folds file, a digest of every
fold's ``model.pt`` (the model that predicted that fold's maps), and the settings the maps were
made at (``cache.size``, ``oof.size``, ``oof.hflip``) plus the ``predict.tta`` it was tuned for.
Before predicting, :func:`check_source` compares that record with the config and the model files
about to be used, and refuses (:class:`~pneumoseg.errors.StaleTuningError`) with every
difference and the command that re-tunes: retrained models, another blend, other weights, another
folds file, another cache size... each silently shifts the best threshold.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pneumoseg.errors import StaleTuningError

log = logging.getLogger(__name__)

RETUNE = (
    "re-tune with the config (and overrides) you predict with: python src/oof_tune.py "
    "--config <config> --force"
)


# Digests this process has computed, by what os.stat says of the file. A Predictor checks every
# model.pt and .onnx it loads (1.1 GB for five 512-px ResNet34 folds, ~1.4 s on the README's CPU),
# and a web app reloading, a notebook making Predictors or the torch fallback after a stale export
# check the same files again. A file written since has another size, mtime or ctime (ctime cannot
# be set back, so a copy with a forged mtime is seen too) or inode, and is hashed again. As git
# does with its index, a digest is only remembered for a file whose times are older than
# _SETTLED_NS when its hash ends: the kernel's clock ticks in milliseconds, so a file rewritten in
# place with the same size within one tick of the last write would otherwise keep its stat.
_DIGESTS: dict[tuple, str] = {}
_SETTLED_NS = 2_000_000_000


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (enough to tell two trainings apart)."""
    before = os.stat(path)
    key = (os.path.realpath(path), before.st_dev, before.st_ino, before.st_size,
           before.st_mtime_ns, before.st_ctime_ns)  # fmt: skip
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()[:16]
    after = os.stat(path)
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > _SETTLED_NS
    if settled and (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[2:]:
        _DIGESTS[key] = digest
    return digest


def model_key(model_path: str | Path) -> str:
    """``<exp>/<fold folder>`` of a ``runs/<exp>/<fold>/model.pt``."""
    p = Path(model_path)
    return f"{p.parent.parent.name}/{p.parent.name}"


def tuning_source(cfg: Mapping, members: list[tuple[str, float]], folds: list[int]) -> dict:
    """The record ``oof_tune.py`` writes for tuning ``members`` on ``folds`` with ``cfg``."""
    out_dir = Path(str(cfg["train"]["out_dir"]))
    models = {}
    for exp, _ in members:
        for k in folds:
            path = out_dir / exp / f"fold{k}" / "model.pt"
            if path.is_file():
                models[model_key(path)] = file_digest(path)
    folds_file = Path(str(cfg["folds"]["file"]))
    return {
        "experiments": [[exp, float(w)] for exp, w in members],
        "folds": [int(k) for k in folds],
        "folds_file": file_digest(folds_file) if folds_file.is_file() else None,
        "models": models,
        **_settings(cfg),
    }


def _settings(cfg: Mapping) -> dict:
    return {
        "cache_size": int(cfg["cache"]["size"]),
        "oof_size": int(cfg["oof"]["size"]),
        "oof_hflip": bool(cfg["oof"]["hflip"]),
        "predict_tta": [str(v) for v in (cfg["predict"]["tta"] or [])],
    }


def differences(source: Mapping, cfg: Mapping, members: list[tuple[str, float]],
                model_paths: Iterable[Path], digests: Mapping[str, str] | None = None) -> list[str]:  # fmt: skip
    """What differs between a tuning's ``source`` and the config + model files about to use it."""
    diffs = []
    tuned = [(str(e), float(w)) for e, w in source.get("experiments") or []]
    now = [(str(e), float(w)) for e, w in members]
    if tuned != now:
        diffs.append(f"the blend: tuned for {_blend(tuned)}, predicting {_blend(now)}")
    for key, value in _settings(cfg).items():
        if key in source and source[key] != value:
            diffs.append(f"{key}: tuned at {source[key]!r}, now {value!r}")
    folds_file = Path(str(cfg["folds"]["file"]))
    if (source.get("folds_file") and folds_file.is_file()
            and file_digest(folds_file) != source["folds_file"]):  # fmt: skip
        diffs.append(f"the folds file {folds_file} changed since the tuning")
    recorded: Mapping[str, Any] = source.get("models") or {}
    for path in model_paths:
        key = model_key(path)
        if key in recorded and file_digest(path) != recorded[key]:
            diffs.append(f"{path} was retrained (or replaced) after the tuning")
    for key, digest in (digests or {}).items():
        if key in recorded and digest != recorded[key]:
            diffs.append(f"the export of {key} was made from another model.pt than the tuning "
                         "used (retrained after the tuning)")  # fmt: skip
    return diffs


def _blend(members: list[tuple[str, float]]) -> str:
    return " + ".join(f"{e} × {w:g}" for e, w in members) or "nothing"


def check_source(params: Mapping, path: Path, cfg: Mapping, members: list[tuple[str, float]],
                 model_paths: Iterable[Path], digests: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """Refuse to apply the tuning ``params`` (read from ``path``) to other models or settings.
    ``digests``: ``{"<exp>/<fold>": digest}`` of models known by digest only (an export records
    the digest of the ``model.pt`` it was made from)."""
    source = params.get("source")
    if not isinstance(source, Mapping):
        log.warning(
            "%s records no source (tuned by an older version): cannot check that it was tuned "
            "for these models and settings; %s", path, RETUNE,
        )  # fmt: skip
        return
    diffs = differences(source, cfg, members, model_paths, digests)
    if diffs:
        raise StaleTuningError(
            f"{path} was tuned for other models or settings, so its thresholds would be applied "
            f"to something else:\n  - " + "\n  - ".join(diffs) + f"\nTo use these: {RETUNE}"
        )
