"""Samplers that control how often the model sees pneumothorax.

Only ~22% of SIIM images are positive. The 1st-place solution kept every positive in each epoch
and drew just enough negatives for positives to make up a scheduled share (0.8 -> 0.6 -> 0.4
across stages): early epochs learn the shape of a pneumothorax, later ones learn to stay silent on
the many empty images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler


def scheduled_share(schedule: Sequence[float], epoch: int, epochs: int) -> float:
    """Positive share at ``epoch`` (0-based): piecewise-linear through ``schedule``'s values,
    spread evenly from the first to the last epoch (one value = constant)."""
    values = [float(v) for v in schedule]
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(f"sampler.pos_share values must be in (0, 1], got {schedule!r}")
    if len(values) == 1 or epochs <= 1:
        return values[0]
    xs = np.linspace(0, epochs - 1, len(values))
    return float(np.interp(epoch, xs, values))


class PositiveShareSampler(Sampler[int]):
    """Every positive once per epoch, plus negatives drawn without replacement so that positives
    make up ``share`` of the epoch. Deterministic in (seed, epoch); call ``set_epoch`` each epoch.
    """

    def __init__(self, has_mask: Sequence[bool], schedule: Sequence[float], epochs: int, seed=0):
        labels = np.asarray(has_mask, dtype=bool)
        self.pos = np.flatnonzero(labels)
        self.neg = np.flatnonzero(~labels)
        if self.pos.size == 0:
            raise ValueError("PositiveShareSampler: the training set has no positive image")
        self.schedule = list(schedule)
        self.epochs = int(epochs)
        self.seed = int(seed)
        self.epoch = 0
        scheduled_share(self.schedule, 0, self.epochs)  # validate now, not mid-training

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def share(self) -> float:
        return scheduled_share(self.schedule, self.epoch, self.epochs)

    def n_negatives(self) -> int:
        s = self.share()
        return min(self.neg.size, round(self.pos.size * (1 - s) / s))

    def __len__(self) -> int:
        return int(self.pos.size + self.n_negatives())

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        neg = rng.choice(self.neg, size=self.n_negatives(), replace=False)
        idx = np.concatenate([self.pos, neg])
        rng.shuffle(idx)
        return iter(idx.tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])


class ShardedSampler(Sampler[int]):
    """Split any deterministic sampler across DDP ranks (what ``DistributedSampler`` does for a
    dataset). Every rank builds the same index list (same seed and epoch), pads it to a multiple of
    ``num_replicas`` and takes every ``num_replicas``-th index from ``rank``."""

    def __init__(self, sampler, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.sampler, self.num_replicas, self.rank = sampler, num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        idx = list(self.sampler)
        total = len(self) * self.num_replicas
        idx += idx[: total - len(idx)]
        return iter(idx[self.rank : total : self.num_replicas])

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


class EpochWeightedSampler(WeightedRandomSampler):
    """``WeightedRandomSampler`` with positives weighted ``pos_weight`` times a negative, reseeded
    per epoch so that resumed runs draw the same images."""

    def __init__(self, has_mask: Sequence[bool], pos_weight: float, seed: int = 0):
        labels = np.asarray(has_mask, dtype=bool)
        weights = np.where(labels, float(pos_weight), 1.0)
        super().__init__(torch.as_tensor(weights, dtype=torch.double), len(labels))
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))
