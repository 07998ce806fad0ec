"""Diffusion-weighted series simulated from real anatomy: demo and training data for the VCT bundle.

No paired 3T/7T diffusion data are available to this project, only 7T T1w volumes. This module turns a
skull-stripped T1w volume into tissue fractions (cerebrospinal fluid, grey and white matter: the posterior
probabilities of a three-class Gaussian mixture of its brain intensities, as
:class:`synth7t.transforms.RandGMMIntensity` fits it) and simulates, on a chosen voxel grid, the diffusion-weighted
series a scanner would record:

``S(b) = sum_k f_k * S0_k * exp(-b * D_k)``, magnitude of complex Gaussian noise (Rician) with
``sigma = mean brain b=0 signal / snr``.

Diffusion is isotropic in every compartment (no fibre orientation). The ADC maps are DIPY's tensor mean
diffusivity (:func:`synth7t.transforms.fit_adc`, ``method="dti_wls"``), which reads the b-vectors: every shell is
measured along the same six balanced directions (the axes of an icosahedron, turned by a random rotation per
subject), so the tensor fitted to an isotropic voxel is isotropic and its mean diffusivity does not depend on the
rotation (with independent random directions per shell it did: 1.07e-3 to 2.98e-2 mm²/s over five seeds for a
noise-free 7T voxel of 30 % CSF).
The multi-compartment signal is not mono-exponential, so ADC maps fitted from different shells (3T: b = 1000,
2000, 3000; 7T: b = 1000, 2000 s/mm², as HCP acquired them) differ as they would in vivo. Tissue values are general
literature figures, not fitted to any scan:

- diffusivity (mm²/s, 37 °C): free water in CSF 3.0e-3; grey matter 0.80e-3; white matter 0.70e-3 (mean
  diffusivities of the adult brain, e.g. Pierpaoli et al., Radiology 1996).
- relative b=0 signal (T2-weighted, proton density x exp(-TE/T2)): CSF 1.0, grey matter 0.40, white matter 0.30.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from synth7t.prepare import input_and_output_folders, read_volumes, split_subjects, subject_seed
from synth7t.transforms import PercentileScaleIntensity, RandGMMIntensity, SimulateRealistic3T, fit_adc

__all__ = [
    "DiffusionProtocol",
    "PROTOCOL_3T",
    "PROTOCOL_7T",
    "SHELL_DIRECTIONS",
    "TISSUES",
    "prepare_diffusion_pairs",
    "simulate_dwi",
    "simulate_subject",
    "tissue_fractions",
]

TISSUES = ("csf", "grey_matter", "white_matter")
DIFFUSIVITY_MM2_S = np.array([3.0e-3, 0.80e-3, 0.70e-3])
RELATIVE_S0 = np.array([1.0, 0.40, 0.30])


_PHI = (1.0 + np.sqrt(5.0)) / 2.0
#: The six axes of an icosahedron (unit vectors, one per pair of opposite vertices), shape ``(6, 3)``: the fewest
#: directions that determine a diffusion tensor, spread so evenly that ``sum g g^T = 2 I`` under every rotation and
#: the tensor fitted to an isotropic signal is isotropic (no traceless tensor is left unchanged by the icosahedron's
#: rotations).
SHELL_DIRECTIONS = np.array(
    [[0.0, 1.0, _PHI], [0.0, -1.0, _PHI], [1.0, _PHI, 0.0], [-1.0, _PHI, 0.0], [_PHI, 0.0, 1.0], [_PHI, 0.0, -1.0]]
) / np.sqrt(1.0 + _PHI**2)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly (QR decomposition of a Gaussian matrix, signs fixed, determinant +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@dataclass(frozen=True)
class DiffusionProtocol:
    """An acquisition: voxel size (mm), b=0 volumes, shells (s/mm²), each along :data:`SHELL_DIRECTIONS`, b=0 SNR."""

    voxel_size_mm: float
    shells: Sequence[float]
    b0_volumes: int
    snr: float

    def gradient_table(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``bvals`` (N,) and unit ``bvecs`` (3, N) in FSL layout, b=0 volumes first (zero vectors), then shell after
        shell, each along :data:`SHELL_DIRECTIONS` turned by one random rotation drawn from ``seed``."""
        directions = _random_rotation(np.random.default_rng(seed)) @ SHELL_DIRECTIONS.T  # (3, 6)
        bvals = np.concatenate(
            [np.zeros(self.b0_volumes), np.repeat(np.asarray(self.shells, float), len(SHELL_DIRECTIONS))]
        )
        vectors = np.concatenate([np.zeros((3, self.b0_volumes)), np.tile(directions, len(self.shells))], axis=1)
        return bvals, vectors


# HCP-like grids and shells, six directions per shell (the fewest a tensor fit needs) to keep the files small
PROTOCOL_3T = DiffusionProtocol(voxel_size_mm=1.25, shells=(1000, 2000, 3000), b0_volumes=2, snr=15.0)
PROTOCOL_7T = DiffusionProtocol(voxel_size_mm=1.05, shells=(1000, 2000), b0_volumes=2, snr=30.0)


def tissue_fractions(t1w: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(3, *spatial)`` fractions of CSF, grey and white matter (dark to bright in T1w), summing to 1 inside the
    mask and 0 outside: posterior probabilities of a 3-class Gaussian mixture of the brain intensities."""
    inside = mask > 0
    brain_values = np.asarray(t1w, float)[inside]
    mixture = RandGMMIntensity().set_random_state(seed).fit(brain_values)
    fractions = np.zeros((len(TISSUES), *t1w.shape))
    fractions[:, inside] = mixture.predict_proba(brain_values[:, None]).T
    return fractions


def resample_fractions(
    fractions: np.ndarray, affine: np.ndarray, voxel_size_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fractions on a grid of ``voxel_size_mm`` (trilinear, MONAI ``Spacing``), and that grid's affine."""
    resampled, grid_affine = _resample(fractions, affine, voxel_size_mm)
    return np.clip(resampled, 0.0, 1.0), grid_affine


def _resample(
    array: np.ndarray | torch.Tensor, affine: np.ndarray, voxel_size_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """A channel-first ``array`` on an isotropic grid of ``voxel_size_mm`` (trilinear), and that grid's affine."""
    spacing = Spacing(pixdim=(voxel_size_mm,) * 3, mode="bilinear", padding_mode="zeros")
    resampled = spacing(MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=torch.as_tensor(affine)))
    return resampled.numpy(), np.asarray(resampled.affine, dtype=float)


def _brain(fractions: np.ndarray) -> np.ndarray:
    """The brain mask of tissue fractions: voxels that are more than half tissue."""
    return fractions.sum(axis=0) > 0.5


def simulate_dwi(fractions: np.ndarray, bvals: np.ndarray, snr: float, seed: int = 0) -> np.ndarray:
    """``(*spatial, N)`` diffusion-weighted magnitudes of the tissue mixture for ``bvals``, Rician noise at ``snr``.

    The signal is scaled so the mean brain b=0 signal is 1000 (a scanner-like range that int16 files keep)."""
    rng = np.random.default_rng(seed)
    weights = RELATIVE_S0[:, None] * np.exp(-np.outer(DIFFUSIVITY_MM2_S, bvals))  # (3, N)
    signal = np.tensordot(fractions, weights, axes=([0], [0]))  # (*spatial, N)
    brain = _brain(fractions)
    b0 = signal[..., bvals == 0].mean(axis=-1)
    scale = 1000.0 / b0[brain].mean()
    signal *= scale
    sigma = 1000.0 / snr
    noisy = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
    noisy[~brain] = 0.0
    return noisy.astype(np.float32)


def _write_fsl_table(path: Path, rows: np.ndarray) -> None:
    rows = np.atleast_2d(rows)
    path.write_text("\n".join(" ".join(f"{value:.6g}" for value in row) for row in rows) + "\n")


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, affine), path)


def simulate_subject(
    t1w: np.ndarray, affine: np.ndarray, output_dir: Path, subject: str, seed: int = 0
) -> dict[str, str]:
    """Write one subject's simulated files into ``output_dir`` and return its datalist item.

    From a skull-stripped 7T-grade T1w volume (any grid): tissue fractions; on the 3T grid (1.25 mm) a DWI series
    (``<subject>_3T_dwi.nii.gz``, int16, with ``.bval``/``.bvec``) and a 3T-like T1w (the realistic recipe of
    :class:`synth7t.transforms.SimulateRealistic3T` at 1.25 mm, then resampled to that grid); on the 7T grid
    (1.05 mm) a DWI series whose ADC map, fitted with :func:`synth7t.transforms.fit_adc` as the bundle fits the 3T
    one by default (DIPY's tensor mean diffusivity), is the target (``<subject>_7T_ADC.nii.gz``, mm²/s), with its
    brain mask.
    """
    mask = t1w != 0
    scaled = np.asarray(
        PercentileScaleIntensity(0.0, 99.0)(torch.as_tensor(t1w[None], dtype=torch.float32), mask[None])[0]
    )
    fractions = tissue_fractions(scaled, mask, seed)
    files = {
        "t1w": f"{subject}_3T_T1w.nii.gz",
        "dwi": f"{subject}_3T_dwi.nii.gz",
        "bval": f"{subject}_3T_dwi.bval",
        "bvec": f"{subject}_3T_dwi.bvec",
        "label": f"{subject}_7T_ADC.nii.gz",
        "mask": f"{subject}_7T_mask.nii.gz",
    }
    # 3T: the diffusion series the bundle computes its input ADC from
    grid_fractions, grid_affine = resample_fractions(fractions, affine, PROTOCOL_3T.voxel_size_mm)
    bvals, bvecs = PROTOCOL_3T.gradient_table(seed)
    dwi = simulate_dwi(grid_fractions, bvals, PROTOCOL_3T.snr, seed)
    _save(np.round(dwi).astype(np.int16), grid_affine, output_dir / files["dwi"])
    _write_fsl_table(output_dir / files["bval"], bvals)
    _write_fsl_table(output_dir / files["bvec"], bvecs)
    # 7T: the target ADC map and its brain mask
    grid_fractions, grid_affine = resample_fractions(fractions, affine, PROTOCOL_7T.voxel_size_mm)
    bvals, bvecs = PROTOCOL_7T.gradient_table(seed)
    dwi = simulate_dwi(grid_fractions, bvals, PROTOCOL_7T.snr, seed + 1)
    brain = _brain(grid_fractions)
    adc = fit_adc(np.moveaxis(dwi, -1, 0), bvals, brain, bvecs=bvecs).numpy().astype(np.float32)
    _save(adc, grid_affine, output_dir / files["label"])
    _save(brain.astype(np.uint8), grid_affine, output_dir / files["mask"])
    # 3T T1w: the realistic recipe at 1.25 mm, on the 3T grid
    simulator = SimulateRealistic3T(
        target_voxel_size_mm=PROTOCOL_3T.voxel_size_mm, voxel_size=tuple(np.abs(np.diag(affine)[:3]))
    )
    simulator.set_random_state(seed)
    t1w_3t, t1w_affine = _resample(
        simulator(torch.as_tensor(scaled[None]), torch.as_tensor(mask[None])), affine, PROTOCOL_3T.voxel_size_mm
    )
    _save(t1w_3t[0].astype(np.float32), t1w_affine, output_dir / files["t1w"])
    return {**files, "subject": subject}


def prepare_diffusion_pairs(
    input_dir: str | Path,
    output_dir: str | Path,
    seed: int = 0,
    validation: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    n_validation: int = 1,
    n_test: int = 2,
    overwrite: bool = False,
) -> Path:
    """Simulate every T1w volume of ``input_dir`` with :func:`simulate_subject` into ``output_dir`` and write
    ``datalist.json`` (keys ``t1w``, ``dwi``, ``bval``, ``bvec``, ``label``, ``mask``; a subject-level split, see
    :func:`synth7t.prepare.split_subjects`) and ``preparation.json``. Returns the datalist path."""
    inputs, output = input_and_output_folders(input_dir, output_dir, overwrite)
    datalist_path = output / "datalist.json"
    images, volumes = read_volumes(inputs)
    split = split_subjects(list(images), validation, test, n_validation, n_test)
    output.mkdir(parents=True, exist_ok=True)
    entries = {
        subject: simulate_subject(
            volumes[subject].astype(np.float32), image.affine, output, subject, subject_seed(seed, subject)
        )
        for subject, image in images.items()
    }
    datalist = {name: [entries[s] for s in subjects] for name, subjects in split.items()}
    provenance = {
        "simulation": "synth7t.diffusion_phantom",
        "seed": seed,
        "protocols": {"3T": asdict(PROTOCOL_3T), "7T": asdict(PROTOCOL_7T)},
        "inputs": [str(p.resolve()) for p in inputs],
        "split": split,
    }
    (output / "preparation.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
    return datalist_path
