"""Training throughput: the data loader alone vs the model step alone, per config and size.

    python benchmarks/bench_train.py [--configs r34_unet_512 ...] [--sizes 256 512]
                                     [--batch 8] [--steps 3] [--workers 2] [--device auto]

* loader: images/s that ``SegDataset`` + the config's augmentations + a DataLoader deliver from a
  memmap cache of random images (what training reads);
* train: images/s of a full optimiser step (the family's loss from a batch, backward, AdamW) on
  random tensors already on the device, with the config's AMP and channels_last settings;
* infer: images/s of the family's eval forward to probability maps (no TTA).

Every model family is covered (smp U-Nets, Mask R-CNN, Double U-Net, classic U-Net).

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

from pneumoseg.config import CONFIG_DIR, load_config
from pneumoseg.data.dataset import SegDataset, collate
from pneumoseg.data.transforms import build_train_transforms
from pneumoseg.models.families import family_for
from pneumoseg.models.losses import ComboLoss
from pneumoseg.models.registry import build_model
from pneumoseg.training import engine


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
    family = family_for(cfg["model"])
    ds = SegDataset(cache, np.arange(len(cache.manifest)), cfg["model"]["in_channels"], transforms,
                    instances=family.needs_instances)  # fmt: skip
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, collate_fn=collate
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


def _batch(mcfg, size: int, batch: int, device, channels_last: bool) -> dict:
    """A random training batch on the device (an instance per positive image for detectors)."""
    x = torch.randn(batch, mcfg["in_channels"], size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, 1, size, size, device=device)
    y[::2, :, size // 4 : size // 2, size // 8 : size // 3] = 1
    inst = [y[i].to(torch.uint8) if y[i].any() else y[i, :0].to(torch.uint8) for i in range(batch)]
    return {"image": x, "mask": y, "instances": inst, "has_mask": y.flatten(1).any(1)}


def _timed(fn, steps: int, device) -> float:
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up (allocations, cuDNN autotuning)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_model(cfg, size: int, batch: int, steps: int, device) -> tuple[float, float]:
    """(train img/s, inference img/s) of the config's model through its family."""
    mcfg = {**cfg["model"], "encoder_weights": None, "encoder_weights_path": None,
            "input_size": size}  # fmt: skip
    family = family_for(mcfg)
    model = build_model(mcfg).to(device)
    tc = cfg["train"]
    dtype = engine.amp_dtype(device, tc["amp"])
    channels_last = tc["channels_last"] and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = ComboLoss({k: cfg["loss"][k] for k in ("bce", "dice", "focal", "lovasz")})
    data = _batch(mcfg, size, batch, device, channels_last)

    def train_step():
        model.train()
        with engine.autocast(device, dtype):
            loss, _ = family.train_loss(model, data, loss_fn)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    @torch.no_grad()
    def infer_step():
        model.eval()
        with engine.autocast(device, engine.inference_dtype(device, "auto")):
            family.predict(model, data["image"])

    return batch / _timed(train_step, steps, device), batch / _timed(infer_step, steps, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        nargs="+",
        default=[
            "r34_unet_512",
            "seresnext50_unetpp_512",
            "effb4_unet_gray_512",
            "maskrcnn_r50_512",
            "doubleunet_256",
            "unet_classic_png_512",
        ],
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
    print(f"{'config':26s} {'size':>5s} {'loader img/s':>13s} {'train img/s':>12s} "
          f"{'loader/train':>13s} {'infer img/s':>12s}  limited by")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            cache = fake_cache(Path(tmp), max(64, args.batch * (args.steps + 2)), size)
            for cname in args.configs:
                cfg = load_config(CONFIG_DIR / f"{cname}.yaml")
                loader = time_loader(cfg, cache, args.batch, args.steps, args.workers)
                train, infer = time_model(cfg, size, args.batch, args.steps, device)
                limit = "model" if loader > train else "loader"
                print(f"{cname:26s} {size:5d} {loader:13.1f} {train:12.2f} "
                      f"{loader / train:12.1f}× {infer:12.2f}  {limit}", flush=True)  # fmt: skip
            del cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
