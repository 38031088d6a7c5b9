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
from typing import Any, ClassVar, NamedTuple

import torch
import yaml
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
    # The ``model`` keys this family builds from (``arch`` aside). One rule for every family
    # (:meth:`foreign`): any other key set away from its base.yaml default is a config error, so a
    # setting that would silently change nothing never reaches a GPU.
    uses: tuple[str, ...] = ()
    # Keys this family does not build from but judges in its own :meth:`check` (e.g. rejects with
    # a specific message): :meth:`foreign` leaves them to it.
    checked: tuple[str, ...] = ()
    # Why a key is not used, appended to the :meth:`foreign` message.
    hints: ClassVar[dict[str, str]] = {}

    def build(self, mcfg: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError

    def used_keys(self, mcfg: Mapping[str, Any]) -> set[str]:
        """The keys of :attr:`uses` that matter for this ``model`` section (a family may use a
        key only together with another, e.g. ``aux_dropout`` with ``aux_head``)."""
        return set(self.uses)

    def describe(self, mcfg: Mapping[str, Any]) -> str:
        """A short name of the configured model for logs."""
        arch = mcfg["arch"]
        return f"{arch}/{mcfg['encoder']}" if "encoder" in self.uses else str(arch)

    def check(self, mcfg: Mapping[str, Any]) -> list[str]:
        """Problems of the ``model`` section for this family (checked when the config loads)."""
        return []

    def foreign(
        self, mcfg: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Problems for the keys of ``mcfg`` this family does not use that are set to anything but
        their default (``defaults``: base.yaml's ``model`` section) or off (null, false); each
        message names the key, this family and the families that do use the key."""
        from pneumoseg.defaults import NULLABLE, base_defaults

        if defaults is None:
            defaults = base_defaults()["model"]
        used = self.used_keys(mcfg)
        problems = []
        for key, default in defaults.items():
            if key == "arch" or key in used or key in self.checked or key not in mcfg:
                continue
            value = mcfg[key]
            if value is None or value is False or value == default:
                continue
            users = [label(f) for f in families() if f is not self and key in f.uses]
            why = [self.hints.get(key, ""), f"used by {', '.join(users)}" if users else ""]
            off = " or null" if f"model.{key}" in NULLABLE else ""
            problems.append(
                f"model.{key}={_yaml(value)} is not used by model.arch="
                f"{mcfg.get('arch', self.name)} ({'; '.join(filter(None, why))}): set it to "
                f"{_yaml(default)}{off}"
            )
        return problems

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


def _yaml(value: Any) -> str:
    """``value`` as it is written in a config or an override (null, true, [8, 8], resnet34)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).split("\n...")[0].strip()


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
        importlib.import_module(f"pneumoseg.models.families.{name}")
    _loaded = True


def families() -> list[Family]:
    """Every registered family, once each, in registration order."""
    _load()
    return list({id(f): f for f in ARCH_FAMILIES.values()}.values())


def label(family: Family) -> str:
    """``maskrcnn``, or ``smp (deeplabv3plus, fpn, unet, unetplusplus)`` for a family of several
    architectures."""
    names = sorted(a for a, f in ARCH_FAMILIES.items() if f is family)
    return family.name if names == [family.name] else f"{family.name} ({', '.join(names)})"


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
