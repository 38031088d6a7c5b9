import numpy as np
import pytest

from pneumoseg.samplers import (
    EpochWeightedSampler,
    PositiveShareSampler,
    ShardedSampler,
    scheduled_share,
)
from pneumoseg.transforms import build_train_transforms, build_transforms

LABELS = np.array([True] * 22 + [False] * 78)


@pytest.mark.parametrize(
    "schedule,epoch,epochs,expected",
    [
        ([0.5], 3, 10, 0.5),
        ([0.8, 0.4], 0, 5, 0.8),
        ([0.8, 0.4], 4, 5, 0.4),
        ([0.8, 0.4], 2, 5, 0.6),
        ([0.8, 0.6, 0.4], 1, 3, 0.6),
        ([0.8, 0.6, 0.4], 1, 5, 0.7),
    ],
)
def test_scheduled_share(schedule, epoch, epochs, expected):
    assert scheduled_share(schedule, epoch, epochs) == pytest.approx(expected)


def test_share_validation():
    with pytest.raises(ValueError, match="pos_share"):
        PositiveShareSampler(LABELS, [0.0], epochs=3)
    with pytest.raises(ValueError, match="no positive"):
        PositiveShareSampler([False] * 5, [0.5], epochs=3)


def test_positive_share_sampler_keeps_all_positives_and_hits_share():
    s = PositiveShareSampler(LABELS, [0.8, 0.4], epochs=5, seed=1)
    for epoch, share in enumerate([0.8, 0.7, 0.6, 0.5, 0.4]):
        s.set_epoch(epoch)
        idx = list(s)
        assert len(idx) == len(s)
        assert set(np.flatnonzero(LABELS)) <= set(idx)  # every positive, once
        assert len(idx) == len(set(idx))
        assert LABELS[idx].mean() == pytest.approx(share, abs=0.02)
    # over many epochs the negatives drawn cover the negative set roughly uniformly
    s = PositiveShareSampler(LABELS, [0.5], epochs=400, seed=2)
    counts = np.zeros(len(LABELS))
    for e in range(400):
        s.set_epoch(e)
        np.add.at(counts, list(s), 1)
    neg_counts = counts[~LABELS]
    assert neg_counts.mean() == pytest.approx(400 * 22 / 78, rel=0.01)
    assert neg_counts.std() / neg_counts.mean() < 0.15


def test_share_capped_by_available_negatives():
    s = PositiveShareSampler([True] * 8 + [False] * 2, [0.1], epochs=1)
    assert len(s) == 10


def test_sampler_deterministic_and_resumable():
    a = PositiveShareSampler(LABELS, [0.6], epochs=3, seed=5)
    b = PositiveShareSampler(LABELS, [0.6], epochs=3, seed=5)
    a.set_epoch(2)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_sharded_sampler_partitions():
    inner = PositiveShareSampler(LABELS, [0.5], epochs=1, seed=0)
    shards = [list(ShardedSampler(inner, 2, r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == (len(inner) + 1) // 2
    assert set(shards[0]) | set(shards[1]) == set(inner)


def test_weighted_sampler_share_and_determinism():
    s = EpochWeightedSampler(LABELS, pos_weight=78 / 22, seed=0)
    draws = []
    for e in range(50):
        s.set_epoch(e)
        draws += list(s)
    assert LABELS[draws].mean() == pytest.approx(0.5, abs=0.03)
    s.set_epoch(3)
    t = EpochWeightedSampler(LABELS, pos_weight=78 / 22, seed=0)
    t.load_state_dict(s.state_dict())
    assert list(s) == list(t)


AUG = {
    "hflip": 1.0,
    "affine": 0.0,
    "elastic": 0.0,
    "grid_distortion": 0.0,
    "brightness_contrast": 0.0,
    "gamma": 0.0,
    "clahe": 0.0,
    "noise": 0.0,
    "shift": 0.1,
    "scale": 0.1,
    "rotate": 10,
}


def test_transform_moves_image_and_mask_together():
    img = np.zeros((16, 16), np.uint8)
    img[2:6, 1:4] = 200
    mask = (img > 0).astype(np.uint8)
    out = build_transforms(AUG)(image=img, mask=mask)
    np.testing.assert_array_equal(out["image"], img[:, ::-1])
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1])
    full = {
        **AUG,
        "affine": 1.0,
        "elastic": 1.0,
        "grid_distortion": 1.0,
        "brightness_contrast": 1.0,
        "gamma": 1.0,
        "clahe": 1.0,
        "noise": 1.0,
    }
    rng_img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    out = build_transforms(full)(image=rng_img, mask=(rng_img > 128).astype(np.uint8))
    assert out["image"].shape == (64, 64) and out["image"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1}
    assert len(build_transforms(full, train=False).transforms) == 0


def test_negative_pipeline_and_errors():
    pos, neg = build_train_transforms(AUG, {"hflip": 0.0})
    assert len(pos.transforms) == 1 and len(neg.transforms) == 0
    same_pos, same_neg = build_train_transforms(AUG, None)
    assert same_pos is same_neg
    with pytest.raises(KeyError, match="unknown augment keys"):
        build_transforms({**AUG, "vflipp": 0.5})
    with pytest.raises(KeyError, match="augment_neg"):
        build_train_transforms(AUG, {"hflp": 0.0})
    with pytest.raises(ValueError, match="probability"):
        build_transforms({**AUG, "hflip": 2})
