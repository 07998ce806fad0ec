"""A 2-D convolution with a large kernel, computed through the FFT.

WATNet's output layer is a 17x17 convolution from 64 feature maps to the three slab channels (spec watnet.md
§11.1). On a CPU, oneDNN's direct convolution handles that shape poorly: measured on this project's 2-core machine,
its forward and backward took 2.6 s of a 3.6 s training step for 16 patches of 48x48 (``torch.profiler``), and a
step of 32 patches of 64x64 fell from 14.8 s to 4.1 s with this module (``make bench``, training). Through the FFT
the layer costs about 0.2 s of the smaller step: a handful of 2-D transforms and a per-frequency product over the 64
input channels. PyTorch and MONAI have no FFT convolution, hence this module.

The module is an ``nn.Conv2d`` (same parameters, same state dict, same initialisation hooks) restricted to what the
FFT path computes exactly: stride 1, no dilation, one group, zero padding. It takes the FFT path in training mode
only, where the backward pass dominates; in eval mode (validation, inference, TorchScript and ONNX export) it is the
direct convolution, which channels-last inference already runs as fast, so inference and exports are unchanged.
Both paths agree to float rounding (tests).
"""

import torch
from torch import nn

__all__ = ["FourierConv2d"]


class FourierConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)`` evaluated by FFT.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: side of the square kernel.
        padding: zero padding on each side (``kernel_size // 2`` keeps the spatial size).
        bias: whether to add a learnable bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True):
        if not 0 <= padding < kernel_size:
            raise ValueError(f"FourierConv2d needs 0 <= padding < kernel_size, got {padding} and {kernel_size}.")
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._conv_forward(x, self.weight, self.bias)
        return self._fft_forward(x)

    def _fft_forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_size[0]
        pad = self.padding[0]
        height, width = x.shape[-2], x.shape[-1]
        # Linear (not circular) convolution needs transforms of at least input + kernel - 1 samples per axis.
        fft_size = [height + kernel - 1, width + kernel - 1]
        # Half-precision inputs (autocast) are transformed in float32: the FFT needs the range and precision.
        dtype = torch.promote_types(x.dtype, torch.float32)
        signal = torch.fft.rfft2(x.to(dtype), s=fft_size)
        # nn.Conv2d is a cross-correlation: flipping the kernel turns it into the convolution the FFT computes.
        response = torch.fft.rfft2(self.weight.to(dtype).flip([-2, -1]), s=fft_size)
        spectrum = torch.einsum("bchw,ochw->bohw", signal, response)
        full = torch.fft.irfft2(spectrum, s=fft_size)
        # The full convolution starts kernel - 1 samples before the input; 'padding' moves the window back.
        start = kernel - 1 - pad
        out = full[..., start : start + height + 2 * pad - kernel + 1, start : start + width + 2 * pad - kernel + 1]
        bias = self.bias
        if bias is not None:
            out = out + bias.to(dtype).view(1, -1, 1, 1)
        return out.to(x.dtype)
