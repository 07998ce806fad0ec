"""Vision CNN-Transformer (VCT, seed 000): a ResViT-style generator whose two transformer blocks share weights.

Spec vct.md §4.3 reconstructs the network layer by layer from the paper and the ResViT generator it builds on
(Dalmaz et al.): a convolutional encoder down-sampling by 4, nine residual "ART" blocks of which two (positions 1
and 6) route the features through a ViT-B encoder at 1/16 resolution, and a transposed-convolution decoder. The
ViT encoder object is the same in both blocks, which is what gives the paper's "approximately 123 million"
parameters and "41 %" saving. MONAI's ``ViT`` embeds image patches itself and has no hybrid CNN path, so the
blocks are assembled here from MONAI's ``SABlock`` and ``MLPBlock``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock
from torch import nn

from synth7t.errors import InputError

__all__ = ["VCT", "ViTEncoder", "load_vit_checkpoint"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 convolution (padding 1, no bias), BatchNorm, ReLU: the down-sampling unit of spec §4.3 (E2, E3)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _up_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 stride-2 transposed convolution that doubles the size exactly, BatchNorm, ReLU (spec §4.3, D1, D2)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResnetBlock(nn.Module):
    """``x + [pad, conv3x3, BN, ReLU, pad, conv3x3, BN](x)`` with reflection padding (ResViT, spec §4.3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residue = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residue(x)


class ChannelCompression(nn.Module):
    """``ReLU(two 3x3 conv-BN + 1x1 conv-BN shortcut)`` from ``in_channels`` to ``out_channels`` (ResViT, spec §4.3
    step 6): merges a transformer block's output with its input after concatenation."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.residue = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residue(x) + self.shortcut(x))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm ViT layer: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (spec §4.3 step 3, ViT-B/16).

    MONAI's ``TransformerBlock`` also creates a cross-attention LayerNorm that a self-attention layer never uses
    (dead parameters that DistributedDataParallel rejects and a ViT checkpoint does not fill), hence this layer.
    Attention: MONAI's ``SABlock`` with separate q, k, v projections with bias, as the ViT checkpoint stores them,
    through ``scaled_dot_product_attention`` when ``use_flash_attention``; no dropout in the attention block (the
    checkpoint's attention dropout is 0), ``dropout_rate`` in the MLP.
    """

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float, use_flash_attention: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = SABlock(
            hidden_size,
            num_heads,
            dropout_rate=0.0,
            qkv_bias=True,
            use_combined_linear=False,
            use_flash_attention=use_flash_attention,
        )
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """``num_layers`` transformer layers and a final LayerNorm: the encoder both transformer ART blocks share."""

    def __init__(
        self,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.1,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, mlp_dim, num_heads, dropout_rate, use_flash_attention)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm(tokens)


class TransformerARTBlock(nn.Module):
    """ART block with a transformer (spec §4.3 B1/B6): down-sample x4, embed, encode, up-sample, merge, ResnetBlock.

    The 1x1 patch embedding and the learned position embedding belong to each block; ``encoder`` is passed in so
    several blocks can share one. The position embedding is stored for ``token_grid`` (11 x 13 for 176 x 208
    slices) and resized bicubically when an input of another size gives another grid, so any height and width
    divisible by 16 work.
    """

    def __init__(
        self, channels: int, encoder: ViTEncoder, token_grid: Sequence[int], hidden_size: int, dropout_rate: float
    ) -> None:
        super().__init__()
        self.down = nn.Sequential(
            _conv_bn_relu(channels, 2 * channels, 2), _conv_bn_relu(2 * channels, 4 * channels, 2)
        )
        self.patch_embedding = nn.Conv2d(4 * channels, hidden_size, kernel_size=1)
        self.position_embedding = nn.Parameter(torch.zeros(1, hidden_size, *token_grid))
        self.embedding_dropout = nn.Dropout(dropout_rate)
        self.encoder = encoder
        self.up = nn.Sequential(_up_bn_relu(hidden_size, 2 * channels), _up_bn_relu(2 * channels, channels))
        self.merge = ChannelCompression(2 * channels, channels)
        self.resnet = ResnetBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedded = self.patch_embedding(self.down(x))
        height, width = embedded.shape[-2:]
        position = self.position_embedding
        if position.shape[-2:] != (height, width):
            position = F.interpolate(position, size=(height, width), mode="bicubic", align_corners=False)
        tokens = self.embedding_dropout((embedded + position).flatten(2).transpose(1, 2))
        encoded = self.encoder(tokens).transpose(1, 2).reshape(embedded.shape)
        return self.resnet(self.merge(torch.cat([self.up(encoded), x], dim=1)))


class VCT(nn.Module):
    """Vision CNN-Transformer generator (seed 000; spec vct.md §4.3): [3T T1w, 3T ADC] slices -> 7T ADC slice.

    Encoder: reflection-padded 7x7 conv to ``channels``, two stride-2 3x3 convs to ``4 * channels``; nine ART blocks
    at 1/4 resolution, those at ``transformer_positions`` (1-based) with a transformer; decoder: two transposed convs
    and a reflection-padded 7x7 conv with tanh. BatchNorm and ReLU throughout, as ResViT. Height and width must be
    divisible by 16.

    Args:
        in_channels: input channels (2: T1w, ADC; 1 for the single-input ablations).
        out_channels: output channels (1: ADC).
        channels: width of the first conv (64 in the paper's configuration); the ART blocks run at ``4 * channels``.
        num_blocks: ART blocks (9).
        transformer_positions: 1-based ART blocks holding a transformer ((1, 6) in the paper).
        share_transformer: one ViT encoder for all transformer blocks (the paper) or one each.
        hidden_size, num_layers, num_heads, mlp_dim: the ViT encoder (ViT-B: 768, 12, 12, 3072).
        image_size: slice size the position embeddings are stored for (176 x 208: the paper's slices padded).
        dropout_rate: dropout of the embeddings and MLPs (0.1 in ViT-B).
        use_flash_attention: attention through ``torch.nn.functional.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: int = 64,
        num_blocks: int = 9,
        transformer_positions: Sequence[int] = (1, 6),
        share_transformer: bool = True,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        image_size: Sequence[int] = (176, 208),
        dropout_rate: float = 0.1,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if any(size % 16 for size in image_size):
            raise ValueError(f"image_size must be divisible by 16, got {tuple(image_size)}.")
        if not set(transformer_positions) <= set(range(1, num_blocks + 1)):
            raise ValueError(f"transformer_positions {tuple(transformer_positions)} must lie in 1..{num_blocks}.")
        width = 4 * channels
        token_grid = [size // 16 for size in image_size]

        def new_encoder() -> ViTEncoder:
            return ViTEncoder(hidden_size, num_layers, num_heads, mlp_dim, dropout_rate, use_flash_attention)

        shared = new_encoder() if share_transformer else None
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, channels, 7, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            _conv_bn_relu(channels, 2 * channels, 2),
            _conv_bn_relu(2 * channels, width, 2),
        )
        self.blocks = nn.Sequential(
            *(
                TransformerARTBlock(width, shared or new_encoder(), token_grid, hidden_size, dropout_rate)
                if position in transformer_positions
                else ResnetBlock(width)
                for position in range(1, num_blocks + 1)
            )
        )
        self.decoder = nn.Sequential(
            _up_bn_relu(width, 2 * channels),
            _up_bn_relu(2 * channels, channels),
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, out_channels, 7),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(
                f"height and width must be divisible by 16, got ({x.shape[-2]}, {x.shape[-1]}); pad the slices."
            )
        return self.decoder(self.blocks(self.encoder(x)))


def _vit_layer_arrays(checkpoint: Mapping[str, np.ndarray], index: int, hidden: int) -> dict[str, np.ndarray]:
    """One Google ViT encoder block in this module's parameter layout (PyTorch ``Linear`` is out x in)."""
    prefix = f"Transformer/encoderblock_{index}"
    attention = f"{prefix}/MultiHeadDotProductAttention_1"
    arrays = {
        "norm1.weight": checkpoint[f"{prefix}/LayerNorm_0/scale"],
        "norm1.bias": checkpoint[f"{prefix}/LayerNorm_0/bias"],
        "norm2.weight": checkpoint[f"{prefix}/LayerNorm_2/scale"],
        "norm2.bias": checkpoint[f"{prefix}/LayerNorm_2/bias"],
        "attn.out_proj.weight": checkpoint[f"{attention}/out/kernel"].reshape(hidden, hidden).T,
        "attn.out_proj.bias": checkpoint[f"{attention}/out/bias"],
        "mlp.linear1.weight": checkpoint[f"{prefix}/MlpBlock_3/Dense_0/kernel"].T,
        "mlp.linear1.bias": checkpoint[f"{prefix}/MlpBlock_3/Dense_0/bias"],
        "mlp.linear2.weight": checkpoint[f"{prefix}/MlpBlock_3/Dense_1/kernel"].T,
        "mlp.linear2.bias": checkpoint[f"{prefix}/MlpBlock_3/Dense_1/bias"],
    }
    for name, target in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
        arrays[f"attn.{target}.weight"] = checkpoint[f"{attention}/{name}/kernel"].reshape(hidden, hidden).T
        arrays[f"attn.{target}.bias"] = checkpoint[f"{attention}/{name}/bias"].reshape(hidden)
    return arrays


def _position_grid(position: np.ndarray, hidden: int) -> torch.Tensor:
    """The checkpoint's position embedding as a (1, hidden, g, g) grid, its class token dropped."""
    tokens = position.reshape(-1, hidden)
    side = int(round(np.sqrt(tokens.shape[0] - 1)))
    if side * side == tokens.shape[0] - 1:
        tokens = tokens[1:]
    else:
        side = int(round(np.sqrt(tokens.shape[0])))
    if side * side != tokens.shape[0]:
        raise ValueError(f"position embedding of {tokens.shape[0]} tokens is not a square grid")
    return torch.from_numpy(np.ascontiguousarray(tokens)).float().T.reshape(1, hidden, side, side)


@torch.no_grad()
def load_vit_checkpoint(model: VCT, path: str | os.PathLike) -> None:
    """Initialise VCT's transformer blocks from Google's R50+ViT-B/16 ``.npz`` checkpoint (spec vct.md §4.4).

    The 12 encoder blocks and the final LayerNorm go into the shared ViT encoder (into every encoder when they are
    not shared); the hybrid model's 1x1 patch embedding (``embedding/kernel``, ``embedding/bias``) into each block's
    1x1 embedding; the position embedding, its class token dropped, resized bicubically from its square grid (14 x 14
    for the 224-pixel checkpoint) to each block's token grid. The ResNet-50 stem is not used. Raises
    :class:`synth7t.errors.InputError` naming the file when it is missing, unreadable, or lacks a key or shape the
    model needs, before any weight is changed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ViT checkpoint not found.")
    try:
        with np.load(path) as archive:
            checkpoint = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npz ViT checkpoint ({error}).") from None
    blocks = [block for block in model.blocks if isinstance(block, TransformerARTBlock)]
    encoders = list({id(block.encoder): block.encoder for block in blocks}.values())
    hidden = blocks[0].patch_embedding.out_channels
    updates: list[tuple[torch.Tensor, np.ndarray | torch.Tensor]] = []
    try:
        for encoder in encoders:
            for index, layer in enumerate(encoder.layers):
                parameters = dict(layer.named_parameters())
                for name, array in _vit_layer_arrays(checkpoint, index, hidden).items():
                    updates.append((parameters[name], array))
            updates.append((encoder.norm.weight, checkpoint["Transformer/encoder_norm/scale"]))
            updates.append((encoder.norm.bias, checkpoint["Transformer/encoder_norm/bias"]))
        grid = _position_grid(checkpoint["Transformer/posembed_input/pos_embedding"], hidden)
        embedding = np.transpose(checkpoint["embedding/kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
        for block in blocks:
            updates.append((block.patch_embedding.weight, embedding))
            updates.append((block.patch_embedding.bias, checkpoint["embedding/bias"]))
            resized = F.interpolate(grid, size=block.position_embedding.shape[-2:], mode="bicubic", align_corners=False)
            updates.append((block.position_embedding, resized))
        for parameter, value in updates:
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(f"shape {tuple(value.shape)} does not fit the model's {tuple(parameter.shape)}")
    except KeyError as error:
        raise InputError(f"{path}: the ViT checkpoint has no {error.args[0]!r} (expected R50+ViT-B/16 keys).") from None
    except ValueError as error:
        raise InputError(f"{path}: {error} (the ViT configuration must match the checkpoint).") from None
    for parameter, value in updates:
        parameter.copy_(torch.as_tensor(np.asarray(value), dtype=parameter.dtype))
