"""Pictures a person would rather look at than read: training curves (more to come)."""

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


def plot_curves(log: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Loss (train/val), validation Dice (all / positive-only) and learning rate per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ep = log["epoch"]
    ax = axes[0]
    ax.plot(ep, log["loss"], "o-", label="train loss")
    if "val_loss" in log and log["val_loss"].notna().any():
        ax.plot(ep, log["val_loss"], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    for col, label in (("dice", "mean Dice (competition)"), ("pos_dice", "Dice on positives")):
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
