"""Simulated 3T/7T training pairs from 7T volumes, with a subject-level datalist.

Only 7T volumes are shared with the project (``../shared/data/tell7t``), as with the seed-001 study, so the 3T
inputs are simulated: either the seed's recipe (spec watnet.md §1.3: Gaussian noise of variance 0.003, then
histogram matching of both images to a reference 7T) or the realistic recipe of
:class:`synth7t.transforms.SimulateRealistic3T` (contrast change, bias field, resolution loss, Rician noise).
``scripts/prepare_data.py`` is the command-line front end.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from synth7t.data import InputError
from synth7t.transforms import PercentileScaleIntensity, SimulateRealistic3T, seed001_recipe
from synth7t.transforms.degradation import SEED001_REFERENCE_SUBJECT

__all__ = [
    "RECIPES",
    "input_and_output_folders",
    "merge_datalists",
    "prepare_pairs",
    "read_volumes",
    "simulate_pair",
    "split_subjects",
    "subject_id",
    "subject_seed",
]

RECIPES = ("realistic", "seed001")
SUFFIXES = (".nii.gz", ".nii")


def subject_id(path: Path) -> str:
    """``sub-TELL0101_T1w_brain_homog_mni.nii.gz`` -> ``sub-TELL0101``: the file name up to its first underscore."""
    name = path.name
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name.split("_")[0]


def _as_subject_list(subjects: str | Sequence[str] | None) -> list[str] | None:
    """Subjects given as a list, one name, or comma-separated names (as a command line passes them)."""
    if isinstance(subjects, str):
        return [name.strip() for name in subjects.strip("[]").split(",") if name.strip()]
    return None if subjects is None else list(subjects)


def split_subjects(
    subjects: Sequence[str],
    validation: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    n_validation: int = 1,
    n_test: int = 2,
) -> dict[str, list[str]]:
    """Subject-level split. Explicit ``validation``/``test`` lists (or comma-separated names) win; otherwise, in sorted order, the last
    ``n_test`` subjects are the test set and the ``n_validation`` before them the validation set. Every other
    subject trains. No subject is in two sets."""
    ordered = sorted(subjects)
    validation, test = _as_subject_list(validation), _as_subject_list(test)
    if validation is None and test is None:
        if n_validation + n_test >= len(ordered):
            raise InputError(
                f"{len(ordered)} subjects cannot give {n_validation} validation and {n_test} test subjects."
            )
        test = ordered[len(ordered) - n_test :]
        validation = ordered[len(ordered) - n_test - n_validation : len(ordered) - n_test]
    validation, test = list(validation or []), list(test or [])
    unknown = sorted(set(validation + test) - set(ordered))
    if unknown:
        raise InputError(f"subjects {unknown} of the split are not among the inputs {ordered}.")
    if set(validation) & set(test):
        raise InputError(f"subjects {sorted(set(validation) & set(test))} are in both validation and test.")
    training = [s for s in ordered if s not in validation and s not in test]
    if not training:
        raise InputError("the split leaves no training subject.")
    return {"training": training, "validation": sorted(validation), "test": sorted(test)}


def subject_seed(seed: int, subject: str) -> int:
    """A per-subject seed, so each subject's simulation does not depend on which other subjects are prepared."""
    return (zlib.crc32(subject.encode()) ^ seed) % (2**32)


def simulate_pair(
    volume: np.ndarray,
    recipe: str = "realistic",
    seed: int = 0,
    reference: np.ndarray | None = None,
    percentiles: tuple[float, float] = (0.0, 99.0),
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """(simulated 3T, 7T target), float32 arrays in [0, 1] units, from one raw 7T volume ``(X, Y, Z)``.

    ``"realistic"``: the 7T is percentile-scaled inside its non-zero voxels (``percentiles``) and degraded by
    :class:`synth7t.transforms.SimulateRealistic3T` (``options`` are its arguments). ``"seed001"``: spec watnet.md
    §1.3 via :func:`synth7t.transforms.seed001_recipe` (``options``: ``noise_variance``, ``quantize_8bit``), both
    images matched to ``reference``. ``seed`` makes the result reproducible.
    """
    raw = torch.as_tensor(volume, dtype=torch.float32)[None]
    if recipe == "seed001":
        if reference is None:
            raise InputError("the seed001 recipe needs the reference 7T volume it histogram-matches to.")
        compose = seed001_recipe(reference[None], **options)
        compose.set_random_state(seed)
        out = compose({"label": raw})
        return np.asarray(out["image"][0], np.float32), np.asarray(out["label"][0], np.float32)
    mask = raw != 0
    target = PercentileScaleIntensity(*percentiles)(raw, mask)
    simulator = SimulateRealistic3T(**options)
    simulator.set_random_state(seed)
    return np.asarray(simulator(target, mask)[0], np.float32), np.asarray(target[0], np.float32)


def input_and_output_folders(input_dir: str | Path, output_dir: str | Path, overwrite: bool) -> tuple[list[Path], Path]:
    """The NIfTI volumes of ``input_dir`` and the output folder, checked before anything is written: the inputs
    exist, and the output holds no prepared datalist unless ``overwrite``."""
    if not Path(input_dir).is_dir():
        raise InputError(f"{input_dir}: input folder not found.")
    inputs = sorted(p for p in Path(input_dir).iterdir() if p.name.endswith(SUFFIXES))
    if not inputs:
        raise InputError(f"{input_dir}: no NIfTI volume (*.nii, *.nii.gz) found.")
    output = Path(output_dir)
    if (output / "datalist.json").exists() and not overwrite:
        raise InputError(
            f"{output / 'datalist.json'}: already exists; pass overwrite=True to replace the prepared data."
        )
    return inputs, output


def read_volumes(inputs: Sequence[Path]) -> tuple[dict[str, nib.Nifti1Image], dict[str, np.ndarray]]:
    """Load every input (one subject each) and check it is one finite, non-blank 3-D volume."""
    images, volumes = {}, {}
    for path in inputs:
        subject = subject_id(path)
        if subject in images:
            raise InputError(f"{path}: subject {subject} has a second volume ({images[subject].get_filename()}).")
        try:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
        except Exception as error:  # nibabel raises several types for unreadable files
            raise InputError(f"{path}: not a readable NIfTI image: {error}") from error
        if data.ndim != 3 or not np.isfinite(data).all() or not data.any():
            raise InputError(f"{path}: expected one finite, non-blank 3-D volume, got shape {data.shape}.")
        images[subject], volumes[subject] = image, data
    return images, volumes


def prepare_pairs(
    input_dir: str | Path,
    output_dir: str | Path,
    recipe: str = "realistic",
    seed: int = 0,
    validation: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    n_validation: int = 1,
    n_test: int = 2,
    reference_subject: str = SEED001_REFERENCE_SUBJECT,
    lower_percentile: float = 0.0,
    upper_percentile: float = 99.0,
    leave_one_out: bool = False,
    overwrite: bool = False,
    **recipe_options: Any,
) -> Path:
    """Write ``<subject>_3T.nii.gz``, ``<subject>_7T.nii.gz`` and ``<subject>_mask.nii.gz`` for every 7T volume of
    ``input_dir`` into ``output_dir``, plus ``datalist.json`` (keys ``image``, ``label``, ``mask``; lists
    ``training``, ``validation``, ``test``) and ``preparation.json`` (recipe, options, seed, split). Returns the
    datalist path.

    Args:
        input_dir: folder of 7T NIfTI volumes (one per subject, skull-stripped, background 0).
        output_dir: folder to create; it must not hold a datalist already unless ``overwrite``.
        recipe: ``"realistic"`` (:class:`SimulateRealistic3T` on the 7T target percentile-scaled to [0, 1]) or
            ``"seed001"`` (spec watnet.md §1.3; both images are histogram-matched to ``reference_subject``;
            options ``noise_variance``, ``quantize_8bit``).
        seed: base seed; each subject's simulation uses a seed derived from it and the subject id.
        validation, test, n_validation, n_test: the subject-level split, see :func:`split_subjects`.
        reference_subject: the seed recipe's histogram reference (the seed used sub-TELL0106).
        lower_percentile, upper_percentile: brain percentiles the realistic recipe scales the 7T target with
            (:class:`synth7t.transforms.PercentileScaleIntensity`; the bundles' default 0 and 99).
        leave_one_out: also write ``datalist_fold<k>.json`` per subject ``k`` (the seed's protocol, spec watnet.md
            §1.4): every other subject trains, subject ``k`` is the validation and the test set.
        overwrite: replace an existing prepared folder.
        recipe_options: keyword arguments of the recipe (e.g. ``snr=15``, ``target_voxel_size_mm=1.6``).

    The brain mask is the 7T's non-zero voxels. Every input is checked before anything is written.
    """
    if recipe not in RECIPES:
        raise InputError(f"recipe must be one of {RECIPES}, got {recipe!r}.")
    inputs, output = input_and_output_folders(input_dir, output_dir, overwrite)
    datalist_path = output / "datalist.json"
    images, volumes = read_volumes(inputs)
    split = split_subjects(list(images), validation, test, n_validation, n_test)
    reference = None
    if recipe == "seed001":
        if reference_subject not in volumes:
            raise InputError(f"reference subject {reference_subject} is not in {input_dir}.")
        reference = volumes[reference_subject].astype(np.float32)

    percentiles = (lower_percentile, upper_percentile)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("datalist_fold*.json"):
        stale.unlink()
    entries = {}
    for subject, image in images.items():
        options = dict(recipe_options)
        if recipe == "realistic":
            options.setdefault("voxel_size", tuple(float(z) for z in image.header.get_zooms()[:3]))
        simulated, target = simulate_pair(
            volumes[subject], recipe, subject_seed(seed, subject), reference, percentiles, **options
        )
        files = {"image": f"{subject}_3T.nii.gz", "label": f"{subject}_7T.nii.gz", "mask": f"{subject}_mask.nii.gz"}
        arrays = {"image": simulated, "label": target, "mask": (volumes[subject] != 0).astype(np.uint8)}
        for key, name in files.items():
            header = image.header.copy()
            header.set_data_dtype(arrays[key].dtype)
            nib.save(nib.Nifti1Image(arrays[key], image.affine, header), output / name)
        entries[subject] = {**files, "subject": subject}
    datalist = {name: [entries[s] for s in subjects] for name, subjects in split.items()}
    provenance = {
        "recipe": recipe,
        "seed": seed,
        "options": recipe_options,
        "target_percentiles": list(percentiles) if recipe == "realistic" else None,
        "reference_subject": reference_subject if recipe == "seed001" else None,
        "inputs": [str(p.resolve()) for p in inputs],
        "split": split,
    }
    (output / "preparation.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    if leave_one_out:
        for held_out in sorted(entries):
            fold = {
                "training": [entries[s] for s in sorted(entries) if s != held_out],
                "validation": [entries[held_out]],
                "test": [entries[held_out]],
            }
            (output / f"datalist_fold{held_out}.json").write_text(json.dumps(fold, indent=2) + "\n")
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
    return datalist_path


def merge_datalists(
    output: str | os.PathLike,
    folders: Sequence[str | os.PathLike],
    overwrite: bool = False,
    train_on_validation: bool = False,
) -> Path:
    """One datalist over several prepared folders (one per recipe), for training one model on all of them.

    Every split holds the items of every folder's list, each item gaining ``"recipe"`` (from the folder's
    ``preparation.json``), so a model is selected and reported under every recipe, and degradation-randomized
    training (whose ``fixed_pair_prob`` keeps an item's own 3T now and then) sees each recipe's fixed pairs beside
    the degradations it simulates from their 7T targets. Paths are made relative to the datalist's own folder, so
    that folder is the ``dataset_dir``. Every folder's datalist is read and its subjects checked to agree before
    ``output`` is written.

    Args:
        output: the merged datalist's path (e.g. ``data/tell7t_recipes.json``); not replaced unless ``overwrite``.
        folders: prepared folders (:func:`prepare_pairs`), each holding ``datalist.json``; a list or comma-separated.
        overwrite: replace an existing ``output``.
        train_on_validation: append the validation items to training as well (they stay in validation, which then
            monitors a training subject instead of selecting on a held-out one): for a final model trained on every
            subject but the test ones, whose figures are then on the test subjects only.
    """
    output = Path(output)
    folders = [Path(f) for f in (_as_subject_list(folders) if isinstance(folders, str) else folders)]
    if output.exists() and not overwrite:
        raise InputError(f"{output}: already exists; pass overwrite=True to replace it.")
    if not folders:
        raise InputError("merge_datalists needs at least one prepared folder.")
    lists = []
    for folder in folders:
        path = folder / "datalist.json"
        if not path.is_file():
            raise InputError(f"{path}: datalist file not found (run scripts/prepare_data.py first).")
        lists.append(json.loads(path.read_text()))
    subjects = [sorted(item["subject"] for split in content.values() for item in split) for content in lists]
    if any(names != subjects[0] for names in subjects):
        raise InputError(f"the folders {[str(f) for f in folders]} do not hold the same subjects.")

    def recipe(folder: Path) -> str:
        provenance = folder / "preparation.json"
        return json.loads(provenance.read_text())["recipe"] if provenance.is_file() else folder.name

    def relocated(item: dict, folder: Path) -> dict:
        paths = {k: os.path.relpath(folder / v, output.parent.resolve()) for k, v in item.items() if k != "subject"}
        return {**item, **paths, "recipe": recipe(folder)}

    folders = [f.resolve() for f in folders]
    merged = {}
    for split in ("training", "validation", "test"):
        merged[split] = [relocated(item, f) for f, content in zip(folders, lists) for item in content.get(split, [])]
    if train_on_validation:
        merged["training"] += merged["validation"]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(merged, indent=2) + "\n")
    return output
