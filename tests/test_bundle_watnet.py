"""The watnet bundle as a user runs it: `python -m monai.bundle run` training (degradation-randomized by default),
resume, evaluation, inference, the overlays, torchrun, the bundle contract's properties, outputs and bad-input
behaviour (BUNDLES.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as run_in_process

from synth7t.handlers import GAUSSIAN_SIGMAS
from synth7t.metrics import METRIC_NAMES, volume_metrics
from synth7t.networks import BasicCNN, WATNet
from synth7t.transforms import PercentileScaleIntensity

from conftest import (
    PERMUTED,
    REPOSITORY,
    TINY_TRAININGS,
    absolute_item,
    bundle_command,
    checked,
    evaluation_results,
    run_bundle,
    train_refiner_alone,
    write_pair,
)

BUNDLE = REPOSITORY / "bundles" / "watnet"
CONFIGS = BUNDLE / "configs"
TINY_TRAINING = TINY_TRAININGS["watnet"]


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the default recipe on the tiny dataset, run from outside the repository, from training items
    that hold the 7T target alone: the 3T inputs are simulated from it."""
    datalist = {
        split: [absolute_item(item, tiny_dataset) for item in items]
        for split, items in json.loads((tiny_dataset / "datalist.json").read_text()).items()
    }
    datalist["training"] = [{"label": item["label"]} for item in datalist["training"]]
    datalist_path = tmp_path_factory.mktemp("label_only") / "datalist.json"
    datalist_path.write_text(json.dumps(datalist))
    output = tmp_path_factory.mktemp("train")
    checked(
        run_bundle(
            "watnet", "training", ["train.yaml"], dataset_dir=str(tiny_dataset), datalist=str(datalist_path),
            output_dir=str(output), **TINY_TRAINING,
        )
    )  # fmt: skip
    return output


@pytest.mark.parametrize(
    "configs, workflow_type",
    [
        (["train.yaml"], "train"),
        (["train.yaml", "original.yaml"], "train"),
        (["train.yaml", "seed.yaml"], "train"),
        (["train.yaml", "basic_cnn.yaml"], "train"),
        (["train.yaml", "seed.yaml", "basic_cnn.yaml"], "train"),
        (["train.yaml", "evaluate.yaml"], "train"),
        (["inference.yaml"], "infer"),
    ],
)
def test_check_properties(configs, workflow_type, tiny_dataset, tmp_path):
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in configs],
        workflow_type=workflow_type,
        dataset_dir=str(tiny_dataset),
        output_dir=str(tmp_path),
        num_workers=0,
        patch_size=[16, 16],  # the tiny volumes are 40 x 36: training refuses volumes smaller than a patch
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_bundle_root_is_the_bundle_folder_from_any_directory(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.yaml"), workflow_type="infer", dataset_dir=str(tiny_dataset)
    )
    workflow.initialize()
    assert Path(workflow.bundle_root) == BUNDLE
    assert Path(workflow.parser.get_parsed_content("ckpt_path")) == BUNDLE / "models" / "model.pt"


def test_bundle_root_from_the_command_line_of_other_bundle_commands(monkeypatch, tmp_path):
    from synth7t.bundle import bundle_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "ckpt_export", "--config_file", str(CONFIGS / "inference.yaml")])
    assert Path(bundle_root()) == BUNDLE
    listed = str([str(CONFIGS / "train.yaml"), str(CONFIGS / "seed.yaml")])
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "ckpt_export", f"--config_file={listed}"])
    assert Path(bundle_root()) == BUNDLE
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert Path(bundle_root()) == tmp_path.resolve()


def test_training_writes_loadable_checkpoints_and_logs(trained):
    # a checkpoint every epoch (the last kept), the final one, the best validation PSNR's weights
    assert {"model.pt", "checkpoint_epoch=1.pt", "checkpoint_final.pt"} <= {p.name for p in trained.iterdir()}
    assert list(trained.glob("events.out.tfevents.*")), "no TensorBoard log"
    network = WATNet(refine_depth=10)  # the default: the paper's network and the refiner
    best = torch.load(trained / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(best)
    final = torch.load(trained / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert set(final) == {
        "model", "ema_model", "optimizer", "lr_scheduler", "trainer", "random_states", "validation_state"
    }  # fmt: skip
    # model.pt holds the moving average that validation scored (one epoch: the final one), not the raw weights
    assert all(torch.equal(best[name], final["ema_model"][name]) for name in best)
    assert not all(torch.equal(best[name], final["model"][name]) for name in best)
    assert final["trainer"]["iteration"] == final["trainer"]["epoch_length"] == 2  # 2 volumes, 1 draw of 4 per batch
    # the released solver's groups (biases and the output conv at 0.1 x the learning rate), no weight decay
    groups = final["optimizer"]["param_groups"]
    assert sorted(group["initial_lr"] for group in groups) == pytest.approx([5e-5, 5e-4])
    assert {group["weight_decay"] for group in groups} == {0}
    # warm-up and cosine decay stepped per iteration, over all iterations of the run
    assert (final["lr_scheduler"]["last_epoch"], final["lr_scheduler"]["t_total"]) == (2, 2)


def test_training_resumes_from_a_checkpoint(trained, tiny_dataset, tmp_path):
    result = checked(
        run_bundle(
            "watnet", "training", ["train.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path),
            resume_from=str(trained / "checkpoint_final.pt"), **{**TINY_TRAINING, "max_epochs": 2},
        )
    )
    log = result.stdout + result.stderr
    assert f"Restored all variables from {trained / 'checkpoint_final.pt'}" in log
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in log  # the first epoch is not trained again
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in log
    resumed = torch.load(tmp_path / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert resumed["trainer"]["iteration"] == 4  # two epochs of two iterations


def _normalised_ras(path: Path, mask: np.ndarray) -> np.ndarray:
    volume = nib.as_closest_canonical(nib.load(path)).get_fdata().astype(np.float32)
    return np.asarray(PercentileScaleIntensity(0.0, 99.0)(volume[None], mask[None])[0])


def test_evaluation_writes_per_subject_metrics_with_identity_and_gaussian_baselines(trained, tiny_dataset, tmp_path):
    rows, summary = evaluation_results(
        "watnet", tiny_dataset, tmp_path, fresh_interpreter=True, ckpt_path=str(trained / "model.pt"), num_workers=0
    )
    assert [row["subject"] for row in rows] == ["sub-4_3T", "sub-5_3T"]
    prefixes = ("", "identity_", "gaussian_")
    expected_columns = [f"{p}{m}{s}" for p in prefixes for m in METRIC_NAMES for s in ("", "_brain")]
    assert set(expected_columns) <= set(rows[0])
    assert all(float(row["gaussian_sigma"]) in GAUSSIAN_SIGMAS and np.isfinite(float(row["gaussian_psnr"])) for row in rows)
    # The identity baseline is the normalised 3T against the normalised 7T, on axial slices: recompute it, also
    # for sub-5 whose file stores the axial axis first.
    for row, subject in zip(rows, ("sub-4", "sub-5")):
        mask = nib.as_closest_canonical(nib.load(tiny_dataset / f"{subject}_mask.nii.gz")).get_fdata() > 0
        image = _normalised_ras(tiny_dataset / f"{subject}_3T.nii.gz", mask)
        label = _normalised_ras(tiny_dataset / f"{subject}_7T.nii.gz", mask)
        expected = volume_metrics(image, label, mask)
        for name in ("psnr", "ssim", "mae", "psnr_brain", "ssim_brain"):
            assert float(row[f"identity_{name}"]) == pytest.approx(expected[name], rel=1e-4), name
    psnrs = [float(row["psnr"]) for row in rows]
    assert summary["psnr"]["mean"] == pytest.approx(np.mean(psnrs), rel=1e-5)
    assert summary["psnr"]["std"] == pytest.approx(np.std(psnrs), rel=1e-4, abs=1e-6)
    assert summary["identity_ssim_brain"]["n"] == 2


def test_inference_writes_one_volume_per_input_on_its_grid(trained, tiny_dataset, tmp_path):
    # sub-5 again, stored with its axial axis last: the prediction must be the same volume.
    reordered = tmp_path / "data"
    reordered.mkdir()
    for suffix in ("3T", "mask"):
        image = nib.load(tiny_dataset / f"sub-5_{suffix}.nii.gz")
        nib.save(nib.as_closest_canonical(image), reordered / f"sub-5-ras_{suffix}.nii.gz")
    datalist = tmp_path / "datalist.json"
    items = [{"image": str(tiny_dataset / f"sub-{i}_3T.nii.gz"), "mask": str(tiny_dataset / f"sub-{i}_mask.nii.gz")} for i in (4, 5)]
    items.append({"image": "sub-5-ras_3T.nii.gz", "mask": "sub-5-ras_mask.nii.gz"})
    datalist.write_text(json.dumps({"test": items}))
    output = tmp_path / "out"
    checked(
        run_bundle(
            "watnet", "inferring", ["inference.yaml"], dataset_dir=str(reordered), datalist=str(datalist),
            output_dir=str(output), ckpt_path=str(trained / "model.pt"), num_workers=0,
        )
    )
    assert sorted(p.name for p in output.iterdir()) == ["sub-4_3T_7t.nii.gz", "sub-5-ras_3T_7t.nii.gz", "sub-5_3T_7t.nii.gz"]
    for name, source_dir in (("sub-4", tiny_dataset), ("sub-5", tiny_dataset), ("sub-5-ras", reordered)):
        source = nib.load(source_dir / f"{name}_3T.nii.gz")
        prediction = nib.load(output / f"{name}_3T_7t.nii.gz")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        values = prediction.get_fdata()
        mask = nib.load(source_dir / f"{name}_mask.nii.gz").get_fdata() > 0
        assert values.min() >= 0.0 and values.max() <= 1.0
        assert np.all(values[~mask] == 0) and values[mask].std() > 0
    permuted = nib.as_closest_canonical(nib.load(output / "sub-5_3T_7t.nii.gz")).get_fdata()
    canonical = nib.load(output / "sub-5-ras_3T_7t.nii.gz").get_fdata()
    np.testing.assert_allclose(permuted, canonical, atol=1e-5)


def test_shipped_model_is_the_default_network():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state)  # strict: every key and shape matches
    assert isinstance(network, WATNet) and network.variant == "original" and network.refiner is not None
    assert sum(p.numel() for p in network.parameters()) == 1_467_971 + 170_211  # the paper's WATNet + the refiner


def test_refiner_trains_alone_on_a_warm_started_watnet(trained, tiny_dataset, tmp_path):
    """``--trainable refiner`` on the weights of a WATNet without one: the WATNet stays as loaded, the refiner learns
    from the identity, at the full learning rate (not in the released solver's slow group)."""
    train_refiner_alone(
        "watnet", trained / "model.pt", tmp_path / "refine", dataset_dir=str(tiny_dataset),
        randomize_degradation=False, **TINY_TRAINING,
    )  # fmt: skip
    groups = torch.load(tmp_path / "refine" / "checkpoint_final.pt", weights_only=False)["optimizer"]["param_groups"]
    assert len(groups) == 1 and len(groups[0]["params"]) == 20  # the refiner's ten convolutions alone


# The seed keeps axial slices 30-151 of the 182-slice volumes; the tiny volumes have 12, so keep 2-9 instead.
SEED_SLICES = {"patch_transforms#0#roi_start": [0, 0, 2], "patch_transforms#0#roi_end": [100000, 100000, 10]}


@pytest.mark.parametrize(
    "overlays, network_class, network_options, overrides",
    [
        (["original.yaml"], WATNet, {}, {}),
        (["seed.yaml"], WATNet, {"variant": "seed"}, SEED_SLICES),
        (["seed.yaml", "basic_cnn.yaml"], BasicCNN, {}, SEED_SLICES),
    ],
    ids=["original", "seed", "seed_basic_cnn"],
)
def test_overlay_recipes_train_on_the_fixed_pairs(
    overlays, network_class, network_options, overrides, tiny_dataset, tmp_path
):
    checked(
        run_bundle(
            "watnet", "training", ["train.yaml", *overlays], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path),
            **TINY_TRAINING, **overrides,
        )
    )  # fmt: skip
    checkpoint = torch.load(tmp_path / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    network_class(**network_options).load_state_dict(checkpoint["model"])
    groups = checkpoint["optimizer"]["param_groups"]
    if overlays == ["original.yaml"]:  # the released solver: biases and the output conv at lr_mult 0.1, StepLR
        assert sorted(group["lr"] for group in groups) == pytest.approx([2.5e-5, 2.5e-4])
        assert {group["weight_decay"] for group in groups} == {1e-4}
        assert (checkpoint["lr_scheduler"]["step_size"], checkpoint["lr_scheduler"]["gamma"]) == (34000, 0.8)
    else:  # the seed's Keras Adam
        assert len(groups) == 1 and groups[0]["eps"] == 1e-7


def test_torchrun_overlay_trains_on_two_cpu_processes(tiny_dataset, tmp_path):
    command = bundle_command(
        "watnet", "training", ["train.yaml", "multi_gpu_train.yaml"], dataset_dir=str(tiny_dataset),
        output_dir=str(tmp_path), **TINY_TRAINING,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:]]
    result = subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=900)
    checked(result)
    assert (tmp_path / "checkpoint_final.pt").is_file() and (tmp_path / "model.pt").is_file()


# --- bad input: one clear message naming the file, before any compute, nothing written -------------------------


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def test_bad_training_pair_is_reported_from_the_command_line_without_a_traceback(tiny_dataset, tmp_path):
    """A 7T target off its brain mask's grid (the default recipe reads the target and the mask of a training item and
    simulates its 3T input)."""
    datalist = json.loads((tiny_dataset / "datalist.json").read_text())
    for split in datalist.values():
        for item in split:
            item.update({key: str(tiny_dataset / name) for key, name in item.items()})
    source = nib.load(datalist["training"][1]["label"])
    shifted = source.affine.copy()
    shifted[0, 3] += 2.0
    label = tmp_path / "sub-2_7T_shifted.nii.gz"
    datalist["training"][1]["label"] = _write(label, source.get_fdata().astype(np.float32), shifted)
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    output = tmp_path / "train"
    result = run_bundle(
        "watnet", "training", ["train.yaml"], fresh_interpreter=True, dataset_dir=str(tmp_path),
        output_dir=str(output), **TINY_TRAINING,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and label.name in last and "affine" in last and "'training'[1]" in last
    assert not output.exists()


def test_warm_start_from_another_network_is_reported_without_a_traceback(tiny_dataset, tmp_path):
    """``--warm_start_from`` a model.pt of another network (here BasicCNN's): one line naming the file, no output."""
    torch.save(BasicCNN().state_dict(), tmp_path / "basic.pt")
    output = tmp_path / "train"
    result = run_bundle(
        "watnet", "training", ["train.yaml"], fresh_interpreter=True, dataset_dir=str(tiny_dataset),
        output_dir=str(output), warm_start_from=str(tmp_path / "basic.pt"), **TINY_TRAINING,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "basic.pt: its weights do not fit this network" in last
    assert not output.exists()


def test_missing_checkpoint_is_reported_before_loading_data(tiny_dataset, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(tiny_dataset / "sub-4_3T.nii.gz")}]}))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        run_in_process(
            "inferring", config_file=str(CONFIGS / "inference.yaml"), datalist=str(datalist),
            ckpt_path=str(tmp_path / "absent.pt"), output_dir=str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists()


def test_a_new_subject_with_another_grid_is_inferred(trained, tmp_path):
    item = write_pair(tmp_path, "odd", (13, 45, 37), PERMUTED, 11)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": item["image"]}]}))
    checked(
        run_bundle(
            "watnet", "inferring", ["inference.yaml"], dataset_dir=str(tmp_path), datalist=str(datalist),
            output_dir=str(tmp_path / "out"), ckpt_path=str(trained / "model.pt"), num_workers=0,
        )
    )
    assert nib.load(tmp_path / "out" / "odd_3T_7t.nii.gz").shape == (13, 45, 37)
