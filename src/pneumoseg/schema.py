"""The value rules of the config, checked when it loads: before any script writes anything.

``config.py`` already rejects unknown keys and wrong types; this module checks what the types
cannot say: registry names (each error lists the valid ones), ranges, devices that exist. Every
problem is collected, so one run shows them all. Paths that a *step* needs (the folds file, the
cache, ``init_from``) are checked by that step before it starts, because an earlier step makes them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pneumoseg.errors import ConfigError

# Registries whose names are plain strings here so that checking a config imports no torch.
SAMPLERS = ("positive_share", "weighted", "random")
OPTIMIZERS = ("adam", "adamw", "sgd")
SELECT_METRICS = ("dice", "dice_gated", "val_loss")
SCHEDULERS = ("cosine", "poly", "plateau", "none")
AMP_MODES = ("auto", "bf16", "fp16", "none")
LAYOUTS = ("siim", "png")
RLE_FORMATS = ("relative", "absolute")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")  # predict.backend
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # predict.precision
INT8_RUNTIMES = ("onnxruntime", "openvino")  # export.int8
MAX_THREADS = 1024
# Size bounds (pixels, images), checked at load so that a typo fails in a second, not after a fold
# of training when the allocation fails (oof.size=100000 asked for 480 GB). Each leaves every
# recipe in configs/ valid with room to spare.
MAX_SIDE = 2048  # cache.size, oof.size: twice SIIM's 1024² originals
MAX_ORIGINAL = 8192  # data.original_size: larger than any digital radiograph
MAX_BATCH = 1024  # train.batch_size, train.val_batch_size, predict.batch_size
MAX_FOLDS = 20
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_EXP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Raise one :class:`ConfigError` listing every invalid value of a resolved config."""
    problems = list(_problems(cfg))
    if problems:
        head = "invalid config" if len(problems) == 1 else f"{len(problems)} invalid config values"
        raise ConfigError(f"{head}:\n  - " + "\n  - ".join(problems))


def _problems(cfg: Mapping[str, Any]) -> Iterator[str]:
    if not _EXP_RE.match(str(cfg["exp"])):
        yield f"exp: {cfg['exp']!r} must be a plain folder name (letters, digits, . _ + -)"
    for section, check in _SECTIONS.items():
        yield from check(cfg[section], cfg)


# --------------------------------------------------------------------------------------------------
# small rule helpers: each yields a message naming the dotted key, or nothing
# --------------------------------------------------------------------------------------------------
def _choice(key: str, value: Any, valid: tuple[str, ...] | list[str]) -> Iterator[str]:
    if value not in valid:
        yield f"{key}: unknown value {value!r}; valid: {', '.join(valid)}"


def _num(key: str, value: Any, lo=None, hi=None, lo_open=False, hi_open=False) -> Iterator[str]:
    """``lo <= value <= hi`` (open ends with ``*_open``); NaN/inf are always invalid."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        yield f"{key}: must be a finite number, got {value!r}"
        return
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        if hi is None:
            rng = f"must be {'>' if lo_open else '>='} {lo}"
        else:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            rng = f"must be in {left}{lo}, {hi}{right}"
        yield f"{key}: {value!r} {rng}"


def _nums(key: str, values: Any, **rng) -> Iterator[str]:
    if not isinstance(values, (list, tuple)):
        yield f"{key}: must be a list of numbers, got {values!r}"
        return
    for i, v in enumerate(values):
        yield from _num(f"{key}[{i}]", v, **rng)


def _text(key: str, value: Any) -> Iterator[str]:
    if not isinstance(value, str) or not value.strip():
        yield f"{key}: must be a non-empty string, got {value!r}"


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------
def _data(d: Mapping, cfg: Mapping) -> Iterator[str]:
    yield from _choice("data.layout", d["layout"], LAYOUTS)
    yield from _choice("data.rle_format", d["rle_format"], RLE_FORMATS)
    yield from _text("data.root", d["root"])
    yield from _num("data.original_size", d["original_size"], lo=16, hi=MAX_ORIGINAL)


def _cache(c: Mapping, cfg: Mapping) -> Iterator[str]:
    yield from _text("cache.dir", c["dir"])
    size = c["size"]
    if size < 32 or size % 32 or size > MAX_SIDE:
        yield (f"cache.size: {size} must be a multiple of 32 (the encoders downsample 32×) "
               f"in [32, {MAX_SIDE}]")  # fmt: skip
    if c["n_jobs"] == 0 or c["n_jobs"] < -1:
        yield f"cache.n_jobs: {c['n_jobs']} must be -1 (all cores) or >= 1"


def _folds(f: Mapping, cfg: Mapping) -> Iterator[str]:
    yield from _num("folds.n_folds", f["n_folds"], lo=2, hi=MAX_FOLDS)
    yield from _text("folds.file", f["file"])
    bins = f["area_bins"]
    yield from _nums("folds.area_bins", bins, lo=0)
    if isinstance(bins, list) and (
        len(bins) < 2 or any(b >= a for b, a in itertools.pairwise(bins))
    ):
        yield f"folds.area_bins: {bins} must be >= 2 strictly increasing edges"


def _model(m: Mapping, cfg: Mapping) -> Iterator[str]:
    import importlib.util

    # The families are torch modules. A serving install has no torch and builds no model from
    # this section (it runs exports, whose manifests describe their models): nothing to check.
    if importlib.util.find_spec("torch") is not None:
        from pneumoseg.models.families import archs, family_for

        yield from _choice("model.arch", m["arch"], archs())
        if m["arch"] in archs():
            yield from family_for(m).check({**m, "input_size": cfg["cache"]["size"]})
            yield from family_for(m).foreign(m)
    if m["in_channels"] not in (1, 3):
        yield f"model.in_channels: must be 1 (grey) or 3 (grey replicated), got {m['in_channels']}"
    dec = m["decoder_channels"]
    if dec is not None and (
        not isinstance(dec, list)
        or len(dec) != 5
        or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in dec)
    ):
        yield f"model.decoder_channels: must be null or 5 positive integers, got {dec!r}"
    yield from _num("model.aux_dropout", m["aux_dropout"], lo=0, hi=1, hi_open=True)


def _loss(lw: Mapping, cfg: Mapping) -> Iterator[str]:
    for k, v in lw.items():
        yield from _num(f"loss.{k}", v, lo=0)
    if not any(lw[k] > 0 for k in ("bce", "dice", "focal", "lovasz") if isinstance(lw[k], float)):
        yield "loss: at least one of bce, dice, focal, lovasz must be > 0"
    if lw["aux"] > 0 and not cfg["model"]["aux_head"]:
        yield "loss.aux: > 0 needs model.aux_head=true (there is no image-level head to train)"


def _sampler(s: Mapping, cfg: Mapping) -> Iterator[str]:
    yield from _choice("sampler.kind", s["kind"], SAMPLERS)
    share = s["pos_share"]
    if not isinstance(share, list) or not share:
        yield f"sampler.pos_share: must be a non-empty list of shares in (0, 1], got {share!r}"
    else:
        yield from _nums("sampler.pos_share", share, lo=0, hi=1, lo_open=True)
    yield from _num("sampler.pos_weight", s["pos_weight"], lo=0, lo_open=True)


def _augment(a: Mapping, cfg: Mapping) -> Iterator[str]:
    from pneumoseg.defaults import AUGMENT_LIMITS as LIMITS

    for section in ("augment", "augment_neg"):
        values = cfg[section]
        if values is None:
            continue
        if not isinstance(values, Mapping):
            yield f"{section}: must be a mapping of the augment keys, got {values!r}"
            continue
        for k, v in values.items():
            if k not in cfg["augment"]:
                valid = ", ".join(cfg["augment"])
                yield f"{section}.{k}: unknown key; valid: {valid}"
            elif k in LIMITS:
                yield from _num(f"{section}.{k}", v, lo=0, hi=180 if k == "rotate" else 1)
            else:
                yield from _num(f"{section}.{k}", v, lo=0, hi=1)


def _train(t: Mapping, cfg: Mapping) -> Iterator[str]:
    for key in ("epochs", "accum_steps", "top_k"):
        yield from _num(f"train.{key}", t[key], lo=1)
    for key in ("batch_size", "val_batch_size"):
        yield from _num(f"train.{key}", t[key], lo=1, hi=MAX_BATCH)
    for key in (
        "early_stop",
        "num_workers",
        "max_steps_per_epoch",
        "plateau_patience",
        "max_bad_steps",
    ):
        yield from _num(f"train.{key}", t[key], lo=0)
    for key in ("weight_decay", "warmup_epochs", "min_lr", "clip_grad", "momentum"):
        yield from _num(f"train.{key}", t[key], lo=0)
    yield from _num("train.lr", t["lr"], lo=0, lo_open=True)
    yield from _num("train.plateau_factor", t["plateau_factor"], lo=0, hi=1, lo_open=True,
                    hi_open=True)  # fmt: skip
    yield from _num("train.threshold", t["threshold"], lo=0, hi=1, lo_open=True, hi_open=True)
    yield from _choice("train.optimizer", t["optimizer"], OPTIMIZERS)
    yield from _choice("train.scheduler", t["scheduler"], SCHEDULERS)
    yield from _choice("train.select", t["select"], SELECT_METRICS)
    if t["select"] == "val_loss":
        from pneumoseg.models.families import archs, family_for

        arch = cfg["model"]["arch"]
        if arch in archs() and not family_for(arch).has_eval_loss:
            yield f"train.select: {arch} models give no validation loss; use dice or dice_gated"
    yield from _choice("train.amp", t["amp"], AMP_MODES)
    if t["stop_after_epoch"] is not None:
        if not isinstance(t["stop_after_epoch"], int) or isinstance(t["stop_after_epoch"], bool):
            yield f"train.stop_after_epoch: must be null or an epoch number, got {t['stop_after_epoch']!r}"
        else:
            yield from _num("train.stop_after_epoch", t["stop_after_epoch"], lo=0)
    if t["init_from"] is not None:
        yield from _text("train.init_from", t["init_from"])
    yield from _text("train.out_dir", t["out_dir"])
    yield from _device(t["device"])


def _device(name: Any) -> Iterator[str]:
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        yield f"train.device: {name!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps"
        return
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            yield (f"train.device: {name} asked for, but no CUDA GPU is visible to torch "
                   f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                   "use train.device=auto or cpu")  # fmt: skip
        elif ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            yield f"train.device: {name} but only {torch.cuda.device_count()} GPU(s) are visible"
    elif name == "mps":
        import torch

        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            yield "train.device: mps asked for, but this machine has no MPS (Apple GPU) backend"


def _device_kind(name: Any) -> str:
    """cpu, cuda or mps: what ``train.device`` resolves to on this machine."""
    if name != "auto":
        return str(name).split(":")[0]
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _oof(o: Mapping, cfg: Mapping) -> Iterator[str]:
    """An OOF map is the model's cache.size output resized to oof.size and stored as uint8 for
    every validation image: above both cache.size and the originals' size it only interpolates,
    at oof.size² bytes per image."""
    size = o["size"]
    bad = list(_num("oof.size", size, lo=8, hi=MAX_SIDE))
    yield from bad
    original = cfg["data"]["original_size"] or 1024  # null (sizes not checked): SIIM's
    useful = max(cfg["cache"]["size"], original)
    if not bad and size > useful:
        yield (f"oof.size: {size} is above both cache.size ({cfg['cache']['size']}) and the "
               f"originals' side ({original}): a larger map only interpolates, at oof.size² bytes "
               f"per validation image; use <= {useful}")  # fmt: skip


def _tune(t: Mapping, cfg: Mapping) -> Iterator[str]:
    for key in ("thresholds", "top_thresholds", "bottom_thresholds", "cls_thresholds"):
        yield from _nums(f"tune.{key}", t[key], lo=0, hi=1)
    for key in ("min_areas", "top_areas"):
        yield from _nums(f"tune.{key}", t[key], lo=0)
    if not t["thresholds"] and not t["top_thresholds"]:
        yield "tune: thresholds and top_thresholds are both empty: nothing to search"
    if t["cls_thresholds"] and not cfg["model"]["aux_head"]:
        yield "tune.cls_thresholds: needs model.aux_head=true (no image-level probability)"
    yield from _fold_list("tune.folds", t["folds"], cfg)
    yield from _options(t["options"], cfg)


def _options(options: Any, cfg: Mapping) -> Iterator[str]:
    if options is None:
        return
    from pneumoseg.models.families import archs, family_for

    if not isinstance(options, Mapping):
        yield f"tune.options: must be a mapping {{option: [values]}}, got {options!r}"
        return
    arch = cfg["model"]["arch"]
    tunable = family_for(arch).tunable if arch in archs() else ()
    for name, values in options.items():
        if name not in tunable:
            yield (f"tune.options.{name}: model.arch={arch} has no such inference option "
                   f"(tunable: {', '.join(tunable) or 'none'})")  # fmt: skip
        elif not isinstance(values, list) or not values:
            yield f"tune.options.{name}: must be a non-empty list of values, got {values!r}"
        else:
            yield from _nums(f"tune.options.{name}", values, lo=0, hi=1)


def _fold_list(key: str, folds: Any, cfg: Mapping, allow_full: bool = False) -> Iterator[str]:
    if folds is None:
        return
    items = folds if isinstance(folds, list) else [folds]
    n = int(cfg["folds"]["n_folds"])
    if not items:
        yield f"{key}: an empty list selects nothing; use null for every fold"
    for f in items:
        if allow_full and f in ("full", -1):
            continue
        if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < n:
            extra = ", -1 or 'full'" if allow_full else ""
            yield f"{key}: {f!r} is not a fold; valid: 0..{n - 1} (folds.n_folds={n}){extra}"
    if len({str(f) for f in items}) != len(items):
        yield f"{key}: {folds!r} names a fold twice"


def _select(s: Mapping, cfg: Mapping) -> Iterator[str]:
    cands = s["candidates"]
    if not isinstance(cands, list):
        yield f"select.candidates: must be a list of experiment names, got {cands!r}"
        return
    for i, name in enumerate(cands):
        if not isinstance(name, str) or not _EXP_RE.match(name):
            yield f"select.candidates[{i}]: {name!r} is not an experiment name"
    doubles = sorted({c for c in cands if isinstance(c, str) and cands.count(c) > 1})
    if doubles:
        yield (f"select.candidates: {', '.join(doubles)} listed twice (the selection adds a "
               "member again by itself when a larger weight helps)")  # fmt: skip
    if cfg["exp"] in cands:
        yield (f"select.candidates: {cfg['exp']!r} is this config's own exp, where the selection "
               "is written: give the selection config another exp")  # fmt: skip
    yield from _num("select.max_steps", s["max_steps"], lo=1, hi=1000)


def _predict(p: Mapping, cfg: Mapping) -> Iterator[str]:
    yield from _experiments(p["experiments"])
    yield from _fold_list("predict.folds", p["folds"], cfg, allow_full=True)

    try:
        parse_tta(p["tta"])
    except ValueError as e:
        yield str(e)
    yield from _num("predict.batch_size", p["batch_size"], lo=1, hi=MAX_BATCH)
    yield from _choice("predict.amp", p["amp"], AMP_MODES)
    if p["amp"] == "fp16" and _device_kind(cfg["train"]["device"]) == "cpu":
        yield (f"predict.amp: fp16 needs CUDA, and predictions run on the CPU here "
               f"(train.device={cfg['train']['device']}); use bf16 or none")  # fmt: skip
    yield from _choice("predict.rle", p["rle"], RLE_FORMATS)
    yield from _text("predict.out_dir", p["out_dir"])
    yield from _runtime(p)


def _runtime(p: Mapping) -> Iterator[str]:
    """``predict.backend``, ``predict.precision``, ``predict.threads`` and the pairs that cannot
    run anywhere (what this CPU can run is checked when the predictor loads)."""
    yield from _choice("predict.backend", p["backend"], BACKENDS)
    yield from _choice("predict.precision", p["precision"], PRECISIONS)
    threads = p["threads"]
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or not 1 <= threads <= MAX_THREADS):  # fmt: skip
        yield (f"predict.threads: must be a whole number from 1 to {MAX_THREADS} (or null: every "
               f"core), got {threads!r}")  # fmt: skip
    if p["backend"] == "torch" and p["precision"] == "int8":
        yield ("predict.precision: int8 runs on exported models only: set predict.backend to "
               "onnxruntime, openvino or auto (after python src/export.py)")  # fmt: skip
    if p["backend"] == "onnxruntime" and p["precision"] == "bf16":
        yield ("predict.precision: ONNX Runtime has no bf16 kernels for these models on CPUs: "
               "use predict.backend openvino (or torch) for bf16")  # fmt: skip


def _experiments(items: Any) -> Iterator[str]:
    if not isinstance(items, list):
        yield f"predict.experiments: must be a list of [exp, weight], got {items!r}"
        return
    for i, item in enumerate(items):
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, list) and len(item) == 2:
            name, weight = item
        else:
            yield f"predict.experiments[{i}]: must be [exp, weight] or exp, got {item!r}"
            continue
        if not isinstance(name, str) or not _EXP_RE.match(name):
            yield f"predict.experiments[{i}]: {name!r} is not an experiment name"
        yield from _num(f"predict.experiments[{i}] weight", weight, lo=0, lo_open=True)


def _export(e: Mapping, cfg: Mapping) -> Iterator[str]:
    runtimes = e["int8"]
    if not all(isinstance(r, str) for r in runtimes):
        yield (f"export.int8: must be a list of runtime names ({', '.join(INT8_RUNTIMES)}) or [], "
               f"got {runtimes!r}")  # fmt: skip
        return
    for r in runtimes:
        yield from _choice("export.int8", r, INT8_RUNTIMES)
    if len(set(runtimes)) != len(runtimes):
        yield f"export.int8: {runtimes!r} names a runtime twice"


def _serve(s: Mapping, cfg: Mapping) -> Iterator[str]:
    yield from _text("serve.host", s["host"])
    yield from _num("serve.port", s["port"], lo=1, hi=65535)
    yield from _num("serve.max_body_mb", s["max_body_mb"], lo=0, lo_open=True)
    for key in ("max_files", "max_pixels", "max_request_pixels", "max_inflight_pixels"):
        yield from _num(f"serve.{key}", s[key], lo=1)
    if s["max_request_pixels"] < s["max_pixels"]:
        yield (f"serve.max_request_pixels: {s['max_request_pixels']} is below serve.max_pixels "
               f"({s['max_pixels']}): an image the server accepts could never be sent")  # fmt: skip
    if s["max_inflight_pixels"] < s["max_request_pixels"]:
        yield (f"serve.max_inflight_pixels: {s['max_inflight_pixels']} is below "
               f"serve.max_request_pixels ({s['max_request_pixels']}): a request the server "
               "accepts could never run")  # fmt: skip
    yield from _num("serve.body_timeout_s", s["body_timeout_s"], lo=0, lo_open=True)
    if s["concurrency"] is not None:
        yield from _num("serve.concurrency", s["concurrency"], lo=1)
    if s["queue"] is not None:
        yield from _num("serve.queue", s["queue"], lo=0)
    origins = s["cors_origins"]
    if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins):
        yield f"serve.cors_origins: must be a list of origins like 'http://localhost:3000', got {origins!r}"


_SECTIONS: dict[str, Callable[[Any, Mapping], Iterator[str]]] = {
    "data": _data,
    "cache": _cache,
    "folds": _folds,
    "model": _model,
    "loss": _loss,
    "sampler": _sampler,
    "augment": _augment,
    "train": _train,
    "oof": _oof,
    "tune": _tune,
    "select": _select,
    "predict": _predict,
    "export": _export,
    "serve": _serve,
}


# --------------------------------------------------------------------------------------------------
# readings of the config that later stages share (they live here: validation uses them too)
# --------------------------------------------------------------------------------------------------
# ==================================================================================================
# Loading
# ==================================================================================================
def experiment_list(cfg: Mapping[str, Any]) -> list[tuple[str, float]]:
    """``predict.experiments`` as ``[(exp, weight), ...]``; empty -> ``[(cfg.exp, 1.0)]``."""
    raw = cfg["predict"].get("experiments") or []
    out = []
    for item in raw:
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, Sequence) and len(item) == 2:
            name, weight = str(item[0]), float(item[1])
        else:
            raise ConfigError(f"predict.experiments entries must be [exp, weight], got {item!r}")
        if not weight > 0 or not math.isfinite(weight):
            raise ConfigError(f"predict.experiments: weight of {name!r} must be > 0, got {weight}")
        out.append((name, weight))
    return out or [(str(cfg["exp"]), 1.0)]


# ==================================================================================================
# TTA
# ==================================================================================================
def parse_tta(tta) -> tuple[bool, bool, list[float]]:
    """``[hflip, vflip, 0.875, ...]`` -> (hflip, vflip, extra scale factors)."""
    hflip = vflip = False
    scales: list[float] = []
    for t in tta or []:
        if isinstance(t, str) and t.lower() in ("hflip", "vflip"):
            hflip |= t.lower() == "hflip"
            vflip |= t.lower() == "vflip"
            continue
        try:
            s = float(t)
        except (TypeError, ValueError):
            raise ConfigError(
                f"predict.tta: unknown view {t!r}; valid: hflip, vflip, or a scale like 0.875"
            ) from None
        if not 0.25 <= s <= 4:
            raise ConfigError(f"predict.tta: scale {s} out of range [0.25, 4]")
        if s != 1.0 and s not in scales:
            scales.append(s)
    return hflip, vflip, scales
