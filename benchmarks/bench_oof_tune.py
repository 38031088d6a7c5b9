"""Post-processing grid search speed: pneumoseg's fast search against the naive loop.

Synthetic OOF sets like ``train.py`` writes (uint8 memmaps, 256², split into 5 folds): about 22%
positive images with irregular blobs of realistic sizes; probability maps = blurred truth × a
per-image confidence + smooth background noise + spurious blobs on some images (false positives);
aux-head probabilities for the gate. The grids are ``tune`` of configs/base.yaml (plus a 3-value
gate grid unless ``--no-gate``).

* fast: :func:`pneumoseg.postprocessing.postprocess.search` over every image and every setting, run in a child
  process on the memmaps so that its peak RSS (``ru_maxrss``, which counts the memmapped pages
  it touched) is its own;
* naive: :func:`pneumoseg.postprocessing.postprocess.naive_search` (apply_postprocess + Dice for each setting and
  image) on the first ``--naive-n`` images only, extrapolated linearly to every image × setting.

Targets: speed-up ≥ 50×, 10,000 images in ≤ 2 min on 2 cores, peak RSS ≤ 4 GB.

    python benchmarks/bench_oof_tune.py [--n 10000] [--size 256] [--naive-n 40] [--jobs N]

The memmaps (~1.3 GB for 10,000 images at 256²) go to a temporary folder (``--tmp``) that is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import cv2

from pneumoseg.config import load_config
from pneumoseg.postprocessing.postprocess import Grid, Source, naive_search, search

N_FOLDS = 5


def _blob(rng, size: int, area: float) -> np.ndarray:
    """An irregular blob of roughly ``area`` pixels: a thresholded smooth field inside an ellipse."""
    m = np.zeros((size, size), np.float32)
    r = max(2.0, np.sqrt(area / np.pi))
    a, b = r * rng.uniform(0.6, 1.6), r * rng.uniform(0.6, 1.6)
    cx, cy = rng.uniform(0.15, 0.85, 2) * size
    cv2.ellipse(m, (int(cx), int(cy)), (int(a), int(b)), rng.uniform(0, 180), 0, 360, 1.0, -1)
    field = cv2.resize(rng.random((8, 8)).astype(np.float32), (size, size))
    return ((m * (0.5 + field)) > 0.75).astype(np.uint8)


def make_batch(rng, n: int, size: int):
    probs = np.empty((n, size, size), np.uint8)
    truth = np.zeros((n, size, size), np.uint8)
    cls = np.empty(n, np.float32)
    sigma = size / 128
    for i in range(n):
        pos = rng.random() < 0.22
        if pos:
            for _ in range(rng.integers(1, 3)):
                # areas at 1024²: log-uniform 500 .. 100,000 pixels
                area = np.exp(rng.uniform(np.log(500), np.log(1e5))) * (size / 1024) ** 2
                truth[i] |= _blob(rng, size, area)
        p = cv2.GaussianBlur(truth[i].astype(np.float32), (0, 0), 2 * sigma)
        p *= rng.uniform(0.4, 1.0) if pos else 0.0
        noise = cv2.resize(rng.normal(0, 1, (16, 16)).astype(np.float32), (size, size))
        p += np.clip(noise * 0.08, 0, None)
        if rng.random() < (0.1 if pos else 0.3):  # spurious blob
            area = np.exp(rng.uniform(np.log(100), np.log(2e4))) * (size / 1024) ** 2
            fp = cv2.GaussianBlur(_blob(rng, size, area).astype(np.float32), (0, 0), sigma)
            p += fp * rng.uniform(0.2, 0.9)
        probs[i] = np.round(np.clip(p, 0, 1) * 255)
        cls[i] = np.clip((0.7 if pos else 0.25) + rng.normal(0, 0.2), 0, 1)
    return probs, truth, cls


def write_folds(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    dirs = []
    for k, idx in enumerate(np.array_split(np.arange(n), N_FOLDS)):
        d = folder / f"fold{k}"
        d.mkdir(parents=True)
        pm = np.lib.format.open_memmap(d / "p.npy", "w+", np.uint8, (len(idx), size, size))
        tm = np.lib.format.open_memmap(d / "t.npy", "w+", np.uint8, (len(idx), size, size))
        cls = np.empty(len(idx), np.float32)
        for a in range(0, len(idx), 256):
            b = min(a + 256, len(idx))
            pm[a:b], tm[a:b], cls[a:b] = make_batch(rng, b - a, size)
        pm.flush()
        tm.flush()
        del pm, tm
        np.save(d / "c.npy", cls)
        dirs.append(d)
    return dirs


def load_sources(folder: Path) -> list[Source]:
    return [
        Source(
            np.load(d / "p.npy", mmap_mode="r"),
            np.load(d / "t.npy", mmap_mode="r"),
            np.load(d / "c.npy"),
            d.name,
        )
        for d in sorted(folder.glob("fold*"))
    ]


def grids(gate: bool) -> Grid:
    tune = dict(load_config()["tune"])
    if gate:
        tune["cls_thresholds"] = [0.3, 0.5, 0.7]
    return Grid.from_mapping(tune)


def fast_child(folder: Path, gate: bool, jobs: int | None) -> dict:
    """Runs in its own process: warm-up (numba cache), then the timed full search."""
    srcs = load_sources(folder)
    g = grids(gate)
    t0 = time.perf_counter()
    search([Source(s.probs[:2], s.truth[:2], s.cls[:2], s.name) for s in srcs[:1]], g)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = search(srcs, g, n_jobs=jobs)
    secs = time.perf_counter() - t0
    best = df.loc[df["dice"].idxmax()]
    return {
        "seconds": secs,
        "warmup": warm,
        "combos": len(df),
        "images": int(df["n_images"].iloc[0]),
        "best": f"{best['family']} dice={best['dice']:.4f}",
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="OOF images in all (5 folds)")
    ap.add_argument("--size", type=int, default=256, help="OOF side")
    ap.add_argument("--naive-n", type=int, default=40, help="images the naive loop really runs")
    ap.add_argument("--jobs", type=int, default=None, help="threads of the fast search")
    ap.add_argument("--no-gate", action="store_true", help="no aux-head gate grid")
    ap.add_argument("--tmp", default=None, help="parent folder of the temporary memmaps")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(fast_child(Path(args._child), not args.no_gate, args.jobs)))
        return

    folder = Path(tempfile.mkdtemp(prefix="bench_oof_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        write_folds(folder, args.n, args.size)
        gen = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in folder.rglob("*.npy")) / 1e9
        cmd = [sys.executable, __file__, "--_child", str(folder)]
        cmd += ["--no-gate"] * args.no_gate + (["--jobs", str(args.jobs)] if args.jobs else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)  # nosec B603
        fast = json.loads(out.stdout.strip().splitlines()[-1])

        srcs = load_sources(folder)
        g = grids(not args.no_gate)
        per_fold = max(1, args.naive_n // len(srcs))
        naive_search(srcs[:1], g, limit=1)  # warm-up
        t0 = time.perf_counter()
        nv = naive_search(srcs, g, limit=per_fold)
        naive_secs = time.perf_counter() - t0
        n_naive = int(nv["n_images"].iloc[0])
        sub = search([Source(s.probs[:per_fold], s.truth[:per_fold], s.cls[:per_fold], s.name)
                      for s in srcs], g)  # fmt: skip
        agree = float(np.abs(sub["dice"].to_numpy() - nv["dice"].to_numpy()).max())
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    per_ci = naive_secs / (n_naive * fast["combos"])
    naive_full = per_ci * fast["images"] * fast["combos"]
    speedup = naive_full / fast["seconds"]
    rss_gb = fast["maxrss_kb"] / 1e6
    print(f"OOF: {args.n} images at {args.size}² in {N_FOLDS} folds ({disk:.2f} GB of memmaps, "
          f"generated in {gen:.0f} s); {fast['combos']} settings; cores: {os.cpu_count()}")  # fmt: skip
    print(f"naive loop really run on {n_naive} images × {fast['combos']} settings = "
          f"{naive_secs:.1f} s -> {per_ci * 1e6:.1f} µs per setting·image, extrapolated "
          f"to all {fast['images']} images")  # fmt: skip
    print(f"fast vs naive on those {n_naive} images: max |ΔDice| = {agree:.1e}")
    print()
    print(f"{'':28s} {'seconds':>10s} {'target':>12s}")
    print(f"{'naive (extrapolated)':28s} {naive_full:10.1f}")
    print(f"{'fast (full grid, memmaps)':28s} {fast['seconds']:10.1f} {'≤ 120':>12s}")
    print(f"{'speed-up':28s} {speedup:9.0f}× {'≥ 50×':>12s}")
    print(f"{'peak RSS of the search':28s} {rss_gb:8.2f} GB {'≤ 4 GB':>12s}")
    print(f"(numba warm-up {fast['warmup']:.1f} s, not timed; best: {fast['best']})")
    ok = speedup >= 50 and fast["seconds"] <= 120 * args.n / 10_000 and rss_gb <= 4
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
