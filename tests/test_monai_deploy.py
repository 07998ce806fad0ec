"""The MONAI Deploy app (apps/monai_deploy/app.py) run as a user runs it, against the bundle's own inference run.

Needs monai-deploy-app-sdk (``make monai-deploy-test`` installs it in .venv-monai-deploy); skipped elsewhere. The
input is 16 axial slices of the repository's sample, so that each run takes well under a minute on two CPU cores,
where WATNet takes about four minutes on the whole 182-slice volume.
"""

from __future__ import annotations

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
