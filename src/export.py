"""Export the experiment's fold models to ONNX, each checked against torch before it is kept.

    python src/export.py --config configs/demo.yaml [--force] [section.key=value ...]

Every fold model of each experiment the config predicts (``predict.experiments``, else the
selection's ``ensemble.yaml``, else ``exp``) -> ``runs/<exp>/export/fold<k>.onnx`` and a
``manifest.json`` (family, input, normalisation, TTA, post-processing, a SHA-256 digest of
each source ``model.pt``). An export is kept only if ONNX Runtime matches torch fp32 within max |Δp| 1e-4 on
cached training images of the experiment. A family that cannot be exported is refused by name.
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
    ap.add_argument("--force", action="store_true", help="replace an existing export")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from pneumoseg.inference.export import export_experiments

    for result in export_experiments(config_from_args(args), force=args.force):
        log.info("%s: %d ONNX model(s) in %s (max |Δp| vs torch fp32 %.2g)", result.exp,
                 len(result.files), result.folder, result.max_dp)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
