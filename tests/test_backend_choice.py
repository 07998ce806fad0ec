"""`backend: auto` (synth7t.engines.choose_backend): ONNX Runtime only where it gives the checkpoint's output."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from torch import nn

from synth7t.engines import choose_backend
from synth7t.errors import InputError

PROBE = [1, 3, 16, 16]


def small_network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))


@pytest.fixture
def exported(tmp_path):
    """``(network, model.pt, model.onnx)``: a small network's weights and its ONNX export (legacy exporter)."""
    torch.manual_seed(0)
    network = small_network().eval()
    ckpt, onnx = tmp_path / "model.pt", tmp_path / "model.onnx"
    torch.save(network.state_dict(), ckpt)
    torch.onnx.export(
        network, (torch.rand(PROBE),), str(onnx), input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}},
        dynamo=False,
    )  # fmt: skip
    return network, ckpt, onnx


def test_auto_takes_onnxruntime_when_the_export_gives_the_checkpoints_output(exported, caplog):
    _, ckpt, onnx = exported
    with caplog.at_level(logging.INFO, logger="synth7t.engines"):
        assert choose_backend("auto", small_network(), ckpt, onnx, "cpu", PROBE) == "onnxruntime"
    assert "backend auto: onnxruntime" in caplog.text


def test_auto_takes_pytorch_for_a_checkpoint_the_export_does_not_hold(exported, tmp_path, caplog):
    network, _, onnx = exported
    with torch.no_grad():
        network[0].bias.add_(0.01)  # a retrained checkpoint, no new export
    retrained = tmp_path / "retrained.pt"
    torch.save(network.state_dict(), retrained)
    with caplog.at_level(logging.INFO, logger="synth7t.engines"):
        assert choose_backend("auto", small_network(), retrained, onnx, "cpu", PROBE) == "pytorch"
    assert "differs from" in caplog.text


def test_auto_takes_pytorch_for_another_architecture(exported):
    _, _, onnx = exported
    other = nn.Conv2d(3, 3, 1)
    ckpt = onnx.parent / "other.pt"
    torch.save(other.state_dict(), ckpt)
    assert choose_backend("auto", nn.Conv2d(3, 3, 1), ckpt, onnx, "cpu", PROBE) == "pytorch"


@pytest.mark.parametrize("missing", ["onnx", "ckpt"])
def test_auto_takes_pytorch_without_both_files(exported, tmp_path, missing):
    _, ckpt, onnx = exported
    paths = {"ckpt": ckpt, "onnx": onnx, missing: tmp_path / "absent"}
    assert choose_backend("auto", small_network(), paths["ckpt"], paths["onnx"], "cpu", PROBE) == "pytorch"


def test_auto_takes_pytorch_off_the_cpu_or_without_onnxruntime(exported, monkeypatch):
    _, ckpt, onnx = exported
    assert choose_backend("auto", small_network(), ckpt, onnx, "cuda", PROBE) == "pytorch"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    assert choose_backend("auto", small_network(), ckpt, onnx, "cpu", PROBE) == "pytorch"


@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_an_explicit_backend_is_kept(tmp_path, backend):
    # no probe: the files need not exist (the run's own checks report a missing one)
    assert choose_backend(backend, small_network(), tmp_path / "a.pt", tmp_path / "a.onnx", "cpu", PROBE) == backend


def test_an_unknown_backend_is_bad_input(tmp_path):
    with pytest.raises(InputError, match="backend 'tensorrt' is not one of auto, pytorch, onnxruntime"):
        choose_backend("tensorrt", small_network(), tmp_path / "a.pt", tmp_path / "a.onnx", "cpu", PROBE)
