"""Net2WiderNet for :class:`synth7t.networks.AttentionResUNet` weights: twice the channels, the same function.

Chen, Goodfellow and Shlens, "Net2Net: accelerating learning via knowledge transfer", ICLR 2016,
https://arxiv.org/abs/1511.05641. Neither MONAI nor PyTorch has it, so it is written here, for this one network.

Channel ``n`` of every feature map of the wide network (``2 * channels``, the same ``channel_mult`` and number of
GroupNorm groups) is a copy of channel ``n // 2`` of the narrow one. Every GroupNorm group of the wide network then
holds each channel of one narrow group twice (the decoder's concatenations included), so its statistics, and every
LayerNorm's, are unchanged. A weight that reads a widened feature map is split between the two copies of its input
as ``w * (1/2 + d)`` and ``w * (1/2 - d)``, ``d`` drawn uniformly in [-1/4, 1/4) per weight: the sum, hence the
function, is unchanged, and the two copies receive different gradients, so training can tell them apart (equal
halves would keep them equal for ever). Two places need more than the copy: the attention's queries are scaled by
``1 / sqrt(2)``, because the dot product of two duplicated vectors doubles while the ``1 / sqrt(head_dim)`` scale only
falls by ``sqrt(2)``; the feed-forward's GEGLU projection widens its two halves (value and gate) separately. The
AdaDM modulation reads the standard deviation over all channels, which duplication leaves unchanged up to Bessel's
correction (a relative change of about ``1 / (2 * values)``).
"""

from __future__ import annotations

import torch

__all__ = ["widen_attention_res_unet"]


def _duplicate(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Every index ``i`` of ``dim`` twice, at ``2i`` and ``2i + 1``."""
    return tensor.repeat_interleave(2, dim=dim)


def _split_between_copies(tensor: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Weights reading a duplicated input along ``dim``: ``w (1/2 + d)`` on one copy, ``w (1/2 - d)`` on the other."""
    d = (torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) - 0.5) / 2
    sign = torch.tensor([1.0, -1.0], dtype=tensor.dtype)
    shape = [1] * (tensor.ndim + 1)
    shape[dim + 1] = 2
    halves = 0.5 + d.unsqueeze(dim + 1) * sign.view(shape)  # (..., n, 2, ...): the two copies of input n
    return (tensor.unsqueeze(dim + 1) * halves).flatten(dim, dim + 1)


def _widen_both(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A weight from a widened feature map to a widened one (conv or linear: output dim 0, input dim 1)."""
    return _split_between_copies(_duplicate(tensor, 0), 1, generator)


def widen_attention_res_unet(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the same ``AttentionResUNet`` with ``2 * channels``, computing the same function.

    Args:
        state_dict: weights of an unconditioned ``AttentionResUNet`` (no cross-attention stages).
        seed: seeds the random split of each weight between the two copies of its input.

    Raises:
        ValueError: the network has cross-attention (its context is not a feature map and would need other rules)
            or a refiner (``refine_depth``; widen the U-Net before appending one).
    """
    generator = torch.Generator().manual_seed(seed)
    wide = {}
    for key, value in state_dict.items():
        if key.startswith("refiner."):
            raise ValueError(f"{key}: widening supports the U-Net alone (no refiner); widen before appending one.")
        if key.endswith(("to_k.weight", "to_v.weight")) and value.shape[0] != value.shape[1]:
            raise ValueError(f"{key}: widening supports unconditioned networks only (no cross-attention context).")
        if value.ndim == 0:  # AdaDM's scalars
            widened = value.clone()
        elif key == "stem.conv.weight":  # reads the input slices, which are not widened
            widened = _duplicate(value, 0)
        elif key == "head.2.conv.weight":  # writes the output slices, which are not widened
            widened = _split_between_copies(value, 1, generator)
        elif key == "head.2.conv.bias":
            widened = value.clone()
        elif "ff.linear1" in key:  # GEGLU: value and gate halves, each widened
            halves = [_duplicate(half, 0) for half in value.chunk(2, dim=0)]
            widened = torch.cat(halves, dim=0)
            if widened.ndim == 2:
                widened = _split_between_copies(widened, 1, generator)
        elif value.ndim == 1:  # biases, GroupNorm and LayerNorm affine parameters
            widened = _duplicate(value, 0)
        else:
            widened = _widen_both(value, generator)
        if key.endswith("to_q.weight"):
            widened = widened / 2**0.5
        wide[key] = widened
    return wide
