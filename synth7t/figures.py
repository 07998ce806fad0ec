"""Figures comparing a synthetic 7T volume with its 3T input and the real 7T."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["comparison_figure"]

VIEWS = ("axial", "coronal", "sagittal")


def _centre_of(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre of the mask's bounding box, so every view cuts through the brain."""
    coords = np.argwhere(mask)
    return tuple(int(v) for v in (coords.min(0) + coords.max(0)) // 2)


def _section(volume: np.ndarray, view: str, centre: tuple[int, int, int]) -> np.ndarray:
    """A 2-D section of a RAS-oriented volume, rotated so anterior / superior point up."""
    x, y, z = centre
    section = {"axial": volume[:, :, z], "coronal": volume[:, y, :], "sagittal": volume[x, :, :]}[view]
    return np.rot90(section)


def comparison_figure(
    image: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Write a PNG with one row per view (axial, coronal, sagittal) and the columns
    3T input | synthetic 7T | real 7T | |synthetic - real|.

    All arrays are ``(X, Y, Z)`` in RAS orientation and [0, 1] units; the error map's colour scale runs to the
    99.5th percentile of the error inside ``mask``. Returns the path written.
    """
    centre = _centre_of(mask > 0)
    error = np.abs(pred - target)
    error_max = float(np.percentile(error[mask > 0], 99.5)) or 1.0
    columns = (("3T input", image, "gray", 1.0), ("synthetic 7T", pred, "gray", 1.0), ("real 7T", target, "gray", 1.0))
    fig, axes = plt.subplots(len(VIEWS), 4, figsize=(13, 10), squeeze=False)
    for row, view in enumerate(VIEWS):
        for col, (name, volume, cmap, vmax) in enumerate(columns):
            axes[row, col].imshow(_section(volume, view, centre), cmap=cmap, vmin=0.0, vmax=vmax)
            axes[row, col].set_title(f"{name}, {view}" if row == 0 else view, fontsize=9)
        shown = axes[row, 3].imshow(_section(error, view, centre), cmap="inferno", vmin=0.0, vmax=error_max)
        axes[row, 3].set_title("|synthetic - real|" if row == 0 else view, fontsize=9)
        fig.colorbar(shown, ax=axes[row, 3], fraction=0.046, pad=0.04)
    for axis in axes.flat:
        axis.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
