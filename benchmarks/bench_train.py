"""Training throughput: the data loader alone vs the model step alone, per config and size.

    python benchmarks/bench_train.py [--configs r34_unet_512 ...] [--sizes 256 512]
                                     [--batch 8] [--steps 3] [--workers 2] [--device auto]

* loader: images/s that ``SegDataset`` + the config's augmentations + a DataLoader deliver from a
  memmap cache of random images (what training reads);
* model: images/s of a full optimiser step (forward, BCE+Dice+Focal, backward, AdamW) on random
  tensors already on the device, with the config's AMP and channels_last settings.

The loader must be faster than the model, or the GPU waits. Medians over ``--steps`` timed steps
after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pneumoseg import engine
from pneumoseg.config import CONFIG_DIR, load_config
from pneumoseg.data import SegDataset
from pneumoseg.losses import ComboLoss
from pneumoseg.models import build_model, split_output
from pneumoseg.transforms import build_train_transforms


def fake_cache(folder: Path, n: int, size: int):
    """A cache-like object over random uint8 memmaps (what SegDataset reads)."""
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(folder / "i.npy", "w+", np.uint8, (n, size, size))
    masks = np.lib.format.open_memmap(folder / "m.npy", "w+", np.uint8, (n, size, size))
    for i in range(n):
        images[i] = rng.integers(0, 255, (size, size), dtype=np.uint8)
        if i % 4 == 0:
            masks[i, size // 4 : size // 2, size // 8 : size // 3] = 1
    images.flush()
    masks.flush()
    manifest = pd.DataFrame({"id": [str(i) for i in range(n)], "has_mask": np.arange(n) % 4 == 0})
    return SimpleNamespace(images=images, masks=masks, manifest=manifest, size=size)


def time_loader(cfg, cache, batch: int, steps: int, workers: int) -> float:
    transforms = build_train_transforms(cfg["augment"], cfg["augment_neg"])
    ds = SegDataset(cache, np.arange(len(cache.manifest)), cfg["model"]["in_channels"], transforms)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    times, t0 = [], time.perf_counter()
    for i, _ in enumerate(loader):
        now = time.perf_counter()
        if i > 0:  # the first batch pays for starting the workers
            times.append(now - t0)
        t0 = now
        if i >= steps:
            break
    return batch / statistics.median(times)


def time_model(cfg, size: int, batch: int, steps: int, device) -> float:
    mcfg = {**cfg["model"], "encoder_weights": None, "encoder_weights_path": None}
    model = build_model(mcfg).to(device)
    tc = cfg["train"]
    dtype = engine.amp_dtype(device, tc["amp"])
    channels_last = tc["channels_last"] and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = ComboLoss({k: cfg["loss"][k] for k in ("bce", "dice", "focal", "lovasz")})
    x = torch.randn(batch, mcfg["in_channels"], size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.95).float()
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with engine.autocast(device, dtype):
            logits, _ = split_output(model(x))
        loss, _ = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["r34_unet_512", "seresnext50_unetpp_512", "effb4_unet_gray_512"],
    )
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = engine.get_device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu × {torch.get_num_threads()} threads"
    )
    print(
        f"device: {name}; batch {args.batch}; loader workers {args.workers}; torch {torch.__version__}"
    )
    print(
        f"{'config':26s} {'size':>5s} {'loader img/s':>13s} {'model img/s':>12s} {'loader/model':>13s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            cache = fake_cache(Path(tmp), max(64, args.batch * (args.steps + 2)), size)
            for cname in args.configs:
                cfg = load_config(CONFIG_DIR / f"{cname}.yaml")
                loader = time_loader(cfg, cache, args.batch, args.steps, args.workers)
                model = time_model(cfg, size, args.batch, args.steps, device)
                print(
                    f"{cname:26s} {size:5d} {loader:13.1f} {model:12.1f} {loader / model:12.1f}×",
                    flush=True,
                )
            del cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
