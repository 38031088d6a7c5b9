"""Preprocessing speed: decoding raw JPEG DICOMs vs random access to the preprocessing cache.

Inputs: the 32 real JPEG-baseline DICOMs in ../shared/data/siim-real (1024², 8-bit), repeated
``--repeat`` times, with their real masks where an RLE exists (empty otherwise). Rows:

* decode + resize, 1 process: ``read_dicom`` + ``cv2.INTER_AREA`` + the mask resize, per core;
* decode + resize, joblib (``--n-jobs``, all cores by default): what ``preprocess.py`` does;
* cache, memmap ``.npy`` (the format ``pneumoseg.data.cache`` uses): random image+mask reads, copied out;
* cache, one PNG per image and mask (the alternative format): random image+mask reads.

Cache reads run with a warm page cache (files just written), which is the steady state of
training (the whole 512² cache, ~6 GB, fits in RAM; DataLoader workers share it).

    python benchmarks/bench_preprocess.py [--size 512] [--repeat 6] [--reads 1000] [--n-jobs -1]

Measured on the 2-core CPU dev box (shared with other jobs, so the joblib row barely scales):

    size 512², 192 images (32 real DICOMs × 6), 1000 random cache reads, 2 CPU(s)
    step                                          ms/img      img/s  img/s/core
    decode DICOM + resize, 1 process              11.238         89          89
    decode DICOM + resize, joblib ×2              13.406         75          37
    cache: memmap .npy, random image+mask          0.030      33858       33858
    cache: PNG files, random image+mask            2.828        354         354
    memmap / PNG read speed-up: 96×

(at 256²: decode 11.2 ms, memmap 0.008 ms, PNG 0.78 ms.) The cache therefore uses memmaps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pneumoseg.data.intake import read_dicom
from pneumoseg.data.resize import resize_image, resize_mask
from pneumoseg.data.rle import read_rle_csv, union_mask

REAL = Path(
    os.environ.get(
        "PNEUMOSEG_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/siim-real"
    )
)


def real_inputs() -> list[tuple[Path, list[str]]]:
    truth: dict[str, list[str]] = {}
    for csv in REAL.rglob("*.csv"):
        if csv.name.startswith(("train-rle", "test-rle")):
            truth.update(read_rle_csv(csv))
    files = sorted(REAL.rglob("*.dcm"))
    if not files:
        sys.exit(f"no DICOMs found under {REAL} (set PNEUMOSEG_REAL_DATA)")
    return [(f, truth.get(f.stem, [])) for f in files]


def decode_one(path: Path, rles: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    img, tags = read_dicom(path)
    mask = union_mask(rles, (tags["Rows"], tags["Columns"]))
    return resize_image(img, size), resize_mask(mask, size)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="cache side length")
    ap.add_argument("--repeat", type=int, default=6, help="times the 32 DICOMs are repeated")
    ap.add_argument("--reads", type=int, default=1000, help="random cache reads per format")
    ap.add_argument("--n-jobs", type=int, default=-1, help="joblib workers for the parallel row")
    args = ap.parse_args()

    from joblib import Parallel, delayed, effective_n_jobs

    items = real_inputs() * args.repeat
    n, size = len(items), args.size
    decode_one(*items[0], size)  # warm-up: imports, numba, the JPEG plug-in

    rows = []
    t1, out = timed(lambda: [decode_one(p, r, size) for p, r in items])
    rows.append(("decode DICOM + resize, 1 process", t1, n, 1))
    workers = effective_n_jobs(args.n_jobs)
    Parallel(n_jobs=workers)(delayed(decode_one)(*items[0], size) for _ in range(workers))
    tp, _ = timed(
        lambda: Parallel(n_jobs=workers)(delayed(decode_one)(p, r, size) for p, r in items)
    )
    rows.append((f"decode DICOM + resize, joblib ×{workers}", tp, n, workers))

    rng = np.random.default_rng(0)
    order = rng.integers(0, n, args.reads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        imgs = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
        for i, (img, mask) in enumerate(out):
            imgs[i], masks[i] = img, mask
            cv2.imwrite(str(tmp / f"{i}.png"), img)
            cv2.imwrite(str(tmp / f"{i}_mask.png"), mask)
        imgs.flush(), masks.flush()
        del imgs, masks
        mm_i = np.load(tmp / "images.npy", mmap_mode="r")
        mm_m = np.load(tmp / "masks.npy", mmap_mode="r")

        def read_mm():
            for i in order:
                np.array(mm_i[i]), np.array(mm_m[i])

        def read_png():
            for i in order:
                cv2.imread(str(tmp / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
                cv2.imread(str(tmp / f"{i}_mask.png"), cv2.IMREAD_GRAYSCALE)

        read_mm(), read_png()  # warm the page cache
        tm, _ = timed(read_mm)
        tg, _ = timed(read_png)
        png_mb = sum(f.stat().st_size for f in tmp.glob("*.png")) / 2**20
        npy_mb = 2 * n * size * size / 2**20
    rows.append(("cache: memmap .npy, random image+mask", tm, args.reads, 1))
    rows.append(("cache: PNG files, random image+mask", tg, args.reads, 1))

    print(
        f"size {size}², {n} images ({len(items) // args.repeat} real DICOMs × {args.repeat}), "
        f"{args.reads} random cache reads, {os.cpu_count()} CPU(s)"
    )
    print(f"{'step':42s} {'ms/img':>9s} {'img/s':>10s} {'img/s/core':>11s}")
    for name, t, count, cores in rows:
        print(f"{name:42s} {1e3 * t / count:9.3f} {count / t:10.0f} {count / t / cores:11.0f}")
    print(
        f"memmap / PNG read speed-up: {tg / tm:.0f}×; disk for {n} image+mask pairs: "
        f".npy {npy_mb:.0f} MiB (masks sparse on disk), PNG {png_mb:.0f} MiB"
    )


if __name__ == "__main__":
    main()
