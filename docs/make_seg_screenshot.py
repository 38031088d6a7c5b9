"""Regenerate docs/dicom_seg_overlay.png: a DICOM SEG written over the real SIIM train file …301…
with its ground-truth mask (train-rle-extract.csv), read back from the SEG file and drawn.

    python docs/make_seg_screenshot.py [--real ../shared/data/siim-real] [--out docs/dicom_seg_overlay.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pneumoseg.data.rle import read_rle_csv, union_mask  # noqa: E402
from pneumoseg.inference.dicom_seg import SegAlgorithm, render_seg_overlay, write_seg  # noqa: E402

ID_301 = "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "siim-real")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "dicom_seg_overlay.png")
    args = ap.parse_args()
    folder = args.real / "train_extract"
    mask = union_mask(read_rle_csv(folder / "train-rle-extract.csv")[ID_301], (1024, 1024))
    algo = SegAlgorithm("ground truth", "none", "none", "none")
    with tempfile.TemporaryDirectory() as tmp:
        seg = write_seg(folder / f"{ID_301}.dcm", mask, Path(tmp) / "301.seg.dcm", algo)
        render_seg_overlay(seg, folder / f"{ID_301}.dcm", args.out, width=512)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
