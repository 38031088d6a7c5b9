import numpy as np
import pytest

from pneumoseg.data.samplers import (
    EpochWeightedSampler,
    PositiveShareSampler,
    ShardedSampler,
    scheduled_share,
)
from pneumoseg.data.transforms import build_train_transforms, build_transforms

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


# (positives, negatives, share, images per epoch by hand: every positive + round(P(1 - s)/s)
# negatives, at most all of them)
EPOCH_SIZES = [
    (20, 80, 0.8, 25),
    (22, 78, 0.75, 22 + 7),  # 7.33 negatives: 7
    (22, 78, 0.5, 44),
    (22, 78, 0.2, 100),  # 88 negatives wanted, 78 exist
    (10, 30, 0.25, 40),
    (8, 2, 0.1, 10),  # capped: the epoch's share is 0.8, not 0.1
    (3, 10, 1.0, 3),  # positives only
]


@pytest.mark.parametrize("n_pos,n_neg,share,size", EPOCH_SIZES)
def test_positive_share_epoch_holds_every_positive_and_the_negatives_by_hand(
    n_pos, n_neg, share, size
):
    labels = np.array([True] * n_pos + [False] * n_neg)
    np.random.default_rng(0).shuffle(labels)
    s = PositiveShareSampler(labels, [share], epochs=1, seed=3)
    idx = list(s)
    assert len(idx) == len(s) == size
    assert len(set(idx)) == size and all(0 <= i < len(labels) for i in idx)
    assert set(np.flatnonzero(labels)) <= set(idx)
    assert (~labels[idx]).sum() == size - n_pos


def test_positive_share_sampler_iterates_by_seed_and_epoch():
    def epoch(seed, e):
        s = PositiveShareSampler(LABELS, [0.5], epochs=3, seed=seed)
        s.set_epoch(e)
        return list(s)

    assert epoch(1, 0) == epoch(1, 0) and epoch(1, 2) == epoch(1, 2)  # same seed and epoch
    assert epoch(1, 0) != epoch(2, 0)  # another seed
    negatives = [set(epoch(1, e)) - set(np.flatnonzero(LABELS)) for e in range(3)]
    assert all(len(n) == 22 for n in negatives)
    assert negatives[0] != negatives[1] != negatives[2]  # other negatives every epoch
    assert epoch(1, 0)[:22] != sorted(epoch(1, 0)[:22])  # shuffled, positives not first
    assert LABELS[epoch(1, 0)[:44]].mean() == 0.5


def test_weighted_sampler_iterates_by_seed_and_epoch():
    def epoch(seed, e):
        s = EpochWeightedSampler(LABELS, pos_weight=3.0, seed=seed)
        s.set_epoch(e)
        return list(s)

    a = epoch(0, 1)
    assert len(a) == len(LABELS) and all(0 <= i < len(LABELS) for i in a)
    assert len(set(a)) < len(a)  # with replacement
    assert a == epoch(0, 1) and a != epoch(0, 2) and a != epoch(1, 1)


def test_sharded_sampler_follows_the_epoch():
    inner = PositiveShareSampler(LABELS, [0.5], epochs=2, seed=0)
    shards = [ShardedSampler(inner, 3, r) for r in range(3)]
    seen = []
    for e in (0, 1):
        shards[0].set_epoch(e)  # sets the shared inner sampler's epoch
        parts = [list(sh) for sh in shards]
        assert [len(p) for p in parts] == [15, 15, 15]  # 44 padded to 45
        assert sorted(i for p in parts for i in p) == sorted([*inner, next(iter(inner))])
        seen.append(parts[0])
    assert seen[0] != seen[1]


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
