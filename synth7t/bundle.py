"""The layer the bundle configs call: locating the bundle, and stopping cleanly on bad input."""

from __future__ import annotations

import ast
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from monai.bundle import ConfigWorkflow

from synth7t import data, losses, networks, transforms
from synth7t.errors import InputError

__all__ = [
    "BadInput",
    "bundle_root",
    "encode_subject_context",
    "load_datalist",
    "load_vit_checkpoint",
    "radimagenet_perceptual_loss",
    "require_file",
    "stop_on_bad_input",
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


def require_file(path: str | os.PathLike, what: str) -> str:
    """Return ``path`` if it is a file, else stop with :class:`BadInput` naming it (e.g. a missing checkpoint)."""
    if not Path(path).is_file():
        raise BadInput(InputError(f"{path}: {what} not found."))
    return str(path)
