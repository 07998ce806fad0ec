"""Tests of synth7t.transforms.diffusion: FSL b-value files, series checks, ADC fits (vs DIPY), MONAI transforms."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from synth7t.errors import InputError
from synth7t.transforms.diffusion import (
    DTI_MIN_SIGNAL,
    SIGNAL_FLOOR_FRACTION,
    ComputeADC,
    ComputeADCd,
    check_diffusion_series,
    fit_adc,
    group_shells,
    read_fsl_bvals,
    read_fsl_bvecs,
)

# 6 antipodal pairs of icosahedron vertices: a balanced scheme, sum_i g_i g_i^T = 2 I exactly.
_PHI = (1 + 5**0.5) / 2
ICOSA6 = np.array(
    [[0, 1, _PHI], [0, 1, -_PHI], [1, _PHI, 0], [1, -_PHI, 0], [_PHI, 0, 1], [-_PHI, 0, 1]], dtype=np.float64
)
ICOSA6 /= np.linalg.norm(ICOSA6, axis=1, keepdims=True)

shell_fit = partial(fit_adc, method="shells")  # the mono-exponential fit of the direction-averaged shells


def _isotropic_series(bvals: np.ndarray, spatial: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Noise-free S0 * exp(-b * D) with a known D per voxel; returns ((N, *spatial) float64 series, D)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.2e-3, 3.0e-3, size=spatial)
    s0 = rng.uniform(100.0, 2000.0, size=spatial)
    sig = s0[None] * np.exp(-np.asarray(bvals, dtype=np.float64).reshape((-1,) + (1,) * len(spatial)) * d[None])
    return torch.from_numpy(sig), d


# ----------------------------------------------------------------------------------------------------------------
# DIPY cross-checks: DIPY's bundled real data and a simulated noisy multi-shell series
# ----------------------------------------------------------------------------------------------------------------


def _dipy_bundled(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Path]]:
    """A series bundled inside the installed DIPY package (never fetched): data (x, y, z, N), bvals, bvecs (3, N)."""
    dipy_data = pytest.importorskip("dipy.data")

    def no_network(*args, **kwargs):
        raise AssertionError("get_fnames tried to use the network")

    with pytest.MonkeyPatch.context() as mp:  # the files must be bundled, never fetched
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        paths = [Path(p) for p in dipy_data.get_fnames(name=name)]
    package_dir = Path(dipy_data.__file__).resolve().parent
    for p in paths:
        assert p.resolve().is_relative_to(package_dir) and p.is_file()
    nii, fbval, fbvec = paths
    data = np.asarray(nib.load(nii).dataobj)
    bvals, bvecs = read_fsl_bvals(fbval), read_fsl_bvecs(fbvec)
    check_diffusion_series(
        data.shape[-1], bvals, bvecs, tensor_fit=True, dwi_name=str(nii), bval_name=str(fbval), bvec_name=str(fbvec)
    )
    return data, bvals, bvecs, paths


def _dipy_tensor_fit(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, **kwargs):
    """DIPY's ``TensorModel`` fit (default WLS unless ``fit_method`` is given) of ``data`` (..., N)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst import dti

    gtab = gradient_table(bvals, bvecs=np.nan_to_num(np.asarray(bvecs).T))
    return dti.TensorModel(gtab, **kwargs).fit(data)


@pytest.fixture(scope="module")
def small_64d():
    """DIPY's bundled ``small_64D`` (10x10x10 voxels, 1 b=0 + 64 directions at b ~ 987..1003, FSL nii/bval/bvec with
    "nan nan nan" for the b=0 vector) and DIPY's OLS tensor fit."""
    data, bvals, bvecs, _ = _dipy_bundled("small_64D")
    data = data.astype(np.float64)
    md = _dipy_tensor_fit(data, bvals, bvecs, fit_method="LS").md  # "LS" = ordinary least squares of ln S
    s0 = data[..., 0]
    mask = (s0 > np.median(s0)) & np.isfinite(md) & (md > 0)  # brightest half of the cube: 494 voxels
    return {"data": data, "bvals": bvals, "bvecs": bvecs, "md": md, "mask": mask}


@pytest.mark.parametrize("name", ["small_64D", "small_101D"])
def test_dti_wls_is_dipy_mean_diffusivity_on_dipy_real_data(name):
    """The default fit is DIPY's default ``TensorModel(gtab).fit(data).md`` on the real series DIPY ships.

    small_64D: 1000 voxels, int16, one shell of 64 directions, a ``nan`` b=0 vector; small_101D: 600 voxels, uint16,
    101 directions on a grid of b-values from 20 to 4000 (multi-shell, several b <= b0_threshold volumes with
    directions). Measured (dipy 1.12.1): median relative difference 9e-8 / 5e-8, max 8.7e-6 / 3.5e-7 (ln S in float32,
    as DIPY takes it for integer data cast to float32 here). Tolerances: median 1e-6, max 1e-4.
    """
    data, bvals, bvecs, _ = _dipy_bundled(name)
    md = _dipy_tensor_fit(data.astype(np.float32), bvals, bvecs).md
    ours = fit_adc(torch.from_numpy(np.moveaxis(data, -1, 0)), bvals, bvecs=bvecs).numpy()
    assert ours.shape == md.shape and (md > 0).all()
    rel = np.abs(ours - md) / md
    assert np.median(rel) < 1e-6
    assert rel.max() < 1e-4


def _tensor_series(
    bvals: np.ndarray, bvecs: np.ndarray, n_voxels: int, seed: int, snr: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, n_voxels)`` signals of random tensors (eigenvalues 0.1e-3 .. 3e-3 mm^2/s, a tenth of the voxels
    isotropic free water), S0 200 .. 2000, Rician noise of sigma 1000 / snr when ``snr`` is given; and the true MDs."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(n_voxels, 3, 3)))
    evals = rng.uniform(0.1e-3, 3.0e-3, size=(n_voxels, 3))
    evals[: n_voxels // 10] = 3.0e-3
    tensors = np.einsum("nij,nj,nkj->nik", rotation, evals, rotation)
    quad = np.einsum("vi,nij,vj->vn", np.nan_to_num(bvecs.T), tensors, np.nan_to_num(bvecs.T))  # (N, n_voxels)
    signal = rng.uniform(200.0, 2000.0, size=n_voxels) * np.exp(-bvals[:, None] * quad)
    if snr is not None:
        sigma = 1000.0 / snr
        signal = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
    return signal, evals.mean(1)


def _random_protocol(shells: tuple[float, ...], directions: int, b0: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """bvals (N,) and unit bvecs (3, N), b=0 volumes first with zero vectors, random directions per shell."""
    rng = np.random.default_rng(seed)
    bvals = np.concatenate([np.zeros(b0), np.repeat(np.asarray(shells, dtype=float), directions)])
    bvecs = rng.normal(size=(3, bvals.size))
    bvecs /= np.linalg.norm(bvecs, axis=0)
    bvecs[:, :b0] = 0.0
    return bvals, bvecs


@pytest.mark.parametrize("shells, directions", [((1000.0, 2000.0, 3000.0), 20), ((1000.0, 2000.0), 32)])
def test_dti_wls_matches_dipy_on_noisy_multishell_series(shells, directions):
    """3000 noisy voxels (SNR 8, float32, a few zero samples) on a three-shell and a two-shell protocol: the default
    fit equals DIPY's default ``TensorModel`` MD, including voxels whose eigenvalues DIPY clips and signals it floors.

    Measured: median relative difference 6e-8, max 3e-6 (float32 ln S and weights). Tolerances: median 1e-6, max 1e-4.
    """
    bvals, bvecs = _random_protocol(shells, directions, b0=3, seed=10)
    signal, _ = _tensor_series(bvals, bvecs, 3000, seed=11, snr=8.0)
    signal[np.random.default_rng(12).random(signal.shape) < 0.002] = 0.0  # DIPY floors them at min_signal
    series = signal.astype(np.float32).reshape(len(bvals), 30, 100)
    fit = _dipy_tensor_fit(np.moveaxis(series, 0, -1), bvals, bvecs)
    floor = 1e-6 / _dti_b_matrix(bvals, bvecs).max()  # DIPY's eigenvalue floor: 1e-6 / -design_matrix.min()
    assert (fit.evals.min(-1) <= floor * (1 + 1e-9)).sum() > 20  # the clipping path is exercised
    ours = fit_adc(torch.from_numpy(series), bvals, bvecs=bvecs).numpy()
    rel = np.abs(ours - fit.md) / fit.md
    assert np.median(rel) < 1e-6
    assert rel.max() < 1e-4


def _dti_b_matrix(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """DIPY's B-matrix entries b gx^2, 2 b gx gy, ... (and the constant 1) of the design."""
    g = np.nan_to_num(bvecs.T)
    x, y, z = g.T
    products = (x * x, 2 * x * y, y * y, 2 * x * z, 2 * y * z, z * z)
    return np.stack([bvals * c for c in products] + [np.ones_like(bvals)], axis=1)


def test_dti_wls_recovers_noise_free_tensors_and_accepts_either_bvec_layout():
    """Noise-free anisotropic tensors: MD = trace / 3 exactly, whether the b-vectors come as (3, N) or (N, 3)."""
    bvals, bvecs = _random_protocol((700.0, 1500.0), 6, b0=2, seed=13)
    signal, md = _tensor_series(bvals, bvecs, 60, seed=14)
    dwi = torch.from_numpy(signal).reshape(len(bvals), 6, 10)
    adc = fit_adc(dwi, bvals, bvecs=bvecs)
    np.testing.assert_allclose(adc.numpy().reshape(-1), md, rtol=1e-6)
    np.testing.assert_array_equal(fit_adc(dwi, bvals, bvecs=torch.from_numpy(bvecs.T.copy())).numpy(), adc.numpy())


def test_dti_wls_b0_volumes_with_directions_enter_with_their_b_value():
    """As DIPY's gradient table does: a b <= b0_threshold volume with a unit vector keeps its b (it adds b g g^T to
    the design), one with a zero or nan vector counts as b = 0; both count as b=0 volumes for the mask."""
    bvals, bvecs = _random_protocol((1000.0,), 12, b0=3, seed=15)
    bvals[:3] = [0.0, 40.0, 40.0]
    bvecs[:, 1] = [0.0, 0.6, 0.8]  # b=40 with a direction
    bvecs[:, 2] = np.nan  # b=40 without one: treated as b = 0
    signal, _ = _tensor_series(bvals, bvecs, 200, seed=16, snr=20.0)
    series = signal.reshape(len(bvals), 20, 10)
    md = _dipy_tensor_fit(np.moveaxis(series, 0, -1), bvals, bvecs).md
    np.testing.assert_allclose(fit_adc(torch.from_numpy(series), bvals, bvecs=bvecs).numpy(), md, rtol=1e-5)


def _imbalance_bound(bvals: np.ndarray, bvecs: np.ndarray) -> float:
    """Relative bound 3 * max|eig(T - I/3)|, T = sum_i b_i g_i g_i^T / sum_i b_i over the diffusion-weighted volumes.

    The geometric direction average estimates tr(T D); for a tensor D >= 0, |tr((T - I/3) D)| <= max|eig(T - I/3)| tr D,
    so |ADC - MD| / MD <= 3 * max|eig(T - I/3)| (0 for a perfectly balanced scheme).
    """
    dw = bvals > 50
    g, b = bvecs[:, dw], bvals[dw]
    t = (g * b) @ g.T / b.sum()
    return float(3 * np.abs(np.linalg.eigvalsh(t - np.eye(3) / 3)).max())


def test_geometric_fit_matches_dipy_mean_diffusivity(small_64d):
    """The direction-averaged fit of a balanced shell matches the DTI mean diffusivity DIPY computes.

    Measured on the 494 voxels of the mask (dipy 1.12.1): median |ADC - MD| / MD = 0.20 %, 95th percentile 1.9 %,
    max 3.4 %. The 64 directions are only nearly balanced: the eigenvalues of T = sum b g g^T / sum b are 0.320, 0.339,
    0.341 instead of 1/3 each, so anisotropic voxels may differ by up to 3 * max|eig(T - I/3)| = 4.1 % (the bound
    below); the b-values also spread over 987..1003 s/mm^2 and DIPY clips negative eigenvalues. Tolerances: median
    0.5 %, 95th percentile 2.5 %, max = the imbalance bound.
    """
    d = small_64d
    dwi = torch.from_numpy(np.moveaxis(d["data"], -1, 0))
    adc = shell_fit(dwi, d["bvals"], average="geometric").numpy()
    m, md = d["mask"], d["md"]
    assert m.sum() > 400
    rel = np.abs(adc[m] - md[m]) / md[m]
    assert np.median(rel) < 5e-3
    assert np.percentile(rel, 95) < 2.5e-2
    bound = _imbalance_bound(d["bvals"], d["bvecs"])
    assert 0.03 < bound < 0.05
    assert rel.max() < bound


def test_geometric_fit_is_the_direction_average_of_dipy_ols_tensor(small_64d):
    """With one b per shell, the fit equals tr(T D_OLS) of DIPY's unclipped OLS tensor exactly (T as above).

    The geometric average is a linear functional of ln S lying in the column space of the DTI design matrix, so it
    equals the same functional of the OLS-fitted values; this pins the remaining differences of the test above on the
    direction imbalance alone. Measured: max relative difference 6e-8 (float32 output).
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst import dti

    d = small_64d
    dw = d["bvals"] > 50
    bvals = np.where(dw, d["bvals"][dw].mean(), 0.0)
    g = np.nan_to_num(d["bvecs"])
    data = d["data"]
    positive = (data > 0).all(-1) & d["mask"]
    design = dti.design_matrix(gradient_table(bvals, bvecs=g.T))
    lower, _ = dti.ols_fit_tensor(design, data[positive], return_lower_triangular=True)
    dxx, dxy, dyy, dxz, dyz, dzz = lower[:, :6].T
    t = g[:, dw] @ g[:, dw].T / dw.sum()
    expected = t[0, 0] * dxx + t[1, 1] * dyy + t[2, 2] * dzz + 2 * (t[0, 1] * dxy + t[0, 2] * dxz + t[1, 2] * dyz)
    adc = shell_fit(torch.from_numpy(np.moveaxis(data, -1, 0)), bvals).numpy()[positive]
    np.testing.assert_allclose(adc, expected, rtol=1e-6)


def test_arithmetic_average_below_geometric_and_near_md(small_64d):
    """Powder average: ADC <= geometric (Jensen) in every voxel, and a few % below MD.

    Measured relative to MD on the mask: median -4.7 %, 5th percentile -15 %, min -26 % (the powder average
    underestimates the ADC of anisotropic voxels). Tolerances: median in (-8 %, -2 %), 95th percentile of |.| < 20 %,
    max |.| < 30 %.
    """
    d = small_64d
    dwi = torch.from_numpy(np.moveaxis(d["data"], -1, 0))
    geo = shell_fit(dwi, d["bvals"], average="geometric").numpy()
    ari = shell_fit(dwi, d["bvals"], average="arithmetic").numpy()
    assert (ari <= geo * (1 + 1e-6)).all()
    m, md = d["mask"], d["md"]
    assert (ari[m] < geo[m]).all()
    rel = (ari[m] - md[m]) / md[m]
    assert -0.08 < np.median(rel) < -0.02
    assert np.percentile(np.abs(rel), 95) < 0.20
    assert np.abs(rel).max() < 0.30


# ----------------------------------------------------------------------------------------------------------------
# Synthetic exact fits
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["geometric", "arithmetic"])
@pytest.mark.parametrize("spatial", [(4, 5, 6), (7, 3)])
def test_recovers_known_d_several_shells(average, spatial):
    bvals = np.array([0, 0] + [1000] * 6 + [2000] * 6 + [3000] * 6, dtype=float)
    dwi, d = _isotropic_series(bvals, spatial)
    adc = shell_fit(dwi, bvals, average=average)
    assert adc.shape == spatial and adc.dtype == torch.float32
    np.testing.assert_allclose(adc.numpy(), d, rtol=1e-5)


def test_balanced_tensor_gives_mean_diffusivity_on_every_shell():
    """Anisotropic tensors sampled on a balanced scheme (icosahedron): geometric fit = trace / 3 exactly."""
    rng = np.random.default_rng(1)
    n_vox = 50
    q, _ = np.linalg.qr(rng.normal(size=(n_vox, 3, 3)))
    evals = rng.uniform(0.1e-3, 2.5e-3, size=(n_vox, 3))
    tensors = np.einsum("nij,nj,nkj->nik", q, evals, q)
    bvals = np.array([0.0] * 2 + [700.0] * 6 + [1500.0] * 6)
    dirs = np.concatenate([np.zeros((2, 3)), ICOSA6, ICOSA6])
    quad = np.einsum("vi,nij,vj->vn", dirs, tensors, dirs)  # (N, n_vox)
    sig = 1000.0 * np.exp(-bvals[:, None] * quad)
    adc = shell_fit(torch.from_numpy(sig).reshape(len(bvals), 5, 10), bvals)
    np.testing.assert_allclose(adc.numpy().reshape(-1), evals.mean(1), rtol=1e-5)
    powder = shell_fit(torch.from_numpy(sig).reshape(len(bvals), 5, 10), bvals, average="arithmetic")
    assert (powder.numpy().reshape(-1) < evals.mean(1)).all()


def test_b0_group_below_threshold_and_close_bvals_form_one_shell():
    bvals = np.array([5, 0, 995, 5, 1000, 1005, 2010, 1990], dtype=float)
    groups = group_shells(bvals, b0_threshold=50, shell_tolerance=100)
    assert [g[1].tolist() for g in groups] == [[0, 1, 3], [2, 4, 5], [6, 7]]
    np.testing.assert_allclose([g[0] for g in groups], [10 / 3, 1000, 2000])
    assert len(group_shells(bvals, shell_tolerance=4)) == 6  # b0 group + 5 single-volume shells
    assert len(group_shells(bvals, shell_tolerance=5)) == 4  # 995 / 1000 / 1005 chained, 1990 / 2010 apart

    dwi, d = _isotropic_series(bvals, (3, 4, 5), seed=2)
    np.testing.assert_allclose(shell_fit(dwi, bvals).numpy(), d, rtol=1e-5)

    # with noise, grouping matters: one point per group -> slope between (10/3, mean ln b0) and (1000, mean ln 1000s)
    bvals = np.array([0, 5, 995, 1000, 1005], dtype=float)
    noisy = torch.from_numpy(np.random.default_rng(3).uniform(200, 1000, size=(5, 4, 4)))
    ln = torch.log(noisy)
    expected = -(ln[2:].mean(0) - ln[:2].mean(0)) / (1000 - 2.5)
    adc = shell_fit(noisy, bvals)
    np.testing.assert_allclose(adc.numpy(), expected.clamp(min=0).numpy(), rtol=1e-5)
    assert not torch.allclose(adc, shell_fit(noisy, bvals, shell_tolerance=1.0))


def test_integer_and_float32_input():
    bvals = np.array([0, 1000, 1000, 2000], dtype=float)
    dwi, _ = _isotropic_series(bvals, (4, 4, 4))
    ints = torch.round(dwi * 10).to(torch.int16)
    np.testing.assert_allclose(shell_fit(ints, bvals).numpy(), shell_fit(ints.double(), bvals).numpy(), rtol=1e-6)
    np.testing.assert_allclose(shell_fit(dwi.float(), bvals).numpy(), shell_fit(dwi, bvals).numpy(), rtol=1e-5)
    np.testing.assert_allclose(shell_fit(dwi.numpy(), bvals).numpy(), shell_fit(dwi, bvals).numpy())
    bvecs = np.concatenate([np.zeros((1, 3)), ICOSA6[:3]]).T
    np.testing.assert_allclose(
        fit_adc(ints, bvals, bvecs=bvecs, method="scanner").numpy(),
        fit_adc(ints.double(), bvals, bvecs=bvecs, method="scanner").numpy(),
        rtol=1e-6,
    )


def test_scanner_is_the_two_point_adc_of_one_shell():
    """``ln(mean ln S0 - mean ln S_b) / b`` with one shell: the lowest by default, the one nearest ``b_value``."""
    bvals = np.array([0, 5, 1000, 1000, 1000, 2000, 2000, 2000, 3010, 2990], dtype=float)
    noisy = torch.from_numpy(np.random.default_rng(17).uniform(100, 1000, size=(len(bvals), 4, 5)))
    ln = torch.log(noisy)
    for b_value, volumes, b in [(None, [2, 3, 4], 1000.0), (2050.0, [5, 6, 7], 2000.0), (3000, [8, 9], 3000.0)]:
        expected = ((ln[:2].mean(0) - ln[volumes].mean(0)) / (b - 2.5)).clamp(min=0)
        adc = fit_adc(noisy, bvals, method="scanner", b_value=b_value)
        np.testing.assert_allclose(adc.numpy(), expected.numpy(), rtol=1e-6)
    single = bvals[:5]  # one shell: the scanner ADC is the shells fit
    np.testing.assert_array_equal(
        fit_adc(noisy[:5], single, method="scanner").numpy(), shell_fit(noisy[:5], single).numpy()
    )
    with pytest.raises(InputError, match=r"b_value=1500 matches no shell of the series \(shells at b = \[1000.0, 2000"):
        fit_adc(noisy, bvals, method="scanner", b_value=1500)


# ----------------------------------------------------------------------------------------------------------------
# Robustness and mask
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["geometric", "arithmetic"])
def test_invalid_values_give_finite_nonnegative_output(average):
    bvals = np.array([0, 0, 1000, 1000, 1000, 2500], dtype=float)  # unequal spacing: no group has zero OLS weight
    dwi, d = _isotropic_series(bvals, (6, 6, 6), seed=4)
    dwi = dwi.float()
    dwi[0, 0, 0, 0] = 0.0  # both b0 zero -> invalid
    dwi[1, 0, 0, 0] = 0.0
    dwi[0, 0, 0, 1] = -5.0  # negative mean b0 -> invalid
    dwi[1, 0, 0, 1] = -5.0
    dwi[0, 0, 0, 2] = float("nan")  # NaN b0 -> invalid
    dwi[1, 0, 0, 3] = float("inf")  # inf b0 -> invalid
    dwi[0, 0, 0, 4] = -float("inf")  # -inf b0 -> invalid
    dwi[1, 0, 0, 5] = 0.0  # one of two b0 zero: mean b0 > 0, valid (that b0 is floored; result finite, >= 0)
    dwi[2, 1, 1, 1] = 0.0  # diffusion-weighted zero -> floor
    dwi[3, 1, 1, 2] = -3.0
    dwi[4, 1, 1, 3] = float("nan")
    dwi[5, 1, 1, 4] = float("inf")
    dwi[2:, 1, 1, 5] = 0.0  # all diffusion-weighted volumes zero
    adc = shell_fit(dwi, bvals, average=average)
    assert torch.isfinite(adc).all() and (adc >= 0).all()
    assert (adc[0, 0, :5] == 0).all()
    # corrupted but valid voxels: the numpy reference with the bad values replaced by the floor
    for x, y, z in [(1, 1, 1), (1, 1, 2), (1, 1, 3), (1, 1, 4), (1, 1, 5), (0, 0, 5)]:
        expected = _reference_adc(dwi[:, x, y, z].double().numpy(), bvals, average)
        assert adc[x, y, z].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert adc[x, y, z].item() != pytest.approx(d[x, y, z], rel=1e-3)  # the bad values did matter
    # all DW signals at the floor: ln(S0 / floor) = 13.8 in every shell -> large but finite ADC
    assert adc[1, 1, 5].item() == pytest.approx(-np.log(SIGNAL_FLOOR_FRACTION) * _slope_weight(bvals), rel=1e-5)
    # untouched voxels are exact
    np.testing.assert_allclose(adc[2:].numpy(), d[2:], rtol=1e-5)


def test_dti_wls_invalid_values_are_dipys_floor_and_invalid_voxels_zero():
    """Zero, negative and non-finite samples become :data:`DTI_MIN_SIGNAL` (DIPY floors the first two there and has
    no rule for the others); voxels whose mean b=0 signal is not positive and finite are 0; the output is finite."""
    bvals, bvecs = _random_protocol((1000.0, 2000.0), 6, b0=2, seed=18)
    signal, _ = _tensor_series(bvals, bvecs, 40, seed=19, snr=30.0)
    dwi = signal.reshape(len(bvals), 4, 10).astype(np.float32)
    dwi[:2, 0, 0] = 0.0  # both b0 zero -> invalid
    dwi[0, 0, 1] = np.nan  # NaN b0 -> invalid
    dwi[1, 0, 2] = np.inf
    dwi[:2, 0, 3] = -5.0
    dwi[[2, 5], 1, 0] = 0.0  # diffusion-weighted zeros, negatives and non-finite values -> DTI_MIN_SIGNAL
    dwi[[3, 9], 1, 1] = -3.0
    dwi[4, 1, 2], dwi[6, 1, 3], dwi[7, 1, 4] = np.nan, np.inf, -np.inf
    dwi[2:, 1, 5] = 0.0  # all diffusion-weighted volumes zero
    adc = fit_adc(torch.from_numpy(dwi), bvals, bvecs=bvecs).numpy()
    assert np.isfinite(adc).all() and (adc[0, :4] == 0).all() and (adc[1:] > 0).all()
    reference = np.where(np.isfinite(dwi), dwi, DTI_MIN_SIGNAL)
    md = _dipy_tensor_fit(np.moveaxis(reference, 0, -1), bvals, bvecs).md
    np.testing.assert_allclose(adc[1:], md[1:], rtol=1e-5)
    assert adc[1, 5] > 1e-3  # the floor: a large diffusivity, not inf


def test_dti_wls_fits_only_the_mask_voxels(monkeypatch):
    """Voxels outside the mask (here garbage) are neither fitted nor read into the fit: the model sees mask voxels."""
    from synth7t.transforms import diffusion

    bvals, bvecs = _random_protocol((1000.0,), 12, b0=1, seed=20)
    signal, md = _tensor_series(bvals, bvecs, 5 * 6 * 7, seed=21)
    dwi = torch.from_numpy(signal).reshape(len(bvals), 5, 6, 7)
    mask = torch.zeros(5, 6, 7, dtype=torch.bool)
    mask[1:4, 2:5, 3:6] = True
    dwi[:, ~mask] = -torch.rand(len(bvals), int((~mask).sum()), dtype=torch.float64)  # negative b0: not fitted
    dwi[:, 0, 0, 0] = 500.0  # outside the mask, but a valid signal
    fitted = []
    model = diffusion._TensorWLS.__call__
    monkeypatch.setattr(diffusion._TensorWLS, "__call__", lambda self, s: fitted.append(s.shape[1]) or model(self, s))
    adc = fit_adc(dwi, bvals, mask[None].float(), bvecs=bvecs)
    assert sum(fitted) == int(mask.sum()) == 27
    assert (adc[~mask] == 0).all()
    np.testing.assert_allclose(adc[mask].numpy(), md.reshape(5, 6, 7)[mask.numpy()], rtol=1e-6)
    fitted.clear()
    default = fit_adc(dwi, bvals, bvecs=bvecs)  # default mask: positive mean b=0 signal
    assert sum(fitted) == 28 and 0 < default[0, 0, 0] < 1e-8  # a flat signal: eigenvalues at DIPY's floor, ~1e-9
    torch.testing.assert_close(default[mask], adc[mask])


def _reference_adc(signal: np.ndarray, bvals: np.ndarray, average: str) -> float:
    """Plain numpy reference for one voxel: floor, direction-average each group, np.polyfit slope, clamp at 0."""
    s0 = signal[bvals <= 50].mean()
    if not (np.isfinite(s0) and s0 > 0):
        return 0.0
    floor = SIGNAL_FLOOR_FRACTION * s0
    s = np.where(np.isfinite(signal), np.maximum(signal, floor), floor)
    points = []
    for b, idx in group_shells(bvals):
        y = np.log(s[idx]).mean() if average == "geometric" else np.log(s[idx].mean())
        points.append((b, y))
    b, y = np.array(points).T
    return max(-np.polyfit(b, y, 1)[0], 0.0)


def _slope_weight(bvals: np.ndarray) -> float:
    """-(slope) of an OLS line through group points with y = 0 at b=0 and y = -1 at every shell."""
    groups = group_shells(bvals)
    b = np.array([g[0] for g in groups])
    y = np.array([0.0] + [-1.0] * (len(groups) - 1))
    return float(-np.polyfit(b, y, 1)[0])


def test_mask_and_default_mask():
    bvals = np.array([0, 1000, 1000, 2000], dtype=float)
    dwi, d = _isotropic_series(bvals, (5, 6, 7), seed=5)
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[1:4, 2:5, 3:6] = True
    for m in (torch.from_numpy(mask), torch.from_numpy(mask[None]).float(), mask.astype(np.uint8)):
        adc = shell_fit(dwi, bvals, m).numpy()
        assert (adc[~mask] == 0).all()
        np.testing.assert_allclose(adc[mask], d[mask], rtol=1e-5)
    dwi[:, 0] = 0.0  # background: no b0 signal -> 0 with the default mask
    adc = shell_fit(dwi, bvals).numpy()
    assert (adc[0] == 0).all()
    np.testing.assert_allclose(adc[1:], d[1:], rtol=1e-5)
    with pytest.raises(ValueError, match="mask must have shape"):
        shell_fit(dwi, bvals, torch.ones(5, 6))


def test_negative_slope_is_clamped():
    bvals = np.array([0, 1000], dtype=float)
    dwi = torch.tensor([[100.0, 100.0], [50.0, 150.0]])[:, :, None].expand(2, 2, 3)
    adc = shell_fit(dwi, bvals)
    assert adc[0].tolist() == pytest.approx([np.log(2) / 1000] * 3, rel=1e-6)
    assert (adc[1] == 0).all()


def test_fit_adc_argument_errors():
    dwi = torch.ones(3, 4, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_adc(dwi, [0, 1000, 1000], method="dki")
    with pytest.raises(ValueError, match="average"):
        shell_fit(dwi, [0, 1000, 1000], average="median")
    with pytest.raises(ValueError, match="b_value selects the shell of method 'scanner', not of method 'shells'"):
        shell_fit(dwi, [0, 1000, 1000], b_value=1000)
    with pytest.raises(ValueError, match="channel-first"):
        shell_fit(torch.ones(3, 4), [0, 1000, 1000])
    with pytest.raises(InputError, match="3 volumes but bval has 2"):
        shell_fit(dwi, [0, 1000])
    with pytest.raises(ValueError, match="shell_tolerance"):
        shell_fit(dwi, [0, 1000, 1000], shell_tolerance=-1)
    with pytest.raises(InputError, match=r"the tensor fit \(method 'dti_wls'\) needs the b-vectors, none were given"):
        fit_adc(dwi, [0, 1000, 1000])


# ----------------------------------------------------------------------------------------------------------------
# check_diffusion_series
# ----------------------------------------------------------------------------------------------------------------

NAMES = {"dwi_name": "sub-01_dwi.nii.gz", "bval_name": "sub-01_dwi.bval", "bvec_name": "sub-01_dwi.bvec"}


def test_check_series_ok():
    check_diffusion_series(3, [0, 1000, 1000], np.eye(3), **NAMES)
    vectors = np.array([[np.nan] * 3, [0.6, 0.8, 0.0], [0, 0, 1.005], [0.0] * 3])
    check_diffusion_series(4, [0, 1000, 1000, 5], vectors, **NAMES)  # (N, 3) layout; nan / zero b=0 vectors
    check_diffusion_series(7, [0] + [1000] * 6, np.concatenate([np.zeros((1, 3)), ICOSA6]), tensor_fit=True, **NAMES)


@pytest.mark.parametrize(
    "n, bvals, bvecs, fragments",
    [
        (4, [0, 1000, 1000], None, ["sub-01_dwi.nii.gz has 4 volumes but sub-01_dwi.bval has 3 b-values"]),
        (3, [0, 1000, 1000], np.ones((3, 4)), ["sub-01_dwi.nii.gz has 3 volumes but sub-01_dwi.bvec has 4 b-vectors"]),
        (3, [100, 1000, 1000], None, ["sub-01_dwi.bval has no b=0 volume", "b0_threshold=50"]),
        (3, [0, 0, 20], None, ["sub-01_dwi.bval has no diffusion-weighted volume"]),
        (3, [0, -1000, 1000], None, ["sub-01_dwi.bval has negative b-values at volumes [1]"]),
        (3, [0, np.nan, 1000], None, ["sub-01_dwi.bval has non-finite b-values at volumes [1]"]),
        (3, [0, 1000, np.inf], None, ["non-finite b-values at volumes [2]"]),
        (3, np.ones((3, 1, 2)), None, ["expected one row"]),
        (3, [0, 1000, 1000], np.ones((2, 3, 1)), ["b-vectors of sub-01_dwi.bvec have shape (2, 3, 1)"]),
        (
            4,
            [0, 1000, 1000, 1000],
            [[0, 0.5, 0, 2], [0, 0, 1, 0], [0, 0, 0, 0]],
            [
                "sub-01_dwi.bvec has b-vectors that are not unit vectors (norm 0.5, tolerance 0.01) at "
                "diffusion-weighted volumes [1, 3]"
            ],
        ),
        (
            3,
            [0, 1000, 1000],
            [[0, np.nan, 1], [0, 0, 0], [0, 0, 0]],
            ["sub-01_dwi.bvec has non-finite b-vectors at diffusion-weighted volumes [1]"],
        ),
        (3, [0, 1000, 1000], np.ones((3, 3)) / 3**0.5, []),
    ],
)
def test_check_series_errors(n, bvals, bvecs, fragments):
    if not fragments:  # valid for the shell fits, not for the tensor fit (one direction)
        check_diffusion_series(n, bvals, bvecs, **NAMES)
        fragments = ["the directions of sub-01_dwi.bvec determine only 1 of the 6 tensor elements", "'shells'"]
    with pytest.raises(InputError) as err:
        check_diffusion_series(n, bvals, bvecs, tensor_fit=True, **NAMES)
    msg = str(err.value)
    assert msg.startswith("diffusion series sub-01_dwi.nii.gz (b-values sub-01_dwi.bval")
    for fragment in fragments:
        assert fragment in msg


def test_check_series_reports_all_problems_in_one_error():
    with pytest.raises(ValueError) as err:
        check_diffusion_series(5, [1000, 2000], np.ones((3, 4)), **NAMES)
    msg = str(err.value)
    assert "5 volumes but sub-01_dwi.bval has 2 b-values" in msg
    assert "5 volumes but sub-01_dwi.bvec has 4 b-vectors" in msg
    assert "no b=0 volume" in msg


# ----------------------------------------------------------------------------------------------------------------
# FSL files
# ----------------------------------------------------------------------------------------------------------------


def test_read_fsl_files(tmp_path):
    (tmp_path / "row.bval").write_text("0 1000  1000\t2000\n")
    (tmp_path / "col.bval").write_text("0\n1000\n\n1000\n2000\n")
    np.testing.assert_array_equal(read_fsl_bvals(tmp_path / "row.bval"), [0, 1000, 1000, 2000])
    np.testing.assert_array_equal(read_fsl_bvals(str(tmp_path / "col.bval")), [0, 1000, 1000, 2000])
    vecs = np.array([[0, 1, 0, 0.6], [0, 0, 1, 0.8], [0, 0, 0, 0.0]])
    (tmp_path / "fsl.bvec").write_text("\n".join(" ".join(f"{x:.6f}" for x in row) for row in vecs) + "\n")
    (tmp_path / "t.bvec").write_text("\n".join(" ".join(f"{x:.6f}" for x in row) for row in vecs.T) + "\n")
    for name in ("fsl.bvec", "t.bvec"):
        out = read_fsl_bvecs(tmp_path / name)
        assert out.shape == (3, 4)
        np.testing.assert_allclose(out, vecs)
    (tmp_path / "nan.bvec").write_text("nan nan nan\n1 0 0\n0 1 0\n0 0 1\n")  # DIPY's small_64D style
    assert np.isnan(read_fsl_bvecs(tmp_path / "nan.bvec")[:, 0]).all()


@pytest.mark.parametrize(
    "reader, text, fragment",
    [
        (read_fsl_bvals, "0 1000 abc\n", "line 1: value 3 is not a number"),
        (read_fsl_bvals, "0 1000\n1000\n", "rows have different numbers of values"),
        (read_fsl_bvals, "\n \n", "empty"),
        (read_fsl_bvals, "0 1000\n1000 0\n", "2 rows x 2 columns"),
        (read_fsl_bvecs, "1 0 0 1\n0 1 0 0\n", "2 rows x 4 columns"),
        (read_fsl_bvecs, "1 0 0\n0 1,0 0\n", "line 2: value 2 is not a number"),
    ],
)
def test_read_fsl_malformed(tmp_path, reader, text, fragment):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        reader(path)
    assert str(err.value).startswith(f"{path}: ")
    assert fragment in str(err.value)


def test_read_fsl_unreadable(tmp_path):
    path = tmp_path / "missing.bval"
    with pytest.raises(ValueError, match="cannot read") as err:
        read_fsl_bvals(path)
    assert str(err.value).startswith(str(path))
    (tmp_path / "bin.bvec").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="cannot read"):
        read_fsl_bvecs(tmp_path / "bin.bvec")


# ----------------------------------------------------------------------------------------------------------------
# MONAI transforms
# ----------------------------------------------------------------------------------------------------------------

BVALS = np.array([0, 5, 1000, 1000, 1000, 2000, 2000, 2000], dtype=float)
BVECS = np.tile(ICOSA6, (2, 1))[: len(BVALS)].T  # 6 directions over the two shells; b=5 with a direction


def test_compute_adc_types_and_metadata():
    dwi, d = _isotropic_series(BVALS, (4, 5, 6), seed=6)
    affine = torch.diag(torch.tensor([1.25, 1.25, 1.25, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-90.0, -126.0, -72.0])
    meta_in = MetaTensor(dwi.float(), affine=affine, meta={"filename_or_obj": "dwi.nii.gz"})
    t = ComputeADC(BVALS, BVECS)
    out = t(meta_in)
    assert isinstance(out, MetaTensor) and out.shape == (1, 4, 5, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.affine, affine)
    assert out.meta["filename_or_obj"] == "dwi.nii.gz"
    np.testing.assert_allclose(out.as_tensor()[0].numpy(), d, rtol=1e-5)
    out_np = t(dwi.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.shape == (1, 4, 5, 6) and out_np.dtype == np.float32
    out_t = t(dwi, mask=torch.zeros(1, 4, 5, 6))
    assert type(out_t) is torch.Tensor and (out_t == 0).all()
    for method in ("shells", "scanner"):  # isotropic diffusion: every method gives D
        np.testing.assert_allclose(ComputeADC(BVALS, method=method)(dwi)[0].numpy(), d, rtol=1e-5)
    with pytest.raises(ValueError, match="average"):
        ComputeADC(BVALS, average="harmonic")
    with pytest.raises(ValueError, match="method must be one of"):
        ComputeADC(BVALS, BVECS, method="WLS")
    with pytest.raises(InputError, match="needs the b-vectors"):
        ComputeADC(BVALS)(dwi)


def _write_series(tmp_path: Path, bvals: np.ndarray, n_dirs_bvec: int | None = None, seed: int = 7):
    dwi, d = _isotropic_series(bvals, (4, 5, 6), seed=seed)
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    nii = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(dwi.numpy(), 0, -1).astype(np.float32), affine), nii)
    bval = tmp_path / "sub-01_dwi.bval"
    bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    n = len(bvals) if n_dirs_bvec is None else n_dirs_bvec
    bvec = tmp_path / "sub-01_dwi.bvec"
    vecs = np.tile(ICOSA6, (n // 6 + 1, 1))[:n].T
    bvec.write_text("\n".join(" ".join(f"{x:.6f}" for x in row) for row in vecs) + "\n")
    return nii, bval, bvec, d, affine


def test_compute_adcd_reads_paths(tmp_path):
    nii, bval, bvec, d, affine = _write_series(tmp_path, BVALS)
    mask = np.zeros((4, 5, 6), dtype=np.float32)
    mask[1:3, 1:4, 1:5] = 1
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    pipeline = Compose(
        [
            LoadImaged(keys=["dwi", "mask"], image_only=True),
            EnsureChannelFirstd(keys=["dwi", "mask"]),
            ComputeADCd(keys="dwi", bval_key="bval", bvec_key="bvec"),
            ComputeADCd(keys="dwi", mask_key="mask", output_key="adc_masked", method="shells", average="arithmetic"),
        ]
    )
    item = {"dwi": str(nii), "bval": str(bval), "bvec": bvec, "mask": str(tmp_path / "mask.nii.gz")}  # str or Path
    out = pipeline(item)
    adc = out["adc"]
    assert isinstance(adc, MetaTensor) and adc.shape == (1, 4, 5, 6) and adc.dtype == torch.float32
    np.testing.assert_allclose(adc.affine.numpy(), affine)
    np.testing.assert_allclose(adc.as_tensor()[0].numpy(), d, rtol=1e-5)
    masked = out["adc_masked"].as_tensor()[0].numpy()
    assert (masked[mask == 0] == 0).all() and (masked[mask == 1] > 0).all()
    assert out["bval"] == str(bval)  # inputs are left in place


def test_compute_adcd_errors_name_the_files(tmp_path):
    nii, bval, bvec, _, _ = _write_series(tmp_path, BVALS, n_dirs_bvec=7)
    load = Compose([LoadImaged(keys="dwi", image_only=True), EnsureChannelFirstd(keys="dwi")])
    item = load({"dwi": str(nii), "bval": str(bval), "bvec": str(bvec)})
    with pytest.raises(ValueError) as err:
        ComputeADCd(keys="dwi")(item)
    msg = str(err.value)
    assert str(nii) in msg and str(bval) in msg and f"{bvec} has 7 b-vectors" in msg
    with pytest.raises(ValueError, match="method 'dti_wls' fits the tensor and needs the b-vectors: give bvec_key"):
        ComputeADCd(keys="dwi", bvec_key=None)
    out = ComputeADCd(keys="dwi", bvec_key=None, method="shells")(item)  # b-vectors not needed for the shell fit
    assert out["adc"].shape == (1, 4, 5, 6)
    out = ComputeADCd(keys="dwi", bvec_key=None, method="scanner")({"dwi": item["dwi"], "bval": BVALS})  # arrays
    assert out["adc"].shape == (1, 4, 5, 6)
    assert "adc" not in ComputeADCd(keys="missing", allow_missing_keys=True)(item)
    scaled = BVECS * BVALS  # b-scaled vectors (another convention): not unit, an error
    bvec.write_text("\n".join(" ".join(f"{x:g}" for x in row) for row in scaled) + "\n")
    with pytest.raises(InputError) as err:
        ComputeADCd(keys="dwi")(item)
    assert str(err.value).startswith(f"diffusion series {nii} (b-values {bval}, b-vectors {bvec}) cannot be fitted: ")
    message = str(err.value)
    assert "not unit vectors (norm 1000, tolerance 0.01) at diffusion-weighted volumes [2, 3, 4, 5, 6, 7]" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    bvals = np.array([0, 0, 1000, 1000, 1000, 2000, 2000, 2000], dtype=float)
    dwi, _ = _isotropic_series(bvals, (8, 9, 10), seed=8)
    dwi = (dwi + torch.from_numpy(np.random.default_rng(9).normal(0, 20, size=dwi.shape))).float()
    dwi[3, 0, 0, :4] = torch.tensor([0.0, -1.0, float("nan"), float("inf")])
    mask = torch.rand(8, 9, 10, generator=torch.Generator().manual_seed(0)) > 0.3
    bvecs = np.concatenate([np.zeros((2, 3)), ICOSA6]).T
    options = [{"method": "dti_wls"}, {"method": "scanner"}] + [
        {"method": "shells", "average": average} for average in ("geometric", "arithmetic")
    ]
    for kwargs in options:
        cpu = fit_adc(dwi, bvals, mask, bvecs=bvecs, **kwargs)
        gpu = fit_adc(dwi.cuda(), bvals, mask.cuda(), bvecs=bvecs, **kwargs)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)
    out = ComputeADC(bvals, bvecs)(MetaTensor(dwi.cuda()))
    assert out.device.type == "cuda" and out.shape == (1, 8, 9, 10)
