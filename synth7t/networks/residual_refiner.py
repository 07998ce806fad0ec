"""A full-resolution residual CNN that corrects a 2-D network's prediction (not in any of the seed papers).

Issue #11 measured a plain CNN (ten 3x3 convolutions of 48 channels, ReLU, three slices in, the middle one out, a
global residual; the DnCNN shape of K. Zhang et al., "Beyond a Gaussian Denoiser", IEEE TIP 26(7):3142-3155, 2017,
https://arxiv.org/abs/1608.03981) that, trained briefly on the seed-001 degradation alone, denoised it better than the
attention U-Net, whose full-resolution stage has 16 channels. Appended to the U-Net and fed the U-Net's prediction
beside the input slices, the same CNN trained on those pairs with the U-Net frozen raised both degradation recipes
(the ``gan_unet_t1w7t`` model card measures it); appended to WATNet, whose every feature passes a 1/8-resolution
bottleneck, it learned the denoising the paper's network cannot (the ``watnet`` model card). MONAI's
``SegResNet``/``BasicUNet`` blocks are encoder-decoder pieces; this plain stack is written here.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualRefiner", "plain_cnn"]


def plain_cnn(in_channels: int, out_channels: int, channels: int = 48, depth: int = 10) -> nn.Sequential:
    """``depth`` 3x3 'same' convolutions with ReLU between them (He-normal weights, zero biases); the last one
    starts at zero, so a residual use of it starts as the identity."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}.")
    layers: list[nn.Module] = []
    for index in range(depth - 1):
        conv = nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    output = nn.Conv2d(channels if depth > 1 else in_channels, out_channels, 3, padding=1)
    nn.init.zeros_(output.weight)
    nn.init.zeros_(output.bias)
    layers.append(output)
    return nn.Sequential(*layers)


class ResidualRefiner(nn.Module):
    """``prediction + CNN([prediction, inputs])``: a :func:`plain_cnn` on the prediction stacked before the network's
    input channels, adding its output to the prediction. Starts as the identity.

    Args:
        in_channels: channels of the network's input (3 neighbouring slices).
        out_channels: channels of the prediction (1: the middle slice).
        channels: width of every hidden convolution.
        depth: number of convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, channels: int = 48, depth: int = 10) -> None:
        super().__init__()
        self.layers = plain_cnn(out_channels + in_channels, out_channels, channels, depth)

    def forward(self, prediction: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return prediction + self.layers(torch.cat([prediction, inputs], dim=1))
