"""Tests of synth7t.metrics (spec watnet.md §5 evaluation protocol, §6.2 acceptance values).

The 2-D SSIM is checked against an independent NumPy/SciPy transcription of TF 2.9's ``tf.image.ssim``
(``_fspecial_gauss``, ``_ssim_helper`` with compensation 1, ``_ssim_per_channel``), which is what the seed ran,
and against MONAI ``SSIMMetric`` as the spec says; the 3-D SSIM against scikit-image and MONAI.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import torch
from monai.metrics import SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from skimage.metrics import structural_similarity

from synth7t.metrics import METRIC_NAMES, _ssim_maps, summarize, volume_metrics

SHAPE = (40, 48, 30)
ALL_KEYS = [*METRIC_NAMES, *(f"{n}_brain" for n in METRIC_NAMES)]


def _pair(seed: int = 0, shape: tuple[int, ...] = SHAPE, zero_slices: tuple[int, ...] = ()):
    """A smooth-ish [0, 1] target with zero background and a noisy prediction (float32 numpy)."""
    rng = np.random.default_rng(seed)
    target = rng.random(shape, dtype=np.float32)
    target = scipy.ndimage.uniform_filter(target, 3).astype(np.float32)
    target[:4] = 0  # background
    target[:, -5:] = 0
    pred = np.clip(target + rng.normal(0, 0.05, shape).astype(np.float32), 0, 1).astype(np.float32)
    for z in zero_slices:
        target[..., z] = 0
        pred[..., z] = 0
    return pred, target


def tf_ssim_reference(img1: np.ndarray, img2: np.ndarray, max_val: float = 1.0) -> tuple[float, np.ndarray]:
    """``tf.image.ssim(img1, img2, max_val)`` on one (H, W, C) image, transcribed to NumPy/SciPy in float64.

    Returns (mean over channels, per-channel values). TF: Gaussian window = softmax of -(i² + j²)/(2σ²) over
    coordinates range(11) - 5 (so it sums to 1), tiled per channel; depthwise 'VALID' conv as the reducer;
    luminance (2 μ0 μ1 + c1) / (μ0² + μ1² + c1); contrast-structure
    (reducer(2 x y) - 2 μ0 μ1 + c2) / (reducer(x² + y²) - (μ0² + μ1²) + c2); mean over H, W, then over C.
    """
    size, sigma, k1, k2 = 11, 1.5, 0.01, 0.03
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = -0.5 * coords**2 / sigma**2
    g = (g[None, :] + g[:, None]).reshape(-1)
    g = np.exp(g - g.max())
    kernel = (g / g.sum()).reshape(size, size)  # tf.nn.softmax

    def reducer(x: np.ndarray) -> np.ndarray:
        return np.stack(
            [scipy.signal.correlate2d(x[..., c], kernel, mode="valid") for c in range(x.shape[-1])], axis=-1
        )

    x = img1.astype(np.float32).astype(np.float64)  # tf.image.convert_image_dtype(..., float32)
    y = img2.astype(np.float32).astype(np.float64)
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    mean0, mean1 = reducer(x), reducer(y)
    num0 = mean0 * mean1 * 2.0
    den0 = mean0**2 + mean1**2
    luminance = (num0 + c1) / (den0 + c1)
    num1 = reducer(x * y) * 2.0
    den1 = reducer(x**2 + y**2)
    cs = (num1 - num0 + c2) / (den1 - den0 + c2)
    per_channel = (luminance * cs).mean(axis=(0, 1))
    return float(per_channel.mean()), per_channel


def test_identical_inputs():
    _, target = _pair()
    out = volume_metrics(target, target.copy())
    assert list(out) == ALL_KEYS
    for k in ("psnr", "psnr_brain"):
        assert out[k] == math.inf
    for k in ("mse", "mae", "mse_brain", "mae_brain"):
        assert out[k] == 0.0
    for k in ("ssim", "ssim3d", "ssim_brain", "ssim3d_brain"):
        assert out[k] == pytest.approx(1.0, abs=1e-7)


def test_error_metrics_against_numpy():
    pred, target = _pair(1)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[8:30, 5:40, 3:27] = True
    out = volume_metrics(pred, target, mask)
    d = pred.astype(np.float64) - target.astype(np.float64)
    mse, mae = np.mean(d**2), np.mean(np.abs(d))
    mse_b, mae_b = np.mean(d[mask] ** 2), np.mean(np.abs(d[mask]))
    assert out["mse"] == pytest.approx(mse, rel=1e-12)
    assert out["mae"] == pytest.approx(mae, rel=1e-12)
    assert out["psnr"] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-12)
    assert out["mse_brain"] == pytest.approx(mse_b, rel=1e-12)
    assert out["mae_brain"] == pytest.approx(mae_b, rel=1e-12)
    assert out["psnr_brain"] == pytest.approx(10 * np.log10(1.0 / mse_b), rel=1e-12)
    # data_range scales the PSNR peak
    out2 = volume_metrics(pred * 2, target * 2, mask, data_range=2.0)
    assert out2["psnr"] == pytest.approx(out["psnr"], rel=1e-9)
    assert out2["ssim"] == pytest.approx(out["ssim"], abs=1e-6)
    # default mask is target > 0
    default = volume_metrics(pred, target)
    assert default["mse_brain"] == pytest.approx(np.mean(d[target > 0] ** 2), rel=1e-12)


def test_ssim2d_matches_tf_reference_with_zero_slices():
    pred, target = _pair(2, zero_slices=(0, 1, 17, 29))
    tf_mean, per_slice = tf_ssim_reference(target, pred)
    np.testing.assert_array_equal(per_slice[[0, 1, 17, 29]], 1.0)  # all-zero slices score 1 in TF
    out = volume_metrics(pred, target)
    assert out["ssim"] == pytest.approx(tf_mean, abs=1e-6)
    # our per-slice values too (mean over each slice of the valid map)
    map2d, _ = _ssim_maps(torch.from_numpy(pred), torch.from_numpy(target), 1.0)
    np.testing.assert_allclose(map2d.double().mean((0, 1)).numpy(), per_slice, atol=2e-6)
    # in float64 the separable computation is TF's algorithm to rounding
    map64, _ = _ssim_maps(torch.from_numpy(pred).double(), torch.from_numpy(target).double(), 1.0)
    np.testing.assert_allclose(map64.mean((0, 1)).numpy(), per_slice, rtol=0, atol=1e-12)
    # masked SSIM restricted to the zero slices is exactly 1 (2-D windows do not cross slices)
    zmask = np.zeros(SHAPE, dtype=bool)
    zmask[..., [0, 17]] = True
    assert volume_metrics(pred, target, zmask)["ssim_brain"] == 1.0


def test_ssim2d_matches_monai_ssimmetric_as_spec_says():
    """Spec §5: MONAI SSIMMetric(spatial_dims=2, ...) on the (Z, 1, X, Y) batch, averaged, reproduces TF.

    It does, to MONAI's float32 rounding: MONAI casts to float32 (even float64 input) and its full 11x11 kernel
    conv leaves a ~+1.6e-6 bias on the mean here (per position up to ~1e-4) against the float64 TF transcription;
    our float32 separable filter stays within ~5e-8 of it.
    """
    pred, target = _pair(3, zero_slices=(5,))
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5,
                        k1=0.01, k2=0.03)
    to_batch = lambda a: torch.from_numpy(a).permute(2, 0, 1)[:, None]  # noqa: E731
    monai_val = float(metric(to_batch(pred), to_batch(target)).double().mean())
    tf_mean, _ = tf_ssim_reference(target, pred)
    assert monai_val == pytest.approx(tf_mean, abs=5e-6)
    ours = volume_metrics(pred, target)["ssim"]
    assert ours == pytest.approx(monai_val, abs=5e-6)
    assert ours == pytest.approx(tf_mean, abs=2e-7)


def test_separable_maps_equal_monai_compute_ssim_and_cs():
    """The separable shift-and-add filter gives MONAI's SSIM maps, to float32 rounding (see _ssim_maps)."""
    pred, target = _pair(4)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    map2d, map3d = _ssim_maps(p, t, 1.0)
    m2, _ = compute_ssim_and_cs(p.permute(2, 0, 1)[:, None], t.permute(2, 0, 1)[:, None], 2, (11, 11), (1.5, 1.5))
    m2 = m2[:, 0].permute(1, 2, 0)
    m3, _ = compute_ssim_and_cs(p[None, None], t[None, None], 3, (11, 11, 11), (1.5, 1.5, 1.5))
    m3 = m3[0, 0]
    ref2, ref3 = _ssim_maps(p.double(), t.double(), 1.0)  # same arithmetic in float64
    for ours, monai_map, ref in ((map2d, m2, ref2), (map3d, m3, ref3)):
        assert ours.shape == monai_map.shape == ref.shape
        # means agree to 1e-5 (MONAI's float32 full-kernel conv is off by a few 1e-6 from float64) ...
        assert float(ours.double().mean()) == pytest.approx(float(monai_map.double().mean()), abs=1e-5)
        # ... per position to float32 cancellation in sigma = E[x²] - E[x]² (c2 = 9e-4 amplifies it)
        torch.testing.assert_close(ours, monai_map, atol=5e-4, rtol=0)
        # and ours is the closer of the two to the float64 computation, on the mean and per position
        assert float(ours.double().mean()) == pytest.approx(float(ref.mean()), abs=2e-7)
        assert (ours.double() - ref).abs().max() < (monai_map.double() - ref).abs().max()
        torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=0)


def test_ssim3d_matches_skimage_and_monai():
    pred, target = _pair(5)
    out = volume_metrics(pred, target)
    sk, sk_map = structural_similarity(target.astype(np.float64), pred.astype(np.float64), gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)
    # skimage filters the whole image (reflect padding, truncate 3.5 -> 11 taps) and averages the map cropped by
    # (11 - 1) // 2 = 5: exactly the 'valid' positions. It runs in float64; we run in float32.
    assert out["ssim3d"] == pytest.approx(sk, abs=2e-7)
    _, map3d64 = _ssim_maps(torch.from_numpy(pred).double(), torch.from_numpy(target).double(), 1.0)
    np.testing.assert_allclose(map3d64.numpy(), sk_map[(slice(5, -5),) * 3], rtol=0, atol=1e-12)
    monai3d = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5)(
        torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None])
    assert out["ssim3d"] == pytest.approx(float(monai3d), abs=1e-5)
    # masked 3-D SSIM = mean of skimage's map over the window centres inside the mask
    mask = target > 0.45
    inner = (slice(5, -5),) * 3
    out_m = volume_metrics(pred, target, mask)
    assert out_m["ssim3d_brain"] == pytest.approx(sk_map[inner][mask[inner]].mean(), abs=2e-7)
    # and the 2-D one against skimage's per-channel SSIM (channel_axis = last axis = TF semantics)
    sk2, sk2_map = structural_similarity(target.astype(np.float64), pred.astype(np.float64), gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1,
                                         full=True)
    assert out["ssim"] == pytest.approx(sk2, abs=2e-7)
    inner2 = (slice(5, -5), slice(5, -5), slice(None))
    assert out_m["ssim_brain"] == pytest.approx(sk2_map[inner2][mask[inner2]].mean(), abs=2e-7)


def test_masked_ssim_all_ones_and_identical_region():
    pred, target = _pair(6)
    whole = volume_metrics(pred, target)
    ones = volume_metrics(pred, target, np.ones(SHAPE, dtype=np.float32))
    for n in METRIC_NAMES:
        assert ones[f"{n}_brain"] == pytest.approx(whole[n], rel=1e-12, abs=1e-12)
    # pred == target inside a box; the mask holds exactly the window centres whose windows stay in the box
    box = (slice(10, 30), slice(12, 36), slice(8, 24))
    pred2 = pred.copy()
    pred2[box] = target[box]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[15:25, 17:31, 13:19] = True
    out = volume_metrics(pred2, target, mask)
    assert out["ssim_brain"] == pytest.approx(1.0, abs=1e-7)
    assert out["ssim3d_brain"] == pytest.approx(1.0, abs=1e-7)
    assert out["mse_brain"] == 0.0 and out["psnr_brain"] == math.inf
    assert out["ssim"] < 0.99 and out["ssim3d"] < 0.99
    # one voxel more in each direction reaches windows that see the noise
    mask_big = np.zeros(SHAPE, dtype=bool)
    mask_big[15:26, 17:31, 13:19] = True
    assert volume_metrics(pred2, target, mask_big)["ssim_brain"] < 1.0 - 1e-6
    mask_big = np.zeros(SHAPE, dtype=bool)
    mask_big[15:25, 17:31, 12:19] = True
    assert volume_metrics(pred2, target, mask_big)["ssim3d_brain"] < 1.0 - 1e-6
    # an empty mask gives NaN brain values
    empty = volume_metrics(pred, target, np.zeros(SHAPE))
    assert all(math.isnan(empty[f"{n}_brain"]) for n in METRIC_NAMES)


def test_input_types_and_shapes_give_identical_results():
    pred, target = _pair(7)
    mask = target > 0.3
    ref = volume_metrics(pred, target, mask)
    variants = [
        (torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask)),
        (pred[None], target[None], mask[None]),
        (torch.from_numpy(pred)[None], target, mask.astype(np.float32)),
        (pred, torch.from_numpy(target)[None], torch.from_numpy(mask).float()[None]),
    ]
    for p, t, m in variants:
        assert volume_metrics(p, t, m) == ref
    with pytest.raises(ValueError):
        volume_metrics(pred, target[:-1])
    with pytest.raises(ValueError):
        volume_metrics(pred[:, :10], target[:, :10])  # in-plane smaller than the SSIM window
    with pytest.raises(ValueError):
        volume_metrics(pred, target, mask[:-1])


def test_requires_grad_input():
    pred, target = _pair(8)
    p = torch.from_numpy(pred).requires_grad_(True)
    assert volume_metrics(p, target) == volume_metrics(pred, target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pred, target = _pair(9)
    cpu = volume_metrics(pred, target)
    gpu = volume_metrics(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda())
    for k in ALL_KEYS:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-6, abs=1e-7)


def test_realistic_slice_size():
    """182 x 218 slices as in the data (48 of them, to stay fast): float32 results vs MONAI and float64."""
    pred, target = _pair(10, shape=(182, 218, 48), zero_slices=tuple(range(6)))
    out = volume_metrics(pred, target, target > 0.4)
    assert all(np.isfinite(out[k]) for k in ALL_KEYS)
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5)
    monai_val = float(metric(torch.from_numpy(pred).permute(2, 0, 1)[:, None],
                             torch.from_numpy(target).permute(2, 0, 1)[:, None]).double().mean())
    assert out["ssim"] == pytest.approx(monai_val, abs=1e-5)
    ref2, ref3 = _ssim_maps(torch.from_numpy(pred).double(), torch.from_numpy(target).double(), 1.0)
    assert out["ssim"] == pytest.approx(float(ref2.mean()), abs=2e-7)
    assert out["ssim3d"] == pytest.approx(float(ref3.mean()), abs=2e-7)


def test_summarize_population_std():
    rows = [
        {"subject": "0101", "psnr": 27.0, "ssim": 0.95, "extra": 1},
        {"subject": "0102", "psnr": 29.0, "ssim": 0.96},
        {"subject": "0103", "psnr": 31.5, "ssim": np.float32(0.91), "extra": 3},
    ]
    s = summarize(rows)
    assert set(s) == {"psnr", "ssim", "extra"}
    psnr = np.array([27.0, 29.0, 31.5])
    assert s["psnr"]["mean"] == pytest.approx(psnr.mean())
    assert s["psnr"]["std"] == pytest.approx(np.std(psnr))  # ddof 0
    assert s["psnr"]["std"] != pytest.approx(np.std(psnr, ddof=1))
    assert s["psnr"]["n"] == 3
    assert s["ssim"]["mean"] == pytest.approx(np.mean([0.95, 0.96, float(np.float32(0.91))]))
    assert s["extra"] == {"mean": 2.0, "std": 1.0, "n": 2}


def test_thin_volumes_get_2d_ssim_and_nan_3d_ssim():
    rng = np.random.default_rng(7)
    target = rng.random((20, 18, 6)).astype(np.float32)
    pred = np.clip(target + 0.05 * rng.standard_normal(target.shape), 0, 1).astype(np.float32)
    values = volume_metrics(pred, target, np.ones_like(target))
    assert np.isnan(values["ssim3d"]) and np.isnan(values["ssim3d_brain"])
    assert 0 < values["ssim"] < 1 and values["ssim_brain"] == pytest.approx(values["ssim"])
    with pytest.raises(ValueError, match=">= 11"):
        volume_metrics(pred[:10], target[:10])


def test_global_ssim_is_the_thesis_formula_by_hand():
    """Spec ganunet.md §7.1: (2 mu_x mu_y + c1)(2 cov + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2))."""
    target = np.zeros((12, 12, 2))
    target[:, :6] = 1.0  # mean 0.5, variance 0.25
    pred = np.full_like(target, 0.5)  # mean 0.5, variance 0, covariance 0
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * 0.25 + c1) * c2 / ((0.25 + 0.25 + c1) * (0.25 + c2))
    values = volume_metrics(pred, target, np.ones_like(target))
    assert values["ssim_global"] == pytest.approx(expected, rel=1e-12)
    assert values["ssim_global_brain"] == pytest.approx(expected, rel=1e-12)
    assert volume_metrics(target, target)["ssim_global"] == pytest.approx(1.0)
    # inside the mask only: the target's bright half, predicted exactly
    assert volume_metrics(target, target, target)["ssim_global_brain"] == pytest.approx(1.0)
