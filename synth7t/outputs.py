"""What the workflows write: checked before any compute, never half-written, never through a symlink (BUNDLES.md
"Outputs" and "Bad input").

- :func:`prediction_paths` names every inference output before any compute and refuses an output folder that is a
  file, two inputs that would write one output, and outputs that already exist (unless ``overwrite``).
- :func:`check_absent` does the same for the fixed files of evaluation (metrics) and training (checkpoints).
- :class:`AtomicNibabelWriter` is MONAI's ``NibabelWriter`` writing a temporary file beside the target and renaming
  it into place, so a killed run leaves the previous file or none under the final name, and a symlink at that name
  is replaced, not followed. MONAI's writers save in place, hence this class. The hidden temporary file a killed
  run leaves behind is removed by the next run that may write the same output (:func:`check_absent`).
"""

from __future__ import annotations

import glob
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monai.data import NibabelWriter
from monai.config import PathLike

from synth7t.errors import InputError

__all__ = [
    "AtomicNibabelWriter",
    "check_absent",
    "check_output_dir",
    "check_training_outputs",
    "prediction_paths",
    "remove_stale_temporaries",
    "temporary_path",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _temporary_prefix(path: Path) -> str:
    """What every temporary file of ``path`` is named with first, before the writer's pid."""
    return f".{path.name}."


def temporary_path(path: Path) -> Path:
    """A unique hidden name beside ``path`` that keeps its extension (writers choose the format by it):
    ``.<name>.<pid>.<random>.tmp<extension>``."""
    suffix = next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), path.suffix)
    return path.with_name(f"{_temporary_prefix(path)}{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` (:func:`temporary_path`) whose writing process no longer runs (it was
    killed while writing); those of running processes are left alone. Returns the removed files."""
    prefix = _temporary_prefix(path)
    removed = []
    for temporary in path.parent.glob(f"{glob.escape(prefix)}*.tmp*") if path.parent.is_dir() else []:
        pid = temporary.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _is_running(int(pid)):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


class AtomicNibabelWriter(NibabelWriter):
    """``monai.data.NibabelWriter`` that writes ``<folder>/.<name>.<pid>.<random>.tmp.nii.gz`` and renames it to the
    target name (``os.replace``: atomic on one file system, replaces a symlink at the target instead of writing
    through it). The temporary file is removed if writing fails. Use it as ``SaveImaged(writer=...)``."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        target = Path(filename)
        temporary = temporary_path(target)
        try:
            super().write(temporary, verbose=verbose, **obj_kwargs)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


def check_output_dir(output_dir: PathLike) -> Path:
    """``output_dir`` as a path, refused when it exists and is not a folder (it is created when written to)."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: the output folder is a file; name a folder (it is created if missing).")
    return folder


def check_absent(paths: Iterable[PathLike], overwrite: bool = False) -> list[Path]:
    """``paths``, refused when any of them exists (a symlink counts, even broken) unless ``overwrite``; once they pass,
    the temporary files that killed runs left for them are removed (:func:`remove_stale_temporaries`)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_output_dir(path.parent)
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise InputError(
            f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; nothing was written. Pass "
            "--overwrite True to replace earlier results, or choose another --output_dir."
        )
    for path in paths:
        remove_stale_temporaries(path)
    return paths


def _stem(path: str) -> str:
    name = Path(path).name
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), Path(name).stem)


def prediction_paths(
    items: Sequence[dict],
    key: str,
    output_dir: PathLike,
    postfix: str = "7t",
    extension: str = ".nii.gz",
    overwrite: bool = False,
) -> list[Path]:
    """The file each item's prediction goes to, ``<output_dir>/<input name>_<postfix><extension>`` as MONAI's
    ``SaveImaged(separate_folder=False)`` names it, checked before any compute: the output folder is not a file, no
    two inputs (``item[key]``) give one output name, and no output exists unless ``overwrite`` (:func:`check_absent`,
    which also removes the temporary files that killed runs left for them)."""
    folder = check_output_dir(output_dir)
    paths: dict[Path, str] = {}
    for item in items:
        path = folder / f"{_stem(str(item[key]))}_{postfix}{extension}"
        if path in paths:
            raise InputError(
                f"{paths[path]} and {item[key]} would both be written to {path}; rename one of the inputs or run "
                "them into different output folders."
            )
        paths[path] = str(item[key])
    return check_absent(paths, overwrite)


TRAINING_FILES = ("model.pt", "checkpoint_*.pt")


def check_training_outputs(output_dir: PathLike, resume_from: PathLike | None = None, overwrite: bool = False) -> Path:
    """The training output folder, refused when it is a file, or when it already holds a training run's files
    (``model.pt``, ``checkpoint_*.pt``) and the run neither resumes (``resume_from``) nor may ``overwrite`` them."""
    folder = check_output_dir(output_dir)
    earlier = sorted(str(p) for pattern in TRAINING_FILES for p in folder.glob(pattern)) if folder.is_dir() else []
    if earlier and resume_from is None and not overwrite:
        raise InputError(
            f"{folder}: already holds a training run ({', '.join(Path(p).name for p in earlier)}); nothing was "
            "written. Pass --resume_from <its checkpoint_epoch=N.pt> to continue it, --overwrite True to start "
            "over in it, or another --output_dir."
        )
    return folder
