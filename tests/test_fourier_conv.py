"""FourierConv2d: the FFT path equals nn.Conv2d in value and gradients; eval mode and exports use the direct path."""

import pytest
import torch
from torch import nn

from synth7t.networks import FourierConv2d, WATNet


def _pair(kernel: int, padding: int, bias: bool) -> tuple[nn.Conv2d, FourierConv2d]:
    torch.manual_seed(0)
    direct = nn.Conv2d(5, 3, kernel, padding=padding, bias=bias)
    fourier = FourierConv2d(5, 3, kernel, padding=padding, bias=bias)
    fourier.load_state_dict(direct.state_dict())
    return direct, fourier


@pytest.mark.parametrize("kernel, padding, bias", [(17, 8, True), (5, 0, True), (3, 1, False), (4, 3, True)])
@pytest.mark.parametrize("size", [(16, 16), (13, 22)])
def test_training_path_equals_conv2d_in_value_and_gradients(kernel, padding, bias, size):
    direct, fourier = _pair(kernel, padding, bias)
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    direct, fourier = direct.double().train(), fourier.double().train()
    x_direct, x_fourier = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_direct, y_fourier = direct(x_direct), fourier(x_fourier)
    assert y_fourier.shape == y_direct.shape
    torch.testing.assert_close(y_fourier, y_direct, rtol=0, atol=1e-10)
    weights = torch.randn_like(y_direct)
    (y_direct * weights).sum().backward()
    (y_fourier * weights).sum().backward()
    torch.testing.assert_close(x_fourier.grad, x_direct.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(fourier.weight.grad, direct.weight.grad, rtol=0, atol=1e-9)
    if bias:
        torch.testing.assert_close(fourier.bias.grad, direct.bias.grad, rtol=0, atol=1e-9)


def test_float32_and_bfloat16_autocast_keep_the_input_dtype():
    direct, fourier = _pair(17, 8, True)
    x = torch.randn(2, 5, 24, 24)
    torch.testing.assert_close(fourier.train()(x), direct(x), rtol=0, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fourier(x.bfloat16()).dtype == torch.bfloat16


def test_eval_mode_is_the_direct_convolution_and_scripts():
    direct, fourier = _pair(17, 8, True)
    x = torch.randn(1, 5, 20, 20)
    assert torch.equal(fourier.eval()(x), direct(x))
    scripted = torch.jit.script(fourier)
    assert torch.equal(scripted(x), direct(x))
    scripted.train()
    torch.testing.assert_close(scripted(x), direct(x), rtol=0, atol=1e-4)


def test_rejects_padding_the_fft_window_cannot_hold():
    with pytest.raises(ValueError, match="padding"):
        FourierConv2d(2, 2, 3, padding=3)


def test_watnet_output_layer_is_fourier_with_the_conv2d_state_dict():
    network = WATNet(in_channels=3)
    assert isinstance(network.output[0], FourierConv2d)
    assert set(network.output.state_dict()) == {"0.weight", "0.bias"}
