"""Training one fold: ``fit(cfg, fold)`` reads top to bottom as plain phase functions.

Outputs go to ``<train.out_dir>/<exp>/fold<k>/`` (``full/`` for fold -1): ``config.yaml``,
``train.log``, ``log.csv``, ``curves.png``, ``checkpoints/epochNNN.pt`` (top-k by validation
Dice), ``last.pt`` (resume point), ``model.pt`` (mean of the top-k weights), ``oof_*``
(out-of-fold probabilities).

Order matters for "nothing good is lost": every check that can fail on the user's input (folds
file, cache, ``init_from``, a changed config on ``--resume``) runs *before* the run folder is
created or touched, so a failed start leaves nothing behind that blocks the next attempt.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumoseg.config import log_config, save_config
from pneumoseg.errors import FoldsError, MissingFileError, OutputExistsError, ResumeError
from pneumoseg.models.families import family_for
from pneumoseg.training import engine

log = logging.getLogger(__name__)

# Keys that may differ on --resume: they change how the job runs, not what it computes (or, for
# epochs, extend it on purpose). Any other change is refused: the run would silently mix settings.
RESUME_SAFE_KEYS = (
    "train.num_workers",
    "train.device",
    "train.stop_after_epoch",
    "train.max_bad_steps",
    "train.epochs",
    "train.early_stop",
    "train.tensorboard",
    "train.val_batch_size",
    "cache.n_jobs",
    "cache.dir",
    "data.root",
    "data.strict",
    "tune.",
    "predict.",
)
RUN_FILES = ("last.pt", "model.pt")  # a folder holding one of these is a run worth keeping


def run_dir(cfg: Mapping, fold: int) -> Path:
    return Path(cfg["train"]["out_dir"]) / cfg["exp"] / ("full" if fold < 0 else f"fold{fold}")


# ==================================================================================================
# Checks before anything is written
# ==================================================================================================
def check_fold(cfg: Mapping, fold: int) -> None:
    n = int(cfg["folds"]["n_folds"])
    if not -1 <= fold < n:
        raise FoldsError(
            f"--fold {fold} is not a fold: use 0..{n - 1} (folds.n_folds={n}) or -1 to train "
            "on every image"
        )


def holds_run(out: Path) -> bool:
    return any((out / f).is_file() for f in RUN_FILES) or any(out.glob("checkpoints/*.pt"))


def changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs. Keys the old config lacks (added
    to base.yaml by a later version) are not changes: that run used the built-in default."""
    out = []
    for key in sorted(set(old) & set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old[key], new[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(changed_keys(a, b, f"{dotted}."))
        elif a != b:
            out.append((dotted, a, b))
    return out


def check_resume(saved: Mapping, cfg: Mapping, source: Path) -> list[str]:
    """Refuse a resume whose settings changed outside :data:`RESUME_SAFE_KEYS`; return the
    safe changes (logged, and written to config.yaml since they are now in use)."""
    diffs = changed_keys(saved, cfg)
    unsafe = [d for d in diffs if not d[0].startswith(RESUME_SAFE_KEYS)]
    if unsafe:
        lines = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        raise ResumeError(
            f"--resume: the settings differ from the run's ({source}):\n  {lines}\n"
            "Resume with the run's own settings (e.g. --config "
            f"{source.parent / 'config.yaml'}), or start over with --force (the old run is "
            f"moved to a backup folder). Keys that may change on resume: "
            f"{', '.join(RESUME_SAFE_KEYS)}"
        )
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]


def saved_config(out: Path, last_state: Mapping | None) -> tuple[dict | None, Path]:
    """The config the run was started with: that of ``last_state`` (the loaded last.pt: what
    ran), else config.yaml."""
    if isinstance(last_state, Mapping) and isinstance(last_state.get("config"), Mapping):
        return dict(last_state["config"]), out / "last.pt"
    path = out / "config.yaml"
    if path.is_file():
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return (data if isinstance(data, dict) else None), path
    return None, path


def check_run_folder(
    cfg: Mapping, out: Path, resume: bool, force: bool, last_state: Mapping | None = None
) -> list[str]:
    """Whether this start may use ``out``; returns the (safe) config changes of a resume
    (``last_state``: the run's loaded last.pt, if any)."""
    if resume and force:
        raise ResumeError("--resume continues a run and --force starts it over: pick one")
    if not holds_run(out):
        return []
    if force:
        return []
    if not resume:
        raise OutputExistsError(
            f"{out} already holds a run; pass --resume to continue it or --force to start over "
            "(its checkpoints are moved to a backup folder, not deleted)"
        )
    saved, source = saved_config(out, last_state)
    return check_resume(saved, cfg, source) if saved is not None else []


def resolve_init(cfg: Mapping, out: Path) -> Path | None:
    tc = cfg["train"]
    if not tc["init_from"]:
        return None
    # "{fold}" lets one config fine-tune every fold from its own lower-resolution model.
    try:
        init = Path(str(tc["init_from"]).format(fold=out.name))
    except (KeyError, IndexError, ValueError):
        raise FoldsError(
            f"train.init_from {tc['init_from']!r}: the only placeholder allowed is {{fold}}"
        ) from None
    if not init.is_file():
        raise MissingFileError(f"train.init_from: {init} not found (train that stage first)")
    return init


# ==================================================================================================
# Data
# ==================================================================================================
@dataclass
class FoldData:
    cache: Any
    train_ds: Any
    val_ds: Any
    train_idx: np.ndarray
    val_idx: np.ndarray
    baseline: float = field(default=float("nan"))


def split_indices(cfg: Mapping, manifest, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of the cache manifest for ``fold`` from the folds file."""
    from pneumoseg.data.folds import fold_assignment

    ids = manifest["id"].astype(str)
    if fold < 0:
        return np.arange(len(ids)), np.arange(0)
    fcfg = cfg["folds"]
    fold_of = fold_assignment(fcfg["file"], int(fcfg["n_folds"]), bool(fcfg["allow_patient_split"]))
    missing = [i for i in ids if i not in fold_of]
    if missing:
        raise FoldsError(
            f"{fcfg['file']}: {len(missing)} cached image(s) have no fold, e.g. {missing[:3]}; "
            "rebuild the folds for this dataset (src/make_folds.py --force)"
        )
    f = ids.map(fold_of).to_numpy()
    if fold not in set(f.tolist()):
        raise FoldsError(
            f"{fcfg['file']}: no image in fold {fold} (folds: {sorted(set(f.tolist()))})"
        )
    return np.flatnonzero(f != fold), np.flatnonzero(f == fold)


def load_fold_data(cfg: Mapping, fold: int) -> FoldData:
    from pneumoseg.data.cache import open_cache_for
    from pneumoseg.data.dataset import SegDataset
    from pneumoseg.data.transforms import build_train_transforms

    cache = open_cache_for(cfg, "train")
    train_idx, val_idx = split_indices(cfg, cache.manifest, fold)
    # Images that failed to decode (non-strict cache) are left out, counted, never zero-filled.
    train_idx, n_bad_train = cache.usable(train_idx)
    val_idx, n_bad_val = cache.usable(val_idx)
    if n_bad_train or n_bad_val:
        log.warning(
            "left out %d train and %d validation image(s) that failed to decode in the cache "
            "(e.g. %s); fix them and rerun src/preprocess.py to use them",
            n_bad_train, n_bad_val, cache.failed_ids[:3],
        )  # fmt: skip
    in_ch = int(cfg["model"]["in_channels"])
    instances = family_for(cfg["model"]).needs_instances
    transforms = build_train_transforms(cfg["augment"], cfg["augment_neg"])
    train_ds = SegDataset(cache, train_idx, in_ch, transforms, instances=instances)
    val_ds = SegDataset(cache, val_idx, in_ch, None, instances=instances)
    if len(train_ds) == 0:
        raise FoldsError(f"fold {fold}: no training image left (every image is in this fold?)")
    if cfg["sampler"]["kind"] == "positive_share" and not train_ds.has_mask.any():
        raise FoldsError(
            f"fold {fold}: the training images hold no pneumothorax, so sampler.kind="
            "positive_share has nothing to draw; use sampler.kind=random or check the masks"
        )
    baseline = float((~val_ds.has_mask).mean()) if len(val_ds) else float("nan")
    log.info(
        "fold %d: %d train images (%d positive), %d validation images (%d positive), size %d",
        fold, len(train_ds), int(train_ds.has_mask.sum()), len(val_ds),
        int(val_ds.has_mask.sum()), cache.size,
    )  # fmt: skip
    return FoldData(cache, train_ds, val_ds, train_idx, val_idx, baseline)


def init_worker(worker_id: int) -> None:
    """Distinct, reproducible augmentation streams per worker and epoch: torch seeds each worker
    from the loader's generator, which the epoch loop reseeds. Module-level so that it pickles
    for ``spawn`` workers (macOS, Windows)."""
    torch.utils.data.get_worker_info().dataset.reseed(torch.initial_seed() % 2**32)


def make_loader(dataset, sampler, tc: Mapping, shuffle: bool, seed: int, train: bool):
    from pneumoseg.data.dataset import collate

    workers = int(tc["num_workers"])
    return DataLoader(
        dataset,
        batch_size=int(tc["batch_size"]) if train else int(tc["val_batch_size"]),
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train and len(dataset) > int(tc["batch_size"]),
        persistent_workers=False,
        worker_init_fn=init_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate,
    )


def build_sampler(cfg: Mapping, has_mask, epochs: int, seed: int):
    from pneumoseg.data.samplers import EpochWeightedSampler, PositiveShareSampler

    kind = cfg["sampler"]["kind"]
    if kind == "positive_share":
        return PositiveShareSampler(has_mask, cfg["sampler"]["pos_share"], epochs, seed)
    if kind == "weighted":
        return EpochWeightedSampler(has_mask, cfg["sampler"]["pos_weight"], seed)
    return None  # random (the config check allows nothing else)


# ==================================================================================================
# Model and optimisation state
# ==================================================================================================
@dataclass
class Job:
    """Everything the epoch loop mutates, and what ``last.pt`` stores."""

    model: torch.nn.Module
    ddp_model: torch.nn.Module
    family: Any
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    sampler: Any
    ckpts: Any
    train_loader: Any
    val_loader: Any
    history: list = field(default_factory=list)
    start_epoch: int = 0
    best: float = -1.0
    stale: int = 0


def build_job(cfg: Mapping, data: FoldData, d, device, dtype, init: Path | None, ckpt_dir: Path):
    from pneumoseg.data.samplers import ShardedSampler
    from pneumoseg.models.losses import ComboLoss
    from pneumoseg.models.registry import build_model, count_parameters, model_cfg

    tc = cfg["train"]
    family = family_for(cfg["model"])
    model = build_model(model_cfg(cfg)).to(device)
    if init is not None:
        state = engine.load_torch(init, what="train.init_from")
        inner = state.get("state_dict", state) if isinstance(state, Mapping) else state
        engine.load_weights(model, inner, init, "train.init_from weights")
        log.info("initialised weights from %s", init)
    if tc["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    log.info("model %s (%s family): %.1fM parameters", family.describe(cfg["model"]), family.name,
             count_parameters(model) / 1e6)  # fmt: skip
    loss_fn = ComboLoss(
        {k: cfg["loss"][k] for k in ("bce", "dice", "focal", "lovasz")}, cfg["loss"]["aux"]
    )
    sampler = build_sampler(cfg, data.train_ds.has_mask, int(tc["epochs"]), cfg["seed"])
    if d.enabled:
        if sampler is None:
            from torch.utils.data import RandomSampler

            gen = torch.Generator().manual_seed(cfg["seed"])
            sampler = RandomSampler(data.train_ds, generator=gen)
        sampler = ShardedSampler(sampler, d.world_size, d.rank)
    train_loader = make_loader(data.train_ds, sampler, tc, True, cfg["seed"], train=True)
    val_loader = make_loader(data.val_ds, None, tc, False, cfg["seed"], train=False)
    optimizer = engine.build_optimizer(model, tc)
    steps = max(1, len(train_loader) // max(1, tc["accum_steps"]))
    if tc["max_steps_per_epoch"]:
        steps = min(steps, int(tc["max_steps_per_epoch"]))
    scheduler = engine.build_scheduler(optimizer, tc, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ckpts = engine.Checkpoints(ckpt_dir, int(tc["top_k"]))
    ddp_model = model
    if d.enabled:
        if tc["sync_bn"] and device.type == "cuda":
            # Small per-GPU batches give noisy BatchNorm statistics; sync them across GPUs.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Job(model, ddp_model, family, loss_fn, optimizer, scheduler, scaler, sampler, ckpts,
               train_loader, val_loader)  # fmt: skip


def restore(job: Job, state: Mapping) -> None:
    """Continue from the loaded ``last.pt``: weights, optimiser, scheduler, scaler, sampler, RNG,
    history."""
    engine.require_finite(state["model"], "the weights in last.pt")
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    if job.scheduler is not None and state.get("scheduler"):
        job.scheduler.load_state_dict(state["scheduler"])
    job.scaler.load_state_dict(state["scaler"])
    if job.sampler is not None and state.get("sampler"):
        job.sampler.load_state_dict(state["sampler"])
    job.ckpts.load_state_dict(state["checkpoints"])
    job.history = list(state["history"])
    job.best, job.stale = float(state["best"]), int(state["stale"])
    job.start_epoch = int(state["epoch"]) + 1
    engine.set_rng_state(state["rng"])


def save_last(job: Job, cfg: Mapping, epoch: int, path: Path) -> None:
    engine.save_torch(
        {
            "model": job.model.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict() if job.scheduler is not None else None,
            "scaler": job.scaler.state_dict(),
            "sampler": job.sampler.state_dict() if hasattr(job.sampler, "state_dict") else None,
            "checkpoints": job.ckpts.state_dict(),
            "history": job.history,
            "best": job.best,
            "stale": job.stale,
            "epoch": epoch,
            "rng": engine.rng_state(),
            "config": cfg,
        },
        path,
    )


# ==================================================================================================
# Phases
# ==================================================================================================
def write_log(history: list[dict], folder: Path, title: str) -> None:
    import pandas as pd

    from pneumoseg.io import atomic_write
    from pneumoseg.visualize import plot_curves

    df = pd.DataFrame(history)
    with atomic_write(folder / "log.csv", "w") as fh:
        df.to_csv(fh, index=False)
    plot_curves(df, folder / "curves.png", title=title)


def open_tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard not installed: logging to log.csv only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train_epochs(cfg, job: Job, data: FoldData, d, device, dtype, out: Path, fold: int,
                 show: bool) -> bool:  # fmt: skip
    """The epoch loop; returns False when it stopped early on ``train.stop_after_epoch``."""
    tc = cfg["train"]
    epochs = int(tc["epochs"])
    train_loader, val_loader = job.train_loader, job.val_loader
    writer = open_tensorboard(out) if d.is_main and tc["tensorboard"] else None
    try:
        for epoch in range(job.start_epoch, epochs):
            t0 = time.perf_counter()
            if job.sampler is not None:
                job.sampler.set_epoch(epoch)
            train_loader.generator.manual_seed(cfg["seed"] * 1000 + epoch)
            data.train_ds.reseed(cfg["seed"] * 1000 + epoch)
            stats = engine.train_one_epoch(
                job.ddp_model, train_loader, job.loss_fn, job.optimizer, job.scheduler,
                job.scaler, device, epoch, tc, dtype, show, family=job.family,
            )  # fmt: skip
            # every rank holds the same weights, so every rank stops here together
            engine.require_finite(job.model.state_dict(), f"the weights after epoch {epoch}")
            row = {"epoch": epoch, **stats, "lr": job.optimizer.param_groups[0]["lr"]}
            if d.is_main and len(data.val_ds):
                row.update(
                    engine.evaluate(
                        job.model,
                        val_loader,
                        device,
                        tc["threshold"],
                        job.loss_fn,
                        dtype,
                        tc["channels_last"],
                        hflip=False,
                        show_progress=show,
                        family=job.family,
                    )
                )
                row["baseline_dice"] = data.baseline
            row["time_s"] = round(time.perf_counter() - t0, 2)
            score = selection_score(row, tc["select"], epoch)
            if isinstance(job.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                job.scheduler.step(score)
            stop = False
            if d.is_main:
                stop = end_epoch(cfg, job, row, score, epoch, out, fold, writer)
            if engine.broadcast_flag(d, stop):
                break
            if tc["stop_after_epoch"] is not None and epoch >= int(tc["stop_after_epoch"]):
                log.warning("stopping after epoch %d as asked (train.stop_after_epoch)", epoch)
                return False
    finally:
        if writer is not None:
            writer.close()
    return True


def selection_score(row: Mapping, select: str, epoch: int) -> float:
    """The number checkpoints are ranked by (higher is better): ``train.select`` of the epoch's
    validation row; without validation the epoch itself, so the latest epochs are kept."""
    if select not in row:
        return float(epoch)
    value = float(row[select])
    return -value if select == "val_loss" else value


def end_epoch(cfg, job: Job, row: dict, score: float, epoch: int, out: Path, fold: int,
              writer) -> bool:  # fmt: skip
    """Main rank: checkpoints, last.pt, logs; returns whether early stopping triggers."""
    tc = cfg["train"]
    job.history.append(row)
    job.ckpts.update(score, epoch, job.model.state_dict(), {"config": cfg, "metrics": row})
    if score > job.best:
        job.best, job.stale = score, 0
    else:
        job.stale += 1
    stop = bool(tc["early_stop"]) and job.stale >= int(tc["early_stop"])
    save_last(job, cfg, epoch, out / "last.pt")
    write_log(job.history, out, f"{cfg['exp']} fold {fold}")
    if writer is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float) and np.isfinite(v):
                writer.add_scalar(k, v, epoch)
    msg = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
    log.info("epoch %d/%d %s", epoch + 1, int(tc["epochs"]), msg)
    if stop:
        log.info("early stop: no improvement for %d epochs", job.stale)
    return stop


def average_checkpoints(cfg, job: Job, model_path: Path) -> None:
    paths = job.ckpts.paths()
    averaged = engine.average_state_dicts(paths)
    engine.save_torch(
        {
            "state_dict": averaged,
            "config": cfg,
            "averaged": [p.name for p in paths],
            "scores": [b[0] for b in job.ckpts.best],
        },
        model_path,
    )
    log.info("averaged %d checkpoint(s) %s into %s", len(paths), [p.name for p in paths],
             model_path)  # fmt: skip


def write_oof(cfg, job: Job, data: FoldData, out: Path, device, dtype, fold: int,
              show: bool) -> None:  # fmt: skip
    """Predict the validation fold with the averaged model and score the maps just written."""
    from pneumoseg.postprocessing.postprocess import evaluate_params
    from pneumoseg.training.oof import load_oof, predict_oof

    tc = cfg["train"]
    job.model.load_state_dict(engine.load_torch(out / "model.pt", what="model file")["state_dict"])
    ids = data.cache.manifest["id"].astype(str).to_numpy()[data.val_idx].tolist()
    oof_size = int(cfg["oof"]["size"])
    predict_oof(job.model, job.val_loader, out, ids, oof_size, device, hflip=bool(cfg["oof"]["hflip"]),
                dtype=dtype, show_progress=show, family=job.family)  # fmt: skip
    write_option_oofs(cfg, job, out, ids, device, dtype, show)
    raw = {"method": "threshold", "threshold": tc["threshold"], "min_area": 0}
    score = evaluate_params([load_oof(out)], raw).iloc[0]
    log.info(
        "fold %d averaged model (OOF, %d px, p > %g): dice=%.4f pos_dice=%.4f "
        "(all-empty baseline %.4f)",
        fold, oof_size, tc["threshold"], score["dice"], score["pos_dice"], data.baseline,
    )  # fmt: skip


def write_option_oofs(cfg, job: Job, out: Path, ids, device, dtype, show: bool) -> None:
    """OOF maps for every setting of ``tune.options`` (the family's inference options, e.g. a
    detector's ``min_score``), each in its own sub-folder, for ``oof_tune.py`` to search."""
    from pneumoseg.training.oof import option_folder, option_settings, predict_oof

    for opts in option_settings(cfg["tune"]["options"]):
        for name, value in opts.items():
            job.family.set_option(job.model, name, value)
        predict_oof(job.model, job.val_loader, out / option_folder(opts), ids,
                    int(cfg["oof"]["size"]), device, hflip=bool(cfg["oof"]["hflip"]),
                    dtype=dtype, show_progress=show, family=job.family)  # fmt: skip
    for name in cfg["tune"]["options"] or {}:  # back to the configured value
        job.family.set_option(job.model, name, cfg["model"][name])


def check_disk_space(cfg: Mapping, job: Job, data: FoldData, out: Path, resume: bool) -> None:
    """Refuse to start a fold whose outputs cannot fit on the disk (both numbers in the message),
    rather than fail after hours of training: checkpoints (top-k, model.pt, last.pt with the
    optimiser's state) and the OOF maps (of every ``tune.options`` setting)."""
    from pneumoseg.errors import DiskSpaceError
    from pneumoseg.training.oof import option_settings

    weights = sum(t.numel() * t.element_size() for t in job.model.state_dict().values())
    moments = 2 if cfg["train"]["optimizer"] in ("adam", "adamw") else 1
    ckpt = weights * (int(cfg["train"]["top_k"]) + 2 + moments)
    oof_side = int(cfg["oof"]["size"])
    n_maps = 1 + len(option_settings(cfg["tune"]["options"]))
    oof = len(data.val_idx) * oof_side * oof_side * 2 * n_maps
    # a resumed run replaces files it already has: only the growth (and one temp copy) is new
    have = sum(f.stat().st_size for f in out.rglob("*.pt")) if resume and out.is_dir() else 0
    need = max(ckpt - have, weights * (1 + moments)) + oof
    where = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise DiskSpaceError(
            f"{out}: this fold writes about {_gib(need)} (checkpoints {_gib(ckpt)}, OOF maps "
            f"{_gib(oof)} at oof.size={oof_side}) but only {_gib(free)} are free on that disk. "
            "Free space, or point train.out_dir at a larger disk (lower train.top_k / oof.size "
            "to need less)"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def prepare_folder(out: Path, cfg: Mapping, force: bool, changes: list[str]) -> None:
    """Main rank, after every check passed: back up a forced run, create the folder."""
    if force and out.exists() and any(out.iterdir()):
        backup = out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(out), str(backup))
        log.warning("--force: moved the previous run to %s", backup)
    out.mkdir(parents=True, exist_ok=True)
    if changes:
        log.warning("resuming with changed settings: %s", "; ".join(changes))
    save_config(cfg, out / "config.yaml")


# ==================================================================================================
# The whole fold
# ==================================================================================================
def fit(cfg: dict, fold: int, resume: bool = False, force: bool = False, quiet: bool = False):
    """Train one fold; returns (run folder, the trained model). One process per run folder: a
    second one is refused (:class:`~pneumoseg.errors.RunLockedError`) while the first runs."""
    import contextlib

    from pneumoseg.locks import exclusive, lock_file_for

    check_fold(cfg, fold)
    d = engine.init_distributed(cfg["train"]["device"])
    out = run_dir(cfg, fold)
    new_exp = not out.parent.exists()
    # the lock sits beside the folder: --force moves the folder (and would move a lock inside it)
    lock = exclusive(lock_file_for(out), f"run folder {out}") if d.is_main else None
    try:
        with lock or contextlib.nullcontext():
            return _fit_locked(cfg, fold, d, out, resume, force, quiet)
    finally:
        if new_exp and d.is_main:  # a start that failed its checks leaves no folder behind
            with contextlib.suppress(OSError):  # not empty: the run (or another) wrote there
                out.parent.rmdir()


def _fit_locked(cfg: dict, fold: int, d, out: Path, resume: bool, force: bool, quiet: bool):
    from pneumoseg.logs import setup_logging
    from pneumoseg.training.oof import has_oof

    tc = cfg["train"]
    last_path, model_path = out / "last.pt", out / "model.pt"

    # 1. every check that can fail, before anything is written
    # last.pt is read once: its config for the resume check, its state for restoring.
    last_state = None
    if resume and not force and last_path.is_file():
        last_state = engine.load_torch(last_path, what="resume checkpoint")
    changes = check_run_folder(cfg, out, resume, force, last_state) if d.is_main else []
    init = resolve_init(cfg, out)
    data = load_fold_data(cfg, fold)
    device = engine.get_device(tc["device"])
    dtype = engine.amp_dtype(device, tc["amp"])
    engine.seed_everything(cfg["seed"] + d.rank, tc["deterministic"])
    job = build_job(cfg, data, d, device, dtype, init, out / "checkpoints")
    finished = resume and model_path.is_file()
    if d.is_main and not finished:
        check_disk_space(cfg, job, data, out, resume and not force)
    if last_state is not None and not finished:
        restore(job, last_state)

    # 2. the run folder
    if d.is_main:
        prepare_folder(out, cfg, force, changes)
    engine.barrier(d)
    setup_logging(logfile=out / "train.log" if d.is_main else None, quiet=not d.is_main)
    log_config(cfg)
    if job.start_epoch:
        log.info("resumed from %s: epoch %d of %d done", last_path, job.start_epoch, tc["epochs"])
    elif finished:
        log.info("%s exists: training is complete, only missing outputs are produced", model_path)
    elif resume:
        log.info("nothing to resume in %s: starting from epoch 0", out)

    # 3. train, average, predict the fold
    show = d.is_main and not quiet
    if not finished and not train_epochs(cfg, job, data, d, device, dtype, out, fold, show):
        return out, job.model
    if d.is_main:
        if not finished:
            average_checkpoints(cfg, job, model_path)
        if len(data.val_ds) and not has_oof(out):
            write_oof(cfg, job, data, out, device, dtype, fold, show)
    engine.barrier(d)
    return out, job.model
