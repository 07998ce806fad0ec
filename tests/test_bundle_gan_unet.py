"""The gan_unet_t1w7t bundle as a user runs it: U-Net (degradation-randomized by default) and GAN training, resume,
the thesis overlays, evaluation, inference, conditioning, torchrun, and the bad-input cases of the contract
(BUNDLES.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from synth7t.handlers import GAUSSIAN_SIGMAS
from synth7t.networks import AttentionResUNet

from conftest import (
    REPOSITORY,
    TINY_NETWORKS,
    TINY_TRAININGS,
    bundle_command,
    checked,
    evaluation_results,
    run_bundle,
    tiny_hub_cache,
    train_refiner_alone,
)

BUNDLE = "gan_unet_t1w7t"
CONFIGS = REPOSITORY / "bundles" / BUNDLE / "configs"
TINY_NETWORK = TINY_NETWORKS[BUNDLE]
TINY_TRAINING = TINY_TRAININGS[BUNDLE]
TINY_CRITIC = {"critic_channels": 4, "critic_layers": 2}
GAN = ["train.yaml", "train_gan.yaml"]


@pytest.fixture(scope="module")
def perceptual_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hub_cache(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def trained_unet(tiny_dataset: Path, perceptual_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the default U-Net recipe, with the perceptual loss of the thesis overlays added (L1 + perceptual
    through the real hub loader), on the tiny dataset."""
    output = tmp_path_factory.mktemp("unet")
    checked(
        run_bundle(
            BUNDLE, "training", ["train.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(output),
            perceptual_weight=5e-3, perceptual_cache_dir=str(perceptual_hub), **TINY_TRAINING, **TINY_NETWORK,
        )
    )  # fmt: skip
    return output


@pytest.fixture(scope="module")
def trained_gan(tiny_dataset: Path, trained_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of WGAN-GP, the generator warm-started from the default U-Net (the same network: with its global
    residual)."""
    output = tmp_path_factory.mktemp("gan")
    checked(
        run_bundle(
            BUNDLE, "training", GAN, dataset_dir=str(tiny_dataset), output_dir=str(output), perceptual_weight=0,
            warm_start_from=str(trained_unet / "model.pt"), global_residual=True, **TINY_TRAINING, **TINY_NETWORK,
            **TINY_CRITIC,
        )
    )  # fmt: skip
    return output


def test_refiner_trains_alone_on_a_warm_started_unet(trained_unet, tiny_dataset, tmp_path):
    """``--trainable refiner`` on the weights of a U-Net without one: the U-Net stays as loaded, the refiner learns
    from the identity."""
    train_refiner_alone(
        BUNDLE, trained_unet / "model.pt", tmp_path / "refine", dataset_dir=str(tiny_dataset), **TINY_TRAINING,
        **TINY_NETWORK,
    )  # fmt: skip


@pytest.mark.parametrize(
    "configs, workflow_type",
    [
        (["train.yaml"], "train"),
        (GAN, "train"),
        (["train.yaml", "evaluate.yaml"], "train"),
        (["inference.yaml"], "infer"),
    ],
)
def test_check_properties(configs, workflow_type, tiny_dataset, tmp_path):
    checkpoint = tmp_path / "model.pt"  # beside the output folder: training refuses a folder holding a run
    torch.save(AttentionResUNet(**TINY_NETWORK).state_dict(), checkpoint)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in configs],
        workflow_type=workflow_type,
        dataset_dir=str(tiny_dataset),
        output_dir=str(tmp_path / "run"),
        ckpt_path=str(checkpoint),
        perceptual_weight=0,
        num_workers=0,
        **TINY_NETWORK,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_unet_training_writes_a_loadable_generator(trained_unet):
    assert {"model.pt", "checkpoint_epoch=1.pt", "checkpoint_final.pt"} <= {p.name for p in trained_unet.iterdir()}
    network = AttentionResUNet(in_channels=3, out_channels=1, global_residual=True, **TINY_NETWORK)
    best = torch.load(trained_unet / "model.pt", weights_only=True)
    network.load_state_dict(best)
    checkpoint = torch.load(trained_unet / "checkpoint_final.pt", weights_only=True)
    assert {"model", "ema_model", "optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)
    # model.pt holds the moving average that validation scored (one epoch: the final one), not the raw weights
    assert all(torch.equal(best[name], checkpoint["ema_model"][name]) for name in best)
    assert not all(torch.equal(best[name], checkpoint["model"][name]) for name in best)
    # warm-up and cosine decay stepped per iteration, over all iterations of the run
    assert checkpoint["lr_scheduler"]["last_epoch"] == checkpoint["lr_scheduler"]["t_total"] == 2
    assert list(trained_unet.glob("events.out.tfevents.*"))


def test_gan_checkpoint_holds_both_networks_and_optimizers(trained_gan):
    checkpoint = torch.load(trained_gan / "checkpoint_final.pt", weights_only=True)
    assert {"model", "critic", "optimizer", "critic_optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)
    # train_gan.yaml keeps the raw generator weights (ema_momentum null): no average, and no second copy of the generator
    assert checkpoint["ema_model"] == {}
    trainer = checkpoint["trainer"]
    assert set(trainer) == {"iteration", "epoch_length", "max_epochs"}  # no pickled networks
    assert trainer["iteration"] == trainer["epoch_length"]  # one epoch


def test_gan_run_resumes_from_its_checkpoint(trained_gan, tiny_dataset, tmp_path):
    result = checked(
        run_bundle(
            BUNDLE, "training", GAN, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path), perceptual_weight=0,
            resume_from=str(trained_gan / "checkpoint_final.pt"), global_residual=True,
            **{**TINY_TRAINING, "max_epochs": 2}, **TINY_NETWORK, **TINY_CRITIC,
        )
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "Epoch[1] Complete" not in log and "Epoch[2] Complete" in log
    checkpoint = torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)
    iterations = checkpoint["trainer"]["iteration"]
    assert iterations == 2 * checkpoint["trainer"]["epoch_length"]
    assert checkpoint["critic_optimizer"]["state"][0]["step"].item() == iterations  # the critic steps every iteration


def test_vanilla_bce_gan_with_gradient_difference_loss_trains(tiny_dataset, tmp_path):
    checked(
        run_bundle(
            BUNDLE, "training", GAN, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path), perceptual_weight=0,
            adversarial_criterion="bce", critic_steps=1, gradient_penalty_weight=0, gradient_difference_weight=1.0,
            gradient_difference_padding="valid", **TINY_TRAINING, **TINY_NETWORK, **TINY_CRITIC,
        )
    )  # fmt: skip
    assert (tmp_path / "checkpoint_final.pt").is_file()


def _network(configs: list[str], **overrides) -> tuple[ConfigParser, torch.nn.Module, torch.nn.Module | None]:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    parser.update(overrides)
    with torch.device("meta"):  # parameter counts without allocating the thesis's large networks
        return parser, parser.get_parsed_content("network_def"), parser.get_parsed_content("critic_def")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("configs", [["train.yaml"], GAN], ids=["unet", "gan"])
def test_amp_option_trains_through_the_gradient_scalers(configs, tiny_dataset, tmp_path):
    """``--amp True`` as a user passes it. Without a GPU torch disables the scalers and CUDA autocast, so this covers
    the configs' wiring and the engines' scaler code paths; the CUDA case is in test_adversarial_trainer.py."""
    checked(
        run_bundle(
            BUNDLE, "training", configs, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path), perceptual_weight=0,
            amp=True, **TINY_TRAINING, **TINY_NETWORK, **TINY_CRITIC,
        )
    )  # fmt: skip
    checkpoint = torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)
    assert torch.isfinite(torch.cat([p.flatten() for p in checkpoint["model"].values()])).all()


@pytest.mark.parametrize(
    "overlay, table2, parameters",
    [
        # (n_epochs, n_channels, channel mult, n_groups, n_res, CA stages, n_batch, perc weight, lr)
        ("unc_unet.yaml", (15, 128, [1, 2, 2, 2], 32, 3, [3, 4, 5], 16, 5e-3, 5e-5), 44_786_229),
        ("bf_unet.yaml", (3, 64, [1, 2, 2, 2, 2], 16, 3, [3, 4, 5], 16, 1e-3, 1e-4), 15_206_337),
    ],
)
def test_thesis_unet_overlays(overlay, table2, parameters):
    parser, network, critic = _network(["train.yaml", overlay])
    keys = ("max_epochs", "channels", "channel_mult", "norm_num_groups", "num_res_blocks", "cross_attention_stages",
            "batch_size", "perceptual_weight", "learning_rate")  # fmt: skip
    assert tuple(parser[key] for key in keys) == table2
    assert parser["slab_size"] == 3 and critic is None
    # the thesis's recipe: fixed 3T/7T pairs, no global residual, validation every epoch
    assert (parser["randomize_degradation"], network.residual_start, parser["val_interval"]) == (False, -1, 1)
    assert parser.get_parsed_content("context_dim") == 4  # age, sex, diagnosis, slice position
    assert _count(network) == parameters
    assert network.bottleneck_attends_context == (len(table2[2]) + 1 in table2[5])


def test_unc_unet_reduces_the_learning_rate_on_the_validation_psnr():
    parser, _, _ = _network(["train.yaml", "unc_unet.yaml"])
    assert parser.get_parsed_content("train#named_handlers#lr_schedule") is None  # disabled: no per-iteration step
    handler = parser.get_parsed_content("validate#named_handlers#lr_plateau")
    scheduler = handler.lr_scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and handler.epoch_level
    assert (scheduler.mode, scheduler.factor, scheduler.patience) == ("max", 0.1, 5)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={"val_psnr": 31.5}))
    assert handler.step_transform(engine) == 31.5


def test_bf_unet_halves_the_learning_rate_every_200_steps():
    parser, _, _ = _network(["train.yaml", "bf_unet.yaml"])
    handler = parser.get_parsed_content("train#named_handlers#lr_schedule")
    scheduler = handler.lr_scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and (scheduler.step_size, scheduler.gamma) == (
        200,
        0.5,
    )
    assert handler.epoch_level is False  # per iteration


def test_thesis_gan_overlay():
    parser, generator, critic = _network([*GAN, "bf_gan.yaml"])
    generator_settings = ("max_epochs", "channels", "channel_mult", "norm_num_groups", "num_res_blocks", "batch_size",
                          "perceptual_weight", "learning_rate", "lr_decay_per_epoch")  # fmt: skip
    assert tuple(parser[key] for key in generator_settings) == (10, 256, [1, 2, 2, 2, 2], 64, 4, 48, 1e-2, 1e-4, 0.8)
    assert parser["cross_attention_stages"] == [] and generator.context_dim is None
    critic_settings = ("critic_steps", "critic_learning_rate", "adversarial_weight", "critic_channels", "critic_layers")
    assert tuple(parser[key] for key in critic_settings) == (5, 2e-5, 0.2, 256, 4)
    assert parser["gradient_penalty_weight"] == 10.0
    assert _count(generator) == 187_643_477
    assert (parser["randomize_degradation"], generator.residual_start, parser["val_interval"]) == (False, -1, 1)
    handler = parser.get_parsed_content("train#named_handlers#lr_schedule")
    assert handler.epoch_level and (handler.lr_scheduler.step_size, handler.lr_scheduler.gamma) == (1, 0.8)
    widths = [m.out_channels for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [256, 512, 1024, 2048, 4096, 1]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    assert all(m.num_groups == 1 for m in critic.modules() if isinstance(m, torch.nn.GroupNorm))


def test_default_is_the_compact_unconditioned_generator_with_a_global_residual():
    parser, network, critic = _network(["train.yaml"])
    assert _count(network) == 680_565 + 168_481 and network.context_dim is None and critic is None  # U-Net + refiner
    assert parser.get_parsed_content("divisible_by") == 16
    assert network.residual_start == 1 and parser["randomize_degradation"]  # the middle of 3 slices, as shipped
    assert (parser["fixed_pair_prob"], parser["ema_momentum"]) == (0.75, 0.02)
    _, without_residual, _ = _network(["train.yaml"], global_residual=False)
    assert without_residual.residual_start == -1
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.yaml"))
    shipped = inference.get_parsed_content("network_def")  # the network the shipped weights are
    assert shipped.residual_start == 1 and shipped.refiner is not None


def test_evaluation_writes_per_subject_metrics_with_identity_and_gaussian_baselines(
    trained_unet, tiny_dataset, tmp_path
):
    rows, summary = evaluation_results(
        BUNDLE, tiny_dataset, tmp_path, fresh_interpreter=True, ckpt_path=str(trained_unet / "model.pt"), num_workers=0,
        **TINY_NETWORK,
    )  # fmt: skip
    assert [row["subject"] for row in rows] == ["sub-4_3T", "sub-5_3T"]
    names = ("psnr", "ssim", "mse", "mae", "psnr_brain", "identity_psnr", "identity_mae_brain", "gaussian_psnr",
             "gaussian_ssim_brain")  # fmt: skip
    for row in rows:
        for name in names:
            assert np.isfinite(float(row[name])), name
        assert float(row["gaussian_sigma"]) in GAUSSIAN_SIGMAS
    assert summary["psnr"]["n"] == summary["gaussian_psnr"]["n"] == 2


def test_inference_writes_one_volume_per_input_on_its_grid(trained_unet, tiny_dataset, tmp_path):
    checked(
        run_bundle(
            BUNDLE, "inferring", ["inference.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path),
            ckpt_path=str(trained_unet / "model.pt"), num_workers=0, **TINY_NETWORK,
        )
    )  # fmt: skip
    for subject in ("sub-4", "sub-5"):
        source = nib.load(tiny_dataset / f"{subject}_3T.nii.gz")
        output = nib.load(tmp_path / f"{subject}_3T_7t.nii.gz")
        assert output.shape == source.shape
        np.testing.assert_allclose(output.affine, source.affine)
        values = output.get_fdata()
        assert values.min() >= 0 and values.max() <= 1
        assert np.all(values[np.asarray(source.get_fdata()) == 0] == 0)


def test_slice_position_conditioning_trains_and_infers(tiny_dataset, tmp_path):
    conditioned = {**TINY_NETWORK, "condition_on_slice_position": True, "cross_attention_stages": [2, 3]}
    checked(
        run_bundle(
            BUNDLE, "training", ["train.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "train"),
            **TINY_TRAINING, **conditioned,
        )
    )  # fmt: skip
    checked(
        run_bundle(
            BUNDLE, "inferring", ["inference.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "out"),
            ckpt_path=str(tmp_path / "train" / "model.pt"), num_workers=0, **conditioned,
        )
    )  # fmt: skip
    assert len(list((tmp_path / "out").glob("*_7t.nii.gz"))) == 2


def test_subject_conditioning_reads_the_datalist_fields(tiny_dataset, tmp_path):
    datalist = json.loads((tiny_dataset / "datalist.json").read_text())
    for index, item in enumerate(datalist["training"] + datalist["validation"] + datalist["test"]):
        item.update(age=60 + index, sex="F" if index % 2 else "M", diagnosis="CN")
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    conditioned = {**TINY_NETWORK, "context_fields": ["age", "sex", "diagnosis"], "cross_attention_stages": [3]}
    checked(
        run_bundle(
            BUNDLE, "training", ["train.yaml"], dataset_dir=str(tiny_dataset), datalist=str(tmp_path / "datalist.json"),
            output_dir=str(tmp_path / "train"), **TINY_TRAINING, **conditioned,
        )
    )  # fmt: skip
    network = AttentionResUNet(**TINY_NETWORK, cross_attention_stages=[3], context_dim=3)
    network.load_state_dict(torch.load(tmp_path / "train" / "model.pt", weights_only=True))


@pytest.mark.parametrize("configs", [["train.yaml"], GAN], ids=["unet", "gan"])
def test_torchrun_trains_on_two_cpu_processes(configs, tiny_dataset, tmp_path):
    command = bundle_command(
        BUNDLE, "training", [*configs, "multi_gpu_train.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path),
        perceptual_weight=0, **{**TINY_TRAINING, "batch_size": 2}, **TINY_NETWORK, **TINY_CRITIC,
    )  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    checked(subprocess.run(torchrun + command[1:], capture_output=True, text=True, timeout=900, env=environment))
    checkpoint = torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)
    assert {"model", "critic"} <= set(checkpoint) if configs == GAN else "critic" not in checkpoint
    assert not any(key.startswith("module.") for key in checkpoint["model"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"perceptual_weight": 5e-3, "perceptual_cache_dir": "/nonexistent/hub", "perceptual_allow_download": False},
            "RadImageNet ResNet-50 of the perceptual loss is not in this torch hub cache",
        ),
        ({"context_fields": ["age"], "cross_attention_stages": [2]}, "the conditioned network needs 'age'"),
        (
            {"warm_start_from": "/nonexistent/unet.pt", "perceptual_weight": 0},
            "/nonexistent/unet.pt: checkpoint to start from not found",
        ),
    ],
)
def test_bad_training_input_stops_with_one_message(overrides, message, tiny_dataset, tmp_path):
    configs = GAN if "warm_start_from" in overrides else ["train.yaml"]
    result = run_bundle(
        BUNDLE, "training", configs, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path / "out"),
        **TINY_TRAINING, **TINY_NETWORK, **overrides,
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_slices_along_another_axis_come_back_on_the_input_grid(trained_unet, tiny_dataset, tmp_path):
    checked(
        run_bundle(
            BUNDLE, "inferring", ["inference.yaml"], dataset_dir=str(tiny_dataset), output_dir=str(tmp_path),
            ckpt_path=str(trained_unet / "model.pt"), num_workers=0, slice_axis=0, **TINY_NETWORK,
        )
    )  # fmt: skip
    for subject in ("sub-4", "sub-5"):
        source = nib.load(tiny_dataset / f"{subject}_3T.nii.gz")
        output = nib.load(tmp_path / f"{subject}_3T_7t.nii.gz")
        assert output.shape == source.shape
        np.testing.assert_allclose(output.affine, source.affine)
        assert np.all(output.get_fdata()[np.asarray(source.get_fdata()) == 0] == 0)
