"""Ignite handlers for the bundles' workflows: a training progress bar and the evaluation metrics writer."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import MetaTensor
from monai.transforms import Orientation

from synth7t.metrics import summarize, volume_metrics

__all__ = ["LossProgressBar", "VolumeMetricsWriter", "write_atomically"]

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


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        temporary = Path(handle.name)
    os.replace(temporary, path)


def _subject_name(image: torch.Tensor) -> str:
    filename = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
    name = Path(str(filename)).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class VolumeMetricsWriter:
    """Per-subject metrics of the synthetic 7T and of the identity baseline, written when evaluation completes.

    For every volume of the evaluator's (decollated, post-processed) output it computes
    :func:`synth7t.metrics.volume_metrics` of ``pred`` against ``label`` and of ``image`` (the 3T input, the
    identity baseline) against ``label``, inside ``mask``, after reorienting all of them to RAS so that the 2-D
    per-slice SSIM runs over axial slices whatever the files' orientation. At completion it writes
    ``metrics.csv`` (one row per subject; model columns then ``identity_`` columns) and ``metrics_summary.json``
    (mean, population standard deviation and count of every column) into ``output_dir``, each atomically.

    MONAI's ``MetricsSaver`` writes one file per metric and no baseline, hence this handler (BUNDLES.md
    "Outputs" fixes the layout).

    Args:
        output_dir: folder of ``metrics.csv`` and ``metrics_summary.json``.
        pred_key, image_key, label_key, mask_key: the prediction, the identity baseline (the 3T input; VCT: the 3T
            ADC map), the 7T target and the brain mask.
        name_key: the image whose file name (extension dropped) names the row's subject; ``image_key`` by default.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
        name_key: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
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
            for prefix, candidate in (("", pred), ("identity_", image)):
                values = volume_metrics(candidate, label, mask)
                row.update({f"{prefix}{name}": value for name, value in values.items()})
            self.rows.append(row)
            logger.info("%s: psnr %.3f (identity %.3f)", row["subject"], row["psnr"], row["identity_psnr"])

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
            logger.info(
                "%s: %.4f ± %.4f (identity %.4f ± %.4f)",
                name,
                summary[name]["mean"],
                summary[name]["std"],
                summary[f"identity_{name}"]["mean"],
                summary[f"identity_{name}"]["std"],
            )


def _format(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)
