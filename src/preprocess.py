"""Build the manifest and the preprocessing cache -> ``<cache.dir>/<dataset>_<split>_<size>/``.

    python src/preprocess.py [--config configs/x.yaml] [--split train|test|all] [--force]
                             [section.key=value ...]        e.g. cache.size=256 cache.n_jobs=8

Every image is decoded once, resized to ``cache.size`` and stored in memmapped ``.npy`` arrays
next to the manifest (see ``pneumoseg.data.cache``). Re-running skips finished work; an interrupted run
resumes; a cache built from another manifest or size is rebuilt (``cache.rebuild_on_change``).
Exit status: 0 ok (images that failed to decode are listed in a warning, left out of training and
prediction, and retried by every rerun); 2 a user error (bad config, data, cache, disk full; in
``data.strict`` mode also any failed image), with a message saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pneumoseg.cli import config_from_args, make_parser, run, setup_logging

log = logging.getLogger("preprocess")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "cache.size=256")
    ap.add_argument("--split", choices=["train", "test", "all"], default="train")
    ap.add_argument("--force", action="store_true", help="rebuild the cache from scratch")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.data.cache import build_cache

    cfg = config_from_args(args)
    splits = ["train", "test"] if args.split == "all" else [args.split]
    for split in splits:
        t0 = time.perf_counter()
        cache = build_cache(cfg, split, force=args.force)
        s = cache.last_build
        log.info(
            "%s split: %s (%d images at %d², %d processed, %d already done, %d failed) in %.1f s",
            split,
            cache.path,
            cache.n,
            cache.size,
            s.get("processed", 0),
            s.get("skipped", 0),
            s.get("failed", 0),
            time.perf_counter() - t0,
        )
        failed = cache.failed_ids
        if failed:
            # Non-strict (strict mode raised already): the cache is usable, training and
            # prediction leave these images out. Every rerun retries them.
            log.warning(
                "%s split: %d image(s) failed to decode and are left out of training and "
                "prediction (fix them and rerun to include them): %s",
                split, len(failed), ", ".join(failed),
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
