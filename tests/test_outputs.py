"""Outputs checked before any compute and written atomically (synth7t.outputs), and the resume state
(synth7t.resume) and non-finite-loss stop (synth7t.handlers) that make checkpoints safe."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, RandGaussianNoise

from synth7t.errors import InputError
from synth7t.networks import AttentionResUNet
from synth7t.handlers import StopOnNonFiniteLoss
from synth7t.outputs import AtomicNibabelWriter, check_absent, prediction_paths, temporary_path
from synth7t.resume import RandomStates, ValidationState
from synth7t.transforms import RandSimulate3Td

from conftest import TINY_NETWORKS, bundle_command, checked, run_command, start_bundle_command


def test_prediction_paths_name_outputs_as_save_imaged_does(tmp_path):
    items = [{"image": "/data/a/sub-1_3T.nii.gz"}, {"image": "/data/b/sub-2.nii"}]
    assert prediction_paths(items, "image", tmp_path) == [tmp_path / "sub-1_3T_7t.nii.gz", tmp_path / "sub-2_7t.nii.gz"]


def test_two_inputs_with_one_output_name_are_refused(tmp_path):
    items = [{"image": "/data/a/sub-1.nii.gz"}, {"image": "/data/b/sub-1.nii.gz"}]
    with pytest.raises(InputError, match="/data/a/sub-1.nii.gz and /data/b/sub-1.nii.gz would both be written"):
        prediction_paths(items, "image", tmp_path)


def test_existing_results_are_refused_unless_overwrite(tmp_path):
    (tmp_path / "sub-1_7t.nii.gz").write_bytes(b"earlier")
    (tmp_path / "sub-2_7t.nii.gz").symlink_to(tmp_path / "nowhere")  # a broken symlink counts too
    items = [{"image": "sub-1.nii.gz"}, {"image": "sub-2.nii.gz"}]
    with pytest.raises(InputError, match=r"sub-1_7t.nii.gz, .*sub-2_7t.nii.gz: already exist.*--overwrite True"):
        prediction_paths(items, "image", tmp_path)
    assert len(prediction_paths(items, "image", tmp_path, overwrite=True)) == 2
    assert (tmp_path / "sub-1_7t.nii.gz").read_bytes() == b"earlier"  # checking writes nothing


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "out"
    file.write_text("x")
    with pytest.raises(InputError, match="the output folder is a file"):
        prediction_paths([{"image": "a.nii.gz"}], "image", file)
    with pytest.raises(InputError, match="the output folder is a file"):
        check_absent([file / "metrics.csv"])


def _write_volume(path, value: float) -> None:
    writer = AtomicNibabelWriter(output_dtype=np.float32)
    writer.set_data_array(torch.full((1, 4, 5, 6), value), channel_dim=0)
    writer.set_metadata({"affine": torch.eye(4), "original_affine": torch.eye(4)}, resample=False)
    writer.write(path)


def test_atomic_writer_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes(b"not to be touched")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a_7t.nii.gz").symlink_to(outside)
    _write_volume(folder / "a_7t.nii.gz", 0.5)
    assert outside.read_bytes() == b"not to be touched"
    assert not (folder / "a_7t.nii.gz").is_symlink()
    assert nib.load(folder / "a_7t.nii.gz").get_fdata().mean() == pytest.approx(0.5)
    assert [p.name for p in folder.iterdir()] == ["a_7t.nii.gz"]  # no temporary file left


def test_atomic_writer_leaves_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "a_7t.nii.gz"
    _write_volume(target, 0.25)
    monkeypatch.setattr(nib, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        _write_volume(target, 0.75)
    monkeypatch.undo()
    assert nib.load(target).get_fdata().mean() == pytest.approx(0.25)
    assert [p.name for p in tmp_path.iterdir()] == ["a_7t.nii.gz"]


def test_temporary_path_keeps_the_nifti_extension_and_is_hidden(tmp_path):
    temporary = temporary_path(tmp_path / "sub_7t.nii.gz")
    assert temporary.parent == tmp_path and temporary.name.startswith(".sub_7t.nii.gz.")
    assert temporary.name.endswith(".tmp.nii.gz") and str(os.getpid()) in temporary.name


def _draws(compose: Compose) -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item(), [t.R.rand() for t in compose.transforms]


def test_random_states_round_trip_through_a_weights_only_checkpoint():
    compose = Compose([RandGaussianNoise(prob=1.0), RandSimulate3Td(keys="label")])
    compose.set_random_state(3)
    states = RandomStates(compose)
    buffer = io.BytesIO()
    torch.save({"random_states": states.state_dict()}, buffer)
    expected = _draws(compose)
    buffer.seek(0)
    states.load_state_dict(torch.load(buffer, weights_only=True)["random_states"])
    assert _draws(compose) == expected


def test_random_states_refuse_another_configuration():
    saved = RandomStates(Compose([RandGaussianNoise(prob=1.0)])).state_dict()  # the Compose and its transform
    with pytest.raises(ValueError, match="random states of 2 random transforms, this run has 3"):
        RandomStates(Compose([RandGaussianNoise(prob=1.0), RandGaussianNoise()])).load_state_dict(saved)


def test_validation_state_keeps_the_best_metric():
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 31.5, 12
    state = ValidationState(evaluator).state_dict()
    fresh = Engine(lambda engine, batch: None)
    fresh.state.best_metric, fresh.state.best_metric_epoch = -1, -1
    ValidationState(fresh).load_state_dict(state)
    assert (fresh.state.best_metric, fresh.state.best_metric_epoch) == (31.5, 12)


def test_non_finite_loss_stops_with_status_1_before_the_epoch_ends():
    losses = iter([0.5, float("nan")])
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(next(losses))})
    StopOnNonFiniteLoss().attach(engine)
    completed = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: completed.append(engine.state.epoch))
    with pytest.raises(SystemExit) as stop:
        engine.run(range(4), max_epochs=1)
    assert "loss is nan at epoch 1, iteration 2" in str(stop.value.code) and completed == []


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "sub_7t.nii.gz"
    stale = tmp_path / f".sub_7t.nii.gz.{dead.stdout.strip()}.0a1b2c3d.tmp.nii.gz"
    live = temporary_path(target)  # this process's own name: a writer that still runs
    other = tmp_path / f".other_7t.nii.gz.{dead.stdout.strip()}.0a1b2c3d.tmp.nii.gz"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert prediction_paths([{"image": "/data/sub.nii.gz"}], "image", tmp_path) == [target]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_refused_run_leaves_stale_temporaries_alone(tmp_path):
    (tmp_path / "sub_7t.nii.gz").write_bytes(b"earlier result")
    stale = tmp_path / ".sub_7t.nii.gz.999999999.0a1b2c3d.tmp.nii.gz"
    stale.write_bytes(b"partial")
    with pytest.raises(InputError, match="already exists"):
        prediction_paths([{"image": "sub.nii.gz"}], "image", tmp_path)
    assert stale.exists()


def _noisy_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A brain-like volume with noise, so its compressed NIfTI takes a while to write."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    return np.where(brain, 0.5 + 0.1 * rng.standard_normal(shape), 0).clip(0, 1).astype(np.float32)


def test_a_kill_while_inference_writes_leaves_the_previous_result(tmp_path):
    """SIGKILL a `python -m monai.bundle run inferring` process (forked from conftest's import server) the moment its
    temporary output appears, retrying until a kill lands inside the write: the final name then still holds the
    earlier result, whole; the next run clears the killed run's temporary file."""
    data, output_dir = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    output_dir.mkdir()
    nib.save(nib.Nifti1Image(_noisy_volume((160, 160, 32), 0), np.eye(4)), data / "sub_3T.nii.gz")
    (data / "datalist.json").write_text(json.dumps({"test": [{"image": "sub_3T.nii.gz"}]}))
    network = AttentionResUNet(**TINY_NETWORKS["gan_unet_t1w7t"], global_residual=True)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    final = output_dir / "sub_3T_7t.nii.gz"
    nib.save(nib.Nifti1Image(np.full((160, 160, 32), 0.25, np.float32), np.eye(4)), final)
    earlier = final.read_bytes()
    command = bundle_command(
        "gan_unet_t1w7t", "inferring", ["inference.yaml"], dataset_dir=str(data), output_dir=str(output_dir),
        ckpt_path=str(tmp_path / "model.pt"), num_workers=0, overwrite=True, **TINY_NETWORKS["gan_unet_t1w7t"],
    )  # fmt: skip
    hits = 0
    for attempt in range(6):
        process = start_bundle_command(command, "/", dict(os.environ))
        while process.is_alive() and not list(output_dir.glob(".sub_3T_7t.nii.gz.*")):
            time.sleep(0.002)
        process.kill()  # SIGKILL
        process.join()
        left = list(output_dir.glob(".sub_3T_7t.nii.gz.*.tmp.nii.gz"))
        if final.read_bytes() == earlier:
            hits += bool(left)
            if hits:
                break
        else:  # killed after the rename: a whole new result, which the next attempt replaces
            assert nib.load(final).get_fdata().shape == (160, 160, 32)
            final.write_bytes(earlier)
    assert hits, "no kill landed while the output was being written"
    print(f"kill landed inside the write after {attempt + 1} attempts")
    assert nib.load(final).get_fdata().mean() == pytest.approx(0.25)
    checked(run_command(command, "/"))
    assert [p.name for p in output_dir.iterdir()] == [final.name]  # the killed run's temporary file is gone
    assert nib.load(final).get_fdata().shape == (160, 160, 32)


def test_metrics_temporaries_of_dead_writers_are_removed_by_check_absent(tmp_path):
    from synth7t.handlers import write_atomically

    write_atomically(tmp_path / "metrics.csv", "psnr\n30\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left by a finished write
    stale = tmp_path / ".metrics_summary.json.999999999.0a1b2c3d.tmp.json"
    stale.write_text("{")
    assert check_absent([tmp_path / "metrics_summary.json"]) == [tmp_path / "metrics_summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
