"""Model families: the one seam between a kind of model and the rest of the pipeline.

A family knows three things about its models: how to **build** one from the ``model`` config
section, how to compute the **training loss** from a batch, and how to turn its outputs into a
**probability map** ``[B, 1, H, W]`` (plus an optional image-level probability ``[B, 1]``).
Training, evaluation, OOF maps, tuning, TTA ensembles, submissions and overlays only ever see
probability maps, so none of them branches on the family.

``model.arch`` picks the family through :data:`ARCH_FAMILIES`; :func:`family_for` returns it.

Batches (what ``SegDataset`` yields, moved to the device) are dicts with ``image`` (B, C, H, W)
float, normalised; ``mask`` (B, 1, H, W) float 0/1 (the union of the instances); ``has_mask``
(B,) bool; and, for families with ``needs_instances``, ``instances``: a list of B uint8 tensors
(K_i, H, W), one channel per RLE row of the image (K_i = 0 for an empty image).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from pneumoseg.errors import ConfigError, UnknownNameError


class Output(NamedTuple):
    """What a family's forward pass in eval mode gives the pipeline."""

    probs: torch.Tensor  # (B, 1, H, W) float32 in [0, 1]
    cls: torch.Tensor | None  # (B, 1) float32 image-level probability, or None
    raw: Any = None  # the model's own outputs, for :meth:`Family.eval_loss`


class Family:
    """Base class: a plain segmentation network mapping images to mask logits ``(B, 1, H, W)``
    (and, optionally, image logits ``(B, 1)`` as a second output)."""

    name = "base"
    needs_instances = False  # batches must carry per-instance masks
    tunable: tuple[str, ...] = ()  # inference-time model options that oof_tune.py may search
    has_eval_loss = True  # eval_loss gives a validation loss (train.select: val_loss needs one)
    own_keys: tuple[str, ...] = ()  # model keys only this family reads (others flag them)

    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError

    uses_encoder = True  # model.encoder names part of the model (logged, validated)

    def describe(self, mcfg: Mapping[str, Any]) -> str:
        """A short name of the configured model for logs."""
        arch = mcfg["arch"]
        return f"{arch}/{mcfg['encoder']}" if self.uses_encoder else str(arch)

    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        """Problems of the ``model`` section for this family (checked when the config loads)."""
        return []

    def unused(self, mcfg: Mapping[str, Any], **why: str) -> list[str]:
        """Problems for keys set in ``mcfg`` that this family does not use: ``key="reason"``
        (may be empty); the advice is to set them back to their off value."""
        off = {"aux_head": "false"}
        return [
            f"model.{key} is not used by {self.name}{f' ({reason})' if reason else ''}; "
            f"set it to {off.get(key, 'null')}"
            for key, reason in why.items()
            if not (mcfg.get(key) is None or mcfg.get(key) is False or mcfg.get(key) == [])
        ]

    def foreign(self, mcfg: Mapping[str, Any]) -> list[str]:
        """Problems for keys of other families (their :attr:`own_keys`) set in ``mcfg``."""
        _load()
        owners: dict[str, list[str]] = {}
        for fam in {id(f): f for f in ARCH_FAMILIES.values()}.values():
            for key in fam.own_keys:
                if key not in self.own_keys:
                    owners.setdefault(key, []).append(fam.name)
        return self.unused(mcfg, **{k: f"{' and '.join(v)} only" for k, v in owners.items()})

    def require_valid(self, mcfg: Mapping[str, Any]) -> None:
        """Raise one :class:`ConfigError` with every :meth:`check` problem (builds call it)."""
        problems = self.check(mcfg)
        if problems:
            raise ConfigError("; ".join(problems))

    def set_option(self, model: nn.Module, name: str, value: Any) -> None:
        """Set a :attr:`tunable` inference option (e.g. a detector's ``min_score``)."""
        raise UnknownNameError(f"{self.name} models have no option {name!r}")

    # ---- training
    def train_loss(self, model: nn.Module, batch: Mapping, loss_fn) -> tuple[torch.Tensor, dict]:
        """(scalar loss to backpropagate, {part name: float}) for a batch on the device."""
        logits, cls = split_output(model(batch["image"]))
        return loss_fn(logits.float(), batch["mask"], None if cls is None else cls.float())

    # ---- inference
    def predict(self, model: nn.Module, x: torch.Tensor) -> Output:
        """Eval-mode forward of normalised images ``x`` -> probabilities."""
        logits, cls = split_output(model(x))
        probs = torch.sigmoid(logits.float())
        return Output(probs, None if cls is None else torch.sigmoid(cls.float()), (logits, cls))

    def eval_loss(self, out: Output, batch: Mapping, loss_fn, n: int) -> torch.Tensor | None:
        """The validation loss of the first ``n`` images of ``out`` (None: not available)."""
        logits, cls = out.raw
        return loss_fn(logits[:n].float(), batch["mask"], None if cls is None else cls[:n].float())[
            0
        ]


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x)`` -> (mask logits (N, 1, H, W), image logits (N, 1) or None)."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


# Filled by the family modules at import (see :func:`_load`): arch name -> family instance.
ARCH_FAMILIES: dict[str, Family] = {}


def register(family: Family, *archs: str) -> Family:
    for arch in archs:
        ARCH_FAMILIES[arch] = family
    return family


FAMILY_MODULES = ("smp_family", "maskrcnn", "doubleunet", "unet_classic")
_loaded = False


def _load() -> None:
    """Import every family module once (each registers its architectures), whatever was
    imported before."""
    global _loaded
    if _loaded:
        return
    import importlib

    for name in FAMILY_MODULES:
        importlib.import_module(f"pneumoseg.families.{name}")
    _loaded = True


def archs() -> list[str]:
    _load()
    return sorted(ARCH_FAMILIES)


def family_for(mcfg: Mapping[str, Any] | str) -> Family:
    """The family of a ``model`` config section (or of an arch name)."""
    _load()
    arch = str(mcfg if isinstance(mcfg, str) else mcfg["arch"]).lower()
    try:
        return ARCH_FAMILIES[arch]
    except KeyError:
        raise UnknownNameError(
            f"unknown model.arch {arch!r}; valid: {', '.join(sorted(ARCH_FAMILIES))}"
        ) from None
