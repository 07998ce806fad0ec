"""The thesis generator: AdaDM, its residual block, and the attention residual U-Net (spec ganunet.md §3)."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from synth7t.networks import AdaDM, AdaDMResBlock, AttentionResUNet

from conftest import REPOSITORY

TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Replace every parameter with random values, so zero-initialised layers (attention outputs) take part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def test_adadm_starts_as_the_per_sample_std_of_the_block_input():
    x = torch.randn(3, 4, 5, 6) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    residue = torch.randn(3, 2, 5, 6)
    expected = residue * torch.stack([sample.std() for sample in x]).view(3, 1, 1, 1)
    torch.testing.assert_close(AdaDM()(residue, x), expected, rtol=1e-5, atol=1e-6)


def test_adadm_weight_and_bias_are_learned_scalars():
    adadm = AdaDM()
    with torch.no_grad():
        adadm.weight.fill_(0.5)
        adadm.bias.fill_(0.3)
    x, residue = torch.randn(2, 3, 4, 4), torch.ones(2, 1, 4, 4)
    std = x.flatten(1).std(dim=1)
    expected = torch.exp(0.5 * torch.log(std + adadm.eps) + 0.3).view(2, 1, 1, 1).expand(2, 1, 4, 4)
    torch.testing.assert_close(adadm(residue, x), expected)
    adadm(residue, x).sum().backward()
    assert adadm.weight.grad is not None and adadm.bias.grad is not None
    assert sum(p.numel() for p in adadm.parameters()) == 2


def test_adadm_stays_finite_on_a_constant_input():
    out = AdaDM()(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert torch.isfinite(out).all()


def test_residual_block_is_the_identity_at_start():
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(AdaDMResBlock(8, 8, norm_num_groups=4)(x), x)


def test_residual_block_with_new_width_starts_as_its_1x1_skip():
    block = AdaDMResBlock(8, 16, norm_num_groups=4)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(block(x), block.skip(x))


def test_residual_block_parameter_count_by_hand():
    c_in, c_out = 8, 16
    group_norms = 2 * c_in + 2 * c_out
    convs = (9 * c_in * c_out + c_out) + (9 * c_out * c_out + c_out)
    skip = c_in * c_out + c_out
    block = AdaDMResBlock(c_in, c_out, norm_num_groups=4)
    assert sum(p.numel() for p in block.parameters()) == group_norms + convs + skip + 2


def test_residual_block_modulation_scales_the_residue_once_trained():
    torch.manual_seed(0)
    block = AdaDMResBlock(4, 4, norm_num_groups=2)
    _randomise(block.residue)
    x = torch.randn(2, 4, 6, 6)
    residue = block.residue(x)
    std = x.flatten(1).std(dim=1).view(2, 1, 1, 1)
    torch.testing.assert_close(block(x), x + residue * std, rtol=1e-4, atol=1e-5)


def test_unconditioned_unet_keeps_the_slice_size_and_returns_one_slice():
    net = AttentionResUNet(in_channels=3, out_channels=1, **TINY)
    out = net(torch.rand(2, 3, 16, 12))
    assert out.shape == (2, 1, 16, 12)
    assert net.context_dim is None


def test_unet_downsamples_once_per_stage():
    net = AttentionResUNet(**TINY)
    assert net.divisor == 4
    seen = []
    net.bottleneck_in.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    net(torch.rand(1, 3, 16, 12))
    assert seen == [torch.Size([1, 16, 4, 3])]
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 3, 18, 12))


def test_cross_attention_uses_the_context():
    net = AttentionResUNet(**TINY, cross_attention_stages=(2, 3), context_dim=4)
    _randomise(net)
    x = torch.rand(2, 3, 8, 8)
    context = torch.tensor([[0.7, 1.0, 0.0, 0.1], [0.3, 0.0, 1.0, -0.2]])
    out = net(x, context)
    assert out.shape == (2, 1, 8, 8)
    assert not torch.allclose(out, net(x, context.flip(0)))
    # one token as (B, 4) or (B, 1, 4), and the sample order follows the batch
    torch.testing.assert_close(net(x, context[:, None]), out)
    torch.testing.assert_close(net(x[:1], context[:1]), out[:1], rtol=1e-4, atol=1e-5)


def test_cross_attention_stage_placement():
    net = AttentionResUNet(**TINY, cross_attention_stages=(2,), context_dim=3)
    assert net.encoder[0].attentions is None and net.encoder[1].attentions is not None
    assert net.decoder[0].attentions is not None and net.decoder[1].attentions is None  # decoder runs 2, 1
    assert not net.bottleneck_attends_context
    assert AttentionResUNet(**TINY, cross_attention_stages=(3,), context_dim=3).bottleneck_attends_context


def test_bottleneck_self_attention_works_without_context():
    net = AttentionResUNet(**TINY)
    _randomise(net)
    x = torch.rand(1, 3, 8, 8)
    features = net.bottleneck_in(net.pool(net.encoder[1](net.pool(net.encoder[0](net.stem(x), None)), None)))
    assert not torch.allclose(net.bottleneck_attention(features), features)


def test_conditioned_unet_asks_for_its_context():
    net = AttentionResUNet(**TINY, cross_attention_stages=(1,), context_dim=4)
    with pytest.raises(ValueError, match="pass a context of length 4"):
        net(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"context must be \(B, 4\)"):
        net(torch.rand(1, 3, 8, 8), torch.rand(1, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cross_attention_stages=(4,), context_dim=4), r"must lie in 1..3"),
        (dict(cross_attention_stages=(1,)), "need context_dim"),
        (dict(norm_num_groups=3), "must divide every stage width"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionResUNet(**{**TINY, **kwargs})


def test_flash_attention_path_matches_the_explicit_one():
    reference = AttentionResUNet(**TINY, cross_attention_stages=(2, 3), context_dim=4)
    _randomise(reference)
    flash = AttentionResUNet(**TINY, cross_attention_stages=(2, 3), context_dim=4, use_flash_attention=True)
    flash.load_state_dict(reference.state_dict())
    x, context = torch.rand(2, 3, 8, 8), torch.rand(2, 4)
    torch.testing.assert_close(flash(x, context), reference(x, context), rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_with_several_context_tokens():
    net = AttentionResUNet(**TINY, cross_attention_stages=(1, 2, 3), context_dim=4)
    _randomise(net)
    net(torch.rand(2, 3, 8, 8), torch.rand(2, 2, 4)).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_one_context_token_makes_cross_attention_a_per_sample_feature_shift():
    # softmax over a single key is 1: the cross-attention's queries, keys and the LayerNorm that only feeds its
    # queries get no gradient (documented as decision A22)
    net = AttentionResUNet(**TINY, cross_attention_stages=(1, 2, 3), context_dim=4)
    _randomise(net)
    net(torch.rand(2, 3, 8, 8), torch.rand(2, 4)).square().mean().backward()
    idle = {name for name, p in net.named_parameters() if not p.grad.abs().sum() > 0}
    query_side = (".attn2.to_q.", ".attn2.to_k.", ".norm2.")
    assert idle and all(any(part in name for part in query_side) for name in idle), idle


@pytest.mark.parametrize(
    "kwargs, context_shape",
    [
        ({}, None),
        (dict(cross_attention_stages=(1, 2, 3), context_dim=4), (2, 4)),
        (dict(cross_attention_stages=(2,), context_dim=4), (2, 3, 4)),
        (dict(cross_attention_stages=(3,), context_dim=4, use_flash_attention=True), (2, 4)),
    ],
    ids=["unconditioned", "every-stage", "tokens", "flash-bottleneck"],
)
def test_unet_scripts_equal_to_eager(kwargs, context_shape):
    """``torch.jit.script``, as the MONAI model zoo exports a bundle's network (``ckpt_export`` without tracing)."""
    net = AttentionResUNet(**TINY, **kwargs).eval()
    _randomise(net)
    scripted = torch.jit.script(net)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 12, generator=generator)
    args = (x,) if context_shape is None else (x, torch.rand(context_shape, generator=generator))
    with torch.no_grad():
        torch.testing.assert_close(scripted(*args), net(*args), rtol=0, atol=1e-5)


def test_thesis_unc_configuration_scripts():
    """The UNC U-Net (cross-attention in stages 3, 4 and the bottleneck, age, sex, diagnosis and slice position as
    context); the other thesis configurations only differ from it and from the networks above in sizes."""
    parser = ConfigParser()
    configs = REPOSITORY / "bundles" / "gan_unet_t1w7t" / "configs"
    parser.read_config([str(configs / "train.yaml"), str(configs / "unc_unet.yaml")])
    with torch.device("meta"):  # compiled, not run: no need to allocate the thesis's network
        network = parser.get_parsed_content("network_def")
    scripted = torch.jit.script(network)
    assert [name for name, _ in scripted.named_parameters()] == [name for name, _ in network.named_parameters()]
