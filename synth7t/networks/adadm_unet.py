"""Attention residual U-Net with AdaDM, the generator of the Lund thesis (spec ganunet.md §3, seeds 002 and 004).

The thesis took the DDPM U-Net of MONAI Generative (now ``monai.networks.nets.DiffusionModelUNet``), made it 2-D,
replaced its strided downsampling by max pooling, dropped the diffusion timestep, and appended an AdaDM modulation
to every residual block. MONAI's ``DiffusionUNetResnetBlock`` always expects a timestep embedding and has no
modulation, so the residual block is written here; the attention blocks are MONAI's ``SpatialTransformer``, the
"big residual attention block" of the thesis (spec §3.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets.diffusion_model_unet import SpatialTransformer, zero_module
from torch import nn

from synth7t.networks.residual_refiner import ResidualRefiner

__all__ = ["AdaDM", "AdaDMResBlock", "AttentionResUNet"]


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> Convolution:
    """A size-preserving 2-D convolution, stride 1 (spec §3.2)."""
    return Convolution(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=1,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        conv_only=True,
    )


class AdaDM(nn.Module):
    """Adaptive Deviation Modulator (Liu et al., spec §3.3): ``h * exp(w * log(std(x)) + b)``.

    ``std(x)`` is the standard deviation of each sample of the block input over all its channels and pixels (the
    authors' ``torch.std(x, dim=[1, 2, 3])``), ``w`` and ``b`` are learned scalars (the authors' 1x1 conv from one
    channel to one) starting at 1 and 0, so at initialisation the residue is scaled by ``std(x)``. ``eps`` keeps
    the logarithm finite on a constant input.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.eps = eps

    def forward(self, residue: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
        std = block_input.flatten(1).std(dim=1).view([-1] + [1] * (block_input.ndim - 1))
        return residue * torch.exp(self.weight * torch.log(std + self.eps) + self.bias)


class AdaDMResBlock(nn.Module):
    """Residual block of the thesis generator (spec §3.3, Fig. 20): ``skip(x) + AdaDM((GN-SiLU-conv3x3) x 2)``.

    The skip path is a 1x1 convolution when the channel count changes. The second convolution starts at zero as in
    MONAI's diffusion U-Net, so every block is the identity (or its 1x1 skip) at initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.residue = nn.Sequential(
            nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps),
            nn.SiLU(),
            _conv(in_channels, out_channels),
            nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps),
            nn.SiLU(),
            zero_module(_conv(out_channels, out_channels)),
        )
        self.modulation = AdaDM()
        self.skip = nn.Identity() if in_channels == out_channels else _conv(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.modulation(self.residue(x), x)


class _Stage(nn.Module):
    """``num_res_blocks`` residual blocks at one resolution, each followed by cross-attention when enabled."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        norm_num_groups: int,
        cross_attention_dim: int | None,
        use_flash_attention: bool,
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(
            AdaDMResBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
            for i in range(num_res_blocks)
        )
        self.attentions = (
            nn.ModuleList(
                _attention(out_channels, norm_num_groups, cross_attention_dim, use_flash_attention)
                for _ in range(num_res_blocks)
            )
            if cross_attention_dim is not None
            else None
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.attentions is None:
            for res_block in self.res_blocks:
                x = res_block(x)
        else:  # zipped: TorchScript indexes a ModuleList only by a literal
            for res_block, attention in zip(self.res_blocks, self.attentions):
                x = attention(res_block(x), context=context)
        return x


def _attention(
    channels: int, norm_num_groups: int, cross_attention_dim: int | None, use_flash_attention: bool
) -> SpatialTransformer:
    """MONAI's residual transformer block with one head as wide as the features (spec §3.5: one head)."""
    return SpatialTransformer(
        spatial_dims=2,
        in_channels=channels,
        num_attention_heads=1,
        num_head_channels=channels,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        use_flash_attention=use_flash_attention,
    )


class AttentionResUNet(nn.Module):
    """The thesis generator (spec §3.4, Fig. 21 and 28): neighbouring 3T slices in, the middle 7T slice out.

    Stem conv -> ``len(channel_mult)`` encoder stages (residual blocks [+ cross-attention], skip saved, 2x2 max
    pool) -> bottleneck (residual block, self-attention, residual block) -> decoder stages (nearest 2x upsampling,
    concatenation with the stage's skip, residual blocks [+ cross-attention]) -> GroupNorm, SiLU, conv head, no
    output activation.

    Decisions where the thesis is ambiguous (spec §9):
        A4: every stage ends with a max pool, so there are ``len(channel_mult)`` downsamplings ("k is the number of
            stages (it is also the number of downsamplings)"); inputs must be divisible by ``2 ** len(channel_mult)``.
        A5: the decoder has ``num_res_blocks`` blocks per stage and one skip per stage, and no conv after the
            nearest upsampling, as the thesis describes (MONAI has ``num_res_blocks + 1`` and a conv).
        A7: stages are numbered from 1; stage ``len(channel_mult) + 1`` is the bottleneck, so the UNC setting
            (mult (1, 2, 2, 2), CA stages (3, 4, 5)) puts cross-attention in stages 3, 4 and the bottleneck.
        A8: the bottleneck's attention is the transformer block, attending to the context only when the
            bottleneck is a cross-attention stage and to itself otherwise.
        A9/A22: no timestep embedding; the conditioning variables (e.g. age, sex, diagnosis, slice position) form
            the cross-attention context, shape (B, context_dim) or (B, tokens, context_dim). With a single token,
            as the thesis's (B, 1, 4) context, the softmax over one key is 1: each cross-attention adds a learned
            function of the context to every pixel and its queries and keys stay idle. Several tokens give
            attention that varies over the image.
        A10: no positional encoding in the attention, as MONAI's ``SpatialTransformer`` has none.

    Args:
        in_channels: neighbouring 3T slices stacked as channels (3 in every final thesis model).
        out_channels: output slices (1: the middle 7T slice).
        channels: width of the first stage, ``n_channels`` in the thesis.
        channel_mult: per-stage width multipliers, e.g. (1, 2, 2, 2) or (1, 2, 2, 2, 2).
        num_res_blocks: residual blocks per stage, ``n_res``.
        norm_num_groups: GroupNorm groups, ``n_groups``; must divide every width.
        cross_attention_stages: 1-based stages with cross-attention after each residual block; ``None`` or empty for
            an unconditioned network (the thesis GAN generator).
        context_dim: length of the conditioning vector; required with cross-attention stages.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` in the attention blocks.
        global_residual: add the middle ``out_channels`` input channels (the slices the network predicts) to the
            output, whose last conv then starts at zero: the network begins as the identity and learns the 3T-to-7T
            change, as WATNet does. Not in the thesis (default False); a short training run reaches much further
            from the identity than from a random output (the bundle's model card measures it).
        refine_depth: convolutions of a :class:`synth7t.networks.ResidualRefiner` appended at full resolution, fed
            the U-Net's output and the input slices, starting as the identity; 0 (default, the thesis) for none.
        refine_channels: width of the refiner's convolutions.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        norm_num_groups: int = 8,
        cross_attention_stages: Sequence[int] | None = None,
        context_dim: int | None = None,
        use_flash_attention: bool = False,
        global_residual: bool = False,
        refine_depth: int = 0,
        refine_channels: int = 48,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        if global_residual and out_channels > in_channels:
            raise ValueError(f"global_residual needs out_channels <= in_channels, got {out_channels} > {in_channels}.")
        self.residual_start = (in_channels - out_channels) // 2 if global_residual else -1
        self.residual_stop = self.residual_start + out_channels
        stages = set(cross_attention_stages or ())
        bottleneck_stage = len(widths) + 1
        if not stages <= set(range(1, bottleneck_stage + 1)):
            raise ValueError(
                f"cross_attention_stages {sorted(stages)} must lie in 1..{bottleneck_stage} (the bottleneck)."
            )
        if stages and not context_dim:
            raise ValueError("cross_attention_stages need context_dim, the length of the conditioning vector.")
        if any(width % norm_num_groups for width in widths):
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every stage width {widths}.")
        self.context_dim = context_dim if stages else None
        self.divisor = 2 ** len(widths)

        def context_for(stage: int) -> int | None:
            return context_dim if stage in stages else None

        self.stem = _conv(in_channels, channels)
        self.encoder = nn.ModuleList()
        previous = channels
        for index, width in enumerate(widths):
            self.encoder.append(
                _Stage(previous, width, num_res_blocks, norm_num_groups, context_for(index + 1), use_flash_attention)
            )
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck_in = AdaDMResBlock(previous, previous, norm_num_groups)
        self.bottleneck_attends_context = bottleneck_stage in stages
        self.bottleneck_attention = _attention(
            previous, norm_num_groups, context_for(bottleneck_stage), use_flash_attention
        )
        self.bottleneck_out = AdaDMResBlock(previous, previous, norm_num_groups)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.ModuleList()
        for index in reversed(range(len(widths))):
            width = widths[index]
            self.decoder.append(
                _Stage(
                    previous + width,
                    width,
                    num_res_blocks,
                    norm_num_groups,
                    context_for(index + 1),
                    use_flash_attention,
                )
            )
            previous = width
        self.head = nn.Sequential(
            nn.GroupNorm(norm_num_groups, previous, eps=1e-6), nn.SiLU(), _conv(previous, out_channels)
        )
        if global_residual:
            for parameter in self.head[-1].parameters():
                nn.init.zeros_(parameter)
        self.refiner = (
            ResidualRefiner(in_channels, out_channels, refine_channels, refine_depth) if refine_depth else None
        )

    def _context_tokens(self, context: torch.Tensor | None) -> torch.Tensor | None:
        if self.context_dim is None:
            return None
        if context is None:
            raise ValueError(f"this network has cross-attention stages: pass a context of length {self.context_dim}.")
        tokens = context[:, None] if context.ndim == 2 else context
        if tokens.ndim != 3 or tokens.shape[-1] != self.context_dim:
            expected = f"(B, {self.context_dim}) or (B, tokens, {self.context_dim})"
            raise ValueError(f"context must be {expected}, got shape {list(context.shape)}.")
        return tokens

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(
                f"height and width must be divisible by {self.divisor}, got ({x.shape[-2]}, {x.shape[-1]}); "
                "pad the slices."
            )
        tokens = self._context_tokens(context)
        h = self.stem(x)
        skips = []
        for stage in self.encoder:
            h = stage(h, tokens)
            skips.append(h)
            h = self.pool(h)
        h = self.bottleneck_in(h)
        h = self.bottleneck_attention(h, context=tokens if self.bottleneck_attends_context else None)
        h = self.bottleneck_out(h)
        for stage in self.decoder:
            h = stage(torch.cat([self.upsample(h), skips.pop()], dim=1), tokens)
        output = self.head(h)
        if self.residual_start >= 0:
            output = x[:, self.residual_start : self.residual_stop] + output
        if self.refiner is not None:
            output = self.refiner(output, x)
        return output
