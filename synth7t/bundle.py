"""The layer the bundle configs call: locating the bundle, and stopping cleanly on bad input."""

from __future__ import annotations

import ast
import functools
import inspect
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from monai.bundle import ConfigWorkflow

from synth7t import data, losses, networks, outputs, transforms
from synth7t.errors import InputError

__all__ = [
    "BadInput",
    "bundle_root",
    "check_absent",
    "check_device",
    "check_output_dir",
    "check_training_outputs",
    "encode_subject_context",
    "freeze_except",
    "load_datalist",
    "load_vit_checkpoint",
    "load_warm_start",
    "prediction_paths",
    "radimagenet_perceptual_loss",
    "require_file",
    "require_training_checkpoint",
    "stop_on_bad_input",
    "worker_start_method",
]

T = TypeVar("T")


class BadInput(SystemExit):
    """Stops a bundle workflow on bad input with one message and exit status 1.

    MONAI's config expressions wrap every ``Exception`` in ``RuntimeError("Failed to evaluate ...")``, which would
    bury the message naming the file and the problem (BUNDLES.md "Bad input") in a chained traceback. A
    ``SystemExit`` passes through those handlers; Python prints its message alone. Library code raises
    :class:`synth7t.errors.InputError`; this class is only raised at the config boundary.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(f"error: {error}")
        self.error = error


def bundle_root(default: str | os.PathLike = ".") -> str:
    """Absolute path of the bundle whose config is being run, wherever the command is run from.

    BUNDLES.md requires every workflow to work from the repository root and from any other working directory.
    ``python -m monai.bundle run`` (and ``monai.bundle.ConfigWorkflow``) know the config folder
    (``config_root_path``) but do not put it in the config, whose ``bundle_root`` is a plain id. Called from a
    ``bundle_root: "$synth7t.bundle.bundle_root()"`` expression, this looks up the ``ConfigWorkflow`` that is
    evaluating it and returns the parent of its ``configs`` folder, as MONAI itself does when it adds the bundle
    to ``sys.path`` in ``ConfigWorkflow.run``. ``monai.bundle`` commands that parse configs without a workflow
    (``ckpt_export``, ``onnx_export``, ...) get the folder of the first ``--config_file`` of the command line.
    Otherwise it returns ``default`` made absolute. An explicit ``--bundle_root`` override always wins because the
    expression is then not evaluated.
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return _root_of_config_folder(Path(candidate.config_root_path))
        frame = frame.f_back
    config_files = _command_line_config_files()
    if config_files:
        return _root_of_config_folder(Path(config_files[0]).parent)
    return str(Path(default).resolve())


def _root_of_config_folder(config_root: Path) -> str:
    return str((config_root.parent if config_root.name == "configs" else config_root).resolve())


def _command_line_config_files() -> list[str]:
    """The ``--config_file`` value(s) of a ``python -m monai.bundle`` command line, if any."""
    arguments = sys.argv[1:]
    for index, argument in enumerate(arguments):
        if argument.startswith("--config_file"):
            value = argument.partition("=")[2] or (arguments[index + 1] if index + 1 < len(arguments) else "")
            parsed = ast.literal_eval(value) if value.startswith("[") else value
            return [str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
    return []


def stop_on_bad_input(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` for configs: its :class:`synth7t.errors.InputError` stops the workflow as :class:`BadInput`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except InputError as error:
            raise BadInput(error) from None

    return wrapper


load_datalist = stop_on_bad_input(data.load_datalist)
encode_subject_context = stop_on_bad_input(transforms.encode_subject_context)
radimagenet_perceptual_loss = stop_on_bad_input(losses.radimagenet_perceptual_loss)
load_vit_checkpoint = stop_on_bad_input(networks.load_vit_checkpoint)
prediction_paths = stop_on_bad_input(outputs.prediction_paths)
check_absent = stop_on_bad_input(outputs.check_absent)
check_output_dir = stop_on_bad_input(outputs.check_output_dir)
check_training_outputs = stop_on_bad_input(outputs.check_training_outputs)


def require_file(path: str | os.PathLike, what: str) -> str:
    """Return ``path`` if it is a file, else stop with :class:`BadInput` naming it (e.g. a missing checkpoint)."""
    if not Path(path).is_file():
        raise BadInput(InputError(f"{path}: {what} not found."))
    return str(path)


def load_warm_start(
    network: torch.nn.Module, path: str | os.PathLike, device: str | torch.device, new_modules: Sequence[str] = ()
) -> bool:
    """Load the weights of a ``model.pt`` into ``network`` to fine-tune it. The submodules named in
    ``new_modules`` (e.g. ``refiner``, which starts as the identity) may be absent from the file and keep their
    initialisation; any other missing or unexpected weight stops with :class:`BadInput` naming the file."""
    state = torch.load(require_file(path, "checkpoint to start from"), map_location=device, weights_only=True)
    problem = "its weights do not fit this network; check the network options"
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError:  # weights of other shapes
        raise BadInput(InputError(f"{path}: {problem} (weights of other shapes).")) from None
    missing = [key for key in missing if key.split(".")[0] not in new_modules]
    if missing or unexpected:
        raise BadInput(InputError(f"{path}: {problem} ({', '.join((missing + unexpected)[:3])}, ...)."))
    return True


def freeze_except(network: torch.nn.Module, module: str | None) -> Iterator[torch.nn.Parameter]:
    """The parameters to train: all of ``network``'s when ``module`` is ``None``; else only those of its submodule
    ``module`` (e.g. ``refiner``), the others frozen (``requires_grad`` off, so no gradient is computed for them).
    A name that is not a submodule of ``network`` stops with :class:`BadInput`."""
    if module is None:
        return network.parameters()
    trained = getattr(network, module, None)
    if not isinstance(trained, torch.nn.Module):
        raise BadInput(InputError(f"trainable: the network has no submodule {module!r} to train alone."))
    network.requires_grad_(False)
    trained.requires_grad_(True)
    return trained.parameters()


TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "trainer")


def require_training_checkpoint(path: str | os.PathLike | None) -> str | None:
    """``path`` if it is a checkpoint a training run wrote (it holds the network, the optimizer and the trainer's
    epoch), else stop with :class:`BadInput` naming it; ``None`` (no resume) passes. Read once here, on the CPU, so
    a wrong file (a ``model.pt``, which holds weights only) is refused before any data is loaded."""
    if path is None:
        return None
    require_file(path, "checkpoint to resume from")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files that are not checkpoints
        raise BadInput(InputError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}).")) from None
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if not isinstance(content, dict) or key not in content]
    if missing:
        raise BadInput(
            InputError(
                f"{path}: not a training checkpoint (it lacks {', '.join(missing)}); resume from a checkpoint_*.pt "
                "that a training run wrote, not from the weights of a model.pt."
            )
        )
    return str(path)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or stop with :class:`BadInput` when it is not on this machine (CUDA asked
    for without a CUDA GPU or with a CPU-only torch, or a GPU index beyond the count)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BadInput(InputError(f"device {device!r} is not a torch device name ({error}).")) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(
                InputError(
                    f"device {device} is not available here: torch finds no CUDA GPU (torch {torch.__version__}); "
                    "pass --device cpu."
                )
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(
                InputError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
            )
    elif device.type not in ("cpu", "mps") or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise BadInput(InputError(f"device {device} is not available here; pass --device cpu or --device cuda."))
    return device


def worker_start_method(num_workers: int) -> str | None:
    """The ``multiprocessing_context`` of a bundle's DataLoaders: ``"fork"`` where the platform has it and it is
    safe (not macOS), else ``None`` (the platform's default, ``spawn`` on macOS and Windows); always ``None`` without
    workers, where torch refuses a context.

    ``Invertd`` (MONAI) inverts the transforms that DataLoader workers applied only if it finds their recorded
    ``id`` on its own transform objects, which forked workers keep, or if the start method is ``spawn``. Python 3.14
    made ``forkserver`` the Linux default, under which neither holds and every bundle's inference and evaluation
    with workers would stop. MONAI has no option for it, so the loaders ask for fork, the Linux default before 3.14.
    """
    if num_workers == 0 or sys.platform == "darwin" or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return "fork"
