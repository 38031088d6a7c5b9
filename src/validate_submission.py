"""Check a Kaggle submission before uploading it.

    python src/validate_submission.py submissions/demo.csv --sample stage_2_sample_submission.csv
                                      [--shape 1024 | --shape 1024x1024] [--rle absolute]

Checks the header (exactly ``ImageId,EncodedPixels``), row format, duplicate and empty ids, ids
missing from or not in the sample submission, that every RLE decodes inside the image, and that
empty masks are written ``-1``. Prints the problems and exits 1 if there are any; otherwise prints
a one-line summary and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    args = ap.parse_args(argv)

    from pneumoseg.rle import EMPTY
    from pneumoseg.submission import read_sample_ids, validate_submission

    if args.sample is not None and not args.sample.is_file():
        print(f"sample submission not found: {args.sample}", file=sys.stderr)
        return 1
    problems = validate_submission(
        args.submission, args.sample, args.shape, relative=args.rle == "relative"
    )
    if problems:
        print(f"{args.submission}: INVALID, {len(problems)} kind(s) of problem:")
        for p in problems:
            print(f"  - {p}")
        return 1
    rows = read_sample_ids(args.submission)
    with args.submission.open(encoding="utf-8") as fh:
        n_pos = sum(1 for line in fh.readlines()[1:] if line.rstrip("\n").split(",")[1] != EMPTY)
    against = f", matches {args.sample}" if args.sample else ""
    print(
        f"OK {args.submission}: {len(rows)} rows, {n_pos} positive, "
        f"{args.rle} RLE at {args.shape[0]}x{args.shape[1]}{against}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
