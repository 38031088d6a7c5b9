"""Out-of-fold (OOF) predictions: written and read as uint8 memmaps.

``runs/<exp>/fold<k>/``::

    oof_probs.npy   uint8 N×S×S  round(p × 255) at ``oof.size``
    oof_truth.npy   uint8 N×S×S  0/1 truth at the same size (area-resized, >= 0.5)
    oof_cls.npy     float32 N    image-level probability of the aux head (only with one)
    oof_ids.csv     id per row (written last: its presence marks a complete OOF set)

Writing goes batch by batch into memmaps under temp names, renamed at the end, so memory stays
flat in the number of images and an interrupted run leaves no file that looks complete.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pneumoseg.errors import DataError, MissingFileError
from pneumoseg.io import atomic_write, read_csv
from pneumoseg.training.engine import predict_batch

log = logging.getLogger(__name__)

PROBS, TRUTH, CLS, IDS = "oof_probs.npy", "oof_truth.npy", "oof_cls.npy", "oof_ids.csv"


def to_uint8(probs: torch.Tensor) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 p × 255, rounded (the on-disk convention)."""
    return probs.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def resize_probs(probs: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) probabilities -> (N, 1, size, size), bilinear."""
    if probs.shape[-1] == size and probs.shape[-2] == size:
        return probs
    return F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)


def resize_truth(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) 0/1 -> (N, 1, size, size) 0/1 by area coverage >= 0.5 (as the cache does)."""
    if mask.shape[-1] == size and mask.shape[-2] == size:
        return (mask > 0.5).to(torch.uint8)
    return (F.interpolate(mask.float(), size=(size, size), mode="area") >= 0.5).to(torch.uint8)


@torch.no_grad()
def predict_oof(
    model,
    loader,
    folder: str | Path,
    ids: list[str],
    size: int,
    device,
    hflip: bool = True,
    dtype=None,
    show_progress: bool = True,
    family=None,
) -> Path:
    """Predict every batch of ``loader`` (in order, matching ``ids``) into ``folder``'s OOF files
    (``family``: the model's family, which turns its outputs into probabilities)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    tmp = {name: folder / f".{name}.tmp" for name in (PROBS, TRUTH, CLS)}
    probs_mm = np.lib.format.open_memmap(
        tmp[PROBS], mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    truth_mm = np.lib.format.open_memmap(
        tmp[TRUTH], mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    for name in (PROBS, TRUTH):
        _reserve(tmp[name], folder / name)
    cls_all = np.full(n, np.nan, dtype=np.float32)
    model.eval()
    pos = 0
    for batch in tqdm(loader, desc="oof", leave=False, disable=not show_progress):
        x = batch["image"].to(device)
        probs, cls = predict_batch(model, x, hflip=hflip, dtype=dtype, family=family)
        b = x.shape[0]
        probs_mm[pos : pos + b] = to_uint8(resize_probs(probs, size))[:, 0]
        truth_mm[pos : pos + b] = resize_truth(batch["mask"], size)[:, 0].numpy()
        if cls is not None:
            cls_all[pos : pos + b] = cls[:, 0].float().cpu().numpy()
        pos += b
    if pos != n:
        raise RuntimeError(f"OOF: loader gave {pos} images, expected {n}")
    probs_mm.flush()
    truth_mm.flush()
    del probs_mm, truth_mm
    os.replace(tmp[PROBS], folder / PROBS)
    os.replace(tmp[TRUTH], folder / TRUTH)
    if not np.isnan(cls_all).all():
        with atomic_write(folder / CLS, "wb") as fh:
            np.save(fh, cls_all)
    with atomic_write(folder / IDS, "w") as fh:
        pd.DataFrame({"id": ids}).to_csv(fh, index=False)
    log.info("OOF probabilities for %d images written to %s", n, folder)
    return folder


def _reserve(path: Path, name: Path) -> None:
    """Allocate a memmap's blocks up front: a full disk is then an ENOSPC naming ``name`` here,
    not a SIGBUS that kills the process when a page of the (sparse) file is first written."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
            return
        path.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(name)) from None
    finally:
        os.close(fd)


@dataclass
class Oof:
    ids: list[str]
    probs: np.ndarray  # uint8 memmap N×S×S
    truth: np.ndarray  # uint8 memmap N×S×S
    cls: np.ndarray | None  # float32 N


def option_settings(grid: dict | None) -> list[dict]:
    """Every combination of ``tune.options`` (``{option: [values]}``) as ``{option: value}``."""
    import itertools

    names = sorted(grid or {})
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(grid[n] for n in names))] if names else []  # fmt: skip


def option_folder(options: dict) -> str:
    """The sub-folder of a fold holding the OOF maps predicted with the model's inference
    ``options`` changed (e.g. ``oof_min_score_0.3``); '' for the maps as trained."""
    return "_".join(["oof", *(f"{k}_{v:g}" for k, v in sorted(options.items()))]) if options else ""


def has_oof(folder: str | Path) -> bool:
    return (Path(folder) / IDS).is_file()


def load_oof(folder: str | Path) -> Oof:
    """Open a fold's OOF files (memory-mapped); damaged files are a :class:`DataError`."""
    folder = Path(folder)
    if not has_oof(folder):
        raise MissingFileError(f"no complete OOF predictions in {folder} ({IDS} missing)")
    redo = (
        "delete the fold's oof_* files and run src/train.py --resume for that fold to rewrite them"
    )
    try:
        ids = read_csv(folder / IDS, "OOF id list", dtype=str)["id"].tolist()
    except KeyError:
        raise DataError(f"{folder / IDS}: no 'id' column; {redo}") from None
    try:
        probs = np.load(folder / PROBS, mmap_mode="r")
        truth = np.load(folder / TRUTH, mmap_mode="r")
        cls = np.load(folder / CLS) if (folder / CLS).is_file() else None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{folder}: damaged OOF arrays ({type(e).__name__}); {redo}") from None
    if probs.ndim != 3 or probs.shape[0] != len(ids) or truth.shape != probs.shape:
        raise DataError(
            f"{folder}: OOF arrays {probs.shape}/{truth.shape} do not match {len(ids)} ids; {redo}"
        )
    return Oof(ids, probs, truth, cls)


def blend_oofs(oofs: list[Oof], weights: list[float], names: list[str]) -> Oof:
    """The weighted mean of several experiments' OOF maps of one fold (what ``predict.py`` does
    with their models): same ids in the same order required; uint8 like the inputs."""
    if len(oofs) == 1:
        return oofs[0]
    first = oofs[0]
    for o, name in zip(oofs[1:], names[1:], strict=True):
        if list(o.ids) != list(first.ids) or o.probs.shape != first.probs.shape:
            raise DataError(
                f"cannot blend {names[0]} and {name}: their OOF maps hold other images or sizes "
                f"({len(first.ids)} vs {len(o.ids)} ids, {first.probs.shape[1:]} vs "
                f"{o.probs.shape[1:]}); train both on the same folds file with the same oof.size"
            )
    total = float(sum(weights))
    acc = np.zeros(first.probs.shape, dtype=np.float32)
    for o, w in zip(oofs, weights, strict=True):
        acc += np.asarray(o.probs, dtype=np.float32) * (w / total)
    probs = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
    with_cls = [(o.cls, w) for o, w in zip(oofs, weights, strict=True) if o.cls is not None]
    cls = None
    if with_cls:
        cls = sum(c * w for c, w in with_cls) / sum(w for _, w in with_cls)
    return Oof(list(first.ids), probs, first.truth, cls)
