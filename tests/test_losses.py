"""Tests of synth7t.losses: Caffe's ``L1Loss`` of the released WATNet solver (spec watnet.md §11.1 "Loss": sum
|pred - 7T| / batch size), and the GAN losses of the thesis and the 9.4T study."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from conftest import tiny_hub_cache
from synth7t.data import InputError
from synth7t.losses import (
    GradientDifferenceLoss,
    PerSampleSumL1Loss,
    SynthesisLoss,
    WassersteinAdversarialLoss,
    critic_scores,
    gradient_penalty,
    radimagenet_perceptual_loss,
)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (4, 3, 16, 12), (5, 2, 3, 4, 6), (3, 7)])
def test_per_sample_sum_l1_value(shape):
    generator = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b = torch.randn(shape, generator=generator, dtype=torch.float64)
    loss = PerSampleSumL1Loss()(a, b)
    assert loss.ndim == 0
    expected = sum(abs(x - y) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / shape[0]
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    per_voxel = torch.nn.L1Loss()(a, b)
    assert loss.item() == pytest.approx(per_voxel.item() * (a.numel() / shape[0]), rel=1e-12)


def test_per_sample_sum_l1_gradient():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 6, 5, generator=generator, dtype=torch.float64)
    PerSampleSumL1Loss()(a, b).backward()
    torch.testing.assert_close(a.grad, torch.sign(a.detach() - b) / 4, rtol=0, atol=1e-15)
    reference = a.detach().clone().requires_grad_(True)
    (torch.nn.L1Loss(reduction="sum")(reference, b) / 4).backward()
    torch.testing.assert_close(a.grad, reference.grad, rtol=0, atol=1e-15)


def test_per_sample_sum_l1_zero_and_scale():
    x = torch.rand(2, 3, 4, 4)
    assert PerSampleSumL1Loss()(x, x).item() == 0.0
    # 64 x 64 x 3 patches: the sum is 12,288 times the per-voxel mean (the weight-decay balance of §11.1)
    a, b = torch.zeros(8, 3, 64, 64), torch.full((8, 3, 64, 64), 0.5)
    assert PerSampleSumL1Loss()(a, b).item() == pytest.approx(0.5 * 12_288)


# --- GAN losses (spec ganunet.md §5, 9t4-and-abstract.md §3.4) ---------------------------------------------------


class _SquareCritic(nn.Module):
    """D(x) = x ** 2 per pixel: the per-sample mean has gradient 2 x / n."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.square()


def test_gradient_penalty_of_a_linear_critic_by_hand():
    critic = nn.Conv2d(1, 1, kernel_size=1)
    with torch.no_grad():
        critic.weight.fill_(3.0)
        critic.bias.fill_(-2.0)
    real, fake = torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)
    # mean D = 3 mean(x) - 2: gradient 3/4 at each of 4 pixels, norm 1.5, penalty (1.5 - 1)^2 for any mix
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0.25)


def test_gradient_penalty_of_a_quadratic_critic_by_hand():
    real = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    fake = torch.zeros_like(real)
    # mixes 0.5 and 1.0 at one pixel: gradients 2 * 0.5 / 4 = 0.25 and 2 * 1 / 4 = 0.5
    penalty = gradient_penalty(_SquareCritic(), real, fake, epsilon=torch.tensor([0.5, 1.0]))
    assert penalty.item() == pytest.approx(((0.25 - 1) ** 2 + (0.5 - 1) ** 2) / 2)


def test_gradient_penalty_trains_the_critic_and_not_the_generator():
    critic = PatchDiscriminator(
        spatial_dims=2, channels=4, in_channels=1, num_layers_d=2, norm=("GROUP", {"num_groups": 1})
    )
    real = torch.rand(2, 1, 16, 16)
    fake = torch.rand(2, 1, 16, 16, requires_grad=True)
    penalty = gradient_penalty(critic, real, fake)
    assert critic_scores(critic, real).shape == critic(real)[-1].shape == (2, 1, 2, 2)
    penalty.backward()
    assert penalty.item() > 0
    # every parameter but the output bias, which shifts the scores without changing their input gradient
    untouched = [name for name, p in critic.named_parameters() if p.grad is None]
    assert untouched == ["final_conv.conv.bias"]
    assert fake.grad is None


def test_wasserstein_terms():
    loss = WassersteinAdversarialLoss()
    scores = torch.tensor([[[[1.0, 3.0]]], [[[-2.0, 0.0]]]])  # mean 0.5
    assert loss(scores, target_is_real=True, for_discriminator=True).item() == pytest.approx(-0.5)
    assert loss(scores, target_is_real=False, for_discriminator=True).item() == pytest.approx(0.5)
    assert loss(scores, target_is_real=True, for_discriminator=False).item() == pytest.approx(-0.5)


def test_gradient_difference_loss_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    target = torch.zeros_like(pred)
    # zero padding: |dx| rows [1, 1, 2], [3, 2, 5]; |dy| columns [1, 2, 3], [2, 3, 5]: (44 + 52) / 4
    assert GradientDifferenceLoss("zero")(pred, target).item() == pytest.approx(24.0)
    # valid: |dx| 1, 2 and |dy| 2, 3: (5 + 13) / 4
    assert GradientDifferenceLoss("valid")(pred, target).item() == pytest.approx(4.5)
    assert GradientDifferenceLoss("valid", exponent=1)(pred, target).item() == pytest.approx(2.0)


def test_gradient_difference_loss_equals_the_reference_convolutions():
    """Nie et al.'s gdl_loss: fixed 1x2 and 2x1 convs with zero padding, magnitudes, p = 2, / (B C H W)."""
    generator = torch.Generator().manual_seed(3)
    pred, target = torch.rand(3, 1, 7, 6, generator=generator), torch.rand(3, 1, 7, 6, generator=generator)
    kernel_x = torch.tensor([[[[-1.0, 1.0]]]])
    kernel_y = torch.tensor([[[[1.0], [-1.0]]]])

    def grads(x):
        return (
            nn.functional.conv2d(x, kernel_x, padding=(0, 1)).abs(),
            nn.functional.conv2d(x, kernel_y, padding=(1, 0)).abs(),
        )

    (pdx, pdy), (tdx, tdy) = grads(pred), grads(target)
    expected = ((tdx - pdx).square().sum() + (tdy - pdy).square().sum()) / target.numel()
    torch.testing.assert_close(GradientDifferenceLoss("zero")(pred, target), expected)


def test_gradient_difference_loss_border_behaviour():
    image = torch.rand(2, 1, 8, 8)
    assert GradientDifferenceLoss("zero")(image, image).item() == 0.0
    # a constant offset has no interior gradient, but the zero-padded form sees the shifted border pixels
    assert GradientDifferenceLoss("valid")(image + 0.3, image).item() == pytest.approx(0.0, abs=1e-10)
    assert GradientDifferenceLoss("zero")(image + 0.3, image).item() > 0.01
    with pytest.raises(ValueError, match="padding must be"):
        GradientDifferenceLoss("reflect")


# --- the generator's supervised loss and the RadImageNet perceptual loss (spec ganunet.md §4) -------------------


@pytest.fixture
def restore_hub_dir():
    previous = torch.hub.get_dir()
    yield
    torch.hub.set_dir(previous)


def test_perceptual_loss_loads_from_a_local_hub_cache(tmp_path, restore_hub_dir):
    loss = radimagenet_perceptual_loss(cache_dir=tiny_hub_cache(tmp_path / "hub"))
    assert not any(p.requires_grad for p in loss.parameters())
    image = torch.rand(2, 1, 16, 16)
    assert loss(image, image).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(image, torch.rand(2, 1, 16, 16)).item() > 0


def test_perceptual_loss_without_weights_names_the_cache_before_any_download(tmp_path, restore_hub_dir):
    with pytest.raises(
        InputError,
        match=r"Project-MONAI_perceptual-models_main: .* not in this torch hub cache.*perceptual_weight to 0",
    ):
        radimagenet_perceptual_loss(cache_dir=tmp_path / "empty")


def test_perceptual_loss_with_broken_weights_names_the_cache(tmp_path, restore_hub_dir):
    cache = tiny_hub_cache(tmp_path / "hub")
    (cache / "Project-MONAI_perceptual-models_main" / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="failed to load"):
        radimagenet_perceptual_loss(cache_dir=cache)


class _MeanFeatureDistance(nn.Module):
    """A perceptual stand-in with a known value: |mean(pred) - mean(target)| per sample, averaged."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (input.mean(dim=(1, 2, 3)) - target.mean(dim=(1, 2, 3))).abs()


def test_synthesis_loss_adds_the_weighted_terms():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    target = torch.zeros_like(pred)
    assert SynthesisLoss()(pred, target).item() == pytest.approx(11 / 4)
    with_perceptual = SynthesisLoss(_MeanFeatureDistance(), perceptual_weight=0.1)
    assert with_perceptual(pred, target).item() == pytest.approx(11 / 4 + 0.1 * 11 / 4)
    with_gdl = SynthesisLoss(gradient_difference=GradientDifferenceLoss("valid"), gradient_difference_weight=0.5)
    assert with_gdl(pred, target).item() == pytest.approx(11 / 4 + 0.5 * 4.5)


def test_synthesis_loss_pixel_term_is_l1_or_mse():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    target = torch.zeros_like(pred)
    assert SynthesisLoss(pixel_loss="mse")(pred, target).item() == pytest.approx(39 / 4)
    gdl = GradientDifferenceLoss("valid")
    with_gdl = SynthesisLoss(gradient_difference=gdl, gradient_difference_weight=0.5, pixel_loss="mse")
    assert with_gdl(pred, target).item() == pytest.approx(39 / 4 + 0.5 * 4.5)
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        SynthesisLoss(pixel_loss="l2")


def test_synthesis_loss_skips_zero_weighted_terms_and_needs_modules_for_the_others():
    assert SynthesisLoss(_MeanFeatureDistance(), perceptual_weight=0.0).perceptual is None
    with pytest.raises(ValueError, match="needs a perceptual loss module"):
        SynthesisLoss(perceptual_weight=1e-3)
    with pytest.raises(ValueError, match="needs a gradient difference loss module"):
        SynthesisLoss(gradient_difference_weight=1.0)


def test_bce_patchgan_terms_on_known_logits():
    """Seed 003 Eqs. 1-2 as train_gan.yaml composes them with MONAI's PatchAdversarialLoss(criterion="bce"):
    critic = BCE(D(real), 1) + BCE(D(fake), 0) per patch, generator = BCE(D(fake), 1), on logits (no sigmoid in D)."""
    bce = PatchAdversarialLoss(criterion="bce")
    zeros = torch.zeros(2, 1, 3, 3)
    critic = bce(zeros, target_is_real=True, for_discriminator=True) + bce(
        zeros, target_is_real=False, for_discriminator=True
    )
    assert critic.item() == pytest.approx(2 * np.log(2), rel=1e-6)
    logits = torch.tensor([[[[2.0, -1.0]]]])
    expected_generator = np.mean(np.log1p(np.exp(-np.array([2.0, -1.0]))))  # softplus(-x): -log sigmoid(x)
    assert bce(logits, target_is_real=True, for_discriminator=False).item() == pytest.approx(
        expected_generator, rel=1e-5
    )
    expected_fake = np.mean(np.log1p(np.exp(np.array([2.0, -1.0]))))  # softplus(x): -log(1 - sigmoid(x))
    assert bce(logits, target_is_real=False, for_discriminator=True).item() == pytest.approx(expected_fake, rel=1e-5)
