"""Training curves of the shipped weights: exported once from a training run's TensorBoard logs, plotted by the bench.

The runs that trained ``models/model.pt`` live outside the repository (``runs/``, ignored); their scalars (the
bundle's ``train_loss`` per iteration, its validation metrics per validation) are kept in
``benchmarks/training_logs/<bundle>.json``::

    python -m benchmarks.curves export --bundle watnet --run_dir runs/watnet_realistic
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.measure import REPOSITORY

LOGS = REPOSITORY / "benchmarks" / "training_logs"


def export(bundle: str, run_dir: str) -> Path:
    """Every scalar of the TensorBoard event files of ``run_dir`` as ``{tag: [[step, value], ...]}``, by step. A
    resumed run writes new event files (named by their start time) that go on from its checkpoint: the files are
    read in that order, and a step logged again after a resume keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[str, dict[int, float]] = {}
    files = sorted(Path(run_dir).glob("events.out.tfevents.*"), key=lambda path: int(path.name.split(".")[3]))
    for events in files:
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values = {event.step: round(event.value, 6) for event in accumulator.Scalars(tag)}
            by_step.setdefault(tag, {}).update(values)
    scalars = {tag: [[step, values[step]] for step in sorted(values)] for tag, values in by_step.items()}
    if not scalars:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard scalars (events.out.tfevents.*) found.")
    LOGS.mkdir(parents=True, exist_ok=True)
    destination = LOGS / f"{bundle}.json"
    destination.write_text(json.dumps({"bundle": bundle, "run": Path(run_dir).name, "scalars": scalars}) + "\n")
    return destination


def plot(bundle: str, destination: Path) -> Path:
    """Training loss per iteration (left) and each validation metric per validation (right) of ``bundle``."""
    log = json.loads((LOGS / f"{bundle}.json").read_text())
    validation = {tag: points for tag, points in log["scalars"].items() if tag.startswith("val_")}
    fig, axes = plt.subplots(1, 1 + len(validation), figsize=(4.5 * (1 + len(validation)), 3.4), squeeze=False)
    loss = log["scalars"]["train_loss"]
    axes[0, 0].plot([step for step, _ in loss], [value for _, value in loss], linewidth=0.6)
    axes[0, 0].set(title="train_loss", xlabel="iteration", yscale="log")
    for axis, (tag, points) in zip(axes[0, 1:], validation.items()):
        axis.plot([step for step, _ in points], [value for _, value in points], marker="o", markersize=2)
        axis.set(title=tag, xlabel="epoch")
    fig.suptitle(f"{bundle}: training run {log['run']}", fontsize=10)
    fig.tight_layout()
    destination.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(destination, dpi=110)
    plt.close(fig)
    return destination


if __name__ == "__main__":
    fire.Fire({"export": export, "plot": plot})
