"""Tests of synth7t.networks (spec watnet.md §2 BasicCNN, §3.2 WATNet as run by the seed, §11.1 the original WATNet)
and of synth7t.engines.AutocastNetwork.

The Haar DWT is checked against PyWavelets, the parameter counts against the totals and per-part counts of the
spec, the initialisations against their closed-form statistics, and the exports (TorchScript, ONNX) against eager.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch
from torch import nn
from torch.nn import functional as F

from synth7t.engines import AutocastNetwork
from synth7t.networks import BasicCNN, HaarDWT2d, WATNet

VARIANTS = ("original", "seed")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on a busy 2-core machine two spinning threads make these convs ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def networks() -> dict[str, WATNet]:
    torch.manual_seed(0)
    return {variant: WATNet(variant=variant).eval() for variant in VARIANTS}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pywt_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``pywt.dwt2(·, "haar")``: approximation (B, C, h, w), details [cH(C), cV(C), cD(C)]."""
    batch, channels = x.shape[:2]
    approximation, horizontal, vertical, diagonal = [], [], [], []
    for b in range(batch):
        per_channel = [pywt.dwt2(x[b, c], "haar") for c in range(channels)]
        approximation.append(np.stack([ca for ca, _ in per_channel]))
        horizontal.append(np.stack([ch for _, (ch, _, _) in per_channel]))
        vertical.append(np.stack([cv for _, (_, cv, _) in per_channel]))
        diagonal.append(np.stack([cd for _, (_, _, cd) in per_channel]))
    details = np.concatenate([np.stack(horizontal), np.stack(vertical), np.stack(diagonal)], axis=1)
    return np.stack(approximation), details


# ----------------------------------------------------------------------------------------------------------- HaarDWT2d


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [(4, 6), (8, 8), (10, 16), (18, 12)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_haar_dwt_matches_pywavelets(channels: int, size: tuple[int, int], dtype: torch.dtype, tolerance: float):
    rng = np.random.default_rng(channels * 100 + size[0])
    x = rng.uniform(-1.0, 1.0, size=(2, channels, *size))
    approximation, details = HaarDWT2d().to(dtype)(torch.as_tensor(x, dtype=dtype))
    expected_approximation, expected_details = _pywt_reference(x)
    assert approximation.shape == (2, channels, size[0] // 2, size[1] // 2)
    assert details.shape == (2, 3 * channels, size[0] // 2, size[1] // 2)
    assert approximation.dtype == dtype and details.dtype == dtype
    np.testing.assert_allclose(approximation.numpy(), expected_approximation, rtol=0, atol=tolerance)
    np.testing.assert_allclose(details.numpy(), expected_details, rtol=0, atol=tolerance)


def test_haar_dwt_detail_order_is_subband_major():
    """Channel 1's vertical detail sits at index C + 1 (sub-band-major), not at 3 * 1 + 1 (channel-major)."""
    x = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    x[0, 1] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # varies along W only: a pure vertical (cV) detail
    _, details = HaarDWT2d()(x)
    flat = details.flatten()
    expected = torch.zeros(6, dtype=torch.float64)
    expected[2 + 1] = pywt.dwt2(x[0, 1].numpy(), "haar")[1][1].item()
    assert abs(expected[3].item()) == pytest.approx(1.0)
    torch.testing.assert_close(flat, expected, rtol=0, atol=1e-12)


def test_haar_dwt_filters_are_not_persistent_and_follow_dtype():
    dwt = HaarDWT2d()
    assert dict(dwt.state_dict()) == {}
    assert "filters" in dict(dwt.named_buffers())
    keys = list(WATNet(variant="seed").state_dict())
    assert keys and not any(key.startswith("wavelet.") for key in keys)
    assert dwt.to(torch.float64).filters.dtype == torch.float64
    assert dwt.to(torch.float32).filters.dtype == torch.float32
    # orthonormal: the four 2x2 filters form an orthonormal basis of R^4
    basis = dwt.filters.reshape(4, 4).double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("convert", ["trace", "script"])
def test_haar_dwt_torchscript_equals_eager(convert: str):
    dwt = HaarDWT2d()
    torch.manual_seed(1)
    example = torch.rand(2, 3, 16, 12)
    exported = torch.jit.trace(dwt, example) if convert == "trace" else torch.jit.script(dwt)
    other = torch.rand(2, 3, 16, 12) * 5 - 2
    for got, expected in zip(exported(other), dwt(other)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_haar_dwt_onnx_export_equals_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    dwt = HaarDWT2d().eval()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 24)
    path = tmp_path / "haar.onnx"
    torch.onnx.export(
        dwt, (x,), str(path), input_names=["x"], output_names=["approximation", "details"], dynamo=False
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    approximation, details = session.run(None, {"x": x.numpy()})
    expected_approximation, expected_details = dwt(x)
    np.testing.assert_allclose(approximation, expected_approximation.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(details, expected_details.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(details, _pywt_reference(x.double().numpy())[1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- parameter counts


def test_watnet_parameter_totals(networks):
    assert _count(networks["original"]) == 1_467_971
    assert _count(networks["seed"]) == 1_346_307


def test_watnet_seed_parameter_counts_per_part(networks):
    """Spec watnet.md §3.2: head 38,720; 5 x DBlock(down/simple) 155,280; 3 x DBlock(up) 159,440; 3 x WAT 4,736;
    tail 38,659."""
    net = networks["seed"]
    assert _count(net.head) == 38_720
    assert len(net.encoder_blocks) == len(net.encoder_compressions) == 4
    assert len(net.decoder_blocks) == len(net.decoder_compressions) == 4
    assert len(net.upsamplers) == len(net.wavelet_transforms) == 3
    # E1-E4 and R1: DBlock + compression
    for block, compression in zip(net.encoder_blocks, net.encoder_compressions):
        assert _count(block) + _count(compression) == 155_280
    assert _count(net.decoder_blocks[0]) + _count(net.decoder_compressions[0]) == 155_280
    # R2-R4: DBlock + compression + transposed conv
    for level in (1, 2, 3):
        up = net.decoder_blocks[level], net.decoder_compressions[level], net.upsamplers[level - 1]
        assert sum(_count(m) for m in up) == 159_440
    for wat in net.wavelet_transforms:
        assert _count(wat) == 4_736
    assert _count(net.output) == 38_659
    assert 38_720 + 5 * 155_280 + 3 * 159_440 + 3 * 4_736 + 38_659 == _count(net)


def test_basic_cnn_parameter_counts():
    net = BasicCNN()
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 672_067
    running = sum(
        buffer.numel()
        for name, buffer in net.named_buffers()
        if name.endswith("running_mean") or name.endswith("running_var")
    )
    assert running == 896
    assert _count(net) + running == 672_963  # the seed's Keras total (spec §2.2)
    batch_norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in batch_norms] == [64, 128, 256]
    assert all(m.eps == 1e-3 and m.momentum == pytest.approx(0.1) for m in batch_norms)


# ------------------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("variant", VARIANTS)
def test_watnet_shape_patch(networks, variant):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y = networks[variant](x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert not torch.equal(y, x)  # a randomly initialised network predicts a non-zero residual


@pytest.mark.parametrize("variant", VARIANTS)
def test_watnet_shape_full_slice(variant):
    """The 184x224 slices of full-slice inference (wavelet sizes 92x112, 46x56, 23x28), shapes on the meta device."""
    with torch.device("meta"):
        net = WATNet(variant=variant)
        x = torch.empty(1, 3, 184, 224)
    y = net(x)
    assert y.shape == (1, 3, 184, 224)
    approximation, wavelets = x, []
    for _ in range(3):
        approximation, details = net.wavelet(approximation)
        wavelets.append(tuple(details.shape[-2:]))
    assert wavelets == [(92, 112), (46, 56), (23, 28)]


def test_watnet_rejects_sizes_not_divisible_by_8(networks):
    for net in networks.values():
        with pytest.raises(ValueError, match="divisible by 8"):
            net(torch.zeros(1, 3, 60, 64))
        with pytest.raises(ValueError, match="divisible by 8"):
            net(torch.zeros(1, 3, 64, 60))


def test_watnet_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        WATNet(variant="caffe")


def test_basic_cnn_shape_padding_and_range():
    torch.manual_seed(4)
    net = BasicCNN().eval()
    x = torch.rand(2, 3, 13, 10)
    with torch.no_grad():
        y = net(x)
        first = net.layers[0]
        # Keras/PyTorch 'same' with a 4x4 kernel: 1 pixel before, 2 after on each axis
        explicit = F.conv2d(F.pad(x, (1, 2, 1, 2)), first.weight, first.bias)
        torch.testing.assert_close(first(x), explicit, rtol=1e-5, atol=1e-6)
    assert y.shape == (2, 3, 13, 10)
    assert (y > 0).all() and (y < 1).all()
    assert isinstance(net.layers[-1], nn.Sigmoid)


# ------------------------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("variant", VARIANTS)
def test_watnet_scripts_equal_to_eager_and_keeps_its_size_check(networks, variant):
    """``torch.jit.script``, as the MONAI model zoo exports a bundle's network (``ckpt_export`` without tracing)."""
    net = networks[variant]
    scripted = torch.jit.script(net)
    torch.manual_seed(10)
    for shape in [(2, 3, 32, 40), (1, 3, 16, 8)]:
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=1e-5)
    with pytest.raises(torch.jit.Error, match=r"divisible by 8, got \(60, 64\)"):
        scripted(torch.zeros(1, 3, 60, 64))


def test_basic_cnn_scripts_equal_to_eager():
    torch.manual_seed(11)
    net = BasicCNN().eval()
    x = torch.rand(2, 3, 13, 10)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------- global residual


@pytest.mark.parametrize("variant", VARIANTS)
def test_watnet_global_residual(variant):
    torch.manual_seed(5)
    net = WATNet(variant=variant).eval()
    last_conv = [m for m in net.output.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.weight.zero_()
        last_conv.bias.zero_()
        x = torch.rand(2, 3, 32, 40)
        y = net(x)
    assert torch.equal(y, x)
    if variant == "seed":
        assert isinstance(net.output[-1], nn.Tanh)
    else:
        assert last_conv.kernel_size == (17, 17) and last_conv.padding == (8, 8) and len(net.output) == 1


# --------------------------------------------------------------------------------------------------------- upsampling


def test_original_upsamplers_are_bilinear_depthwise(networks):
    net = networks["original"]
    expected = torch.outer(torch.tensor([0.25, 0.75, 0.75, 0.25]), torch.tensor([0.25, 0.75, 0.75, 0.25]))
    for up in net.upsamplers:
        assert isinstance(up, nn.ConvTranspose2d)
        assert up.groups == 64 and up.in_channels == up.out_channels == 64
        assert up.bias is None
        assert up.kernel_size == (4, 4) and up.stride == (2, 2) and up.padding == (1, 1)
        assert up.weight.shape == (64, 1, 4, 4)
        torch.testing.assert_close(up.weight.detach(), expected.expand(64, 1, 4, 4), rtol=0, atol=0)
        constant = torch.full((1, 64, 5, 6), 0.7)
        constant[:, 1] = -2.0  # depthwise: each channel keeps its own constant
        with torch.no_grad():
            y = up(constant)
        assert y.shape == (1, 64, 10, 12)
        torch.testing.assert_close(y[:, 0, 1:-1, 1:-1], torch.full((1, 8, 10), 0.7), rtol=0, atol=1e-6)
        torch.testing.assert_close(y[:, 1, 1:-1, 1:-1], torch.full((1, 8, 10), -2.0), rtol=0, atol=1e-6)
        # at the border only one tap of 0.75 reaches the output on that axis
        assert y[0, 0, 0, 3].item() == pytest.approx(0.7 * 0.75, abs=1e-6)


def test_seed_upsamplers_are_bed_of_nails(networks):
    net = networks["seed"]
    torch.manual_seed(6)
    for up in net.upsamplers:
        assert isinstance(up, nn.ConvTranspose2d)
        assert up.kernel_size == (1, 1) and up.stride == (2, 2) and up.groups == 1 and up.bias is not None
        x = torch.rand(2, 64, 3, 5)
        bias = torch.randn(64)
        with torch.no_grad():
            original_bias = up.bias.clone()
            up.bias.copy_(bias)
            y = up(x)
            up.bias.copy_(original_bias)
            nails = torch.einsum("bihw,io->bohw", x, up.weight[:, :, 0, 0]) + bias[None, :, None, None]
        assert y.shape == (2, 64, 6, 10)
        expected_bias = bias[None, :, None, None]
        torch.testing.assert_close(y[:, :, 1::2, :], expected_bias.expand(2, 64, 3, 10), rtol=0, atol=0)
        torch.testing.assert_close(y[:, :, :, 1::2], expected_bias.expand(2, 64, 6, 5), rtol=0, atol=0)
        torch.testing.assert_close(y[:, :, ::2, ::2], nails, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- initialisation


def _convs(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def test_original_initialisation_is_caffe_msra_average(networks):
    net = networks["original"]
    upsamplers = {id(m) for m in net.upsamplers}
    checked = 0
    for name, module in _convs(net):
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name
        if id(module) in upsamplers:
            continue
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
        expected = math.sqrt(4.0 / (fan_in + fan_out))
        if module.weight.numel() >= 2000:
            assert module.weight.std().item() == pytest.approx(expected, rel=0.1), name
            assert abs(module.weight.mean().item()) < 0.1 * expected, name
            checked += 1
    assert checked >= 50
    # the 17x17 output conv: fan_in 64*289, fan_out 3*289
    output = net.output[0]
    assert output.weight.std().item() == pytest.approx(math.sqrt(4.0 / (67 * 289)), rel=0.1)
    # not He (fan_in) for the first layer: 3->64 3x3 has fan_in 27, fan_out 576
    first = net.head[0]
    assert first.weight.std().item() == pytest.approx(math.sqrt(4.0 / (27 + 576)), rel=0.1)


def test_seed_initialisation_is_keras_he_normal(networks):
    net = networks["seed"]
    checked = 0
    for name, module in _convs(net):
        assert module.bias is not None and torch.count_nonzero(module.bias) == 0, name
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        he = math.sqrt(2.0 / fan_in)
        assert module.weight.abs().max().item() <= 2 * he / 0.87962566103423978 + 1e-6, name
        if module.weight.numel() >= 2000:
            assert module.weight.std().item() == pytest.approx(he, rel=0.1), name
            # truncation is at 2 (untruncated) sigma: the extreme weights get close to the cut
            assert module.weight.abs().max().item() > 0.95 * 2 * he / 0.87962566103423978, name
            checked += 1
    assert checked >= 50


def test_basic_cnn_initialisation_is_glorot_uniform():
    torch.manual_seed(7)
    net = BasicCNN()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for conv in convs:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(conv.weight)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert conv.weight.abs().max().item() <= bound + 1e-7
        assert conv.weight.abs().max().item() > 0.9 * bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0


# ---------------------------------------------------------------------------------------------- parameter groups


def test_parameter_groups_original(networks):
    net = networks["original"]
    groups = net.parameter_groups(2.5e-4)
    assert len(groups) == 2
    assert groups[0]["lr"] == pytest.approx(2.5e-4)
    assert groups[1]["lr"] == pytest.approx(2.5e-5)
    names = {id(p): n for n, p in net.named_parameters()}
    fast = [names[id(p)] for p in groups[0]["params"]]
    slow = [names[id(p)] for p in groups[1]["params"]]
    assert len(fast) == len(set(fast)) and len(slow) == len(set(slow))
    assert not set(fast) & set(slow)
    assert set(fast) | set(slow) == set(names.values())
    expected_slow = {n for n in names.values() if n.endswith("bias") or n.startswith("output.")}
    assert set(slow) == expected_slow
    assert {"output.0.weight", "output.0.bias", "head.0.bias"} <= set(slow)
    assert "head.0.weight" in fast and "upsamplers.0.weight" in fast
    # usable as torch.optim groups
    torch.optim.Adam(groups, lr=2.5e-4)


def test_parameter_groups_seed(networks):
    net = networks["seed"]
    groups = net.parameter_groups(1e-3)
    assert len(groups) == 1
    assert groups[0]["lr"] == pytest.approx(1e-3)
    params = groups[0]["params"]
    assert len(params) == len({id(p) for p in params}) == len(list(net.parameters()))
    assert {id(p) for p in params} == {id(p) for p in net.parameters()}


# ----------------------------------------------------------------------------------------------- AutocastNetwork


def test_autocast_network_bfloat16():
    torch.manual_seed(8)
    net = WATNet(variant="seed")
    wrapped = AutocastNetwork(net)
    assert wrapped.module is net
    assert wrapped.dtype == torch.bfloat16 and wrapped.device_type == "cpu"
    assert list(wrapped.state_dict()) == ["module." + key for key in net.state_dict()]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = net(x)
    output = wrapped(x)
    assert output.dtype == torch.float32
    assert output.shape == x.shape
    scale = (reference.max() - reference.min()).item()
    assert scale > 0
    assert (output.detach() - reference).abs().max().item() <= 5e-2 * scale
    assert not torch.equal(output.detach(), reference)  # it did run in reduced precision
    output.sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
    assert net.head[0].weight.grad.abs().sum() > 0
    assert net.output[-2].weight.grad.abs().sum() > 0


def test_autocast_network_returns_float32_for_a_bfloat16_output():
    """BasicCNN ends with conv + sigmoid, so under autocast its own output is bfloat16; the wrapper casts back."""
    torch.manual_seed(9)
    net = BasicCNN().eval()
    x = torch.rand(2, 3, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
    wrapped = AutocastNetwork(net)
    output = wrapped(x)
    assert output.dtype == torch.float32
    with torch.no_grad():
        reference = net(x)
    assert (output.detach() - reference).abs().max().item() <= 2e-2
    assert not torch.equal(output.detach(), reference)
    output.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
