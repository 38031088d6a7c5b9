"""RLE encode/decode speed: pneumoseg's numba codec against the usual alternatives.

Masks: every real RLE row in ../shared/data/siim-real decoded to 1024² (realistic pneumothorax
shapes), an empty mask, and two large synthetic ones (a lung-sized ellipse, and a ragged mask with
thousands of runs). Baselines, all with the same semantics (relative, column-major):

* encode (a): a straightforward pure-Python double loop over the pixels;
* encode (b): the usual numpy ``diff``/``where`` version (Fortran-order flatten);
* decode: parse the tokens in Python and fill each run with a numpy slice (the competition's own
  ``rle2mask``).

Targets (issue 2): encode ≥ 500× the Python loop and ≥ 3× numpy; decode ≥ 3× the slice decoder.
Ratios are computed per mask from the medians of repeated runs, all in this one process.

Each mask is also encoded **Fortran-ordered** (``np.asfortranarray``, the layout of a mask decoded
the competition's way, ``flat.reshape(w, h).T``): "F ms" is our encoder on it, "F/C" its cost
relative to the C-ordered mask (target: about the same, geo-mean of C/F speed ≥ 0.5), "copy" the
old path (copy to C order, then encode), and the F×py / F×np columns the baselines on the same
Fortran-ordered array.

    python benchmarks/bench_rle.py [--repeats 30] [--python-repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pneumoseg.data.rle import read_rle_csv, rle_decode, rle_encode, union_mask

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "siim-real"
SHAPE = (1024, 1024)


# ------------------------------------------------------------------------------ baselines
def encode_python(mask: np.ndarray) -> str:
    """Pure-Python double loop over the pixels, column-major, relative starts."""
    rows = mask.tolist()
    height, width = len(rows), len(rows[0])
    out = []
    prev_end = 0
    run_start = -1
    pos = 0
    for c in range(width):
        for r in range(height):
            if rows[r][c]:
                if run_start < 0:
                    run_start = pos
            elif run_start >= 0:
                out += [run_start - prev_end, pos - run_start]
                prev_end = pos
                run_start = -1
            pos += 1
    if run_start >= 0:
        out += [run_start - prev_end, pos - run_start]
    return " ".join(map(str, out)) if out else "-1"


def encode_numpy(mask: np.ndarray) -> str:
    """The common numpy version: Fortran flatten, pad, diff, where."""
    pixels = np.concatenate([[0], mask.flatten(order="F") != 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(pixels[1:] != pixels[:-1])
    if edges.size == 0:
        return "-1"
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    rel = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(map(str, np.column_stack([rel, lengths]).ravel().tolist()))


def decode_slices(rle: str, shape=SHAPE) -> np.ndarray:
    """The competition's rle2mask: Python token parsing + one numpy slice per run."""
    height, width = shape
    mask = np.zeros(height * width, dtype=np.uint8)
    if rle.strip() != "-1":
        array = [int(x) for x in rle.split()]
        pos = 0
        for start, length in zip(array[0::2], array[1::2], strict=True):
            pos += start
            mask[pos : pos + length] = 1
            pos += length
    return mask.reshape(width, height).T


# ------------------------------------------------------------------------------ masks
def load_masks() -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}
    csvs = [
        REAL / "sample_images" / "train-rle-sample.csv",
        REAL / "train_extract" / "train-rle-extract.csv",
    ]
    for path in csvs:
        if not path.exists():
            continue
        for image_id, rles in read_rle_csv(path).items():
            if rles:
                masks[f"real {image_id.split('.')[-3]}"] = union_mask(rles)
    if not masks:
        print(f"(real RLE files not found under {REAL}: realistic masks skipped)")
    masks["empty"] = np.zeros(SHAPE, np.uint8)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    masks["large ellipse"] = (((yy - 500) / 380) ** 2 + ((xx - 300) / 200) ** 2 < 1).astype(
        np.uint8
    )
    rng = np.random.default_rng(0)
    ragged = masks["large ellipse"].copy()
    ragged[rng.random(SHAPE) < 0.02] ^= 1  # thousands of short runs
    masks["ragged (many runs)"] = ragged
    return masks


def timed(fn, arg, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--python-repeats", type=int, default=1)
    args = ap.parse_args(argv)

    masks = load_masks()
    # Warm up (numba loads its cached machine code on first call) and check agreement.
    for m in masks.values():
        rle = rle_encode(m)
        assert rle == encode_numpy(m) == encode_python(m), "encoders disagree"
        assert rle_encode(np.asfortranarray(m)) == rle, "C and Fortran order disagree"
        assert rle_encode(m, False) == rle_encode(np.asfortranarray(m), False), "absolute C != F"
        assert np.array_equal(rle_decode(rle), decode_slices(rle)), "decoders disagree"

    def copy_then_encode(m):  # what a Fortran-ordered mask cost before its linear path
        return rle_encode(np.ascontiguousarray(m))

    print(
        f"{'mask':24s} {'px':>7s} {'runs':>5s} | {'encode ms':>9s} {'python':>8s} {'numpy':>7s} "
        f"{'×py':>6s} {'×np':>5s} | {'F ms':>7s} {'F/C':>5s} {'copy':>6s} {'F×py':>6s} "
        f"{'F×np':>5s} | {'decode ms':>9s} {'slices':>7s} {'×':>5s}"
    )
    enc_py, enc_np, dec, dec_real = [], [], [], []
    f_py, f_np, f_c, f_copy = [], [], [], []
    for name, m in masks.items():
        rle = rle_encode(m)
        mf = np.asfortranarray(m)
        t_enc = timed(rle_encode, m, args.repeats)
        t_py = timed(encode_python, m, args.python_repeats)
        t_np = timed(encode_numpy, m, args.repeats)
        t_f = timed(rle_encode, mf, args.repeats)
        t_copy = timed(copy_then_encode, mf, args.repeats)
        t_fpy = timed(encode_python, mf, args.python_repeats)
        t_fnp = timed(encode_numpy, mf, args.repeats)
        t_dec = timed(rle_decode, rle, args.repeats)
        t_sl = timed(decode_slices, rle, args.repeats)
        runs = 0 if rle == "-1" else len(rle.split()) // 2
        enc_py.append(t_py / t_enc)
        enc_np.append(t_np / t_enc)
        f_py.append(t_fpy / t_f)
        f_np.append(t_fnp / t_f)
        f_c.append(t_enc / t_f)
        f_copy.append(t_copy / t_f)
        dec.append(t_sl / t_dec)
        if name.startswith("real"):
            dec_real.append(dec[-1])
        print(
            f"{name:24s} {int(m.sum()):7d} {runs:5d} | {t_enc * 1e3:9.3f} {t_py * 1e3:8.1f} "
            f"{t_np * 1e3:7.3f} {enc_py[-1]:6.0f} {enc_np[-1]:5.1f} | {t_f * 1e3:7.3f} "
            f"{t_f / t_enc:5.2f} {t_copy * 1e3:6.3f} {f_py[-1]:6.0f} {f_np[-1]:5.1f} | "
            f"{t_dec * 1e3:9.3f} {t_sl * 1e3:7.3f} {dec[-1]:5.1f}"
        )

    def gmean(x):
        return float(np.exp(np.mean(np.log(x))))

    rows = [
        ("encode vs pure-Python loop", enc_py, 500),
        ("encode vs numpy diff", enc_np, 3),
        ("encode F-order vs Python loop", f_py, 500),
        ("encode F-order vs numpy diff", f_np, 3),
        ("encode F-order vs ours C-order", f_c, 0.5),
        ("encode F-order vs copy + encode", f_copy, 1),
        ("decode vs token/slice decoder", dec, 3),
    ]
    if dec_real:
        rows.append(("  (decode, real masks only)", dec_real, 3))
    print()
    print(f"{'speed-up':32s} {'geo-mean':>9s} {'min':>7s} {'target':>7s}")
    ok = True
    for label, ratios, target in rows:
        passed = gmean(ratios) >= target
        ok &= passed
        print(
            f"{label:32s} {gmean(ratios):8.2f}× {min(ratios):6.2f}× {target:6g}×  "
            f"{'PASS' if passed else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
