"""Predicting with the fold ensemble as library calls: a Kaggle submission for the test set
(:func:`predict_submission`) or single DICOM/PNG images (:func:`predict_images`).

``src/predict.py`` is these two calls behind its argument parsing. Both predict through
:class:`~pneumoseg.inference.predictor.Predictor` (every model of ``predict.experiments`` ×
``predict.folds``, the ``predict.tta`` views, the tuned ``postprocess.yaml``), both refuse to run
while another process writes the same output (a lock beside it), and both log what they do
(logger ``pneumoseg.predict``) and return what they made.

    from pneumoseg.config import load_config
    from pneumoseg.inference.submit import predict_images, predict_submission

    cfg = load_config("configs/demo.yaml")
    result = predict_submission(cfg)  # <predict.out_dir>/<exp>.csv, validated, scored
    print(result.path, result.rows, result.positive, result.score)
    for r in predict_images(cfg, ["x.dcm"], overlay_dir="overlays"):
        print(r.row if r.error is None else r.error)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.errors import (
    ConfigError,
    DataError,
    MissingFileError,
    OutputExistsError,
    SubmissionError,
    UserError,
)
from pneumoseg.inference.predictor import Predictor
from pneumoseg.inference.seg_outputs import SegOptions
from pneumoseg.locks import exclusive, lock_file_for

log = logging.getLogger("pneumoseg.predict")

RLE_FORMS = ("relative", "absolute")


@dataclass
class SubmissionResult:
    """What :func:`predict_submission` wrote (the file was validated before it replaced
    anything: an invalid one raises :class:`~pneumoseg.errors.SubmissionError` instead)."""

    path: Path  # the CSV written
    rows: int  # its rows: the sample's ids, or one per readable test image
    predicted: int  # images predicted (rows minus the sample ids without a readable image)
    positive: int  # images predicted positive
    relative: bool  # the RLE form written
    sample: Path | None = None  # the sample submission whose ids (in order) the file holds
    missing: list[str] = field(default_factory=list)  # sample ids without an image: -1 rows
    left_out: list[str] = field(default_factory=list)  # test images not in the sample
    failed: list[str] = field(default_factory=list)  # test images that failed to decode
    valid: bool = True  # validated (against the sample's ids when there is one)
    truth: Path | None = None  # the truth RLE CSV it was scored against, if it was
    score: dict | None = None  # score_submission's {"dice", "pos_dice", "n", "n_pos", ...}
    segs: int = 0  # DICOM SEGs written, with dicom_seg
    seg_failed: list[str] = field(default_factory=list)  # "<id>: why" of SEGs not written


@dataclass
class ImageResult:
    """One image of :func:`predict_images`: its row, or why it could not be read."""

    path: Path
    image_id: str | None = None  # the file stem made safe (pneumoseg.safe_text.safe_id)
    rle: str | None = None  # the mask in the asked RLE form, "-1" when empty
    prob: float | None = None  # image-level probability (classifier head, else max pixel)
    pixels: int = 0  # positive pixels of the mask
    overlay: Path | None = None  # the overlay PNG written, with an overlay folder
    error: str | None = None  # why the image could not be read (nothing else is set then)
    intake: dict | None = None  # what was done to the pixels (data.intake.IntakeInfo.as_dict)
    seg: Path | None = None  # the DICOM SEG written, with dicom_seg
    seg_note: str | None = None  # why no SEG was written (a PNG/JPEG input, --seg-skip-empty)
    seg_error: str | None = None  # why its SEG could not be written (the row was predicted)

    @property
    def row(self) -> str:
        """``ImageId,EncodedPixels`` as the csv module writes it (quoted where needed)."""
        return csv_row(str(self.image_id), str(self.rle))


def csv_row(image_id: str, rle: str) -> str:
    """``ImageId,EncodedPixels`` as the csv module writes it (quoted where needed)."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow((image_id, rle))
    return buf.getvalue()


def submission_path(cfg: Mapping[str, Any]) -> Path:
    """Where :func:`predict_submission` writes by default: ``<predict.out_dir>/<exp>.csv``."""
    return Path(str(cfg["predict"]["out_dir"])) / f"{cfg['exp']}.csv"


def rle_form(cfg: Mapping[str, Any], rle: str | None = None) -> str:
    """``rle`` (``"relative"`` or ``"absolute"``), else the config's ``predict.rle``."""
    form = rle or cfg["predict"]["rle"]
    if form not in RLE_FORMS:
        raise ConfigError(f"rle must be one of {', '.join(RLE_FORMS)}, got {form!r}")
    return str(form)


def find_sample(cfg: Mapping[str, Any], given: str | Path | None) -> Path | None:
    """The sample submission: ``given``, else ``data.root/data.sample_submission`` when it
    exists, else None (one row per test image)."""
    if given is not None:
        given = Path(given)
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
# the test set as a submission
# ==================================================================================================
def predict_submission(
    cfg: dict,
    out: str | Path | None = None,
    sample: str | Path | None = None,
    force: bool = False,
    allow_missing: bool = False,
    rle: str | None = None,
    quiet: bool = False,
    dicom_seg: SegOptions | None = None,
) -> SubmissionResult:
    """Predict the test set and write the submission CSV ``out`` (default
    :func:`submission_path`) atomically; validate it, and score it when the config has the test
    truth (``data.test_rle_csv``, e.g. the synthetic data) and the RLE is relative.

    ``sample``: the sample submission whose ids, in its order, the file holds (default
    ``data.root/data.sample_submission`` when it exists, else one row per test image); its ids
    without a (readable) test image are a :class:`~pneumoseg.errors.DataError` unless
    ``allow_missing`` (or ``predict.allow_missing``): -1 rows then, with a warning. An existing
    ``out`` is an :class:`~pneumoseg.errors.OutputExistsError` unless ``force``; even then it is
    replaced only by a file that validated. ``rle``: ``"relative"`` or ``"absolute"`` (default
    ``predict.rle``). ``quiet``: no progress bar. ``dicom_seg``: also one DICOM SEG per test
    DICOM in ``dicom_seg.out_dir`` (existing ones refused before anything is predicted unless
    ``dicom_seg.force``; a PNG test set gets none, with a warning).
    """
    from pneumoseg.inference.submission import publish_submission

    out = Path(out) if out is not None else submission_path(cfg)
    with exclusive(lock_file_for(out), f"submission {out}"):
        if out.exists() and not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it (after validation)")
        relative = rle_form(cfg, rle) == "relative"
        allow_missing = bool(allow_missing or cfg["predict"]["allow_missing"])

        # models and tuning first: a stale tuning or a broken model is refused before the test
        # cache (minutes on the real test set) is built
        predictor = Predictor(cfg, relative)
        cache, index, sizes = _test_set(cfg)
        sample_path = find_sample(cfg, sample)
        ids, missing, extra = _submission_ids(sample_path, index, allow_missing)
        todo = [i for i in ids if i in index]
        with _seg_sink(cfg, predictor, dicom_seg, todo, cache.manifest) as sink:
            rles = _predict_cached(predictor, cache, index, sizes, todo, quiet, sink)
        n_pos = sum(r != "-1" for r in rles.values())
        log.info("%d/%d image(s) predicted positive", n_pos, len(rles))

        rows = [(i, rles.get(i, "-1")) for i in ids]
        publish_submission(rows, out, ids if sample_path is not None else None, sizes, relative)
        against = f" against {sample_path}" if sample_path else ""
        log.info("%s: %d row(s), valid%s", out, len(ids), against)
        truth, score = _score(cfg, out, sizes, relative, missing)
    return SubmissionResult(
        path=out,
        rows=len(ids),
        predicted=len(rles),
        positive=n_pos,
        relative=relative,
        sample=sample_path,
        missing=missing,
        left_out=extra,
        failed=list(cache.failed_ids),
        truth=truth,
        score=score,
        segs=0 if sink is None else sink.written,
        seg_failed=[] if sink is None else list(sink.failed),
    )


def _test_set(cfg: dict):
    """The test cache (built or reused), ``{id: row}`` of its decoded images, ``{id: (h, w)}``."""
    from pneumoseg.data.cache import FAILED, build_cache

    cache = build_cache(cfg, "test")
    man = cache.manifest
    ok = cache.done != FAILED
    if not ok.all():
        log.warning("%d test image(s) failed to decode: %s", int((~ok).sum()), cache.failed_ids[:5])
    index = {i: k for k, i in enumerate(man["id"].astype(str)) if ok[k]}
    sizes = {str(r.id): (int(r.height), int(r.width)) for r in man.itertuples()}
    return cache, index, sizes


def _submission_ids(
    sample: Path | None, index: Mapping[str, int], allow_missing: bool
) -> tuple[list[str], list[str], list[str]]:
    """The submission's ids in order, the sample ids without an image, the images left out."""
    from pneumoseg.inference.submission import read_sample_ids

    if sample is None:
        return list(index), [], []
    ids = read_sample_ids(sample)
    if not ids:
        raise SubmissionError(f"sample submission {sample} lists no ImageId: nothing to predict")
    missing = [i for i in ids if i not in index]
    extra = sorted(set(index) - set(ids))
    if extra:
        log.warning("%d test image(s) not in %s left out, e.g. %s", len(extra), sample, extra[:5])
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
    return ids, missing, extra


@contextlib.contextmanager
def _seg_sink(cfg, predictor, opts: SegOptions | None, todo: Sequence[str], manifest):
    """A :class:`~pneumoseg.inference.seg_outputs.SegSink` over the test images (its folder
    locked, existing SEGs refused first), or None without ``opts``."""
    if opts is None:
        yield None
        return
    from pneumoseg.inference.seg_outputs import SegSink, check_targets

    check_targets(opts, todo)
    with exclusive(lock_file_for(opts.out_dir), f"SEG folder {opts.out_dir}"):
        sink = SegSink(cfg, predictor.params, opts)
        rows = manifest.set_index(manifest["id"].astype(str))
        sink.sources = {i: (rows.at[i, "image_path"], rows.at[i, "source"]) for i in todo}
        if todo and all(kind != "siim" for _, kind in sink.sources.values()):
            log.warning("the test images are PNGs (data.layout=png): no DICOM SEG can be "
                        "written; the submission is")  # fmt: skip
        yield sink
        log.info("%s", sink.summary())


def _seg_of(sink, image_id: str, mask, prob) -> None:
    """The SEG of one test image; a source that cannot give one is logged and listed (the
    submission is still written)."""
    path, kind = sink.sources[image_id]
    try:
        sink.write(image_id, Path(path), "dicom" if kind == "siim" else "png", mask, prob)
    except UserError as e:
        sink.failed.append(f"{image_id}: {e}")
        log.error("%s", e)


def _predict_cached(predictor, cache, index, sizes, todo: Sequence[str], quiet: bool, sink=None):
    """``{id: rle}`` of the cached test images ``todo``, in batches, post-processing (two
    threads) while the next batch predicts, at most two batches behind (bounded memory); with a
    SEG ``sink``, each image's SEG is written as its mask is ready."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from tqdm.auto import tqdm

    rles: dict[str, str] = {}
    pending: deque = deque()
    bs = predictor.batch_size

    def settle(image_id, fut, prob) -> None:
        mask, rles[image_id] = fut.result()
        if sink is not None:
            _seg_of(sink, image_id, mask, prob)

    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        tqdm(total=len(todo), desc="predict", unit="img", disable=quiet or None) as bar,
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
                keep = probs[j] if sink is not None and sink.opts.fractional else None
                pending.append((image_id, pool.submit(predictor.finish, probs[j], c), keep))
            while len(pending) > 2 * bs:
                settle(*pending.popleft())
            bar.update(len(chunk))
        for item in pending:
            settle(*item)
    return rles


def _score(cfg: dict, out: Path, sizes, relative: bool, missing: Sequence[str]):
    """(truth CSV, score) of the written submission when the config has the test truth and the
    RLE is relative; (None, None) otherwise."""
    from pneumoseg.inference.submission import score_submission

    truth = cfg["data"].get("test_rle_csv")
    truth_path = Path(str(cfg["data"]["root"])) / str(truth) if truth else None
    if truth_path is None or not truth_path.is_file() or not relative:
        return None, None
    if missing:
        log.warning("not scoring: %d sample id(s) had no image", len(missing))
        return None, None
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
    return truth_path, s


# ==================================================================================================
# single images
# ==================================================================================================
@dataclass
class _Outputs:
    """Where each predicted image's outputs go: overlays, SEGs, the caller's callback."""

    folder: Path | None
    emit: Callable[[ImageResult], None]
    sink: Any = None  # a seg_outputs.SegSink, with --dicom-seg


def predict_images(
    cfg: dict,
    paths: Iterable[str | Path],
    overlay_dir: str | Path | None = None,
    rle: str | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
    dicom_seg: SegOptions | None = None,
) -> list[ImageResult]:
    """Predict each DICOM/PNG/JPEG of ``paths`` (the type read from the content): one
    :class:`ImageResult` per path, in their order.

    An image that cannot be read is logged and its result carries the ``error`` (the others are
    predicted: the caller decides what a failure means). With ``overlay_dir``, each image's
    overlay (the mask, a box and mean probability per component, the image-level probability) is
    written to ``overlay_dir/<image_id>.png``. With ``dicom_seg``, each DICOM's Segmentation is
    written to ``<dicom_seg.out_dir>/<image_id>.seg.dcm`` (a PNG/JPEG gets a ``seg_note``
    instead); existing SEGs are refused before anything is predicted unless
    ``dicom_seg.force``. ``rle``: ``"relative"`` or ``"absolute"`` (default ``predict.rle``).
    ``on_result`` is called with each result as soon as it is known (unreadable images of a batch
    first, then its predictions, each before its overlay is written), e.g. to stream rows.
    """
    from pneumoseg.inference.seg_outputs import SegSink, check_targets
    from pneumoseg.safe_text import safe_id

    paths = [Path(p) for p in paths]
    if dicom_seg is not None:
        check_targets(dicom_seg, [safe_id(p.stem, f"image-{k}") for k, p in enumerate(paths)])
    out = _Outputs(Path(overlay_dir) if overlay_dir is not None else None,
                   on_result or (lambda result: None))  # fmt: skip
    results: list[ImageResult | None] = [None] * len(paths)
    with contextlib.ExitStack() as stack:
        for what, folder in (("overlay", out.folder),
                             ("SEG", dicom_seg.out_dir if dicom_seg else None)):  # fmt: skip
            if folder is not None:
                stack.enter_context(exclusive(lock_file_for(folder), f"{what} folder {folder}"))
        predictor = Predictor(cfg, rle_form(cfg, rle) == "relative")
        if dicom_seg is not None:
            out.sink = SegSink(cfg, predictor.params, dicom_seg)
        for start in range(0, len(paths), predictor.batch_size):
            batch = _read_batch(paths, start, predictor.batch_size, results, out.emit)
            for k, result in _predict_batch(predictor, batch, out):
                results[k] = result
        if out.sink is not None:
            log.info("%s", out.sink.summary())
    return [r for r in results if r is not None]


def _read_batch(paths, start: int, size: int, results: list, emit) -> list[tuple]:
    """``(index, path, image, intake)`` of the readable images of one batch; the unreadable ones
    get their error result (emitted) in ``results``."""
    from pneumoseg.data.intake import read_intake

    batch = []
    for k, path in enumerate(paths[start : start + size], start):
        try:
            intake = read_intake(path)
            batch.append((k, path, intake.image, intake.info))
        except UserError as e:
            results[k] = ImageResult(path, error=str(e))
            emit(results[k])
            log.error("%s", e)
    return batch


def _predict_batch(predictor, batch: list[tuple], out: _Outputs):
    """``(index, result)`` of each read image of a batch (yielded one by one: its SEG written,
    then the result emitted, then its overlay written)."""
    from pneumoseg.safe_text import safe_id
    from pneumoseg.visualize import overlay, save_rgb

    if not batch:
        return
    probs, cls = predictor.probs_of([image for _, _, image, _ in batch])
    for j, (k, path, image, info) in enumerate(batch):
        c = None if cls is None else float(cls[j])
        mask, rle = predictor.finish(probs[j], c)
        # a file name is anyone's text: a UID or plain stem is kept, anything else hashed
        # (pneumoseg.safe_text), so the CSV row and the output names are always safe
        image_id = safe_id(path.stem, f"image-{k}")
        prob = float(probs[j].max()) if c is None else c
        result = ImageResult(path, image_id, rle, prob, int(mask.sum()), intake=info.as_dict())
        if out.sink is not None:
            _write_seg(out.sink, result, info.kind, mask, probs[j])
        out.emit(result)
        if out.folder is not None:
            pic = overlay(image, probs[j], mask, title=image_id, image_prob=prob)
            result.overlay = save_rgb(pic, out.folder / f"{image_id}.png")
            log.info("%s: %d positive pixel(s), p=%.3f -> %s", path, result.pixels, prob,
                     result.overlay)  # fmt: skip
        yield k, result


def _write_seg(sink, result: ImageResult, kind: str, mask, prob) -> None:
    """The image's SEG through ``sink``; a source that cannot give one is this image's
    ``seg_error`` (logged), not the run's end."""
    try:
        result.seg, result.seg_note = sink.write(result.image_id, result.path, kind, mask, prob)
    except UserError as e:
        result.seg_error = str(e)
        sink.failed.append(f"{result.image_id}: {e}")
        log.error("%s", e)
        return
    if result.seg_note:
        log.warning("%s: %s", result.path, result.seg_note)
