"""Losses the papers use that PyTorch and MONAI do not provide as such."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PerSampleSumL1Loss"]


class PerSampleSumL1Loss(nn.Module):
    """L1 distance summed over each sample's voxels and averaged over the batch, as Caffe's ``L1Loss``.

    The released WATNet solver (spec watnet.md §11.1 "Loss") minimises ``sum |pred - 7T| / batch size``: a
    per-sample sum, not ``torch.nn.L1Loss``'s per-voxel mean. Adam is invariant to the scale of the loss, but the
    solver's L2 weight decay (1e-4) is not: with a per-voxel mean the same decay would weigh 64 x 64 x 3 = 12,288
    times more against the data term on 64x64x3 patches. Using the sum keeps the original balance.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (input - target).abs().flatten(1).sum(dim=1).mean()
