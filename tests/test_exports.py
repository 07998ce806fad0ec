"""TorchScript and ONNX exports of every bundle's shipped network (`make export`), and the ONNX Runtime backend
(configs/inference_onnx.yaml, merged after inference.yaml or after train.yaml + evaluate.yaml).

The exported files are required, not skipped when absent: a bundle whose models/model.ts or model.onnx is missing
or stale fails here until `make export` has been rerun on its final models/model.pt.
"""

from __future__ import annotations

import csv
import functools
import json
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export
from monai.bundle import run as run_in_process
from monai.data import load_net_with_metadata
from torch import nn

from synth7t.engines import OnnxRuntimeNetwork

from conftest import REPOSITORY, run_bundle


@dataclass(frozen=True)
class ExportCase:
    """What a bundle's exports are checked on.

    Attributes:
        shapes: network inputs: the slices the bundle's inference feeds the network, then another valid shape.
        low: inputs are drawn uniformly from ``[low, 1]``, the range the network works in.
        dataset: the conftest fixture of a tiny dataset the bundle's inference reads.
    """

    shapes: tuple[tuple[int, ...], ...]
    low: float
    dataset: str


EXPORTS = {
    # slabs of the 182 x 218 TELL slices padded to 184 x 224 (WATNet) or 192 x 224 (multiples of 16, the U-Net)
    "watnet": ExportCase(shapes=((2, 3, 184, 224), (1, 3, 64, 96)), low=0.0, dataset="tiny_dataset"),
    "gan_unet_t1w7t": ExportCase(shapes=((2, 3, 192, 224), (1, 3, 64, 96)), low=0.0, dataset="tiny_dataset"),
    # [T1w, ADC] slices in [-1, 1] at the 176 x 208 the position embeddings are stored for, and a size whose token
    # grid differs: an export traced without the embeddings' bicubic resize fails on it
    "vct_adc7t": ExportCase(shapes=((2, 2, 176, 208), (3, 2, 64, 96)), low=-1.0, dataset="tiny_diffusion_dataset"),
}
SHAPES = [
    pytest.param(bundle, shape, id=f"{bundle}-{'x'.join(map(str, shape))}")
    for bundle, case in EXPORTS.items()
    for shape in case.shapes
]
BACKENDS = {"pytorch": ["inference.yaml"], "onnx": ["inference.yaml", "inference_onnx.yaml"]}
# the workflows the ONNX overlay is merged into: configs before it, and the run id
ROADS = {"inference": (["inference.yaml"], "inferring"), "evaluation": (["train.yaml", "evaluate.yaml"], "evaluating")}


def shipped(bundle: str, name: str) -> Path:
    """``bundles/<bundle>/models/<name>``, failing with what to do when it is missing."""
    path = REPOSITORY / "bundles" / bundle / "models" / name
    assert path.is_file(), f"{path} is missing: run `make export` once the bundle's models/model.pt is final"
    return path


@functools.cache
def checkpoint_network(bundle: str) -> nn.Module:
    """The bundle's default ``network_def`` (configs/inference.yaml) with models/model.pt loaded, in eval mode."""
    parser = ConfigParser()
    parser.read_config(str(REPOSITORY / "bundles" / bundle / "configs" / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(shipped(bundle, "model.pt"), weights_only=True))
    return network.eval()


def assert_matches_checkpoint(bundle: str, exported: nn.Module, shape: tuple[int, ...]) -> None:
    """``exported`` and the checkpoint give outputs within 1e-4 on a random input of ``shape``."""
    low = EXPORTS[bundle].low
    x = low + (1 - low) * torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = checkpoint_network(bundle)(x)
        difference = (exported(x) - expected).abs().max().item()
    assert difference <= 1e-4, f"{bundle} export differs from the checkpoint by {difference:.2e} on {shape}"


@pytest.mark.parametrize(("bundle", "shape"), SHAPES)
def test_torchscript_export_matches_the_checkpoint(bundle, shape):
    assert_matches_checkpoint(bundle, torch.jit.load(str(shipped(bundle, "model.ts"))), shape)


@pytest.mark.parametrize("bundle", EXPORTS)
def test_scripted_ckpt_export_matches_the_checkpoint(bundle, tmp_path):
    """``ckpt_export`` as the MONAI model zoo's CI runs it: ``torch.jit.script``, no ``--use_trace``. Checked on the
    bundle's second shape, the smaller one (for vct_adc7t, another token grid than the stored one)."""
    configs = REPOSITORY / "bundles" / bundle / "configs"
    path = tmp_path / "model.ts"
    ckpt_export(
        "network_def",
        filepath=str(path),
        ckpt_file=str(shipped(bundle, "model.pt")),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.yaml"),
    )
    assert_matches_checkpoint(bundle, torch.jit.load(str(path)), EXPORTS[bundle].shapes[-1])


@pytest.mark.parametrize(("bundle", "shape"), SHAPES)
def test_onnx_export_matches_the_checkpoint(bundle, shape):
    exported = OnnxRuntimeNetwork(str(shipped(bundle, "model.onnx")))
    assert exported.providers == ["CPUExecutionProvider"]
    assert_matches_checkpoint(bundle, exported, shape)


@pytest.mark.parametrize("bundle", EXPORTS)
def test_torchscript_loads_as_monai_deploy_reads_it(bundle):
    """MONAI Deploy's bundle operator loads model.ts with ``extra/metadata.json`` and ``extra/inference.json``."""
    path, configs = shipped(bundle, "model.ts"), REPOSITORY / "bundles" / bundle / "configs"
    with zipfile.ZipFile(path) as archive:
        extra = {name.split("/extra/", 1)[1] for name in archive.namelist() if "/extra/" in name}
    assert {"metadata.json", "inference.json"} <= extra
    network, metadata, extra_files = load_net_with_metadata(str(path), more_extra_files=("inference.json",))
    assert isinstance(network, torch.jit.ScriptModule)
    assert metadata["version"] == json.loads((configs / "metadata.json").read_text())["version"]
    inference = json.loads(extra_files["inference.json"])
    assert inference["network_def"] == ConfigParser.load_config_file(str(configs / "inference.yaml"))["network_def"]


@pytest.mark.parametrize("bundle", EXPORTS)
def test_onnx_backend_infers_the_same_volumes_as_pytorch(bundle, request, tmp_path):
    dataset = request.getfixturevalue(EXPORTS[bundle].dataset)
    for required in ("model.pt", "model.onnx"):
        shipped(bundle, required)
    for name, files in BACKENDS.items():
        result = run_bundle(
            bundle, "inferring", files, dataset_dir=str(dataset), output_dir=str(tmp_path / name), num_workers=0
        )
        assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(path.name for path in (tmp_path / "pytorch").glob("*.nii.gz"))
    assert written == sorted(path.name for path in (tmp_path / "onnx").glob("*.nii.gz"))
    assert len(written) == len(json.loads((dataset / "datalist.json").read_text())["test"])
    for name in written:
        volumes = [nib.load(tmp_path / backend / name) for backend in BACKENDS]
        np.testing.assert_allclose(volumes[0].affine, volumes[1].affine)
        assert np.abs(volumes[0].get_fdata() - volumes[1].get_fdata()).max() <= 1e-4


def _rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open() as table:
        return list(csv.DictReader(table))


@pytest.mark.parametrize("bundle", EXPORTS)
def test_onnx_backend_evaluates_as_pytorch(bundle, request, tmp_path):
    """The evaluation of the shipped weights, through the checkpoint and through model.onnx: the same subjects and
    metrics (outputs within 1e-4, so MAE within 1e-5 and PSNR within 0.01 dB), the same baselines."""
    dataset = request.getfixturevalue(EXPORTS[bundle].dataset)
    configs = REPOSITORY / "bundles" / bundle / "configs"
    for backend, overlays in (("pytorch", []), ("onnx", ["inference_onnx.yaml"])):
        run_in_process(
            "evaluating", config_file=[str(configs / name) for name in (*ROADS["evaluation"][0], *overlays)],
            dataset_dir=str(dataset), output_dir=str(tmp_path / backend), num_workers=0,
        )  # fmt: skip
    pytorch, onnx = (_rows(tmp_path / backend / "metrics.csv") for backend in ("pytorch", "onnx"))
    assert [row["subject"] for row in onnx] == [row["subject"] for row in pytorch] and pytorch
    for expected, row in zip(pytorch, onnx):
        assert float(row["mae"]) == pytest.approx(float(expected["mae"]), abs=1e-5)
        assert float(row["psnr"]) == pytest.approx(float(expected["psnr"]), abs=1e-2)
        baselines = [column for column in expected if column.startswith(("identity_", "gaussian_"))]
        assert baselines and all(row[column] == expected[column] for column in baselines)


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("bundle", EXPORTS)
def test_onnx_backend_without_the_exported_file_stops_before_compute(bundle, road, request, tmp_path):
    configs, run_id = ROADS[road]
    config_dir = REPOSITORY / "bundles" / bundle / "configs"
    with pytest.raises(SystemExit, match="absent.onnx: ONNX model not found"):
        run_in_process(
            run_id, config_file=[str(config_dir / name) for name in (*configs, "inference_onnx.yaml")],
            dataset_dir=str(request.getfixturevalue(EXPORTS[bundle].dataset)), output_dir=str(tmp_path / "out"),
            onnx_path=str(tmp_path / "absent.onnx"), num_workers=0,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_make_export_rebuilds_every_bundle():
    dry_run = subprocess.run(["make", "-n", "export"], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    commands = dry_run.stdout.splitlines()
    for bundle in EXPORTS:
        # model.ts scripted, as the MONAI model zoo exports it; model.onnx traced, as ONNX export needs a trace
        for command, file, traced in (("ckpt_export", "model.ts", False), ("onnx_export", "model.onnx", True)):
            target = f"bundles/{bundle}/models/{file}"
            lines = [line for line in commands if f"{command} network_def" in line and target in line]
            assert lines and all(("--use_trace True" in line) == traced for line in lines), target
