"""RandGMMIntensity(d): the thesis's three-class Gaussian-mixture intensity augmentation (spec ganunet.md §2.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from synth7t.transforms import RandGMMIntensity, RandGMMIntensityd

CLASSES = ((0.2, 0.02), (0.5, 0.03), (0.8, 0.03))  # CSF, grey matter, white matter: mean, std


def _three_class_volume(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((1, 24, 24, 12), dtype=int)
    labels[:, 4:20, 4:20, 2:10] = rng.integers(1, 4, size=(1, 16, 16, 8))
    image = np.zeros(labels.shape)
    for k, (mean, std) in enumerate(CLASSES, start=1):
        image[labels == k] = rng.normal(mean, std, (labels == k).sum())
    mask = (labels > 0).astype(np.uint8)
    return torch.as_tensor(image, dtype=torch.float32), torch.as_tensor(mask), labels


def _with_deltas(transform: RandGMMIntensity, means, stds) -> RandGMMIntensity:
    transform._do_transform = True
    transform._mean_deltas, transform._std_deltas = np.asarray(means, float), np.asarray(stds, float)
    return transform


def test_fit_finds_the_three_classes_in_order():
    image, mask, _ = _three_class_volume()
    mixture = RandGMMIntensity().fit(image[mask.bool()].double().numpy())
    np.testing.assert_allclose(mixture.means_[:, 0], [m for m, _ in CLASSES], atol=0.01)
    np.testing.assert_allclose(np.sqrt(mixture.covariances_.ravel()), [s for _, s in CLASSES], atol=0.005)


@pytest.mark.parametrize("soft", [True, False])
def test_no_shift_is_the_identity(soft):
    image, mask, _ = _three_class_volume()
    out = _with_deltas(RandGMMIntensity(soft_assignment=soft), [0, 0, 0], [0, 0, 0])(image, mask, randomize=False)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("soft", [True, False])
def test_each_class_moves_by_its_own_shift(soft):
    image, mask, labels = _three_class_volume()
    deltas = [0.08, 0.0, -0.06]
    out = _with_deltas(RandGMMIntensity(soft_assignment=soft), deltas, [0, 0.015, 0])(image, mask, randomize=False)
    for k, delta in enumerate(deltas, start=1):
        region = torch.as_tensor(labels == k)
        assert (out[region].mean() - image[region].mean()).item() == pytest.approx(delta, abs=0.005)
    grey = torch.as_tensor(labels == 2)
    assert (out[grey].std() / image[grey].std()).item() == pytest.approx((0.03 + 0.015) / 0.03, rel=0.08)


def test_background_is_untouched_and_metadata_kept():
    image, mask, _ = _three_class_volume()
    meta_image = MetaTensor(image, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = _with_deltas(RandGMMIntensity(), [0.1, 0.1, 0.1], [0, 0, 0])(meta_image, mask, randomize=False)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, meta_image.affine)
    assert torch.equal(out[mask == 0], image[mask == 0])
    assert out.dtype == image.dtype


def test_probability_zero_returns_the_input():
    image, mask, _ = _three_class_volume()
    assert RandGMMIntensity(prob=0.0)(image, mask) is image


def test_dictionary_form_is_reproducible_and_random():
    image, mask, _ = _three_class_volume()
    data = {"image": image, "mask": mask, "label": image.clone()}
    first = RandGMMIntensityd(keys="image").set_random_state(seed=3)(data)
    again = RandGMMIntensityd(keys="image").set_random_state(seed=3)(data)
    other = RandGMMIntensityd(keys="image").set_random_state(seed=4)(data)
    torch.testing.assert_close(first["image"], again["image"])
    assert not torch.allclose(first["image"], other["image"])
    assert torch.equal(first["label"], image)  # only the 3T input is augmented
    shift = (first["image"] - image)[mask.bool()].abs().max().item()
    assert 0 < shift < 0.05 + 3 * 0.02 * 4  # bounded by the mean shift plus the spread change at a few sigmas


def test_too_few_brain_voxels_is_an_error():
    image = torch.zeros(1, 4, 4, 4)
    image[0, 0, 0, :3] = torch.tensor([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="too few brain voxels"):
        _with_deltas(RandGMMIntensity(), [0, 0, 0], [0, 0, 0])(image, randomize=False)
