"""Losses the papers use that PyTorch and MONAI do not provide as such."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.losses import PerceptualLoss
from torch import nn

from synth7t.errors import InputError

__all__ = [
    "GradientDifferenceLoss",
    "PerSampleSumL1Loss",
    "SynthesisLoss",
    "WassersteinAdversarialLoss",
    "critic_scores",
    "gradient_penalty",
    "radimagenet_perceptual_loss",
]


class PerSampleSumL1Loss(nn.Module):
    """L1 distance summed over each sample's voxels and averaged over the batch, as Caffe's ``L1Loss``.

    The released WATNet solver (spec watnet.md §11.1 "Loss") minimises ``sum |pred - 7T| / batch size``: a
    per-sample sum, not ``torch.nn.L1Loss``'s per-voxel mean. Adam is invariant to the scale of the loss, but the
    solver's L2 weight decay (1e-4) is not: with a per-voxel mean the same decay would weigh 64 x 64 x 3 = 12,288
    times more against the data term on 64x64x3 patches. Using the sum keeps the original balance.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (input - target).abs().flatten(1).sum(dim=1).mean()


def critic_scores(
    critic: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]], x: torch.Tensor
) -> torch.Tensor:
    """The critic's patch map for ``x``: the last element when the critic returns its intermediate features, as
    MONAI's ``PatchDiscriminator`` does."""
    out = critic(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
    real: torch.Tensor,
    fake: torch.Tensor,
    epsilon: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP gradient penalty (Gulrajani et al.; spec ganunet.md §5): ``mean_i (||grad D(x_i)||_2 - 1)^2``.

    ``x_i = eps_i * real_i + (1 - eps_i) * fake_i`` with ``eps_i ~ U(0, 1)`` per sample (or the given ``epsilon``,
    shape (B,)), and ``D(x_i)`` the critic's patch map averaged per sample. The graph is kept so the penalty
    trains the critic. Not in MONAI or PyTorch.
    """
    if epsilon is None:
        epsilon = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    epsilon = epsilon.view(-1, *([1] * (real.ndim - 1)))
    mixed = (epsilon * real.detach() + (1 - epsilon) * fake.detach()).requires_grad_(True)
    scores = critic_scores(critic, mixed).flatten(1).mean(dim=1)
    (gradient,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1).square().mean()


class WassersteinAdversarialLoss(nn.Module):
    """The Wasserstein critic and generator terms, called like MONAI's ``PatchAdversarialLoss``.

    Critic: ``mean D(fake) - mean D(real)``, i.e. ``+mean`` of the fake patch map and ``-mean`` of the real one;
    generator: ``-mean D(fake)`` (spec ganunet.md §5). The gradient penalty is added by :func:`gradient_penalty`.
    MONAI's adversarial loss offers BCE, hinge and least squares, not this one.
    """

    def forward(self, input: torch.Tensor, target_is_real: bool, for_discriminator: bool) -> torch.Tensor:
        if not for_discriminator:
            return -input.mean()
        return -input.mean() if target_is_real else input.mean()


class GradientDifferenceLoss(nn.Module):
    """Gradient difference loss (Nie et al.; seed 003 §3.4, spec 9t4-and-abstract.md §3.4).

    Compares the magnitudes of the horizontal and vertical finite differences of the last two dimensions:
    ``(sum |(|dx y| - |dx p|)|^p + sum |(|dy y| - |dy p|)|^p) / numel(y)``, with the kernels ``[-1, 1]`` and
    ``[1, -1]^T``. ``padding="zero"`` is the reference implementation (``gdl_loss`` in medSynthesisV1): the
    convolutions pad one zero on each side, so the maps are H x (W + 1) and (H + 1) x W and their outermost
    values are the border pixels themselves. ``padding="valid"`` keeps the interior differences only. Both are
    divided by the element count of the input, as the reference does. Not in MONAI or PyTorch.

    Args:
        padding: ``"zero"`` (Nie et al.) or ``"valid"``.
        exponent: ``p``; 2 in the reference.
    """

    def __init__(self, padding: str = "zero", exponent: float = 2.0) -> None:
        super().__init__()
        if padding not in ("zero", "valid"):
            raise ValueError(f"padding must be 'zero' or 'valid', got {padding!r}.")
        self.padding = padding
        self.exponent = exponent

    def _gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.padding == "zero":
            x_cols = nn.functional.pad(x, (1, 1, 0, 0))
            x_rows = nn.functional.pad(x, (0, 0, 1, 1))
        else:
            x_cols = x_rows = x
        dx = x_cols[..., :, 1:] - x_cols[..., :, :-1]
        dy = x_rows[..., :-1, :] - x_rows[..., 1:, :]
        return dx.abs(), dy.abs()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        (pred_dx, pred_dy), (true_dx, true_dy) = self._gradients(input), self._gradients(target)
        total = (true_dx - pred_dx).abs().pow(self.exponent).sum() + (true_dy - pred_dy).abs().pow(self.exponent).sum()
        return total / target.numel()


PERCEPTUAL_HUB_REPO = "Project-MONAI/perceptual-models:main"


def radimagenet_perceptual_loss(cache_dir: str | os.PathLike | None = None, allow_download: bool = False) -> nn.Module:
    """MONAI's ``PerceptualLoss`` on RadImageNet ResNet-50 features, the thesis's perceptual loss (spec §4).

    MONAI fetches the network through torch hub (``Project-MONAI/perceptual-models``). Machines without internet
    need a hub cache that already holds it: ``cache_dir`` (default ``torch.hub.get_dir()``) must contain
    ``Project-MONAI_perceptual-models_main`` and the weights its ``hubconf.py`` loads, e.g. a copy of
    ``~/.cache/torch/hub`` from a machine where the loss was built once. Without ``allow_download`` a missing cache
    is an :class:`synth7t.data.InputError` raised before any network access; with it, MONAI downloads. Any failure
    while loading is reported the same way, naming the cache.
    """
    hub_dir = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir())
    repo_dir = hub_dir / PERCEPTUAL_HUB_REPO.replace("/", "_").replace(":", "_")
    advice = (
        "Run once with perceptual_allow_download True on a machine with internet access and copy its torch hub "
        "cache here, point perceptual_cache_dir at such a cache, or set perceptual_weight to 0."
    )
    if not repo_dir.is_dir() and not allow_download:
        raise InputError(
            f"{repo_dir}: the RadImageNet ResNet-50 of the perceptual loss is not in this torch hub cache. {advice}"
        )
    try:
        return PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50", cache_dir=str(hub_dir))
    except Exception as error:  # noqa: BLE001 - hub, download and unpickling errors all mean "weights unavailable"
        raise InputError(
            f"{hub_dir}: the RadImageNet ResNet-50 of the perceptual loss failed to load ({error}). {advice}"
        ) from error


_PIXEL_LOSSES = {"l1": nn.functional.l1_loss, "mse": nn.functional.mse_loss}


class SynthesisLoss(nn.Module):
    """The generator's supervised loss: ``pixel + perceptual_weight * perceptual + gdl_weight * GDL``.

    The thesis U-Net minimises L1 + lambda_perc * RadImageNet perceptual loss (spec ganunet.md §4, lambda from
    appendix Table 2); seed 003 adds the gradient difference loss (Eq. 5). A term whose weight is 0 is not
    computed, so no perceptual network is needed then.

    Args:
        perceptual: a module ``(pred, target) -> loss``, e.g. :func:`radimagenet_perceptual_loss`; required when
            ``perceptual_weight > 0``.
        perceptual_weight: lambda_perc.
        gradient_difference: a :class:`GradientDifferenceLoss`; required when ``gradient_difference_weight > 0``.
        gradient_difference_weight: lambda of the GDL.
        pixel_loss: the voxel-wise term, ``"l1"`` (the thesis's mean absolute error) or ``"mse"`` (the mean squared
            error, whose minimum is the best PSNR).
    """

    def __init__(
        self,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        gradient_difference: nn.Module | None = None,
        gradient_difference_weight: float = 0.0,
        pixel_loss: str = "l1",
    ) -> None:
        super().__init__()
        if pixel_loss not in _PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(_PIXEL_LOSSES)}, got {pixel_loss!r}.")
        if perceptual_weight and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual loss module.")
        if gradient_difference_weight and gradient_difference is None:
            raise ValueError("gradient_difference_weight > 0 needs a gradient difference loss module.")
        self.pixel_loss = _PIXEL_LOSSES[pixel_loss]
        self.perceptual = perceptual if perceptual_weight else None
        self.gradient_difference = gradient_difference if gradient_difference_weight else None
        self.perceptual_weight = perceptual_weight
        self.gradient_difference_weight = gradient_difference_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.pixel_loss(input, target)
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(input.float(), target.float()).mean()
        if self.gradient_difference is not None:
            loss = loss + self.gradient_difference_weight * self.gradient_difference(input, target)
        return loss
