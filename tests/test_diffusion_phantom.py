"""Simulated diffusion series from T1w anatomy (synth7t.diffusion_phantom), checked with the ADC fit users get."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from synth7t.diffusion_phantom import (
    DIFFUSIVITY_MM2_S,
    DiffusionProtocol,
    PROTOCOL_3T,
    PROTOCOL_7T,
    SHELL_DIRECTIONS,
    prepare_diffusion_pairs,
    resample_fractions,
    simulate_dwi,
    tissue_fractions,
)
from synth7t.transforms import fit_adc, read_fsl_bvals, read_fsl_bvecs

from conftest import LPS_LIKE, brain_phantom

NOISELESS = 1e9


def _three_tissue_t1w(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of CSF, grey and white matter T1w intensities (dark to bright) in a zero background."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((18, 16, 12), dtype=int)
    labels[2:8, 2:14, 2:10], labels[8:12, 2:14, 2:10], labels[12:16, 2:14, 2:10] = 1, 2, 3
    t1w = np.zeros(labels.shape)
    for k, mean in ((1, 0.2), (2, 0.5), (3, 0.8)):
        t1w[labels == k] = rng.normal(mean, 0.03, (labels == k).sum())
    return t1w, (labels > 0).astype(np.uint8), labels


def _pure(fractions: np.ndarray, tissue: int) -> np.ndarray:
    one_hot = np.zeros_like(fractions)
    one_hot[tissue] = 1.0
    return one_hot


def test_fractions_recover_the_tissues():
    t1w, mask, labels = _three_tissue_t1w()
    fractions = tissue_fractions(t1w, mask)
    np.testing.assert_allclose(fractions.sum(axis=0)[mask > 0], 1.0, atol=1e-9)
    assert np.all(fractions[:, mask == 0] == 0)
    inside = mask > 0
    assert (fractions.argmax(axis=0)[inside] + 1 == labels[inside]).mean() > 0.98


@pytest.mark.parametrize("tissue", [0, 1, 2])
def test_a_pure_tissue_has_its_literature_diffusivity(tissue):
    fractions = _pure(np.zeros((3, 12, 12, 4)), tissue)
    bvals, bvecs = PROTOCOL_3T.gradient_table()
    dwi = simulate_dwi(fractions, bvals, snr=NOISELESS)
    adc = fit_adc(np.moveaxis(dwi, -1, 0), bvals, np.ones((12, 12, 4)), bvecs=bvecs)
    np.testing.assert_allclose(adc.numpy(), DIFFUSIVITY_MM2_S[tissue], rtol=1e-3)


def _partial_volume_md(protocol: DiffusionProtocol, seed: int = 0) -> float:
    """Noise-free tensor MD (the targets' ADC) of a voxel of 30 % CSF and 70 % grey matter under ``protocol``."""
    fractions = np.zeros((3, 4, 4, 2))
    fractions[0], fractions[1] = 0.3, 0.7
    bvals, bvecs = protocol.gradient_table(seed)
    dwi = simulate_dwi(fractions, bvals, snr=NOISELESS)
    return float(fit_adc(np.moveaxis(dwi, -1, 0), bvals, bvecs=bvecs).mean())


def test_mixed_voxels_look_slower_with_the_higher_3t_shells():
    """The bi-exponential signal decays more slowly at high b: the 3T shells (up to 3000) give a lower MD than the
    7T ones (up to 2000), and both lie between grey matter's diffusivity and the mixture's mean diffusivity."""
    adc = {name: _partial_volume_md(protocol) for name, protocol in (("3T", PROTOCOL_3T), ("7T", PROTOCOL_7T))}
    assert DIFFUSIVITY_MM2_S[1] < adc["3T"] < adc["7T"] < 0.3 * DIFFUSIVITY_MM2_S[0] + 0.7 * DIFFUSIVITY_MM2_S[1]
    assert adc["7T"] - adc["3T"] > 0.03 * adc["3T"]


@pytest.mark.parametrize("protocol", [PROTOCOL_3T, PROTOCOL_7T], ids=["3T", "7T"])
def test_the_md_of_an_isotropic_voxel_does_not_depend_on_the_directions(protocol):
    """Each subject's directions are turned differently, yet a mixed voxel keeps its MD (random directions per shell
    gave 7T MDs from 1.07e-3 to 2.98e-2 over seeds 0-4)."""
    md = [_partial_volume_md(protocol, seed) for seed in range(5)]
    np.testing.assert_allclose(md, md[0], rtol=1e-6)


def test_noise_level_follows_the_snr():
    fractions = _pure(np.zeros((3, 40, 40, 10)), 2)
    bvals = np.zeros(3)
    dwi = simulate_dwi(fractions, bvals, snr=20.0, seed=1)
    assert dwi.mean() == pytest.approx(1000.0, rel=0.01)  # high SNR: Rician mean close to the signal
    assert dwi.std() == pytest.approx(1000.0 / 20.0, rel=0.1)
    assert not np.array_equal(dwi, simulate_dwi(fractions, bvals, snr=20.0, seed=2))


def test_gradient_tables_are_fsl_like():
    for protocol in (PROTOCOL_3T, PROTOCOL_7T):
        bvals, bvecs = protocol.gradient_table()
        assert bvecs.shape == (3, bvals.size)
        assert np.all(bvals[: protocol.b0_volumes] == 0) and np.all(bvecs[:, : protocol.b0_volumes] == 0)
        np.testing.assert_allclose(np.linalg.norm(bvecs[:, protocol.b0_volumes :], axis=0), 1.0)
        assert sorted(set(bvals[protocol.b0_volumes :])) == sorted(protocol.shells)


def test_every_shell_has_six_balanced_directions_turned_per_seed():
    for protocol in (PROTOCOL_3T, PROTOCOL_7T):
        bvals, bvecs = protocol.gradient_table(seed=3)
        for shell in protocol.shells:
            directions = bvecs[:, bvals == shell]
            assert directions.shape == (3, len(SHELL_DIRECTIONS))
            np.testing.assert_allclose(directions @ directions.T, 2 * np.eye(3), atol=1e-12)  # balanced
            cosines = np.abs(directions.T @ directions)[np.triu_indices(6, 1)]
            np.testing.assert_allclose(cosines, 1 / np.sqrt(5), rtol=1e-12)  # an icosahedron's axes
    first, second = (PROTOCOL_7T.gradient_table(seed)[1] for seed in (0, 1))
    assert not np.allclose(first, second)


def test_fractions_resample_to_the_protocol_grid():
    t1w, mask, _ = _three_tissue_t1w()
    fractions = tissue_fractions(t1w, mask)
    resampled, affine = resample_fractions(fractions, np.eye(4), PROTOCOL_3T.voxel_size_mm)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 1.25)
    assert resampled.shape[0] == 3 and resampled.shape[1:] == (15, 13, 10)  # 18 x 16 x 12 mm at 1.25 mm
    total = resampled.sum(axis=0)
    assert total.max() <= 1.0 + 1e-5 and np.isclose(total.sum() * 1.25**3, fractions.sum(), rtol=0.1)


def test_prepared_subjects_have_3t_inputs_and_a_7t_adc_target(tmp_path):
    source = tmp_path / "t1w"
    source.mkdir()
    for index in range(1, 5):
        nib.save(nib.Nifti1Image(brain_phantom((30, 34, 24), index), LPS_LIKE), source / f"sub-{index}_T1w.nii.gz")
    datalist = json.loads(prepare_diffusion_pairs(source, tmp_path / "out", n_validation=1, n_test=1).read_text())
    assert [len(datalist[name]) for name in ("training", "validation", "test")] == [2, 1, 1]
    item = datalist["test"][0]
    assert set(item) == {"t1w", "dwi", "bval", "bvec", "label", "mask", "subject"}
    out = tmp_path / "out"
    dwi, t1w, adc = (nib.load(out / item[key]) for key in ("dwi", "t1w", "label"))
    assert dwi.get_data_dtype() == np.int16 and dwi.ndim == 4
    bvals = read_fsl_bvals(out / item["bval"])
    assert dwi.shape[3] == bvals.size == read_fsl_bvecs(out / item["bvec"]).shape[1]
    np.testing.assert_allclose(np.abs(np.diag(dwi.affine)[:3]), 1.25)
    np.testing.assert_allclose(np.abs(np.diag(t1w.affine)[:3]), 1.25)
    np.testing.assert_allclose(np.abs(np.diag(adc.affine)[:3]), 1.05)
    values = adc.get_fdata()[nib.load(out / item["mask"]).get_fdata() > 0]
    assert 0.5e-3 < np.median(values) < 3.1e-3 and values.max() < 5e-3
    assert json.loads((out / "preparation.json").read_text())["protocols"]["3T"]["shells"] == [1000, 2000, 3000]
