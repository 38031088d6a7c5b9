"""The preprocessing cache: every image decoded once, resized to ``cache.size``, fast random access.

Layout of ``<cache.dir>/<dataset>_<split>_<size>/`` (``dataset`` = folder name of ``data.root``)::

    images.npy     uint8 N×S×S  (.npy, opened as a read-only memmap)
    masks.npy      uint8 N×S×S  0/1 (zero pages of empty masks are never written: sparse on disk)
    done.npy       uint8 N      0 = to do, 1 = written, 2 = failed (rewritten atomically per chunk)
    manifest.csv   the manifest the cache was built from (original sizes; row i = array entry i)
    meta.json      version, size, n, dataset, split, fingerprint of the manifest, resize methods

**Format choice** — one memmapped ``.npy`` per array rather than one PNG per image. Measured by
``benchmarks/bench_preprocess.py`` on the real JPEG DICOMs (2-core dev box, warm page cache), one
random image+mask read costs 0.030 ms from the memmaps against 2.8 ms decoding two PNGs at 512²
(0.008 vs 0.78 ms at 256²): ~100× faster, while decoding the DICOM itself costs ~11 ms/core. With
PNGs a DataLoader would spend about one core per 350 samples/s on decoding alone; the memmap read
is free next to the augmentations and DataLoader workers share one page cache. The price is disk:
N × S² bytes of images (~3 GB for 12k train images at 512) plus the masks, which stay sparse on disk
because empty masks are never written — against ~4× less for PNGs.

**Resizing** — images: ``cv2.INTER_AREA``. Masks: the area coverage of each output pixel
(``INTER_AREA`` on the 0/1 mask as float32) thresholded at ``>= 0.5``: the output pixel has the
same footprint as the image pixel it labels, and on the real SIIM masks it gives the best round
trip (down, then up with bilinear) — Dice 0.978 at 512 and 0.963 at 256, against 0.972/0.924 for
nearest and 0.977/0.962 for bilinear ``> 0.5``. Nearest drops or doubles thin rims; ``> 0.5``
instead of ``>= 0.5`` shrinks masks by ~3 % at 512 (every 2×2 block half covered is a tie).

**Safety** — arrays are preallocated under a temp name and renamed; entries are written
(``pwrite``), synced, and only then their done flags set (``done.npy`` replaced atomically after
each chunk). Before writing, the free disk space is checked and the blocks to fill are reserved
(``DiskSpaceError`` naming both numbers, never a SIGBUS from a memmap on a full disk; see "Disk
space" below). A killed run leaves at worst entries without their flag, redone by the next run,
which only processes flags ≠ 1 (a complete cache does no work). ``meta.json`` (written last,
removed first on a rebuild) holds a fingerprint of the manifest (ids, sizes, mask areas, instance
counts) and the size: a cache built from another manifest or size is rebuilt with a warning
(``cache.rebuild_on_change``) or reported as an error, never silently reused. A damaged file
raises :class:`CacheError` naming it (``open_cache``) or is repaired by the next build (an
unreadable ``manifest.csv`` is rewritten, an unreadable ``done.npy`` means every entry is redone,
damaged arrays a rebuild). A rebuild deletes files only in a folder marked as a cache (its
``.pneumoseg-cache`` marker, written before any cache file, or for older caches their meta.json):
files of the same names that the cache did not write are refused (``CacheError``), never replaced.

**Failed images** — an image that cannot be decoded is flagged FAILED (its arrays stay zero) and
retried by every build. With ``data.strict`` false the cache opens anyway (``open_cache_for``
logs them) and readers leave them out (:attr:`Cache.ok`, :meth:`Cache.usable`; ``SegDataset``
refuses them); with ``data.strict`` true they are an error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumoseg.data.dataset import (
    build_manifest,
    dataset_name,
    load_manifest,
    read_image,
    read_mask,
)
from pneumoseg.data.dataset import save_manifest as _save_manifest
from pneumoseg.data.resize import IMAGE_INTERP, MASK_INTERP, resize_image, resize_mask
from pneumoseg.errors import CacheError, DiskSpaceError
from pneumoseg.io import atomic_save, atomic_write
from pneumoseg.locks import exclusive, lock_file_for

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TODO, DONE, FAILED = 0, 1, 2
_FILES = ("meta.json", "done.npy", "images.npy", "masks.npy", "manifest.csv")
# Written first into a cache folder (before any of _FILES): only a folder that carries it (or, for
# caches built before it existed, a cache's meta.json) has its files deleted on a rebuild.
CACHE_MARKER = ".pneumoseg-cache"
CACHE_GENERATOR = "pneumoseg.cache"  # a stored value: kept when the module moved
_SHOW = 5
_RERUN = "run src/preprocess.py again (add --force if that does not fix it)"
_BLOCK = 4096  # allocation granularity assumed for the disk-space estimates
_NOSPACE = {errno.ENOSPC, errno.EDQUOT}


def _process(index: int, row: dict, size: int) -> tuple[int, Any, Any, str]:
    """Worker: decode, resize. Returns ``(index, image, mask, error_text)``."""
    try:
        img = resize_image(read_image(row), size)
        mask = resize_mask(read_mask(row), size)
        return index, img, mask, ""
    except Exception as e:
        return index, None, None, f"{type(e).__name__}: {e}"


# ==================================================================================================
# Paths, fingerprint, meta
# ==================================================================================================
def cache_dir(cfg: Mapping[str, Any], split: str = "train", size: int | None = None) -> Path:
    """``<cache.dir>/<dataset>_<split>_<size>`` for a resolved config."""
    size = int(size if size is not None else cfg["cache"]["size"])
    return Path(str(cfg["cache"]["dir"])) / f"{dataset_name(cfg['data'])}_{split}_{size}"


def fingerprint(manifest: pd.DataFrame, size: int) -> str:
    """sha256 of what the cached arrays depend on: format, size, and per row id/size/mask stats.

    Paths are left out so that moving the dataset folder keeps the cache valid.
    """
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{int(size)}|{IMAGE_INTERP}|{MASK_INTERP}\n".encode())
    cols = ["id", "height", "width", "mask_area", "n_instances", "has_mask", "source"]
    for rec in manifest[cols].itertuples(index=False, name=None):
        h.update(("|".join(map(str, rec)) + "\n").encode())
    return h.hexdigest()


def _meta(manifest: pd.DataFrame, size: int, cfg: Mapping[str, Any], split: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "dataset": dataset_name(cfg["data"]),
        "split": split,
        "layout": cfg["data"].get("layout"),
        "root": str(cfg["data"].get("root")),
        "size": int(size),
        "n": len(manifest),
        "fingerprint": fingerprint(manifest, size),
        "image_interp": IMAGE_INTERP,
        "mask_interp": MASK_INTERP,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _read_meta(path: Path) -> tuple[dict | None, str]:
    """``(meta, "")`` for a usable ``meta.json`` in folder ``path``, else ``(None, why not)``."""
    file = path / "meta.json"
    try:
        with open(file, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    if not isinstance(meta, dict):
        return None, "not a JSON object"
    if meta.get("version") != CACHE_VERSION:  # other keys may differ between versions
        return meta, ""
    for key, kind in (("size", int), ("n", int), ("fingerprint", str)):
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None, f"has no valid {key!r}"
    if meta["size"] <= 0 or meta["n"] <= 0:
        return None, f"has a non-positive size or n ({meta['size']}, {meta['n']})"
    return meta, ""


def _read_stored_manifest(file: Path) -> tuple[pd.DataFrame | None, str]:
    """``(manifest, "")`` or ``(None, why it cannot be read)`` for the cache's ``manifest.csv``."""
    try:
        return load_manifest(file), ""
    except FileNotFoundError:
        return None, "missing"
    # pandas' parser errors and UnicodeDecodeError are ValueErrors; _coerce raises ValueError
    except (OSError, ValueError, TypeError, KeyError, OverflowError) as e:
        text = str(e).replace(f"{file}: ", "")  # the file is named by the caller
        return None, f"not a readable manifest ({type(e).__name__}: {text[:160]})"


def _save_flags(path: Path, done: np.ndarray) -> None:
    atomic_save(path / "done.npy", lambda fh: np.save(fh, done, allow_pickle=False))


def _load_flags(path: Path, n: int) -> tuple[np.ndarray | None, str]:
    """``(done flags, "")`` or ``(None, why done.npy is unusable)``."""
    try:
        done = np.load(path / "done.npy", allow_pickle=False)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError, EOFError) as e:  # EOFError: empty file
        return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    if not isinstance(done, np.ndarray) or done.shape != (n,) or done.dtype != np.uint8:
        return (
            None,
            f"holds {getattr(done, 'dtype', '?')} {getattr(done, 'shape', '?')}, not uint8 ({n},)",
        )
    if done.size and int(done.max()) > FAILED:
        return None, f"holds flag values other than {TODO}/{DONE}/{FAILED}"
    return done.copy(), ""


def _npy_layout(file: Path, shape: tuple[int, ...]) -> tuple[int, str]:
    """``(data offset, "")`` if ``file`` is a complete C-order uint8 ``.npy`` of ``shape``, else
    ``(-1, why not)`` (missing, not an .npy, other shape or dtype, truncated)."""
    fmt = np.lib.format
    try:
        with open(file, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                got, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                got, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                return -1, f"unsupported .npy version {version}"
            offset, length = fh.tell(), os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        return -1, "missing"
    except (OSError, ValueError, EOFError, SyntaxError) as e:  # a short/garbage header
        return -1, f"not a readable .npy file ({type(e).__name__})"
    if tuple(got) != tuple(shape) or dtype != np.uint8 or fortran:
        want = "×".join(map(str, shape))
        return -1, f"holds {dtype} {'×'.join(map(str, got))}, expected uint8 {want}"
    expected = offset + int(np.prod(shape))
    if length < expected:
        return -1, f"truncated ({length} of {expected} bytes)"
    return offset, ""


def _mismatch(path: Path, expected: dict) -> str | None:
    """Why the cache at ``path`` cannot be resumed for ``expected`` meta; None if it can.

    An unreadable ``manifest.csv`` or ``done.npy`` is no reason to rebuild: the arrays belong to
    the fingerprint in ``meta.json``, so the manifest is rewritten and missing flags are redone.
    """
    meta, why = _read_meta(path)
    if meta is None:
        return f"meta.json {why}"
    for key, what in (("version", "format version"), ("size", "size"), ("n", "number of images")):
        if meta.get(key) != expected[key]:
            return f"{what} {meta.get(key)} != {expected[key]}"
    if meta.get("fingerprint") != expected["fingerprint"]:
        return "built from a different manifest (ids, sizes or masks changed)"
    n, s = expected["n"], expected["size"]
    for name in ("images.npy", "masks.npy"):
        offset, why = _npy_layout(path / name, (n, s, s))
        if offset < 0:
            return f"{name} {why}"
    return None


def _header_len(shape: tuple[int, ...]) -> int:
    """Bytes of the ``.npy`` header ``open_memmap`` writes for a uint8 array of ``shape``."""
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue())


def _create_array(path: Path, shape: tuple[int, ...]) -> None:
    """Preallocate a zeroed uint8 .npy (sparse) under a temp name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    arr.flush()
    del arr
    os.replace(tmp, path)


def cache_owner(path: str | Path) -> dict | None:
    """``{"root", "dataset", "split"}`` of the cache this module built in folder ``path``, from its
    marker (or, for caches built before the marker existed, its meta.json); None when ``path``
    carries neither: then its files are not the cache's to delete."""
    path = Path(path)
    for name in (CACHE_MARKER, "meta.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable, not JSON
            continue
        if not isinstance(data, dict):
            continue
        if name == CACHE_MARKER:
            ours = data.get("generator") == CACHE_GENERATOR
        else:  # a cache's meta.json
            ours = "fingerprint" in data and "version" in data
        if ours:
            return {k: data.get(k) for k in ("root", "dataset", "split")}
    return None


def _claim(path: Path, meta: dict) -> None:
    """Before a (re)build deletes anything in ``path``: refuse files the cache did not write,
    then mark the folder as the cache's (before any cache file is written)."""
    present = [name for name in _FILES if os.path.lexists(path / name)]
    if present and cache_owner(path) is None:
        raise CacheError(
            f"{path} holds {', '.join(present)} that the cache did not write (no {CACHE_MARKER} "
            "marker, no cache meta.json): nothing was deleted; move them away or point cache.dir "
            "at another folder"
        )
    root = meta.get("root")
    marker = {
        "generator": CACHE_GENERATOR,
        "version": CACHE_VERSION,
        "dataset": meta["dataset"],
        "split": meta["split"],
        "root": str(Path(str(root)).resolve()),  # absolute: the builder's working folder is gone
    }
    with atomic_write(path / CACHE_MARKER, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=1)


def _is_cache_temp(name: str) -> bool:
    """The temp names this module writes: ``.images.npy.tmp`` and ``atomic_write``'s
    ``.<file>.XXXX.tmp`` of its own files."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    target = name[1:-4]
    return target in _FILES or target.rsplit(".", 1)[0] in (*_FILES, CACHE_MARKER)


def remove_cache(path: str | Path) -> list[str]:
    """Delete the cache in folder ``path`` (its files, temp files and marker; then the folder once
    empty). Files the cache did not write stay; their names are returned. A folder that is not
    a cache (:func:`cache_owner`) is refused with :class:`CacheError`, nothing deleted."""
    path = Path(path)
    if cache_owner(path) is None:
        raise CacheError(
            f"{path} is not a cache this pipeline built (no {CACHE_MARKER} marker, no cache "
            "meta.json): nothing was deleted"
        )
    for name in _FILES:  # meta.json first: a half-removed cache never looks valid
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    for entry in path.iterdir():
        if _is_cache_temp(entry.name) and not entry.is_dir():
            entry.unlink()
    (path / CACHE_MARKER).unlink(missing_ok=True)
    left = sorted(p.name for p in path.iterdir())
    if left:
        log.warning("%s: left in place (not written by the cache): %s", path, left[:_SHOW])
    else:
        path.rmdir()
    return left


def _init(path: Path, manifest: pd.DataFrame, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _claim(path, meta)
    for name in _FILES:  # meta.json first: a half-reset cache never looks valid
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    n, s = meta["n"], meta["size"]
    _save_manifest(manifest, path / "manifest.csv")
    _create_array(path / "images.npy", (n, s, s))
    _create_array(path / "masks.npy", (n, s, s))
    _save_flags(path, np.zeros(n, dtype=np.uint8))
    with atomic_write(path / "meta.json", "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)


# ==================================================================================================
# Disk space
# ==================================================================================================
# Writing through a memmap into a sparse file on a full disk does not fail cleanly: the page fault
# that needs a new block kills the process with SIGBUS. So a build (1) checks that the blocks it is
# about to fill fit in the free space (``DiskSpaceError`` with both numbers otherwise, before
# anything is touched), (2) reserves them for real with ``posix_fallocate`` where the OS has it (an
# ENOSPC there is the same error) and (3) writes the entries with ``pwrite`` rather than through a
# memmap, so that a disk filled by someone else meanwhile is an ``ENOSPC`` error, never a SIGBUS.
# Entries are flagged only after they are written and synced, so after any of these errors the
# cache is left resumable: free space and run again.
#
# What is reserved: all of images.npy (every entry is written), and of masks.npy only the blocks
# of the rows whose manifest says ``has_mask`` (the positives, ~22 % of SIIM train). Empty masks
# are never written, so reserving the whole mask array would cost N×S² bytes that are never used
# (~2.4 GB for 12k images at 512²) and give up the sparsity the format relies on; a positive whose
# mask vanishes at ``cache.size`` leaves its row reserved but unwritten, which costs a few blocks.
# Copy-on-write file systems (btrfs, ZFS) may still need new blocks when writing into reserved
# ones; there the write raises ENOSPC (turned into DiskSpaceError) thanks to (3).


def free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the file system that holds ``path`` (or would hold it:
    the nearest existing parent folder is asked). Tests monkeypatch this to simulate a full disk."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _allocated(file: Path) -> int:
    """Bytes of disk ``file`` occupies (0 if missing): ``st_blocks`` × 512, not its length."""
    try:
        return int(os.stat(file).st_blocks) * 512
    except (FileNotFoundError, AttributeError):  # st_blocks: POSIX only
        return 0


def _mask_extents(offset: int, row: int, rows: np.ndarray, length: int) -> list[tuple[int, int]]:
    """Merged ``(start, end)`` byte ranges, block-aligned and clipped to ``length``, that cover the
    array rows ``rows`` (``row`` bytes each, data from ``offset``) of an ``.npy`` file."""
    extents: list[list[int]] = []
    for r in np.sort(np.asarray(rows, dtype=np.int64)):
        start = (offset + int(r) * row) // _BLOCK * _BLOCK
        end = min(-(-(offset + (int(r) + 1) * row) // _BLOCK) * _BLOCK, length)
        if extents and start <= extents[-1][1]:
            extents[-1][1] = max(extents[-1][1], end)
        else:
            extents.append([start, end])
    return [(a, b) for a, b in extents]


@dataclass
class _SpacePlan:
    """What a build is about to write: the byte ranges to reserve per array, and the bytes of disk
    still needed (``need``) counting what is already allocated and the small files."""

    image_length: int
    mask_extents: list[tuple[int, int]]
    need: int


def _plan_space(path: Path, manifest: pd.DataFrame, todo: np.ndarray, size: int, fresh: bool):
    n, row = len(manifest), size * size
    offset = _header_len((n, size, size))
    length = offset + n * row
    positive = manifest["has_mask"].to_numpy(dtype=bool)
    extents = _mask_extents(offset, row, todo[positive[todo]], length)
    images = -(-length // _BLOCK) * _BLOCK
    masks = sum(b - a for a, b in extents) + _BLOCK  # + the header block
    if not fresh:  # resuming: what images.npy already holds is not needed again; masks: see below
        images = max(0, images - _allocated(path / "images.npy"))
        masks -= _BLOCK
    # Mask rows written before a crash but not flagged are counted again (at most one chunk: the
    # estimate errs on the safe side). The small files: manifest.csv (+ its temp copy while it is
    # rewritten), done.npy (+ temp copy per chunk), meta.json, file-system overhead.
    small = (1 << 20) + 1024 * n
    return _SpacePlan(image_length=length, mask_extents=extents, need=images + masks + small)


def _space_text(
    path: Path, need: int, free: int, size: int, n: int, what: str = "", during: str = ""
) -> str:
    """The DiskSpaceError message. ``during``: the OS error when the disk filled up while
    writing (after the check: another program wrote meanwhile, or the estimate was short)."""
    if during:
        head = f"the disk filled up while writing the cache {path}{what} ({during}): "
    else:
        head = f"not enough disk space for the cache {path}{what}: "
    todo = f"Free at least {_human(need - free)}" if need > free else "Free more space"
    return (
        f"{head}it needs about {_human(need)} more, {_human(free)} are free there now. {todo} "
        "on that disk, or point cache.dir at a disk with more room, or lower cache.size (the "
        f"images alone take {n} × {size}² bytes = {_human(n * size * size)}); then run "
        "src/preprocess.py again (entries already cached are kept)"
    )


def _check_space(path: Path, plan: _SpacePlan, size: int, n: int, credit: int = 0) -> None:
    """Raise :class:`DiskSpaceError` if ``plan.need`` exceeds the free space (+ ``credit``: what
    the old files about to be deleted occupy)."""
    free = free_bytes(path) + credit
    if plan.need > free:
        what = f" (counting the {_human(credit)} its old files free)" if credit else ""
        raise DiskSpaceError(_space_text(path, plan.need, free, size, n, what))


def _reserve(path: Path, plan: _SpacePlan, size: int, n: int) -> None:
    """Allocate the blocks the build will write (``posix_fallocate``; a no-op on blocks already
    allocated). Without ``posix_fallocate`` (macOS, Windows) only the preflight check protects."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    jobs = (("images.npy", [(0, plan.image_length)]), ("masks.npy", plan.mask_extents))
    for name, extents in jobs:
        fd = os.open(path / name, os.O_RDWR)
        try:
            for start, end in extents:
                if end > start:
                    fallocate(fd, start, end - start)
        except OSError as e:
            if e.errno in _NOSPACE:
                text = _space_text(
                    path, plan.need, free_bytes(path), size, n, f" ({name})", e.strerror or "ENOSPC"
                )
                raise DiskSpaceError(text) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.debug("%s: cannot reserve disk space (%s): relying on the preflight", name, e)
        finally:
            os.close(fd)


# ==================================================================================================
# Reader
# ==================================================================================================
@dataclass(eq=False)
class Cache:
    """An opened cache: ``manifest`` row i ↔ ``images[i]``, ``masks[i]`` (read-only memmaps).

    Pickles without its arrays (they are reopened lazily), so DataLoader workers started with
    ``spawn`` do not copy gigabytes.
    """

    path: Path
    manifest: pd.DataFrame
    meta: dict
    done: np.ndarray
    last_build: dict = field(default_factory=dict)  # counts from build_cache (empty when opened)
    _images: np.ndarray | None = field(default=None, repr=False)
    _masks: np.ndarray | None = field(default=None, repr=False)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path / "images.npy", mmap_mode="r", allow_pickle=False)
        return self._images

    @property
    def masks(self) -> np.ndarray:
        if self._masks is None:
            self._masks = np.load(self.path / "masks.npy", mmap_mode="r", allow_pickle=False)
        return self._masks

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    @property
    def complete(self) -> bool:
        return bool((self.done == DONE).all())

    @property
    def failed_ids(self) -> list[str]:
        return self.manifest["id"][self.done == FAILED].tolist()

    @property
    def ok(self) -> np.ndarray:
        """bool (n,): entries that hold their image and mask (flag DONE). Failed (undecodable)
        and not-yet-built entries are False: their arrays are zeros, not data."""
        return np.asarray(self.done) == DONE

    def usable(self, indices) -> tuple[np.ndarray, int]:
        """``(kept, n_dropped)``: ``indices`` (int array of cache rows, order kept) without the
        entries that are not :attr:`ok`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.done)):
            raise IndexError(f"{self.path}: cache row index out of range 0..{len(self.done) - 1}")
        kept = idx[self.ok[idx]]
        return kept, int(len(idx) - len(kept))

    def index_of(self) -> dict[str, int]:
        """``{id: array index}``."""
        return {i: k for k, i in enumerate(self.manifest["id"])}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = state["_masks"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def open_cache(
    path: str | Path,
    *,
    size: int | None = None,
    fingerprint_: str | None = None,
    manifest: pd.DataFrame | None = None,
    require_complete: bool = True,
    allow_failed: bool = False,
) -> Cache:
    """Open a cache folder; raise :class:`CacheError` if it is missing, damaged, inconsistent,
    incomplete (``require_complete``), or does not match the expected ``size`` / ``manifest`` (or
    its ``fingerprint_``).

    ``allow_failed``: entries flagged FAILED (images that could not be decoded) do not make the
    cache incomplete; they are logged as a warning and readers skip them (:attr:`Cache.ok`,
    :meth:`Cache.usable`). Entries not built yet always do.
    """
    path = Path(path)
    meta = _opened_meta(path)
    n = meta["n"]
    stored = _opened_contents(path, meta)
    _check_expected(path, meta, size, fingerprint_, manifest)
    done, why = _load_flags(path, n)
    if done is None:
        raise CacheError(
            f"{path / 'done.npy'}: {why} (cache damaged): run src/preprocess.py again (it "
            "redoes the entries; add --force if that does not fix it)"
        )
    cache = Cache(path=path, manifest=stored, meta=meta, done=done)
    _check_built(cache, n, require_complete, allow_failed)
    return cache


def _opened_meta(path: Path) -> dict:
    """The cache's ``meta.json``; a missing, damaged or older-format one is a CacheError."""
    meta, why = _read_meta(path)
    if meta is None:
        if why == "missing":
            raise CacheError(f"no cache at {path} (meta.json missing): run src/preprocess.py first")
        raise CacheError(f"{path / 'meta.json'}: {why} (cache damaged): {_RERUN}")
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(
            f"{path}: cache format v{meta.get('version')}, expected v{CACHE_VERSION}: rebuild it "
            "with src/preprocess.py --force"
        )
    return meta


def _opened_contents(path: Path, meta: dict) -> pd.DataFrame:
    """The stored manifest, once it and both arrays are known to match ``meta``."""
    n, s = meta["n"], meta["size"]
    stored, why = _read_stored_manifest(path / "manifest.csv")
    if stored is None:
        raise CacheError(f"{path / 'manifest.csv'}: {why} (cache damaged): {_RERUN}")
    if len(stored) != n or fingerprint(stored, s) != meta["fingerprint"]:
        raise CacheError(
            f"{path / 'manifest.csv'}: does not match meta.json (cache damaged): {_RERUN}"
        )
    for name in ("images.npy", "masks.npy"):
        offset, why = _npy_layout(path / name, (n, s, s))
        if offset < 0:
            raise CacheError(f"{path / name}: {why} (cache damaged): {_RERUN}")
    return stored


def _check_expected(
    path: Path,
    meta: dict,
    size: int | None,
    fingerprint_: str | None,
    manifest: pd.DataFrame | None,
) -> None:
    """Refuse a cache of another size, or built from another manifest than the caller's."""
    s = meta["size"]
    if size is not None and int(size) != s:
        raise CacheError(
            f"{path}: cache size is {s}, expected {size}: build it with src/preprocess.py "
            f"cache.size={size}"
        )
    if manifest is not None:
        fingerprint_ = fingerprint(manifest, s)
    if fingerprint_ is not None and fingerprint_ != meta["fingerprint"]:
        raise CacheError(
            f"{path}: built from a different manifest than the current data; rebuild it with "
            "src/preprocess.py"
        )


def _check_built(cache: Cache, n: int, require_complete: bool, allow_failed: bool) -> None:
    """With ``require_complete``: refuse entries not built yet, and failed ones unless
    ``allow_failed`` (then they are logged)."""
    path, done = cache.path, cache.done
    failed = cache.failed_ids
    todo = int((done == TODO).sum())
    if require_complete and todo:
        raise CacheError(
            f"{path}: cache incomplete: {todo} entr(ies) not built"
            + (f", {len(failed)} failed" if failed else "")
            + "; run src/preprocess.py again (it resumes)"
        )
    if failed and require_complete:  # (build_cache reports its own failures)
        listed = ", ".join(failed[:_SHOW]) + (", ..." if len(failed) > _SHOW else "")
        if not allow_failed:
            raise CacheError(
                f"{path}: {len(failed)} image(s) failed to decode when the cache was built "
                f"({listed}); fix or remove those files and run src/preprocess.py again (it "
                "retries them), or set data.strict=false to use the cache without them"
            )
        log.warning(
            "%s: %d of %d image(s) failed to decode and are left out (%s)",
            path,
            len(failed),
            n,
            listed,
        )


def open_cache_for(cfg: Mapping[str, Any], split: str = "train", **kwargs) -> Cache:
    """Open the cache a config points at (``cache.dir``, ``cache.size``, dataset, split).

    Unless ``allow_failed`` is given, entries that failed to decode are allowed (and logged) when
    ``data.strict`` is false, an error when it is true.
    """
    kwargs.setdefault("allow_failed", not bool(cfg["data"].get("strict", False)))
    return open_cache(cache_dir(cfg, split), size=int(cfg["cache"]["size"]), **kwargs)


# ==================================================================================================
# Builder
# ==================================================================================================
def build_cache(
    cfg: Mapping[str, Any],
    split: str = "train",
    *,
    force: bool = False,
    manifest: pd.DataFrame | None = None,
    n_jobs: int | None = None,
    chunk_size: int | None = None,
    on_written: Callable[[int], None] | None = None,
) -> Cache:
    """Build (or resume, or verify) the cache for ``split`` of the dataset in ``cfg``.

    ``manifest`` defaults to :func:`pneumoseg.data.dataset.build_manifest` of ``cfg["data"]``. ``force``
    rebuilds from scratch. ``on_written(i)`` is called after entry ``i`` is written to its file
    and before its flag is set (tests use it to simulate a crash). Entries not done — never built,
    interrupted, or FAILED before (retried: the image may have been fixed) — are (re)processed.
    Decode failures are flagged, summarised, and raise :class:`CacheError` when ``data.strict`` is
    true. Not enough disk space raises :class:`DiskSpaceError` before anything is written (see
    "Disk space" above); the cache stays resumable.
    """
    ccfg, dcfg = cfg["cache"], cfg["data"]
    size = int(ccfg["size"])
    if size <= 0:
        raise ValueError(f"cache.size must be positive, got {size}")
    if manifest is None:
        manifest = build_manifest(dcfg, split)
    if len(manifest) == 0:
        raise CacheError(f"the {split} manifest is empty: nothing to cache")
    path = cache_dir(cfg, split, size)
    # One builder at a time (preprocess.py, predict.py, a second terminal): the next one waits,
    # then finds the cache built and reuses it instead of writing the same arrays at once.
    with exclusive(lock_file_for(path), f"the cache {path}", wait=True):
        return _build_locked(cfg, split, path, manifest, force, n_jobs, chunk_size, on_written)


def _build_locked(cfg, split, path, manifest, force, n_jobs, chunk_size, on_written) -> Cache:
    """:func:`build_cache` while holding the cache's lock."""
    ccfg, dcfg = cfg["cache"], cfg["data"]
    size = int(ccfg["size"])
    meta = _meta(manifest, size, cfg, split)
    n = len(manifest)

    reason = None if force else _mismatch(path, meta)
    fresh = force or reason is not None
    plan: _SpacePlan | None = None  # set before anything is written
    try:
        if fresh:
            _announce_rebuild(path, reason, force, ccfg)
            plan = _plan_space(path, manifest, np.arange(n), size, fresh=True)
            old = _old_cache_bytes(path)
            _check_space(path, plan, size, n, credit=old)  # before the old cache is deleted
            _init(path, manifest, meta)
            done = np.zeros(n, dtype=np.uint8)
        else:
            done = _resumed_flags(path, n)
            plan = _plan_space(path, manifest, np.flatnonzero(done != DONE), size, fresh=False)
            if (done != DONE).any():
                _check_space(path, plan, size, n)  # before anything is written
            _refresh_stored_manifest(path, manifest)

        todo = np.flatnonzero(done != DONE)
        stats = {"n": n, "processed": 0, "skipped": n - len(todo), "failed": 0}
        if len(todo) == 0:
            log.info("%s: cache up to date (%d images at %d²): nothing to do", path, n, size)
            cache = open_cache(path, require_complete=False)
            cache.last_build = stats
            return cache

        if stats["skipped"]:
            log.info("%s: resuming: %d done, %d to do", path, stats["skipped"], len(todo))
        _reserve(path, plan, size, n)
        failures = _fill(
            path, manifest, done, todo, size, ccfg, n_jobs, chunk_size, on_written, stats
        )
    except OSError as e:
        if e.errno not in _NOSPACE or plan is None:
            raise
        where = f" ({e.filename})" if e.filename else ""
        text = _space_text(path, plan.need, free_bytes(path), size, n, where, e.strerror or "")
        raise DiskSpaceError(text) from None
    log.info(
        "%s: %d processed, %d skipped (already done), %d failed",
        path,
        stats["processed"],
        stats["skipped"],
        stats["failed"],
    )
    cache = open_cache(path, require_complete=False)
    cache.last_build = stats
    if failures:
        _report_failures(path, failures, bool(dcfg.get("strict", False)))
    return cache


def _announce_rebuild(path: Path, reason: str | None, force: bool, ccfg: Mapping[str, Any]) -> None:
    """Before a cache in ``path`` is rebuilt: say why, or refuse when ``reason`` (why it cannot
    be reused) is not ``force`` and ``cache.rebuild_on_change`` is off."""
    exists = any((path / name).exists() for name in _FILES)
    if exists and not force:
        if not ccfg.get("rebuild_on_change", True):
            raise CacheError(
                f"{path}: existing cache cannot be reused: {reason}. Rebuild with --force "
                "(or set cache.rebuild_on_change=true)"
            )
        log.warning("%s: existing cache cannot be reused (%s): rebuilding", path, reason)
    elif exists:
        log.info("%s: --force: rebuilding", path)


def _old_cache_bytes(path: Path) -> int:
    """Disk the cache in ``path`` occupies now (its files and array temp files): freed by the
    rebuild, so credited in its space check."""
    old = sum(_allocated(path / name) for name in _FILES)
    old += sum(_allocated(path / f".{name}.tmp") for name in ("images.npy", "masks.npy"))
    return old


def _resumed_flags(path: Path, n: int) -> np.ndarray:
    """The done flags of a cache being resumed; unusable ones mean every entry is redone."""
    done, why = _load_flags(path, n)
    if done is None:
        log.warning("%s: %s: every entry is redone", path / "done.npy", why)
        done = np.zeros(n, dtype=np.uint8)
    return done


def _refresh_stored_manifest(path: Path, manifest: pd.DataFrame) -> None:
    """Rewrite a resumed cache's ``manifest.csv`` when it is unreadable or differs."""
    stored, why = _read_stored_manifest(path / "manifest.csv")
    if stored is None:  # meta.json's fingerprint matches: the arrays are this manifest's
        log.warning("%s: %s: rewritten from the current data", path / "manifest.csv", why)
    if stored is None or not stored.equals(manifest):  # also: same content, moved data
        _save_manifest(manifest, path / "manifest.csv")


def _report_failures(path: Path, failures: list[tuple[str, str]], strict: bool) -> None:
    """Images that could not be cached: an error when ``strict`` (``data.strict``), else a
    warning (they are flagged FAILED and readers leave them out)."""
    shown = "; ".join(f"{i}: {e[:120]}" for i, e in failures[:_SHOW])
    text = f"{path}: {len(failures)} image(s) could not be cached: {shown}"
    if strict:
        raise CacheError(
            f"{text}. Fix or remove those files and run src/preprocess.py again (it retries "
            "them), or set data.strict=false to go on without them"
        )
    log.warning("%s (flagged as failed; excluded by readers)", text)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    """Write all of ``data`` at ``offset``: a full disk is an ``OSError`` (a memmap: SIGBUS)."""
    view = memoryview(np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
    while view:
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k


def _fill(
    path: Path,
    manifest: pd.DataFrame,
    done: np.ndarray,
    todo: np.ndarray,
    size: int,
    ccfg: Mapping[str, Any],
    n_jobs: int | None,
    chunk_size: int | None,
    on_written: Callable[[int], None] | None,
    stats: dict,
) -> list[tuple[str, str]]:
    from joblib import Parallel, delayed, effective_n_jobs
    from tqdm.auto import tqdm

    n_jobs = int(n_jobs if n_jobs is not None else ccfg.get("n_jobs", -1))
    workers = max(1, min(effective_n_jobs(n_jobs), len(todo)))
    chunk = int(chunk_size or max(64, 16 * workers))
    rows = manifest.to_dict("records")
    shape, row = (len(manifest), size, size), size * size
    offsets = {}
    for name in ("images.npy", "masks.npy"):
        offsets[name], why = _npy_layout(path / name, shape)
        if offsets[name] < 0:  # checked by _mismatch/_init: only if changed meanwhile
            raise CacheError(f"{path / name}: {why} (cache damaged): {_RERUN}")
    failures: list[tuple[str, str]] = []
    mode = "generator_unordered" if workers > 1 else "generator"
    log.info("%s: caching %d image(s) at %d² with %d worker(s)", path, len(todo), size, workers)
    fi = os.open(path / "images.npy", os.O_RDWR)
    try:
        fm = os.open(path / "masks.npy", os.O_RDWR)
    except BaseException:
        os.close(fi)
        raise
    try:
        with (
            Parallel(n_jobs=workers, return_as=mode) as parallel,
            tqdm(total=len(todo), desc=f"cache {path.name}", unit="img", disable=None) as bar,
        ):
            for start in range(0, len(todo), chunk):
                idx = todo[start : start + chunk]
                ok, bad = [], []
                for i, img, mask, err in parallel(
                    delayed(_process)(int(i), rows[i], size) for i in idx
                ):
                    if err:
                        bad.append(i)
                        failures.append((rows[i]["id"], err))
                    else:
                        _pwrite_all(fi, img, offsets["images.npy"] + i * row)
                        at = offsets["masks.npy"] + i * row
                        # never-positive rows are not written: their blocks stay unallocated
                        if mask.any() or np.frombuffer(os.pread(fm, row, at), np.uint8).any():
                            _pwrite_all(fm, mask, at)
                        ok.append(i)
                    if on_written is not None:
                        on_written(int(i))
                    bar.update(1)
                os.fsync(fi)  # entries on disk before their flags
                os.fsync(fm)
                done[ok] = DONE
                done[bad] = FAILED
                _save_flags(path, done)
                stats["processed"] += len(ok)
                stats["failed"] += len(bad)
    finally:
        os.close(fi)
        os.close(fm)
    return failures
