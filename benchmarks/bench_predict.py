"""Batched ensemble inference vs a naive per-image, per-model, per-view loop.

    python benchmarks/bench_predict.py [--models 3] [--batch 8] [--size 256] [--tta hflip]
                                       [--repeats 2] [--device cpu]

All compute the same weighted mean of sigmoid probabilities (checked). The batched path
(``pneumoseg.inference.ensemble.predict_probs``) uploads the uint8 batch once, normalises it on the device
once per ``in_channels`` and sends all TTA views of the whole batch through each model in one
forward pass ("1 fwd/model"; what it does on a GPU), with the models in NCHW or channels_last
(NHWC, what ``load_models`` gives) memory format; "default" is what it does on this device (on a
CPU: forward passes of at most ``CPU_FORWARD`` images, which stay in the caches). The naive loop
normalises and runs one image, one model, one view at a time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch

from pneumoseg.data.dataset import normalize
from pneumoseg.inference.ensemble import Member, parse_tta, predict_probs
from pneumoseg.models.registry import build_model, split_output
from pneumoseg.training.engine import inference_dtype


def naive(members, images, tta, device):
    """One image × one model × one view per forward pass."""
    hflip, vflip, scales = parse_tta(tta)
    if scales:
        raise SystemExit("the naive loop implements flips only")
    flips = [()] + ([(-1,)] if hflip else []) + ([(-2,)] if vflip else [])
    flips += [(-2, -1)] if hflip and vflip else []
    out = []
    wsum = sum(m.weight for m in members)
    with torch.no_grad():
        for img in images:
            acc = 0
            for m in members:
                x = normalize(img, int(m.cfg["in_channels"]))[None].to(device)
                for d in flips:
                    v = x.flip(d) if d else x
                    p = torch.sigmoid(split_output(m.model(v))[0])
                    acc = acc + m.weight / len(flips) * (p.flip(d) if d else p)
            out.append((acc / wsum)[0, 0])
    return torch.stack(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tta", nargs="*", default=["hflip"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    members = []
    for k in range(args.models):
        cfg = {
            "arch": "unet",
            "encoder": "resnet18",
            "encoder_weights": None,
            "decoder_channels": [64, 32, 16, 16, 8],
            "in_channels": 3 if k % 2 == 0 else 1,  # mixed inputs, as in a real blend
        }
        members.append(Member(build_model(cfg).to(device).eval(), 1.0 + k, cfg))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.size, args.size), dtype=np.uint8)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # what load_models gives the batched path: the same weights in channels_last memory format
    fast = [
        Member(copy.deepcopy(m.model).to(memory_format=torch.channels_last), m.weight, m.cfg)
        for m in members
    ]
    # the equality check (also a warm-up: allocators, cuDNN/oneDNN kernel choice)
    a = predict_probs(fast, images[:2], args.tta, device)[0]
    b = naive(members, images[:2], args.tta, device)
    err = float((a - b).abs().max())
    # What predict.py uses by default (predict.amp=auto): bf16 autocast on CUDA and on CPUs with
    # native bf16; None (fp32) elsewhere, then that row equals "default (NHWC)".
    auto = inference_dtype(device, "auto")
    c = predict_probs(fast, images[:2], args.tta, device, auto)[0]
    err_auto = float((c - b).abs().max())
    agree = float(((c > 0.5) == (b > 0.5)).float().mean())
    runs = {
        "naive loop": lambda: naive(members, images, args.tta, device),
        "1 fwd/model, NCHW": lambda: predict_probs(
            members, images, args.tta, device, channels_last=False, max_forward=0
        ),
        "1 fwd/model, NHWC": lambda: predict_probs(fast, images, args.tta, device, max_forward=0),
        "default (NHWC)": lambda: predict_probs(fast, images, args.tta, device),
        f"amp=auto ({str(auto).replace('torch.', '') if auto else 'fp32'})": lambda: predict_probs(
            fast, images, args.tta, device, auto
        ),
    }
    warm = images[:2]
    naive(members, warm, args.tta, device)
    predict_probs(members, warm, args.tta, device, channels_last=False)
    predict_probs(fast, warm, args.tta, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: a busy machine slows every method alike
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    results = {name: args.batch / min(t) for name, t in times.items()}
    hf, vf, _ = parse_tta(args.tta)
    n_views = (1 + hf) * (1 + vf)
    print(
        f"{args.models} models (resnet18 U-Net, light decoder) x {n_views} views "
        f"({', '.join(args.tta) or 'none'}), batch {args.batch}, {args.size}², {device}, "
        f"{torch.get_num_threads()} threads; max |batched - naive| = {err:.1e}"
    )
    print(
        f"amp=auto vs fp32 naive: max |Δp| = {err_auto:.1e}, "
        f"pixels on the same side of 0.5: {100 * agree:.3f}%"
    )
    print(f"{'method':<24}{'images/s':>10}{'speed-up':>10}   (best of {args.repeats})")
    base = results["naive loop"]
    for name, ips in results.items():
        print(f"{name:<24}{ips:>10.2f}{ips / base:>9.2f}x")


if __name__ == "__main__":
    main()
