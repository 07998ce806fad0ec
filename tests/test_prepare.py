"""Tests of synth7t.prepare (simulated 3T/7T pairs and their subject-level datalist) and scripts/prepare_data.py.

Five tiny synthetic uint8 "7T" subjects; CPU, no network, no shared data, a few seconds.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synth7t.data import InputError, load_datalist
from synth7t.prepare import merge_datalists, prepare_pairs, split_subjects, subject_id

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 16)
AFFINE = np.array([[-1.0, 0, 0, 12], [0, -1, 0, 10], [0, 0, 1, -8], [0, 0, 0, 1]])
SUBJECTS = [f"sub-XX0{i}" for i in range(1, 6)]
REFERENCE = "sub-XX05"  # the smallest brain, so every other subject has fewer background voxels


def _phantom(i: int) -> np.ndarray:
    """uint8 'brain': textured ellipsoid (white-matter core brighter), background 0; the brain shrinks with i."""
    rng = np.random.default_rng(100 + i)
    g = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    radii = np.array([10.0, 8.5, 6.5]) * (1.0 - 0.05 * i)
    r = np.sqrt(sum((gi / a) ** 2 for gi, a in zip(g, radii)))
    texture = 110 + 70 * (r < 0.6) + 20 * np.sin(g[0] / 2.0 + i) + rng.normal(0, 10, SHAPE)
    vol = np.zeros(SHAPE, np.uint8)
    brain = r < 1.0
    vol[brain] = np.clip(np.rint(texture[brain]), 1, 255).astype(np.uint8)
    return vol


def _write_inputs(folder: Path, indices=range(1, 6)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        nib.save(nib.Nifti1Image(_phantom(i), AFFINE), folder / f"sub-XX0{i}_T1w.nii.gz")
    return folder


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return _write_inputs(tmp_path_factory.mktemp("tell") / "in")


@pytest.fixture(scope="module")
def realistic(inputs, tmp_path_factory) -> Path:
    """Output folder of the realistic recipe with seed 7."""
    out = tmp_path_factory.mktemp("realistic") / "out"
    returned = prepare_pairs(inputs, out, recipe="realistic", seed=7)
    assert Path(returned) == out / "datalist.json"
    return out


@pytest.fixture(scope="module")
def seed001(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seed001") / "out"
    prepare_pairs(inputs, out, recipe="seed001", seed=1, reference_subject=REFERENCE)
    return out


# ----------------------------------------------------------------------------------------------------------------
# realistic recipe: files, datalist, provenance
# ----------------------------------------------------------------------------------------------------------------


def test_subject_id():
    assert subject_id(Path("/x/sub-TELL0101_T1w_brain_homog_mni.nii.gz")) == "sub-TELL0101"
    assert subject_id(Path("sub-XX01_T1w.nii")) == "sub-XX01"


def test_realistic_writes_three_files_per_subject(realistic):
    for subject in SUBJECTS:
        for kind in ("3T", "7T", "mask"):
            assert (realistic / f"{subject}_{kind}.nii.gz").is_file()
    assert (realistic / "datalist.json").is_file() and (realistic / "preparation.json").is_file()


def test_realistic_datalist_default_split(realistic):
    datalist = json.loads((realistic / "datalist.json").read_text())
    assert set(datalist) == {"training", "validation", "test"}
    assert [e["subject"] for e in datalist["training"]] == SUBJECTS[:2]
    assert [e["subject"] for e in datalist["validation"]] == SUBJECTS[2:3]
    assert [e["subject"] for e in datalist["test"]] == SUBJECTS[3:]
    for entries in datalist.values():
        for entry in entries:
            s = entry["subject"]
            assert entry == {
                "image": f"{s}_3T.nii.gz",
                "label": f"{s}_7T.nii.gz",
                "mask": f"{s}_mask.nii.gz",
                "subject": s,
            }


def test_realistic_datalist_loads_with_load_datalist(realistic):
    items = load_datalist(realistic / "datalist.json", "training", realistic, target_keys=["label"])
    assert [i["subject"] for i in items] == SUBJECTS[:2]
    assert items[0]["image"] == str(realistic / "sub-XX01_3T.nii.gz")


@pytest.mark.parametrize("index", [1, 4])
def test_realistic_outputs_grid_dtype_and_values(inputs, realistic, index):
    subject = f"sub-XX0{index}"
    raw = _phantom(index)
    images = {kind: nib.load(realistic / f"{subject}_{kind}.nii.gz") for kind in ("3T", "7T", "mask")}
    for image in images.values():
        assert image.shape == SHAPE
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
    assert images["3T"].get_data_dtype() == np.float32
    assert images["7T"].get_data_dtype() == np.float32
    assert images["mask"].get_data_dtype() == np.uint8
    mask = np.asanyarray(images["mask"].dataobj)
    np.testing.assert_array_equal(mask, (raw != 0).astype(np.uint8))
    target = np.asanyarray(images["7T"].dataobj)
    simulated = np.asanyarray(images["3T"].dataobj)
    assert target.min() == 0.0 and target.max() == 1.0
    assert np.all(target[mask == 0] == 0)
    assert np.all(np.isfinite(simulated))
    assert np.all(simulated[mask == 0] == 0)
    assert simulated[mask == 1].mean() > 0.2
    assert not np.allclose(simulated, target, atol=1e-3)  # degraded, not a copy
    # the 7T target is a monotone rescaling of the raw 7T inside the brain
    inside = mask == 1
    order = np.argsort(raw[inside], kind="stable")
    assert np.all(np.diff(target[inside][order]) >= 0)


def test_realistic_preparation_json(inputs, realistic):
    provenance = json.loads((realistic / "preparation.json").read_text())
    assert provenance["recipe"] == "realistic"
    assert provenance["seed"] == 7
    assert provenance["split"] == {"training": SUBJECTS[:2], "validation": SUBJECTS[2:3], "test": SUBJECTS[3:]}
    assert provenance["inputs"] == [str((inputs / f"{s}_T1w.nii.gz").resolve()) for s in SUBJECTS]


# ----------------------------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------------------------


def test_same_seed_same_3t_different_seed_differs(inputs, realistic, tmp_path):
    prepare_pairs(inputs, tmp_path / "same", seed=7)
    prepare_pairs(inputs, tmp_path / "other", seed=8)
    for subject in SUBJECTS:
        reference = _array(realistic / f"{subject}_3T.nii.gz")
        np.testing.assert_array_equal(_array(tmp_path / "same" / f"{subject}_3T.nii.gz"), reference)
        assert not np.array_equal(_array(tmp_path / "other" / f"{subject}_3T.nii.gz"), reference)
        # the target does not depend on the seed
        np.testing.assert_array_equal(
            _array(tmp_path / "other" / f"{subject}_7T.nii.gz"), _array(realistic / f"{subject}_7T.nii.gz")
        )


def test_subjects_get_different_noise(realistic):
    a, b = _array(realistic / "sub-XX01_3T.nii.gz"), _array(realistic / "sub-XX02_3T.nii.gz")
    ta, tb = _array(realistic / "sub-XX01_7T.nii.gz"), _array(realistic / "sub-XX02_7T.nii.gz")
    assert not np.allclose(a - ta, b - tb)


def test_simulation_independent_of_other_subjects(realistic, tmp_path):
    subset = _write_inputs(tmp_path / "in", indices=[2, 3, 4, 5])
    prepare_pairs(subset, tmp_path / "out", seed=7)
    for subject in ("sub-XX02", "sub-XX04"):
        np.testing.assert_array_equal(
            _array(tmp_path / "out" / f"{subject}_3T.nii.gz"), _array(realistic / f"{subject}_3T.nii.gz")
        )


# ----------------------------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------------------------


def test_explicit_split_honoured(inputs, tmp_path):
    prepare_pairs(inputs, tmp_path, validation=["sub-XX01"], test=["sub-XX05", "sub-XX03"])
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert [e["subject"] for e in datalist["training"]] == ["sub-XX02", "sub-XX04"]
    assert [e["subject"] for e in datalist["validation"]] == ["sub-XX01"]
    assert [e["subject"] for e in datalist["test"]] == ["sub-XX03", "sub-XX05"]
    provenance = json.loads((tmp_path / "preparation.json").read_text())
    assert provenance["split"]["test"] == ["sub-XX03", "sub-XX05"]


def test_explicit_test_only(inputs, tmp_path):
    prepare_pairs(inputs, tmp_path, test=["sub-XX02"])
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert [e["subject"] for e in datalist["test"]] == ["sub-XX02"]
    assert datalist["validation"] == []
    assert [e["subject"] for e in datalist["training"]] == ["sub-XX01", "sub-XX03", "sub-XX04", "sub-XX05"]


def test_split_subjects_default_and_sizes():
    assert split_subjects(["d", "a", "c", "b", "e"]) == {
        "training": ["a", "b"],
        "validation": ["c"],
        "test": ["d", "e"],
    }
    assert split_subjects(list("abcdef"), n_validation=2, n_test=1) == {
        "training": ["a", "b", "c"],
        "validation": ["d", "e"],
        "test": ["f"],
    }


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"validation": ["sub-XX09"]}, ["sub-XX09", "not among"]),
        ({"validation": ["sub-XX01"], "test": ["sub-XX01", "sub-XX02"]}, ["sub-XX01", "both"]),
        ({"validation": SUBJECTS[:2], "test": SUBJECTS[2:]}, ["no training"]),
    ],
)
def test_bad_explicit_split(inputs, tmp_path, kwargs, words):
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        prepare_pairs(inputs, out, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not (out / "datalist.json").exists()
    assert not out.exists() or not any(out.iterdir())  # checked before anything is written


def test_too_few_subjects_for_default_split(tmp_path):
    few = _write_inputs(tmp_path / "in", indices=[1, 2, 3])
    with pytest.raises(InputError) as info:
        prepare_pairs(few, tmp_path / "out")
    assert "3 subjects" in str(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# leave one out
# ----------------------------------------------------------------------------------------------------------------


def test_leave_one_out_folds(inputs, tmp_path):
    prepare_pairs(inputs, tmp_path, leave_one_out=True)
    folds = sorted(p.name for p in tmp_path.glob("datalist_fold*.json"))
    assert folds == [f"datalist_fold{s}.json" for s in SUBJECTS]
    for held_out in SUBJECTS:
        fold = json.loads((tmp_path / f"datalist_fold{held_out}.json").read_text())
        assert [e["subject"] for e in fold["validation"]] == [held_out]
        assert [e["subject"] for e in fold["test"]] == [held_out]
        assert [e["subject"] for e in fold["training"]] == [s for s in SUBJECTS if s != held_out]
        assert fold["test"][0]["image"] == f"{held_out}_3T.nii.gz"
    assert (tmp_path / "datalist.json").is_file()


def test_no_folds_by_default(realistic):
    assert not list(realistic.glob("datalist_fold*.json"))


# ----------------------------------------------------------------------------------------------------------------
# seed-001 recipe
# ----------------------------------------------------------------------------------------------------------------


def test_seed001_needs_reference_subject(inputs, tmp_path):
    with pytest.raises(InputError) as info:
        prepare_pairs(inputs, tmp_path / "out", recipe="seed001")  # default reference sub-TELL0106 is absent
    assert "sub-TELL0106" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_seed001_histogram_matched_to_reference(seed001):
    ref = _phantom(5).astype(np.float64)
    ref01 = ref / ref.max()
    ref_zeros = np.mean(ref01 == 0)
    quantiles = [0.6, 0.7, 0.8, 0.9, 0.95]
    for i, subject in enumerate(SUBJECTS, start=1):
        raw = _phantom(i)
        target = _array(seed001 / f"{subject}_7T.nii.gz")
        simulated = _array(seed001 / f"{subject}_3T.nii.gz")
        assert target.dtype == np.float32 and simulated.dtype == np.float32
        np.testing.assert_array_equal(_array(seed001 / f"{subject}_mask.nii.gz"), (raw != 0).astype(np.uint8))
        for out in (target, simulated):
            assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
            assert abs(np.mean(out == 0) - ref_zeros) < 0.01, subject
            np.testing.assert_allclose(np.quantile(out, quantiles), np.quantile(ref01, quantiles), atol=0.03)
    # the reference matched to itself is the reference scaled to [0, 1]
    np.testing.assert_allclose(_array(seed001 / f"{REFERENCE}_7T.nii.gz"), ref01, atol=1e-5)


def test_seed001_preparation_json(seed001):
    provenance = json.loads((seed001 / "preparation.json").read_text())
    assert provenance["recipe"] == "seed001"
    assert provenance["seed"] == 1
    assert provenance["reference_subject"] == REFERENCE


def test_seed001_quantize_8bit(inputs, seed001, tmp_path):
    prepare_pairs(inputs, tmp_path, recipe="seed001", seed=1, reference_subject=REFERENCE, quantize_8bit=True)
    for subject in SUBJECTS[:2]:
        for kind in ("3T", "7T"):
            values = _array(tmp_path / f"{subject}_{kind}.nii.gz")
            assert len(np.unique(values)) <= 256
        float_3t = _array(seed001 / f"{subject}_3T.nii.gz")
        assert len(np.unique(float_3t)) > 256  # without quantisation the noisy 3T has many more values
    provenance = json.loads((tmp_path / "preparation.json").read_text())
    assert provenance["options"] == {"quantize_8bit": True}


# ----------------------------------------------------------------------------------------------------------------
# overwrite and bad input
# ----------------------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_without_flag(inputs, tmp_path):
    datalist = prepare_pairs(inputs, tmp_path, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError) as info:
        prepare_pairs(inputs, tmp_path, seed=2)
    assert str(datalist) in str(info.value) and "overwrite" in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    prepare_pairs(inputs, tmp_path, seed=2, overwrite=True)
    assert _array(tmp_path / "sub-XX01_3T.nii.gz").tobytes() != before["sub-XX01_3T.nii.gz"]
    assert json.loads((tmp_path / "preparation.json").read_text())["seed"] == 2


def test_empty_input_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(InputError) as info:
        prepare_pairs(empty, tmp_path / "out")
    assert str(empty) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_input_folder(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(InputError) as info:
        prepare_pairs(missing, tmp_path / "out")
    assert str(missing) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unknown_recipe(inputs, tmp_path):
    with pytest.raises(InputError) as info:
        prepare_pairs(inputs, tmp_path / "out", recipe="nope")
    assert "nope" in str(info.value)


def test_blank_input_volume(tmp_path):
    folder = _write_inputs(tmp_path / "in")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE), folder / "sub-XX03_T1w.nii.gz")
    with pytest.raises(InputError) as info:
        prepare_pairs(folder, tmp_path / "out")
    assert str(folder / "sub-XX03_T1w.nii.gz") in str(info.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def test_cli(inputs, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--input_dir", str(inputs), "--output_dir", str(out), "--seed", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["subject"] for e in datalist["test"]] == SUBJECTS[3:]
    assert json.loads((out / "preparation.json").read_text())["seed"] == 3
    np.testing.assert_array_equal(
        _array(out / "sub-XX01_3T.nii.gz"), prepare_and_read(inputs, tmp_path / "api", "sub-XX01", seed=3)
    )


def prepare_and_read(inputs: Path, out: Path, subject: str, seed: int) -> np.ndarray:
    prepare_pairs(inputs, out, seed=seed)
    return _array(out / f"{subject}_3T.nii.gz")


def test_cli_split_flags_as_documented(inputs, tmp_path, monkeypatch):
    """scripts/prepare_data.py documents ``--test "[sub-TELL0107]"``; run the script in-process with such flags."""
    out = tmp_path / "cli"
    argv = ["prepare_data.py", "--input_dir", str(inputs), "--output_dir", str(out), "--seed", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--test", "[sub-XX05]", "--validation", "[sub-XX01,sub-XX02]"])
    runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="__main__")
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["subject"] for e in datalist["test"]] == ["sub-XX05"]
    assert [e["subject"] for e in datalist["validation"]] == ["sub-XX01", "sub-XX02"]
    assert [e["subject"] for e in datalist["training"]] == ["sub-XX03", "sub-XX04"]


def test_merge_datalists_spans_both_recipes(realistic, seed001, tmp_path):
    merged_path = merge_datalists(tmp_path / "merged" / "recipes.json", [realistic, seed001])
    merged = json.loads(merged_path.read_text())
    assert [item["recipe"] for item in merged["validation"]] == ["realistic", "seed001"]
    assert len(merged["test"]) == 4
    # every recipe's fixed training pairs, the folders' own training subjects
    training = json.loads((realistic / "datalist.json").read_text())["training"]
    assert [(item["recipe"], item["subject"]) for item in merged["training"]] == [
        (recipe, item["subject"]) for recipe in ("realistic", "seed001") for item in training
    ]
    # paths relative to the merged datalist's folder: it is the dataset_dir
    for split in ("training", "validation", "test"):
        items = load_datalist(merged_path, split, merged_path.parent, image_keys=[], target_keys=["label"])
        assert all(Path(item["label"]).is_file() for item in items)
    with pytest.raises(InputError, match="already exists"):
        merge_datalists(merged_path, [realistic, seed001])
    # the validation subjects can train too (a final model with only the test subjects held out)
    wider_path = merge_datalists(tmp_path / "merged" / "wider.json", [realistic, seed001], train_on_validation=True)
    wider = json.loads(wider_path.read_text())
    assert wider["training"] == merged["training"] + merged["validation"]
    assert wider["validation"] == merged["validation"] and wider["test"] == merged["test"]
    with pytest.raises(InputError, match="datalist file not found"):
        merge_datalists(tmp_path / "other.json", [realistic, tmp_path / "missing"])
