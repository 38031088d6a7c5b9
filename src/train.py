"""Train one fold: ``python src/train.py --config configs/demo.yaml --fold 0 [key=value ...]``.

``--fold -1`` trains on every image (no validation, no OOF). Outputs go to
``runs/<exp>/fold<k>/`` (``full/`` for -1): ``config.yaml``, ``train.log``, ``log.csv``,
``curves.png``, ``checkpoints/epochNNN.pt`` (top-k by validation Dice), ``last.pt`` (resume point),
``model.pt`` (mean of the top-k weights), ``oof_*`` (out-of-fold probabilities).

Multi-GPU: ``torchrun --nproc_per_node=N src/train.py --config ... --fold 0``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations loads)
from pneumoseg.cli import setup_logging

log = logging.getLogger("pneumoseg.train")


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/base.yaml", help="experiment YAML")
    ap.add_argument("--fold", type=int, default=0, help="validation fold; -1 trains on all data")
    ap.add_argument("--resume", action="store_true", help="continue from last.pt")
    ap.add_argument("--force", action="store_true", help="retrain into an existing run folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    return ap.parse_args(argv)


def run_dir(cfg: dict, fold: int) -> Path:
    return Path(cfg["train"]["out_dir"]) / cfg["exp"] / ("full" if fold < 0 else f"fold{fold}")


def split_indices(cfg: dict, manifest, fold: int):
    """(train rows, validation rows) of the cache manifest for ``fold`` from the folds file."""
    import numpy as np
    import pandas as pd

    ids = manifest["id"].astype(str)
    if fold < 0:
        return np.arange(len(ids)), np.arange(0)
    path = Path(cfg["folds"]["file"])
    if not path.is_file():
        raise FileNotFoundError(f"folds file {path} not found: run src/make_folds.py first")
    folds = pd.read_csv(path, dtype={"id": str})
    if "fold" not in folds or "id" not in folds:
        raise ValueError(f"{path}: needs columns id and fold, has {list(folds.columns)}")
    fold_of = dict(zip(folds["id"], folds["fold"], strict=True))
    missing = [i for i in ids if i not in fold_of]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} cached image(s) have no fold, e.g. {missing[:3]}; "
            "rebuild the folds for this dataset"
        )
    f = ids.map(fold_of).to_numpy()
    if fold not in set(f.tolist()):
        raise ValueError(f"{path}: no image in fold {fold} (folds: {sorted(set(f.tolist()))})")
    return np.flatnonzero(f != fold), np.flatnonzero(f == fold)


def init_worker(worker_id: int) -> None:
    """Distinct, reproducible augmentation streams per worker and epoch: torch seeds each worker
    from the loader's generator, which the epoch loop reseeds. Module-level so that it pickles
    for ``spawn`` workers (macOS, Windows)."""
    import torch

    torch.utils.data.get_worker_info().dataset.reseed(torch.initial_seed() % 2**32)


def make_loader(dataset, sampler, cfg_train: dict, shuffle: bool, seed: int, train: bool):
    import torch
    from torch.utils.data import DataLoader

    workers = int(cfg_train["num_workers"])
    return DataLoader(
        dataset,
        batch_size=int(cfg_train["batch_size"]) if train else int(cfg_train["val_batch_size"]),
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train and len(dataset) > int(cfg_train["batch_size"]),
        persistent_workers=False,
        worker_init_fn=init_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def build_sampler(cfg: dict, has_mask, epochs: int, seed: int):
    from pneumoseg.samplers import EpochWeightedSampler, PositiveShareSampler

    kind = cfg["sampler"]["kind"]
    if kind == "positive_share":
        return PositiveShareSampler(has_mask, cfg["sampler"]["pos_share"], epochs, seed)
    if kind == "weighted":
        return EpochWeightedSampler(has_mask, cfg["sampler"]["pos_weight"], seed)
    if kind == "random":
        return None
    raise KeyError(f"unknown sampler.kind {kind!r}; valid: positive_share, weighted, random")


def write_log(history: list[dict], folder: Path, title: str) -> None:
    import pandas as pd

    from pneumoseg.io import atomic_write
    from pneumoseg.visualize import plot_curves

    df = pd.DataFrame(history)
    with atomic_write(folder / "log.csv", "w") as fh:
        df.to_csv(fh, index=False)
    plot_curves(df, folder / "curves.png", title=title)


def main(args):
    """Train one fold; returns (run folder, the trained model)."""
    import numpy as np
    import torch

    from pneumoseg import engine
    from pneumoseg.cache import open_cache_for
    from pneumoseg.config import load_config, log_config, save_config
    from pneumoseg.data import SegDataset
    from pneumoseg.losses import ComboLoss
    from pneumoseg.models import build_model, count_parameters
    from pneumoseg.oof import has_oof, load_oof, predict_oof
    from pneumoseg.postprocess import evaluate_params
    from pneumoseg.samplers import ShardedSampler
    from pneumoseg.transforms import build_train_transforms

    cfg = load_config(args.config, args.overrides)
    tc = cfg["train"]
    d = engine.init_distributed(tc["device"])
    out = run_dir(cfg, args.fold)
    ckpt_dir = out / "checkpoints"
    last_path, model_path = out / "last.pt", out / "model.pt"
    if d.is_main:
        if out.exists() and any(out.iterdir()) and not (args.resume or args.force):
            raise SystemExit(
                f"{out} already holds a run; pass --resume to continue it or --force to start "
                "over (its checkpoints are moved to a backup folder, not deleted)"
            )
        if args.force and out.exists():
            backup = out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(out), str(backup))
        out.mkdir(parents=True, exist_ok=True)
    engine.barrier(d)
    setup_logging(logfile=out / "train.log" if d.is_main else None, quiet=not d.is_main)
    log_config(cfg)
    if d.is_main:
        save_config(cfg, out / "config.yaml")

    device = engine.get_device(tc["device"])
    dtype = engine.amp_dtype(device, tc["amp"])
    engine.seed_everything(cfg["seed"] + d.rank, tc["deterministic"])
    show = d.is_main and not args.quiet

    cache = open_cache_for(cfg, "train")
    train_idx, val_idx = split_indices(cfg, cache.manifest, args.fold)
    in_ch = int(cfg["model"]["in_channels"])
    transforms = build_train_transforms(cfg["augment"], cfg["augment_neg"])
    train_ds = SegDataset(cache, train_idx, in_ch, transforms)
    val_ds = SegDataset(cache, val_idx, in_ch, None)
    log.info(
        "fold %d: %d train images (%d positive), %d validation images (%d positive), size %d",
        args.fold,
        len(train_ds),
        int(train_ds.has_mask.sum()),
        len(val_ds),
        int(val_ds.has_mask.sum()),
        cache.size,
    )
    epochs = int(tc["epochs"])
    sampler = build_sampler(cfg, train_ds.has_mask, epochs, cfg["seed"])
    if d.enabled:
        if sampler is None:
            from torch.utils.data import RandomSampler

            sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg["seed"]))
        sampler = ShardedSampler(sampler, d.world_size, d.rank)
    train_loader = make_loader(train_ds, sampler, tc, True, cfg["seed"], train=True)
    val_loader = make_loader(val_ds, None, tc, False, cfg["seed"], train=False)

    model = build_model(cfg["model"]).to(device)
    if tc["init_from"]:
        # "{fold}" lets one config fine-tune every fold from its own lower-resolution model.
        init = Path(tc["init_from"].format(fold=out.name))
        if not init.is_file():
            raise FileNotFoundError(f"train.init_from: {init} not found (train that stage first)")
        state = engine.load_torch(init)
        model.load_state_dict(state.get("state_dict", state))
        log.info("initialised weights from %s", init)
    if tc["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    log.info(
        "model %s/%s: %.1fM parameters",
        cfg["model"]["arch"],
        cfg["model"]["encoder"],
        count_parameters(model) / 1e6,
    )
    loss_fn = ComboLoss(
        {k: cfg["loss"][k] for k in ("bce", "dice", "focal", "lovasz")}, cfg["loss"]["aux"]
    )
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

    history: list[dict] = []
    start_epoch, best, stale = 0, -1.0, 0
    finished = model_path.is_file()
    if args.resume and last_path.is_file() and not finished:
        state = engine.load_torch(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if sampler is not None and state.get("sampler"):
            sampler.load_state_dict(state["sampler"])
        ckpts.load_state_dict(state["checkpoints"])
        history = list(state["history"])
        best, stale = float(state["best"]), int(state["stale"])
        start_epoch = int(state["epoch"]) + 1
        engine.set_rng_state(state["rng"])
        log.info("resumed from %s: epoch %d of %d done", last_path, start_epoch, epochs)
    elif args.resume and finished:
        log.info("%s exists: training is complete, only missing outputs are produced", model_path)
    baseline = float((~val_ds.has_mask).mean()) if len(val_ds) else float("nan")

    writer = None
    if d.is_main and tc["tensorboard"] and not finished:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log.info("tensorboard not installed: logging to log.csv only")

    epoch = start_epoch
    for epoch in range(start_epoch, 0 if finished else epochs):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(cfg["seed"] * 1000 + epoch)
        train_ds.reseed(cfg["seed"] * 1000 + epoch)
        stats = engine.train_one_epoch(
            ddp_model,
            train_loader,
            loss_fn,
            optimizer,
            scheduler,
            scaler,
            device,
            epoch,
            tc,
            dtype,
            show,
        )
        row = {"epoch": epoch, **stats, "lr": optimizer.param_groups[0]["lr"]}
        if d.is_main and len(val_ds):
            row.update(
                engine.evaluate(
                    model,
                    val_loader,
                    device,
                    tc["threshold"],
                    loss_fn,
                    dtype,
                    tc["channels_last"],
                    hflip=False,
                    show_progress=show,
                )
            )
            row["baseline_dice"] = baseline
        row["time_s"] = round(time.perf_counter() - t0, 2)
        score = row.get("dice", float(epoch))  # no validation: keep the latest epochs
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score)
        stop = False
        if d.is_main:
            history.append(row)
            ckpts.update(score, epoch, model.state_dict(), {"config": cfg, "metrics": row})
            if score > best:
                best, stale = score, 0
            else:
                stale += 1
            stop = bool(tc["early_stop"]) and stale >= int(tc["early_stop"])
            engine.save_torch(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict(),
                    "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
                    "checkpoints": ckpts.state_dict(),
                    "history": history,
                    "best": best,
                    "stale": stale,
                    "epoch": epoch,
                    "rng": engine.rng_state(),
                    "config": cfg,
                },
                last_path,
            )
            write_log(history, out, f"{cfg['exp']} fold {args.fold}")
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, float) and np.isfinite(v):
                        writer.add_scalar(k, v, epoch)
            msg = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
            log.info("epoch %d/%d %s", epoch + 1, epochs, msg)
            if stop:
                log.info("early stop: no improvement for %d epochs", stale)
        if engine.broadcast_flag(d, stop):
            break
        if tc.get("stop_after_epoch") is not None and epoch >= int(tc["stop_after_epoch"]):
            log.warning("stopping after epoch %d as asked (train.stop_after_epoch)", epoch)
            return out, model
    if writer is not None:
        writer.close()

    if d.is_main:
        if not finished:
            paths = ckpts.paths()
            averaged = engine.average_state_dicts(paths)
            engine.save_torch(
                {
                    "state_dict": averaged,
                    "config": cfg,
                    "averaged": [p.name for p in paths],
                    "scores": [b[0] for b in ckpts.best],
                },
                model_path,
            )
            log.info(
                "averaged %d checkpoint(s) %s into %s",
                len(paths),
                [p.name for p in paths],
                model_path,
            )
        if len(val_ds) and not has_oof(out):
            model.load_state_dict(engine.load_torch(model_path)["state_dict"])
            ids = cache.manifest["id"].astype(str).to_numpy()[val_idx].tolist()
            oof_size = int(cfg["oof"]["size"])
            predict_oof(
                model,
                val_loader,
                out,
                ids,
                oof_size,
                device,
                hflip=bool(cfg["oof"]["hflip"]),
                dtype=dtype,
                show_progress=show,
            )
            # Score the OOF maps just written instead of predicting the fold a second time.
            raw = {"method": "threshold", "threshold": tc["threshold"], "min_area": 0}
            score = evaluate_params([load_oof(out)], raw).iloc[0]
            log.info(
                "fold %d averaged model (OOF, %d px, p > %g): dice=%.4f pos_dice=%.4f "
                "(all-empty baseline %.4f)",
                args.fold,
                oof_size,
                tc["threshold"],
                score["dice"],
                score["pos_dice"],
                baseline,
            )
    engine.barrier(d)
    return out, model


if __name__ == "__main__":
    main(get_args())
