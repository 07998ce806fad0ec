"""Tests of synth7t.data.load_datalist and its bundle wrappers (BUNDLES.md "Datalist" and "Bad input").

Tiny NIfTI files written with nibabel into ``tmp_path``; CPU, no network, no shared data, a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synth7t import bundle
from synth7t.data import InputError, load_datalist

SHAPE = (12, 10, 8)
AFFINE = np.array([[-1.0, 0, 0, 6], [0, -1, 0, 5], [0, 0, 1, -4], [0, 0, 0, 1]])


def _volume(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) + 0.1).astype(np.float32)


def _nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Path:
    """Write a NIfTI (default: a positive random 12x10x8 float32 volume) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_volume() if data is None else data, affine), path)
    return path


def _datalist(tmp_path: Path, content, name: str = "datalist.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def _pair(tmp_path: Path, name: str = "s1") -> dict:
    """A valid 3T/7T pair with a mask, relative to ``tmp_path``."""
    _nifti(tmp_path / f"{name}_3T.nii.gz", _volume(1))
    _nifti(tmp_path / f"{name}_7T.nii.gz", _volume(2))
    _nifti(tmp_path / f"{name}_mask.nii.gz", np.ones(SHAPE, np.uint8))
    return {"image": f"{name}_3T.nii.gz", "label": f"{name}_7T.nii.gz", "mask": f"{name}_mask.nii.gz"}


def _load(tmp_path: Path, items: list[dict], split: str = "training", **kwargs) -> list[dict]:
    path = _datalist(tmp_path, {split: items})
    kwargs.setdefault("target_keys", ["label"])
    return load_datalist(path, split, tmp_path, **kwargs)


def _raises(tmp_path: Path, items: list[dict], *words: str, **kwargs) -> str:
    """Loading ``items`` raises InputError whose message contains every one of ``words``; returns the message."""
    with pytest.raises(InputError) as info:
        _load(tmp_path, items, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------------------------
# valid datalists
# ----------------------------------------------------------------------------------------------------------------


def test_relative_paths_resolved_and_absolute_paths_kept(tmp_path):
    item = _pair(tmp_path)
    elsewhere = _nifti(tmp_path / "other" / "abs_7T.nii.gz", _volume(3))
    item["label"] = str(elsewhere)
    (out,) = _load(tmp_path, [item])
    assert out["image"] == str(tmp_path / "s1_3T.nii.gz")
    assert out["label"] == str(elsewhere)
    assert out["mask"] == str(tmp_path / "s1_mask.nii.gz")
    for key in ("image", "label", "mask"):
        assert Path(out[key]).is_absolute() and Path(out[key]).is_file()


def test_relative_paths_resolved_against_dataset_dir_not_cwd(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    item = _pair(data_dir)
    datalist = _datalist(tmp_path, {"training": [item]})
    monkeypatch.chdir(tmp_path)  # the files are not in the working directory
    (out,) = load_datalist(datalist, "training", "data", target_keys=["label"])
    assert out["image"] == str(data_dir / "s1_3T.nii.gz")
    assert out["label"] == str(data_dir / "s1_7T.nii.gz")


def test_plain_string_test_list(tmp_path):
    _nifti(tmp_path / "a.nii.gz")
    _nifti(tmp_path / "b.nii.gz", _volume(5))
    datalist = _datalist(tmp_path, {"training": [], "test": ["a.nii.gz", "b.nii.gz"]})
    out = load_datalist(datalist, "test", tmp_path)
    assert out == [{"image": str(tmp_path / "a.nii.gz")}, {"image": str(tmp_path / "b.nii.gz")}]


def test_extra_keys_passed_through(tmp_path):
    item = {**_pair(tmp_path), "subject": "sub-01", "age": 35, "sex": "F", "diagnosis": None}
    (out,) = _load(tmp_path, [item])
    assert out["subject"] == "sub-01"
    assert out["age"] == 35
    assert out["sex"] == "F"
    assert out["diagnosis"] is None


def test_subject_key_kept_when_a_folder_has_its_name(tmp_path):
    """BIDS layout: the subject's folder is named like the subject; the "subject" value is still not a path."""
    _nifti(tmp_path / "sub-01" / "anat" / "sub-01_3T.nii.gz", _volume(1))
    _nifti(tmp_path / "sub-01" / "anat" / "sub-01_7T.nii.gz", _volume(2))
    item = {
        "image": "sub-01/anat/sub-01_3T.nii.gz",
        "label": "sub-01/anat/sub-01_7T.nii.gz",
        "subject": "sub-01",
    }
    (out,) = _load(tmp_path, [item])
    assert out["image"] == str(tmp_path / "sub-01" / "anat" / "sub-01_3T.nii.gz")
    assert out["subject"] == "sub-01"


def test_mask_optional(tmp_path):
    item = _pair(tmp_path)
    del item["mask"]
    (out,) = _load(tmp_path, [item])
    assert set(out) == {"image", "label"}


def test_a_required_key_also_listed_as_optional_is_read_once(tmp_path, monkeypatch):
    import synth7t.data

    read = []
    load_image = synth7t.data._load_image

    def counting(path, *args, **kwargs):
        read.append(path)
        return load_image(path, *args, **kwargs)

    monkeypatch.setattr(synth7t.data, "_load_image", counting)
    (out,) = _load(tmp_path, [_pair(tmp_path)], optional_keys=["mask", "image"])
    assert sorted(read) == sorted({Path(out[key]) for key in ("image", "label", "mask")})


def test_mask_checked_when_present(tmp_path):
    item = _pair(tmp_path)
    item["mask"] = "nomask.nii.gz"
    _raises(tmp_path, [item], str(tmp_path / "nomask.nii.gz"), "not found", "'mask'")


def test_inference_needs_no_target(tmp_path):
    item = _pair(tmp_path)
    del item["label"]
    (out,) = _load(tmp_path, [item], split="test", target_keys=[])
    assert out["image"] == str(tmp_path / "s1_3T.nii.gz")


def test_input_not_modified(tmp_path):
    item = _pair(tmp_path)
    copy = dict(item)
    datalist = _datalist(tmp_path, {"training": [item]})
    before = datalist.read_text()
    load_datalist(datalist, "training", tmp_path, target_keys=["label"])
    assert item == copy
    assert datalist.read_text() == before


def test_several_items_in_order(tmp_path):
    items = [_pair(tmp_path, "s1"), _pair(tmp_path, "s2"), _pair(tmp_path, "s3")]
    out = _load(tmp_path, items)
    assert [o["image"] for o in out] == [str(tmp_path / f"s{i}_3T.nii.gz") for i in (1, 2, 3)]


@pytest.mark.parametrize("test_content", ["missing", "empty"])
def test_split_fallback_to_validation(tmp_path, test_content):
    _pair(tmp_path, "v1")
    _pair(tmp_path, "t1")
    content = {"training": [_pair(tmp_path, "tr")], "validation": [_pair(tmp_path, "v1")]}
    if test_content == "empty":
        content["test"] = []
    datalist = _datalist(tmp_path, content)
    out = load_datalist(datalist, ["test", "validation"], tmp_path, target_keys=["label"])
    assert [o["image"] for o in out] == [str(tmp_path / "v1_3T.nii.gz")]


def test_split_order_prefers_first(tmp_path):
    content = {"validation": [_pair(tmp_path, "v1")], "test": [_pair(tmp_path, "t1")]}
    datalist = _datalist(tmp_path, content)
    out = load_datalist(datalist, ["test", "validation"], tmp_path, target_keys=["label"])
    assert [o["image"] for o in out] == [str(tmp_path / "t1_3T.nii.gz")]


def test_single_volume_4d_image_accepted(tmp_path):
    item = _pair(tmp_path)
    _nifti(tmp_path / "s1_3T.nii.gz", _volume(7)[..., None])
    (out,) = _load(tmp_path, [item])
    assert out["image"] == str(tmp_path / "s1_3T.nii.gz")


# ----------------------------------------------------------------------------------------------------------------
# bad input: the datalist itself
# ----------------------------------------------------------------------------------------------------------------


def test_missing_datalist(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(InputError) as info:
        load_datalist(path, "training", tmp_path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_invalid_json(tmp_path):
    path = _datalist(tmp_path, '{"training": [ {"image": "a.nii.gz" ')
    with pytest.raises(InputError) as info:
        load_datalist(path, "training", tmp_path)
    assert str(path) in str(info.value) and "JSON" in str(info.value)


@pytest.mark.parametrize("content", [{"training": []}, {"validation": [{"image": "a.nii.gz"}]}, {}, []])
def test_empty_or_missing_split(tmp_path, content):
    path = _datalist(tmp_path, content)
    with pytest.raises(InputError) as info:
        load_datalist(path, "training", tmp_path)
    assert str(path) in str(info.value) and "no items" in str(info.value) and "'training'" in str(info.value)


@pytest.mark.parametrize("items", [["a.nii.gz"], [3], "a.nii.gz"])
def test_items_that_are_not_objects(tmp_path, items):
    """Only MSD's "test" list may hold plain strings; elsewhere a non-object item is a malformed datalist."""
    _nifti(tmp_path / "a.nii.gz")
    path = _datalist(tmp_path, {"training": items})
    with pytest.raises(InputError) as info:
        load_datalist(path, "training", tmp_path)
    assert str(path) in str(info.value) and "'training'" in str(info.value)


def test_empty_split_fallback_names_every_split(tmp_path):
    path = _datalist(tmp_path, {"training": [_pair(tmp_path)], "test": [], "validation": []})
    with pytest.raises(InputError) as info:
        load_datalist(path, ["test", "validation"], tmp_path, target_keys=["label"])
    assert str(path) in str(info.value) and "'test'" in str(info.value) and "'validation'" in str(info.value)


def test_item_missing_target(tmp_path):
    item = _pair(tmp_path)
    del item["label"]
    message = _raises(tmp_path, [item], str(tmp_path / "datalist.json"), "missing", "'label'")
    assert "'training'[0]" in message


def test_item_missing_image(tmp_path):
    item = _pair(tmp_path)
    del item["image"]
    _raises(tmp_path, [item], str(tmp_path / "datalist.json"), "missing", "'image'")


# ----------------------------------------------------------------------------------------------------------------
# bad input: the images
# ----------------------------------------------------------------------------------------------------------------


def test_missing_image_file(tmp_path):
    item = _pair(tmp_path)
    (tmp_path / "s1_7T.nii.gz").unlink()
    _raises(tmp_path, [item], str(tmp_path / "s1_7T.nii.gz"), "not found")


def test_unreadable_file(tmp_path):
    item = _pair(tmp_path)
    (tmp_path / "s1_3T.nii.gz").write_bytes(np.random.default_rng(0).integers(0, 256, 600, np.uint8).tobytes())
    _raises(tmp_path, [item], str(tmp_path / "s1_3T.nii.gz"), "not a readable NIfTI")


def test_truncated_file(tmp_path):
    item = _pair(tmp_path)
    path = tmp_path / "s1_7T.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    _raises(tmp_path, [item], str(path), "read")


def test_non_nifti_image(tmp_path):
    item = _pair(tmp_path)
    nib.save(nib.MGHImage(_volume(1), AFFINE), tmp_path / "s1_3T.mgz")
    item["image"] = "s1_3T.mgz"
    _raises(tmp_path, [item], str(tmp_path / "s1_3T.mgz"), "not a NIfTI")


def test_shape_mismatch(tmp_path):
    item = _pair(tmp_path)
    _nifti(tmp_path / "s1_7T.nii.gz", _volume(2, (12, 10, 9)))
    message = _raises(tmp_path, [item], str(tmp_path / "s1_7T.nii.gz"), "shape")
    assert "(12, 10, 9)" in message and "(12, 10, 8)" in message


def test_affine_mismatch(tmp_path):
    item = _pair(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    _nifti(tmp_path / "s1_7T.nii.gz", _volume(2), shifted)
    _raises(tmp_path, [item], str(tmp_path / "s1_7T.nii.gz"), "affine")


def test_wrong_channel_count(tmp_path):
    item = _pair(tmp_path)
    _nifti(tmp_path / "s1_3T.nii.gz", np.stack([_volume(1), _volume(2)], axis=-1))
    _raises(tmp_path, [item], str(tmp_path / "s1_3T.nii.gz"), "single channel", "(12, 10, 8, 2)")


@pytest.mark.parametrize("value, key", [(np.nan, "image"), (np.inf, "label"), (-np.inf, "image")])
def test_non_finite_voxel(tmp_path, value, key):
    item = _pair(tmp_path)
    data = _volume(4)
    data[3, 4, 5] = value
    path = _nifti(tmp_path / item[key], data)
    _raises(tmp_path, [item], str(path), "NaN or infinite")


def test_complex_voxels(tmp_path):
    item = _pair(tmp_path)
    path = _nifti(tmp_path / "s1_3T.nii.gz", _volume(1).astype(np.complex64))
    _raises(tmp_path, [item], str(path), "RGB or complex")


def test_blank_volume(tmp_path):
    item = _pair(tmp_path)
    path = _nifti(tmp_path / "s1_7T.nii.gz", np.zeros(SHAPE, np.float32))
    _raises(tmp_path, [item], str(path), "zero")


def test_mask_on_another_grid(tmp_path):
    item = _pair(tmp_path)
    _nifti(tmp_path / "s1_mask.nii.gz", np.ones((6, 5, 4), np.uint8), np.diag([-2.0, -2.0, 2.0, 1.0]))
    _raises(tmp_path, [item], str(tmp_path / "s1_mask.nii.gz"), "shape", "'mask'")


def test_first_bad_item_reported_with_index(tmp_path):
    good, bad, also_bad = _pair(tmp_path, "s1"), _pair(tmp_path, "s2"), _pair(tmp_path, "s3")
    (tmp_path / "s2_7T.nii.gz").unlink()
    (tmp_path / "s3_3T.nii.gz").unlink()
    message = _raises(tmp_path, [good, bad, also_bad], str(tmp_path / "s2_7T.nii.gz"), "'training'[1]")
    assert "s3_3T" not in message


# ----------------------------------------------------------------------------------------------------------------
# diffusion alternative (vct_adc7t)
# ----------------------------------------------------------------------------------------------------------------

VCT = {"image_keys": ["t1w", "adc"], "alternatives": {"adc": ["dwi", "bval", "bvec"]}}
BVALS = [0, 1000, 1000, 1000, 1000, 1000, 1000]
_DIAGONAL = 0.5**0.5
BVECS = [  # six non-collinear directions: what the tensor fit of ComputeADCd's default method needs
    [0, 1, 0, 0, _DIAGONAL, _DIAGONAL, 0],
    [0, 0, 1, 0, _DIAGONAL, 0, _DIAGONAL],
    [0, 0, 0, 1, 0, _DIAGONAL, _DIAGONAL],
]


def _dwi_item(tmp_path: Path, bvals=BVALS, bvecs=BVECS, n_volumes: int = 7) -> dict:
    _nifti(tmp_path / "t1w.nii.gz", _volume(1))
    _nifti(tmp_path / "adc7t.nii.gz", _volume(2))
    series = np.stack([_volume(10 + i) for i in range(n_volumes)], axis=-1)
    _nifti(tmp_path / "dwi.nii.gz", series)
    (tmp_path / "dwi.bval").write_text(" ".join(str(b) for b in bvals) + "\n")
    (tmp_path / "dwi.bvec").write_text("\n".join(" ".join(str(v) for v in row) for row in bvecs) + "\n")
    return {"t1w": "t1w.nii.gz", "dwi": "dwi.nii.gz", "bval": "dwi.bval", "bvec": "dwi.bvec", "label": "adc7t.nii.gz"}


def test_diffusion_series_accepted(tmp_path):
    item = _dwi_item(tmp_path)
    (out,) = _load(tmp_path, [item], **VCT)
    assert out == {key: str(tmp_path / value) for key, value in item.items()}
    assert "adc" not in out


def test_adc_map_accepted(tmp_path):
    _dwi_item(tmp_path)
    _nifti(tmp_path / "adc3t.nii.gz", _volume(9))
    item = {"t1w": "t1w.nii.gz", "adc": "adc3t.nii.gz", "label": "adc7t.nii.gz"}
    (out,) = _load(tmp_path, [item], **VCT)
    assert out["adc"] == str(tmp_path / "adc3t.nii.gz")


def test_adc_map_and_diffusion_series_together_are_refused(tmp_path):
    item = _dwi_item(tmp_path)
    _nifti(tmp_path / "adc3t.nii.gz", _volume(9))
    item["adc"] = "adc3t.nii.gz"
    _raises(tmp_path, [item], "'adc'", "'dwi'", "not both", **VCT)


def test_diffusion_incomplete_alternative_asks_for_adc(tmp_path):
    item = _dwi_item(tmp_path)
    del item["bvec"]
    _raises(tmp_path, [item], str(tmp_path / "datalist.json"), "missing", "'adc'", **VCT)


def test_diffusion_bval_count_mismatch(tmp_path):
    item = _dwi_item(tmp_path, bvals=BVALS[:3])
    message = _raises(tmp_path, [item], str(tmp_path / "dwi.nii.gz"), str(tmp_path / "dwi.bval"), **VCT)
    assert "7 volumes" in message and "3 b-values" in message


def test_diffusion_no_b0(tmp_path):
    item = _dwi_item(tmp_path, bvals=[1000] * 7)
    _raises(tmp_path, [item], str(tmp_path / "dwi.bval"), "no b=0", **VCT)


def test_diffusion_missing_bvec_file(tmp_path):
    item = _dwi_item(tmp_path)
    (tmp_path / "dwi.bvec").unlink()
    _raises(tmp_path, [item], str(tmp_path / "dwi.bvec"), "not found", **VCT)


def test_diffusion_bvec_count_mismatch(tmp_path):
    item = _dwi_item(tmp_path, bvecs=[row[:3] for row in BVECS])
    _raises(tmp_path, [item], str(tmp_path / "dwi.bvec"), "b-vectors", **VCT)


def test_diffusion_series_with_fewer_than_six_directions(tmp_path):
    """Three directions suffice for a shell average, not for the tensor that the bundles fit by default."""
    item = _dwi_item(tmp_path, bvals=BVALS[:4], bvecs=[[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], n_volumes=4)
    _raises(tmp_path, [item], str(tmp_path / "dwi.bvec"), "6 non-collinear directions", **VCT)


def test_diffusion_series_must_be_4d(tmp_path):
    item = _dwi_item(tmp_path)
    _nifti(tmp_path / "dwi.nii.gz", _volume(3))
    _raises(tmp_path, [item], str(tmp_path / "dwi.nii.gz"), "4-D", **VCT)


def test_diffusion_series_on_another_grid(tmp_path):
    item = _dwi_item(tmp_path)
    _nifti(tmp_path / "dwi.nii.gz", np.stack([_volume(i, (12, 10, 7)) for i in range(7)], axis=-1))
    _raises(tmp_path, [item], str(tmp_path / "dwi.nii.gz"), "shape", **VCT)


VCT_GRIDS = [["t1w", "adc", "dwi"], ["label", "mask"]]


def test_grid_groups_let_the_target_sit_on_its_own_grid(tmp_path):
    item = _dwi_item(tmp_path)
    target_affine = np.diag([1.05, 1.05, 1.05, 1.0])
    _nifti(tmp_path / "adc7t.nii.gz", _volume(2, (14, 12, 9)), target_affine)
    _nifti(tmp_path / "mask7t.nii.gz", np.ones((14, 12, 9), np.uint8), target_affine)
    item["mask"] = "mask7t.nii.gz"
    _raises(tmp_path, [item], str(tmp_path / "adc7t.nii.gz"), "shape", **VCT)  # one grid by default
    (out,) = _load(tmp_path, [item], **VCT, grid_groups=VCT_GRIDS)
    assert out["label"] == str(tmp_path / "adc7t.nii.gz")


def test_grid_groups_still_check_within_a_group(tmp_path):
    item = _dwi_item(tmp_path)
    _nifti(tmp_path / "t1w.nii.gz", _volume(1), np.diag([2.0, 2.0, 2.0, 1.0]))
    _raises(tmp_path, [item], str(tmp_path / "dwi.nii.gz"), "affine", **VCT, grid_groups=VCT_GRIDS)


# ----------------------------------------------------------------------------------------------------------------
# bundle wrappers
# ----------------------------------------------------------------------------------------------------------------


def test_bundle_load_datalist_valid_same_items(tmp_path):
    items = [{**_pair(tmp_path, "s1"), "subject": "s1"}, _pair(tmp_path, "s2")]
    path = _datalist(tmp_path, {"training": items})
    expected = load_datalist(path, "training", tmp_path, target_keys=["label"])
    assert bundle.load_datalist(path, "training", tmp_path, target_keys=["label"]) == expected


def test_bundle_load_datalist_bad_input(tmp_path):
    item = _pair(tmp_path)
    (tmp_path / "s1_7T.nii.gz").unlink()
    path = _datalist(tmp_path, {"training": [item]})
    with pytest.raises(SystemExit) as info:
        bundle.load_datalist(path, "training", tmp_path, target_keys=["label"])
    assert isinstance(info.value, bundle.BadInput)
    assert isinstance(info.value.code, str)
    assert info.value.code.startswith("error: ")
    assert str(info.value).startswith("error: ")
    assert str(tmp_path / "s1_7T.nii.gz") in info.value.code and "not found" in info.value.code
    assert isinstance(info.value.error, InputError)


def test_bundle_load_datalist_missing_datalist(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(SystemExit) as info:
        bundle.load_datalist(path, "test", tmp_path)
    assert info.value.code.startswith("error: ") and str(path) in info.value.code


def test_require_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    assert bundle.require_file(path, "checkpoint") == str(path)
    assert bundle.require_file(str(path), "checkpoint") == str(path)
    missing = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as info:
        bundle.require_file(missing, "checkpoint")
    assert info.value.code.startswith("error: ")
    assert str(missing) in info.value.code and "checkpoint" in info.value.code and "not found" in info.value.code
    with pytest.raises(SystemExit) as info:
        bundle.require_file(tmp_path, "checkpoint")  # a folder is not a file
    assert str(tmp_path) in info.value.code
