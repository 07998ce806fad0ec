"""TorchScript and ONNX exports of the shipped networks (`make export`), and the ONNX Runtime inference backend."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch

from synth7t.engines import OnnxRuntimeNetwork
from synth7t.networks import WATNet

from conftest import REPOSITORY, run_bundle

WATNET = REPOSITORY / "bundles" / "watnet"
# slabs of the 182 x 218 TELL slices padded to 184 x 224, as WATNet's inference sees them, and another shape
SHAPES = [(2, 3, 184, 224), (1, 3, 64, 96)]


@pytest.fixture(scope="module")
def watnet() -> WATNet:
    network = WATNet()
    network.load_state_dict(torch.load(WATNET / "models" / "model.pt", weights_only=True))
    return network.eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_torchscript_export_matches_the_checkpoint(watnet, shape):
    exported = torch.jit.load(str(WATNET / "models" / "model.ts"))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (exported(x) - watnet(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_onnx_export_matches_the_checkpoint(watnet, shape):
    exported = OnnxRuntimeNetwork(str(WATNET / "models" / "model.onnx"))
    assert exported.providers == ["CPUExecutionProvider"]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (exported(x) - watnet(x)).abs().max().item() <= 1e-4


def test_torchscript_carries_the_metadata_and_inference_config():
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(WATNET / "models" / "model.ts"), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    assert metadata["version"] == json.loads((WATNET / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "synth7t.networks.WATNet"


def test_onnx_backend_infers_the_same_volumes_as_pytorch(tiny_dataset, tmp_path):
    configs = {"pytorch": ["inference.yaml"], "onnx": ["inference.yaml", "inference_onnx.yaml"]}
    for name, files in configs.items():
        result = run_bundle(
            "watnet", "inferring", files, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / name), num_workers=0
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for subject in ("sub-4", "sub-5"):
        volumes = [nib.load(tmp_path / name / f"{subject}_3T_7t.nii.gz") for name in configs]
        np.testing.assert_allclose(volumes[0].affine, volumes[1].affine)
        assert np.abs(volumes[0].get_fdata() - volumes[1].get_fdata()).max() <= 1e-4


def test_onnx_backend_without_the_exported_file_stops_before_compute(tiny_dataset, tmp_path):
    result = run_bundle(
        "watnet", "inferring", ["inference.yaml", "inference_onnx.yaml"], dataset_dir=str(tiny_dataset),
        output_dir=str(tmp_path / "out"), onnx_path=str(tmp_path / "absent.onnx"), num_workers=0,
    )  # fmt: skip
    assert result.returncode == 1 and "absent.onnx: ONNX model not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_make_export_rebuilds_both_files():
    dry_run = subprocess.run(["make", "-n", "export"], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert "ckpt_export network_def" in dry_run.stdout and "bundles/watnet/models/model.ts" in dry_run.stdout
    assert "onnx_export network_def" in dry_run.stdout and "bundles/watnet/models/model.onnx" in dry_run.stdout
