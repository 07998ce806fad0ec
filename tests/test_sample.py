"""The shipped demo sample is exactly what scripts/make_sample.py builds from nilearn's MNI152 template."""

import runpy

import nibabel as nib
import numpy as np

from conftest import REPOSITORY


def test_make_sample_rebuilds_the_shipped_sample(tmp_path):
    make_sample = runpy.run_path(str(REPOSITORY / "scripts" / "make_sample.py"))["make_sample"]
    make_sample(output_dir=str(tmp_path))
    for name in ("mni152_t1w_3t", "mni152_t1w_7t", "mni152_brain_mask"):
        shipped = nib.load(REPOSITORY / "samples" / f"{name}.nii.gz")
        rebuilt = nib.load(tmp_path / f"{name}.nii.gz")
        # equal up to one step of the int16 storage (FFT rounding may differ between CPUs)
        step = float(shipped.dataobj.slope) if name == "mni152_t1w_3t" else 0.0
        np.testing.assert_allclose(rebuilt.get_fdata(), shipped.get_fdata(), rtol=0, atol=step * 1.01)
        np.testing.assert_array_equal(rebuilt.affine, shipped.affine)
    mask = np.asanyarray(nib.load(tmp_path / "mni152_brain_mask.nii.gz").dataobj) > 0
    image = nib.load(tmp_path / "mni152_t1w_3t.nii.gz").get_fdata()
    assert np.all(image[~mask] == 0) and image[mask].std() > 0
