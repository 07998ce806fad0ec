"""Tests of synth7t.losses.PerSampleSumL1Loss, Caffe's ``L1Loss`` of the released WATNet solver
(spec watnet.md §11.1 "Loss": sum |pred - 7T| / batch size)."""

from __future__ import annotations

import pytest
import torch

from synth7t.losses import PerSampleSumL1Loss


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (4, 3, 16, 12), (5, 2, 3, 4, 6), (3, 7)])
def test_per_sample_sum_l1_value(shape):
    generator = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b = torch.randn(shape, generator=generator, dtype=torch.float64)
    loss = PerSampleSumL1Loss()(a, b)
    assert loss.ndim == 0
    expected = sum(abs(x - y) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / shape[0]
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    per_voxel = torch.nn.L1Loss()(a, b)
    assert loss.item() == pytest.approx(per_voxel.item() * (a.numel() / shape[0]), rel=1e-12)


def test_per_sample_sum_l1_gradient():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 6, 5, generator=generator, dtype=torch.float64)
    PerSampleSumL1Loss()(a, b).backward()
    torch.testing.assert_close(a.grad, torch.sign(a.detach() - b) / 4, rtol=0, atol=1e-15)
    reference = a.detach().clone().requires_grad_(True)
    (torch.nn.L1Loss(reduction="sum")(reference, b) / 4).backward()
    torch.testing.assert_close(a.grad, reference.grad, rtol=0, atol=1e-15)


def test_per_sample_sum_l1_zero_and_scale():
    x = torch.rand(2, 3, 4, 4)
    assert PerSampleSumL1Loss()(x, x).item() == 0.0
    # 64 x 64 x 3 patches: the sum is 12,288 times the per-voxel mean (the weight-decay balance of §11.1)
    a, b = torch.zeros(8, 3, 64, 64), torch.full((8, 3, 64, 64), 0.5)
    assert PerSampleSumL1Loss()(a, b).item() == pytest.approx(0.5 * 12_288)
