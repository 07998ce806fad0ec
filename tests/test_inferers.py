"""Tests of synth7t.inferers.SlabInferer: whole-volume 2.5-D inference with stride 1 along the slices and averaging
of the overlapping predictions, or strided slabs (spec watnet.md §5, §11.1 "Test"; spec ganunet.md §1.8 for the "center" mode).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from synth7t.inferers import SlabInferer
from synth7t.transforms import slab_to_channels


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def _volumes(batch: int, channels: int, depth: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, 5, 4, depth, generator=generator)


class _Recorder:
    """A network that records what it is given and returns it (identity in "slab" mode)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.clone()


def _replicate_padded(volume: torch.Tensor, half: int) -> torch.Tensor:
    """(C, X, Y, Z) padded along Z by repeating the edge slices, written without torch.nn.functional.pad."""
    if half == 0:
        return volume
    first = volume[..., :1].expand(*volume.shape[:-1], half)
    last = volume[..., -1:].expand(*volume.shape[:-1], half)
    return torch.cat([first, volume, last], dim=-1)


@pytest.mark.parametrize("slab_size", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 2, 4, 20])
@pytest.mark.parametrize("batch, channels", [(1, 1), (2, 1), (2, 2)])
def test_identity_network_slab_mode_returns_input(slab_size, batch_size, batch, channels):
    x = _volumes(batch, channels, depth=7, seed=slab_size + 10 * batch_size + 100 * channels)
    out = SlabInferer(slab_size=slab_size, output="slab", batch_size=batch_size)(x, _identity)
    assert type(out) is torch.Tensor
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slab_size", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("channels", [1, 2])
def test_center_mode_with_middle_slice_network_returns_input(slab_size, batch_size, channels):
    half = slab_size // 2

    def middle(x: torch.Tensor) -> torch.Tensor:
        return x[:, [c * slab_size + half for c in range(channels)]]

    x = _volumes(2, channels, depth=6, seed=slab_size + channels)
    out = SlabInferer(slab_size=slab_size, output="center", batch_size=batch_size)(x, middle)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize(
    "slab_size, depth, expected",
    [
        (3, 5, [0.5, 1.0, 2.0, 3.0, 3.5]),  # slice 0: slabs 0, 1; slice 4: slabs 3, 4
        (5, 6, [1.0, 1.5, 2.0, 3.0, 3.5, 4.0]),  # slice 0: slabs 0-2; slice 1: 0-3; slice 2: 0-4; ...
        (3, 1, [0.0]),
        (5, 2, [0.5, 0.5]),
        (1, 4, [0.0, 1.0, 2.0, 3.0]),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_overlapping_predictions_are_averaged_without_padded_slices(slab_size, depth, expected, batch_size):
    """The network predicts, for every slice of its slab, the index of the slab's centre slice. Slice z is covered
    by the slabs centred on max(0, z - half) .. min(depth - 1, z + half); its output is the mean of those centres."""
    half = slab_size // 2
    index = torch.arange(depth, dtype=torch.float32).expand(1, 1, 3, 2, depth).clone()

    def centre_index(x: torch.Tensor) -> torch.Tensor:
        centre = x[:, half : half + 1]  # the centre slice of channel 0 holds its own index
        return centre.expand(-1, slab_size, -1, -1).clone()

    out = SlabInferer(slab_size=slab_size, output="slab", batch_size=batch_size)(index, centre_index)
    by_formula = [np.mean(range(max(0, z - half), min(depth - 1, z + half) + 1)) for z in range(depth)]
    np.testing.assert_allclose(expected, by_formula)
    expected_volume = torch.tensor(expected, dtype=torch.float32).expand(1, 1, 3, 2, depth)
    torch.testing.assert_close(out, expected_volume, rtol=0, atol=1e-6)


@pytest.mark.parametrize("slab_size", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_network_sees_slab_to_channels_of_each_crop(slab_size, batch_size):
    batch, channels, depth, half = 2, 2, 6, slab_size // 2
    x = _volumes(batch, channels, depth, seed=3)
    recorder = _Recorder()
    out = SlabInferer(slab_size=slab_size, output="slab", batch_size=batch_size)(x, recorder)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert all(seen.shape[1:] == (channels * slab_size, 5, 4) for seen in recorder.inputs)
    assert all(seen.shape[0] <= batch_size for seen in recorder.inputs)
    seen = torch.cat(recorder.inputs)
    assert seen.shape[0] == batch * depth  # one slab per slice, volume after volume
    for b in range(batch):
        padded = _replicate_padded(x[b], half)
        for z in range(depth):
            crop = padded[..., z : z + slab_size]  # centred on input slice z
            torch.testing.assert_close(seen[b * depth + z], slab_to_channels(crop), rtol=0, atol=0)
            # the channel layout: channel c * k + j is slice z - half + j (edge-replicated) of channel c
            for c in range(channels):
                for j in range(slab_size):
                    source = min(max(z - half + j, 0), depth - 1)
                    torch.testing.assert_close(seen[b * depth + z, c * slab_size + j], x[b, c, :, :, source])


def test_output_channels_may_differ_from_input_channels():
    """A 2-channel (e.g. two modality) input slab and a network predicting one output slab."""
    x = _volumes(1, 2, depth=5, seed=4)
    out = SlabInferer(slab_size=3, output="slab", batch_size=2)(x, lambda s: s[:, 3:6] * 2.0)
    assert out.shape == (1, 1, 5, 4, 5)
    torch.testing.assert_close(out[:, 0], x[:, 1] * 2.0, rtol=1e-6, atol=1e-6)


def test_metatensor_input_gives_metatensor_with_its_affine():
    affine = torch.tensor(
        [[0, 0, -1.2, 30.0], [-0.9, 0, 0, 12.0], [0, 1.1, 0, -7.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    x = MetaTensor(_volumes(1, 1, depth=4, seed=5), affine=affine)
    out = SlabInferer(slab_size=3, batch_size=2)(x, _identity)
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine.double(), affine)
    torch.testing.assert_close(out.as_tensor(), x.as_tensor(), rtol=1e-6, atol=1e-6)
    plain = SlabInferer(slab_size=3, batch_size=2)(x.as_tensor(), _identity)
    assert type(plain) is torch.Tensor and not isinstance(plain, MetaTensor)


def test_network_output_is_cast_to_float32():
    x = _volumes(1, 1, depth=3, seed=6)
    out = SlabInferer(slab_size=3, batch_size=8)(x, lambda s: s.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.to(torch.bfloat16).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "slab_size, stride, depth, centres",
    [
        (3, 3, 9, [1, 4, 7]),  # side by side: each slice predicted once
        (3, 3, 10, [1, 4, 7, 9]),  # slice 9 is missed by the slab on 7: one more slab on the last slice
        (3, 2, 7, [1, 3, 5]),
        (5, 5, 12, [2, 7, 11]),
        (3, 3, 1, [0]),
        (5, 3, 2, [1]),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_strided_slabs_cover_every_slice_with_fewer_network_calls(slab_size, stride, depth, centres, batch_size):
    """The network predicts, for every slice of its slab, the index of the slab's centre slice: each output slice is
    the mean of the centres of the slabs that hold it, and the slabs are those of ``centres``."""
    half = slab_size // 2
    index = torch.arange(depth, dtype=torch.float32).expand(1, 1, 3, 2, depth).clone()
    seen = []

    def centre_index(x: torch.Tensor) -> torch.Tensor:
        seen.extend(x[:, half, 0, 0].tolist())
        return x[:, half : half + 1].expand(-1, slab_size, -1, -1).clone()

    out = SlabInferer(slab_size=slab_size, stride=stride, batch_size=batch_size)(index, centre_index)
    assert seen == centres
    expected = [np.mean([c for c in centres if abs(c - z) <= half]) for z in range(depth)]
    torch.testing.assert_close(out, torch.tensor(expected).float().expand(1, 1, 3, 2, depth), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 3])
def test_strided_identity_network_returns_input(stride):
    x = _volumes(2, 2, depth=11, seed=stride)
    out = SlabInferer(slab_size=3, stride=stride, batch_size=4)(x, _identity)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slab_size, stride, output", [(3, 0, "slab"), (3, 4, "slab"), (3, 2, "center")])
def test_a_stride_that_would_skip_slices_raises(slab_size, stride, output):
    with pytest.raises(ValueError, match="stride"):
        SlabInferer(slab_size=slab_size, stride=stride, output=output)


@pytest.mark.parametrize("slab_size", [0, 2, 4, -1])
def test_invalid_slab_size_raises(slab_size):
    with pytest.raises(ValueError, match="odd"):
        SlabInferer(slab_size=slab_size)


def test_invalid_output_mode_raises():
    with pytest.raises(ValueError, match="output"):
        SlabInferer(output="mean")


@pytest.mark.parametrize("shape", [(1, 5, 4, 3), (5, 4, 3), (1, 1, 1, 5, 4, 3)])
def test_non_5d_input_raises(shape):
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        SlabInferer()(torch.zeros(shape), _identity)


# --- conditioning: per-volume context and slice position (spec ganunet.md §1.9, §3.5) ---------------------------


class _ContextEcho(torch.nn.Module):
    """Returns, for each slab, a constant image per context entry (the centre-slice prediction of a 'center' net)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return context[:, :, None, None].expand(-1, -1, *x.shape[-2:])


def test_slice_position_matches_monai_coordinate_channels():
    from monai.transforms import AddCoordinateChannels

    volume = torch.rand(1, 1, 4, 3, 7)
    inferer = SlabInferer(slab_size=3, output="center", batch_size=2, append_slice_position=True)
    positions = inferer(volume, _ContextEcho())
    coordinates = AddCoordinateChannels(spatial_dims=[2])(volume[0])[-1]  # the z coordinate of every voxel
    torch.testing.assert_close(positions[0, 0], torch.as_tensor(coordinates, dtype=torch.float32))


def test_volume_context_reaches_every_slab_of_its_volume_then_the_position():
    volumes = torch.rand(2, 1, 4, 3, 5)
    context = torch.tensor([[0.7, 1.0], [0.3, 0.0]])
    out = SlabInferer(slab_size=3, output="center", batch_size=3, append_slice_position=True)(
        volumes, _ContextEcho(), context=context
    )
    assert out.shape == (2, 3, 4, 3, 5)
    for b in range(2):
        for d in range(2):
            assert torch.all(out[b, d] == context[b, d])
        torch.testing.assert_close(out[b, 2, 0, 0], torch.linspace(-0.5, 0.5, 5))


def test_volume_context_without_position():
    out = SlabInferer(slab_size=1, output="center")(torch.rand(1, 1, 2, 2, 3), _ContextEcho(), context=torch.tensor([[0.5]]))
    assert torch.all(out == 0.5)


class _BiasedConv(torch.nn.Module):
    """A random 3x3 conv with a bias, so an all-zero slab has a non-zero prediction; counts the slabs it is given."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels_in, channels_out, 3, padding=1)
        torch.nn.init.uniform_(self.conv.bias, 0.5, 1.0)
        self.slabs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.slabs += len(x)
        return self.conv(x)


def _brain_between_zero_slices(depth: int, first: int, last: int) -> torch.Tensor:
    """A (1, 1, 6, 5, depth) volume that is zero outside slices ``first`` .. ``last``, as a skull-stripped one is."""
    volume = torch.zeros(1, 1, 6, 5, depth)
    brain = torch.rand(1, 1, 6, 5, last + 1 - first, generator=torch.Generator().manual_seed(1))
    volume[..., first : last + 1] = 0.1 + brain
    return volume


@pytest.mark.parametrize(("output", "stride"), [("slab", 1), ("slab", 2), ("slab", 3), ("center", 1)])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_empty_slabs_reuse_one_prediction_and_give_the_same_output(output, stride, batch_size):
    volume = _brain_between_zero_slices(depth=20, first=6, last=12)
    results, calls = {}, {}
    for reuse in (True, False):
        network = _BiasedConv(3, 3 if output == "slab" else 1)
        inferer = SlabInferer(slab_size=3, output=output, stride=stride, batch_size=batch_size, reuse_empty_slabs=reuse)
        with torch.no_grad():
            results[reuse] = inferer(volume, network)
        calls[reuse] = network.slabs
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=1e-6)
    centres = SlabInferer(slab_size=3, output=output, stride=stride)._centres(20, torch.device("cpu"))
    empty = [c for c in centres.tolist() if c + 1 < 6 or c - 1 > 12]  # slabs of zero slices only
    assert calls[False] == len(centres) and calls[True] == len(centres) - len(empty) + 1


def test_a_volume_without_empty_slabs_runs_every_slab_once():
    network = _BiasedConv(3, 3)
    with torch.no_grad():
        SlabInferer(slab_size=3, batch_size=4)(_brain_between_zero_slices(depth=9, first=0, last=8), network)
    assert network.slabs == 9


def test_empty_slabs_are_not_reused_when_each_slab_has_its_own_position():
    seen = []

    def record_context(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        seen.extend(context[:, -1].tolist())
        return x[:, 1:2].clone()

    SlabInferer(slab_size=3, output="center", append_slice_position=True)(torch.zeros(1, 1, 4, 4, 7), record_context)
    assert len(seen) == 7
