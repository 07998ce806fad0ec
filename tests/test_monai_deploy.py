"""The MONAI Deploy app (apps/monai_deploy/app.py) run as a user runs it, against the bundle's own inference run.

Needs monai-deploy-app-sdk (``make monai-deploy-test`` installs it in .venv-monai-deploy); skipped elsewhere. The T1w
bundles' input is 16 axial slices of the repository's sample, so that each run takes well under a minute on two CPU
cores, where WATNet takes about four minutes on the whole 182-slice volume; vct_adc7t's inputs are the toy-size
phantom subjects of ``tiny_diffusion_dataset`` (a T1w with its ADC map, and a T1w with its diffusion series).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monai.deploy")

from conftest import REPOSITORY, checked, inference_output

APP = REPOSITORY / "apps" / "monai_deploy" / "app.py"
SAMPLE = REPOSITORY / "samples" / "mni152_t1w_3t.nii.gz"
SLICES = slice(83, 99)  # mid-brain axial slices of the 182
TOLERANCE = 1e-4  # TorchScript export against the eager network; 0.0 on CPU


@pytest.fixture(scope="module")
def sample_slab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's slices ``SLICES`` (affine shifted to match), alone in a folder: the app's input folder."""
    path = tmp_path_factory.mktemp("input") / "mni152_t1w_3t.nii.gz"
    nib.save(nib.load(SAMPLE).slicer[:, :, SLICES], path)
    return path


def run_app(input_folder: Path, output_folder: Path, *options: str) -> subprocess.CompletedProcess:
    """``python apps/monai_deploy/app.py -i <input_folder> -o <output_folder> <options>``, outside the repository."""
    command = [sys.executable, str(APP), "-i", str(input_folder), "-o", str(output_folder), *options]
    return subprocess.run(command, check=False, cwd=output_folder.parent, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    ("bundle", "options"), [("watnet", ()), ("gan_unet_t1w7t", ("-m", str(REPOSITORY / "bundles" / "gan_unet_t1w7t")))]
)
def test_app_writes_the_bundle_output(bundle: str, options: tuple[str, ...], sample_slab: Path, tmp_path: Path):
    """Float 7T volume on the input grid, as the bundle run writes it; watnet is the app's default bundle."""
    checked(run_app(sample_slab.parent, tmp_path / "app", *options))
    written = nib.load(tmp_path / "app" / "mni152_t1w_3t_7t.nii.gz")
    source = nib.load(sample_slab)
    prediction = written.get_fdata(dtype=np.float32)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    assert written.get_data_dtype() == np.float32
    assert np.isfinite(prediction).all() and prediction.min() >= 0 and prediction.max() <= 1
    assert prediction.max() > 0.5  # a brain, not a uint8-cast or empty volume
    (tmp_path / "bundle").mkdir()
    written_by_bundle = inference_output(bundle, {"image": str(sample_slab)}, tmp_path / "bundle")
    expected = nib.load(written_by_bundle).get_fdata(dtype=np.float32)
    assert np.abs(prediction - expected).max() <= TOLERANCE


def _vct_input_folder(dataset: Path, item: dict, keys: tuple[str, ...], folder: Path) -> dict:
    """Copy the files ``keys`` of the datalist ``item`` into ``folder`` (the app's input folder); return them as an
    item of absolute paths, for the bundle's own run."""
    folder.mkdir()
    for key in keys:
        shutil.copy(dataset / item[key], folder / item[key])
    return {key: str(folder / item[key]) for key in keys}


@pytest.mark.parametrize(
    ("test_index", "keys"), [(0, ("t1w", "adc")), (1, ("t1w", "dwi", "bval", "bvec"))], ids=["adc", "dwi"]
)
def test_vct_app_writes_the_bundle_output_on_the_7t_grid(
    test_index: int, keys: tuple[str, ...], tiny_diffusion_dataset: Path, tmp_path: Path
):
    """3T T1w + 3T ADC map, or 3T T1w + diffusion series (the ADC fitted by the bundle's preprocessing), in; the
    synthetic 7T ADC out, as the bundle's ``inferring`` writes it, on the 7T grid."""
    item = json.loads((tiny_diffusion_dataset / "datalist.json").read_text())["test"][test_index]
    inputs = _vct_input_folder(tiny_diffusion_dataset, item, keys, tmp_path / "input")
    checked(run_app(tmp_path / "input", tmp_path / "app", "-m", str(REPOSITORY / "bundles" / "vct_adc7t")))
    written = nib.load(tmp_path / "app" / Path(item["t1w"]).name.replace(".nii.gz", "_7t.nii.gz"))
    (tmp_path / "bundle").mkdir()
    expected = nib.load(inference_output("vct_adc7t", inputs, tmp_path / "bundle"))
    prediction = written.get_fdata(dtype=np.float32)
    assert written.shape == expected.shape != nib.load(inputs["t1w"]).shape  # the 7T grid, not the 3T one
    np.testing.assert_allclose(np.abs(np.diag(written.affine)[:3]), 1.05)
    np.testing.assert_allclose(written.affine, expected.affine, atol=1e-5)
    assert written.get_data_dtype() == np.float32
    assert np.isfinite(prediction).all() and prediction.min() >= 0 and prediction.max() <= 1
    assert np.count_nonzero(prediction) > 0.1 * prediction.size  # a brain, not an empty volume
    assert np.abs(prediction - expected.get_fdata(dtype=np.float32)).max() <= TOLERANCE


def test_vct_app_stops_on_a_missing_input_naming_the_folder(tiny_diffusion_dataset: Path, tmp_path: Path):
    item = json.loads((tiny_diffusion_dataset / "datalist.json").read_text())["test"][1]
    _vct_input_folder(tiny_diffusion_dataset, item, ("t1w", "dwi", "bval"), tmp_path / "input")
    result = run_app(tmp_path / "input", tmp_path / "app", "-m", str(REPOSITORY / "bundles" / "vct_adc7t"))
    assert result.returncode == 1
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # no traceback
    assert message == (
        f"error: {tmp_path / 'input'}: no file for input 'adc' (a name ending in _adc.nii.gz) nor for all of dwi + "
        "bval + bvec instead (missing: bvec)."
    )
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "app").glob("*.nii.gz"))
