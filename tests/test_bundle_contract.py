"""Every bundle against the contract of BUNDLES.md: layout, metadata, shipped weights that load into the default
network, inference with them from outside the repository, and the MONAI model zoo's config shape: knobs that train,
evaluate and inference must share agree, and training runs on items given in place of the datalist (MONAI Label)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as run_in_process

from conftest import (
    REPOSITORY, TINY_NETWORKS, TINY_TRAININGS, absolute_item, checked, evaluation_results, run_bundle,
)

BUNDLES = sorted(path.name for path in (REPOSITORY / "bundles").iterdir() if (path / "configs").is_dir())
T1W_BUNDLES = ["watnet", "gan_unet_t1w7t"]  # datalist items: image (3T T1w), optional mask, label (7T T1w)
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


def _tiny_dataset(bundle: str, request: pytest.FixtureRequest) -> Path:
    """The bundle's toy dataset: ``tiny_dataset`` (T1w pairs) or, for vct_adc7t, ``tiny_diffusion_dataset``."""
    return request.getfixturevalue("tiny_dataset" if bundle in T1W_BUNDLES else "tiny_diffusion_dataset")


# Knobs that train.yaml (which evaluate.yaml extends) and inference.yaml must both state, with the same value: the
# network's input, its normalisation, its padding and its size.
SHARED_KNOBS = {
    "watnet": (
        "scale_intensities", "lower_percentile", "upper_percentile", "slab_size", "slab_stride", "divisible_by",
        "variant", "refine_depth", "refine_channels",
    ),
    "gan_unet_t1w7t": (
        "lower_percentile", "upper_percentile", "slab_size", "slice_axis", "divisible_by", "context_fields",
        "condition_on_slice_position", "context_dim", "channels", "channel_mult", "num_res_blocks", "norm_num_groups",
        "cross_attention_stages", "global_residual", "refine_depth", "refine_channels",
    ),
    "vct_adc7t": (
        "input_keys", "adc_method", "t1w_interpolation", "adc_interpolation", "upper_percentile", "divisible_by",
        "channels", "num_blocks", "transformer_positions", "share_transformer", "hidden_size", "num_layers",
        "num_heads", "mlp_dim", "image_size",
    ),
}  # fmt: skip
NETWORK_INPUTS = {"watnet": (1, 3, 64, 64), "gan_unet_t1w7t": (1, 3, 64, 64), "vct_adc7t": (1, 2, 64, 96)}


def _parsed(bundle: str, *configs: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPOSITORY / "bundles" / bundle / "configs" / name) for name in configs])
    return parser


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_evaluate_and_inference_state_the_shared_knobs_alike(bundle):
    """evaluate.yaml states none of the knobs (it inherits train.yaml's); train.yaml, train.yaml + evaluate.yaml and
    inference.yaml give each the same value and build the same network: with train.yaml's weights, perturbed so that
    no zero-initialised layer hides a difference, every network gives the same output."""
    evaluate = ConfigParser.load_config_file(str(REPOSITORY / "bundles" / bundle / "configs" / "evaluate.yaml"))
    assert not set(evaluate) & {*SHARED_KNOBS[bundle], "network_def", "imports"}
    configs = (["train.yaml"], ["train.yaml", "evaluate.yaml"], ["inference.yaml"])
    parsers = [_parsed(bundle, *names) for names in configs]
    for knob in SHARED_KNOBS[bundle]:
        values = [parser.get_parsed_content(knob) for parser in parsers]
        assert values[1:] == values[:1] * 2, knob
    torch.manual_seed(0)
    trained, *others = (parser.get_parsed_content("network_def").eval() for parser in parsers)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        x = torch.rand(NETWORK_INPUTS[bundle])
        expected = trained(x)
        for network in others:
            assert type(network) is type(trained)
            network.load_state_dict(trained.state_dict())  # strict: the same keys and shapes
            torch.testing.assert_close(network(x), expected)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_runs_on_items_given_in_place_of_the_datalist(bundle, request, tmp_path):
    """What MONAI Label's BundleTrainTask does: it overrides train#dataset#data and validate#dataset#data with its own
    items, inserts a CheckpointLoader into the train#handlers it reads from train.yaml, and calls MONAI's ``run`` with
    ``run_id="run"`` (``init_id=None`` leaves ``initialize`` in place). Here the dataset folder holds no datalist file,
    and one training item gives one iteration."""
    dataset = _tiny_dataset(bundle, request)
    datalist = json.loads((dataset / "datalist.json").read_text())
    parser = _parsed(bundle, "train.yaml")
    assert parser["train#dataset#data"] == "@train#datalist"
    parser.update(TINY_NETWORKS[bundle])
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "pretrained.pt")
    loader = {"_target_": "CheckpointLoader", "load_path": str(tmp_path / "pretrained.pt"),
              "load_dict": {"model": "$@network"}, "strict": False}  # fmt: skip
    (tmp_path / "no_datalist").mkdir()
    overrides = {
        "train#dataset#data": [absolute_item(datalist["training"][0], dataset)],
        "validate#dataset#data": [absolute_item(item, dataset) for item in datalist["validation"]],
        "train#handlers": [loader, *parser["train#handlers"]],
        "train#trainer#max_epochs": 1,
        "dataset_dir": str(tmp_path / "no_datalist"),
        "output_dir": str(tmp_path / "train"),
    }
    config_file = str(REPOSITORY / "bundles" / bundle / "configs" / "train.yaml")
    run_in_process(
        run_id="run", init_id=None, final_id=None, config_file=config_file, **TINY_TRAININGS[bundle],
        **TINY_NETWORKS[bundle], **overrides,
    )  # fmt: skip
    final = torch.load(tmp_path / "train" / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["epoch_length"] == final["trainer"]["iteration"] == 1
    # one step from the inserted checkpoint's weights: every parameter within a few learning rates of them
    assert max((final["model"][name] - value).abs().max().item() for name, value in network.named_parameters()) < 1e-2


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_with_the_shipped_weights_from_another_directory(bundle, request, tmp_path):
    dataset = _tiny_dataset(bundle, request)
    if bundle in T1W_BUNDLES:
        item, written = {"image": "sub-4_3T.nii.gz"}, "sub-4_3T_7t.nii.gz"
    else:  # vct_adc7t: 3T T1w + 3T diffusion series
        item = json.loads((dataset / "datalist.json").read_text())["test"][1]
        item, written = {key: item[key] for key in ("t1w", "dwi", "bval", "bvec")}, "sub-5_3T_T1w_7t.nii.gz"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [item]}))
    result = run_bundle(
        bundle, "run", ["inference.yaml"], cwd=tmp_path, fresh_interpreter=True, dataset_dir=str(dataset),
        datalist=str(datalist), output_dir="predictions", num_workers=0,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "predictions" / written).is_file()


@pytest.mark.parametrize(
    ("bundle", "workflow"),
    [(bundle, "inference") for bundle in BUNDLES] + [(bundle, "evaluation") for bundle in T1W_BUNDLES],
)
def test_dataloader_workers_under_the_forkserver_start_method(bundle, workflow, request, tmp_path):
    """Python 3.14 starts worker processes with forkserver on Linux by default: ``Invertd`` must still invert what
    the DataLoader's workers applied, as under the fork of earlier versions (the configs' ``worker_start_method``)."""
    dataset, output = _tiny_dataset(bundle, request), tmp_path / "out"
    if workflow == "evaluation":
        rows, _ = evaluation_results(bundle, dataset, output, start_method="forkserver", num_workers=2)
        assert rows
    else:
        checked(
            run_bundle(
                bundle, "inferring", ["inference.yaml"], start_method="forkserver", dataset_dir=str(dataset),
                output_dir=str(output), num_workers=2,
            )
        )  # fmt: skip
        assert any(output.iterdir())


@pytest.mark.parametrize("bundle", BUNDLES)
def test_missing_checkpoint_stops_inference(bundle, request, tmp_path):
    result = run_bundle(
        bundle, "inferring", ["inference.yaml"], dataset_dir=str(_tiny_dataset(bundle, request)),
        output_dir=str(tmp_path / "out"), ckpt_path=str(tmp_path / "absent.pt"), num_workers=0,
    )  # fmt: skip
    assert result.returncode == 1 and "absent.pt: checkpoint not found" in result.stderr
    assert not (tmp_path / "out").exists()


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _write_zero_affine(path: Path, array: np.ndarray) -> str:
    """An uncompressed NIfTI whose sform is all zero (sform_code 1), written byte by byte: nibabel refuses to save
    such an affine but loads it."""
    header = nib.Nifti1Image(array, np.eye(4)).header
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    header["sform_code"], header["vox_offset"] = 1, 352
    path.write_bytes(header.binaryblock + bytes(4) + np.asfortranarray(array).tobytes(order="F"))
    return str(path)


def _bad_items(directory: Path, good: dict) -> dict[str, tuple[dict, str, str]]:
    """Test items with one problem each: (item, a word the message must contain, the file it must name)."""
    reference = nib.load(good["image"])
    affine = reference.affine
    ones = np.ones(reference.shape, np.float32)
    nan, inf = ones.copy(), ones.copy()
    nan[1, 1, 1] = np.nan
    inf[2, 2, 2] = np.inf
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    garbage = directory / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    mgh = directory / "volume.mgz"
    nib.save(nib.MGHImage(ones, affine), mgh)
    extreme = ones.copy()
    extreme[0, 0, 0], extreme[1, 1, 1] = -3e38, 3e38
    rgb = np.zeros(reference.shape, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
    files = {
        "missing file": str(directory / "absent.nii.gz"),
        "unreadable": str(garbage),
        "not NIfTI": str(mgh),
        "shape": _write(directory / "small.nii.gz", ones[:-2], affine),
        "affine": _write(directory / "shifted.nii.gz", ones, shifted),
        "channels": _write(directory / "two.nii.gz", np.stack([ones, ones], -1), affine),
        "NaN": _write(directory / "nan.nii.gz", nan, affine),
        "inf": _write(directory / "inf.nii.gz", inf, affine),
        "degenerate affine": _write_zero_affine(directory / "flat.nii", ones),
        "one slice": _write(directory / "slice.nii.gz", ones[..., :1], affine),
        "extreme values": _write(directory / "extreme.nii.gz", extreme, affine),
        "RGB": _write(directory / "rgb.nii.gz", rgb, affine),
    }
    problems = {
        "missing file": "not found",
        "unreadable": "not a readable NIfTI",
        "not NIfTI": "not a NIfTI",
        "shape": "shape",
        "affine": "affine",
        "channels": "single channel",
        "NaN": "NaN",
        "inf": "infinite",
        "degenerate affine": "degenerate",
        "one slice": "at least",
        "extreme values": "too wide",
        "RGB": "RGB",
    }
    on_mask = ("shape", "affine")  # grid problems are between two images of an item: put the bad one as its mask
    return {
        case: ({**good, "mask": path} if case in on_mask else {"image": path}, problems[case], path)
        for case, path in files.items()
    }


def _infer_in_process(bundle: str, tmp_path: Path, items: list[dict], output: Path, **overrides) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": items}))
    run_in_process(
        "inferring",
        config_file=str(REPOSITORY / "bundles" / bundle / "configs" / "inference.yaml"),
        dataset_dir=str(tmp_path),
        datalist=str(datalist),
        output_dir=str(output),
        num_workers=0,
        **overrides,
    )


BAD_CASES = [
    "missing file", "unreadable", "not NIfTI", "shape", "affine", "channels", "NaN", "inf", "empty",
    "degenerate affine", "one slice", "extreme values", "RGB",
]  # fmt: skip


@pytest.mark.parametrize("bundle", T1W_BUNDLES)
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_stops_inference_before_any_compute(bundle, case, tiny_dataset, tmp_path):
    good = {"image": str(tiny_dataset / "sub-4_3T.nii.gz"), "mask": str(tiny_dataset / "sub-4_mask.nii.gz")}
    datalist = tmp_path / "datalist.json"
    cases = _bad_items(tmp_path, good) | {"empty": ({}, "no items", str(datalist))}
    item, problem, named = cases[case]
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        _infer_in_process(bundle, tmp_path, [good, item] if item else [], output)
    message = str(stop.value)
    assert message.startswith("error: ") and problem in message and named in message, message
    assert stop.value.code == message  # Python prints it alone and exits with status 1
    assert not output.exists(), "nothing may be written on bad input"


@pytest.mark.parametrize("case", ["output folder is a file", "existing result", "name collision"])
def test_output_problems_stop_inference_before_any_compute(case, tiny_dataset, tmp_path):
    good = {"image": str(tiny_dataset / "sub-4_3T.nii.gz"), "mask": str(tiny_dataset / "sub-4_mask.nii.gz")}
    output = tmp_path / "out"
    items, problem = [good], ""
    if case == "output folder is a file":
        output.write_text("a file")
        problem = "the output folder is a file"
    elif case == "existing result":
        output.mkdir()
        (output / "sub-4_3T_7t.nii.gz").write_text("an earlier result")
        problem = "--overwrite True"
    else:
        twin = tmp_path / "elsewhere"
        twin.mkdir()
        (twin / "sub-4_3T.nii.gz").symlink_to(good["image"])
        items, problem = [good, {"image": str(twin / "sub-4_3T.nii.gz")}], "would both be written"
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as stop:
        _infer_in_process("watnet", tmp_path, items, output)
    assert str(stop.value).startswith("error: ") and problem in str(stop.value), stop.value
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path.name != "datalist.json"}
    assert after == {path: data for path, data in before.items() if path.name != "datalist.json"}


def test_overwrite_replaces_an_existing_result_and_names_it(tiny_dataset, tmp_path, capfd):
    good = {"image": str(tiny_dataset / "sub-4_3T.nii.gz"), "mask": str(tiny_dataset / "sub-4_mask.nii.gz")}
    output = tmp_path / "out"
    output.mkdir()
    earlier = output / "sub-4_3T_7t.nii.gz"
    earlier.write_text("an earlier result")
    _infer_in_process("watnet", tmp_path, [good], output, overwrite=True)
    assert nib.load(earlier).shape == nib.load(good["image"]).shape
    assert sorted(path.name for path in output.iterdir()) == [earlier.name], "no temporary file may remain"
    assert f"wrote 1 synthetic 7T volumes to {output}: {earlier.name}" in "".join(capfd.readouterr())


TRAINING_PROBLEMS = {  # case: (overrides, words the message must contain)
    "resume from a missing file": ({"resume_from": "{tmp}/absent.pt"}, "checkpoint to resume from not found"),
    "resume from a model.pt": ({"resume_from": "{tmp}/model.pt"}, "not a training checkpoint"),
    "output folder holds a run": ({}, "--overwrite True"),
    "CUDA without a GPU": ({"device": "cuda"}, "CUDA"),
}


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("case", TRAINING_PROBLEMS)
def test_training_problems_stop_before_any_compute(bundle, case, request, tmp_path):
    if case == "CUDA without a GPU" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    dataset = _tiny_dataset(bundle, request)
    overrides, problem = TRAINING_PROBLEMS[case]
    overrides = {key: value.format(tmp=tmp_path) for key, value in overrides.items()}
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    output = tmp_path / "run"
    if case == "output folder holds a run":
        output.mkdir()
        (output / "checkpoint_epoch=3.pt").write_bytes(b"an earlier run")
    before = sorted(path for path in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        run_in_process(
            "training", config_file=str(REPOSITORY / "bundles" / bundle / "configs" / "train.yaml"),
            dataset_dir=str(dataset), output_dir=str(output), **TINY_TRAININGS[bundle], **overrides,
        )  # fmt: skip
    assert str(stop.value).startswith("error: ") and problem in str(stop.value), stop.value
    assert sorted(path for path in tmp_path.rglob("*")) == before, "nothing may be written"


def test_a_training_volume_smaller_than_the_crop_stops_before_any_compute(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_in_process(
            "training", config_file=str(REPOSITORY / "bundles" / "watnet" / "configs" / "train.yaml"),
            dataset_dir=str(tiny_dataset), output_dir=str(output),
            **{**TINY_TRAININGS["watnet"], "patch_size": [64, 64]},
        )  # fmt: skip
    assert "at least" in str(stop.value) and "sub-1_7T.nii.gz" in str(stop.value), stop.value
    assert not output.exists()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_dataset, tmp_path):
    """Two epochs straight against one epoch, killed, and resumed from its checkpoint_epoch=1.pt: the random draws
    (degradations, patches), the optimiser, the schedule and the best metric continue, so the weights are equal."""
    config = str(REPOSITORY / "bundles" / "watnet" / "configs" / "train.yaml")
    common = {**TINY_TRAININGS["watnet"], "max_epochs": 2, "dataset_dir": str(tiny_dataset)}
    run_in_process("training", config_file=config, output_dir=str(tmp_path / "straight"), **common)
    run_in_process(
        "training", config_file=config, output_dir=str(tmp_path / "killed"), **common, **{"train#trainer#max_epochs": 1}
    )
    run_in_process(
        "training", config_file=config, output_dir=str(tmp_path / "killed"), **common,
        resume_from=str(tmp_path / "killed" / "checkpoint_epoch=1.pt"),
    )  # fmt: skip
    straight, resumed = (
        torch.load(tmp_path / run / "checkpoint_final.pt", map_location="cpu", weights_only=True)
        for run in ("straight", "killed")
    )
    assert resumed["trainer"]["iteration"] == straight["trainer"]["iteration"]
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)
    assert resumed["validation_state"]["best_metric"] == straight["validation_state"]["best_metric"]
