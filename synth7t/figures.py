"""Figures comparing a synthetic 7T volume with its 3T input and the real 7T."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from synth7t.outputs import temporary_path  # noqa: E402

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
    3T input | synthetic 7T | real 7T | |3T input - real| | |synthetic - real|.

    All arrays are ``(X, Y, Z)`` in RAS orientation and [0, 1] units. The two error maps share one colour scale,
    running to the 99.5th percentile of the input's error inside ``mask``, so the error the model removes shows as
    the difference between them. Returns the path written (atomically: a temporary file renamed into place).
    """
    centre = _centre_of(mask > 0)
    errors = {"|3T input - real|": np.abs(image - target), "|synthetic - real|": np.abs(pred - target)}
    error_max = float(np.percentile(errors["|3T input - real|"][mask > 0], 99.5)) or 1.0
    images = (("3T input", image), ("synthetic 7T", pred), ("real 7T", target))
    fig, axes = plt.subplots(len(VIEWS), 5, figsize=(16, 10), squeeze=False)
    for row, view in enumerate(VIEWS):
        for col, (name, volume) in enumerate(images):
            axes[row, col].imshow(_section(volume, view, centre), cmap="gray", vmin=0.0, vmax=1.0)
            axes[row, col].set_title(f"{name}, {view}" if row == 0 else view, fontsize=9)
        for col, (name, error) in enumerate(errors.items(), start=len(images)):
            shown = axes[row, col].imshow(_section(error, view, centre), cmap="inferno", vmin=0.0, vmax=error_max)
            axes[row, col].set_title(name if row == 0 else view, fontsize=9)
        fig.colorbar(shown, ax=axes[row, len(images) :].tolist(), fraction=0.046, pad=0.02)
    for axis in axes.flat:
        axis.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        fig.savefig(temporary, dpi=90, format="png")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(fig)
    return path
