"""Check a Kaggle submission before uploading it.

    python src/validate_submission.py submissions/demo.csv --sample stage_2_sample_submission.csv
                                      [--shape 1024 | --shape 1024x1024] [--rle absolute]

Checks the header (exactly ``ImageId,EncodedPixels``), row format, duplicate and empty ids, ids
missing from or not in the sample submission, that every RLE decodes inside the image, and that
empty masks are written ``-1``. Prints the problems and exits 1 if there are any; otherwise prints
a one-line summary and exits 0. A submission or sample that cannot be read at all (missing, a
folder, not text) is a user error: one message, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumoseg.cli import add_debug, run


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be N or HxW, got {text!r}") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"shape must be N or HxW, got {text!r}")
    return dims[0], dims[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("submission", type=Path)
    ap.add_argument("--sample", type=Path, help="sample submission: the ids expected")
    ap.add_argument("--shape", type=_shape, default=(1024, 1024), help="image size (1024)")
    ap.add_argument("--rle", choices=["relative", "absolute"], default="relative")
    add_debug(ap)
    args = ap.parse_args(argv)

    from pneumoseg.inference.submission import validate_submission_file

    check = validate_submission_file(
        args.submission, args.sample, args.shape, relative=args.rle == "relative"
    )
    if not check.valid:
        print(f"{args.submission}: INVALID, {len(check.problems)} kind(s) of problem:")
        for p in check.problems:
            print(f"  - {p}")
        return 1
    against = f", matches {args.sample}" if args.sample else ""
    print(
        f"OK {args.submission}: {check.rows} rows, {check.positive} positive, "
        f"{args.rle} RLE at {args.shape[0]}x{args.shape[1]}{against}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
