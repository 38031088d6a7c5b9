"""Pictures a person would rather look at than read: training curves, prediction overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import pandas as pd

from pneumoseg.io import atomic_write


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_heatmaps(panels, path: str | Path, title: str, value_label: str) -> Path:
    """One heatmap per panel ``(grid, best_cell, ylabel, xlabel, subtitle)``: ``grid`` a
    DataFrame (rows × columns of scores), ``best_cell`` its ``(row label, column label)``, boxed
    in red; every cell's value printed."""
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (grid, (r, c), ylabel, xlabel, subtitle) in zip(axes[0], panels, strict=True):
        vals = grid.to_numpy(dtype=float)
        im = ax.imshow(vals, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns], rotation=45)
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=9)
        lo, hi = float(vals.min()), float(vals.max())
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                light = vals[i, j] < lo + 0.6 * (hi - lo)
                ax.text(j, i, f"{vals[i, j]:.3f}", ha="center", va="center", fontsize=6.5,
                        color="white" if light else "black")  # fmt: skip
        i, j = list(grid.index).index(r), list(grid.columns).index(c)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
        fig.colorbar(im, ax=ax, label=value_label)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(log: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Loss (train/val), validation Dice (all, gated, positive-only) and learning rate per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ep = log["epoch"]
    ax = axes[0]
    ax.plot(ep, log["loss"], "o-", label="train loss")
    if "val_loss" in log and log["val_loss"].notna().any():
        ax.plot(ep, log["val_loss"], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_yscale("log")  # early validation losses are often 10x the rest
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    for col, label in (
        ("dice", "mean Dice (competition)"),
        ("dice_gated", "mean Dice, best threshold + area gate"),
        ("pos_dice", "Dice on positives"),
    ):
        if col in log and log[col].notna().any():
            ax.plot(ep, log[col], "o-", label=label)
    if "baseline_dice" in log:
        ax.axhline(float(log["baseline_dice"].iloc[0]), color="grey", ls="--", label="all-empty")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.set_title("validation")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(ep, log["lr"], "o-")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("learning rate")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# prediction overlays
# --------------------------------------------------------------------------------------------------
def overlay(
    image,
    probs,
    mask,
    title: str = "",
    image_prob: float | None = None,
    alpha: float = 0.35,
    color: tuple[int, int, int] = (255, 40, 40),
):
    """An RGB uint8 picture of a prediction: the image in grey, ``mask`` filled semi-transparent
    red with its outline, a box and the component's mean probability around every connected
    component, and ``title`` plus the image-level probability (``image_prob``; default the maximum
    of ``probs``) in the top-left corner.

    ``image`` uint8 H×W; ``probs`` float H×W in [0, 1] (or uint8 p × 255); ``mask`` H×W 0/1.
    """
    import cv2
    import numpy as np

    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be H×W grey, got shape {img.shape}")
    h, w = img.shape
    p = np.asarray(probs, dtype=np.float32)
    if np.asarray(probs).dtype == np.uint8:
        p = p / 255.0
    m = (np.asarray(mask) > 0).astype(np.uint8)
    if p.shape != (h, w) or m.shape != (h, w):
        raise ValueError(f"image {img.shape}, probs {p.shape} and mask {m.shape} differ in size")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    scale = max(h, w) / 1024.0
    thick = max(1, round(2 * scale))
    font, fscale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, 0.9 * scale)
    rgb = mask_overlay(img, m, alpha, color, thick)
    box_col = (255, 220, 0)
    for c in components(m, p):
        x, y, bw, bh = c["box"]
        cv2.rectangle(rgb, (x, y), (x + bw - 1, y + bh - 1), box_col, thick)
        _text(rgb, f"{c['score']:.2f}", (x, max(0, y - 4)), font, fscale * 0.8, box_col, thick)

    ip = float(p.max()) if image_prob is None else float(image_prob)
    label = f"{title}  p={ip:.3f}" if title else f"p={ip:.3f}"
    (_, th), _ = cv2.getTextSize(label, font, fscale, thick)
    _text(
        rgb,
        label,
        (round(8 * scale) + 2, th + round(8 * scale) + 2),
        font,
        fscale,
        (255, 255, 255),
        thick,
    )
    return rgb


def mask_overlay(
    image,
    mask,
    alpha: float = 0.35,
    color: tuple[int, int, int] = (255, 40, 40),
    thick: int | None = None,
):
    """An RGB uint8 copy of ``image`` (uint8 H×W grey) with ``mask`` (H×W, nonzero = on) filled
    semi-transparent ``color`` and outlined (``thick`` px; default 2 px per 1024 px of size)."""
    import cv2
    import numpy as np

    img = np.asarray(image)
    m = (np.asarray(mask) > 0).astype(np.uint8)
    if img.ndim != 2 or img.dtype != np.uint8 or m.shape != img.shape:
        raise ValueError(f"image must be uint8 H×W and mask the same size: {img.shape}, {m.shape}")
    if thick is None:
        thick = max(1, round(2 * max(img.shape) / 1024.0))
    rgb = np.repeat(img[..., None], 3, axis=2)
    col = np.array(color, dtype=np.float32)
    on = m.astype(bool)
    rgb[on] = (rgb[on].astype(np.float32) * (1 - alpha) + col * alpha).round().astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(rgb, contours, -1, color, thick, lineType=cv2.LINE_AA)
    return rgb


def components(mask, probs) -> list[dict]:
    """Each 8-connected component of ``mask`` (H×W, nonzero = on): ``box`` ``[x, y, w, h]``,
    ``area``, ``score`` (mean of ``probs``, float H×W in [0, 1], over it: what overlays print) and
    ``max_probability``. The web app returns the same list."""
    import cv2
    import numpy as np

    m = (np.asarray(mask) > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        vals = probs[labels == k]
        out.append({"box": [x, y, w, h], "area": area, "score": float(vals.mean()),
                    "max_probability": float(vals.max())})  # fmt: skip
    return out


def _text(rgb, text, org, font, fscale, color, thick) -> None:
    """Text with a dark outline: readable on any background."""
    import cv2

    org = (int(org[0]), max(int(org[1]), 1))
    cv2.putText(rgb, text, org, font, fscale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(rgb, text, org, font, fscale, color, thick, cv2.LINE_AA)


def save_rgb(rgb, path: str | Path, compression: int | None = None) -> Path:
    """Write an RGB uint8 array as a PNG, atomically (``compression`` 0..9: OpenCV's PNG level;
    None: its default, fast)."""
    import cv2

    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode {path} as PNG")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.tobytes())
    return Path(path)
