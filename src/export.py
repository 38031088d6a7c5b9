"""Export the experiment's fold models to ONNX, each checked against torch before it is kept.

    python src/export.py --config configs/demo.yaml [--force] [section.key=value ...]

Every fold model of each experiment the config predicts (``predict.experiments``, else the
selection's ``ensemble.yaml``, else ``exp``) -> ``runs/<exp>/export/fold<k>.onnx`` and a
``manifest.json`` (family, input, normalisation, TTA, post-processing, a SHA-256 digest of
each source ``model.pt``). An export is kept only if ONNX Runtime matches torch fp32 within max
|Δp| 1e-4 on cached training images of the experiment. For each runtime in ``export.int8`` (both by
default; ``export.int8=[]`` for fp32 alone, in seconds) an int8 model is calibrated on the cached
images and kept only if its masks agree with fp32 (Dice >= 0.99); every runtime x precision this CPU
offers is timed and checked, and ``predict.backend: auto`` then picks the fastest that passed.
A family that cannot be exported is refused by name. ``--update`` exports only what is missing or
stale (or has no int8 model that ``export.int8`` now asks for).
Exit status: 0 ok; 2 a user error, with a message saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pneumoseg.cli import config_from_args, make_parser, run, setup_logging

log = logging.getLogger("export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__, "predict.folds=[0,1]")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="replace an existing export")
    mode.add_argument(
        "--update",
        action="store_true",
        help="export only what has no up-to-date export (make serve uses it)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.inference.export import export_experiments

    cfg = config_from_args(args)
    for result in export_experiments(cfg, force=args.force, update=args.update):
        log.info("%s: %d model file(s) in %s (max |Δp| vs torch fp32 %.2g)", result.exp,
                 len(result.files), result.folder, result.max_dp)  # fmt: skip
        for row in result.manifest["runtimes"]["measured"]:
            log.info("  %-11s %-4s %-13s %-15s %s", row["runtime"], row["precision"],
                     row.get("layout", ""),
                     f"{row['s_per_image']:.4f} s/image" if "s_per_image" in row else "-",
                     "ok" if row["passed"] else f"failed its check {row.get('why', '')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
