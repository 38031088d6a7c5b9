"""Predict with the fold ensemble: a Kaggle submission for the test set, or single images.

    python src/predict.py --config configs/demo.yaml --submission [--sample sample.csv]
                          [--rle absolute] [--force] [--allow-missing] [section.key=value ...]
    python src/predict.py --config configs/demo.yaml --image x.dcm [--image y.png ...] [--overlay out/]
    ... [--dicom-seg out/ [--seg-fractional] [--seg-skip-empty]]   (either mode)

``--submission``: the test set -> ``<predict.out_dir>/<exp>.csv`` (the sample's ids in its order,
validated, scored when the test set has truth); ``--image``: each DICOM/PNG/JPEG (type read from
the content) -> an ``ImageId,EncodedPixels`` row on stdout and, with ``--overlay``, an overlay PNG;
``--dicom-seg``: one DICOM SEG per DICOM input. Nothing existing is replaced without ``--force``
(and then only by a validated file). README "Prediction and submission" and "DICOM in and out"
say the rest. Exit status: 0 ok; 1 some images could not be read or given a SEG (the others are
written, the bad ones listed); 2 a user error, with a message saying what to do.
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
    # fmt: off
    ap.add_argument("--config", default="configs/base.yaml", help="experiment YAML")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--submission", action="store_true", help="predict the test set -> CSV")
    mode.add_argument("--image", action="append", type=Path,
                      help="a DICOM/PNG/JPEG to predict (repeatable)")
    ap.add_argument("--overlay", type=Path, help="--image: folder for the overlay PNGs")
    ap.add_argument("--dicom-seg", type=Path, metavar="DIR",
                    help="also write one DICOM SEG per DICOM input to DIR (<id>.seg.dcm)")
    ap.add_argument("--seg-fractional", action="store_true",
                    help="--dicom-seg: store the probability map (FRACTIONAL), not the mask")
    ap.add_argument("--seg-skip-empty", action="store_true",
                    help="--dicom-seg: no SEG for an empty prediction (default: an empty segment)")
    ap.add_argument("--sample", type=Path, help="sample submission whose ids the CSV must hold")
    ap.add_argument("--rle", choices=["relative", "absolute"], help="RLE form (predict.rle)")
    ap.add_argument("--force", action="store_true",
                    help="replace an existing submission / existing SEGs (after validation)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="sample ids without an image are written as -1 (predict.allow_missing)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. predict.tta=[hflip]")
    # fmt: on
    add_debug(ap)
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides
    if args.overlay is not None and not args.image:
        ap.error("--overlay goes with --image")
    if (args.seg_fractional or args.seg_skip_empty) and args.dicom_seg is None:
        ap.error("--seg-fractional and --seg-skip-empty go with --dicom-seg DIR")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    from pneumoseg.config import log_config
    from pneumoseg.inference.seg_outputs import SegOptions
    from pneumoseg.inference.submit import predict_images, predict_submission

    cfg = config_from_args(args)
    log_config(cfg)
    seg = None if args.dicom_seg is None else SegOptions(
        args.dicom_seg, args.seg_fractional, args.seg_skip_empty, args.force)  # fmt: skip
    if args.submission:  # everything it reports is logged as it goes
        done = predict_submission(cfg, sample=args.sample, force=args.force,
                                  allow_missing=args.allow_missing, rle=args.rle,
                                  quiet=args.quiet, dicom_seg=seg)  # fmt: skip
        if done.seg_failed:
            raise PartialFailure(f"the submission was written, but {len(done.seg_failed)} DICOM "
                                 "SEG(s) could not be (see above)")  # fmt: skip
        return 0
    header = ["ImageId,EncodedPixels"]  # printed once the models are loaded

    def show(result) -> None:
        while header:
            print(header.pop(), flush=True)
        if result.error is None:
            print(result.row, flush=True)

    results = predict_images(cfg, args.image, args.overlay, rle=args.rle, on_result=show,
                             dicom_seg=seg)  # fmt: skip
    bad = [str(r.path) for r in results if r.error is not None or r.seg_error is not None]
    if bad and len(bad) == len(results):
        raise DataError(f"none of the {len(results)} image(s) could be read (see above)")
    if bad:
        raise PartialFailure(
            f"{len(bad)} of {len(results)} image(s) could not be read or given a SEG (see above), "
            f"the other {len(results) - len(bad)} were predicted: {', '.join(bad)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
