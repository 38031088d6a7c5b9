"""Ensemble selection on out-of-fold (OOF) maps: greedy forward selection with replacement
(Caruana et al., 2004), each candidate blend scored by the best mean OOF Dice of the tuned
post-processing search, and a nested cross-validation that says how optimistic that score is.

* :func:`greedy_select` is the algorithm over any ``score(counts)``: start from the best single
  member, repeatedly add (with replacement: a member may be added again, which raises its weight)
  the one whose addition most improves the score, stop when no addition improves it by more than
  ``tol``. Ties go to the candidate listed first; a tie with the current blend adds nothing, so a
  member that changes nothing gets weight 0.
* :func:`oof_scorer` scores a blend (``{name: count}``) on some folds' OOF maps: the weighted mean
  map per fold (what ``predict.py`` computes from the models) through the post-processing grid
  search, the best setting's mean Dice over all images.
* :func:`nested_cv`: for each fold k, the selection and the tuning run on the other folds and the
  chosen blend and setting score fold k. Choosing weights and thresholds on the maps that score
  them is optimistic; the held-out score is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Counts = dict[str, int]


@dataclass(frozen=True)
class Selection:
    """The blend chosen: how often each member was added, its weights, its score and the steps."""

    counts: Counts
    score: float
    steps: list[dict] = field(default_factory=list)  # {"added", "score"} in order

    @property
    def weights(self) -> dict[str, float]:
        """Each member's share (count / total), members in the order they were first added."""
        total = sum(self.counts.values())
        return {name: n / total for name, n in self.counts.items()}

    @property
    def members(self) -> list[list]:
        """``[[exp, weight], ...]`` as ``predict.experiments`` writes it (weights rounded to 6
        digits; only their ratios matter)."""
        return [[name, round(w, 6)] for name, w in self.weights.items()]


def greedy_select(
    names: Sequence[str],
    score: Callable[[Counts], float],
    max_steps: int = 20,
    tol: float = 1e-9,
) -> Selection:
    """Greedy forward selection with replacement over ``names`` (see the module doc).

    ``score(counts)`` scores a blend where member ``name`` has weight ``counts[name] / total``;
    higher is better. At most ``max_steps`` additions after the first member.
    """
    if not names:
        raise ValueError("greedy_select: no candidates")
    singles = [(score({n: 1}), i, n) for i, n in enumerate(names)]
    best, _, first = max(singles, key=lambda t: (t[0], -t[1]))
    counts: Counts = {first: 1}
    steps = [{"added": first, "score": best}]
    log.info("selection: best single %s (%.6f)", first, best)
    for _ in range(max_steps):
        tried = []
        for i, n in enumerate(names):
            trial = {**counts, n: counts.get(n, 0) + 1}
            tried.append((score(trial), i, n, trial))
        top, _, name, trial = max(tried, key=lambda t: (t[0], -t[1]))
        if top <= best + tol:
            break  # nothing improves: stop (a tie adds nothing)
        best, counts = top, trial
        steps.append({"added": name, "score": top})
        log.info("selection: + %s -> %s (%.6f)", name, _text(counts), top)
    return Selection(counts, best, steps)


def _text(counts: Mapping[str, int]) -> str:
    return " + ".join(f"{n}×{c}" for n, c in counts.items())


def blend_folds(cands: Mapping[str, Sequence[Any]], counts: Mapping[str, int],
                folds: Sequence[int]) -> list:  # fmt: skip
    """The weighted mean OOF map of each of ``folds`` (indexes into each candidate's list)."""
    from pneumoseg.training.oof import blend_oofs

    names = list(counts)
    weights = [float(counts[n]) for n in names]
    return [blend_oofs([cands[n][k] for n in names], weights, names) for k in folds]


def oof_scorer(cands: Mapping[str, Sequence[Any]], folds: Sequence[int], tune_cfg: Mapping,
               scale: float, jobs: int | None = None) -> Callable[[Counts], float]:  # fmt: skip
    """``score(counts)``: the best tuned mean OOF Dice of that blend on ``folds`` (cached: the
    greedy search asks for the same blend more than once)."""
    from pneumoseg.tuning.nested import best_setting

    names = [f"fold{k}" for k in folds]
    memo: dict[tuple, float] = {}

    def score(counts: Counts) -> float:
        key = _key(counts)
        if key not in memo:
            memo[key] = best_setting(blend_folds(cands, counts, folds), tune_cfg, scale, names,
                                     jobs)[0]  # fmt: skip
        return memo[key]

    return score


def _key(counts: Mapping[str, int]) -> tuple:
    """The blend as a hashable value: the same weights give the same key (2×a + 2×b = a + b)."""
    from math import gcd

    g = 0
    for c in counts.values():
        g = gcd(g, int(c))
    return tuple(sorted((n, c // g) for n, c in counts.items() if c))


@dataclass(frozen=True)
class Nested:
    """The nested cross-validation: each fold scored by a selection and tuning made without it."""

    dice: float  # mean Dice over every held-out image
    folds: list[dict]  # per held-out fold: fold, n_images, dice, members, setting


def nested_cv(cands: Mapping[str, Sequence[Any]], n_folds: int, tune_cfg: Mapping, scale: float,
              select: bool = True, max_steps: int = 20, jobs: int | None = None) -> Nested:  # fmt: skip
    """Leave each fold out: select (when ``select``; else the blend of every candidate with
    weight 1, i.e. tuning only: :func:`pneumoseg.tuning.nested.nested_tuning` of that blend)
    and tune on the other folds, score the held-out fold."""
    from pneumoseg.tuning.nested import best_setting, held_out_score, nested_tuning

    if n_folds < 2:
        raise ValueError("nested_cv needs at least 2 folds")
    if not select:
        ones = dict.fromkeys(cands, 1)
        maps = blend_folds(cands, ones, range(n_folds))
        dice, rows = nested_tuning(maps, list(range(n_folds)), tune_cfg, scale, jobs)
        members = Selection(ones, 0.0).members
        return Nested(dice, [{**r, "members": members} for r in rows])
    rows, total, n_total = [], 0.0, 0
    for k in range(n_folds):
        inner = [j for j in range(n_folds) if j != k]
        counts = greedy_select(list(cands), oof_scorer(cands, inner, tune_cfg, scale, jobs),
                               max_steps=max_steps).counts  # fmt: skip
        _, setting = best_setting(blend_folds(cands, counts, inner), tune_cfg, scale,
                                  [f"fold{j}" for j in inner], jobs)  # fmt: skip
        n, dice_sum = held_out_score(blend_folds(cands, counts, [k])[0], setting, scale,
                                     f"fold{k}")  # fmt: skip
        total, n_total = total + dice_sum, n_total + n
        rows.append({"fold": k, "n_images": n, "dice": dice_sum / n,
                     "members": Selection(counts, 0.0).members, "setting": setting})  # fmt: skip
        log.info("nested CV: fold %d held out: %s, Dice %.4f", k, _text(counts), dice_sum / n)
    return Nested(total / n_total, rows)
