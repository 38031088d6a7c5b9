"""MMSeg-style pooled mIoU/mDice on hand-computed cases, and tuning on a blend of experiments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pneumoseg.postprocessing.postprocess import PARAM_KEYS, evaluate_params, pooled_miou
from pneumoseg.training.oof import Oof, blend_oofs

from conftest import REPO, run_cli

RAW = {"method": "threshold", "threshold": 0.5, "min_area": 0}


def _oof(pred, truth, ids=None) -> Oof:
    pred, truth = np.asarray(pred, np.uint8), np.asarray(truth, np.uint8)
    return Oof(ids or [f"i{k}" for k in range(len(pred))], pred * 255, truth, None)


def test_pooled_miou_by_hand():
    """Source A: pred 2 px, truth 1 px, overlap 1 (of 4). Source B: pred none, truth 1 px.
    Pooled over both (MMSeg): pneumothorax I=1, U=3 -> IoU 1/3, Dice 2·1/(2+2) = 1/2;
    background I=5, U=7 -> IoU 5/7, Dice 2·5/(6+6) = 5/6."""
    a = _oof([[[1, 1], [0, 0]]], [[[1, 0], [0, 0]]])
    b = _oof([[[0, 0], [0, 0]]], [[[0, 0], [0, 1]]])
    rows = evaluate_params([a, b], RAW, area_scale=1.0, names=["a", "b"])
    pooled = pooled_miou(rows)
    assert pooled["IoU"] == pytest.approx([5 / 7, 1 / 3])
    assert pooled["Dice"] == pytest.approx([5 / 6, 1 / 2])
    assert pooled["mIoU"] == pytest.approx((5 / 7 + 1 / 3) / 2)
    assert pooled["mDice"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    # not the mean of the per-source numbers (A: ptx IoU 1/2, B: 0)
    assert rows["ptx_IoU"].tolist() == pytest.approx([1 / 2, 0.0])
    assert rows["mIoU"].mean() != pytest.approx(pooled["mIoU"])


@pytest.mark.parametrize(
    "pred,truth,iou,dice",
    [
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], [1.0, float("nan")], [1.0, float("nan")]),
        ([[1, 1], [1, 1]], [[1, 1], [1, 1]], [float("nan"), 1.0], [float("nan"), 1.0]),
        ([[1, 0], [0, 0]], [[0, 0], [0, 1]], [2 / 4, 0.0], [4 / 6, 0.0]),
    ],
)
def test_pooled_edge_cases(pred, truth, iou, dice):
    """A class absent from both prediction and truth is NaN and left out of the mean (MMSeg)."""
    rows = evaluate_params([_oof([pred], [truth])], RAW, area_scale=1.0, names=["x"])
    pooled = pooled_miou(rows)
    np.testing.assert_allclose(pooled["IoU"], iou)
    np.testing.assert_allclose(pooled["Dice"], dice)
    assert pooled["mIoU"] == pytest.approx(np.nanmean(iou))


def test_blend_oofs_is_the_weighted_mean_and_checks_ids():
    a = Oof(["x", "y"], np.full((2, 4, 4), 100, np.uint8), np.zeros((2, 4, 4), np.uint8), None)
    b = Oof(["x", "y"], np.full((2, 4, 4), 200, np.uint8), np.zeros((2, 4, 4), np.uint8), None)
    m = blend_oofs([a, b], [1.0, 3.0], ["a", "b"])
    assert (m.probs == 175).all() and m.ids == ["x", "y"]
    c = Oof(["y", "x"], a.probs, a.truth, None)
    with pytest.raises(ValueError, match="other images"):
        blend_oofs([a, c], [1, 1], ["a", "c"])


def _write_oof(folder, ids, probs, truth):
    folder.mkdir(parents=True)
    np.save(folder / "oof_probs.npy", probs)
    np.save(folder / "oof_truth.npy", truth)
    pd.DataFrame({"id": ids}).to_csv(folder / "oof_ids.csv", index=False)


def test_oof_tune_tunes_the_blend(tmp_path):
    """Two experiments' OOF maps: tuning the blend config scores the weighted mean of the maps
    (what predict.py ensembles) and writes the blend's own postprocess.yaml."""
    rng = np.random.default_rng(0)
    n, s = 40, 32
    truth = np.zeros((n, s, s), np.uint8)
    truth[: n // 2, 8:20, 8:20] = 1
    ids = [f"id{k}" for k in range(n)]
    pa = np.clip(truth * 150 + rng.integers(0, 120, truth.shape), 0, 255).astype(np.uint8)
    pb = np.clip(truth * 90 + rng.integers(0, 170, truth.shape), 0, 255).astype(np.uint8)
    runs = tmp_path / "runs"
    _write_oof(runs / "a" / "fold0", ids, pa, truth)
    _write_oof(runs / "b" / "fold0", ids, pb, truth)
    over = [f"train.out_dir={runs}", "exp=blend", "predict.experiments=[[a, 1], [b, 3]]",
            "tune.folds=[0]", "folds.n_folds=2"]  # fmt: skip
    code, out = run_cli("oof_tune", "--config", str(REPO / "configs" / "demo.yaml"), *over)
    assert code == 0, out
    assert "tuning the blend a × 1, b × 3" in out
    params = yaml.safe_load((runs / "blend" / "postprocess.yaml").read_text())
    assert params["experiments"] == [["a", 1.0], ["b", 3.0]]
    blend = blend_oofs([Oof(ids, pa, truth, None), Oof(ids, pb, truth, None)], [1, 3], ["a", "b"])
    chosen = {k: params[k] for k in PARAM_KEYS if params.get(k) is not None}
    again = evaluate_params([blend], chosen, names=["fold0"])
    assert again["dice"].iloc[0] == pytest.approx(params["cv_dice"], abs=1e-6)


@pytest.mark.parametrize("size", [1024, 256])
def test_png_layout_on_real_vbookshelf_pairs(real_dir, tmp_path, size):
    """The real vbookshelf pairs through the PNG layout: every cached mask equals its RLE in
    masks.csv decoded (and resized like the cache resizes masks), and instances for Mask R-CNN
    come from the mask's connected components (masks are 0/255: any value > 0 is foreground)."""
    from pneumoseg.config import load_config
    from pneumoseg.data.cache import build_cache, resize_mask
    from pneumoseg.data.dataset import instance_masks
    from pneumoseg.data.rle import rle_decode

    root = real_dir / "vbookshelf_sample"
    cfg = load_config(None, [
        "data.layout=png", f"data.root={root}", "data.train_images=png_images",
        "data.train_masks=png_masks", "data.patient_map=null", f"cache.dir={tmp_path}",
        f"cache.size={size}", "cache.n_jobs=1",
    ])  # fmt: skip
    cache = build_cache(cfg, "train")
    truth = pd.read_csv(root / "masks.csv", dtype=str).set_index("ImageId")
    assert cache.n == 4 and cache.manifest["has_mask"].all()
    for k, image_id in enumerate(cache.manifest["id"]):
        full = rle_decode(truth.loc[image_id, "EncodedPixels"], (1024, 1024))
        assert int(full.sum()) == int(truth.loc[image_id, "mask_px"])
        np.testing.assert_array_equal(cache.masks[k], resize_mask(full, size))
        parts = instance_masks(cache, k, np.array(cache.masks[k]))
        assert parts and np.array_equal(np.maximum.reduce(parts), cache.masks[k])
