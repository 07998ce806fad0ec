"""VCT, the Vision CNN-Transformer of seed 000 (spec vct.md §4.3): sizes, shared transformer, shapes, attention."""

from __future__ import annotations

import pytest
import torch

from synth7t.networks import VCT

TINY = dict(channels=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, image_size=(32, 48))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_configuration_has_the_published_size():
    """Spec §4.3: 123.27 M parameters with the ViT-B encoder shared, 208.33 M without: the paper's "≈123 million"
    and "41 %" saving."""
    with torch.device("meta"):
        shared, unshared = VCT(), VCT(share_transformer=False)
    assert _count(shared) == 123_271_105
    assert _count(unshared) == 208_327_105
    one_vit_b = 12 * (4 * (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 2 * 768) + 2 * 768
    assert _count(unshared) - _count(shared) == one_vit_b == 85_056_000
    assert 1 - _count(shared) / _count(unshared) == pytest.approx(0.408, abs=0.001)


def test_the_two_transformer_blocks_share_one_encoder():
    net = VCT(**TINY)
    first, second = net.blocks[0], net.blocks[5]
    assert first.encoder is second.encoder
    assert first.patch_embedding is not second.patch_embedding  # embeddings stay per block
    assert first.position_embedding is not second.position_embedding
    assert [type(block).__name__ for block in net.blocks].count("TransformerARTBlock") == 2
    # both blocks' gradients accumulate into the same encoder weights
    weight = first.encoder.layers[0].mlp.linear1.weight
    net(torch.rand(2, 2, 32, 48)).mean().backward()
    with_both = weight.grad.clone()
    weight.grad = None
    net.blocks[5] = torch.nn.Identity()  # drop the second block's use
    net(torch.rand(2, 2, 32, 48)).mean().backward()
    assert not torch.allclose(with_both, weight.grad)


def test_unshared_blocks_have_their_own_encoders():
    net = VCT(**TINY, share_transformer=False)
    assert net.blocks[0].encoder is not net.blocks[5].encoder


@pytest.mark.parametrize("size", [(32, 48), (48, 32), (64, 64), (16, 16), (176, 208)])
def test_any_size_divisible_by_16(size):
    net = VCT(**TINY).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, *size))
    assert out.shape == (1, 1, *size)
    assert out.abs().max() <= 1  # tanh output


@pytest.mark.parametrize("size", [(40, 48), (32, 50)])
def test_other_sizes_are_a_clear_error(size):
    with pytest.raises(ValueError, match="divisible by 16"):
        VCT(**TINY)(torch.rand(1, 2, *size))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="image_size must be divisible by 16"):
        VCT(**{**TINY, "image_size": (30, 48)})
    with pytest.raises(ValueError, match=r"transformer_positions \(1, 10\) must lie in 1..9"):
        VCT(**TINY, transformer_positions=(1, 10))


def test_single_input_ablation_and_positions():
    net = VCT(**TINY, in_channels=1, transformer_positions=(2,))
    assert type(net.blocks[1]).__name__ == "TransformerARTBlock" and net.encoder[1].in_channels == 1
    assert net(torch.rand(1, 1, 32, 48)).shape == (1, 1, 32, 48)


def test_flash_attention_path_matches_the_explicit_one():
    torch.manual_seed(0)
    reference = VCT(**TINY).eval()
    flash = VCT(**TINY, use_flash_attention=True).eval()
    flash.load_state_dict(reference.state_dict())
    x = torch.rand(2, 2, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(flash(x), reference(x), rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_is_finite_and_close():
    torch.manual_seed(0)
    net = VCT(**TINY).eval()
    x = torch.rand(2, 2, 32, 48)
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05


def test_gradients_reach_every_parameter():
    net = VCT(**TINY)
    net(torch.rand(2, 2, 32, 48)).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
