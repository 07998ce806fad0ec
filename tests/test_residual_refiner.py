"""The full-resolution residual CNN appended to the U-Net and to WATNet, and the bundle helpers that fine-tune it
alone."""

from __future__ import annotations

import pytest
import torch

from synth7t.bundle import BadInput, freeze_except, load_warm_start
from synth7t.networks import AttentionResUNet, ResidualRefiner, WATNet, plain_cnn

TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, global_residual=True)


def test_plain_cnn_has_depth_convolutions_and_starts_at_zero():
    cnn = plain_cnn(4, 1, channels=6, depth=3)
    convolutions = [layer for layer in cnn if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convolutions] == [(4, 6), (6, 6), (6, 1)]
    assert torch.count_nonzero(cnn(torch.rand(2, 4, 8, 8))) == 0
    with pytest.raises(ValueError, match="depth must be at least 1"):
        plain_cnn(4, 1, depth=0)


def test_refiner_starts_as_the_identity_and_learns_from_the_prediction_and_the_inputs():
    refiner = ResidualRefiner(in_channels=3, out_channels=1, channels=6, depth=3)
    prediction, inputs = torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(refiner(prediction, inputs), prediction)
    first = refiner.layers[0]
    assert first.in_channels == 4  # the prediction, then the three input slices
    refiner(prediction, inputs).sum().backward()
    assert refiner.layers[-1].weight.grad.abs().sum() > 0


def test_unet_with_a_refiner_starts_as_the_same_unet_and_scripts():
    torch.manual_seed(0)
    plain = AttentionResUNet(**TINY).eval()
    with torch.no_grad():  # a trained head, so that the U-Net's output is not the identity
        plain.head[-1].conv.weight.normal_(0, 0.1)
    refined = AttentionResUNet(**TINY, refine_depth=3, refine_channels=6).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and {key.split(".")[0] for key in missing} == {"refiner"}
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(refined(x), plain(x))
    with torch.no_grad():
        refined.refiner.layers[-1].weight.normal_(0, 0.1)
    assert not torch.allclose(refined(x), plain(x))
    torch.testing.assert_close(torch.jit.script(refined)(x), refined(x))


def test_watnet_with_a_refiner_starts_as_the_same_watnet_and_scripts():
    torch.manual_seed(0)
    plain = WATNet().eval()  # the released initialisation: its output is not the identity
    refined = WATNet(refine_depth=3, refine_channels=6).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and {key.split(".")[0] for key in missing} == {"refiner"}
    assert refined.refiner.layers[0].in_channels == 6  # the predicted slab, then the input slab
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(refined(x), plain(x))
        refined.refiner.layers[-1].weight.normal_(0, 0.1)
        assert not torch.allclose(refined(x), plain(x))
        torch.testing.assert_close(torch.jit.script(refined)(x), refined(x))


def test_watnet_parameter_groups_train_the_refiner_at_the_full_rate_and_alone_when_asked():
    network = WATNet(refine_depth=2, refine_channels=4)
    fast, slow = network.parameter_groups(1e-3)
    refiner = {id(p) for p in network.refiner.parameters()}
    assert refiner <= {id(p) for p in fast["params"]} and not refiner & {id(p) for p in slow["params"]}
    assert slow["lr"] == pytest.approx(1e-4)  # the WATNet's biases and output conv, as the released solver
    (only,) = network.parameter_groups(1e-3, freeze_except(network, "refiner"))
    assert {id(p) for p in only["params"]} == refiner and only["lr"] == 1e-3


def test_warm_start_fills_the_unet_and_refuses_weights_of_another_network(tmp_path):
    plain = AttentionResUNet(**TINY)
    torch.save(plain.state_dict(), tmp_path / "unet.pt")
    refined = AttentionResUNet(**TINY, refine_depth=2, refine_channels=4)
    assert load_warm_start(refined, tmp_path / "unet.pt", "cpu", new_modules=["refiner"])
    torch.testing.assert_close(refined.stem.conv.weight, plain.stem.conv.weight)
    with pytest.raises(BadInput, match="unet.pt: its weights do not fit this network"):
        load_warm_start(refined, tmp_path / "unet.pt", "cpu")  # the refiner not declared new
    torch.save(AttentionResUNet(**{**TINY, "channels": 4}).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(BadInput, match="narrow.pt"):
        load_warm_start(plain, tmp_path / "narrow.pt", "cpu", new_modules=["refiner"])


def test_freeze_except_trains_the_named_submodule_alone():
    network = AttentionResUNet(**TINY, refine_depth=2, refine_channels=4)
    assert len(list(freeze_except(network, None))) == len(list(network.parameters()))
    trained = list(freeze_except(network, "refiner"))
    assert trained == list(network.refiner.parameters())
    assert all(not p.requires_grad for name, p in network.named_parameters() if not name.startswith("refiner."))
    with pytest.raises(BadInput, match="no submodule 'critic'"):
        freeze_except(network, "critic")
