"""What a training checkpoint needs beyond weights, optimizer, scheduler and epoch to resume exactly (BUNDLES.md
``resume_from``): the random number generators and the validation's best-model record.

MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` save and restore any object with ``state_dict`` and
``load_state_dict``; MONAI has no such object for random states (``set_determinism`` only seeds them at the start,
so a resumed run would draw other patches and degradations than an uninterrupted one) nor for the best metric of a
validation (a resumed run would otherwise forget the best model and replace it by its first, possibly worse, one):
hence these two classes. Their state dicts hold tensors and plain Python values only, as ``CheckpointLoader``
reads checkpoints with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import CheckpointSaver
from monai.transforms import Randomizable

__all__ = ["RandomStates", "ValidationState", "randomizable_parts"]


def randomizable_parts(*objects: Any) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``objects`` through attributes, lists, tuples and dicts (a Compose,
    a dataset's transform, a transform wrapping others), each once, in a stable order (as ``monai.data.set_rnd``
    walks them)."""
    found: dict[int, Randomizable] = {}
    seen: set[int] = set()

    def walk(value: Any) -> None:
        if id(value) in seen or isinstance(value, (str, bytes, int, float, torch.Tensor, np.ndarray)):
            return
        seen.add(id(value))
        if isinstance(value, Randomizable):
            found.setdefault(id(value), value)
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple)):
            children = list(value)
        else:
            children = list(vars(value).values()) if hasattr(value, "__dict__") else []
        for child in children:
            walk(child)

    for obj in objects:
        walk(obj)
    return list(found.values())


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = state
    return {"name": name, "keys": torch.as_tensor(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}  # fmt: skip


def _numpy_state_from_dict(state: dict[str, Any]) -> tuple:
    keys = np.asarray(state["keys"].numpy(), dtype=np.uint32)
    return state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]


class RandomStates:
    """The states of every random number generator a training run draws from: Python's ``random``, NumPy's global
    generator, torch's CPU (and CUDA) generators, and the ``R`` of each MONAI randomizable transform reachable from
    ``transforms`` (those running in the main process; DataLoader workers are reseeded every epoch from torch's
    generator, which is restored). Put it in a checkpoint's ``save_dict`` / ``load_dict``.

    Args:
        transforms: the objects holding the training transforms (e.g. the training ``Compose``).
    """

    def __init__(self, *transforms: Any) -> None:
        self.transforms = randomizable_parts(*transforms)

    def state_dict(self) -> dict[str, Any]:
        python_version, python_state, python_gauss = random.getstate()
        return {
            "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "transforms": [_numpy_state_to_dict(transform.R.get_state()) for transform in self.transforms],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        if len(self.transforms) != len(state["transforms"]):
            raise ValueError(
                f"the checkpoint holds the random states of {len(state['transforms'])} random transforms, this run "
                f"has {len(self.transforms)}: resume with the configuration the checkpoint was trained with."
            )
        # one state per transform: transforms that share a generator (a transform drawing for its parts) were saved
        # with equal states, and set them alike
        for transform, saved in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_state_from_dict(saved))


class ValidationState:
    """The validation's best metric and epoch (``evaluator.state.best_metric``, ``best_metric_epoch``) and the record
    of the best-model ``CheckpointSaver`` (which file holds which score), saved with a training checkpoint.

    Args:
        evaluator: the validation evaluator.
        best_model_saver: its ``CheckpointSaver`` with ``save_key_metric=True``, or None.
    """

    def __init__(self, evaluator: Any, best_model_saver: CheckpointSaver | None = None) -> None:
        self.evaluator = evaluator
        self.best_model_saver = best_model_saver

    def state_dict(self) -> dict[str, Any]:
        state = {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "saved": [],
        }
        checkpoint = getattr(self.best_model_saver, "_key_metric_checkpoint", None)
        if checkpoint is not None:  # ignite's record: [(score, file name)], under its own key
            state["saved"] = [[float(score), str(name)] for score, name in checkpoint.state_dict()["_saved"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self.best_model_saver is None or not state["saved"]:
            return
        # A run resumed into another output folder has no best model there yet: ignite would delete the file it
        # recorded before writing a better one, so only records whose file is in this saver's folder are restored.
        folder = Path(self.best_model_saver.save_dir)
        saved = [tuple(item) for item in state["saved"] if (folder / item[1]).is_file()]
        if saved:
            self.best_model_saver.load_state_dict({"_saved": saved})
