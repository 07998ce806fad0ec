"""Fixed 2-D Haar discrete wavelet transform as a stride-2 convolution.

WATNet feeds the detail coefficients of a 3-level 2-D Haar DWT of its input slab into its wavelet affine
transform layers (spec watnet.md §3.2 "Wavelet branch", §11.1 "Inputs"). MONAI has no wavelet transform and the
seed's ``tensorflow-wavelets`` / PyWavelets run on the CPU outside the graph, so this module implements the
orthonormal Haar analysis step in pure torch: it runs on any device, is differentiable, and exports to
TorchScript and ONNX.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["HaarDWT2d"]


def _haar_filters() -> torch.Tensor:
    """The four 2x2 orthonormal Haar analysis filters, ordered LL, cH, cV, cD as in ``pywt.dwt2``."""
    low_low = [[1.0, 1.0], [1.0, 1.0]]
    horizontal = [[1.0, 1.0], [-1.0, -1.0]]  # high-pass along H (rows), low-pass along W
    vertical = [[1.0, -1.0], [1.0, -1.0]]  # low-pass along H, high-pass along W
    diagonal = [[1.0, -1.0], [-1.0, 1.0]]
    return torch.tensor([low_low, horizontal, vertical, diagonal]).unsqueeze(1) / 2.0


class HaarDWT2d(nn.Module):
    """One level of the orthonormal 2-D Haar DWT, applied to every channel independently.

    For an input of shape ``(B, C, H, W)`` with even ``H`` and ``W`` it returns ``(approximation, details)``:

    - ``approximation``: ``(B, C, H/2, W/2)``, the LL sub-band (``pywt.dwt2(x, "haar")[0]``);
    - ``details``: ``(B, 3C, H/2, W/2)``, sub-band-major ``[cH(C), cV(C), cD(C)]``, the channel order of the
      seed's ``tensorflow-wavelets`` DWT (spec watnet.md §3.2).

    Each value equals PyWavelets' ``dwt2(·, "haar")`` on the same channel. The filters are a non-persistent
    buffer: they follow ``.to(device)`` but never appear in the module's state dict (TorchScript ignores
    ``persistent=False``: a scripted or traced copy lists them, pytorch/pytorch#69250).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filters", _haar_filters(), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, height, width = x.shape
        subbands = F.conv2d(x.reshape(batch * channels, 1, height, width), self.filters.to(x.dtype), stride=2)
        subbands = subbands.reshape(batch, channels, 4, height // 2, width // 2).transpose(1, 2)
        approximation = subbands[:, 0]
        details = subbands[:, 1:].reshape(batch, 3 * channels, height // 2, width // 2)
        return approximation, details
