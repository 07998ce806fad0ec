"""Net2WiderNet for the gan generator (synth7t.widen) and scripts/widen_checkpoint.py."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch

from synth7t.networks import AttentionResUNet
from synth7t.data import InputError
from synth7t.widen import widen_attention_res_unet

from conftest import REPOSITORY

# two stages of 8 and 16 channels, 4 groups: the level-0 decoder concatenates 16 + 8 channels, whose GroupNorm
# groups of 6 straddle the two inputs, the case a naive widening gets wrong
NARROW = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, global_residual=True)


def _random_narrow(seed: int = 0) -> AttentionResUNet:
    """Every parameter random, so the zero-initialised head and attention output take part."""
    net = AttentionResUNet(**NARROW)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return net.eval()


def _wide(narrow: AttentionResUNet, seed: int = 0) -> AttentionResUNet:
    wide = AttentionResUNet(**{**NARROW, "channels": 2 * NARROW["channels"]}).eval()
    wide.load_state_dict(widen_attention_res_unet(narrow.state_dict(), seed))  # strict: every shape fits
    return wide


def test_widened_network_computes_the_same_function():
    narrow = _random_narrow()
    wide = _wide(narrow)
    x = torch.rand(3, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = narrow(x)
        assert (expected - x[:, 1:2]).abs().max() > 0.1  # the narrow network is far from the identity
        # equal up to Bessel's correction of AdaDM's standard deviation over twice the values (relative ~1e-4 here)
        torch.testing.assert_close(wide(x), expected, rtol=1e-3, atol=1e-4)
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())


def test_the_two_copies_of_a_channel_learn_apart():
    """Equal halves would give both copies the same gradient for ever; the random split does not."""
    wide = _wide(_random_narrow())
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    wide(x).square().mean().backward()
    stem_gradient = wide.stem.conv.weight.grad
    assert not torch.allclose(stem_gradient[0], stem_gradient[1])
    # but the copies start equal: stem rows 0 and 1 are both narrow row 0
    torch.testing.assert_close(wide.stem.conv.weight[0], wide.stem.conv.weight[1])


def test_the_split_is_seeded():
    narrow = _random_narrow().state_dict()
    first, again, other = (widen_attention_res_unet(narrow, seed) for seed in (0, 0, 1))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["head.2.conv.weight"], other["head.2.conv.weight"])


def test_cross_attention_is_refused():
    net = AttentionResUNet(**NARROW, cross_attention_stages=(2,), context_dim=5)
    with pytest.raises(ValueError, match="unconditioned networks only"):
        widen_attention_res_unet(net.state_dict())


def test_a_refiner_is_refused():
    net = AttentionResUNet(**NARROW, refine_depth=2, refine_channels=4)
    with pytest.raises(ValueError, match="U-Net alone"):
        widen_attention_res_unet(net.state_dict())


def test_script_writes_the_widened_checkpoint_and_keeps_an_existing_one(tmp_path, monkeypatch):
    narrow_path, wide_path = tmp_path / "narrow.pt", tmp_path / "wide.pt"
    torch.save(_random_narrow().state_dict(), narrow_path)
    flags = ["--channel_mult", "[1, 2]", "--norm_num_groups", "4"]
    argv = ["widen_checkpoint.py", "--checkpoint", str(narrow_path), "--output", str(wide_path), *flags]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPOSITORY / "scripts" / "widen_checkpoint.py"), run_name="__main__")
    wide = AttentionResUNet(**{**NARROW, "channels": 16})
    wide.load_state_dict(torch.load(wide_path, weights_only=True))
    written = wide_path.read_bytes()
    with pytest.raises(InputError, match="overwrite"):
        runpy.run_path(str(REPOSITORY / "scripts" / "widen_checkpoint.py"), run_name="__main__")
    assert wide_path.read_bytes() == written
