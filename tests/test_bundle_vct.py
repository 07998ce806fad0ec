"""The vct_adc7t bundle as a user runs it: the data path from a precomputed ADC map and from a raw diffusion series,
training with early stopping, evaluation against the 3T ADC baseline, inference onto the 7T grid, the paper and
ablation overlays, torchrun, and the bad-input cases of the contract (BUNDLES.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as run_in_process
from monai.transforms import Compose

from synth7t.handlers import GAUSSIAN_SIGMAS
from synth7t.networks import VCT

from conftest import (
    REPOSITORY,
    TINY_NETWORKS,
    TINY_TRAININGS,
    bundle_command,
    checked,
    evaluation_results,
    run_bundle,
)

BUNDLE = "vct_adc7t"
CONFIGS = REPOSITORY / "bundles" / BUNDLE / "configs"
TINY_NETWORK = TINY_NETWORKS[BUNDLE]
TINY_TRAINING = TINY_TRAININGS[BUNDLE]


def _parser(dataset: Path, *overlays: str, **overrides) -> ConfigParser:
    """train.yaml, then ``overlays``, with the tiny network on ``dataset``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("train.yaml", *overlays)])
    parser.update({"dataset_dir": str(dataset), "num_workers": 0, **TINY_NETWORK, **overrides})
    return parser


@pytest.fixture(scope="module")
def trained(tiny_diffusion_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("vct")
    checked(
        run_bundle(
            BUNDLE, "training", ["train.yaml"], dataset_dir=str(tiny_diffusion_dataset), output_dir=str(output),
            **{**TINY_TRAINING, "max_epochs": 2}, **TINY_NETWORK,
        )
    )  # fmt: skip
    return output


@pytest.mark.parametrize(
    "configs, workflow_type",
    [(["train.yaml"], "train"), (["train.yaml", "evaluate.yaml"], "train"), (["inference.yaml"], "infer")],
)
def test_check_properties(configs, workflow_type, tiny_diffusion_dataset, tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save(VCT(**TINY_NETWORK).state_dict(), checkpoint)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in configs],
        workflow_type=workflow_type,
        dataset_dir=str(tiny_diffusion_dataset),
        output_dir=str(tmp_path / "run"),  # not the checkpoint's folder: training refuses a folder holding a run
        ckpt_path=str(checkpoint),
        num_workers=0,
        **TINY_NETWORK,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_adc_computed_from_the_diffusion_series_equals_the_precomputed_map(tiny_diffusion_dataset):
    """The same subject through the training data path, once from its DWI + bval + bvec and once from the ADC map
    fitted beforehand: identical network inputs, [T1w, ADC] on the 7T target grid, in [0, 1], padded to 16."""
    parser = _parser(tiny_diffusion_dataset)
    datalist = json.loads((tiny_diffusion_dataset / "datalist.json").read_text())
    from_adc = {k: str(tiny_diffusion_dataset / v) for k, v in datalist["test"][0].items() if k != "subject"}
    subject = datalist["test"][0]["subject"]
    series = {"dwi": "_3T_dwi.nii.gz", "bval": "_3T_dwi.bval", "bvec": "_3T_dwi.bvec"}
    from_dwi = {k: v for k, v in from_adc.items() if k != "adc"}
    # the fixture kept the series files of the subject whose item lists its precomputed ADC map
    from_dwi |= {key: str(tiny_diffusion_dataset / f"{subject}{suffix}") for key, suffix in series.items()}
    preprocessing = Compose(parser.get_parsed_content("load_transforms") + parser.get_parsed_content("pad_transforms"))
    a, b = preprocessing(from_adc), preprocessing(from_dwi)
    torch.testing.assert_close(a["image"], b["image"])
    label = nib.load(from_adc["label"])
    assert a["image"].shape[0] == 2 and a["image"].shape[1:3] == (48, 32) and a["image"].shape[3] == label.shape[2]
    assert float(a["image"].min()) >= 0.0 and float(a["image"].max()) == 1.0
    torch.testing.assert_close(a["image"][1:2, 7:41, 0:31], a["adc"])  # channel 1 is the ADC, padded 7 + 7, 0 + 1
    np.testing.assert_allclose(a["label"].affine, nib.as_closest_canonical(label).affine, atol=1e-5)  # RAS


def test_training_writes_a_loadable_network(trained, tiny_diffusion_dataset):
    assert {"model.pt", "checkpoint_final.pt"} <= {p.name for p in trained.iterdir()}
    VCT(**TINY_NETWORK).load_state_dict(torch.load(trained / "model.pt", weights_only=True))
    checkpoint = torch.load(trained / "checkpoint_final.pt", weights_only=True)
    assert {"model", "optimizer", "trainer"} <= set(checkpoint)
    assert {"counter", "best_score"} <= set(checkpoint["early_stopping"])  # resume continues its patience
    group = checkpoint["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (2e-4, (0.5, 0.999), 1e-6)  # AdamW as the paper
    assert list(trained.glob("events.out.tfevents.*"))


def test_early_stopping_watches_the_validation_loss(tiny_diffusion_dataset, tmp_path):
    parser = _parser(tiny_diffusion_dataset, output_dir=str(tmp_path), early_stop_patience=2)
    trainer, evaluator = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("validate#evaluator")
    early_stopping = parser.get_parsed_content("train#early_stopping")
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, early_stopping)  # as `run` does
    assert evaluator.has_event_handler(early_stopping, Events.EPOCH_COMPLETED)
    for val_l1 in (0.10, 0.08, 0.09, 0.08):  # best 0.08, then two validations without a lower loss
        assert not trainer.should_terminate
        evaluator.state.metrics = {"val_l1": val_l1}
        early_stopping(evaluator)
    assert trainer.should_terminate


def test_evaluation_scores_the_model_and_the_3t_adc_baselines(trained, tiny_diffusion_dataset, tmp_path):
    rows, summary = evaluation_results(
        BUNDLE, tiny_diffusion_dataset, tmp_path, fresh_interpreter=True, ckpt_path=str(trained / "model.pt"),
        num_workers=0, **TINY_NETWORK,
    )  # fmt: skip
    assert [row["subject"] for row in rows] == ["sub-4_3T_T1w", "sub-5_3T_T1w"]
    for row in rows:
        for name in ("psnr", "ssim", "mse", "psnr_brain"):
            for prefix in ("", "identity_", "gaussian_"):  # the model, the 3T ADC map, the map Gaussian-filtered
                assert np.isfinite(float(row[f"{prefix}{name}"])), f"{prefix}{name}"
        assert float(row["mse"]) == pytest.approx(10 ** (-float(row["psnr"]) / 10), rel=1e-3)  # data range 1
        assert float(row["gaussian_sigma"]) in GAUSSIAN_SIGMAS
    assert summary["psnr"]["n"] == summary["gaussian_psnr"]["n"] == 2


def test_inference_from_adc_and_from_dwi_writes_7t_grid_volumes(trained, tiny_diffusion_dataset, tmp_path):
    checked(
        run_bundle(
            BUNDLE, "inferring", ["inference.yaml"], dataset_dir=str(tiny_diffusion_dataset), output_dir="out",
            ckpt_path=str(trained / "model.pt"), num_workers=0, cwd=tmp_path, **TINY_NETWORK,
        )
    )  # fmt: skip
    datalist = json.loads((tiny_diffusion_dataset / "datalist.json").read_text())
    assert "adc" in datalist["test"][0] and "dwi" in datalist["test"][1]
    for item in datalist["test"]:
        written = nib.load(tmp_path / "out" / item["t1w"].replace(".nii.gz", "_7t.nii.gz"))
        target = nib.load(tiny_diffusion_dataset / item["label"])  # the phantom's 7T grid covers the 3T field of view
        assert written.shape == target.shape
        np.testing.assert_allclose(written.affine, target.affine, atol=1e-4)  # input orientation kept, 1.05 mm
        values = written.get_fdata()
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0


@pytest.mark.parametrize("overlay, channels", [("t1w_only.yaml", 1), ("adc_only.yaml", 1)])
def test_ablation_overlays_train_on_one_input(overlay, channels, tiny_diffusion_dataset, tmp_path):
    checked(
        run_bundle(
            BUNDLE, "training", ["train.yaml", overlay], dataset_dir=str(tiny_diffusion_dataset),
            output_dir=str(tmp_path), **TINY_TRAINING, **TINY_NETWORK,
        )
    )  # fmt: skip
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["encoder.1.weight"].shape[1] == channels


@pytest.mark.parametrize("shared, parameters", [(True, 123_271_105), (False, 208_327_105)])
def test_paper_overlay_has_the_published_size(shared, parameters):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "paper.yaml")])
    parser["share_transformer"] = shared
    assert (parser["batch_size"], parser["max_epochs"]) == (80, 251)
    with torch.device("meta"):
        network = parser.get_parsed_content("network_def")
    assert sum(p.numel() for p in network.parameters()) == parameters


def test_vit_checkpoint_option_reports_a_missing_file(tiny_diffusion_dataset, tmp_path):
    result = run_bundle(
        BUNDLE, "training", ["train.yaml"], dataset_dir=str(tiny_diffusion_dataset), output_dir=str(tmp_path / "out"),
        vit_checkpoint=str(tmp_path / "R50+ViT-B_16.npz"), **TINY_TRAINING, **TINY_NETWORK,
    )  # fmt: skip
    assert result.returncode == 1 and "R50+ViT-B_16.npz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_trains_on_two_cpu_processes(tiny_diffusion_dataset, tmp_path):
    command = bundle_command(
        BUNDLE, "training", ["train.yaml", "multi_gpu_train.yaml"], dataset_dir=str(tiny_diffusion_dataset),
        output_dir=str(tmp_path), **{**TINY_TRAINING, "batch_size": 2}, **TINY_NETWORK,
    )  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    checked(subprocess.run(torchrun + command[1:], capture_output=True, text=True, timeout=900, env=environment))
    checkpoint = torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)
    VCT(**TINY_NETWORK).load_state_dict(checkpoint["model"])  # no "module." prefix


def _bad_datalist(dataset: Path, directory: Path, case: str) -> tuple[dict, str, str]:
    """A test item with one problem: (item, a word the message must contain, the file it must name)."""
    datalist = json.loads((dataset / "datalist.json").read_text())
    good = {k: str(dataset / v) for k, v in datalist["test"][1].items() if k != "subject"}
    del good["label"]
    if case == "bval count":
        bval = directory / "short.bval"
        bval.write_text(" ".join(Path(good["bval"]).read_text().split()[:-1]) + "\n")
        return {**good, "bval": str(bval)}, "b-value", str(bval)
    if case == "no b=0":
        bval = directory / "nob0.bval"
        bval.write_text(" ".join("1000" for _ in Path(good["bval"]).read_text().split()) + "\n")
        return {**good, "bval": str(bval)}, "b=0", str(bval)
    if case == "neither adc nor dwi":
        return {"t1w": good["t1w"]}, "missing 'adc' (needs t1w, adc (or dwi + bval + bvec))", "datalist.json"
    if case == "t1w grid":
        t1w = nib.load(good["t1w"])
        moved = directory / "moved_t1w.nii.gz"
        affine = t1w.affine.copy()
        affine[0, 3] += 5.0
        nib.save(nib.Nifti1Image(np.asarray(t1w.dataobj), affine), moved)
        return {**good, "t1w": str(moved)}, "affine differs from moved_t1w.nii.gz", good["dwi"]
    if case == "missing dwi":
        return {**good, "dwi": str(directory / "absent_dwi.nii.gz")}, "not found", str(directory / "absent_dwi.nii.gz")
    raise ValueError(case)


@pytest.mark.parametrize("case", ["bval count", "no b=0", "neither adc nor dwi", "t1w grid", "missing dwi"])
def test_bad_input_stops_inference_before_any_compute(case, tiny_diffusion_dataset, tmp_path):
    item, problem, named = _bad_datalist(tiny_diffusion_dataset, tmp_path, case)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [item]}))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_in_process(
            "inferring",
            config_file=str(CONFIGS / "inference.yaml"),
            dataset_dir=str(tmp_path),
            datalist=str(datalist),
            output_dir=str(output),
        )
    message = str(stop.value)
    assert message.startswith("error: ") and problem in message and named in message, message
    assert not output.exists()


def test_slices_not_divisible_by_16_are_a_clear_error_when_padding_is_off(trained, tiny_diffusion_dataset, tmp_path):
    result = run_bundle(
        BUNDLE, "inferring", ["inference.yaml"], dataset_dir=str(tiny_diffusion_dataset), output_dir=str(tmp_path),
        ckpt_path=str(trained / "model.pt"), num_workers=0, divisible_by=1, **TINY_NETWORK,
    )  # fmt: skip
    assert result.returncode != 0
    assert "height and width must be divisible by 16, got (34, 31); pad the slices" in result.stderr
