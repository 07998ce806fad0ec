"""Tests of synth7t.transforms.degradation: the seed-001 recipe (spec watnet.md §1.3) and the realistic recipe (§8.9).

Small synthetic volumes only; no data files, no network, CPU, a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandGaussianNoised
from skimage.exposure import match_histograms

from synth7t.transforms.degradation import (
    SEED001_NOISE_VARIANCE,
    HistogramMatch,
    HistogramMatchd,
    KSpaceTruncate,
    KSpaceTruncated,
    Quantize8Bit,
    Quantize8Bitd,
    SimulateRealistic3T,
    SimulateRealistic3Td,
    kspace_truncate,
    seed001_recipe,
)

SHAPE = (32, 32, 32)
AFFINE = torch.tensor([[-1.0, 0, 0, 90], [0, -1, 0, 91], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=torch.float64)


def _phantom(shape=SHAPE, radii=(0.38, 0.42, 0.36), phase: float = 0.0) -> np.ndarray:
    """Smooth 'brain': grey-matter shell, white-matter core, two ventricles, gentle modulation; max 1, bg 0."""
    g = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    r = np.sqrt(sum((gi / a) ** 2 for gi, a in zip(g, radii)))
    vol = np.zeros(shape, np.float64)
    vol[r < 1.0] = 0.5
    vol[r < 0.75] = 0.8
    for sign in (-1.0, 1.0):
        vent = ((g[0] - sign * 0.07) / 0.05) ** 2 + (g[1] / 0.14) ** 2 + (g[2] / 0.07) ** 2 < 1.0
        vol[vent] = 0.2
    vol *= 1.0 + 0.1 * np.sin(7.0 * g[0] + phase) * np.cos(5.0 * g[1] - phase) * np.sin(6.0 * g[2] + 1.0)
    return (vol / vol.max()).astype(np.float32)


def _raw_uint8(**kwargs) -> np.ndarray:
    """Channel-first uint8 0-255 volume like the TELL 7T files."""
    return np.round(_phantom(**kwargs) * 255.0).astype(np.uint8)[None]


@pytest.fixture(scope="module")
def raw7t() -> np.ndarray:
    return _raw_uint8(radii=(0.41, 0.45, 0.39))


@pytest.fixture(scope="module")
def raw_ref() -> np.ndarray:
    # a smaller brain with another modulation, as the seed's reference sub-TELL0106 has the largest background
    return _raw_uint8(radii=(0.38, 0.42, 0.36), phase=0.7)


def _run(recipe: Compose, raw: np.ndarray, seed: int) -> dict:
    recipe.set_random_state(seed)
    return recipe({"label": MetaTensor(torch.as_tensor(raw), affine=AFFINE)})


# ------------------------------------------------------------------------------------------------------------------
# seed-001 recipe
# ------------------------------------------------------------------------------------------------------------------


def test_seed_noise_step_alone_has_variance_0003():
    recipe = seed001_recipe(_raw_uint8())
    noise = [t for t in recipe.transforms if isinstance(t, RandGaussianNoised)]
    assert len(noise) == 1
    noise = noise[0]
    # the pitfall of spec §9: MONAI defaults prob=0.1 and sample_std=True would be wrong
    assert noise.prob == 1.0
    assert noise.rand_gaussian_noise.sample_std is False
    assert noise.rand_gaussian_noise.std == pytest.approx(math.sqrt(0.003))
    noise.set_random_state(0)
    flat = np.full((1, 48, 48, 48), 0.5, np.float32)
    out = np.asarray(noise({"image": flat})["image"])
    diff = out - 0.5
    assert diff.var() == pytest.approx(SEED001_NOISE_VARIANCE, rel=0.03)
    assert abs(diff.mean()) < 3 * math.sqrt(0.003 / diff.size)


def test_seed_noise_before_matching(raw7t, raw_ref):
    recipe = seed001_recipe(raw_ref)
    d = _run(Compose(recipe.transforms[:3]), raw7t, seed=3)
    x7, x3 = np.asarray(d["label"]), np.asarray(d["image"])
    np.testing.assert_allclose(x7, raw7t / 255.0, atol=1e-6)  # min-max == raw / 255
    noise = (x3 - x7).astype(np.float64)
    assert noise.var() == pytest.approx(0.003, rel=0.03)  # variance, not std
    assert x3.min() < -0.1 and x3.max() > 1.1  # whole volume, background included, no clipping
    assert noise[raw7t == 0].var() == pytest.approx(0.003, rel=0.05)


def test_seed_reproducible(raw7t, raw_ref):
    recipe = seed001_recipe(raw_ref)
    a, b, c = _run(recipe, raw7t, 11), _run(recipe, raw7t, 11), _run(recipe, raw7t, 12)
    for key in ("image", "label"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["image"], c["image"])
    torch.testing.assert_close(a["label"], c["label"], rtol=0, atol=0)  # the 7T path has no randomness


def test_seed_output_histogram_equals_reference(raw7t, raw_ref):
    d = _run(seed001_recipe(raw_ref), raw7t, seed=0)
    ref01 = raw_ref.ravel() / 255.0
    y3 = np.asarray(d["image"]).ravel().astype(np.float64)
    assert y3.shape == ref01.shape
    # continuous noisy input: its cumulative histogram equals the reference's at every reference level
    # (skimage interpolates linearly between reference levels, so values in between also occur)
    levels = np.unique(ref01)
    cdf_out = np.array([np.mean(y3 <= v + 1e-7) for v in levels])
    cdf_ref = np.array([np.mean(ref01 <= v) for v in levels])
    np.testing.assert_allclose(cdf_out, cdf_ref, atol=1e-3)
    gaps = np.diff(levels).max()
    assert np.abs(np.sort(y3) - np.sort(ref01)).max() <= gaps + 1e-6  # sorted values within one level step
    # the 7T (tied levels) is matched coarsely; its background fraction becomes the reference's, so the darkest
    # brain voxels of this larger brain are zeroed (the side effect of spec §1.3)
    y7 = np.asarray(d["label"]).ravel()
    assert np.mean(y7 == 0) == pytest.approx(np.mean(ref01 == 0), abs=0.02)
    assert np.mean(y7[raw7t.ravel() > 0] == 0) > 0.05
    assert np.mean(y3 == 0) == pytest.approx(np.mean(ref01 == 0), abs=1e-3)
    assert np.asarray(d["image"]).min() >= 0 and np.asarray(d["image"]).max() <= 1.0 + 1e-6


def test_seed_matches_direct_skimage(raw7t, raw_ref):
    recipe = seed001_recipe(raw_ref, source_key="t7", output_key="t3")
    pre = Compose(recipe.transforms[:3])  # shares the transform objects: seed each right before its call
    p = pre.set_random_state(5)({"t7": torch.as_tensor(raw7t)})
    f = recipe.set_random_state(5)({"t7": torch.as_tensor(raw7t)})
    ref01 = raw_ref[0] / 255.0
    for key in ("t7", "t3"):
        direct = match_histograms(np.asarray(p[key])[0].astype(np.float64), ref01)
        np.testing.assert_allclose(np.asarray(f[key])[0], direct, atol=1e-6)


def test_seed_quantize_8bit(raw7t, raw_ref):
    d = _run(seed001_recipe(raw_ref, quantize_8bit=True), raw7t, seed=1)
    plain = _run(seed001_recipe(raw_ref), raw7t, seed=1)
    for key in ("image", "label"):
        q = np.asarray(d[key])
        assert len(np.unique(q)) <= 256
        assert np.abs(q - np.asarray(plain[key])).max() <= q.max() / 510 + 1e-6


def test_quantize_levels_and_types():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.9, (1, 20, 20, 20)).astype(np.float32)
    q = Quantize8Bit()(x)
    assert isinstance(q, np.ndarray) and q.dtype == np.float32
    vmax = x.max()
    k = q * 255.0 / vmax
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert q.max() == pytest.approx(vmax, rel=1e-6)
    assert np.abs(q - x).max() <= vmax / 510 + 1e-6
    mt = Quantize8Bitd(keys="a")({"a": MetaTensor(torch.as_tensor(x), affine=AFFINE)})["a"]
    assert isinstance(mt, MetaTensor)
    torch.testing.assert_close(mt.affine, AFFINE)
    np.testing.assert_allclose(mt.numpy(), q)
    np.testing.assert_array_equal(Quantize8Bit()(np.zeros((1, 4, 4, 4), np.float32)), 0)


def test_histogram_match_types_and_channels(raw7t, raw_ref):
    x = raw7t.astype(np.float32) / 255.0
    ref = raw_ref[0].astype(np.float32) / 255.0
    expected = match_histograms(x[0], ref)
    out_np = HistogramMatch(ref)(x)
    assert isinstance(out_np, np.ndarray) and out_np.shape == x.shape
    np.testing.assert_array_equal(out_np[0], expected)
    np.testing.assert_array_equal(HistogramMatch(ref[None])(x), out_np)  # channel-first reference
    mt = HistogramMatchd(keys="k", reference=torch.as_tensor(ref))({"k": MetaTensor(torch.as_tensor(x), affine=AFFINE)})
    assert isinstance(mt["k"], MetaTensor)
    torch.testing.assert_close(mt["k"].affine, AFFINE)
    np.testing.assert_array_equal(mt["k"].numpy(), out_np)
    # per channel: channel c is matched to reference channel c
    two = np.concatenate([x, x[:, ::-1]])
    refs = np.stack([ref, ref**2])
    out2 = HistogramMatch(refs)(two)
    np.testing.assert_array_equal(out2[1], match_histograms(two[1], refs[1]))
    with pytest.raises(ValueError):
        HistogramMatch(np.stack([ref, ref, ref]))(two)


# ------------------------------------------------------------------------------------------------------------------
# realistic recipe
# ------------------------------------------------------------------------------------------------------------------


def _only(**kwargs) -> SimulateRealistic3T:
    """A SimulateRealistic3T with every step off except those given."""
    params = dict(
        gamma_range=(1.0, 1.0), bias_coeff_range=(0.0, 0.0), target_voxel_size_mm=1.0, snr=None, mask_background=False
    )
    params.update(kwargs)
    return SimulateRealistic3T(**params)


@pytest.fixture(scope="module")
def x7() -> MetaTensor:
    return MetaTensor(torch.as_tensor(_phantom()[None]), affine=AFFINE)


def test_realistic_reproducible_and_seed_dependent(x7):
    sim = SimulateRealistic3T()
    a = sim.set_random_state(0)(x7)
    b = sim.set_random_state(0)(x7)
    c = sim.set_random_state(1)(x7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(sim(x7, randomize=False), c, rtol=0, atol=0)  # repeats the last draw


def test_realistic_array_and_dict_agree(x7):
    arr = SimulateRealistic3T().set_random_state(7)(x7)
    dct = SimulateRealistic3Td().set_random_state(7)({"label": x7})
    torch.testing.assert_close(dct["image"], arr, rtol=0, atol=0)
    # inside a Compose, set_random_state reaches it too
    pipe = Compose([SimulateRealistic3Td(keys_source="t7", output_key="t3")])
    p1 = pipe.set_random_state(3)({"t7": x7})["t3"]
    p2 = pipe.set_random_state(3)({"t7": x7})["t3"]
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_realistic_output_properties(x7):
    before = x7.clone()
    d = SimulateRealistic3Td().set_random_state(0)({"label": x7})
    y = d["image"]
    assert isinstance(y, MetaTensor) and y.dtype == torch.float32 and y.shape == x7.shape
    torch.testing.assert_close(y.affine, AFFINE)  # metadata of the 7T carried over
    assert torch.isfinite(y).all() and (y >= 0).all()
    assert (y[x7 == 0] == 0).all()  # background exactly 0 when masked
    assert (y[x7 > 0] > 0).float().mean() > 0.99
    assert d["label"] is x7 and torch.equal(x7, before)  # the 7T is untouched
    # brain-mean intensity stays in the 7T's units (gamma < 1 brightens it a little)
    ratio = float(y[x7 > 0].mean() / x7[x7 > 0].mean())
    assert 1.0 < ratio < 1.25
    # numpy in, numpy float32 out
    out_np = SimulateRealistic3T().set_random_state(0)(x7.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    np.testing.assert_allclose(out_np, y.numpy(), atol=1e-6)


def test_realistic_mask_key(x7):
    mask = torch.zeros_like(x7, dtype=torch.bool)
    mask[:, 10:30, 10:30, 10:30] = True
    y = SimulateRealistic3Td(mask_key="brain").set_random_state(0)({"label": x7, "brain": mask})["image"]
    assert (y[~mask] == 0).all() and (y[mask & (x7 > 0)] > 0).all()
    unmasked = SimulateRealistic3T(mask_background=False).set_random_state(0)(x7)
    assert (unmasked[x7 == 0] > 0).float().mean() > 0.99  # Rician noise fills the background when not masked


# --- k-space truncation ---------------------------------------------------------------------------------------------


def _box(shape, target, vox):
    """Independent construction of the kept k-space box (index form)."""
    keep = np.ones(shape, bool)
    for axis, (n, t, v) in enumerate(zip(shape, target, vox)):
        if t <= v:
            continue
        k = np.arange(n)
        k = np.where(k < (n + 1) // 2, k, k - n)  # signed frequency index
        ok = np.abs(k) / (n * v) < 1.0 / (2.0 * t)
        view = [1] * len(shape)
        view[axis] = n
        keep &= ok.reshape(view)
    return keep


def test_kspace_identity_when_target_not_coarser(x7):
    x = x7.as_tensor()
    for target in (1.0, 0.8, (1.0, 0.5, 0.7)):
        torch.testing.assert_close(kspace_truncate(x, target, 1.0), x, rtol=0, atol=0)
    # a 2 mm grid is already coarser than 1.4 mm: read from the affine, nothing to do
    coarse = MetaTensor(x.clone(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(KSpaceTruncate(1.4)(coarse).as_tensor(), x, rtol=0, atol=0)


@pytest.mark.parametrize("target", [(1.4, 1.4, 1.4), (1.0, 2.0, 1.0), (2.5, 1.2, 3.0)])
def test_kspace_removes_high_frequencies(x7, target):
    x = x7.as_tensor().double()
    y = kspace_truncate(x, target, 1.0)
    assert y.dtype == torch.float64 and y.shape == x.shape
    fy = np.fft.fftn(y.numpy()[0])
    fx = np.fft.fftn(x.numpy()[0])
    keep = _box(SHAPE, target, (1.0, 1.0, 1.0))
    assert (~keep).any()
    assert np.sum(np.abs(fy[~keep]) ** 2) < 1e-20 * np.sum(np.abs(fy) ** 2)  # nothing outside the box
    np.testing.assert_allclose(fy[keep], fx[keep], atol=1e-9)  # the box itself untouched
    assert float(y.mean()) == pytest.approx(float(x.mean()), abs=1e-12)  # DC kept, mean preserved
    assert float((y - x).abs().max()) > 1e-3  # something was removed


def test_kspace_voxel_size_from_affine_and_override(x7):
    half_mm = torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))
    fine = MetaTensor(x7.as_tensor().clone(), affine=half_mm)
    out = KSpaceTruncate((1.4, 1.4, 1.4))(fine)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    torch.testing.assert_close(out.as_tensor(), kspace_truncate(x7.as_tensor(), 1.4, 0.5))
    torch.testing.assert_close(out.affine, fine.affine)
    # the dictionary form and an explicit voxel size overriding the affine
    over = KSpaceTruncated(keys="a", target_voxel_size_mm=1.4, voxel_size=1.0)({"a": fine})["a"]
    torch.testing.assert_close(over.as_tensor(), kspace_truncate(x7.as_tensor(), 1.4, 1.0))


# --- noise ----------------------------------------------------------------------------------------------------------


def test_rician_noise_sigma_matches_snr():
    shape = (1, 48, 48, 48)
    x = np.zeros(shape, np.float32)
    x[:, 12:36, 12:36, 12:36] = 0.5  # flat "brain", mean signal 0.5
    snr = 20.0
    sigma = 0.5 / snr
    y = _only(snr=snr).set_random_state(0)(x).astype(np.float64)
    bg = y[x == 0]
    # background is Rayleigh: mean sigma*sqrt(pi/2), second moment 2*sigma^2
    assert bg.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.02)
    assert math.sqrt(np.mean(bg**2) / 2) == pytest.approx(sigma, rel=0.02)
    # flat bright region at SNR 20: the Rician is close to Gaussian with std sigma
    inner = y[x > 0]
    assert inner.std() == pytest.approx(sigma, rel=0.03)
    assert inner.mean() == pytest.approx(math.sqrt(0.5**2 + sigma**2), rel=0.005)
    # masked: background exactly 0
    ym = _only(snr=snr, mask_background=True).set_random_state(0)(x)
    assert (ym[x == 0] == 0).all()
    np.testing.assert_array_equal(ym[x > 0], y[x > 0].astype(np.float32))


# --- bias field -----------------------------------------------------------------------------------------------------


def _legendre_design(shape, degree=3):
    coords = [np.linspace(-1.0, 1.0, n) for n in shape]
    g = np.meshgrid(*coords, indexing="ij")
    cols = []
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j):
                cols.append(
                    (
                        np.polynomial.legendre.legval(g[0], [0] * i + [1])
                        * np.polynomial.legendre.legval(g[1], [0] * j + [1])
                        * np.polynomial.legendre.legval(g[2], [0] * k + [1])
                    ).ravel()
                )
    return np.stack(cols, 1)


def test_bias_field_smooth_and_in_documented_range(x7):
    brain = (x7 > 0).numpy()[0]
    design = _legendre_design(SHAPE)
    peaks = []
    for seed in range(5):
        # a volume of ones (nothing masked) reveals the field itself
        field = _only(bias_coeff_range=(-0.1, 0.1)).set_random_state(seed)(np.ones((1, *SHAPE), np.float32))[0]
        assert field.mean() == pytest.approx(1.0, rel=1e-5)  # normalised over the mask (here: everything)
        # smooth: log field is exactly a degree-3 Legendre polynomial (MONAI RandBiasField semantics)
        log_f = np.log(field.astype(np.float64)).ravel()
        coef, *_ = np.linalg.lstsq(design, log_f, rcond=None)
        assert np.abs(design @ coef - log_f).max() < 1e-5
        assert np.abs(coef[1:]).max() <= 0.1 + 1e-5  # non-constant coefficients within bias_coeff_range
        # over the brain, relative to its brain mean: roughly +/-10-20 %
        brain_field = _only(bias_coeff_range=(-0.1, 0.1)).set_random_state(seed)(brain[None].astype(np.float32))[0]
        rel = brain_field[brain] / brain_field[brain].mean()
        assert rel.mean() == pytest.approx(1.0, rel=1e-5)
        assert 0.8 < np.percentile(rel, 1) and np.percentile(rel, 99) < 1.2
        peaks.append(np.abs(rel - 1).max())
    assert 0.03 < np.median(peaks) < 0.3
    assert max(peaks) < 0.4


# --- contrast -------------------------------------------------------------------------------------------------------


def test_gamma_brightens_mid_grey_and_lowers_contrast():
    x = np.zeros((1, 16, 16, 16), np.float32)
    x[:, 2:6] = 0.25
    x[:, 6:10] = 0.5
    x[:, 10:14] = 1.0
    y = _only(gamma_range=(0.7, 0.9)).set_random_state(0)(x)
    mid = float(y[0, 8, 8, 8])
    assert mid > 0.5
    gamma = math.log(mid) / math.log(0.5)
    assert 0.7 <= gamma <= 0.9
    np.testing.assert_allclose(y, x.astype(np.float64) ** gamma, atol=1e-5)  # x**gamma on an image spanning [0, 1]
    assert (1.0 - mid) / (1.0 + mid) < (1.0 - 0.5) / (1.0 + 0.5)  # lower Michelson contrast
    sim = _only(gamma_range=(0.7, 0.9))
    gammas = {round(math.log(float(sim.set_random_state(s)(x)[0, 8, 8, 8])) / math.log(0.5), 6) for s in range(5)}
    assert len(gammas) == 5 and all(0.7 <= g <= 0.9 for g in gammas)


def test_invalid_parameters():
    with pytest.raises(ValueError):
        SimulateRealistic3T(gamma_range=(0.9, 0.7))
    with pytest.raises(ValueError):
        SimulateRealistic3T(snr=0.0)
    with pytest.raises(ValueError):
        SimulateRealistic3Td(keys_source=["a", "b"])
    with pytest.raises(ValueError):
        seed001_recipe(np.ones((4, 4, 4)), noise_variance=-1.0)
    with pytest.raises(ValueError):
        SimulateRealistic3T()(np.ones((1, 8, 8, 8), np.float32), mask=np.ones((1, 4, 4, 4)))
