"""Inference: the fold ensemble × batched test-time augmentation, and resizing back to original size.

* :func:`load_models` finds ``<train.out_dir>/<exp>/fold*/model.pt`` (and ``full/model.pt``) for
  every experiment of ``predict.experiments`` and builds each model from the config stored in its
  own checkpoint, so models of different architectures, encoders and ``in_channels`` blend.
  An experiment's weight is shared equally by its folds.
* :func:`predict_probs` takes a batch of uint8 images at ``cache.size`` and returns the weighted
  mean over models × TTA views of the sigmoid probabilities (and of the aux head's image-level
  probability, over the models that have one). Each model normalises the batch for its own
  ``in_channels``; every view of the batch goes through the model in one forward pass.
* :func:`resize_to_original` resizes the probabilities back to each image's original size
  (bilinear), on the device.

TTA views (``predict.tta``): ``hflip``, ``vflip`` and scale factors (``0.875``); the views are the
product {identity, hflip, vflip, hflip+vflip} × {1, scales}. A scaled view is the image resized by
the factor (bilinear, antialiased when shrinking), padded (edge-replicated) to a multiple of 32 and
at least the input size, predicted, cropped and resized back. Views that share a padded size share
one forward pass: with scales ≤ 1 that is every view.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.config import blend_members
from pneumoseg.data.dataset import normalize  # the training normalisation, applied on the device
from pneumoseg.errors import MissingFileError, ModelFileError
from pneumoseg.inference.runtime import CPU_FORWARD, view_plan
from pneumoseg.inference.runtime import flips as tta_flips
from pneumoseg.models.families import family_for
from pneumoseg.models.registry import build_model
from pneumoseg.schema import parse_tta
from pneumoseg.training.engine import autocast, load_torch, load_weights

log = logging.getLogger(__name__)

_FOLD_RE = re.compile(r"^fold(\d+)$")


class Member(NamedTuple):
    """One model of the ensemble: the module (eval mode), its weight, its ``model`` config."""

    model: nn.Module
    weight: float
    cfg: dict
    path: Path | None = None  # the model.pt it was loaded from


def _fold_dirs(exp_dir: Path, folds, n_folds: int) -> list[Path]:
    """Run folders whose ``model.pt`` to ensemble.

    ``folds`` None: every fold ``0..n_folds-1`` must be trained (an ensemble silently missing a
    fold scores worse than the CV says), plus ``full`` when it exists. Else exactly the listed
    folds (ints; -1 or ``"full"`` = the all-data run).
    """
    if folds is None:
        missing = [k for k in range(n_folds) if not (exp_dir / f"fold{k}" / "model.pt").is_file()]
        if missing:
            raise MissingFileError(
                f"{exp_dir}: no model.pt for fold(s) {missing} of folds.n_folds={n_folds}; "
                f"{_describe(exp_dir)}. Train them (src/train.py --fold k), or name the folds to "
                f"use with predict.folds=[...]"
            )
        dirs = [exp_dir / f"fold{k}" for k in range(n_folds)]
        if (exp_dir / "full" / "model.pt").is_file():
            dirs.append(exp_dir / "full")
        return dirs
    if isinstance(folds, (int, str)):
        folds = [folds]
    dirs = []
    for f in folds:
        name = "full" if str(f) in ("-1", "full") else f"fold{int(f)}"
        d = exp_dir / name
        if not (d / "model.pt").is_file():
            raise MissingFileError(
                f"predict.folds asks for {name} but {d / 'model.pt'} does not exist; "
                f"{_describe(exp_dir)}"
            )
        dirs.append(d)
    return dirs


def _describe(exp_dir: Path) -> str:
    """What a run folder holds, for error messages."""
    root = exp_dir.parent
    if not exp_dir.is_dir():
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        return f"{exp_dir} does not exist (experiments under {root}: {', '.join(names) or 'none'})"
    parts = []
    for d in sorted(p for p in exp_dir.iterdir() if p.is_dir()):
        if (d / "model.pt").is_file():
            parts.append(f"{d.name} (model.pt)")
        elif (d / "last.pt").is_file():
            parts.append(f"{d.name} (last.pt only: training unfinished)")
        else:
            parts.append(f"{d.name} (no weights)")
    return f"{exp_dir} holds: {', '.join(parts) or 'nothing'}"


# Model keys that say how the weights were obtained, not what network they belong to.
_NOT_ARCH = ("encoder_weights", "encoder_weights_path")


def load_member(
    path: str | Path,
    weight: float = 1.0,
    device="cpu",
    channels_last: bool = True,
    exp: str | None = None,
) -> Member:
    """Build the model a ``model.pt`` describes (its own ``config["model"]``) and load its weights
    (in eval mode; ``channels_last`` memory format, faster on CPU and on GPU tensor cores).
    ``exp``: the experiment whose folder it lies in; a file of another experiment, or of another
    model than its run folder's ``config.yaml`` describes, is refused by name."""
    ckpt = load_torch(path, what="model file")
    if (
        not isinstance(ckpt, Mapping)
        or "state_dict" not in ckpt
        or not isinstance(ckpt.get("config"), Mapping)
        or not isinstance(ckpt["config"].get("model"), Mapping)
    ):
        raise ModelFileError(
            f"model file {path} is not a pneumoseg model.pt (needs 'state_dict' and 'config', "
            "as src/train.py writes them)"
        )
    check_belongs(Path(path), ckpt["config"], exp)
    mcfg = dict(ckpt["config"]["model"])
    cache_cfg = ckpt["config"].get("cache")
    if isinstance(cache_cfg, Mapping) and cache_cfg.get("size"):
        mcfg["input_size"] = int(cache_cfg["size"])  # what the model saw in training
    mcfg["encoder_weights"] = None  # the checkpoint holds every weight: nothing to download
    mcfg["encoder_weights_path"] = None
    try:
        model = build_model(mcfg)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"model file {path}: its config describes no model this "
                             f"version can build ({e})") from None  # fmt: skip
    load_weights(model, ckpt["state_dict"], path, "model file")
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return Member(model, float(weight), mcfg, Path(path))


def arch_of(model_cfg: Mapping[str, Any]) -> dict:
    """The keys of a ``model`` section that define the network (not how it was initialised)."""
    return {k: v for k, v in model_cfg.items() if k not in _NOT_ARCH}


def check_belongs(path: Path, ckpt_cfg: Mapping[str, Any], exp: str | None) -> None:
    """A model file copied in from another experiment or architecture is named, not loaded: its
    stored config must give the folder's experiment, and the model its run's config.yaml
    describes (when the folder has one; inference-only copies often hold just model.pt)."""
    saved_exp = ckpt_cfg.get("exp")
    if exp is not None and saved_exp is not None and str(saved_exp) != exp:
        raise ModelFileError(
            f"model file {path} was trained as experiment {saved_exp!r} (its stored config), not "
            f"{exp!r}: a model of another experiment is in this folder. Put back {exp!r}'s own "
            "model (or retrain that fold); if you renamed the experiment folder, rename it back"
        )
    run_cfg = path.parent / "config.yaml"
    if not run_cfg.is_file():
        return
    import yaml

    try:
        run = yaml.safe_load(run_cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # the run's log copy is unreadable: the weights' own config still decides
    run_model = run.get("model") if isinstance(run, Mapping) else None
    if isinstance(run_model, Mapping) and arch_of(run_model) != arch_of(ckpt_cfg["model"]):
        diff = sorted(k for k in set(arch_of(run_model)) | set(arch_of(ckpt_cfg["model"]))
                      if run_model.get(k) != ckpt_cfg["model"].get(k))  # fmt: skip
        k = diff[0]
        raise ModelFileError(
            f"model file {path} is another model than its run folder's {run_cfg.name} describes "
            f"(model.{k}: {ckpt_cfg['model'].get(k)!r} in the file, {run_model.get(k)!r} in the "
            f"run; {len(diff)} key(s) differ): it was copied in from another run. Put back this "
            "run's own model.pt, or retrain the fold"
        )


def load_models(cfg: Mapping[str, Any], device="cpu", channels_last: bool = True) -> list[Member]:
    """Every model of ``predict.experiments`` × ``predict.folds``, built from its checkpoint.

    An experiment's weight is divided equally among its folds, so that a blend ``[[a, 0.6],
    [b, 0.4]]`` weighs the experiments 60/40 whatever their number of folds.
    """
    out_dir = Path(str(cfg["train"]["out_dir"]))
    folds = cfg["predict"].get("folds")
    members: list[Member] = []
    for exp, weight in blend_members(cfg):
        exp_dir = out_dir / exp
        dirs = _fold_dirs(exp_dir, folds, int(cfg["folds"]["n_folds"]))
        for d in dirs:
            m = load_member(d / "model.pt", weight / len(dirs), device, channels_last, exp)
            log.info(
                "model %s: %s/%s, in_channels=%s, aux_head=%s, weight %.3f",
                d / "model.pt",
                m.cfg.get("arch"),
                m.cfg.get("encoder"),
                m.cfg.get("in_channels", 3),
                bool(m.cfg.get("aux_head")),
                m.weight,
            )
            members.append(m)
    return members


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@torch.inference_mode()
def predict_probs(
    members: Sequence[Member] | Sequence[tuple],
    images,
    tta=("hflip",),
    device=None,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    max_forward: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted mean of sigmoid probabilities over ``members`` × TTA views.

    ``images``: uint8 (N, H, W) numpy array or tensor (H, W = the models' input size, usually
    ``cache.size``). Returns ``(probs (N, H, W) float32, cls (N,) float32 or None)`` on ``device``;
    ``cls`` is the weighted mean of the aux heads' probabilities over the models that have one.
    ``channels_last``: feed the models NHWC tensors (pair with models converted by
    :func:`load_member`). ``max_forward``: most images per forward pass; None = all views of the
    batch at once on GPUs, :data:`CPU_FORWARD` on CPUs (where big batches fall out of the caches
    and run slower per image: see ``benchmarks/bench_predict.py``).
    """
    if not members:
        raise ValueError("predict_probs: no models")
    if device is None:
        device = next(members[0][0].parameters()).device
    device = torch.device(device)
    x8 = _image_batch(images, device)
    n, h, w = x8.shape
    hflip, vflip, scales = parse_tta(tta)
    flips = tta_flips(hflip, vflip)
    plan = view_plan((h, w), scales)
    n_views = len(flips) * (1 + len(scales))
    if max_forward is None:
        max_forward = CPU_FORWARD if device.type == "cpu" else 0
    chunk = int(max_forward) if max_forward and max_forward > 0 else 0

    total = torch.zeros((n, 1, h, w), dtype=torch.float32, device=device)
    cls_total = torch.zeros((n, 1), dtype=torch.float32, device=device)
    weight_sum = cls_weight = 0.0
    normalized: dict[int, torch.Tensor] = {}
    for member in members:
        _model, weight = member[0], float(member[1])
        in_ch = int(member[2].get("in_channels", 3))
        if in_ch not in normalized:
            normalized[in_ch] = normalize(x8, in_ch)
        x = normalized[in_ch]
        acc = torch.zeros_like(total)
        cls_acc = None
        for canvas, views in plan.items():  # the views of one padded size: one batch
            inp = _canvas_batch(x, canvas, views, flips, channels_last)
            probs, cls = _forward(member, inp, chunk, device, dtype)
            _add_unviewed(acc, probs, views, flips, n, (h, w))
            if cls is not None:
                c = cls.float().view(-1, n, 1).sum(0)
                cls_acc = c if cls_acc is None else cls_acc + c
        total += acc * (weight / n_views)
        weight_sum += weight
        if cls_acc is not None:
            cls_total += cls_acc * (weight / n_views)
            cls_weight += weight
    probs = (total / weight_sum).squeeze(1).clamp_(0, 1)
    cls_p = (cls_total / cls_weight).squeeze(1) if cls_weight > 0 else None
    return probs, cls_p


def _image_batch(images, device: torch.device) -> torch.Tensor:
    """``images`` (uint8 (N, H, W) or one (H, W), numpy or tensor) as an (N, H, W) tensor on
    ``device``."""
    x8 = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x8.ndim == 2:
        x8 = x8[None]
    if x8.ndim != 3:
        raise ValueError(f"images must be (N, H, W) uint8, got shape {tuple(x8.shape)}")
    return x8.to(device, non_blocking=True)


def _canvas_batch(
    x: torch.Tensor,
    canvas: tuple[int, int],
    views: list,
    flips: list[tuple[int, ...]],
    channels_last: bool,
) -> torch.Tensor:
    """The views that share ``canvas`` as one batch: per scale, the scaled images padded
    (edge-replicated) to the canvas, then each flip of them; N images per view, views in order."""
    batch = []
    for _scale, sz in views:
        xs = _resize(x, sz)
        pad = (0, canvas[1] - sz[1], 0, canvas[0] - sz[0])
        if any(pad):
            xs = F.pad(xs, pad, mode="replicate")
        batch.extend(xs.flip(d) if d else xs for d in flips)
    inp = torch.cat(batch)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    return inp


def _add_unviewed(
    acc: torch.Tensor,
    probs: torch.Tensor,
    views: list,
    flips: list[tuple[int, ...]],
    n: int,
    size: tuple[int, int],
) -> None:
    """Add to ``acc`` (in place) each view's probabilities of a :func:`_canvas_batch` batch,
    flipped back, cropped to its scaled size and resized to ``size``."""
    k = 0
    for _scale, sz in views:
        for d in flips:
            p = probs[k * n : (k + 1) * n]
            p = p.flip(d) if d else p
            acc += _resize(p[..., : sz[0], : sz[1]], size)
            k += 1


def _forward(member, inp: torch.Tensor, chunk: int, device, dtype):
    """(probabilities (N, 1, H, W), image probabilities (N, 1) or None) of one member, through
    its family, in pieces of at most ``chunk`` images (0 = one piece)."""
    family = family_for(member[2])
    pieces = [inp] if not chunk or inp.shape[0] <= chunk else inp.split(chunk)
    outs = []
    for piece in pieces:
        with autocast(device, dtype):
            out = family.predict(member[0], piece)
        outs.append((out.probs.float(), None if out.cls is None else out.cls.float()))
    if len(outs) == 1:
        return outs[0]
    probs = torch.cat([o[0] for o in outs])
    cls = None if outs[0][1] is None else torch.cat([o[1] for o in outs])
    return probs, cls


def resize_to_original(probs: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """(N, S, S) probabilities -> a float32 (h, w) numpy array per image (bilinear), resized on
    the tensor's device, images of the same size together."""
    if len(sizes) != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} probability maps but {len(sizes)} sizes")
    out: list[np.ndarray | None] = [None] * len(sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault((int(s[0]), int(s[1])), []).append(i)
    for size, idx in groups.items():
        p = probs[idx].unsqueeze(1)
        if tuple(p.shape[-2:]) != size:
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        arr = p.squeeze(1).clamp_(0, 1).float().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = arr[j]
    return out  # type: ignore[return-value]
