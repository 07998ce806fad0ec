"""Tests of synth7t.transforms.intensity and synth7t.transforms.slabs, and of MONAI's invertible padding as the
bundles use it (spec watnet.md §1.1 and §11.1 normalisation, §1.4 slabs, §3.2 full-slice padding to multiples
of 8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, DivisiblePadd, Invertd, Orientationd

from synth7t.transforms import (
    NonzeroMask,
    NonzeroMaskd,
    PercentileScaleIntensity,
    PercentileScaleIntensityd,
    SlabToChannels,
    SlabToChannelsd,
    slab_to_channels,
)

SHAPE = (9, 8, 7)
AFFINE = np.array([[0, 0, -1.2, 30.0], [-0.9, 0, 0, 12.0], [0, 1.1, 0, -7.0], [0, 0, 0, 1]])


def _volume(channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped-like volume: positive values inside a box 'brain', exact zeros outside; and that box mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:8, 1:7, 1:6] = True
    image = np.zeros((channels, *SHAPE), dtype=np.float32)
    for c in range(channels):
        image[c][mask] = rng.gamma(2.0, 50.0 * (c + 1), size=mask.sum()).astype(np.float32) + 1.0
    return image, mask


def _expected(channel: np.ndarray, selection: np.ndarray, lower: float, upper: float, clip: bool) -> np.ndarray:
    low, high = np.percentile(channel[selection].astype(np.float64), [lower, upper])
    scaled = (channel.astype(np.float64) - low) / (high - low)
    return np.clip(scaled, 0, 1) if clip else scaled


# ---------------------------------------------------------------------------------------- PercentileScaleIntensity


@pytest.mark.parametrize("lower, upper", [(0.0, 99.0), (1.0, 99.0), (5.0, 95.0), (0.0, 100.0)])
def test_percentile_scale_without_mask_uses_nonzero_voxels(lower, upper):
    image, mask = _volume()
    out = PercentileScaleIntensity(lower, upper)(torch.as_tensor(image))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == image.shape
    np.testing.assert_allclose(out[0].numpy(), _expected(image[0], image[0] != 0, lower, upper, True), atol=1e-5)
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    assert (out[0].numpy()[~mask] == 0).all()  # background stays 0


def test_percentile_scale_maps_percentiles_to_0_and_1_without_clipping():
    image, mask = _volume(seed=1)
    out = PercentileScaleIntensity(2.0, 90.0, clip=False)(torch.as_tensor(image))[0].numpy()
    low, high = np.percentile(image[0][mask], [2.0, 90.0])
    expected = (image[0] - low) / (high - low)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert out.max() > 1.0 and out[mask].min() < 0.0  # values beyond the percentiles are kept
    # the scaling is affine, so the percentiles of the output inside the brain are exactly 0 and 1
    np.testing.assert_allclose(np.percentile(out[mask], [2.0, 90.0]), [0.0, 1.0], atol=1e-5)


def test_percentile_scale_with_mask_uses_mask_voxels_only():
    image, mask = _volume(seed=2)
    sub_mask = np.zeros_like(mask)
    sub_mask[3:6, 2:5, 2:4] = True  # a smaller region: its percentiles differ from the whole brain's
    out = PercentileScaleIntensity(1.0, 99.0)(torch.as_tensor(image), torch.as_tensor(sub_mask[None]))
    np.testing.assert_allclose(out[0].numpy(), _expected(image[0], sub_mask, 1.0, 99.0, True), atol=1e-5)
    whole = PercentileScaleIntensity(1.0, 99.0)(torch.as_tensor(image))
    assert not np.allclose(out.numpy(), whole.numpy(), atol=1e-3)
    # a mask that includes background voxels pulls the lower percentile to 0
    out_box = PercentileScaleIntensity(10.0, 99.0, clip=False)(torch.as_tensor(image), torch.ones(SHAPE))
    np.testing.assert_allclose(
        out_box[0].numpy(), _expected(image[0], np.ones(SHAPE, bool), 10.0, 99.0, False), rtol=1e-5, atol=1e-5
    )


def test_percentile_scale_mask_shapes_are_equivalent():
    image, mask = _volume(seed=3)
    sub_mask = mask.copy()
    sub_mask[2:4] = False
    scaler = PercentileScaleIntensity(1.0, 99.0)
    with_channel = scaler(torch.as_tensor(image), torch.as_tensor(sub_mask[None].astype(np.uint8)))
    without_channel = scaler(torch.as_tensor(image), torch.as_tensor(sub_mask))
    as_numpy = scaler(torch.as_tensor(image), sub_mask.astype(np.float32) * 3.0)  # any non-zero is inside
    torch.testing.assert_close(with_channel, without_channel, rtol=0, atol=0)
    torch.testing.assert_close(with_channel, as_numpy, rtol=0, atol=0)
    np.testing.assert_allclose(with_channel[0].numpy(), _expected(image[0], sub_mask, 1.0, 99.0, True), atol=1e-5)


def test_percentile_scale_channels_are_independent():
    image, mask = _volume(channels=2, seed=4)
    image[1] *= 7.0
    image[1][2, 1, 1] = 0.0  # channel 1 has a zero inside the brain: its own non-zero selection differs
    scaler = PercentileScaleIntensity(1.0, 99.0)
    out = scaler(torch.as_tensor(image))
    for c in range(2):
        np.testing.assert_allclose(out[c].numpy(), _expected(image[c], image[c] != 0, 1.0, 99.0, True), atol=1e-5)
        torch.testing.assert_close(out[c : c + 1], scaler(torch.as_tensor(image[c : c + 1])), rtol=0, atol=0)
    assert out[0].max().item() == 1.0 and out[1].max().item() == 1.0


def test_percentile_scale_blank_volume_raises():
    with pytest.raises(ValueError, match="blank"):
        PercentileScaleIntensity()(torch.zeros(1, *SHAPE))
    image, _ = _volume()
    with pytest.raises(ValueError):
        PercentileScaleIntensity()(torch.as_tensor(image), torch.zeros(1, *SHAPE))


@pytest.mark.parametrize("lower, upper", [(50.0, 50.0), (60.0, 40.0), (-1.0, 99.0), (0.0, 100.5)])
def test_percentile_scale_invalid_percentiles_raise(lower, upper):
    with pytest.raises(ValueError):
        PercentileScaleIntensity(lower, upper)


def test_percentile_scale_keeps_container_types():
    image, _ = _volume(seed=5)
    affine = torch.as_tensor(AFFINE, dtype=torch.float64)
    meta_in = MetaTensor(torch.as_tensor(image), affine=affine)
    meta_out = PercentileScaleIntensity(1.0, 99.0)(meta_in)
    assert isinstance(meta_out, MetaTensor)
    torch.testing.assert_close(meta_out.affine.double(), affine)
    numpy_out = PercentileScaleIntensity(1.0, 99.0)(image)
    assert isinstance(numpy_out, np.ndarray) and numpy_out.dtype == np.float32
    np.testing.assert_allclose(numpy_out, meta_out.as_tensor().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(numpy_out[0], _expected(image[0], image[0] != 0, 1.0, 99.0, True), atol=1e-5)
    integer_out = PercentileScaleIntensity(1.0, 99.0)(image.round().astype(np.int16))
    assert isinstance(integer_out, np.ndarray) and integer_out.dtype == np.float32


def test_percentile_scale_dictionary_form_equals_array_form():
    image, mask = _volume(channels=2, seed=6)
    sub_mask = mask.copy()
    sub_mask[:, :3] = False
    data = {"image": torch.as_tensor(image), "label": torch.as_tensor(image * 2 + 1), "mask": sub_mask[None]}
    out = PercentileScaleIntensityd(["image", "label"], mask_key="mask", lower=1.0, upper=98.0)(data)
    scaler = PercentileScaleIntensity(1.0, 98.0)
    for key in ("image", "label"):
        torch.testing.assert_close(out[key], scaler(data[key], sub_mask[None]), rtol=0, atol=0)
    assert out["mask"] is data["mask"]
    no_mask = PercentileScaleIntensityd("image", lower=1.0, upper=98.0, clip=False)(data)
    torch.testing.assert_close(no_mask["image"], PercentileScaleIntensity(1.0, 98.0, False)(data["image"]))
    torch.testing.assert_close(no_mask["label"], data["label"])  # not a key: untouched


# --------------------------------------------------------------------------------------------------------- NonzeroMask


def test_nonzero_mask_covers_all_channels():
    image = np.zeros((2, *SHAPE), dtype=np.float32)
    image[0, 1:3, 1:3, 1:3] = 2.0
    image[1, 5:7, 4:6, 2:5] = -1.0  # negative values count as non-zero
    expected = (image != 0).any(0, keepdims=True).astype(np.uint8)
    out = NonzeroMask()(torch.as_tensor(image))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == (1, *SHAPE)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert out.sum().item() == 8 + 12
    numpy_out = NonzeroMask()(image)
    assert isinstance(numpy_out, np.ndarray) and numpy_out.dtype == np.uint8
    np.testing.assert_array_equal(numpy_out, expected)
    meta_out = NonzeroMask()(MetaTensor(torch.as_tensor(image), affine=torch.as_tensor(AFFINE)))
    assert isinstance(meta_out, MetaTensor)
    torch.testing.assert_close(meta_out.affine.double(), torch.as_tensor(AFFINE, dtype=torch.float64))


def test_nonzero_maskd_keeps_or_creates_the_mask():
    image, mask = _volume(seed=7)
    given = np.zeros((1, *SHAPE), dtype=np.float32)
    given[0, 0:2, 0:3, 0:2] = 0.3
    given[0, 8, 7, 6] = 5.0
    out = NonzeroMaskd(source_key="image", mask_key="mask")({"image": torch.as_tensor(image), "mask": given})
    assert out["mask"].dtype == np.uint8
    np.testing.assert_array_equal(out["mask"], (given != 0).astype(np.uint8))  # kept, binarised, not the image's
    created = NonzeroMaskd(source_key="image", mask_key="mask")({"image": torch.as_tensor(image)})
    assert created["mask"].dtype == torch.uint8 and created["mask"].shape == (1, *SHAPE)
    np.testing.assert_array_equal(created["mask"][0].numpy(), mask.astype(np.uint8))
    from_none = NonzeroMaskd(source_key="t1", mask_key="brain")({"t1": torch.as_tensor(image), "brain": None})
    np.testing.assert_array_equal(from_none["brain"][0].numpy(), mask.astype(np.uint8))
    assert "mask" not in from_none


# ------------------------------------------------------------------------------------------------------ SlabToChannels


@pytest.mark.parametrize("channels, depth", [(1, 3), (2, 3), (3, 5), (2, 1)])
def test_slab_to_channels_layout(channels, depth):
    rng = np.random.default_rng(channels * 10 + depth)
    slab = rng.normal(size=(channels, 6, 5, depth)).astype(np.float32)
    for img in (slab, torch.as_tensor(slab)):
        out = SlabToChannels()(img)
        assert type(out) is type(img)
        assert tuple(out.shape) == (channels * depth, 6, 5)
        out_np = np.asarray(out)
        for c in range(channels):
            for k in range(depth):
                np.testing.assert_array_equal(out_np[c * depth + k], slab[c, :, :, k])
    torch.testing.assert_close(slab_to_channels(torch.as_tensor(slab)), SlabToChannels()(torch.as_tensor(slab)))


def test_slab_to_channels_rejects_non_4d():
    with pytest.raises(ValueError):
        SlabToChannels()(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError):
        SlabToChannels()(np.zeros((1, 2, 3, 4, 5)))


def test_slab_to_channelsd():
    slab = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    out = SlabToChannelsd(["image", "label"])({"image": slab, "label": slab + 1, "mask": slab})
    assert out["image"].shape == (6, 4, 3)
    torch.testing.assert_close(out["image"][4], slab[1, :, :, 1])
    torch.testing.assert_close(out["label"], slab_to_channels(slab + 1))
    assert out["mask"] is slab


# ----------------------------------------------------------------------------------- invertible padding (MONAI)


@pytest.mark.parametrize("shape, padded_shape", [((9, 13, 5), (8, 16, 13)), ((7, 6, 3), (8, 8, 6))])
def test_divisible_pad_after_orientation_inverts_exactly(shape, padded_shape):
    rng = np.random.default_rng(8)
    array = rng.random((1, *shape)).astype(np.float32)
    affine = torch.as_tensor(AFFINE, dtype=torch.float64)  # axes permuted and flipped with respect to RAS
    image = MetaTensor(torch.as_tensor(array), affine=affine)
    transform = Compose([Orientationd(keys="image", axcodes="RAS"), DivisiblePadd(keys="image", k=(8, 8, 1))])
    data = transform({"image": image})
    padded = data["image"]
    # RAS axes are array axes (2, 0, 1) of the input; R and A padded to multiples of 8, S (slices) untouched
    assert tuple(padded.shape) == (1, *padded_shape)
    assert not np.allclose(padded.affine.numpy(), AFFINE)
    pred = MetaTensor(padded.as_tensor().clone(), meta=padded.meta, applied_operations=padded.applied_operations)
    data["pred"] = pred
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image")(data)["pred"]
    assert isinstance(inverted, MetaTensor)
    assert tuple(inverted.shape) == (1, *shape)
    np.testing.assert_array_equal(inverted.numpy(), array)
    np.testing.assert_allclose(inverted.affine.numpy(), AFFINE, rtol=0, atol=1e-6)
