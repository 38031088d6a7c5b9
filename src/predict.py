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
import contextlib
import logging
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pneumoseg  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations loads)
from pneumoseg.cli import add_debug, config_from_args, run, setup_logging
from pneumoseg.errors import (
    DataError,
    MissingFileError,
    OutputExistsError,
    PartialFailure,
    SubmissionError,
    UserError,
)
from pneumoseg.inference.predictor import Predictor
from pneumoseg.locks import exclusive, lock_file_for
from pneumoseg.safe_text import safe_id

log = logging.getLogger("pneumoseg.predict")


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


# ==================================================================================================
# shared pieces
# ==================================================================================================


def find_sample(cfg: dict, given: Path | None) -> Path | None:
    if given is not None:
        if given.is_dir():
            raise SubmissionError(f"--sample {given} is a folder, expected the sample CSV")
        if not given.is_file():
            raise MissingFileError(f"--sample {given}: no such file")
        return given
    name = cfg["data"].get("sample_submission")
    if name:
        path = Path(str(cfg["data"]["root"])) / str(name)
        if path.is_file():
            return path
        log.info("no sample submission at %s: one row per test image", path)
    return None


# ==================================================================================================
# --submission
# ==================================================================================================
def submission_path(cfg: dict) -> Path:
    return Path(str(cfg["predict"]["out_dir"])) / f"{cfg['exp']}.csv"


def run_submission(cfg: dict, args) -> Path:
    import numpy as np
    from tqdm.auto import tqdm

    from pneumoseg.data.cache import FAILED, build_cache
    from pneumoseg.inference.submission import publish_submission, read_sample_ids, score_submission

    out = submission_path(cfg)
    if out.exists() and not args.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it (after validation)")
    relative = (args.rle or cfg["predict"]["rle"]) == "relative"
    allow_missing = bool(args.allow_missing or cfg["predict"]["allow_missing"])

    # models and tuning first: a stale tuning or a broken model is refused before the test cache
    # (minutes on the real test set) is built
    predictor = Predictor(cfg, relative)
    cache = build_cache(cfg, "test")
    man = cache.manifest
    ok = cache.done != FAILED
    if not ok.all():
        log.warning("%d test image(s) failed to decode: %s", int((~ok).sum()), cache.failed_ids[:5])
    index = {i: k for k, i in enumerate(man["id"].astype(str)) if ok[k]}
    sizes = {str(r.id): (int(r.height), int(r.width)) for r in man.itertuples()}

    sample = find_sample(cfg, args.sample)
    if sample is not None:
        ids = read_sample_ids(sample)
        if not ids:
            raise SubmissionError(
                f"sample submission {sample} lists no ImageId: nothing to predict"
            )
        missing = [i for i in ids if i not in index]
        extra = sorted(set(index) - set(ids))
        if extra:
            log.warning(
                "%d test image(s) not in %s left out, e.g. %s", len(extra), sample, extra[:5]
            )
        if missing:
            text = (
                f"{len(missing)} of {len(ids)} id(s) of {sample} have no (readable) test image, "
                f"e.g. {', '.join(missing[:10])}"
            )
            if not allow_missing:
                raise DataError(
                    f"{text}. Point data.root/data.test_images at the full test set, or pass "
                    "--allow-missing to write them as -1"
                )
            log.warning("%s: written as -1 (--allow-missing)", text)
        log.info("sample submission %s: %d id(s)", sample, len(ids))
    else:
        ids, missing = list(index), []
    todo = [i for i in ids if i in index]

    rles: dict[str, str] = {}
    pending: deque = deque()
    n_pos = 0
    bs = predictor.batch_size
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        tqdm(total=len(todo), desc="predict", unit="img", disable=args.quiet or None) as bar,
    ):
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            rows = np.array([index[i] for i in chunk])
            order = np.argsort(rows)  # memmap reads in file order
            images = np.empty((len(chunk), cache.size, cache.size), dtype=np.uint8)
            images[order] = cache.images[rows[order]]
            probs, cls = predictor.probs(images, [sizes[i] for i in chunk])
            for j, image_id in enumerate(chunk):
                c = None if cls is None else float(cls[j])
                pending.append((image_id, pool.submit(predictor.finish, probs[j], c)))
            while len(pending) > 2 * bs:  # bounded memory: post-process while predicting
                image_id, fut = pending.popleft()
                rles[image_id] = fut.result()[1]
            bar.update(len(chunk))
        for image_id, fut in pending:
            rles[image_id] = fut.result()[1]
    n_pos = sum(r != "-1" for r in rles.values())
    log.info("%d/%d image(s) predicted positive", n_pos, len(rles))

    rows = [(i, rles.get(i, "-1")) for i in ids]
    publish_submission(rows, out, ids if sample is not None else None, sizes, relative)
    log.info("%s: %d row(s), valid%s", out, len(ids), f" against {sample}" if sample else "")

    truth = cfg["data"].get("test_rle_csv")
    truth_path = Path(str(cfg["data"]["root"])) / str(truth) if truth else None
    if truth_path is not None and truth_path.is_file() and relative:
        if missing:
            log.warning("not scoring: %d sample id(s) had no image", len(missing))
        else:
            s = score_submission(out, truth_path, sizes, relative)
            log.info(
                "score against %s: mean Dice %.4f, positive Dice %.4f (%d images, %d positive, "
                "%d predicted positive)",
                truth_path,
                s["dice"],
                s["pos_dice"],
                s["n"],
                s["n_pos"],
                s["n_pred_pos"],
            )
    return out


# ==================================================================================================
# --image
# ==================================================================================================
def run_images(cfg: dict, args) -> list[tuple[str, str]]:
    """Predict each ``--image``; unreadable ones are listed at the end (the others are written)."""
    from pneumoseg.io import read_image
    from pneumoseg.visualize import overlay, save_rgb

    relative = (args.rle or cfg["predict"]["rle"]) == "relative"
    predictor = Predictor(cfg, relative)
    out_rows: list[tuple[str, str]] = []
    bad: list[str] = []
    print("ImageId,EncodedPixels", flush=True)
    paths = list(args.image)
    for start in range(0, len(paths), predictor.batch_size):
        chunk, originals = [], []
        for path in paths[start : start + predictor.batch_size]:
            try:
                originals.append(read_image(path))
                chunk.append(path)
            except UserError as e:
                log.error("%s", e)
                bad.append(str(path))
        if not chunk:
            continue
        probs, cls = predictor.probs_of(originals)
        for j, path in enumerate(chunk):
            c = None if cls is None else float(cls[j])
            mask, rle = predictor.finish(probs[j], c)
            # a file name is anyone's text: a UID or plain stem is kept, anything else hashed
            # (pneumoseg.safe_text), so the CSV row and the overlay's name are always safe
            image_id = safe_id(path.stem, f"image-{start + j}")
            print(csv_row_plain(image_id, rle), flush=True)
            out_rows.append((image_id, rle))
            if args.overlay is not None:
                prob = float(probs[j].max()) if c is None else c
                pic = overlay(originals[j], probs[j], mask, title=image_id, image_prob=prob)
                dest = save_rgb(pic, args.overlay / f"{image_id}.png")
                log.info("%s: %d positive pixel(s), p=%.3f -> %s", path, mask.sum(), prob, dest)
    if bad and not out_rows:
        raise DataError(f"none of the {len(paths)} image(s) could be read (see above)")
    if bad:
        raise PartialFailure(
            f"{len(bad)} of {len(paths)} image(s) could not be read (see above), the other "
            f"{len(out_rows)} were predicted: {', '.join(bad)}"
        )
    return out_rows


def csv_row_plain(image_id: str, rle: str) -> str:
    """``ImageId,EncodedPixels`` as the csv module writes it (quoted where needed)."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow((image_id, rle))
    return buf.getvalue()


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    from pneumoseg.config import log_config

    cfg = config_from_args(args)
    log_config(cfg)
    # one writer per output: a second predict.py on the same submission (or overlay folder) is
    # refused while the first runs
    out = submission_path(cfg) if args.submission else args.overlay
    what = f"submission {out}" if args.submission else f"overlay folder {out}"
    with exclusive(lock_file_for(out), what) if out is not None else contextlib.nullcontext():
        if args.submission:
            run_submission(cfg, args)
        else:
            run_images(cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
