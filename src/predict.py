"""Predict with the fold ensemble: a Kaggle submission for the test set, or overlays of single images.

    python src/predict.py --config configs/demo.yaml --submission [--sample sample.csv]
                          [--rle absolute] [--force] [--allow-missing] [section.key=value ...]
    python src/predict.py --config configs/demo.yaml --image x.dcm [--image y.png ...] [--overlay out/]

``--submission``: builds (or reuses) the test cache, loads every model of ``predict.experiments`` ×
``predict.folds``, predicts in batches with the ``predict.tta`` views, resizes the probabilities to
each image's original size, applies ``<train.out_dir>/<exp>/postprocess.yaml`` (written by
``oof_tune.py`` with the same config: for a blend, tuned on the blend's OOF maps; if missing: plain
threshold 0.5, with a warning), RLE-encodes, and writes ``<predict.out_dir>/<exp>.csv`` atomically. With a sample
submission (``--sample``, else ``data.root/data.sample_submission`` when it exists) the file has
exactly the sample's ids in its order; sample ids without an image are an error (``--allow-missing``
or ``predict.allow_missing``: written as -1 with a warning). The written file is then validated;
when the test set has truth (``data.test_rle_csv``, e.g. the synthetic data) it is also scored.

``--image``: reads each DICOM/PNG, predicts, prints ``ImageId,EncodedPixels`` rows (ImageId = file
stem) to stdout and, with ``--overlay DIR``, writes ``DIR/<stem>.png``: the image with the mask,
a box and mean probability per component, and the image-level probability.

An existing submission is never replaced by a worse file: without ``--force`` it is kept; with it,
the new CSV is written to a temporary file, validated, and only then renamed over the old one.

Exit status: 0 ok; 1 ``--image``: some images could not be read (the others are written, the bad
ones listed); 2 a user error (config, data, models, submission), with a message saying what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations loads)
from pneumoseg.cli import add_debug, config_from_args, run, setup_logging
from pneumoseg.errors import DataError, PartialFailure


def get_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--config", default="configs/base.yaml", help="experiment YAML")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--submission", action="store_true", help="predict the test set -> CSV")
    mode.add_argument(
        "--image", action="append", type=Path, help="a DICOM/PNG to predict (repeatable)"
    )
    ap.add_argument("--overlay", type=Path, help="--image: folder for the overlay PNGs")
    ap.add_argument("--sample", type=Path, help="sample submission whose ids the CSV must hold")
    ap.add_argument("--rle", choices=["relative", "absolute"], help="RLE form (predict.rle)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing submission")
    ap.add_argument(
        "--allow-missing",
        action="store_true",
        help="sample ids without an image are written as -1 (predict.allow_missing)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. predict.tta=[hflip]")
    add_debug(ap)
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides
    if args.overlay is not None and not args.image:
        ap.error("--overlay goes with --image")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    from pneumoseg.config import log_config
    from pneumoseg.inference.submit import predict_images, predict_submission

    cfg = config_from_args(args)
    log_config(cfg)
    if args.submission:  # everything it reports is logged as it goes
        predict_submission(cfg, sample=args.sample, force=args.force,
                           allow_missing=args.allow_missing, rle=args.rle, quiet=args.quiet)  # fmt: skip
        return 0
    header = ["ImageId,EncodedPixels"]  # printed once the models are loaded

    def show(result) -> None:
        while header:
            print(header.pop(), flush=True)
        if result.error is None:
            print(result.row, flush=True)

    results = predict_images(cfg, args.image, args.overlay, rle=args.rle, on_result=show)
    bad = [str(r.path) for r in results if r.error is not None]
    if bad and len(bad) == len(results):
        raise DataError(f"none of the {len(results)} image(s) could be read (see above)")
    if bad:
        raise PartialFailure(
            f"{len(bad)} of {len(results)} image(s) could not be read (see above), the other "
            f"{len(results) - len(bad)} were predicted: {', '.join(bad)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
