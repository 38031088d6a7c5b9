"""Albumentations pipelines built from the ``augment`` config section.

Images are single-channel uint8 (H, W) and masks uint8 0/1 (H, W); each pipeline transforms both
together. Every entry of ``augment`` that names a transform is its probability (0 = off), the other
entries are shared limits; ``augment_neg`` (same keys, any subset) overrides them for images
without pneumothorax, e.g. to spend the heavy geometric augmentation on the rare positives only.
"""

from __future__ import annotations

from collections.abc import Mapping

import albumentations as A
import cv2

from pneumoseg.defaults import AUGMENT_LIMITS as LIMITS  # the schema reads them too
from pneumoseg.errors import UnknownNameError

# Name -> builder(probability, limits). Geometric transforms first, photometric ones after: the
# order the 1st-place pipeline used.
TRANSFORMS = {
    "hflip": lambda p, k: A.HorizontalFlip(p=p),
    "affine": lambda p, k: A.Affine(
        translate_percent=(-k["shift"], k["shift"]),
        scale=(1 - k["scale"], 1 + k["scale"]),
        rotate=(-k["rotate"], k["rotate"]),
        border_mode=cv2.BORDER_CONSTANT,
        p=p,
    ),
    "elastic": lambda p, k: A.ElasticTransform(alpha=30, sigma=6, p=p),
    "grid_distortion": lambda p, k: A.GridDistortion(num_steps=5, distort_limit=0.2, p=p),
    "brightness_contrast": lambda p, k: A.RandomBrightnessContrast(0.2, 0.2, p=p),
    "gamma": lambda p, k: A.RandomGamma(gamma_limit=(80, 120), p=p),
    "clahe": lambda p, k: A.CLAHE(clip_limit=2.0, p=p),
    "noise": lambda p, k: A.GaussNoise(std_range=(0.01, 0.05), p=p),
}


def build_transforms(augment: Mapping, train: bool = True) -> A.Compose:
    """The albumentations pipeline for one image class; identity when ``train`` is False."""
    unknown = set(augment) - set(TRANSFORMS) - set(LIMITS)
    if unknown:
        valid = ", ".join([*TRANSFORMS, *LIMITS])
        raise UnknownNameError(f"unknown augment keys {sorted(unknown)}; valid: {valid}")
    steps = []
    if train:
        for name, build in TRANSFORMS.items():
            p = float(augment.get(name, 0.0) or 0.0)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {p}")
            if p > 0:
                steps.append(build(p, augment))
    return A.Compose(steps)


def build_train_transforms(augment: Mapping, augment_neg: Mapping | None):
    """(positive pipeline, negative pipeline); the same object twice when ``augment_neg`` is null."""
    pos = build_transforms(augment)
    if not augment_neg:
        return pos, pos
    unknown = set(augment_neg) - set(augment)
    if unknown:
        raise UnknownNameError(
            f"unknown augment_neg keys {sorted(unknown)}; valid: {', '.join(augment)}"
        )
    return pos, build_transforms({**augment, **augment_neg})
