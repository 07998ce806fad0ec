"""Datalists: load one split and check every file before any compute (BUNDLES.md "Datalist" and "Bad input").

A workflow calls :func:`load_datalist` in its ``initialize`` step, so a missing file, an unreadable or non-NIfTI
image, a 3T/7T pair whose grids disagree, a wrong channel count, NaN or infinite voxels, a blank volume, an
inconsistent diffusion series or an empty list stops it with one :class:`InputError` naming the file and the
problem, before anything is computed or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from synth7t.errors import InputError
from synth7t.transforms.diffusion import check_diffusion_series, read_fsl_bvals, read_fsl_bvecs

__all__ = ["InputError", "check_item", "load_datalist"]

# Largest value range that scaling to [0, 1] in float32 handles: beyond it, differences overflow to infinity.
_FLOAT32_SCALABLE = float(np.finfo(np.float32).max) / 4


def _read_split(datalist: Path, splits: Sequence[str]) -> tuple[str, list[dict]]:
    """The first non-empty list of ``splits``, in the Decathlon format: items are objects; in ``"test"`` they may
    be plain strings that stand for ``{"image": ...}`` (as ``monai.data.load_decathlon_datalist`` reads them). Paths are resolved later,
    for the file keys only: MONAI's loader would also turn any other value that names an existing file or folder
    (a ``"subject": "sub-01"`` beside a ``sub-01/`` folder) into a path."""
    if not datalist.is_file():
        raise InputError(f"{datalist}: datalist file not found.")
    try:
        content = json.loads(datalist.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{datalist}: not a readable JSON datalist ({error}).") from error
    for split in splits if isinstance(content, dict) else ():
        items = content.get(split)
        if not items:
            continue
        if not isinstance(items, list):
            raise InputError(f"{datalist}: '{split}' must be a list of items.")
        for index, item in enumerate(items):
            if not isinstance(item, dict) and not (split == "test" and isinstance(item, str)):
                raise InputError(f"{datalist} '{split}'[{index}]: an item is an object of file paths, got {item!r}.")
        return split, [dict(item) if isinstance(item, dict) else {"image": item} for item in items]
    raise InputError(
        f"{datalist}: the datalist has no items in {' or '.join(repr(s) for s in splits)} (a datalist is a JSON "
        "object of lists such as 'training', 'validation' and 'test')."
    )


def _ras_shape(image: nib.spatialimages.SpatialImage) -> tuple[int, ...]:
    """The spatial shape in RAS axis order, as ``Orientationd(axcodes="RAS")`` will give it."""
    orientation = nib.orientations.io_orientation(image.affine)
    shape = [0, 0, 0]
    for axis, (ras_axis, _) in enumerate(orientation[:3]):
        shape[int(ras_axis)] = int(image.shape[axis])
    return tuple(shape)


def _load_image(
    path: Path, where: str, allow_series: bool, min_shape: Sequence[int] | None = None
) -> nib.spatialimages.SpatialImage:
    """Open one NIfTI image and check it holds finite, real, scalable voxels of one 3-D volume (or a 4-D series) on
    a proper voxel grid, at least ``min_shape`` (RAS axis order) in size."""
    if not path.is_file():
        raise InputError(f"{path}: file not found ({where}).")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: not a readable NIfTI image ({where}): {type(error).__name__}.") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: is a {type(image).__name__}, not a NIfTI image ({where}).")
    dtype = image.get_data_dtype()
    if dtype.fields is not None or np.issubdtype(dtype, np.complexfloating) or not np.issubdtype(dtype, np.number):
        raise InputError(f"{path}: has voxels of type {dtype} (RGB or complex); expected one real value per voxel ({where}).")
    shape = image.shape
    single_channel = len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)
    if allow_series and len(shape) != 4:
        raise InputError(f"{path}: has shape {shape}; a diffusion series must be 4-D ({where}).")
    if not allow_series and not single_channel:
        raise InputError(f"{path}: has shape {shape}; expected one 3-D volume with a single channel ({where}).")
    affine = image.affine
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise InputError(
            f"{path}: its voxel-to-world matrix (affine) is degenerate (voxel sizes zero or not finite), so its "
            f"orientation and grid are unknown; fix the header's sform/qform ({where})."
        )
    ras_shape = _ras_shape(image)
    if min_shape is not None and any(n < m for n, m in zip(ras_shape, min_shape)):
        raise InputError(
            f"{path}: is {' x '.join(map(str, ras_shape))} voxels (RAS order); the bundle needs at least "
            f"{' x '.join(map(str, min_shape))} ({where})."
        )
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise InputError(f"{path}: voxel data cannot be read ({where}): {type(error).__name__}.") from error
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: contains {bad} NaN or infinite voxels ({where}).")
    if not np.any(data):
        raise InputError(f"{path}: every voxel is zero ({where}).")
    low, high = float(np.min(data)), float(np.max(data))
    if high - low > _FLOAT32_SCALABLE:
        raise InputError(
            f"{path}: its values span {low:.3g} to {high:.3g}, too wide to scale in 32-bit floating point ({where})."
        )
    return image


def _check_same_grid(
    reference: tuple[Path, nib.spatialimages.SpatialImage],
    other: tuple[Path, nib.spatialimages.SpatialImage],
    where: str,
) -> None:
    (ref_path, ref), (path, image) = reference, other
    if tuple(image.shape[:3]) != tuple(ref.shape[:3]):
        raise InputError(
            f"{path}: shape {tuple(image.shape[:3])} differs from {ref_path.name}'s {tuple(ref.shape[:3])} ({where})."
        )
    if not np.allclose(image.affine, ref.affine, atol=1e-3):
        difference = float(np.abs(image.affine - ref.affine).max())
        raise InputError(
            f"{path}: affine differs from {ref_path.name}'s by up to {difference:.4g} (voxel-to-world matrix); "
            f"the images of an item must share one voxel grid ({where})."
        )


def _grid_group(key: str, grid_groups: Sequence[Sequence[str]] | None) -> str:
    """Name of the group of keys whose images must share ``key``'s voxel grid (``None``: all keys, one group)."""
    if grid_groups is None:
        return "all"
    groups = [f"group {index}" for index, group in enumerate(grid_groups) if key in group]
    return groups[0] if groups else f"key {key}"  # a key in no group shares its grid with nothing


def _check_item(
    item: dict,
    where: str,
    dataset_dir: Path,
    required: Sequence[str],
    optional_keys: Sequence[str],
    alternatives: Mapping[str, Sequence[str]],
    grid_groups: Sequence[Sequence[str]] | None,
    min_shape: Sequence[int] | None,
    tensor_fit: bool,
) -> dict:
    def replaced(key: str) -> bool:
        return not item.get(key) and key in alternatives and all(item.get(alt) for alt in alternatives[key])

    for key, others in alternatives.items():
        given = [alt for alt in others if item.get(alt)]
        if item.get(key) and given:
            raise InputError(
                f"{where}: has both '{key}' and {', '.join(repr(k) for k in given)}; give '{key}' or "
                f"{' + '.join(repr(k) for k in others)}, not both (which one to use would be a guess)."
            )

    keys = [alt for key in required for alt in (alternatives[key] if replaced(key) else [key])]
    missing = [key for key in keys if not item.get(key)]
    if missing:
        needs = [f"{key} (or {' + '.join(alternatives[key])})" if key in alternatives else key for key in keys]
        raise InputError(f"{where}: missing {', '.join(repr(k) for k in missing)} (needs {', '.join(needs)}).")
    item = dict(item)
    images: dict[str, tuple[Path, nib.spatialimages.SpatialImage]] = {}
    for key in [*keys, *(key for key in optional_keys if item.get(key) and key not in keys)]:
        if not isinstance(item[key], str):
            raise InputError(f"{where}: '{key}' must be a file path, got {item[key]!r}.")
        item[key] = str(dataset_dir / item[key])
        if key in ("bval", "bvec"):
            continue
        path = Path(item[key])
        image = _load_image(path, f"{where} key '{key}'", allow_series=key == "dwi", min_shape=min_shape)
        group = _grid_group(key, grid_groups)
        same_grid = [loaded for name, loaded in images.items() if _grid_group(name, grid_groups) == group]
        if same_grid:
            _check_same_grid(same_grid[0], (path, image), f"{where} key '{key}'")
        images[key] = (path, image)
    if "dwi" in images:
        _check_diffusion(item, Path(item["dwi"]), images["dwi"][1].shape[3], tensor_fit)
    return item


def _check_diffusion(item: dict, dwi_path: Path, n_volumes: int, tensor_fit: bool) -> None:
    names = {"dwi_name": str(dwi_path), "bval_name": str(item["bval"]), "bvec_name": str(item["bvec"])}
    for key in ("bval", "bvec"):
        if not Path(item[key]).is_file():
            raise InputError(f"{item[key]}: file not found (key '{key}' of the diffusion series {dwi_path}).")
    try:
        check_diffusion_series(
            n_volumes, read_fsl_bvals(item["bval"]), read_fsl_bvecs(item["bvec"]), tensor_fit=tensor_fit, **names
        )
    except ValueError as error:
        raise InputError(str(error)) from error


def load_datalist(
    datalist: str | os.PathLike,
    split: str | Sequence[str],
    dataset_dir: str | os.PathLike,
    image_keys: Sequence[str] = ("image",),
    target_keys: Sequence[str] = (),
    optional_keys: Sequence[str] = ("mask",),
    alternatives: Mapping[str, Sequence[str]] | None = None,
    grid_groups: Sequence[Sequence[str]] | None = None,
    min_shape: Sequence[int] | None = None,
    tensor_fit: bool = True,
) -> list[dict]:
    """Load the first non-empty of ``split`` from a Decathlon-style datalist and validate every item.

    Args:
        datalist: path of the JSON datalist.
        split: list name, or names tried in order (evaluation: ``["test", "validation"]``).
        dataset_dir: folder that relative paths are resolved against.
        image_keys: input images every item must have (``["image"]``; VCT ``["t1w", "adc"]``).
        target_keys: targets every item must have (``["label"]`` for training and evaluation, none for inference).
        optional_keys: images checked when present (``["mask"]``).
        alternatives: keys that a required key may be replaced by, all together (VCT:
            ``{"adc": ["dwi", "bval", "bvec"]}``, a 4-D diffusion series and its FSL b-value and b-vector files).
        grid_groups: keys whose images must share one voxel grid, group by group (VCT: the 3T inputs, and the 7T
            target with its mask, ``[["t1w", "adc", "dwi"], ["label", "mask"]]``). ``None``: every image of an
            item on one grid (the T1w bundles' 3T/7T pairs).

    Returns the items with absolute paths. Raises :class:`InputError` at the first problem.
    """
    splits = [split] if isinstance(split, str) else list(split)
    path = Path(datalist).expanduser().resolve()
    name, items = _read_split(path, splits)
    return [
        check_item(
            item,
            f"{path} '{name}'[{index}]",
            dataset_dir,
            image_keys,
            target_keys,
            optional_keys,
            alternatives,
            grid_groups,
            min_shape,
            tensor_fit,
        )
        for index, item in enumerate(items)
    ]


def check_item(
    item: dict,
    where: str,
    dataset_dir: str | os.PathLike,
    image_keys: Sequence[str] = ("image",),
    target_keys: Sequence[str] = (),
    optional_keys: Sequence[str] = ("mask",),
    alternatives: Mapping[str, Sequence[str]] | None = None,
    grid_groups: Sequence[Sequence[str]] | None = None,
    min_shape: Sequence[int] | None = None,
    tensor_fit: bool = True,
) -> dict:
    """Validate one datalist item (or an inference request shaped like one, as the MONAI Label app's) as
    :func:`load_datalist` does; ``where`` names it in the error. Returns the item with absolute paths."""
    root = Path(dataset_dir).expanduser().resolve()
    required = [*image_keys, *target_keys]
    return _check_item(
        item, where, root, required, optional_keys, alternatives or {}, grid_groups, min_shape, tensor_fit
    )
