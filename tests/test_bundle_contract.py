"""Every bundle against the contract of BUNDLES.md: layout, metadata, shipped weights that load into the default
network, and inference with them from outside the repository."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPOSITORY, run_bundle

BUNDLES = sorted(path.name for path in (REPOSITORY / "bundles").iterdir() if (path / "configs").is_dir())
LAYOUT = (
    "LICENSE",
    "docs/README.md",
    "models/model.pt",
    "configs/metadata.json",
    "configs/train.yaml",
    "configs/evaluate.yaml",
    "configs/inference.yaml",
    "configs/multi_gpu_train.yaml",
    "configs/logging.conf",
)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_layout(bundle):
    for name in LAYOUT:
        assert (REPOSITORY / "bundles" / bundle / name).is_file(), name


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_has_the_bundle_spec_keys_and_measured_figures(bundle):
    metadata = json.loads((REPOSITORY / "bundles" / bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "network_data_format",
                "eval_metrics", "intended_use", "data_source", "references", "name", "task", "description"):  # fmt: skip
        assert metadata.get(key), key
    assert metadata["version"] in metadata["changelog"]
    metrics = metadata["eval_metrics"]
    assert all(isinstance(value, (int, float)) for value in metrics.values())
    identity = {key for key in metrics if "_identity_" in key}
    assert identity and all(key.replace("_identity_", "_") in metrics for key in identity)  # model beside baseline


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shipped_weights_load_into_the_default_network(bundle):
    parser = ConfigParser()
    parser.read_config(str(REPOSITORY / "bundles" / bundle / "configs" / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    state = torch.load(REPOSITORY / "bundles" / bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state)  # strict: every key and shape matches


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_with_the_shipped_weights_from_another_directory(bundle, tiny_dataset, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": "sub-4_3T.nii.gz"}]}))
    result = run_bundle(
        bundle, "run", ["inference.yaml"], cwd=tmp_path, dataset_dir=str(tiny_dataset),
        datalist=str(datalist), output_dir="predictions", num_workers=0,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "predictions" / "sub-4_3T_7t.nii.gz").is_file()
