"""Degradation-randomized 3T simulation (synth7t.transforms.randomization): each step against known values."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from monai.data import MetaTensor

from synth7t.transforms import HistogramMatch, SimulateRealistic3T
from synth7t.transforms.degradation import SEED001_NOISE_VARIANCE
from synth7t.transforms.randomization import QuantileHistogramMatch, RandSimulate3T, RandSimulate3Td

OFF = {
    "gamma_prob": 0.0,
    "bias_prob": 0.0,
    "resolution_prob": 0.0,
    "noise_prob": 0.0,
    "mask_prob": 0.0,
    "histogram_match_prob": 0.0,
    "quantize_prob": 0.0,
}


def only(**kwargs):
    """A RandSimulate3T with every step off except those switched on in ``kwargs``."""
    return RandSimulate3T(**{**OFF, **kwargs})


def brain_phantom(shape=(1, 40, 48, 36), seed=0) -> torch.Tensor:
    """An ellipsoid 'brain' of smooth random intensities in (0.2, 1] on a zero background."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape[1:]], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    values = 0.2 + 0.8 * torch.rand(shape, generator=generator)
    return values * inside


def test_default_ranges_contain_both_fixed_recipes():
    defaults = {k: v.default for k, v in inspect.signature(RandSimulate3T).parameters.items()}
    realistic = {k: v.default for k, v in inspect.signature(SimulateRealistic3T).parameters.items()}
    low, high = defaults["gamma_range"]
    assert low <= realistic["gamma_range"][0] and realistic["gamma_range"][1] <= high
    low, high = defaults["voxel_size_range_mm"]
    assert all(low <= t <= high for t in realistic["target_voxel_size_mm"])
    low, high = defaults["snr_range"]
    assert low <= realistic["snr"] <= high
    low, high = defaults["gaussian_variance_range"]
    assert low <= SEED001_NOISE_VARIANCE <= high
    assert defaults["bias_max_deviation"] >= 0.16  # the realistic recipe's median peak deviation (+/-16 %)
    for step in OFF:  # every step can happen and can be skipped
        assert 0.0 < defaults[step] < 1.0, step


def test_all_steps_off_is_the_identity_and_target_unchanged():
    x = brain_phantom()
    image, target = only()(x)
    assert torch.equal(image, x) and torch.equal(target, x)


def test_gamma_is_the_power_law_on_unit_range():
    x = brain_phantom()
    x[0, 0, 0, 0] = 1.0  # spans [0, 1]
    sim = only(gamma_prob=1.0, gamma_range=(0.7, 0.7))
    image, _ = sim(x)
    assert sim.draw["gamma"] == pytest.approx(0.7)
    torch.testing.assert_close(image, x**0.7, atol=1e-5, rtol=1e-5)


def test_bias_field_stays_within_the_drawn_peak_deviation():
    x = brain_phantom()
    brain = x > 0
    sim = only(bias_prob=1.0, bias_max_deviation=0.2)
    sim.set_random_state(3)
    seen = []
    for _ in range(20):
        image, _ = sim(x)
        d = sim.draw["bias_deviation"]
        ratio = image[brain] / x[brain]
        assert 0.0 <= d <= 0.2
        assert float(ratio.max()) <= (1 + d) * 1.01 and float(ratio.min()) >= 1 / ((1 + d) * 1.01)
        seen.append(max(float(ratio.max()) - 1, 1 - float(ratio.min())))
    assert max(seen) > 0.1  # the field is not trivially flat


def test_gaussian_noise_level_and_whole_volume():
    x = torch.full((1, 64, 64, 32), 0.5)
    x[:, :8] = 0.0  # background gets noise too
    sim = only(noise_prob=1.0, rician_fraction=0.0, gaussian_variance_range=(0.003, 0.003))
    sim.set_random_state(0)
    image, _ = sim(x)
    residual = image - x
    assert sim.draw["gaussian_std"] == pytest.approx(math.sqrt(0.003))
    assert float(residual.std()) == pytest.approx(math.sqrt(0.003), rel=0.02)
    assert float(residual[:, :8].std()) == pytest.approx(math.sqrt(0.003), rel=0.05)


def test_rician_noise_follows_the_snr_of_the_mean_brain_signal():
    x = torch.zeros((1, 64, 64, 32))
    x[:, 16:48, 16:48] = 0.8
    sim = only(noise_prob=1.0, rician_fraction=1.0, snr_range=(20.0, 20.0))
    image, _ = sim(x)
    sigma = 0.8 / 20
    assert sim.draw["snr"] == pytest.approx(20.0)
    # background: Rayleigh with mean sigma * sqrt(pi / 2)
    assert float(image[:, :8].mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)


def test_noise_levels_are_drawn_inside_their_ranges():
    sim = only(noise_prob=1.0)
    sim.set_random_state(1)
    variances, snrs = [], []
    for _ in range(200):
        sim.randomize((1, 4, 4, 4))
        if "snr" in sim.draw:
            snrs.append(sim.draw["snr"])
        else:
            variances.append(sim.draw["gaussian_std"] ** 2)
    assert variances and snrs
    assert 0.0005 <= min(variances) and max(variances) <= 0.006
    assert 10 <= min(snrs) and max(snrs) <= 40


def _cosine_volume(cycles_per_mm: float, n: int = 60) -> torch.Tensor:
    positions = torch.arange(n, dtype=torch.float32)
    wave = 0.5 + 0.25 * torch.cos(2 * math.pi * cycles_per_mm * positions)
    return wave[None, :, None, None].expand(1, n, 8, 8).clone()


def test_kspace_resolution_loss_removes_frequencies_above_the_drawn_voxel_size():
    sim = only(resolution_prob=1.0, blur_fraction=0.0, voxel_size_range_mm=(1.8, 1.8))
    above = _cosine_volume(20 / 60)  # 0.333 cycles/mm > 1 / (2 * 1.8) = 0.278: not sampled at 1.8 mm
    below = _cosine_volume(10 / 60)  # 0.167 cycles/mm: kept
    torch.testing.assert_close(sim(above)[0], torch.full_like(above, 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(sim(below)[0], below, atol=1e-5, rtol=0)
    assert sim.draw["voxel_size_mm"] == pytest.approx((1.8, 1.8, 1.8))


def test_blur_attenuates_a_cosine_by_the_gaussian_transfer_function():
    sim = only(resolution_prob=1.0, blur_fraction=1.0, voxel_size_range_mm=(1.8, 1.8))
    frequency = 6 / 60
    image, _ = sim(_cosine_volume(frequency))
    sigma = math.sqrt(1.8**2 - 1.0) / (2 * math.sqrt(2 * math.log(2)))
    expected = 0.25 * math.exp(-2 * math.pi**2 * sigma**2 * frequency**2)
    amplitude = float(image[0, 20:40, 4, 4].max() - image[0, 20:40, 4, 4].min()) / 2
    assert amplitude == pytest.approx(expected, rel=0.02)


def test_voxel_size_is_read_from_the_affine():
    x = MetaTensor(_cosine_volume(10 / 60), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    sim = only(resolution_prob=1.0, blur_fraction=0.0, voxel_size_range_mm=(1.8, 1.8))
    image, _ = sim(x)  # 2 mm voxels are already coarser than 1.8 mm: nothing to remove
    torch.testing.assert_close(image.as_tensor(), x.as_tensor(), atol=1e-6, rtol=0)
    assert isinstance(image, MetaTensor)


def test_mask_zeroes_the_background_and_clips_negatives():
    x = brain_phantom()
    sim = only(noise_prob=1.0, mask_prob=1.0, rician_fraction=0.0)
    image, _ = sim(x)
    assert float(image[x == 0].abs().max()) == 0.0 and float(image.min()) >= 0.0


def test_histogram_matching_changes_image_and_target_to_the_reference_distribution():
    x = brain_phantom(seed=0)
    reference = brain_phantom(seed=1) ** 2  # another subject with another contrast
    sim = RandSimulate3T(references=[reference], **{**OFF, "histogram_match_prob": 1.0})
    image, target = sim(x)
    exact = torch.as_tensor(HistogramMatch(reference.numpy())(x.numpy()))
    assert float((target - exact).abs().mean()) < 1e-3
    assert float((target - exact).abs().max()) < 2e-2
    torch.testing.assert_close(image, target)  # no other step: image and target matched alike
    quantiles = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(torch.quantile(target, quantiles), torch.quantile(reference, quantiles), atol=5e-3, rtol=0)


def test_histogram_matching_needs_references():
    sim = RandSimulate3T(**{**OFF, "histogram_match_prob": 1.0})
    x = brain_phantom()
    image, target = sim(x)
    assert "reference" not in sim.draw and torch.equal(image, x) and torch.equal(target, x)


def test_quantile_matching_equals_scikit_image_on_a_noisy_volume():
    x = brain_phantom(seed=2) + 0.05 * torch.randn((1, 40, 48, 36), generator=torch.Generator().manual_seed(0))
    reference = brain_phantom(seed=3)
    ours = QuantileHistogramMatch(reference)(x)
    exact = torch.as_tensor(HistogramMatch(reference.numpy())(x.numpy()))
    assert float((ours - exact).abs().mean()) < 1e-3


def test_quantisation_leaves_at_most_256_levels():
    sim = only(quantize_prob=1.0)
    image, _ = sim(brain_phantom())
    assert torch.unique(image).numel() <= 256


def test_reproducible_under_a_seed_and_equal_in_both_forms():
    x = brain_phantom()
    reference = brain_phantom(seed=5)

    def run(seed):
        sim = RandSimulate3T(references=[reference])
        sim.set_random_state(seed)
        return [sim(x) for _ in range(4)]

    first, again, other = run(7), run(7), run(8)
    for (a_image, a_target), (b_image, b_target) in zip(first, again):
        assert torch.equal(a_image, b_image) and torch.equal(a_target, b_target)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    dictionary = RandSimulate3Td(keys="label", output_key="image", mask_key=None, references=[reference])
    dictionary.set_random_state(7)
    for image, target in first:
        out = dictionary({"label": x})
        assert torch.equal(out["image"], image) and torch.equal(out["label"], target)


def test_randomize_false_repeats_the_last_draw():
    sim = RandSimulate3T()
    sim.set_random_state(11)
    x = brain_phantom()
    image, _ = sim(x)
    repeat, _ = sim(x, randomize=False)
    assert torch.equal(image, repeat)


def test_rejects_bad_ranges():
    with pytest.raises(ValueError, match="gamma_range"):
        RandSimulate3T(gamma_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="probability"):
        RandSimulate3T(noise_prob=1.5)
    with pytest.raises(ValueError, match="mask of shape"):
        RandSimulate3T()(brain_phantom(), mask=torch.ones(3, 3, 3))


def test_fixed_pair_prob_keeps_an_items_own_pair_at_that_rate():
    x = brain_phantom()
    own = torch.full_like(x, 0.25)
    transform = RandSimulate3Td(keys="label", output_key="image", mask_key=None, fixed_pair_prob=0.3)
    transform.set_random_state(3)
    kept = 0
    for _ in range(200):
        out = transform({"label": x, "image": own})
        if torch.equal(out["image"], own):
            kept += 1
            assert torch.equal(out["label"], x)
    assert 40 <= kept <= 80  # 60 expected; binomial sd 6.5
    # an item without its own 3T is always simulated
    assert not torch.equal(transform({"label": x})["image"], x)
    with pytest.raises(ValueError, match="fixed_pair_prob"):
        RandSimulate3Td(fixed_pair_prob=1.5)
