"""Each bundle's configs/metadata.json against the MONAI Bundle specification and the bundle contract: the JSON schema
schemas/metadata.schema.json through `monai.bundle.verify_metadata`, the default network against
`network_data_format` through `monai.bundle.verify_net_in_out`, version against changelog, and the packages a user of
a release archive installs from PyPI (scripts/build_release.py vendors synth7t, which is not on PyPI)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import packages_distributions, version
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import REPOSITORY
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape

BUNDLES = sorted(path.name for path in (REPOSITORY / "bundles").iterdir() if (path / "configs").is_dir())
SCHEMA = REPOSITORY / "schemas" / "metadata.schema.json"
# needed besides what synth7t imports: `python -m monai.bundle` (fire), the YAML configs (pyyaml), the training
# handlers (TensorBoardStatsHandler: tensorboard; synth7t.handlers.LossProgressBar: tqdm)
WORKFLOW_PACKAGES = {"fire", "pyyaml", "tensorboard", "tqdm"}
COVERED = {"synth7t", "monai", "torch", "numpy"}  # vendored, or the *_version keys of the specification
# synth7t names whose package is imported only when a config calls them -> that package
LAZY_IMPORTS = {"OnnxRuntimeNetwork": "onnxruntime"}  # synth7t.engines, for the configs/inference_onnx.yaml overlays


def metadata_path(bundle: str) -> Path:
    return REPOSITORY / "bundles" / bundle / "configs" / "metadata.json"


def load_metadata(bundle: str) -> dict:
    return json.loads(metadata_path(bundle).read_text())


def canonical(name: str) -> str:
    """PEP 503 name: pip treats PyYAML, pyyaml and py_yaml alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """verify_metadata downloads the schema URL of metadata.json unless ``filepath`` exists: make sure it does not."""

    def refuse(url: str, *args, **kwargs) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr("monai.apps.utils._download_with_progress", refuse)


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_matches_the_schema(bundle):
    verify_metadata(meta_file=str(metadata_path(bundle)), filepath=str(SCHEMA))


def _image_input(metadata: dict) -> dict:
    return metadata["network_data_format"]["inputs"]["image"]


BROKEN: dict[str, Callable[[dict], object]] = {
    "no version": lambda metadata: metadata.pop("version"),
    "no changelog": lambda metadata: metadata.pop("changelog"),
    "no network outputs": lambda metadata: metadata["network_data_format"].pop("outputs"),
    "no is_patch_data": lambda metadata: _image_input(metadata).pop("is_patch_data"),
    "no channel_def": lambda metadata: _image_input(metadata).pop("channel_def"),
    "spatial shape in m": lambda metadata: _image_input(metadata).update(spatial_shape=["8*m", "8*m"]),
    "value range of one value": lambda metadata: _image_input(metadata).update(value_range=[0]),
    "synth7t from PyPI": lambda metadata: metadata["required_packages_version"].update(synth7t="0.1.0"),
    # MONAI's parser would replace required_packages_version with it (monai.bundle.utils.DEPRECATED_ID_MAPPING)
    "optional packages too": lambda metadata: metadata.update(optional_packages_version={"onnxruntime": "1.32.0"}),
    "no measured metrics": lambda metadata: metadata.update(eval_metrics={}),
    "version 1.0": lambda metadata: metadata.update(version="1.0"),
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=BROKEN.keys())
def test_the_schema_rejects_broken_metadata(change, tmp_path):
    metadata = load_metadata("watnet")
    change(metadata)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("n", [1, 3])
def test_default_network_matches_network_data_format(bundle, n):
    """MONAI's check (input channels from num_channels and spatial_shape with ``n``, output channels and dtype), then
    what it leaves out: the output's spatial shape, and one channel_def entry per channel."""
    config_file = str(REPOSITORY / "bundles" / bundle / "configs" / "inference.yaml")
    verify_net_in_out(
        net_id="network_def", meta_file=str(metadata_path(bundle)), config_file=config_file, device="cpu", n=n
    )
    tensors = load_metadata(bundle)["network_data_format"]
    image, pred = tensors["inputs"]["image"], tensors["outputs"]["pred"]
    parser = ConfigParser()
    parser.read_config(config_file)
    network = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        output = network(torch.rand(1, image["num_channels"], *_get_fake_spatial_shape(image["spatial_shape"], n=n)))
    assert tuple(output.shape[2:]) == _get_fake_spatial_shape(pred["spatial_shape"], n=n)
    for tensor in (image, pred):
        assert sorted(tensor["channel_def"], key=int) == [str(c) for c in range(tensor["num_channels"])]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_version_is_the_latest_changelog_entry(bundle):
    metadata = load_metadata(bundle)
    versions = {tuple(int(part) for part in key.split(".")): key for key in metadata["changelog"]}
    assert metadata["version"] == versions[max(versions)]


# the synth7t modules `import synth7t` loads, listed by a fresh interpreter (this session may have imported others)
LOADED_MODULES = (
    "import sys, synth7t; print(*(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'synth7t'))"
)


@pytest.fixture(scope="module")
def packages_synth7t_imports() -> set[str]:
    """Distributions that the modules ``import synth7t`` loads import at module level; function-level imports are
    lazy, for the configs that need them (ONNX Runtime in synth7t.engines, for the inference_onnx.yaml overlays)."""
    files = subprocess.run([sys.executable, "-c", LOADED_MODULES], capture_output=True, text=True, check=True)
    modules = set()
    for file in files.stdout.split():
        for node in ast.parse(Path(file).read_text()).body:
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(str(node.module).split(".")[0])
    distributions = packages_distributions()
    third_party = modules - set(sys.stdlib_module_names) - COVERED
    return {canonical(name) for module in third_party for name in distributions.get(module, [module])}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_required_packages_cover_the_vendored_package_and_are_the_tested_versions(bundle, packages_synth7t_imports):
    metadata = load_metadata(bundle)
    required = {canonical(name): pinned for name, pinned in metadata["required_packages_version"].items()}
    configs = "".join(path.read_text() for path in (REPOSITORY / "bundles" / bundle / "configs").glob("*.yaml"))
    lazy = {package for name, package in LAZY_IMPORTS.items() if name in configs}
    assert not (packages_synth7t_imports | WORKFLOW_PACKAGES | lazy) - set(required), "imported by synth7t or configs"
    listed = {
        "monai": metadata["monai_version"],
        "torch": metadata["pytorch_version"],
        "numpy": metadata["numpy_version"],
    }
    listed |= required
    assert {name: version(name).split("+")[0] for name in listed} == listed  # torch 2.13.0+cpu is 2.13.0
