"""WATNet: wavelet-based affine transformation network for 3T -> 7T T1w synthesis.

Qu, Zhang, Wang, Yap, Shen, "Synthesized 7T MRI from 3T MRI via deep learning in spatial and wavelet domains",
Medical Image Analysis 62:101663, 2020. Two variants, both from spec watnet.md:

- ``variant="original"`` (§11.1): the authors' released Caffe network. LeakyReLU(0.05); encoder compression is a
  stride-2 1x1 conv whose output is modulated by the wavelet affine transform and then activated; each WAT branch
  is two 3x3 convs (wavelet -> 32 -> 64); level 3 also receives the approximation (12 channels); the decoder
  upsamples with learnable depthwise 4x4 stride-2 transposed convs initialised to bilinear interpolation; a linear
  17x17 output conv; Caffe "msra" (variance_norm AVERAGE) initialisation. 1,467,971 parameters.
- ``variant="seed"`` (§3.2): the network of the seed-001 report as its Keras code ran. ReLU; compression conv +
  ReLU before a single-conv (2x2) WAT without activation; detail coefficients only at every level; "bed of nails"
  1x1 stride-2 transposed-conv upsampling; 3x3 conv + tanh output; Keras HeNormal initialisation.
  1,346,307 parameters.

Both add the predicted residual to the input slab (global residual, §3.2 and §11.1), so ``forward`` returns the
synthetic 7T slab and the loss is computed against the 7T slab directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from synth7t.networks.fourier_conv import FourierConv2d
from synth7t.networks.haar import HaarDWT2d
from synth7t.networks.residual_refiner import ResidualRefiner

__all__ = ["DistillationBlock", "WaveletAffineTransform", "WATNet"]

ActivationFactory = Callable[[], nn.Module]


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class DistillationBlock(nn.Module):
    """Enhancement unit of a WATNet "DBlock" (spec watnet.md §3.2, §11.1; IDN, Hui et al. CVPR 2018).

    Three 3x3 convs (``channels`` -> 48 -> 32 -> ``channels``); the first 16 output channels are concatenated
    to the block input as a short path, the other 48 pass three more convs (48 -> 64 -> 48 -> ``channels`` + 16)
    and are added to it. Every conv is followed by the activation. The output has ``channels + 16`` channels;
    the compression unit that follows belongs to the network stage, not to this block.
    """

    __constants__ = ["distilled_channels"]  # TorchScript sees class attributes only when declared constant
    distilled_channels = 16

    def __init__(self, channels: int, activation: ActivationFactory) -> None:
        super().__init__()
        remaining = channels - self.distilled_channels
        out_channels = channels + self.distilled_channels
        self.upper = nn.Sequential(
            _conv3x3(channels, 48), activation(), _conv3x3(48, 32), activation(), _conv3x3(32, channels), activation()
        )
        self.lower = nn.Sequential(
            _conv3x3(remaining, channels),
            activation(),
            _conv3x3(channels, remaining),
            activation(),
            _conv3x3(remaining, out_channels),
            activation(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upper = self.upper(x)
        distilled, remaining = upper[:, : self.distilled_channels], upper[:, self.distilled_channels :]
        return self.lower(remaining) + torch.cat([x, distilled], dim=1)


class WaveletAffineTransform(nn.Module):
    """WAT layer: spatial features modulated by wavelet coefficients, ``f * gamma(w) + beta(w)`` (spec §3.2, §11.1).

    ``gamma`` and ``beta`` are two separate conv branches on the wavelet coefficients ``w`` (same resolution as
    ``f``): one conv of ``kernel_size`` when ``hidden_channels`` is None (seed: 2x2, 'same' padding), else
    conv -> activation -> conv through ``hidden_channels`` (original: 3x3, 32 hidden). ``activation`` applied to
    the modulated features when given (original: LeakyReLU 0.05; seed: none).
    """

    def __init__(
        self,
        wavelet_channels: int,
        feature_channels: int,
        kernel_size: int,
        hidden_channels: int | None,
        activation: ActivationFactory,
        activate_output: bool,
    ) -> None:
        super().__init__()

        def branch() -> nn.Module:
            if hidden_channels is None:
                return nn.Conv2d(wavelet_channels, feature_channels, kernel_size, padding="same")
            return nn.Sequential(
                nn.Conv2d(wavelet_channels, hidden_channels, kernel_size, padding="same"),
                activation(),
                nn.Conv2d(hidden_channels, feature_channels, kernel_size, padding="same"),
            )

        self.gamma = branch()
        self.beta = branch()
        self.activation = activation() if activate_output else nn.Identity()

    def forward(self, features: torch.Tensor, wavelet: torch.Tensor) -> torch.Tensor:
        return self.activation(features * self.gamma(wavelet) + self.beta(wavelet))


def _bilinear_upsampling_kernel(kernel_size: int) -> torch.Tensor:
    """Caffe's ``bilinear`` weight filler for a transposed conv that upsamples by ``ceil(kernel_size / 2)``."""
    factor = math.ceil(kernel_size / 2)
    center = (2 * factor - 1 - factor % 2) / (2.0 * factor)
    profile = 1 - torch.abs(torch.arange(kernel_size, dtype=torch.float32) / factor - center)
    return profile[:, None] * profile[None, :]


@dataclass(frozen=True)
class _Variant:
    """What differs between the seed's network (§3.2) and the released original (§11.1)."""

    negative_slope: float  # 0 -> ReLU
    modulate_before_activation: bool  # original: act(conv(x) * gamma + beta); seed: act(conv(x)) * gamma + beta
    wat_kernel_size: int
    wat_hidden_channels: int | None
    approximation_at_last_level: bool
    upsample: str  # "bilinear_depthwise" | "bed_of_nails"
    output_head: str  # "linear17" | "conv_tanh"
    init: str  # "caffe_msra_average" | "keras_he_normal"


_VARIANTS = {
    "original": _Variant(0.05, True, 3, 32, True, "bilinear_depthwise", "linear17", "caffe_msra_average"),
    "seed": _Variant(0.0, False, 2, None, False, "bed_of_nails", "conv_tanh", "keras_he_normal"),
}


class WATNet(nn.Module):
    """WATNet (Qu et al. 2020) for 2.5-D synthesis: ``in_channels`` neighbouring 3T slices in, as many 7T out.

    Args:
        in_channels: neighbouring axial slices stacked as channels (3 in the paper and the seed).
        variant: ``"original"`` (the authors' released network, spec watnet.md §11.1) or ``"seed"`` (the seed-001
            report's Keras network, §3.2). See the module docstring for the differences.
        features: width of the feature maps (64 in both).
        zero_init_output: start the output conv at zero, so the network begins as the identity (its global
            residual) instead of adding a large random residual to the input. Not in either source (default False:
            Caffe "msra" / Keras HeNormal as they ran); with it a short training run does not spend its first
            iterations unlearning the random residual (the bundle's model card measures it).
        refine_depth: convolutions of a :class:`synth7t.networks.ResidualRefiner` appended at full resolution, fed
            the predicted slab beside the input slab (0: none, the paper's network). Not in either source: every
            WATNet feature passes the 1/8-resolution bottleneck, which cannot carry voxel-wise noise, and the refiner
            can remove it (the bundle's model card measures it). It starts as the identity.
        refine_channels: width of the refiner's convolutions.

    Input ``(B, in_channels, H, W)`` with H and W divisible by 8 (three stride-2 levels); output the same shape,
    the input plus the predicted residual. The output is not clipped, as in both sources.
    """

    __constants__ = ["levels"]
    levels = 3

    def __init__(
        self,
        in_channels: int = 3,
        variant: str = "original",
        features: int = 64,
        zero_init_output: bool = False,
        refine_depth: int = 0,
        refine_channels: int = 48,
    ) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {sorted(_VARIANTS)}, got {variant!r}.")
        self.variant = variant
        config = _VARIANTS[variant]
        self.approximation_at_last_level = config.approximation_at_last_level

        def activation() -> nn.Module:
            if config.negative_slope:
                return nn.LeakyReLU(config.negative_slope, inplace=True)
            return nn.ReLU(inplace=True)

        block_channels = features + DistillationBlock.distilled_channels
        detail_channels = 3 * in_channels

        def compression(stride: int, activate: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(block_channels, features, kernel_size=1, stride=stride)]
            return nn.Sequential(*layers, activation()) if activate else nn.Sequential(*layers)

        self.wavelet = HaarDWT2d()
        self.head = nn.Sequential(
            _conv3x3(in_channels, features), activation(), _conv3x3(features, features), activation()
        )
        # Encoder: three DBlocks that halve the resolution, each followed by a WAT layer, then one at stride 1.
        self.encoder_blocks = nn.ModuleList(
            [DistillationBlock(features, activation) for _ in range(self.levels + 1)]
        )
        self.encoder_compressions = nn.ModuleList(
            [compression(2, not config.modulate_before_activation) for _ in range(self.levels)]
            + [compression(1, True)]
        )
        wavelet_channels = [detail_channels] * self.levels
        if config.approximation_at_last_level:
            wavelet_channels[-1] += in_channels
        self.wavelet_transforms = nn.ModuleList(
            [
                WaveletAffineTransform(
                    channels,
                    features,
                    config.wat_kernel_size,
                    config.wat_hidden_channels,
                    activation,
                    activate_output=config.modulate_before_activation,
                )
                for channels in wavelet_channels
            ]
        )
        # Decoder: one DBlock at the coarsest level, then three that each double the resolution.
        self.decoder_blocks = nn.ModuleList([DistillationBlock(features, activation) for _ in range(self.levels + 1)])
        self.decoder_compressions = nn.ModuleList([compression(1, True) for _ in range(self.levels + 1)])
        self.upsamplers = nn.ModuleList([self._upsampler(config.upsample, features) for _ in range(self.levels)])
        if config.output_head == "linear17":
            # The 17x17 conv by FFT: the same layer, several times faster on CPUs (synth7t.networks.fourier_conv).
            self.output = nn.Sequential(FourierConv2d(features, in_channels, kernel_size=17, padding=8))
        else:
            self.output = nn.Sequential(
                _conv3x3(features, features), activation(), _conv3x3(features, in_channels), nn.Tanh()
            )
        self._initialise(config.init)
        if zero_init_output:
            output_conv = self.output[-1] if config.output_head == "linear17" else self.output[-2]
            nn.init.zeros_(output_conv.weight)
            nn.init.zeros_(output_conv.bias)
        # after the initialisation above, which would overwrite the refiner's own (its last conv starts at zero)
        self.refiner = (
            ResidualRefiner(in_channels, in_channels, refine_channels, refine_depth) if refine_depth else None
        )

    @staticmethod
    def _upsampler(kind: str, channels: int) -> nn.ConvTranspose2d:
        if kind == "bilinear_depthwise":
            return nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, groups=channels, bias=False)
        return nn.ConvTranspose2d(channels, channels, 1, stride=2, output_padding=1)

    def _initialise(self, scheme: str) -> None:
        for module in self.modules():
            if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            if module in self.upsamplers and scheme == "caffe_msra_average":
                with torch.no_grad():
                    module.weight.copy_(_bilinear_upsampling_kernel(module.kernel_size[0]).expand_as(module.weight))
                continue
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
            if scheme == "caffe_msra_average":
                nn.init.normal_(module.weight, std=math.sqrt(4.0 / (fan_in + fan_out)))
            else:  # Keras HeNormal: truncated normal cut at two (untruncated) standard deviations
                std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def parameter_groups(
        self, learning_rate: float, parameters: Iterable[nn.Parameter] | None = None
    ) -> list[dict]:
        """Optimizer groups with the original solver's learning-rate multipliers (spec watnet.md §11.1).

        The released Caffe prototxt trains biases and the output conv at ``lr_mult`` 0.1; for
        ``variant="original"`` those parameters of the WATNet form a second group at ``0.1 * learning_rate``. The
        seed variant trains every parameter at ``learning_rate``, and so does every variant its refiner (not in the
        sources). ``parameters`` limits the groups to those (e.g. ``synth7t.bundle.freeze_except``'s, to train the
        refiner alone); by default all of the network's.
        """
        trained = list(self.parameters() if parameters is None else parameters)
        if self.variant != "original":
            return [{"params": trained, "lr": learning_rate}]
        slow_ids = {id(p) for p in self.output.parameters()}
        slow_ids |= {
            id(p) for name, p in self.named_parameters() if name.endswith("bias") and not name.startswith("refiner.")
        }
        groups = [
            {"params": [p for p in trained if id(p) not in slow_ids], "lr": learning_rate},
            {"params": [p for p in trained if id(p) in slow_ids], "lr": 0.1 * learning_rate},
        ]
        return [group for group in groups if group["params"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(
                f"WATNet needs H and W divisible by 8, got ({x.shape[-2]}, {x.shape[-1]}); pad the input first."
            )
        approximation, wavelets = x, []
        for _ in range(self.levels):
            approximation, details = self.wavelet(approximation)
            wavelets.append(details)
        if self.approximation_at_last_level:
            wavelets[-1] = torch.cat([approximation, wavelets[-1]], dim=1)

        # TorchScript indexes a ModuleList only by an integer literal and cannot slice one, so the encoder's three
        # levels zip their WAT layers (zip stops at the shortest) before its stride-1 block, and each decoder level
        # finds its upsampler, self.upsamplers[level - 1], by enumeration.
        h = self.head(x)
        for level, (block, compress, transform) in enumerate(
            zip(self.encoder_blocks, self.encoder_compressions, self.wavelet_transforms)
        ):
            h = transform(compress(block(h)), wavelets[level])
        h = self.encoder_compressions[-1](self.encoder_blocks[-1](h))
        for level, (block, compress) in enumerate(zip(self.decoder_blocks, self.decoder_compressions)):
            h = compress(block(h))
            for index, upsample in enumerate(self.upsamplers):
                if index == level - 1:
                    h = upsample(h)
        prediction = x + self.output(h)
        if self.refiner is not None:
            prediction = self.refiner(prediction, x)
        return prediction
