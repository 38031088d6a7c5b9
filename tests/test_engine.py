"""Unit tests of the training machinery (schedulers, accumulation, checkpoints, averaging)."""

import math

import pytest
import torch
from torch import nn

from pneumoseg.training import engine

TRAIN = {
    "optimizer": "adamw",
    "lr": 1.0,
    "weight_decay": 0.0,
    "scheduler": "cosine",
    "epochs": 4,
    "warmup_epochs": 1.0,
    "min_lr": 0.1,
    "plateau_factor": 0.5,
    "plateau_patience": 0,
    "accum_steps": 1,
    "clip_grad": 0.0,
    "channels_last": False,
    "max_steps_per_epoch": 0,
}


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_hand_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.build_scheduler(opt, TRAIN, steps_per_epoch=2)  # 8 steps, 2 of warm-up
    lrs = _lrs(sched, opt, 8)
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # linear warm-up
    # cosine from 1.0 to min_lr 0.1 over the remaining 6 steps
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert lrs[2:] == pytest.approx(expected)


def test_plateau_halves_after_no_improvement():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.build_scheduler(opt, {**TRAIN, "scheduler": "plateau"}, steps_per_epoch=2)
    for score in (0.5, 0.6, 0.6, 0.6):
        sched.step(score)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_unknown_optimizer_and_scheduler():
    params = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(KeyError, match="valid: adam, adamw"):
        engine.build_optimizer(nn.Linear(1, 1), {**TRAIN, "optimizer": "sgdd"})
    with pytest.raises(KeyError, match="cosine, poly, plateau, none"):
        engine.build_scheduler(torch.optim.SGD(params, lr=1), {**TRAIN, "scheduler": "step"}, 1)


class _Pixel(nn.Module):
    """A 1×1 conv: no batch statistics, so accumulated and full batches give the same gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.conv(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 4, 4, generator=g)
    y = (torch.rand(4, 1, 4, 4, generator=g) > 0.5).float()
    return x, y


def _loader(batch):
    x, y = _data()
    return [{"image": x[i : i + batch], "mask": y[i : i + batch]} for i in range(0, 4, batch)]


def _loss(logits, target, cls=None):
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
    return loss, {}


def _trained(batch: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights before, weights after) one epoch of train_one_epoch over the 4 images."""
    torch.manual_seed(0)
    model = _Pixel()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = {**TRAIN, "accum_steps": accum}
    engine.train_one_epoch(model, _loader(batch), _loss, opt, None, scaler,
                           torch.device("cpu"), 0, cfg, show_progress=False)  # fmt: skip
    return before, torch.cat([p.detach().flatten() for p in model.parameters()])


def _sgd_steps(batch: int) -> torch.Tensor:
    """The weights after plain SGD steps (lr 0.1) on consecutive batches of ``batch`` images,
    computed here with autograd, without the engine."""
    torch.manual_seed(0)
    model = _Pixel()
    x, y = _data()
    for i in range(0, 4, batch):
        model.zero_grad()
        _loss(model(x[i : i + batch]), y[i : i + batch])[0].backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# (batch, accum_steps, images per optimiser step): accum_steps x batch images make one step
ACCUM_CASES = [(4, 1, 4), (2, 2, 4), (1, 4, 4), (2, 1, 2), (1, 2, 2), (1, 1, 1)]


@pytest.mark.parametrize("batch,accum,per_step", ACCUM_CASES)
def test_gradient_accumulation_equals_the_larger_batch(batch, accum, per_step):
    before, after = _trained(batch, accum)
    assert (after - before).abs().min() > 1e-4  # every weight moved
    torch.testing.assert_close(after, _sgd_steps(per_step), rtol=1e-5, atol=1e-6)
    if accum > 1:  # and not what stepping on every batch would give
        assert (after - _sgd_steps(batch)).abs().max() > 1e-4


def test_checkpoints_keep_top_k_and_average(tmp_path):
    ck = engine.Checkpoints(tmp_path, k=2)
    weights = {}
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.4]):
        state = {"w": torch.full((2,), float(epoch))}
        weights[epoch] = state
        ck.update(score, epoch, state, {"config": {}})
    assert [b[1] for b in ck.best] == [1, 2]  # epochs with scores .7 and .6
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch001.pt", "epoch002.pt"]
    avg = engine.average_state_dicts(ck.paths())
    torch.testing.assert_close(avg["w"], torch.full((2,), 1.5))
    restored = engine.Checkpoints(tmp_path, k=1)
    restored.load_state_dict(ck.state_dict())
    assert restored.best == ck.best and restored.k == 2


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    engine.seed_everything(3)
    state = engine.rng_state()
    engine.save_torch(state, tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002
    engine.set_rng_state(engine.load_torch(tmp_path / "rng.pt"))
    b = (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002
    assert a == b


def test_checkpoints_ties_keep_the_later_epochs(tmp_path):
    """All-empty epochs tie at the baseline: the later (longer-trained) ones are kept."""
    ck = engine.Checkpoints(tmp_path, k=2)
    for epoch, score in enumerate([0.78, 0.78, 0.78, 0.5, 0.78]):
        ck.update(score, epoch, {"w": torch.zeros(1)}, {"config": {}})
    assert [b[1] for b in ck.best] == [4, 2]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch002.pt", "epoch004.pt"]
