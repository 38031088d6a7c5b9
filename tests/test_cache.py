"""The preprocessing cache: contents, resumability, crash safety, change detection, the CLI."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoseg import cache as pcache
from pneumoseg.cache import (
    CacheError,
    build_cache,
    cache_dir,
    open_cache,
    open_cache_for,
    resize_image,
    resize_mask,
)
from pneumoseg.config import load_config
from pneumoseg.data import read_image, read_mask

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


def test_interrupted_run_resumes_and_matches(png_root, tmp_path, monkeypatch):
    ref = build_cache(make_cfg(tmp_path / "ref", png_cfg(png_root)), "train")
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    written: list[int] = []

    def crash(i):
        written.append(i)
        if len(written) == 6:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, "train", chunk_size=4, on_written=crash)
    path = cache_dir(cfg, "train")
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
from pneumoseg.cache import build_cache
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
    from pneumoseg.data import build_manifest

    new_manifest = build_manifest(cfg["data"], "train")
    with pytest.raises(CacheError, match="different manifest"):
        open_cache(path, manifest=new_manifest)
    strict_cfg = make_cfg(tmp_path, png_cfg(png_root), rebuild_on_change=False)
    with pytest.raises(CacheError, match="cannot be reused"):
        build_cache(strict_cfg, "train")
    with caplog.at_level(logging.WARNING, logger="pneumoseg.cache"):
        rebuilt = build_cache(cfg, "train")
    assert "rebuilding" in caplog.text and rebuilt.n == 11 and rebuilt.last_build["processed"] == 11
    open_cache(path, manifest=new_manifest)

    # a mask changes (same ids): also a different manifest
    mask_file = png_root / "png_masks" / "3_train_1_.png"
    import cv2

    cv2.imwrite(str(mask_file), np.zeros((64, 64), np.uint8))
    with caplog.at_level(logging.WARNING, logger="pneumoseg.cache"):
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


def test_failed_images_are_flagged(png_root, tmp_path, caplog):
    cfg = make_cfg(tmp_path, png_cfg(png_root))
    from pneumoseg.data import build_manifest

    manifest = build_manifest(cfg["data"], "train")
    bad = Path(manifest.loc[2, "image_path"])
    bad.write_bytes(bad.read_bytes()[:40])  # header intact, pixels gone: only decoding notices
    with caplog.at_level(logging.WARNING, logger="pneumoseg.cache"):
        cache = build_cache(cfg, "train", manifest=manifest)
    assert cache.last_build["failed"] == 1 and cache.failed_ids == [manifest.loc[2, "id"]]
    assert bad.name in caplog.text
    with pytest.raises(CacheError, match="1 failed"):
        open_cache(cache.path)
    cfg["data"]["strict"] = True
    with pytest.raises(CacheError, match=bad.name):
        build_cache(cfg, "train", manifest=manifest)


def test_cli(png_root, tmp_path):
    args = [f"data.{k}={v}" for k, v in png_cfg(png_root).items()]
    args += [f"cache.dir={tmp_path / 'c'}", "cache.size=16", "cache.n_jobs=2"]
    cmd = [sys.executable, str(REPO / "src" / "preprocess.py"), "--split", "all", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 processed" in proc.stderr
    for split in ("train", "test"):
        assert open_cache(tmp_path / "c" / f"pngs-png_{split}_16").complete
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "0 processed, 12 already done" in proc.stderr
    bad = subprocess.run([*cmd, "cache.nope=1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key" in bad.stderr
