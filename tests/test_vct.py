"""VCT, the Vision CNN-Transformer of seed 000 (spec vct.md §4.3): sizes, shared transformer, shapes, attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scipy.special import erf

from synth7t.errors import InputError
from synth7t.networks import VCT, load_vit_checkpoint

from conftest import REPOSITORY

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


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(in_channels=1, transformer_positions=(2,), share_transformer=False), dict(use_flash_attention=True)],
    ids=["paper-layout", "single-input-unshared", "flash"],
)
def test_scripts_equal_to_eager_at_the_stored_and_another_token_grid(kwargs):
    """``torch.jit.script``, as the MONAI model zoo exports a bundle's network (``ckpt_export`` without tracing); at
    64 x 32 the position embeddings are resized, which a trace at the stored 32 x 48 would leave out."""
    net = VCT(**TINY, **kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():  # the position embeddings start at zero: make their resize visible
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    scripted = torch.jit.script(net)
    for size in [(32, 48), (64, 32)]:
        x = 2 * torch.rand(2, net.encoder[1].in_channels, *size, generator=generator) - 1
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=1e-5)


def test_paper_configuration_scripts():
    parser = ConfigParser()
    configs = REPOSITORY / "bundles" / "vct_adc7t" / "configs"
    parser.read_config([str(configs / "train.yaml"), str(configs / "paper.yaml")])
    with torch.device("meta"):  # compiled, not run: no need to allocate 123 M parameters
        network = parser.get_parsed_content("network_def")
    scripted = torch.jit.script(network)
    assert [name for name, _ in scripted.named_parameters()] == [name for name, _ in network.named_parameters()]


# --- R50+ViT-B/16 checkpoint loading (spec vct.md §4.4), on small checkpoints with the same key layout ------------


def _google_vit_npz(path, hidden=32, heads=2, mlp=64, layers=2, embed_in=128, grid=3, seed=0):
    """Random arrays under the key names and shapes of Google's R50+ViT-B/16 checkpoint, at a small size."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    arrays = {}
    for i in range(layers):
        p = f"Transformer/encoderblock_{i}"
        a = f"{p}/MultiHeadDotProductAttention_1"
        for name in ("query", "key", "value"):
            arrays[f"{a}/{name}/kernel"] = rng.normal(0, 0.2, (hidden, heads, head_dim))
            arrays[f"{a}/{name}/bias"] = rng.normal(0, 0.1, (heads, head_dim))
        arrays[f"{a}/out/kernel"] = rng.normal(0, 0.2, (heads, head_dim, hidden))
        arrays[f"{a}/out/bias"] = rng.normal(0, 0.1, hidden)
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{p}/{norm}/scale"] = 1 + rng.normal(0, 0.1, hidden)
            arrays[f"{p}/{norm}/bias"] = rng.normal(0, 0.1, hidden)
        arrays[f"{p}/MlpBlock_3/Dense_0/kernel"] = rng.normal(0, 0.2, (hidden, mlp))
        arrays[f"{p}/MlpBlock_3/Dense_0/bias"] = rng.normal(0, 0.1, mlp)
        arrays[f"{p}/MlpBlock_3/Dense_1/kernel"] = rng.normal(0, 0.2, (mlp, hidden))
        arrays[f"{p}/MlpBlock_3/Dense_1/bias"] = rng.normal(0, 0.1, hidden)
    arrays["Transformer/encoder_norm/scale"] = 1 + rng.normal(0, 0.1, hidden)
    arrays["Transformer/encoder_norm/bias"] = rng.normal(0, 0.1, hidden)
    arrays["embedding/kernel"] = rng.normal(0, 0.2, (1, 1, embed_in, hidden))
    arrays["embedding/bias"] = rng.normal(0, 0.1, hidden)
    position = rng.normal(0, 0.5, (1, 1 + grid * grid, hidden))
    position[0, 0] = 1e6  # the class token, which must be dropped
    arrays["Transformer/posembed_input/pos_embedding"] = position
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return {k: v.astype(np.float32).astype(np.float64) for k, v in arrays.items()}


def _layer_norm(x, scale, bias):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale + bias


def _google_encoder_block(x, arrays, i):
    """The flax ViT encoder block on the checkpoint's own layouts (einsum over heads), GELU with erf."""
    p = f"Transformer/encoderblock_{i}"
    a = f"{p}/MultiHeadDotProductAttention_1"
    y = _layer_norm(x, arrays[f"{p}/LayerNorm_0/scale"], arrays[f"{p}/LayerNorm_0/bias"])
    q, k, v = (
        np.einsum("td,dhk->thk", y, arrays[f"{a}/{n}/kernel"]) + arrays[f"{a}/{n}/bias"]
        for n in ("query", "key", "value")
    )
    logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("hts,shk->thk", weights, v)
    x = x + np.einsum("thk,hkd->td", attended, arrays[f"{a}/out/kernel"]) + arrays[f"{a}/out/bias"]
    y = _layer_norm(x, arrays[f"{p}/LayerNorm_2/scale"], arrays[f"{p}/LayerNorm_2/bias"])
    h = y @ arrays[f"{p}/MlpBlock_3/Dense_0/kernel"] + arrays[f"{p}/MlpBlock_3/Dense_0/bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return x + h @ arrays[f"{p}/MlpBlock_3/Dense_1/kernel"] + arrays[f"{p}/MlpBlock_3/Dense_1/bias"]


def test_loaded_encoder_computes_what_the_checkpoint_computes(tmp_path):
    arrays = _google_vit_npz(tmp_path / "vit.npz")
    net = VCT(**TINY).eval()
    load_vit_checkpoint(net, tmp_path / "vit.npz")
    tokens = np.random.default_rng(1).normal(size=(6, 32))
    expected = tokens
    for i in range(2):
        expected = _google_encoder_block(expected, arrays, i)
    expected = _layer_norm(expected, arrays["Transformer/encoder_norm/scale"], arrays["Transformer/encoder_norm/bias"])
    with torch.no_grad():
        out = net.blocks[0].encoder(torch.tensor(tokens, dtype=torch.float32)[None])[0]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_embeddings_go_to_both_blocks_and_positions_are_resized_without_the_class_token(tmp_path):
    arrays = _google_vit_npz(tmp_path / "vit.npz", grid=3)
    net = VCT(**TINY)
    load_vit_checkpoint(net, tmp_path / "vit.npz")
    for block in (net.blocks[0], net.blocks[5]):
        kernel = arrays["embedding/kernel"][0, 0]  # (in, out)
        np.testing.assert_allclose(block.patch_embedding.weight[:, :, 0, 0].detach().numpy(), kernel.T, rtol=1e-6)
        position = block.position_embedding.detach()
        assert position.shape == (1, 32, 2, 3)  # the 32 x 48 token grid
        assert position.abs().max() < 10  # the 1e6 class token was dropped
        # tokens are row-major over the 3 x 3 grid, after the class token
        grid = torch.tensor(arrays["Transformer/posembed_input/pos_embedding"][0, 1:], dtype=torch.float32)
        grid = grid.reshape(3, 3, 32).permute(2, 0, 1)[None]
        expected = torch.nn.functional.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False)
        torch.testing.assert_close(position, expected)


def test_unshared_encoders_each_receive_the_checkpoint(tmp_path):
    _google_vit_npz(tmp_path / "vit.npz")
    net = VCT(**TINY, share_transformer=False)
    load_vit_checkpoint(net, tmp_path / "vit.npz")
    first, second = net.blocks[0].encoder.state_dict(), net.blocks[5].encoder.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_missing_or_unfit_checkpoints_are_named_and_change_nothing(tmp_path):
    net = VCT(**TINY)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InputError, match=r"absent.npz: ViT checkpoint not found"):
        load_vit_checkpoint(net, tmp_path / "absent.npz")
    (tmp_path / "broken.npz").write_bytes(b"not an archive")
    with pytest.raises(InputError, match=r"broken.npz: not a readable .npz"):
        load_vit_checkpoint(net, tmp_path / "broken.npz")
    _google_vit_npz(tmp_path / "wide.npz", hidden=48, heads=2)
    with pytest.raises(InputError, match=r"wide.npz: .*\(the ViT configuration must match the checkpoint\)"):
        load_vit_checkpoint(net, tmp_path / "wide.npz")
    _google_vit_npz(tmp_path / "shallow.npz", layers=1)
    with pytest.raises(InputError, match=r"shallow.npz: the ViT checkpoint has no 'Transformer/encoderblock_1/"):
        load_vit_checkpoint(net, tmp_path / "shallow.npz")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
