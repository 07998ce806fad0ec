"""``make gpu-check``: every GPU code path of the bundles, run once with a pass or fail, in one command::

    python -m benchmarks.gpu_check [--output_dir benchmarks/results] [--smoke] [--jobs 1]

AMP, ``torch.compile``, flash attention, NCCL, ONNX Runtime's CUDA provider and the CUDA figures of ``make bench``
are code that needs a GPU to run. On a CUDA machine this module runs, for each bundle (``watnet``,
``gan_unet_t1w7t``, ``vct_adc7t``), its default ``network_def``, ``loss`` and ``optimizer`` as the bundle builds them
from ``configs/train.yaml`` (``inference.yaml`` for the shipped weights) with MONAI's ``ConfigParser``:

- **training**: a few steps (:func:`benchmarks.measure.amp_training_step`) on a random batch of the bundle's training
  sample (:data:`benchmarks.training.SAMPLE_SHAPES`) at its ``batch_size``, under float16 autocast with a
  ``torch.amp.GradScaler`` and under bfloat16 autocast, each with ``torch.compile`` off and on. The first step
  (compilation included) is timed apart from the median of the others; ``compile_s`` is their difference. Passes when
  every loss is finite.
- **flash attention** (the networks with attention: ``gan_unet_t1w7t``'s ``AttentionResUNet``, ``vct_adc7t``'s
  ``VCT``): the shipped weights built with ``use_flash_attention`` on and off, one input, in float32 and in float16
  autocast, where the flash kernel is forced (``torch.nn.attention.sdpa_kernel``; CUDA's flash kernel takes half
  precision only, so it fails rather than falls back). Passes when the outputs differ by at most the precision's
  tolerance (:data:`TOLERANCES`).
- **parity**: the shipped ``models/model.pt`` through PyTorch eager, TorchScript (``torch.jit.script`` of the
  network, as ``make export`` scripts it) and ONNX Runtime (``models/model.onnx`` through
  :class:`synth7t.engines.OnnxRuntimeNetwork`, which takes the CUDA execution provider on a CUDA device), against the
  CPU float32 eager output of the same weights on the same input: max abs difference ≤ 1e-4 in float32 (TF32 off),
  ≤ 1e-3 in float16 autocast and, on CUDA, in ``tf32`` (PyTorch's CUDA defaults, under which the bundles run: cuDNN
  convolutions in TF32). ONNX Runtime runs its float32 graph only, and on CUDA fails unless the CUDA provider ran.
  Half-precision tolerances are judged on CUDA only (:func:`compared`).
- **torchrun**: ``torchrun --standalone --nproc_per_node=1 -m monai.bundle run training`` with ``train.yaml`` +
  ``multi_gpu_train.yaml`` (NCCL, MONAI's trainer with ``amp`` on; ``torch.compile`` is left to the training and
  throughput cases, which run it without DDP, as the VCT paper trained), one epoch of :data:`TINY_EPOCH` on tiny data
  (:func:`write_tiny_data`). Passes when it exits 0 and has written ``checkpoint_final.pt``.
- **volume**: whole-volume inference time through :func:`benchmarks.inference.measure` (the bundle's ``inferer`` of
  ``inference.yaml``, a 182 x 218 x 182 volume, VCT's 173 x 204 x 173 x 2 as 176 x 208 slices): eager float32 and
  float16 autocast, TorchScript (``models/model.ts``) and ONNX Runtime. Passes when it runs.
- **throughput** (``vct_adc7t``): ``train.yaml`` + ``paper.yaml``, the published network at the paper's batch of 80
  176 x 208 slices with the overlay's ``amp`` and ``compile``: slices per second beside the paper's 64.4 on one
  RTX 4090 (spec ``vct.md`` §8, :data:`benchmarks.training.VCT_PAPER_SLICES_PER_S`). Passes when every loss is finite.

Each bundle runs in its own process (:func:`benchmarks.measure.run_case_in_subprocess`): a crash loses that bundle's
figures only; an exception inside a case is reported in its row (with the end of its traceback in the JSON). The
report, ``<output_dir>/gpu.json`` and ``gpu.md``, names the machine (:func:`benchmarks.measure.machine`,
:func:`benchmarks.measure.cuda_description`), whether it is the GPU run or the CPU smoke, and each case's figures and
result; the command exits with status 1 when a case failed.

**CPU smoke** (the default where torch finds no CUDA GPU, or ``--smoke``): the same functions on the CPU at toy sizes,
so that CI (``tests/test_gpu_check.py``) runs every path that does not need CUDA: batch 1 of 16 x 16 (``watnet``) or
32 x 32 samples (:data:`SMOKE_SHAPES`), two training steps, one compiled case (``vct_adc7t``, whose ``train.yaml``
has a ``compile`` switch, in float16) with ``torch.compile``'s ``eager`` backend (Dynamo captures the graph;
Inductor's C++ build takes minutes on a CPU), ``torchrun`` over Gloo with MONAI's defaults (its ``amp`` is
CUDA-only), whole-volume inference of a block of 1 slice in eager float32, VCT's paper-scale step at batch 1
(``paper.yaml`` turns AMP and compile on only with CUDA), float16 differences reported but not judged; the bundles
at the same time, one CPU thread each where the cores are fewer. Its figures are not GPU results. It writes into a
new temporary folder unless ``--output_dir`` is given, so running it leaves the committed ``benchmarks/results``
alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np
import onnxruntime
import torch
from scipy.ndimage import zoom
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import inference
from benchmarks.inference import bundle_parser
from benchmarks.measure import (
    REPOSITORY,
    amp_training_step,
    cuda_description,
    cuda_peak_mib,
    machine,
    markdown_table,
    report_case,
    reset_cuda_peak,
    run_case_in_subprocess,
    synchronize,
)
from benchmarks.training import SAMPLE_SHAPES, VCT_PAPER_SLICES_PER_S
from synth7t.diffusion_phantom import prepare_diffusion_pairs
from synth7t.engines import OnnxRuntimeNetwork
from synth7t.prepare import prepare_pairs

MODULE = "benchmarks.gpu_check"
BUNDLES = ("watnet", "gan_unet_t1w7t", "vct_adc7t")
SECTIONS = ("training", "attention", "parity", "torchrun", "volume", "throughput")
#: Max abs difference allowed against the CPU float32 output (and between flash and plain attention).
TOLERANCES = {"float32": 1e-4, "float16": 1e-3, "tf32": 1e-3}
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SMOKE_SHAPES = {"watnet": (3, 16, 16), "gan_unet_t1w7t": (3, 32, 32), "vct_adc7t": (2, 32, 32)}
#: Overrides of ``train.yaml`` for one short epoch on :func:`write_tiny_data`'s volumes, validation included.
TINY_EPOCH: dict[str, dict[str, Any]] = {
    "watnet": {"patches_per_draw": 4, "draws_per_volume": 1, "batch_size": 4, "patch_size": [16, 16]},
    "gan_unet_t1w7t": {"slabs_per_draw": 2, "draws_per_volume": 1, "batch_size": 2},
    "vct_adc7t": {"slices_per_volume": 2, "batch_size": 2},
}
for _overrides in TINY_EPOCH.values():
    _overrides.update(max_epochs=1, val_interval=1, validation_slices=8, num_workers=0)
#: Whole-volume inference cases (:func:`benchmarks.inference.measure`); the smoke runs the first.
VOLUME_BACKENDS = (
    {"backend": "eager", "amp": False},
    {"backend": "eager", "amp": True},
    {"backend": "torchscript", "amp": False},
    {"backend": "onnxruntime", "amp": False},
)
SAMPLE_7T = REPOSITORY / "samples" / "mni152_t1w_7t.nii.gz"
#: An exception line of a Python traceback, or a bundle's ``error: ...`` stop, maybe prefixed by torchrun's rank.
ROOT_CAUSE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+(?:Error|Exception)|error):.*)$", re.MULTILINE)
ORT_CUDA = "CUDAExecutionProvider"
ORT_CUDA_MISSING = (
    "ONNX Runtime offers no CUDAExecutionProvider here (providers: {}); install onnxruntime-gpu: "
    "pip install -e '.[gpu]'"
)


def _sizes(smoke: bool) -> dict[str, Any]:
    """How big each case is: the GPU run's sizes, or the smoke's toy ones (module docstring)."""
    if smoke:
        return {
            "shapes": SMOKE_SHAPES, "batch": 1, "check_batch": 1, "steps": 2, "throughput_steps": 2,
            "compile_backend": "eager", "compiled": {"vct_adc7t": ("float16",)}, "volume_slices": 1,
            "volume_warmup": 0, "volume_runs": 1, "volume_backends": VOLUME_BACKENDS[:1],
            "torchrun_timeout_s": 300, "bundle_timeout_s": 600,
        }  # fmt: skip
    return {
        "shapes": SAMPLE_SHAPES, "batch": None, "check_batch": 2, "steps": 6, "throughput_steps": 11,
        "compile_backend": "inductor", "compiled": dict.fromkeys(BUNDLES, tuple(AUTOCAST_DTYPES)),
        "volume_slices": None, "volume_warmup": 1, "volume_runs": 3, "volume_backends": VOLUME_BACKENDS,
        "torchrun_timeout_s": 300, "bundle_timeout_s": 900,
    }  # fmt: skip


def _error(error: BaseException) -> dict[str, Any]:
    """A failed case's fields: the exception in one line, and the end of its traceback for the JSON report."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return {"error": f"{type(error).__name__}: {message}", "traceback": "".join(lines)[-3000:], "passed": False}


def _attempt(labels: dict[str, Any], fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``labels`` with the figures of ``fn(*args)``, or with its error: one case's failure must not stop the others."""
    try:
        return {**labels, **fn(*args)}
    except Exception as error:  # any failure of the code under test is a result to report
        return {**labels, **_error(error)}


def autocast(name: str, device: torch.device) -> Any:
    """``torch.autocast`` on ``device`` for ``"float16"`` and ``"bfloat16"``; no context for the other precisions."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[name]) if name in AUTOCAST_DTYPES else nullcontext()


@contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """Run the block in ``name``: ``"float32"`` (TF32 off, on CUDA too), ``"tf32"`` (PyTorch's CUDA defaults, under
    which the bundles run: cuDNN convolutions in TF32, matrix products in float32), or ``"float16"``/``"bfloat16"``
    autocast on ``device``. The TF32 switches are global; they are restored on exit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if name == "float32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with autocast(name, device):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def random_batch(bundle: str, shape: Sequence[int], batch: int, device: torch.device | str) -> torch.Tensor:
    """``(batch, *shape)`` random values in the network's input range ([-1, 1] for ResViT's VCT, else [0, 1])."""
    values = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))
    return (values * 2 - 1 if bundle == "vct_adc7t" else values).to(device)


def max_abs_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.detach().float().cpu() - reference.float()).abs().max())


def compared(difference: float, name: str, device: torch.device, problems: Sequence[str] = ()) -> dict[str, Any]:
    """A comparison's figures and verdict: within the tolerance of precision ``name`` and without ``problems``.

    The half-precision tolerance is judged on CUDA only: the CPU's float16 kernels are others than the GPU's, so on the
    CPU the difference is reported (``judged`` false), not failed."""
    judged = name not in AUTOCAST_DTYPES or device.type == "cuda"
    problems = [*([f"differs by {difference:.3g}"] if judged and difference > TOLERANCES[name] else []), *problems]
    verdict = {"passed": not problems, "judged": judged, **({"error": "; ".join(problems)} if problems else {})}
    return {"max_abs_difference": difference, "tolerance": TOLERANCES[name], **verdict}


def training_case(
    bundle: str,
    device: torch.device,
    precision_name: str,
    compile_backend: str | None,
    shape: Sequence[int],
    batch: int | None,
    steps: int,
    config: str = "default",
) -> dict[str, Any]:
    """``steps`` training steps of the bundle's ``train.yaml`` network, loss and optimizer (a fresh network, seed 0)
    in ``precision_name`` (float16 with a ``GradScaler``), compiled with ``compile_backend`` unless ``None``."""
    parser = bundle_parser(bundle, "train.yaml", config, str(device))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network").train()
    loss_function = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    batch = batch or parser.get_parsed_content("batch_size")
    inputs = random_batch(bundle, shape, batch, device)
    with torch.no_grad():
        targets = torch.rand_like(network(inputs))
    if compile_backend is not None:
        torch._dynamo.reset()  # each compiled case pays its own compilation
        network = torch.compile(network, backend=compile_backend)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_name == "float16")
    reset_cuda_peak(device)
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        context = autocast(precision_name, device)  # around the forward pass and the loss only
        loss = amp_training_step(network, loss_function, optimizer, scaler, context, inputs, targets)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    step_s = statistics.median(seconds[1:]) if steps > 1 else seconds[0]
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return {
        "batch_size": batch,
        "sample_shape": list(shape),
        "parameters": sum(p.numel() for p in parser.get_parsed_content("network_def").parameters()),
        "first_step_s": round(seconds[0], 4),
        "step_s": round(step_s, 4),
        "compile_s": round(seconds[0] - step_s, 2) if compile_backend else None,
        "samples_per_s": round(batch / step_s, 2),
        "losses": [float(f"{value:.5g}") for value in losses],
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "cuda_peak_mib": cuda_peak_mib(device),
        "passed": finite,
        **({} if finite else {"error": "a loss is not finite"}),
    }


def training_cases(bundle: str, device: torch.device, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """float16 + GradScaler and bfloat16, each eager and compiled (the smoke compiles fewer: ``sizes["compiled"]``)."""
    rows = []
    for name in AUTOCAST_DTYPES:
        for compiled in (False, True):
            if compiled and name not in sizes["compiled"].get(bundle, ()):
                continue
            backend = sizes["compile_backend"] if compiled else None
            labels = {"bundle": bundle, "config": "default", "precision": name, "compile": backend}
            shape, batch = sizes["shapes"][bundle], sizes["batch"]
            rows.append(_attempt(labels, training_case, bundle, device, name, backend, shape, batch, sizes["steps"]))
    return rows


def shipped_network(bundle: str, device: torch.device | str, **overrides: Any) -> torch.nn.Module:
    """The ``network_def`` of the bundle's ``inference.yaml`` (with ``overrides``) holding ``models/model.pt``."""
    parser = bundle_parser(bundle, "inference.yaml", "default", str(device))
    for key, value in overrides.items():
        parser[key] = value
    network = parser.get_parsed_content("network_def")
    weights = REPOSITORY / "bundles" / bundle / "models" / "model.pt"
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.to(device).eval()


def _forward(network: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, name: str) -> torch.Tensor:
    with torch.inference_mode(), precision(name, inputs.device):
        return network(inputs)


def attention_cases(bundle: str, device: torch.device, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """Flash against plain attention with the shipped weights; none for a network without attention."""
    if "use_flash_attention" not in bundle_parser(bundle, "inference.yaml", "default", "cpu"):
        return []
    networks = {flash: shipped_network(bundle, device, use_flash_attention=flash) for flash in (True, False)}
    inputs = random_batch(bundle, sizes["shapes"][bundle], sizes["check_batch"], device)

    def compare(name: str) -> dict[str, Any]:
        forced = name != "float32"
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if forced else nullcontext():
            flash = _forward(networks[True], inputs, name)
        difference = max_abs_difference(flash, _forward(networks[False], inputs, name))
        return {"flash_kernel_forced": forced, **compared(difference, name, device)}

    return [_attempt({"bundle": bundle, "precision": name}, compare, name) for name in ("float32", "float16")]


def _onnxruntime_network(bundle: str, device: torch.device) -> torch.nn.Module:
    return OnnxRuntimeNetwork(str(REPOSITORY / "bundles" / bundle / "models" / "model.onnx"), device)


def _onnxruntime_cuda_missing() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or ``None`` when its CUDA provider is installed."""
    providers = onnxruntime.get_available_providers()
    return None if ORT_CUDA in providers else ORT_CUDA_MISSING.format(", ".join(providers))


def _parity(
    model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, reference: torch.Tensor, name: str
) -> dict[str, Any]:
    """``model``'s output for ``inputs`` (on its device) in precision ``name`` against ``reference``; an ONNX Runtime
    session on a CUDA device fails unless its CUDA provider ran."""
    output = _forward(model, inputs, name)
    providers = getattr(model, "providers", None)
    problems = []
    if providers is not None and inputs.device.type == "cuda" and providers[0] != ORT_CUDA:
        problems.append(_onnxruntime_cuda_missing() or f"the session ran on {providers[0]}")
    figures = {"output_dtype": str(output.dtype).removeprefix("torch."), "providers": providers}
    return {**figures, **compared(max_abs_difference(output, reference), name, inputs.device, problems)}


def parity_cases(bundle: str, device: torch.device, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """Each backend and precision on ``device`` against the CPU float32 eager output of the shipped weights."""
    inputs = random_batch(bundle, sizes["shapes"][bundle], sizes["check_batch"], "cpu")
    reference = _forward(shipped_network(bundle, "cpu"), inputs, "float32")
    network = shipped_network(bundle, device)
    builders: dict[str, Callable[[], Any]] = {
        "eager": lambda: network,
        "torchscript": lambda: torch.jit.script(network),
        "onnxruntime": lambda: _onnxruntime_network(bundle, device),
    }
    precisions = ("float32", "float16", *(("tf32",) if device.type == "cuda" else ()))
    rows = []
    for backend, build in builders.items():
        labels = {"bundle": bundle, "backend": backend, "device": str(device)}
        try:
            model = build()
        except Exception as error:  # an export or session that cannot be built fails its rows
            rows.append({**labels, **_error(error)})
            continue
        for name in precisions if backend != "onnxruntime" else ("float32",):
            rows.append(_attempt({**labels, "precision": name}, _parity, model, inputs.to(device), reference, name))
    return rows


def write_tiny_data(directory: Path, diffusion: bool) -> Path:
    """Tiny training data prepared as a user prepares theirs; returns the folder holding its ``datalist.json``.

    Three subjects (two training, one validation): 14-slice axial slabs of the shipped MNI sample
    (``samples/mni152_t1w_7t.nii.gz``) shrunk five-fold to 36 x 44 voxels in-plane, stored as 1 mm volumes, then
    :func:`synth7t.prepare.prepare_pairs` (the realistic 3T recipe; 3T/7T T1w pairs and masks) or, for ``diffusion``,
    :func:`synth7t.diffusion_phantom.prepare_diffusion_pairs` (3T T1w and DWI, 7T ADC targets).
    """
    sample = nib.load(SAMPLE_7T)
    small = zoom(np.asarray(sample.dataobj, dtype=np.float32), 0.2, order=1)
    volumes = directory / "7t"
    volumes.mkdir(parents=True)
    for index in range(3):
        slab = np.clip(small[..., 10 + 3 * index : 24 + 3 * index], 0, 255).astype(np.uint8)
        nib.save(nib.Nifti1Image(slab, sample.affine), volumes / f"sub-{index}.nii.gz")
    prepare = prepare_diffusion_pairs if diffusion else prepare_pairs
    return prepare(volumes, directory / "prepared", n_validation=1, n_test=0).parent


def torchrun_command(bundle: str, dataset_dir: Path, output_dir: Path, overrides: dict[str, Any]) -> list[str]:
    """``torchrun --standalone --nproc_per_node=1`` of the bundle's DDP training (``python -m torch.distributed.run``
    is ``torchrun``), ``overrides`` given as ``--key value`` (Python literals, as ``fire`` reads them)."""
    configs = REPOSITORY / "bundles" / bundle / "configs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command += ["-m", "monai.bundle", "run", "training"]
    command += ["--config_file", json.dumps([str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml")])]
    command += ["--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _root_cause(output: str) -> tuple[str, int]:
    """The first exception line of a failed run's ``output`` (torchrun ends with its own summary of the failure,
    below the worker's traceback; a bundle's bad-input stop is one ``error: ...`` line), without torchrun's rank
    prefix, and where that line ends; else the last line."""
    match = ROOT_CAUSE.search(output)
    if match:
        return match.group(1), match.end()
    return (output.strip().splitlines() or ["no output"])[-1], len(output)


def _run_group(command: list[str], environment: dict[str, str], timeout_s: float) -> tuple[int | None, str]:
    """Runs ``command`` in its own process group; returns its exit status (``None`` when it ran past ``timeout_s``
    and the whole group, torchrun's workers included, was killed) and its output (standard output and error)."""
    with subprocess.Popen(
        command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            output = process.communicate(timeout=timeout_s)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return None, process.communicate()[0]
    return process.returncode, output


def torchrun_case(bundle: str, device: torch.device, sizes: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """One tiny DDP epoch of the bundle (module docstring), over NCCL on CUDA, Gloo on the CPU
    (``multi_gpu_train.yaml`` chooses)."""
    if device.type == "cuda" and not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        return {"passed": False, "error": f"torch {torch.__version__} has no NCCL"}
    overrides = {**TINY_EPOCH[bundle], **({"amp": True} if device.type == "cuda" else {})}
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="gpu_check_torchrun_") as work:
        dataset = write_tiny_data(Path(work) / "data", diffusion=bundle == "vct_adc7t")
        run_dir = Path(work) / "run"
        start = time.perf_counter()
        command = torchrun_command(bundle, dataset, run_dir, overrides)
        returncode, output = _run_group(command, environment, sizes["torchrun_timeout_s"])
        seconds = time.perf_counter() - start
        checkpoint = (run_dir / "checkpoint_final.pt").is_file()
    figures = {"overrides": overrides, "seconds": round(seconds, 1), "checkpoint": checkpoint}
    if returncode == 0 and checkpoint:
        return {**figures, "passed": True}
    cause, end = _root_cause(output)
    if returncode is None:
        reason = f"timed out after {sizes['torchrun_timeout_s']} s"
    else:
        reason = f"exit status {returncode}: {cause}" if returncode else "no checkpoint_final.pt written"
    return {**figures, "passed": False, "error": reason, "traceback": output[:end][-3000:]}


def _volume(case: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {**inference.measure(dict(case), **settings), "passed": True}


def volume_cases(bundle: str, device: torch.device, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """Whole-volume inference through :func:`benchmarks.inference.measure` (a block of slices in the smoke)."""
    rows = []
    for backend in sizes["volume_backends"]:
        case = {"bundle": bundle, "config": "default", "device": str(device), "compile": False, **backend}
        missing = _onnxruntime_cuda_missing() if backend["backend"] == "onnxruntime" and device.type == "cuda" else None
        if missing:  # the CPU provider would take minutes over a whole volume and measure nothing of the GPU
            rows.append({**case, "passed": False, "error": missing})
            continue
        settings = {"warmup": sizes["volume_warmup"], "runs": sizes["volume_runs"], "slices": sizes["volume_slices"]}
        rows.append(_attempt(case, _volume, case, settings))
    return rows


def throughput_case(device: torch.device, sizes: dict[str, Any]) -> dict[str, Any]:
    """VCT's paper-scale training steps with ``paper.yaml``'s own ``amp`` and ``compile`` (on with CUDA)."""
    parser = bundle_parser("vct_adc7t", "train.yaml", "paper", str(device))
    name = "float16" if parser.get_parsed_content("amp") else "float32"
    backend = sizes["compile_backend"] if parser.get_parsed_content("compile") else None
    batch = sizes["batch"]
    labels = {"bundle": "vct_adc7t", "config": "paper", "precision": name, "compile": backend}
    shape = sizes["shapes"]["vct_adc7t"]
    steps = sizes["throughput_steps"]
    result = _attempt(labels, training_case, "vct_adc7t", device, name, backend, shape, batch, steps, "paper")
    return {**result, "paper_slices_per_s": VCT_PAPER_SLICES_PER_S}


def measure_bundle(case: dict[str, Any]) -> dict[str, Any]:
    """Every section of one bundle in this process (``python -m benchmarks.gpu_check '<case as JSON>'``).

    ``torchrun`` runs first, before this process touches the GPU, so that the two do not share it."""
    device, threads = torch.device(case["device"]), case.get("threads")
    bundle, sizes = case["bundle"], _sizes(case["smoke"])
    if threads:
        torch.set_num_threads(threads)
    ddp = {"bundle": bundle, "backend": "nccl" if device.type == "cuda" else "gloo"}
    runners: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "torchrun": lambda: [_attempt(ddp, torchrun_case, bundle, device, sizes, threads)],
        "training": lambda: training_cases(bundle, device, sizes),
        "attention": lambda: attention_cases(bundle, device, sizes),
        "parity": lambda: parity_cases(bundle, device, sizes),
        "volume": lambda: volume_cases(bundle, device, sizes),
        "throughput": lambda: [throughput_case(device, sizes)] if bundle == "vct_adc7t" else [],
    }
    result: dict[str, Any] = {**case}
    for section, runner in runners.items():
        start = time.perf_counter()
        try:
            result[section] = runner()
        except Exception as error:  # a section that cannot start (e.g. its network does not build) fails as a row
            result[section] = [{"bundle": bundle, **_error(error)}]
        result.setdefault("seconds", {})[section] = round(time.perf_counter() - start, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _run_bundle(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = run_case_in_subprocess(MODULE, case, timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        result = {**case, "error": f"timed out after {timeout_s:.0f} s"}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    failed = failures({"bundles": [result]})
    print(f"== {case['bundle']}: {len(failed)} failed case(s) in {result['wall_s']} s", flush=True)
    for line in failed:
        print(f"   {line}", flush=True)
    return result


def failures(result: dict[str, Any]) -> list[str]:
    """One line per failed case (or bundle process) of a report."""
    lines = []
    for bundle in result["bundles"]:
        if "error" in bundle:
            lines.append(f"{bundle['bundle']}: {bundle['error']}")
        for section in SECTIONS:
            for row in bundle.get(section, []):
                if not row.get("passed", False):
                    what = [row.get(key) for key in ("backend", "precision", "compile") if row.get(key) is not None]
                    label = " ".join([bundle["bundle"], section, *(str(w) for w in what)])
                    lines.append(f"{label}: {row.get('error', 'failed')}")
    return lines


def _figure(value: Any, digits: str = ".3f") -> str:
    return "" if value is None else format(value, digits)


def _samples(row: dict[str, Any]) -> str:
    return f"{row['batch_size']} × {'×'.join(map(str, row['sample_shape']))}" if "batch_size" in row else ""


def _timing(row: dict[str, Any]) -> str:
    t = row.get("timing")
    return f"{t['median_s']:.3f} ({t['min_s']:.3f}–{t['max_s']:.3f}), n={t['runs']}" if t else ""


def _whole_volume(row: dict[str, Any]) -> str:
    if "whole_volume_s" not in row:
        return ""
    return f"{'≈' if row['whole_volume_estimated'] else ''}{row['whole_volume_s']:.1f}"


#: Each section's Markdown table: its title and its columns (header, cell of a row); a result column follows.
TABLES: dict[str, tuple[str, list[tuple[str, Callable[[dict[str, Any]], Any]]]]] = {
    "training": (
        "Training steps (AMP, torch.compile)",
        [
            ("bundle", lambda r: r["bundle"]),
            ("precision", lambda r: r.get("precision")),
            ("compile", lambda r: r.get("compile") or "off"),
            ("batch × sample", _samples),
            ("first step s", lambda r: _figure(r.get("first_step_s"))),
            ("compile s", lambda r: _figure(r.get("compile_s"), ".1f")),
            ("step s (median)", lambda r: _figure(r.get("step_s"))),
            ("samples/s", lambda r: _figure(r.get("samples_per_s"), ".1f")),
            ("losses", lambda r: ", ".join(map(str, r.get("losses", [])))),
            ("loss scale", lambda r: r.get("loss_scale")),
            ("CUDA peak MiB", lambda r: _figure(r.get("cuda_peak_mib"), ".0f")),
        ],
    ),
    "attention": (
        "Flash attention against plain attention (shipped weights)",
        [
            ("bundle", lambda r: r["bundle"]),
            ("precision", lambda r: r.get("precision")),
            ("flash kernel forced", lambda r: r.get("flash_kernel_forced")),
            ("max abs difference", lambda r: _figure(r.get("max_abs_difference"), ".2e")),
            ("tolerance", lambda r: r.get("tolerance")),
        ],
    ),
    "parity": (
        "Parity with the CPU float32 output (shipped weights)",
        [
            ("bundle", lambda r: r["bundle"]),
            ("backend", lambda r: r.get("backend")),
            ("device", lambda r: r.get("device")),
            ("precision", lambda r: r.get("precision")),
            ("output dtype", lambda r: r.get("output_dtype")),
            ("ONNX Runtime providers", lambda r: ", ".join(r.get("providers") or [])),
            ("max abs difference", lambda r: _figure(r.get("max_abs_difference"), ".2e")),
            ("tolerance", lambda r: r.get("tolerance")),
        ],
    ),
    "torchrun": (
        "torchrun --nproc_per_node=1: one tiny epoch of train.yaml + multi_gpu_train.yaml",
        [
            ("bundle", lambda r: r["bundle"]),
            ("backend", lambda r: r.get("backend")),
            ("overrides", lambda r: f"`{json.dumps(r['overrides'])}`" if "overrides" in r else ""),
            ("seconds", lambda r: r.get("seconds")),
            ("checkpoint written", lambda r: r.get("checkpoint")),
        ],
    ),
    "volume": (
        "Whole-volume inference (benchmarks.inference; ≈: estimated from a block of slices)",
        [
            ("bundle", lambda r: r["bundle"]),
            ("backend", lambda r: "+".join([r["backend"], *(["amp"] if r.get("amp") else [])])),
            ("device", lambda r: r.get("device")),
            ("input", lambda r: "×".join(map(str, r.get("input_shape", [])))),
            ("median s (min–max)", _timing),
            ("whole volume s", _whole_volume),
            ("slices/s", lambda r: _figure(r.get("slices_per_s"), ".1f")),
            ("CUDA peak MiB", lambda r: _figure(r.get("cuda_peak_mib"), ".0f")),
        ],
    ),
    "throughput": (
        "VCT paper-scale training throughput (train.yaml + paper.yaml)",
        [
            ("precision", lambda r: r.get("precision")),
            ("compile", lambda r: r.get("compile") or "off"),
            ("params", lambda r: f"{r['parameters']:,}" if "parameters" in r else ""),
            ("batch × slice", _samples),
            ("step s (median)", lambda r: _figure(r.get("step_s"))),
            ("slices/s", lambda r: _figure(r.get("samples_per_s"), ".1f")),
            ("paper: RTX 4090 + AMP, 80 × 2×176×208", lambda r: f"{r['paper_slices_per_s']} slices/s"),
        ],
    ),
}


def _result_cell(row: dict[str, Any]) -> str:
    if not row.get("passed"):
        return f"**FAIL**: {row.get('error', 'failed')}".replace("|", "/")
    return "pass" if row.get("judged", True) else "reported (CPU half precision: not judged)"


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report: the machine and the kind of run, the failures, then one table per section."""
    m, cuda, failed = result["machine"], result["cuda"], result["failures"]
    gpu = "none"
    if cuda:
        gpu = (
            f"{cuda['gpu']} × {cuda['gpu_count']} (compute {cuda['capability']}, {cuda['memory_gib']} GiB), "
            f"CUDA {cuda['cuda']}, cuDNN {cuda['cudnn']}, NCCL {cuda['nccl']}"
        )
    kind = "GPU run" if result["mode"] == "gpu" else "CPU smoke: toy sizes on the CPU, not GPU results"
    if not result["complete"]:
        kind += f" (incomplete: {len(result['bundles'])} bundle(s) done so far)"
    per_bundle = ", ".join(f"{b['bundle']} {b.get('wall_s')}" for b in result["bundles"])
    lines = [
        f"# synth7t GPU check ({result['date']}): {kind}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB; GPU: {gpu}. Python {m['python']}, "
        f"torch {m['torch']}, MONAI {m['monai']}, ONNX Runtime {m['onnxruntime']} "
        f"({', '.join(m['onnxruntime_providers'])}).",
        f"Command: `{result['command']}`; {result['seconds']} s in all; per bundle (s): {per_bundle}.",
        "",
        f"**Result: {f'{len(failed)} case(s) failed' if failed else 'every case passed'}.**",
        *[f"- {line}" for line in failed],
    ]
    for section, (title, columns) in TABLES.items():
        rows = [row for bundle in result["bundles"] for row in bundle.get(section, [])]
        header = [name for name, _ in columns] + ["result"]
        cells = [[cell(row) for _, cell in columns] + [_result_cell(row)] for row in rows]
        lines += ["", f"## {title}", "", markdown_table(header, cells)]
    return "\n".join(lines)


def _write(result: dict[str, Any], output: Path) -> None:
    """Writes ``gpu.json`` and ``gpu.md`` of ``result`` as it stands (after each bundle, so a run stopped midway
    keeps the bundles it finished)."""
    result["failures"] = failures(result)
    result["passed"] = result["complete"] and not result["failures"]
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (output / "gpu.md").write_text(markdown(result) + "\n")


def main(
    output_dir: str | None = None, smoke: bool | None = None, jobs: int | None = None, bundles: Sequence[str] = BUNDLES
) -> None:
    """Runs each bundle's check and writes ``<output_dir>/gpu.json`` and ``gpu.md``, then one line naming them; exits
    with status 1 when a case failed.

    Args:
        output_dir: where the report goes, relative to the repository; default ``benchmarks/results`` for the GPU run
            and a new temporary folder for the CPU smoke.
        smoke: the CPU smoke (default where torch finds no CUDA GPU); ``--smoke False`` without one stops at once.
        jobs: bundles checked at the same time; default 1 on the GPU (timings are not shared), all for the smoke.
        bundles: the bundles to check, e.g. ``--bundles "['vct_adc7t']"`` to rerun one.
    """
    bundles = (bundles,) if isinstance(bundles, str) else tuple(bundles)
    unknown = sorted(set(bundles) - set(BUNDLES))
    if unknown:
        raise SystemExit(f"error: --bundles: unknown {unknown}; choose from {list(BUNDLES)}.")
    cuda = torch.cuda.is_available()
    smoke = not cuda if smoke is None else smoke
    if not smoke and not cuda:
        raise SystemExit(
            f"error: the GPU check needs a CUDA GPU and torch {torch.__version__} finds none here; run it without "
            "--smoke False for the CPU smoke."
        )
    if output_dir is None:
        output = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_")) if smoke else REPOSITORY / "benchmarks" / "results"
    else:
        output = (REPOSITORY / output_dir).resolve()
    jobs = jobs or (len(bundles) if smoke else 1)
    device = "cpu" if smoke else "cuda"
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if smoke else None
    timeout_s = _sizes(smoke)["bundle_timeout_s"]
    options = ["--smoke"] if smoke else []
    options += [f"--jobs {jobs}", *([f"--output_dir {output_dir}"] if output_dir else [])]
    options += [f'--bundles "{list(bundles)}"'] if bundles != BUNDLES else []
    start = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks.gpu_check", *options]),
        "mode": "cpu-smoke" if smoke else "gpu",
        "device": device,
        "machine": machine(),
        "cuda": cuda_description(),
        "jobs": jobs,
        "complete": False,
        "seconds": 0.0,
        "bundles": [],
    }
    cases = [{"bundle": b, "device": device, "smoke": smoke, "threads": threads} for b in bundles]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for finished in pool.map(lambda case: _run_bundle(case, timeout_s), cases):
            result["bundles"].append(finished)
            result["seconds"] = round(time.perf_counter() - start, 1)
            result["complete"] = len(result["bundles"]) == len(cases)
            _write(result, output)
    summary = "passed" if result["passed"] else f"{len(result['failures'])} case(s) failed"
    print(f"gpu check ({result['mode']}, {result['seconds']} s): {summary}; wrote {output / 'gpu.json'} and "
          f"{output / 'gpu.md'}")  # fmt: skip
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # one bundle's case, from run_case_in_subprocess
        report_case(measure_bundle)
    else:
        fire.Fire(main)
