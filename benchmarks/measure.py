"""How every benchmark measures: warm-up runs, several timed runs, median and spread, peak memory, the machine.

Peak host memory is the process's peak resident set size (``ru_maxrss``), which only grows; a benchmark that reports
it runs each case in a fresh process (:func:`run_case_in_subprocess`) and subtracts the peak before the timed work.
CUDA peaks come from ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    """Wall-clock seconds of ``runs`` timed calls after ``warmup`` untimed ones."""

    median_s: float
    min_s: float
    max_s: float
    runs: int
    warmup: int

    def as_dict(self) -> dict[str, float | int]:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def synchronize(device: torch.device | str) -> None:
    """Waits for queued CUDA work, so a timer stops when the work is done, not when it is queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], warmup: int, runs: int, device: torch.device | str = "cpu") -> Timing:
    """Times ``fn()`` ``runs`` times after ``warmup`` untimed calls (first-call costs: allocation, compilation)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), runs, warmup)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_cuda_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device: torch.device | str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def machine() -> dict[str, Any]:
    """The machine the figures were measured on: CPU model and cores, memory, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import monai
    import onnxruntime

    return {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "platform": platform.platform(),
    }


def run_case_in_subprocess(module: str, case: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Runs ``python -m <module> '<case as JSON>'`` and returns the JSON object it prints on its last line.

    A fresh process per case makes the peak resident set size that case's own; a case that fails comes back as
    ``{"error": ...}`` so one failure does not lose the other figures.
    """
    command = [sys.executable, "-m", module, json.dumps(case)]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {**case, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def report_case(measure: Callable[..., dict[str, Any]], settings: tuple[str, ...] = ()) -> None:
    """The other side of :func:`run_case_in_subprocess`, for a module's ``__main__``: reads the case from the command
    line, passes its ``settings`` keys to ``measure`` as keywords and the rest as the case, prints the JSON result."""
    case = json.loads(sys.argv[1])
    keywords = {key: case.pop(key) for key in settings if key in case}
    print(json.dumps(measure(case, **keywords)))


def cuda_description() -> dict[str, Any] | None:
    """The CUDA side of the machine (GPU model, compute capability, memory, CUDA, cuDNN and NCCL versions), or
    ``None`` where torch finds no CUDA GPU: :func:`machine` names the GPU only."""
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    distributed = torch.distributed.is_available()
    nccl = torch.cuda.nccl.version() if distributed and torch.distributed.is_nccl_available() else None
    return {
        "gpu": properties.name,
        "gpu_count": torch.cuda.device_count(),
        "capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(str(part) for part in nccl) if isinstance(nccl, tuple) else nccl,
    }


def amp_training_step(
    network: Callable[..., torch.Tensor],
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Any,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """One training step as MONAI's ``SupervisedTrainer`` takes it with ``amp=True``: forward and loss under
    ``autocast`` (a ``torch.autocast`` context, or ``contextlib.nullcontext()`` for float32), backward through
    ``scaler`` (a disabled ``GradScaler`` passes gradients unscaled), optimizer step; returns the detached loss.

    MONAI's trainer fixes ``torch.autocast("cuda")`` and a CUDA ``GradScaler``; this step takes any device and
    precision, so a benchmark runs the same step on the CPU and on the GPU."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = loss_function(network(inputs), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells written with ``str``; ``None`` as an empty cell)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
