"""The preprocessing cache: contents, resumability, crash safety, change detection, the CLI."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoseg.config import load_config
from pneumoseg.data import cache as pcache
from pneumoseg.data.cache import (
    CacheError,
    build_cache,
    cache_dir,
    open_cache,
    open_cache_for,
    resize_image,
    resize_mask,
)
from pneumoseg.data.dataset import read_image, read_mask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_io_data import make_png_set, png_cfg  # noqa: E402


def make_cfg(tmp_path: Path, data: dict, size: int = 32, **cache_kw) -> dict:
    cfg = load_config()
    cfg["data"].update(data)
    cfg["cache"].update({"dir": str(tmp_path / "cache"), "size": size, "n_jobs": 1, **cache_kw})
    return cfg


@pytest.fixture
def png_root(tmp_path) -> Path:
    return make_png_set(tmp_path / "pngs", n=12, size=64)


def expected_arrays(cache) -> tuple[np.ndarray, np.ndarray]:
    rows = cache.manifest.to_dict("records")
    imgs = np.stack([resize_image(read_image(r), cache.size) for r in rows])
    masks = np.stack([resize_mask(read_mask(r), cache.size) for r in rows])
    return imgs, masks


def count_process(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = pcache._process

    def counting(i, row, size):
        calls.append(i)
        return real(i, row, size)

    monkeypatch.setattr(pcache, "_process", counting)
    return calls


def test_resize_mask_rule():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2] = 1  # full 2×2 block -> 1
    mask[0, 4:6] = 1  # half-covered block -> 1 (>= 0.5)
    mask[4, 4] = 1  # quarter -> 0
    out = resize_mask(mask, 4)
    assert out.dtype == np.uint8 and out[0, 0] == 1 and out[0, 2] == 1 and out[2, 2] == 0
    assert resize_mask(mask, 8).tolist() == mask.tolist()
    assert resize_image(np.full((10, 10), 9, np.uint8), 5).tolist() == [[9] * 5] * 5


def test_build_contents_and_second_run_does_nothing(png_root, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    calls = count_process(monkeypatch)
    cache = build_cache(cfg, "train")
    assert len(calls) == 12 and cache.last_build["processed"] == 12
    assert cache.path == tmp_path / "cache" / "pngs-png_train_32" == cache_dir(cfg, "train")
    assert cache.complete and cache.images.shape == (12, 32, 32) == cache.masks.shape
    imgs, masks = expected_arrays(cache)
    assert np.array_equal(cache.images, imgs) and np.array_equal(cache.masks, masks)
    assert cache.masks.sum() > 0 and set(np.unique(cache.masks)) <= {0, 1}
    # the manifest is stored with original sizes; meta describes the cache
    assert (cache.manifest["height"] == 64).all() and len(cache.manifest) == 12
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["size"] == 32 and meta["n"] == 12 and len(meta["fingerprint"]) == 64

    stamps = {f: (cache.path / f).stat().st_mtime_ns for f in pcache._FILES}
    calls.clear()
    again = build_cache(cfg, "train")
    assert calls == [] and again.last_build == {"n": 12, "processed": 0, "skipped": 12, "failed": 0}
    assert stamps == {f: (cache.path / f).stat().st_mtime_ns for f in pcache._FILES}

    opened = open_cache_for(cfg, "train")
    assert np.array_equal(opened.images, imgs)
    clone = pickle.loads(pickle.dumps(opened))  # DataLoader workers: arrays reopened lazily
    assert len(pickle.dumps(opened)) < 100_000 and np.array_equal(clone.masks, masks)
    assert opened.index_of()[opened.manifest["id"][3]] == 3


def test_real_dicom_cache_matches_direct_reading(real_dir, tmp_path):
    data = {
        "root": str(real_dir / "sample_images"),
        "train_images": ".",
        "rle_csv": "train-rle-sample.csv",
    }
    cache = build_cache(make_cfg(tmp_path, data, size=128, n_jobs=2), "train")
    assert cache.n == 10 and cache.complete
    imgs, masks = expected_arrays(cache)
    assert np.array_equal(cache.images, imgs) and np.array_equal(cache.masks, masks)
    pos = cache.manifest["has_mask"].to_numpy()
    assert (cache.masks[pos].reshape(5, -1).sum(1) > 0).all()
    assert cache.masks[~pos].sum() == 0


def _interrupt_after_six(cfg) -> Path:
    """Build with chunks of 4 and a simulated crash after the 6th entry is written; the path."""
    written: list[int] = []

    def crash(i):
        written.append(i)
        if len(written) == 6:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, "train", chunk_size=4, on_written=crash)
    return cache_dir(cfg, "train")


def test_interrupted_run_resumes_and_matches(png_root, tmp_path, monkeypatch):
    ref = build_cache(make_cfg(tmp_path / "ref", png_cfg(png_root)), "train")
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    path = _interrupt_after_six(cfg)
    done = np.load(path / "done.npy")
    assert int((done == 1).sum()) == 4  # the first chunk; entries 5-6 written but not flagged
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(path)
    calls = count_process(monkeypatch)
    cache = build_cache(cfg, "train")
    assert sorted(calls) == list(range(4, 12)) and cache.last_build["skipped"] == 4
    assert np.array_equal(cache.images, ref.images) and np.array_equal(cache.masks, ref.masks)
    assert cache.manifest.equals(ref.manifest)


KILL_SCRIPT = """
import json, os, sys
from pneumoseg.data.cache import build_cache
cfg = json.loads(sys.argv[1])
n = []
def die(i):
    n.append(i)
    if len(n) == 7:
        os._exit(137)  # no cleanup, no flush: like SIGKILL
build_cache(cfg, "train", chunk_size=3, on_written=die)
"""


def test_killed_process_resumes(png_root, tmp_path):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg)], env=env, capture_output=True
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    path = cache_dir(cfg, "train")
    assert int((np.load(path / "done.npy") == 1).sum()) == 6
    cache = build_cache(cfg, "train")
    assert cache.last_build["processed"] == 6 and cache.complete
    imgs, masks = expected_arrays(cache)
    assert np.array_equal(cache.images, imgs) and np.array_equal(cache.masks, masks)


def test_changed_manifest_or_size_is_detected(png_root, tmp_path, caplog):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    first = build_cache(cfg, "train")
    path = first.path
    # the same folder name at another size is another cache; asking for the wrong size fails
    with pytest.raises(CacheError, match="size is 32, expected 64"):
        open_cache(path, size=64)
    big = build_cache(make_cfg(tmp_path, png_cfg(png_root), size=48), "train")
    assert big.path.name == "pngs-png_train_48" and big.images.shape == (12, 48, 48)

    # drop a row from the index: the manifest changes
    index = pd.read_csv(png_root / "stage_1_train_images.csv")
    index.iloc[1:].to_csv(png_root / "stage_1_train_images.csv", index=False)
    from pneumoseg.data.dataset import build_manifest

    new_manifest = build_manifest(cfg["data"], "train")
    with pytest.raises(CacheError, match="different manifest"):
        open_cache(path, manifest=new_manifest)
    strict_cfg = make_cfg(tmp_path, png_cfg(png_root), rebuild_on_change=False)
    with pytest.raises(CacheError, match="cannot be reused"):
        build_cache(strict_cfg, "train")
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.cache"):
        rebuilt = build_cache(cfg, "train")
    assert "rebuilding" in caplog.text and rebuilt.n == 11 and rebuilt.last_build["processed"] == 11
    open_cache(path, manifest=new_manifest)

    # a mask changes (same ids): also a different manifest
    mask_file = png_root / "png_masks" / "3_train_1_.png"
    import cv2

    cv2.imwrite(str(mask_file), np.zeros((64, 64), np.uint8))
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.cache"):
        again = build_cache(cfg, "train")
    assert again.last_build["processed"] == 11
    # --force always rebuilds
    assert build_cache(cfg, "train", force=True).last_build["processed"] == 11


def test_damaged_cache_is_reported(png_root, tmp_path):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    cache = build_cache(cfg, "train")
    (cache.path / "manifest.csv").write_text(
        (cache.path / "manifest.csv").read_text().replace("1.2.3.train.0", "1.2.3.train.X")
    )
    with pytest.raises(CacheError, match="damaged"):
        open_cache(cache.path)
    (cache.path / "meta.json").unlink()
    with pytest.raises(CacheError, match=r"meta\.json missing"):
        open_cache(cache.path)
    assert build_cache(cfg, "train").last_build["processed"] == 12


def test_failed_images_are_flagged(png_root, tmp_path, caplog, monkeypatch):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    from pneumoseg.data.dataset import SegDataset, build_manifest

    manifest = build_manifest(cfg["data"], "train")
    bad = Path(manifest.loc[2, "image_path"])
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:40])  # header intact, pixels gone: only decoding notices
    bad_id = manifest.loc[2, "id"]
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.cache"):
        cache = build_cache(cfg, "train", manifest=manifest)
    assert cache.last_build["failed"] == 1 and cache.failed_ids == [bad_id]
    assert bad.name in caplog.text
    # a plain open_cache (and strict mode) refuses it, saying what to do
    with pytest.raises(CacheError, match=r"1 image\(s\) failed to decode.*data\.strict=false"):
        open_cache(cache.path)
    strict = make_cfg(tmp_path, png_cfg(png_root, strict=True))
    with pytest.raises(CacheError, match=bad_id):
        open_cache_for(strict, "train")
    # non-strict: it opens, with a warning naming the count and the id
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.cache"):
        opened = open_cache_for(cfg, "train")
    assert "1 of 12 image(s) failed to decode" in caplog.text and bad_id in caplog.text
    assert opened.ok.dtype == bool and opened.ok.tolist() == [k != 2 for k in range(12)]
    kept, dropped = opened.usable(np.array([5, 2, 0, 2]))
    assert kept.tolist() == [5, 0] and dropped == 2
    kept, dropped = opened.usable(np.arange(12))
    assert len(kept) == 11 and dropped == 1 and 2 not in kept
    with pytest.raises(IndexError):
        opened.usable([12])
    # the dataset refuses failed rows instead of serving blank images
    with pytest.raises(CacheError, match=rf"1 of the 12 selected entries.*{bad_id}"):
        SegDataset(opened, np.arange(12), 1)
    ds = SegDataset(opened, kept, 1)
    assert len(ds) == 11 and ds[0]["image"].shape == (1, 32, 32)

    # every build retries failed entries (the file may have been fixed) ...
    calls = count_process(monkeypatch)
    again = build_cache(cfg, "train", manifest=manifest)
    assert calls == [2] and again.last_build["failed"] == 1 and again.failed_ids == [bad_id]
    with pytest.raises(CacheError, match=bad.name):  # strict mode: an error
        build_cache(strict, "train", manifest=manifest)
    # ... and once it is fixed the cache is complete
    bad.write_bytes(good_bytes)
    calls.clear()
    fixed = build_cache(strict, "train", manifest=manifest)
    assert calls == [2] and fixed.complete and fixed.last_build["failed"] == 0
    imgs, masks = expected_arrays(fixed)
    assert np.array_equal(fixed.images, imgs) and np.array_equal(fixed.masks, masks)
    assert open_cache_for(strict, "train").ok.all()


# --------------------------------------------------------------------------------------------------
# Damaged cache files: a CacheError naming the file and what to do; the next build repairs them
# --------------------------------------------------------------------------------------------------
def _truncate(file: Path, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


DAMAGE = {
    # name: (damage(path), regex of open_cache's message, entries the next build processes)
    "images truncated": (lambda p: _truncate(p / "images.npy"), r"images\.npy: truncated", 12),
    "images empty": (lambda p: _truncate(p / "images.npy", 0), r"images\.npy: not a readable", 12),
    "masks garbage": (
        lambda p: (p / "masks.npy").write_bytes(b"\x93NUMPY\x01\x00garbage" * 9),
        r"masks\.npy: not a readable",
        12,
    ),
    "masks other shape": (
        lambda p: np.save(p / "masks.npy", np.zeros((3, 32, 32), np.uint8)),
        r"masks\.npy: holds uint8 3×32×32, expected uint8 12×32×32",
        12,
    ),
    "meta garbage": (
        lambda p: (p / "meta.json").write_bytes(b"\x00\xff{garbage"),
        r"meta\.json: unreadable",
        12,
    ),
    "meta list": (lambda p: (p / "meta.json").write_text("[1, 2]"), "not a JSON object", 12),
    "meta keys": (lambda p: (p / "meta.json").write_text('{"version": 1}'), "no valid 'size'", 12),
    "manifest garbage": (
        lambda p: (p / "manifest.csv").write_bytes(b'\x00\x01\x02\xff\xfe,,,\n"\n' * 50),
        r"manifest\.csv: not a readable manifest",
        0,  # meta.json still vouches for the arrays: the manifest is rewritten, nothing redone
    ),
    "manifest empty": (lambda p: _truncate(p / "manifest.csv", 0), r"manifest\.csv: not a", 0),
    "manifest other csv": (
        lambda p: (p / "manifest.csv").write_text("a,b\n1,2\n"),
        r"manifest\.csv: not a readable manifest.*lacks column",
        0,
    ),
    "done empty": (lambda p: _truncate(p / "done.npy", 0), r"done\.npy: unreadable", 12),
    "done other shape": (
        lambda p: np.save(p / "done.npy", np.ones(3, np.uint8)),
        r"done\.npy: holds uint8 \(3,\)",
        12,
    ),
    "done bad flags": (
        lambda p: np.save(p / "done.npy", np.full(12, 7, np.uint8)),
        r"done\.npy: holds flag values",
        12,
    ),
    "done missing": (lambda p: (p / "done.npy").unlink(), r"done\.npy: missing", 12),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_files_are_reported_and_repaired(png_root, tmp_path, caplog, kind):
    damage, message, redone = DAMAGE[kind]
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    path = build_cache(cfg, "train").path
    damage(path)
    for opener in (lambda: open_cache(path), lambda: open_cache_for(cfg, "train")):
        with pytest.raises(CacheError, match=message) as err:
            opener()
        assert str(path) in str(err.value) and "src/preprocess.py" in str(err.value)
    if redone == 12:  # damaged arrays or meta: a rebuild unless the config forbids it
        forbid = make_cfg(tmp_path, png_cfg(png_root), rebuild_on_change=False)
        if "done" not in kind:
            with pytest.raises(CacheError, match=r"cannot be reused.*--force"):
                build_cache(forbid, "train")
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.cache"):
        cache = build_cache(cfg, "train")
    assert cache.last_build["processed"] == redone and cache.complete
    reopened = open_cache(path)
    imgs, masks = expected_arrays(reopened)
    assert np.array_equal(reopened.images, imgs) and np.array_equal(reopened.masks, masks)


# --------------------------------------------------------------------------------------------------
# Disk space
# --------------------------------------------------------------------------------------------------
def _snapshot(path: Path) -> dict[str, bytes]:
    return {f: (path / f).read_bytes() for f in pcache._FILES}


def test_not_enough_space_for_a_new_cache(png_root, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    monkeypatch.setattr(pcache, "free_bytes", lambda path: 100 * 1024)
    with pytest.raises(pcache.DiskSpaceError) as err:
        build_cache(cfg, "train")
    text = str(err.value)
    assert isinstance(err.value, CacheError)
    path = cache_dir(cfg, "train")
    assert str(path) in text and "cache.dir" in text and "cache.size" in text
    assert re.search(r"needs about \d+\.\d MiB more, 100\.0 KiB are free", text), text
    assert not (path / "meta.json").exists() and not (path / "images.npy").exists()
    monkeypatch.undo()
    assert build_cache(cfg, "train").complete


def test_disk_full_on_resume_keeps_the_cache_resumable(png_root, tmp_path, monkeypatch):
    ref = build_cache(make_cfg(tmp_path / "ref", png_cfg(png_root)), "train")
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    path = _interrupt_after_six(cfg)
    before = _snapshot(path)
    assert int((np.load(path / "done.npy") == 1).sum()) == 4
    calls = count_process(monkeypatch)
    monkeypatch.setattr(pcache, "free_bytes", lambda path: 1000)
    with pytest.raises(pcache.DiskSpaceError, match=r"needs .* more, 1000 bytes are free") as err:
        build_cache(cfg, "train")
    assert str(path) in str(err.value) and calls == []
    assert _snapshot(path) == before  # flags, arrays, manifest, meta untouched
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(path)
    monkeypatch.setattr(pcache, "free_bytes", lambda path: 10 << 30)  # space freed
    cache = build_cache(cfg, "train")
    assert sorted(calls) == list(range(4, 12)) and cache.last_build["skipped"] == 4
    assert cache.complete
    assert np.array_equal(cache.images, ref.images) and np.array_equal(cache.masks, ref.masks)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_reservation_failure_is_a_disk_space_error(png_root, tmp_path, monkeypatch):
    import errno

    ref = build_cache(make_cfg(tmp_path / "ref", png_cfg(png_root)), "train")
    cfg = make_cfg(tmp_path, png_cfg(png_root))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(
        pcache.DiskSpaceError, match=r"filled up.*images\.npy.*needs .* more, .* free"
    ):
        build_cache(cfg, "train")
    path = cache_dir(cfg, "train")
    assert not np.load(path / "done.npy").any()
    monkeypatch.undo()
    cache = build_cache(cfg, "train")
    assert cache.complete and np.array_equal(cache.images, ref.images)


def test_disk_filled_while_writing_is_a_disk_space_error(png_root, tmp_path, monkeypatch):
    import errno

    ref = build_cache(make_cfg(tmp_path / "ref", png_cfg(png_root)), "train")
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    real, n = os.pwrite, []

    def filling(fd, data, offset):
        n.append(1)
        if len(n) > 7:  # someone else filled the disk after the check and the reservation
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(pcache.DiskSpaceError, match="No space left"):
        build_cache(cfg, "train", chunk_size=3)
    path = cache_dir(cfg, "train")
    done = np.load(path / "done.npy")
    assert 0 < int(done.sum()) < 12 and set(np.unique(done)) <= {0, 1}
    monkeypatch.undo()
    cache = build_cache(cfg, "train")
    assert cache.complete and cache.last_build["skipped"] == int(done.sum())
    assert np.array_equal(cache.images, ref.images) and np.array_equal(cache.masks, ref.masks)


def _sparse_files_supported(folder: Path) -> bool:
    probe = folder / "sparse.probe"
    with open(probe, "wb") as fh:
        fh.truncate(1 << 20)
    try:
        return os.stat(probe).st_blocks * 512 < (1 << 19)
    finally:
        probe.unlink()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_images_reserved_masks_stay_sparse(png_root, tmp_path):
    if not _sparse_files_supported(tmp_path):
        pytest.skip("no sparse files on this file system")
    cache = build_cache(make_cfg(tmp_path, png_cfg(png_root), size=128), "train")
    row, n_pos = 128 * 128, int(cache.manifest["has_mask"].sum())
    assert 0 < n_pos < 12
    assert (cache.path / "images.npy").stat().st_blocks * 512 >= 12 * row
    masks = (cache.path / "masks.npy").stat().st_blocks * 512
    assert n_pos * row <= masks <= n_pos * (row + 2 * 4096) + 4096 < 12 * row
    _, expected_masks = expected_arrays(cache)
    assert np.array_equal(cache.masks, expected_masks)


def test_free_bytes_and_human():
    assert pcache.free_bytes(Path("/definitely/not/here/x")) > 0  # the nearest existing parent
    assert pcache._human(1000) == "1000 bytes" and pcache._human(3 << 30) == "3.0 GiB"


def test_cli(png_root, tmp_path):
    args = [f"data.{k}={v}" for k, v in png_cfg(png_root).items()]
    args += [f"cache.dir={tmp_path / 'c'}", "cache.size=32", "cache.n_jobs=2", "oof.size=32"]
    cmd = [sys.executable, str(REPO / "src" / "preprocess.py"), "--split", "all", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 processed" in proc.stderr
    for split in ("train", "test"):
        assert open_cache(tmp_path / "c" / f"pngs-png_{split}_32").complete
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "0 processed, 12 already done" in proc.stderr
    bad = subprocess.run([*cmd, "cache.nope=1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key" in bad.stderr
