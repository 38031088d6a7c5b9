"""Training machinery: devices, AMP, optimisers, schedulers, one epoch of training, evaluation,
checkpoints (top-k, ``last``, averaging, resume) and DDP set-up.

Plain functions in the style of torchvision's ``references/segmentation/train.py``; ``train.py``
strings them together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pneumoseg.errors import ModelFileError, TrainingDivergedError, UnknownNameError
from pneumoseg.evaluation.metrics import GATE_THRESHOLDS, dice_from_areas, gated_dice
from pneumoseg.io import atomic_save
from pneumoseg.models.weights import load_torch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- devices
def get_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; under torchrun each rank takes its LOCAL_RANK GPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA that supports it, else fp16 on CUDA; no autocast on CPU/MPS."""
    if amp == "none" or device.type != "cuda":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if amp in ("fp16", "auto"):
        return torch.float16
    raise ValueError(f"train.amp must be auto, bf16, fp16 or none, got {amp!r}")


def inference_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Autocast dtype for prediction. ``auto``: bf16 on CUDA (fp16 where bf16 is missing) and on
    CPUs with native bf16 (AVX512-BF16/AMX: ~2× faster than fp32, probabilities within ~0.02);
    ``none``: fp32 everywhere."""
    if amp == "none" or device.type == "mps":
        return None
    if device.type == "cpu":
        if amp == "fp16":
            raise ValueError("predict.amp=fp16 needs CUDA; use bf16 or none on a CPU")
        native = (
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        if amp == "bf16" or (amp == "auto" and native):
            return torch.bfloat16
        if amp == "auto":
            return None
    return amp_dtype(device, amp)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - legacy global RNG still used by libraries
    torch.manual_seed(seed)
    if deterministic:
        # Bit-exact reruns on GPU cost speed (no cuDNN autotuning, deterministic kernels).
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),
        # as a tensor: checkpoints are read with weights_only=True, which refuses numpy arrays
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate(_tupleize(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tupleize(x):
    # Checkpoints loaded with weights_only=True turn tuples into lists; RNG setters want tuples.
    if isinstance(x, list):
        return tuple(_tupleize(v) for v in x)
    return x


# ------------------------------------------------------------------------------------- DDP
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's decision (e.g. early stop) for every rank."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ------------------------------------------------------------------------------------- optim
def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    name = cfg["optimizer"].lower()
    opts = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in opts:
        raise UnknownNameError(f"unknown train.optimizer {name!r}; valid: {', '.join(opts)}")
    extra = {"momentum": float(cfg.get("momentum", 0.9))} if name == "sgd" else {}
    return opts[name](model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], **extra)


# Learning-rate shape after warm-up, from 1 at t = 0 to 0 at t = 1 (then scaled to min_lr).
_DECAYS = {
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
    "poly": lambda t: (1 - t) ** 0.9,  # MMSeg's PolyLR, power 0.9
}


def build_scheduler(optimizer, cfg: Mapping, steps_per_epoch: int):
    """``cosine``: linear warm-up then cosine to ``min_lr``, stepped every optimiser step;
    ``poly``: MMSeg's polynomial decay (power 0.9) to ``min_lr``, stepped every optimiser step;
    ``plateau``: ReduceLROnPlateau on validation Dice, stepped every epoch; ``none``."""
    name = cfg["scheduler"]
    if name == "none":
        return None
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg["plateau_factor"], patience=cfg["plateau_patience"]
        )
    if name not in _DECAYS:
        raise UnknownNameError(
            f"unknown train.scheduler {name!r}; valid: cosine, poly, plateau, none"
        )
    decay = _DECAYS[name]
    total = max(1, cfg["epochs"] * steps_per_epoch)
    warmup = int(cfg["warmup_epochs"] * steps_per_epoch)
    floor = cfg["min_lr"] / cfg["lr"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * decay(t)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------- loops
def to_device(batch: Mapping, device: torch.device, channels_last: bool) -> dict:
    """The batch on ``device``: tensors moved, lists of tensors (``instances``) moved item-wise."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            v = [t.to(device, non_blocking=True) for t in v]
        out[k] = v
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _family(family):
    if family is not None:
        return family
    from pneumoseg.models.families import family_for

    return family_for("unet")  # plain logit-map models (the smp family's contract)


def train_one_epoch(
    model,
    loader,
    loss_fn,
    optimizer,
    scheduler,
    scaler,
    device,
    epoch: int,
    cfg: Mapping,
    dtype=None,
    show_progress: bool = True,
    family=None,
) -> dict:
    """One pass over ``loader`` with gradient accumulation and clipping; returns mean losses.
    ``family`` (:mod:`pneumoseg.models.families`) computes the loss from each batch."""
    family = _family(family)
    model.train()
    accum = max(1, int(cfg["accum_steps"]))
    max_steps = int(cfg.get("max_steps_per_epoch") or 0)
    n_batches = len(loader) if not max_steps else min(len(loader), max_steps * accum)
    sums: dict[str, float] = {}
    seen = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(
        loader, total=n_batches, desc=f"train {epoch}", leave=False, disable=not show_progress
    )
    guard = StepGuard(int(cfg.get("max_bad_steps") or 0), epoch, optimizer)
    for i, batch in enumerate(bar):
        if i >= n_batches:
            break
        batch = to_device(batch, device, cfg["channels_last"])
        with autocast(device, dtype):
            loss, parts = family.train_loss(model, batch, loss_fn)
        scaler.scale(loss / accum).backward()
        last_of_group = (i + 1) % accum == 0 or i + 1 == n_batches
        value = float(loss.detach())
        if last_of_group:
            scaler.unscale_(optimizer)  # the true gradient: its norm decides whether to step
            params = [p for p in model.parameters() if p.grad is not None]
            clip = float(cfg["clip_grad"] or 0)
            norm = (nn.utils.clip_grad_norm_(params, clip) if clip
                    else nn.utils.get_total_norm([p.grad for p in params]))  # fmt: skip
            # A non-finite gradient (NaN/inf loss, overflow) would poison the weights: the step is
            # skipped; under DDP the gradients are already all-reduced, so every rank agrees.
            if guard.ok(math.isfinite(float(norm)) and math.isfinite(value), value, i):
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None and not isinstance(
                scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
            ):
                scheduler.step()
        n = batch["image"].shape[0]
        if math.isfinite(value):
            seen += n
            for k, v in {"loss": value, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v * n
        bar.set_postfix(loss=f"{sums.get('loss', math.nan) / max(seen, 1):.4f}")
    guard.finish()
    stats = {k: v / max(seen, 1) for k, v in sums.items()} if seen else {"loss": math.nan}
    stats["bad_steps"] = guard.skipped
    return stats


class StepGuard:
    """Counts optimiser steps with a non-finite loss or gradient: each is skipped (the weights
    stay as they were); more than ``limit`` in a row stop the run with
    :class:`~pneumoseg.errors.TrainingDivergedError`."""

    def __init__(self, limit: int, epoch: int, optimizer):
        self.limit, self.epoch, self.optimizer = limit, epoch, optimizer
        self.in_a_row = self.skipped = self.good = 0
        self.last_loss = math.nan

    def ok(self, finite: bool, loss: float, batch: int) -> bool:
        if finite:
            self.in_a_row = 0
            self.good += 1
            return True
        self.in_a_row += 1
        self.skipped += 1
        self.last_loss = loss
        if self.in_a_row > self.limit:
            self.fail(f"batch {batch}: {self.in_a_row} optimiser step(s) in a row")
        log.warning("epoch %d batch %d: non-finite loss or gradient (loss %g): step skipped "
                    "(%d in a row)", self.epoch, batch, loss, self.in_a_row)  # fmt: skip
        return False

    def finish(self) -> None:
        """End of the epoch: one in which every step was skipped learned nothing, and stops."""
        if self.skipped and not self.good:
            self.fail(f"all {self.skipped} optimiser step(s) of the epoch")

    def fail(self, which: str) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        raise TrainingDivergedError(
            f"training diverged in epoch {self.epoch} ({which} had a non-finite loss or "
            f"gradient; loss {self.last_loss:g}, lr {lr:g}). Nothing of this epoch was saved: the "
            "run folder keeps the last good epoch's checkpoints and last.pt. Lower train.lr, keep "
            "train.clip_grad > 0 or use train.amp=none, then start over with --force; "
            f"train.max_bad_steps (now {self.limit}) is how many such steps are skipped before "
            "stopping"
        )


@torch.no_grad()
def predict_batch(model, x: torch.Tensor, hflip: bool = False, dtype=None, family=None):
    """Probabilities (N, 1, H, W), and image-level probabilities (N, 1) or None, averaged over
    the identity and (optionally) the horizontally flipped view in one forward pass."""
    views = torch.cat([x, x.flip(-1)]) if hflip else x
    with autocast(x.device, dtype):
        out = _family(family).predict(model, views)
    n = x.shape[0]
    probs = merge_hflip(out.probs.float(), n, hflip)
    cls_p = None if out.cls is None else merge_hflip(out.cls.float(), n, hflip, flip=False)
    return probs, cls_p


def merge_hflip(t: torch.Tensor, n: int, hflip: bool, flip: bool = True) -> torch.Tensor:
    """Average the plain half and the flipped-back second half of a (2N, ...) TTA batch."""
    if not hflip:
        return t
    return (t[:n] + (t[n:].flip(-1) if flip else t[n:])) / 2


@torch.no_grad()
def evaluate(
    model,
    loader,
    device,
    threshold: float = 0.5,
    loss_fn=None,
    dtype=None,
    channels_last: bool = False,
    hflip: bool = False,
    show_progress: bool = True,
    family=None,
) -> dict:
    """Competition mean Dice at ``threshold``, positive-only Dice and (optionally) the loss, from
    per-image areas: memory does not grow with the validation set."""
    family = _family(family)
    model.eval()
    inter, pa, ta, losses = [], [], [], []
    g_inter, g_pa = [], []  # (N, T) areas at the gated-Dice thresholds
    gate_t = torch.tensor(GATE_THRESHOLDS, device=device)
    n_pixels = 0
    for batch in tqdm(loader, desc="valid", leave=False, disable=not show_progress):
        batch = to_device(batch, device, channels_last)
        x, y = batch["image"], batch["mask"]
        views = torch.cat([x, x.flip(-1)]) if hflip else x
        with autocast(device, dtype):
            out = family.predict(model, views)
        n = x.shape[0]
        if loss_fn is not None:  # the loss of the plain view, from the same forward pass
            loss = family.eval_loss(out, batch, loss_fn, n)
            if loss is not None:
                losses.append(float(loss) * n)
        probs = merge_hflip(out.probs.float(), n, hflip)
        flat = probs.flatten(1)
        pred = flat > threshold
        truth = (y > 0.5).flatten(1)
        inter.append((pred & truth).sum(1).cpu())
        pa.append(pred.sum(1).cpu())
        ta.append(truth.sum(1).cpu())
        for t in gate_t:  # one threshold at a time: no (N, T, H*W) tensor at 1024 px
            p_t = flat > t
            g_inter.append((p_t & truth).sum(1).cpu())
            g_pa.append(p_t.sum(1).cpu())
        n_pixels = flat.shape[1]
    inter_t, pa_t, ta_t = (torch.cat(v).double() for v in (inter, pa, ta))
    dice = dice_from_areas(inter_t, pa_t, ta_t)
    pos = ta_t > 0
    gated, g_thr, g_area = gated_dice(
        *(_by_threshold(v, len(GATE_THRESHOLDS)) for v in (g_inter, g_pa)), ta_t.numpy(), n_pixels
    )
    out = {
        "dice": float(dice.mean()),
        "pos_dice": float(dice[pos].mean()) if pos.any() else float("nan"),
        "empty_acc": float(((pa_t > 0) == pos).double().mean()),
        "dice_gated": gated,
        "gate_threshold": g_thr,
        "gate_area": g_area,
    }
    if losses:
        out["val_loss"] = sum(losses) / len(dice)
    return out


def _by_threshold(chunks: list[torch.Tensor], n_thresholds: int) -> np.ndarray:
    """Per-batch, per-threshold area vectors (batch-major) -> one (N, T) array."""
    batches = [
        torch.stack(chunks[i : i + n_thresholds], 1) for i in range(0, len(chunks), n_thresholds)
    ]
    return torch.cat(batches).double().numpy()


# ------------------------------------------------------------------------------------- checkpoints
def _rank(entry: tuple[float, int, str]) -> tuple[float, int]:
    """Best score first; on a tie the later epoch, which has trained longer (a from-scratch model
    scores the all-empty baseline for several epochs: keep the last of them, not the first)."""
    return -entry[0], -entry[1]


@dataclass
class Checkpoints:
    """Top-k checkpoints by validation Dice plus ``last.pt`` (for ``--resume``), in ``folder``.

    Every file is written to a temp name and renamed; a checkpoint that falls out of the top k is
    deleted only after the new one is safely on disk.
    """

    folder: Path
    k: int = 3
    best: list[tuple[float, int, str]] = field(default_factory=list)  # (score, epoch, file)

    def __post_init__(self):
        self.folder = Path(self.folder)  # made by the first save: a failed start leaves nothing

    def update(self, score: float, epoch: int, state_dict: Mapping, extra: Mapping) -> bool:
        """Save this epoch's weights if they rank in the top k; return True if saved."""
        if self.k <= 0 or not math.isfinite(score):
            return False
        ranked = sorted([*self.best, (score, epoch, "")], key=_rank)
        if (score, epoch, "") not in ranked[: self.k]:
            return False
        name = f"epoch{epoch:03d}.pt"
        require_finite(state_dict, f"epoch {epoch}'s weights")
        save_torch(
            {"state_dict": dict(state_dict), **extra, "epoch": epoch, "score": score},
            self.folder / name,
        )
        self.best = sorted([*self.best, (score, epoch, name)], key=_rank)
        for _, _, old in self.best[self.k :]:
            (self.folder / old).unlink(missing_ok=True)
        self.best = self.best[: self.k]
        return True

    def state_dict(self) -> dict:
        return {"k": self.k, "best": [list(b) for b in self.best]}

    def load_state_dict(self, state: Mapping) -> None:
        self.k = int(state["k"])
        self.best = [(float(s), int(e), str(f)) for s, e, f in state["best"]]

    def paths(self) -> list[Path]:
        return [self.folder / f for _, _, f in self.best]


class _WriteErrors:
    """A file object that remembers the OSError its ``write`` raised: ``torch.save`` wraps it into
    a RuntimeError ("unexpected pos", "file write failed") that no longer says "disk full"."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch(obj, path: Path) -> Path:
    """``torch.save`` to a temp file renamed over ``path``; a disk that fills up (or any other
    write error) is raised as the OSError it is, naming ``path``."""

    def write(fh) -> None:
        rec = _WriteErrors(fh)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is None:
                raise
            e = rec.error
            raise OSError(e.errno, e.strerror, str(path)) from None

    return atomic_save(path, write)


def nonfinite(state: Mapping) -> tuple[int, str | None]:
    """(number of NaN/inf values in the floating-point tensors of ``state``, the first such key)."""
    count, first = 0, None
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                count += bad
                first = first or k
    return count, first


def require_finite(state: Mapping, what: str) -> None:
    """Raise :class:`TrainingDivergedError` if ``state`` (weights being saved or averaged) holds
    a non-finite value: a diverged model is never written."""
    count, key = nonfinite(state)
    if count:
        raise TrainingDivergedError(
            f"training diverged: {what} hold {count:,} non-finite value(s) (e.g. {key}), so they "
            "are not saved. Lower train.lr, keep train.clip_grad > 0 or use train.amp=none, then "
            "start over with --force"
        )


def load_weights(model: nn.Module, state: Mapping, path: str | Path, what: str = "weights") -> None:
    """``model.load_state_dict(state)`` whose mismatch says which file does not fit which model."""
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelFileError(f"{what} {path}: holds no state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state[k].shape)} "
                         f"in the file, {tuple(own[k].shape)} in the model)")  # fmt: skip
        raise ModelFileError(
            f"{what} {path} do not fit this model: {'; '.join(parts)} weights. It was trained "
            "with other model.* settings (arch, encoder, in_channels, decoder_channels, "
            "aux_head): use the same ones, or another file"
        )
    count, key = nonfinite(state)
    if count:
        raise ModelFileError(
            f"{what} {path} hold {count:,} non-finite weight(s) (NaN/inf, e.g. {key}): the run "
            "that wrote them diverged. Retrain it (e.g. with a lower train.lr), or use another file"
        )
    model.load_state_dict(state)


def average_state_dicts(paths: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the checkpoints' weights (integer buffers such as BatchNorm's
    ``num_batches_tracked`` are taken from the first)."""
    paths = list(paths)
    if not paths:
        raise ValueError("no checkpoints to average")
    avg: dict[str, torch.Tensor] = {}
    for i, p in enumerate(paths):
        state = load_torch(p)["state_dict"]
        for k, v in state.items():
            if i == 0:
                avg[k] = v.clone().double() if v.is_floating_point() else v.clone()
            elif v.is_floating_point():
                avg[k] += v.double()
    n = len(paths)
    first = load_torch(paths[0])["state_dict"]
    out = {k: (v / n).to(first[k].dtype) if v.is_floating_point() else v for k, v in avg.items()}
    require_finite(out, f"the mean of {', '.join(p.name for p in map(Path, paths))}")
    return out
