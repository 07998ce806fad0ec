"""Ignite handlers for the bundles' workflows: a training progress bar and the evaluation metrics writer."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, Orientation
from monai.transforms.utils import generate_spatial_bounding_box

from synth7t.metrics import summarize, volume_metrics
from synth7t.outputs import temporary_path

__all__ = [
    "GAUSSIAN_SIGMAS",
    "LossProgressBar",
    "ReportWrittenFiles",
    "StopOnNonFiniteLoss",
    "VolumeMetricsWriter",
    "gaussian_baseline",
    "write_atomically",
]

logger = logging.getLogger(__name__)


def _engine_loss(output: Any) -> Any:
    """The ``loss`` of an engine output: a list of per-sample dicts (decollated) or one dict (``decollate=False``)."""
    return output[0]["loss"] if isinstance(output, (list, tuple)) else output["loss"]


class LossProgressBar(ProgressBar):
    """ignite's tqdm progress bar over each epoch's iterations, showing the current loss.

    MONAI engines attach every handler with ``handler.attach(engine)``; ignite's bar then shows no loss, so this
    subclass supplies the output transform (``loss`` of the engine output by default, decollated or not).
    """

    def __init__(self, output_transform: Callable | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("persist", True)
        super().__init__(**kwargs)
        self._output_transform = output_transform or _engine_loss

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("output_transform", lambda output: {"loss": self._output_transform(output)})
        super().attach(engine, *args, **kwargs)


class ReportWrittenFiles:
    """Ends a run with one line naming the files it wrote, those of ``paths`` that exist when the engine completes.

    MONAI's ``SaveImaged`` logs each file as it goes (``print_log``) but a run has no closing line; a newcomer should
    see where the results went. ``paths`` are the outputs a workflow checked before any compute
    (:func:`synth7t.outputs.prediction_paths`, :func:`synth7t.outputs.check_absent`).
    """

    def __init__(self, paths: list[str | os.PathLike], what: str = "files") -> None:
        self.paths = [Path(p) for p in paths]
        self.what = what

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        written = [p for p in self.paths if p.is_file()]
        folders = sorted({str(p.parent) for p in written})
        names = ", ".join(p.name for p in written)
        logger.info("wrote %d %s to %s: %s", len(written), self.what, " and ".join(folders) or "-", names)


class StopOnNonFiniteLoss:
    """Stops training with exit status 1 at the first iteration whose loss is NaN or infinite, before any checkpoint
    of that state is written.

    ignite's ``TerminateOnNan`` ends the run as a normal one (exit status 0), after which MONAI's ``CheckpointSaver``
    writes the final, non-finite weights. This handler raises ``SystemExit`` instead: it is not an ``Exception``, so
    ignite fires no handler on it (MONAI's savers also save on exceptions) and Python prints the message alone. The
    checkpoints already written (the previous epochs') are left as they were.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = torch.as_tensor(_engine_loss(engine.state.output))
        if not bool(torch.isfinite(loss).all()):
            raise SystemExit(
                f"error: the training loss is {loss.float().sum().item()} at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration}; training stopped and no checkpoint of this state was written (resume from "
                "the last checkpoint with a lower learning_rate, or check the data)."
            )


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)  # the name check_absent knows, so a killed run's file is cleared by the next
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _subject_name(image: torch.Tensor) -> str:
    filename = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
    name = Path(str(filename)).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


GAUSSIAN_SIGMAS: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
"""Standard deviations, in voxels, of the Gaussian-filter baseline's grid (:class:`VolumeMetricsWriter`)."""


def gaussian_baseline(
    image: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, sigmas: tuple[float, ...] = GAUSSIAN_SIGMAS
) -> tuple[float, torch.Tensor]:
    """The input smoothed by the Gaussian of ``sigmas`` (voxels, MONAI ``GaussianSmooth``) closest to ``label`` in
    mean squared error, post-processed as the models' predictions are (clipped to [0, 1], zero outside ``mask``):
    ``(sigma, volume)``. The choice sees the target, so the baseline is at least as strong as any one sigma.

    Only the mask's bounding box, widened by the largest kernel's radius, is smoothed: every voxel the kernels reach
    from inside the mask is in it, and the volume's own edges stay where they are, so the result is the same as
    smoothing the whole volume and masking it (tests/test_handlers.py), at the cost of the brain's box (about half of
    a TELL volume)."""
    values = image.as_tensor() if isinstance(image, MetaTensor) else image
    inside = mask > 0
    margin = int(max(sigmas, default=0.0) * GAUSSIAN_TRUNCATED + 1.5)
    start, end = generate_spatial_bounding_box(inside, margin=margin, allow_smaller=True)
    box = (slice(None), *(slice(first, last) for first, last in zip(start, end)))
    best: tuple[float, float, torch.Tensor] | None = None
    for sigma in sigmas:
        candidate = torch.zeros_like(values)
        if values[box].numel():  # an empty mask leaves the baseline zero, as masking would
            candidate[box] = GaussianSmooth(sigma)(values[box]).clamp(0.0, 1.0)
        candidate = candidate * inside
        error = float(((candidate - label) ** 2).mean())
        if best is None or error < best[0]:
            best = (error, sigma, candidate)
    assert best is not None
    return best[1], best[2]


GAUSSIAN_TRUNCATED = 4.0
"""Kernel radius of MONAI ``GaussianSmooth`` in standard deviations (its ``GaussianFilter``'s ``truncated``)."""


class VolumeMetricsWriter:
    """Per-subject metrics of the synthetic 7T and of two baselines, written when evaluation completes.

    For every volume of the evaluator's (decollated, post-processed) output it computes
    :func:`synth7t.metrics.volume_metrics` against ``label`` inside ``mask`` of ``pred``, of ``image`` (the 3T
    input unchanged, the identity baseline, ``identity_`` columns) and of :func:`gaussian_baseline` (the input
    smoothed by the Gaussian of the grid that fits this subject best, clipped and masked like the prediction;
    ``gaussian_`` columns and ``gaussian_sigma``), after reorienting all of them to RAS so that the 2-D per-slice
    SSIM runs over axial slices whatever the files' orientation. At completion it writes ``metrics.csv`` (one row
    per subject) and ``metrics_summary.json`` (mean, population standard deviation and count of every column) into
    ``output_dir``, each atomically.

    MONAI's ``MetricsSaver`` writes one file per metric and no baseline, hence this handler (BUNDLES.md
    "Outputs" fixes the layout).

    Args:
        output_dir: folder of ``metrics.csv`` and ``metrics_summary.json``.
        pred_key, image_key, label_key, mask_key: the prediction, the identity baseline (the 3T input; VCT: the 3T
            ADC map), the 7T target and the brain mask.
        name_key: the image whose file name (extension dropped) names the row's subject; ``image_key`` by default.
        gaussian_sigmas: the Gaussian baseline's grid (voxels); empty for no Gaussian baseline.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
        name_key: str | None = None,
        gaussian_sigmas: tuple[float, ...] = GAUSSIAN_SIGMAS,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.gaussian_sigmas = tuple(gaussian_sigmas)
        self.keys = (pred_key, image_key, label_key, mask_key)
        self.name_key = name_key or image_key
        self.reorient = Orientation(axcodes="RAS")
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def record(self, engine: Engine) -> None:
        # MONAI engines split post-processed items back into output keys (pred, image, label) and batch keys
        # (mask, ...); read both, the output's inverted images first.
        for batch_item, output_item in zip(engine.state.batch, engine.state.output):
            item = {**batch_item, **output_item}
            pred, image, label, mask = (self._as_ras(item[key]) for key in self.keys)
            row: dict[str, Any] = {"subject": _subject_name(item[self.name_key])}
            candidates = [("", pred), ("identity_", image)]
            if self.gaussian_sigmas:
                sigma, smoothed = gaussian_baseline(image, label, mask, self.gaussian_sigmas)
                candidates.append(("gaussian_", smoothed))
            for prefix, candidate in candidates:
                values = volume_metrics(candidate, label, mask)
                row.update({f"{prefix}{name}": value for name, value in values.items()})
            if self.gaussian_sigmas:
                row["gaussian_sigma"] = sigma
            self.rows.append(row)
            logger.info("%s: psnr %.3f (%s)", row["subject"], row["psnr"], _baselines(row, "psnr"))

    def _as_ras(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.reorient(tensor) if isinstance(tensor, MetaTensor) else tensor

    def write(self, engine: Engine | None = None) -> None:
        if not self.rows:
            return
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({column: _format(value) for column, value in row.items()} for row in self.rows)
        write_atomically(self.output_dir / "metrics.csv", table.getvalue())
        summary = summarize(self.rows)
        write_atomically(self.output_dir / "metrics_summary.json", json.dumps(summary, indent=2) + "\n")
        for name in ("psnr", "ssim", "psnr_brain", "ssim_brain"):
            means = {column: values["mean"] for column, values in summary.items()}
            logger.info("%s: %.4f ± %.4f (%s)", name, means[name], summary[name]["std"], _baselines(means, name))


def _baselines(values: dict[str, Any], name: str) -> str:
    """``identity 30.1234, gaussian 30.5678`` for the baseline columns of ``name`` present in ``values``."""
    return ", ".join(f"{b} {values[f'{b}_{name}']:.4f}" for b in ("identity", "gaussian") if f"{b}_{name}" in values)


def _format(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
