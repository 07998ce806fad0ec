"""Runs every benchmark and writes ``<output_dir>/<name>.json`` and ``<name>.md`` (``make bench``)::

    python -m benchmarks --output_dir benchmarks/results --name bench

Parts, in order: whole-volume inference with the CPU levers (``benchmarks.inference``), one volume through each
bundle's default ``inferring`` and ``evaluating`` commands (``benchmarks.workflows``), training throughput
(``benchmarks.training``), the ADC fit against DIPY (``benchmarks.adc``), quality on held-out subjects with the
sample figures (``benchmarks.quality``, reused from the previous ``<name>.json`` while weights and data are unchanged)
and the training curves (``benchmarks.curves``). CUDA cases are added when a GPU is present. Nothing here asserts a
figure.
``--parts`` reruns some parts; the others are kept from the previous ``<name>.json``, the report giving their date.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fire
import torch

from benchmarks import adc, curves, inference, quality, training, workflows
from benchmarks.measure import REPOSITORY, machine

PARTS = ("inference", "workflows", "training", "adc", "quality", "curves")


def _timed(name: str, fn: Callable[[], Any], seconds: dict[str, float]) -> Any:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    result = fn()
    seconds[name] = round(time.perf_counter() - start, 1)
    return result


def _curves(figure_dir: Path) -> dict[str, str]:
    """The training-curve PNGs, by bundle, as paths relative to the report's folder."""
    paths = {b: curves.plot(b, figure_dir / f"{b}_training.png") for b in quality.ALL_BUNDLES}
    return {bundle: str(path.relative_to(figure_dir.parent)) for bundle, path in paths.items()}


def _quality(figure_dir: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        return quality.run(Path(work), figure_dir, previous)


def _workflows() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as work:
        return workflows.run(Path(work))


def _images(figures: dict[str, str]) -> list[str]:
    """Markdown images of ``{bundle: path relative to the report's folder}``."""
    return [f"![{bundle}]({path})" for bundle, path in figures.items()]


def report(result: dict[str, Any]) -> str:
    """The Markdown report of one run: machine, command, then one section per part."""
    m = result["machine"]
    hardware = f"{m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB"
    software = f"Python {m['python']}, torch {m['torch']}, MONAI {m['monai']}, ONNX Runtime {m['onnxruntime']}"
    lines = [
        f"# synth7t benchmarks ({result['date']})",
        "",
        f"Machine: {hardware}; GPU: {m['gpu'] or 'none'}. {software}.",
        f"Command: `{result['command']}`; part durations (s): {result['seconds']}.",
    ]
    if result.get("kept"):
        lines += [f"Kept from earlier runs (part: date of its run): {result['kept']}."]
    lines += [""]
    for part in PARTS:
        if part in result:
            lines += _section(part, result[part])
    return "\n".join(lines)


def _section(part: str, value: Any) -> list[str]:
    """The report's lines for one part's result."""
    if part == "inference":
        return ["## Whole-volume inference", "", inference.markdown(value), ""]
    if part == "workflows":
        return ["## One volume through the default workflows", "", workflows.markdown(value), ""]
    if part == "training":
        return ["## Training throughput", "", training.markdown(value), ""]
    if part == "adc":
        return ["## ADC fit: synth7t ComputeADC against DIPY TensorModel", "", adc.markdown(value), ""]
    if part == "quality":
        reused = " (reused: weights and data unchanged since it was measured)" if value["reused"] else ""
        return [f"## Quality on held-out subjects{reused}", "", quality.markdown(value), "", *_images(value["figures"]), ""]
    return ["## Training curves of the shipped weights", "", *_images(value), ""]


def _check_kept_parts_render(kept: dict[str, Any]) -> None:
    """Refuse, before any part runs, to keep a part whose stored result an earlier benchmark wrote in a format this
    report no longer reads (it would fail only after the new parts had been computed)."""
    for part, value in kept.items():
        try:
            _section(part, value)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(
                f"the stored '{part}' result is in an older format ({type(error).__name__}: {error}); rerun it too: "
                f"--parts \"{[part]}\" plus the parts you asked for."
            ) from error


def main(output_dir: str = "benchmarks/results", name: str = "bench", parts: tuple[str, ...] = PARTS) -> Path:
    """Runs ``parts`` and writes the JSON and Markdown report; returns the Markdown path."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {list(PARTS)}.")
    output = (REPOSITORY / output_dir).resolve()
    figure_dir = output / "figures"
    json_path = output / f"{name}.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python -m benchmarks --output_dir {output_dir} --name {name}"
        + ("" if tuple(parts) == PARTS else f" --parts \"{list(parts)}\""),
        "machine": machine(),
        "seconds": seconds,
    }
    runners: dict[str, Callable[[], Any]] = {
        "inference": lambda: inference.run(devices),
        "workflows": _workflows,
        "training": lambda: training.run(devices),
        "adc": adc.run,
        "quality": lambda: _quality(figure_dir, previous.get("quality")),
        "curves": lambda: _curves(figure_dir),
    }
    kept = {
        part: previous.get("kept", {}).get(part, previous["date"])
        for part in PARTS
        if part not in parts and part in previous
    }
    _check_kept_parts_render({part: previous[part] for part in kept})
    for part in parts:
        result[part] = _timed(part, runners[part], seconds)
    result.update({part: previous[part] for part in kept}, kept=kept)
    output.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    markdown_path = output / f"{name}.md"
    markdown_path.write_text(report(result) + "\n")
    print(f"wrote {json_path} and {markdown_path}")
    return markdown_path


if __name__ == "__main__":
    fire.Fire(main)
