"""Ensemble selection (pneumoseg.ensembling.select): greedy forward selection with replacement on
hand-made OOF maps whose answer is known, ties, and nested CV against the optimistic plain CV."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoseg.ensembling.select import (
    Selection,
    greedy_select,
    nested_cv,
    oof_scorer,
)
from pneumoseg.training.oof import Oof

GRID = {"thresholds": [0.2, 0.3, 0.4, 0.5, 0.6], "min_areas": [0], "top_thresholds": [],
        "top_areas": [], "bottom_thresholds": [], "cls_thresholds": []}  # fmt: skip
SIDE, N, FOLDS = 16, 8, 3


def _truth(seed: int) -> np.ndarray:
    """N positive images, each a different square."""
    rng = np.random.default_rng(seed)
    t = np.zeros((N, SIDE, SIDE), np.uint8)
    for i in range(N):
        y, x = rng.integers(0, SIDE - 6, 2)
        t[i, y : y + 5, x : x + 5] = 1
    return t


def _world(members: dict) -> dict[str, list[Oof]]:
    """{name: [Oof per fold]}: ``members[name](truth, half) -> probs`` (uint8)."""
    out: dict[str, list[Oof]] = {n: [] for n in members}
    for k in range(FOLDS):
        t = _truth(k)
        first = np.arange(N) < N // 2
        for name, make in members.items():
            ids = [f"f{k}_{i}" for i in range(N)]
            out[name].append(Oof(ids, make(t, first, k).astype(np.uint8), t, None))
    return out


def _right_on(half: str):
    def make(t, first, k):
        keep = first if half == "first" else ~first
        return t * 255 * keep[:, None, None]

    return make


def _zeros(t, first, k):
    return np.zeros_like(t)


def _noise(seed):
    def make(t, first, k):
        return np.random.default_rng(seed * 100 + k).integers(0, 256, t.shape)

    return make


def test_two_halves_blend_and_a_useless_member_gets_weight_zero():
    world = _world({"useless": _zeros, "a": _right_on("first"), "b": _right_on("second")})
    score = oof_scorer(world, list(range(FOLDS)), GRID, scale=1.0, jobs=1)
    assert score({"a": 1}) == pytest.approx(0.5) and score({"b": 1}) == pytest.approx(0.5)
    assert score({"useless": 1}) == 0.0
    assert score({"a": 1, "b": 1}) == pytest.approx(1.0)
    sel = greedy_select(list(world), score)
    # a first (ties with b go to the one listed first), then b; adding "useless" only ties: stop
    assert sel.counts == {"a": 1, "b": 1} and sel.score == pytest.approx(1.0)
    assert sel.members == [["a", 0.5], ["b", 0.5]]
    assert [s["added"] for s in sel.steps] == ["a", "b"]


def test_replacement_raises_a_weight_when_it_helps():
    # score peaks at weight 2/3 on "a": a, then + b (1/2), then + a again (2/3), not a + b
    def score(counts):
        w = counts.get("a", 0) / sum(counts.values())
        return -((w - 2 / 3) ** 2)

    sel = greedy_select(["a", "b"], score)
    assert sel.counts == {"a": 2, "b": 1} and sel.score == pytest.approx(0.0)
    assert [s["added"] for s in sel.steps] == ["a", "b", "a"]


def test_ties_go_to_the_first_listed_and_max_steps_bounds():
    sel = greedy_select(["x", "y"], lambda counts: 1.0)
    assert sel.counts == {"x": 1} and len(sel.steps) == 1  # a tie adds nothing
    growing = greedy_select(["x", "y"], lambda counts: float(sum(counts.values())), max_steps=3)
    assert sum(growing.counts.values()) == 4 and growing.counts == {"x": 4}
    with pytest.raises(ValueError, match="no candidates"):
        greedy_select([], lambda counts: 0.0)


def test_selection_members_round_and_keep_order():
    s = Selection({"b": 2, "a": 1}, 0.9)
    assert s.members == [["b", 0.666667], ["a", 0.333333]]


def test_nested_cv_is_never_above_plain_cv_on_noise():
    world = _world({f"noise{i}": _noise(i) for i in range(3)})
    folds = list(range(FOLDS))
    plain = greedy_select(list(world), oof_scorer(world, folds, GRID, 1.0, jobs=1)).score
    nested = nested_cv(world, FOLDS, GRID, 1.0, select=True, jobs=1)
    assert nested.dice <= plain + 1e-12, (nested.dice, plain)
    assert [r["fold"] for r in nested.folds] == folds and sum(
        r["n_images"] for r in nested.folds
    ) == N * FOLDS
    tuning_only = nested_cv({"noise0": world["noise0"]}, FOLDS, GRID, 1.0, select=False, jobs=1)
    single = oof_scorer({"noise0": world["noise0"]}, folds, GRID, 1.0, jobs=1)({"noise0": 1})
    assert tuning_only.dice <= single + 1e-12


def test_nested_cv_recovers_the_known_blend():
    world = _world({"a": _right_on("first"), "b": _right_on("second"), "useless": _zeros})
    nested = nested_cv(world, FOLDS, GRID, 1.0, jobs=1)
    assert nested.dice == pytest.approx(1.0)
    assert all(r["members"] == [["a", 0.5], ["b", 0.5]] for r in nested.folds)
    with pytest.raises(ValueError, match="at least 2 folds"):
        nested_cv(world, 1, GRID, 1.0)
