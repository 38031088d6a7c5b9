"""Write the built-in synthetic SIIM-format data set (Kaggle layout + optional vbookshelf PNGs).

    python src/make_synthetic.py --out data/synthetic --n-train 300 --n-test 60 --size 256

Same ``--seed`` → byte-identical files. Refuses a non-empty ``--out`` unless ``--force``.
"""

import argparse
import logging
import os
import sys
import time

import pneumoseg  # noqa: F401  (first: sets up the environment; src/ is on sys.path)
from pneumoseg.cli import add_debug, run
from pneumoseg.data.synthetic import write_dataset

log = logging.getLogger("make_synthetic")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (e.g. data/synthetic)")
    p.add_argument("--n-train", type=int, default=300, help="train images (default 300)")
    p.add_argument("--n-test", type=int, default=60, help="test images (default 60)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--positive-rate", type=float, default=0.22, help="share of positive images (default 0.22)"
    )
    p.add_argument(
        "--jpeg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="JPEG-baseline DICOMs like the real data (default); --no-jpeg: uncompressed",
    )
    p.add_argument(
        "--png",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the vbookshelf PNG layout (default on)",
    )
    p.add_argument("--force", action="store_true", help="rebuild a non-empty --out")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="parallel processes; 0 = auto: 1 up to 256 px (process start-up costs more than it\n"
        "saves), else min(4, CPUs). The files do not depend on it.",
    )
    add_debug(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    workers = args.workers or (1 if args.size <= 256 else min(4, os.cpu_count() or 1))
    t0 = time.perf_counter()
    summary = write_dataset(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        size=args.size,
        seed=args.seed,
        positive_rate=args.positive_rate,
        jpeg=args.jpeg,
        png=args.png,
        force=args.force,
        workers=workers,
    )
    dt = time.perf_counter() - t0
    for split in ("train", "test"):
        s = summary[split]
        log.info(
            "%s: %d images (%d positive, %d instances), %d patients",
            split,
            s["images"],
            s["positive"],
            s["instances"],
            s["patients"],
        )
    log.info("wrote %s (%dx%d, seed %d) in %.1f s", args.out, args.size, args.size, args.seed, dt)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
