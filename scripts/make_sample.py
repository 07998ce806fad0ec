"""Rebuild the demo sample in `samples/` from the MNI152 2009 template that the nilearn package carries.

    python scripts/make_sample.py [--output_dir samples] [--seed 2009]

The template (ICBM 2009a nonlinear symmetric T1w, 1 mm, brain-extracted; copyright notice in
samples/README.md) stands in for a 7T volume: it is resampled onto the 182 x 218 x 182 MNI grid of the TELL
training volumes (an exact crop and flip, the grids differ by whole voxels), scaled like the training targets and
degraded with the realistic 3T recipe, exactly as `scripts/prepare_data.py` prepares training pairs.
"""

from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from nilearn.datasets import load_mni152_template

from synth7t.prepare import simulate_pair

TELL_SHAPE = (182, 218, 182)
TELL_AFFINE = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 91], [0, 0, 1.0, -72], [0, 0, 0, 1]])


def make_sample(output_dir: str = "samples", seed: int = 2009) -> None:
    """Write ``mni152_t1w_3t.nii.gz`` (simulated 3T), ``mni152_t1w_7t.nii.gz`` (reference) and
    ``mni152_brain_mask.nii.gz`` into ``output_dir``."""
    template = load_mni152_template(resolution=1)
    on_grid = resample_from_to(template, (TELL_SHAPE, TELL_AFFINE), order=0)
    raw = np.round(np.asarray(on_grid.dataobj) * 255).astype(np.uint8)  # nilearn scales the uint8 template to [0, 1]
    simulated, _ = simulate_pair(raw, "realistic", seed)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for name, array, dtype in (
        ("mni152_t1w_3t", simulated, np.int16),  # stored with a scale factor: 1/32767 of the range, ~3e-5
        ("mni152_t1w_7t", raw, np.uint8),  # the template's own 8-bit values; workflows normalise both images
        ("mni152_brain_mask", (raw > 0).astype(np.uint8), np.uint8),
    ):
        image = nib.Nifti1Image(array, TELL_AFFINE)
        image.set_data_dtype(dtype)
        image.header["descrip"] = b"synth7t demo sample from ICBM152 2009a"
        nib.save(image, output / f"{name}.nii.gz")
        print(output / f"{name}.nii.gz")


if __name__ == "__main__":
    fire.Fire(make_sample)
