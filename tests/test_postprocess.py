"""Post-processing: apply_postprocess, the fast grid search against the naive one, oof_tune.py."""

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pneumoseg.postprocessing.postprocess import (
    Grid,
    ParamsError,
    apply_postprocess,
    area_scale_for,
    best_rows,
    evaluate_params,
    load_params,
    naive_search,
    pick_best,
    row_params,
    save_params,
    search,
    u8_cut,
)

from conftest import run_script, tiny_overrides


# ------------------------------------------------------------------------------ apply_postprocess
def test_area_scale_and_u8_cut():
    assert area_scale_for(1024) == 1.0
    assert area_scale_for(256) == 1 / 16
    for t in (0.0, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0):
        u = np.arange(256)
        np.testing.assert_array_equal(u > u8_cut(t), u / 255 > t)


def test_threshold_float_and_uint8_agree():
    rng = np.random.default_rng(0)
    p = rng.random((40, 40)).astype(np.float32)
    u = np.round(p * 255).astype(np.uint8)
    params = {"method": "threshold", "threshold": 0.5, "min_area": 0}
    m = apply_postprocess(p, params)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    np.testing.assert_array_equal(m, p > 0.5)
    np.testing.assert_array_equal(apply_postprocess(u, params), u / 255 > 0.5)


# A pixel exactly at the threshold is background: mask = p > t, never p >= t. Float maps with
# thresholds that are exact binary fractions, and uint8 maps at the levels u = 255 t exactly.
@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_value_at_the_threshold_is_background(t, dtype):
    above, below = np.nextafter(dtype(t), dtype(1)), np.nextafter(dtype(t), dtype(0))
    p = np.array([[t, above, below, t]], dtype)
    m = apply_postprocess(p, {"method": "threshold", "threshold": t, "min_area": 0})
    np.testing.assert_array_equal(m, [[0, 1, 0, 0]])
    # triplet: two pixels at T_top and one above: 1 counts, so top_area 2 leaves the image empty
    trip = {"method": "triplet", "top_threshold": t, "top_area": 2, "bottom_threshold": t}
    assert apply_postprocess(p, trip).sum() == 0
    np.testing.assert_array_equal(apply_postprocess(p, {**trip, "top_area": 1}), [[0, 1, 0, 0]])


# (threshold, its uint8 level: u / 255 == t exactly)
U8_LEVELS = [(0.0, 0), (0.2, 51), (0.4, 102), (0.6, 153), (0.8, 204), (1.0, 255)]


@pytest.mark.parametrize("t,level", U8_LEVELS)
def test_uint8_level_at_the_threshold_is_background(t, level):
    assert level / 255 == t
    u = np.array([[max(level - 1, 0), level, min(level + 1, 255), level]], np.uint8)
    want = (u.astype(np.int64) > level).astype(np.uint8)  # only level + 1 (none at t = 1)
    assert want.sum() == (0 if level == 255 else 1)
    m = apply_postprocess(u, {"method": "threshold", "threshold": t, "min_area": 0})
    np.testing.assert_array_equal(m, want)
    # the float path says the same of the same probabilities
    f = apply_postprocess(u / 255, {"method": "threshold", "threshold": t, "min_area": 0})
    np.testing.assert_array_equal(f, want)
    trip = {"method": "triplet", "top_threshold": t, "top_area": 1, "bottom_threshold": t}
    np.testing.assert_array_equal(apply_postprocess(u, trip), want)


def test_search_counts_pixels_at_the_threshold_as_background():
    """Truth: 4 px at level 52; 4 more px exactly at 51 (= 0.2): at threshold 0.2 the mask is
    the truth (Dice 1); counting the level-51 pixels would give 2·4 / (8 + 4)."""
    u = np.zeros((1, 8, 8), np.uint8)
    t = np.zeros((1, 8, 8), np.uint8)
    u[0, 1:3, 1:3] = 52
    t[0, 1:3, 1:3] = 1
    u[0, 5:7, 5:7] = 51
    grids = {"thresholds": [0.2], "min_areas": [0], "top_thresholds": [0.2], "top_areas": [5],
             "bottom_thresholds": [0.2]}  # fmt: skip
    for res in (search([(u, t)], grids, 1.0), naive_search([(u, t)], grids, 1.0)):
        thr = res[res["family"] == "threshold"]["dice"].iloc[0]
        trip = res[res["family"] == "triplet"]["dice"].iloc[0]
        assert (thr, trip) == (pytest.approx(1.0), pytest.approx(0.0))  # 4 px < top_area 5


def test_min_area_is_scaled_to_the_map_size():
    p = np.zeros((256, 256), np.float32)
    p[10:12, 10:12] = 0.9  # 4 px
    p[50:53, 50] = 0.9  # 3 px
    p[100, 100] = p[101, 101] = 0.9  # 2 px, diagonal: one component with 8-connectivity
    params = {"method": "threshold", "threshold": 0.5, "min_area": 64}  # 64 px at 1024² = 4 at 256²
    m = apply_postprocess(p, params, area_scale=area_scale_for(256))
    assert m.sum() == 4 and m[10:12, 10:12].all()
    # at full scale the same setting removes everything; with min_area 48 (= 3 px) only the 2-px one
    assert apply_postprocess(p, params).sum() == 0
    m = apply_postprocess(p, {**params, "min_area": 48}, area_scale=1 / 16)
    assert m.sum() == 7 and m[100, 100] == 0


def test_triplet_empty_and_not():
    p = np.zeros((64, 64), np.float32)
    p[20:30, 20:30] = 0.4
    p[24:26, 24:26] = 0.9  # 4 confident pixels
    params = {"method": "triplet", "top_threshold": 0.8, "top_area": 4, "bottom_threshold": 0.3}
    m = apply_postprocess(p, params)
    assert m.sum() == 100  # fires: the whole faint region at the bottom threshold
    assert apply_postprocess(p, {**params, "top_area": 5}).sum() == 0
    assert apply_postprocess(p, {**params, "top_area": 64}, area_scale=1 / 16).sum() == 100
    assert apply_postprocess(p, {**params, "top_threshold": 0.95}).sum() == 0
    assert apply_postprocess(p, {**params, "top_area": 0, "top_threshold": 0.95}).sum() == 100
    assert apply_postprocess(p, {**params, "min_area": 101}).sum() == 0


def test_cls_gate():
    p = np.full((8, 8), 0.9, np.float32)
    params = {"method": "threshold", "threshold": 0.5, "min_area": 0, "cls_threshold": 0.6}
    assert apply_postprocess(p, params, cls_prob=0.5).sum() == 0
    assert apply_postprocess(p, params, cls_prob=0.6).sum() == 64
    assert apply_postprocess(p, params).sum() == 64  # no aux probability: no gate
    assert apply_postprocess(p, {**params, "cls_threshold": None}, cls_prob=0.0).sum() == 64


def test_bad_inputs():
    with pytest.raises(ValueError, match="one H×W map"):
        apply_postprocess(np.zeros((2, 4, 4)), {"method": "threshold", "threshold": 0.5})
    with pytest.raises(ParamsError, match="unknown post-processing method"):
        apply_postprocess(np.zeros((4, 4)), {"method": "otsu"})


# ------------------------------------------------------------------------------ parameters on disk
def test_params_roundtrip_and_validation(tmp_path):
    params = {
        "method": "triplet",
        "top_threshold": np.float64(0.8),
        "top_area": 1024.0,
        "bottom_threshold": 0.3,
        "cls_threshold": None,
        "oof_size": 256,
        "cv_dice": 0.85,
    }
    path = save_params(params, tmp_path / "pp.yaml")
    back = load_params(path)
    assert back["method"] == "triplet" and back["top_area"] == 1024 and back["min_area"] == 0
    assert back["threshold"] is None and back["cv_dice"] == 0.85
    assert yaml.safe_load(path.read_text())["top_threshold"] == 0.8
    (tmp_path / "bad.yaml").write_text("method: threshold\nthreshold: 0.5\nmin_aera: 64\nfoo: 1\n")
    with pytest.raises(ParamsError, match=r"\['foo', 'min_aera'\]"):
        load_params(tmp_path / "bad.yaml")
    with pytest.raises(ParamsError, match="needs \\['top_area'\\]"):
        save_params({"method": "triplet", "top_threshold": 0.8, "bottom_threshold": 0.3}, path)
    with pytest.raises(ParamsError, match="'threshold' must lie in"):
        save_params({"method": "threshold", "threshold": 1.5}, path)
    assert load_params(path) == back  # failed saves left the file alone


# ------------------------------------------------------------------------------ the search
def hand_made():
    """3 images at 32² (areas at scale 1), scored by hand in test_search_finds_the_hand_made_best."""
    p = np.zeros((3, 32, 32), np.float32)
    t = np.zeros((3, 32, 32), np.uint8)
    # A: empty truth; a faint 8×8 spurious blob (p 0.4) with a 2×2 core at 0.6
    p[0, 2:10, 2:10] = 0.4
    p[0, 5:7, 5:7] = 0.6
    # B: a large confident lesion
    t[1, 10:20, 10:20] = 1
    p[1, 10:20, 10:20] = 0.95
    # C: a faint 6×6 lesion (0.35) with a 2×2 confident core (0.9)
    t[2, 20:26, 20:26] = 1
    p[2, 20:26, 20:26] = 0.35
    p[2, 22:24, 22:24] = 0.9
    u = np.round(p * 255).astype(np.uint8)
    cls = np.array([0.2, 0.9, 0.7], np.float32)
    grids = {
        "thresholds": [0.3, 0.5],
        "min_areas": [0, 16, 100],
        "top_thresholds": [0.5, 0.8, 0.97],
        "top_areas": [0, 4, 50],
        "bottom_thresholds": [0.3, 0.5],
        "cls_thresholds": [0.5],
    }
    return u, t, cls, grids


def test_search_finds_the_hand_made_best():
    u, t, cls, grids = hand_made()
    res = search([(u, t, cls)], grids, area_scale=1.0)
    assert len(res) == 2 * (2 * 3 + 3 * 3 * 2)

    def dice(**kw):
        sel = np.ones(len(res), bool)
        for k, v in kw.items():
            sel &= res[k].isna().to_numpy() if v is None else (res[k] == v).to_numpy()
        assert sel.sum() == 1, kw
        return float(res.loc[sel, "dice"].iloc[0])

    # threshold 0.3 keeps A's blob (0) and all of C (1); min_area 100 kills A and C but keeps B
    assert dice(family="threshold", threshold=0.3, min_area=0) == pytest.approx(2 / 3)
    assert dice(family="threshold", threshold=0.3, min_area=100) == pytest.approx(2 / 3)
    # threshold 0.5: A's 4-px core (0), B (1), C's core only: 2·4/(4+36) = 0.2
    assert dice(family="threshold", threshold=0.5, min_area=0) == pytest.approx(1.2 / 3)
    # triplet top 0.5 × 4 px fires on A's core; top 0.8 × 4 px does not, and C still fires
    assert dice(family="triplet", top_threshold=0.5, top_area=4, bottom_threshold=0.3) == (
        pytest.approx(2 / 3)
    )
    assert dice(family="triplet", top_threshold=0.97, top_area=0, bottom_threshold=0.3) == (
        pytest.approx(2 / 3)
    )
    best = pick_best(res)
    assert best["dice"] == pytest.approx(1.0)
    assert row_params(best.to_dict()) == {
        "method": "triplet",
        "threshold": None,
        "min_area": 0,
        "top_threshold": 0.8,
        "top_area": 4,
        "bottom_threshold": 0.3,
        "cls_threshold": None,
    }
    fams = best_rows(res)
    assert list(fams.index) == ["threshold", "triplet", "threshold+gate", "triplet+gate"]
    # the gate empties A (cls 0.2 < 0.5): threshold 0.3 without min_area is then perfect
    g = row_params(fams.loc["threshold+gate"].to_dict())
    assert (g["threshold"], g["min_area"], g["cls_threshold"]) == (0.3, 0, 0.5)
    assert fams.loc["threshold+gate", "dice"] == pytest.approx(1.0)
    assert fams.loc["threshold", "dice"] == pytest.approx(2 / 3)
    # recomputed from scratch with apply_postprocess
    ev = evaluate_params([(u, t, cls)], row_params(best.to_dict()), 1.0)
    assert ev["dice"].iloc[0] == pytest.approx(best["dice"], abs=1e-12)
    assert ev["pos_dice"].iloc[0] == 1.0 and ev["empty_acc"].iloc[0] == 1.0


def random_oof(rng, n, size):
    probs = np.empty((n, size, size), np.uint8)
    truth = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        f = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 1.5)
        f = (f - f.min()) / (f.max() - f.min())
        probs[i] = np.round(f**2 * 255)
        if rng.random() < 0.5:
            g = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 2)
            truth[i] = g > np.quantile(g, rng.uniform(0.7, 0.98))
    return probs, truth, rng.random(n).astype(np.float32)


def test_fast_search_equals_naive_for_every_setting():
    rng = np.random.default_rng(1)
    sources = [random_oof(rng, 9, 32), random_oof(rng, 7, 32)]
    grids = {
        "thresholds": [0.2, 0.5, 0.5, 0.8, 0.0],
        "min_areas": [0, 2, 9.5, 40, 1e6],
        "top_thresholds": [0.3, 0.7, 1.0],
        "top_areas": [0, 3, 60],
        "bottom_thresholds": [0.1, 0.45],
        "cls_thresholds": [0.3, 0.8],
    }
    for scale in (1.0, 0.37):
        fast = search(sources, grids, area_scale=scale, names=["a", "b"], chunk=4, n_jobs=2)
        naive = naive_search(sources, grids, area_scale=scale, names=["a", "b"])
        assert len(fast) == 3 * (5 * 5 + 3 * 3 * 2)
        pd.testing.assert_frame_equal(
            fast.drop(columns=[c for c in fast if c.startswith("dice")]),
            naive.drop(columns=[c for c in naive if c.startswith("dice")]),
        )
        for col in ("dice", "dice_std", "dice_a", "dice_b"):
            np.testing.assert_allclose(fast[col], naive[col], rtol=0, atol=1e-12, err_msg=col)
        assert fast["dice"].nunique() > 10  # the grid really discriminates on these maps
    # without aux probabilities: no gated rows; one-family grids work
    only_thr = search([s[:2] for s in sources], {"thresholds": [0.5], "min_areas": [0, 4]})
    assert list(only_thr["family"]) == ["threshold", "threshold"]


def test_search_reads_memmaps_in_chunks(tmp_path):
    rng = np.random.default_rng(2)
    p, t, _ = random_oof(rng, 11, 24)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "t.npy", t)
    mp = np.load(tmp_path / "p.npy", mmap_mode="r")
    mt = np.load(tmp_path / "t.npy", mmap_mode="r")
    grids = {"thresholds": [0.3, 0.6], "min_areas": [0, 64], "top_thresholds": [0.7],
             "top_areas": [0, 512], "bottom_thresholds": [0.3]}  # fmt: skip
    a = search([(mp, mt)], grids, chunk=3)
    b = search([(p, t)], grids, chunk=64, n_jobs=1)
    np.testing.assert_allclose(a["dice"], b["dice"], atol=1e-12)
    np.testing.assert_array_equal(mp, p)  # the memmap still reads back after its pages dropped


def test_grid_validation():
    with pytest.raises(ParamsError, match="outside"):
        Grid.from_mapping({"thresholds": [1.2], "min_areas": [0]})
    with pytest.raises(ParamsError, match="nothing to search"):
        Grid.from_mapping({"thresholds": [0.5]})


# ------------------------------------------------------------------------------ the CLI
def test_oof_tune_end_to_end(tiny_data):
    over = [*tiny_overrides(tiny_data), "exp=tune_e2e"]
    for k in ("0", "1"):
        run_script(
            "train",
            "--config",
            "configs/demo.yaml",
            "--fold",
            k,
            "--quiet",
            *over,
            "train.epochs=1",
        )
    grids = ["tune.thresholds=[0.3, 0.5]", "tune.min_areas=[0, 4096]",
             "tune.top_thresholds=[0.6, 0.8]", "tune.top_areas=[0, 2048]",
             "tune.bottom_thresholds=[0.3]"]  # fmt: skip
    proc = run_script("oof_tune", "--config", "configs/demo.yaml", *over, *grids)
    assert "recomputed with apply_postprocess" in proc.stderr
    exp = tiny_data / "runs" / "tune_e2e"
    params = load_params(exp / "postprocess.yaml")
    assert params["oof_size"] == 32 and params["folds"] == [0, 1] and params["exp"] == "tune_e2e"
    assert params["n_images"] == 32
    report = pd.read_csv(exp / "oof_report.csv")
    assert {"setting", "fold", "dice", "pos_dice", "empty_acc", "mIoU", "mDice"} <= set(report)
    assert {"all-empty", "raw 0.5", "best threshold", "best triplet"} <= set(report["setting"])
    assert {"fold0", "fold1", "mean", "std", "all"} <= set(report["fold"].astype(str))
    best = report[(report["setting"] == f"best {params['method']}") & (report["fold"] == "all")]
    assert best["dice"].iloc[0] == pytest.approx(params["cv_dice"], abs=1e-6)
    assert (exp / "oof_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = pd.read_csv(exp / "oof_grid.csv")
    assert len(grid) == 2 * 2 + 2 * 2 * 1
    assert params["cv_dice"] == pytest.approx(grid["dice"].max(), abs=1e-6)

    # same result again: the file is up to date; another setting: refused without --force
    run_script("oof_tune", "--config", "configs/demo.yaml", *over, *grids)
    before = (exp / "postprocess.yaml").read_text()
    narrow = [*grids[:4], "tune.thresholds=[0.9]", "tune.top_thresholds=[0.95]"]
    with pytest.raises(AssertionError, match="pass --force"):
        run_script("oof_tune", "--config", "configs/demo.yaml", *over, *narrow)
    assert (exp / "postprocess.yaml").read_text() == before
    run_script("oof_tune", "--config", "configs/demo.yaml", *over, *narrow, "--force")
    assert load_params(exp / "postprocess.yaml") != params
