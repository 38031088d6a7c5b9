"""Resizing one image and its mask to the cache's side: how every cached array is made (the
interpolation names are part of the cache's fingerprint)."""

from __future__ import annotations

import cv2
import numpy as np

IMAGE_INTERP = "INTER_AREA"
MASK_INTERP = "INTER_AREA coverage >= 0.5"


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 H×W -> uint8 size×size with ``INTER_AREA`` (identity when already that size)."""
    if img.shape == (size, size):
        return np.ascontiguousarray(img)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 0/1 H×W -> uint8 0/1 size×size: area coverage of each output pixel ``>= 0.5``."""
    if mask.shape == (size, size):
        return (mask > 0).astype(np.uint8)
    if not mask.any():
        return np.zeros((size, size), dtype=np.uint8)
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (cover >= 0.5 - 1e-6).astype(np.uint8)
