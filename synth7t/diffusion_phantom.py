"""Diffusion-weighted series simulated from real anatomy: demo and training data for the VCT bundle.

No paired 3T/7T diffusion data are available to this project, only 7T T1w volumes. This module turns a
skull-stripped T1w volume into tissue fractions (cerebrospinal fluid, grey and white matter: the posterior
probabilities of a three-class Gaussian mixture of its brain intensities, as
:class:`synth7t.transforms.RandGMMIntensity` fits it) and simulates, on a chosen voxel grid, the diffusion-weighted
series a scanner would record:

``S(b) = sum_k f_k * S0_k * exp(-b * D_k)``, magnitude of complex Gaussian noise (Rician) with
``sigma = mean brain b=0 signal / snr``.

Diffusion is isotropic in every compartment (no fibre orientation), so the b-vectors only label the volumes; the
multi-compartment signal is not mono-exponential, so ADC maps fitted from different shells (3T: b = 1000, 2000,
3000; 7T: b = 1000, 2000 s/mm², as HCP acquired them) differ as they would in vivo. Tissue values are general
literature figures, not fitted to any scan:

- diffusivity (mm²/s, 37 °C): free water in CSF 3.0e-3; grey matter 0.80e-3; white matter 0.70e-3 (mean
  diffusivities of the adult brain, e.g. Pierpaoli et al., Radiology 1996).
- relative b=0 signal (T2-weighted, proton density x exp(-TE/T2)): CSF 1.0, grey matter 0.40, white matter 0.30.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from synth7t.transforms import RandGMMIntensity

__all__ = ["DiffusionProtocol", "PROTOCOL_3T", "PROTOCOL_7T", "TISSUES", "simulate_dwi", "tissue_fractions"]

TISSUES = ("csf", "grey_matter", "white_matter")
DIFFUSIVITY_MM2_S = np.array([3.0e-3, 0.80e-3, 0.70e-3])
RELATIVE_S0 = np.array([1.0, 0.40, 0.30])


@dataclass(frozen=True)
class DiffusionProtocol:
    """An acquisition: voxel size (mm), b=0 volumes, shells (s/mm²) with their direction count, and b=0 SNR."""

    voxel_size_mm: float
    shells: Sequence[float]
    directions_per_shell: int
    b0_volumes: int
    snr: float

    def gradient_table(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``bvals`` (N,) and unit ``bvecs`` (3, N) in FSL layout; directions random on the sphere, b=0 first."""
        rng = np.random.default_rng(seed)
        bvals = np.concatenate(
            [np.zeros(self.b0_volumes), np.repeat(np.asarray(self.shells, float), self.directions_per_shell)]
        )
        vectors = rng.normal(size=(3, bvals.size))
        vectors /= np.linalg.norm(vectors, axis=0, keepdims=True)
        vectors[:, : self.b0_volumes] = 0.0
        return bvals, vectors


# HCP-like geometry and shells, with few directions (diffusion is isotropic here) to keep the files small
PROTOCOL_3T = DiffusionProtocol(
    voxel_size_mm=1.25, shells=(1000, 2000, 3000), directions_per_shell=6, b0_volumes=2, snr=15.0
)
PROTOCOL_7T = DiffusionProtocol(voxel_size_mm=1.05, shells=(1000, 2000), directions_per_shell=6, b0_volumes=2, snr=30.0)


def tissue_fractions(t1w: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(3, *spatial)`` fractions of CSF, grey and white matter (dark to bright in T1w), summing to 1 inside the
    mask and 0 outside: posterior probabilities of a 3-class Gaussian mixture of the brain intensities."""
    inside = mask > 0
    mixture = RandGMMIntensity().set_random_state(seed).fit(np.asarray(t1w, float)[inside])
    fractions = np.zeros((len(TISSUES), *t1w.shape))
    fractions[:, inside] = mixture.predict_proba(np.asarray(t1w, float)[inside][:, None]).T
    return fractions


def resample_fractions(
    fractions: np.ndarray, affine: np.ndarray, voxel_size_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fractions on a grid of ``voxel_size_mm`` (trilinear, MONAI ``Spacing``), and that grid's affine."""
    spacing = Spacing(pixdim=(voxel_size_mm,) * 3, mode="bilinear", padding_mode="zeros")
    resampled = spacing(MetaTensor(torch.as_tensor(fractions, dtype=torch.float32), affine=torch.as_tensor(affine)))
    return np.clip(resampled.numpy(), 0.0, 1.0), np.asarray(resampled.affine, dtype=float)


def simulate_dwi(fractions: np.ndarray, bvals: np.ndarray, snr: float, seed: int = 0) -> np.ndarray:
    """``(*spatial, N)`` diffusion-weighted magnitudes of the tissue mixture for ``bvals``, Rician noise at ``snr``.

    The signal is scaled so the mean brain b=0 signal is 1000 (a scanner-like range that int16 files keep)."""
    rng = np.random.default_rng(seed)
    weights = RELATIVE_S0[:, None] * np.exp(-np.outer(DIFFUSIVITY_MM2_S, bvals))  # (3, N)
    signal = np.tensordot(fractions, weights, axes=([0], [0]))  # (*spatial, N)
    brain = fractions.sum(axis=0) > 0.5
    b0 = signal[..., bvals == 0].mean(axis=-1)
    scale = 1000.0 / b0[brain].mean()
    signal *= scale
    sigma = 1000.0 / snr
    noisy = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
    noisy[~brain] = 0.0
    return noisy.astype(np.float32)
