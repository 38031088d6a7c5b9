"""Probabilities come back to each image's own size in the image's orientation: maps that are not
symmetric (a corner blob, ramps along one axis) on non-square sizes, through
``inference.resize_to_original`` and ``Predictor.probs_of`` (original -> cache.size -> back)."""

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from pneumoseg.inference.backends import TorchEngine
from pneumoseg.inference.ensemble import Member, resize_to_original
from pneumoseg.inference.predictor import Predictor


def _ramp(shape, axis):
    """0 -> 1 along ``axis`` (0: top to bottom, 1: left to right), constant along the other."""
    r = np.linspace(0.0, 1.0, shape[axis], dtype=np.float32)
    return np.broadcast_to(r[:, None] if axis == 0 else r[None, :], shape).copy()


def _corner_blob(shape):
    """1 on rows 2..9 and columns 20..29 of 32 (top right), 0 elsewhere."""
    p = np.zeros(shape, np.float32)
    p[2:10, 20:30] = 1.0
    return p


# (map at 32x32, size to return to): upsampling and downsampling, wider and taller than square
SIZES = [(96, 64), (64, 96), (48, 16), (17, 40), (64, 64)]


@pytest.mark.parametrize("size", SIZES)
def test_resize_back_keeps_orientation(size):
    h, w = size
    maps = np.stack([_ramp((32, 32), 0), _ramp((32, 32), 1), _corner_blob((32, 32))])
    out = resize_to_original(torch.from_numpy(maps), [size] * 3)
    assert [o.shape for o in out] == [size] * 3
    down, right, blob = out
    # ramps: rise along their own axis only, from ~0 to ~1
    assert (np.diff(down, axis=0) >= -1e-6).all() and np.ptp(down, axis=1).max() < 1e-6
    assert (np.diff(right, axis=1) >= -1e-6).all() and np.ptp(right, axis=0).max() < 1e-6
    assert down[0, 0] < 0.1 < 0.9 < down[-1, 0]
    assert right[0, 0] < 0.1 < 0.9 < right[0, -1]
    # the blob stays in the top right: rows 2..9 / 32 of the height, columns 20..29 / 32 of the width
    rows, cols = np.nonzero(blob > 0.5)
    assert rows.size > 0
    assert 2 / 32 * h - 1 <= rows.min() and rows.max() <= 10 / 32 * h
    assert 20 / 32 * w - 1 <= cols.min() and cols.max() <= 30 / 32 * w
    assert blob[: h // 2, w // 2 :].sum() > 0.99 * blob.sum()


@pytest.mark.parametrize("size", SIZES)
def test_resize_back_equals_opencv_bilinear(size):
    """The same half-pixel bilinear resampling as cv2.INTER_LINEAR (an independent
    implementation), pixel for pixel."""
    p = _corner_blob((32, 32)) * 0.7 + _ramp((32, 32), 1) * 0.3
    out = resize_to_original(torch.from_numpy(p[None]), [size])[0]
    want = cv2.resize(p, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(out, want, atol=1e-4)


class _Brightness(nn.Module):
    """A 1x1 conv: probability rises with the pixel's brightness (bright -> ~1, black -> ~0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(4.0)
            self.conv.bias.fill_(0.0)

    def forward(self, x):
        return self.conv(x)


def _predictor(size=64):
    """A Predictor over one brightness model, without a run folder (probs_of needs only these)."""
    pred = Predictor.__new__(Predictor)
    member = Member(_Brightness().eval(), 1.0, {"arch": "unet", "in_channels": 1})
    engine = TorchEngine.__new__(TorchEngine)
    engine.members, engine.device, engine.dtype = [member], torch.device("cpu"), None
    pred.engine, pred.tta, pred.size = engine, [], size
    return pred


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (128, 128)])
def test_probs_of_returns_each_original_in_its_orientation(shape):
    h, w = shape
    img = np.zeros(shape, np.uint8)
    img[h // 10 : h // 3, w * 2 // 3 : w - w // 10] = 255  # bright block in the top right
    (prob,), cls = _predictor().probs_of([img])
    assert cls is None and prob.shape == shape and prob.dtype == np.float32
    # away from the block's edges (resizing to 64 px and back blurs them) the map is the block
    block = (img > 0).astype(np.uint8)
    kernel = np.ones((2 * (h // 64) + 5, 2 * (w // 64) + 5), np.uint8)
    core, near = cv2.erode(block, kernel) > 0, cv2.dilate(block, kernel) > 0
    assert core.sum() > 0.3 * block.sum()
    assert prob[core].min() > 0.99 and prob[~near].max() < 0.01
    flipped = np.ascontiguousarray(img[:, ::-1])
    (back,), _ = _predictor().probs_of([flipped])
    np.testing.assert_allclose(back[:, ::-1], prob, atol=1e-5)
