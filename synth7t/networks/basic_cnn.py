"""BasicCNN, the baseline of the seed-001 report (spec watnet.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicCNN"]


class BasicCNN(nn.Module):
    """Four 'same' 4x4 convolutions, BatchNorm + ReLU after the first three and a sigmoid after the last.

    Spec watnet.md §2.2: ``Conv(3->64) -> BN -> ReLU -> Conv(64->128) -> BN -> ReLU -> Conv(128->256) -> BN ->
    ReLU -> Conv(256->3) -> Sigmoid``, predicting the 7T slab directly (no residual). BatchNorm uses the Keras
    defaults the seed ran with (momentum 0.9, i.e. PyTorch ``momentum=0.1``, ``eps=1e-3``); kernels are
    Glorot-uniform with zero biases (Keras defaults). With the default arguments it has 672,067 trainable
    parameters plus 896 BatchNorm running statistics (the seed's "672 963" is the Keras total of both).

    Args:
        in_channels: neighbouring slices stacked as channels (3 in the seed).
        out_channels: output slices (3 in the seed).
        channels: widths of the three hidden layers.
        kernel_size: square kernel size of every conv; PyTorch's ``padding="same"`` pads an even kernel
            asymmetrically (1 before, 2 after for 4), exactly as Keras does.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: Sequence[int] = (64, 128, 256),
        kernel_size: int = 4,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, kernel_size, padding="same"),
                nn.BatchNorm2d(width, momentum=0.1, eps=1e-3),
                nn.ReLU(inplace=True),
            ]
            previous = width
        layers += [nn.Conv2d(previous, out_channels, kernel_size, padding="same"), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
