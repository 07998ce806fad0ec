"""Shared fixtures: a tiny synthetic 3T/7T dataset and a runner for `python -m monai.bundle`."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from synth7t.diffusion_phantom import prepare_diffusion_pairs
from synth7t.transforms import SimulateRealistic3T, fit_adc, read_fsl_bvals, read_fsl_bvecs

REPOSITORY = Path(__file__).resolve().parent.parent
# the model zoo style unit tests run against unpacked release archives, in their own environment (`make zoo-check`)
collect_ignore = ["zoo"]
LPS_LIKE = np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 18], [0, 0, 1.0, -6], [0, 0, 0, 1]])  # the TELL axes
PERMUTED = np.array([[0, 0, 1.0, -6], [-1.0, 0, 0, 20], [0, -1.0, 0, 18], [0, 0, 0, 1]])  # slices on array axis 0


def brain_phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A 7T-like uint8 volume: an ellipsoid "brain" with smooth texture and darker "ventricles", background 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.85, 0.8, 0.9])[:, None, None, None]) ** 2).sum(0))
    brain = radius < 1
    texture = sum(np.sin(f * grid[a] + rng.uniform(0, 6)) for a, f in enumerate(rng.uniform(3, 9, size=3)))
    volume = 150 + 40 * texture / 3 - 80 * (radius < 0.3)
    return np.where(brain, np.clip(volume, 1, 255), 0).astype(np.uint8)


def write_pair(directory: Path, subject: str, shape: tuple[int, int, int], affine: np.ndarray, seed: int) -> dict:
    """Write <subject>_7T/_3T/_mask NIfTI files (float32 in [0, 1]) and return their datalist item."""
    target = torch.as_tensor(brain_phantom(shape, seed), dtype=torch.float32)[None] / 255
    simulator = SimulateRealistic3T(target_voxel_size_mm=1.6, snr=25.0)
    simulator.set_random_state(seed)
    image = simulator(target, target > 0)
    arrays = {"image": image[0].numpy(), "label": target[0].numpy(), "mask": (target[0] > 0).numpy().astype(np.uint8)}
    names = {"image": f"{subject}_3T.nii.gz", "label": f"{subject}_7T.nii.gz", "mask": f"{subject}_mask.nii.gz"}
    for key, name in names.items():
        nib.save(nib.Nifti1Image(arrays[key], affine), directory / name)
    return names


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training, one validation and two test subjects, 40x36x12 voxels (in-plane not a multiple of 8); the
    second test subject is stored with permuted axes, so the slice axis is array axis 0."""
    directory = tmp_path_factory.mktemp("tiny_dataset")
    datalist = {
        "training": [write_pair(directory, f"sub-{i}", (40, 36, 12), LPS_LIKE, i) for i in (1, 2)],
        "validation": [write_pair(directory, "sub-3", (40, 36, 12), LPS_LIKE, 3)],
        "test": [
            write_pair(directory, "sub-4", (40, 36, 12), LPS_LIKE, 4),
            write_pair(directory, "sub-5", (12, 40, 36), PERMUTED, 5),
        ],
    }
    (directory / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_diffusion_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VCT demo data of ``scripts/prepare_diffusion_data.py`` at toy size: five phantom subjects (two training,
    one validation, two test), 3T T1w and diffusion series at 1.25 mm, 7T ADC targets at 1.05 mm (34 x 30 x 14
    voxels, in-plane not a multiple of 16). The first test subject comes with its 3T ADC map precomputed (``adc``,
    fitted as the bundle fits it) instead of its diffusion series."""
    root = tmp_path_factory.mktemp("tiny_diffusion")
    source = root / "t1w"
    source.mkdir()
    for index in range(1, 6):
        nib.save(nib.Nifti1Image(brain_phantom((36, 32, 15), index), LPS_LIKE), source / f"sub-{index}_T1w.nii.gz")
    directory = root / "data"
    datalist_path = prepare_diffusion_pairs(source, directory, n_validation=1, n_test=2)
    datalist = json.loads(datalist_path.read_text())
    item = datalist["test"][0]
    dwi = nib.load(directory / item["dwi"])
    adc = fit_adc(
        np.moveaxis(np.asarray(dwi.dataobj, dtype=np.float32), -1, 0),
        read_fsl_bvals(directory / item["bval"]),
        bvecs=read_fsl_bvecs(directory / item["bvec"]),
    )
    item["adc"] = item["dwi"].replace("_dwi", "_ADC")
    nib.save(nib.Nifti1Image(adc.numpy(), dwi.affine), directory / item["adc"])
    for key in ("dwi", "bval", "bvec"):
        del item[key]
    datalist_path.write_text(json.dumps(datalist, indent=2))
    return directory


TINY_HUBCONF = '''
import torch
from torch import nn

dependencies = ["torch"]


def radimagenet_resnet50(verbose=False, **kwargs):
    """A stand-in with the hub entry point's name: two convs instead of ResNet-50, weights from a local file."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
    model.load_state_dict(torch.load(__file__.replace("hubconf.py", "weights.pt"), weights_only=True))
    return model
'''


def tiny_hub_cache(root: Path) -> Path:
    """A torch hub cache holding a two-conv stand-in for Project-MONAI/perceptual-models' RadImageNet ResNet-50."""
    repo = root / "Project-MONAI_perceptual-models_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(TINY_HUBCONF)
    torch.manual_seed(0)
    weights = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
    )
    torch.save(weights.state_dict(), repo / "weights.pt")
    return root


# Each bundle's default network at toy size (WATNet's own size is small enough).
TINY_NETWORKS = {
    "watnet": {"refine_depth": 2, "refine_channels": 4},
    "gan_unet_t1w7t": {
        "channels": 8, "channel_mult": [1, 2], "norm_num_groups": 4, "num_res_blocks": 1, "refine_depth": 2,
        "refine_channels": 4,
    },
    "vct_adc7t": {"channels": 4, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32},
}
# Overrides that make each bundle's training run in seconds on its tiny dataset: one epoch of two iterations on the
# two training volumes (one draw of each per batch), validation on 8 of the validation volume's central slices.
TINY_TRAININGS = {
    "watnet": {"max_epochs": 1, "patches_per_draw": 4, "draws_per_volume": 1, "batch_size": 4, "patch_size": [16, 16]},
    "gan_unet_t1w7t": {"max_epochs": 1, "slabs_per_draw": 2, "draws_per_volume": 2, "batch_size": 4},
    "vct_adc7t": {"max_epochs": 1, "slices_per_volume": 4, "batch_size": 4},
}
for tiny in TINY_TRAININGS.values():
    tiny.update(val_interval=1, num_workers=0, validation_slices=8)


def bundle_command(bundle: str, run_id: str, configs: list[str], **overrides) -> list[str]:
    """`python -m monai.bundle run <run_id>` with the bundle's configs (merged in order) and overrides."""
    config_dir = REPOSITORY / "bundles" / bundle / "configs"
    files = [str(config_dir / name) for name in configs]
    command = [sys.executable, "-m", "monai.bundle", "run", run_id]
    command += ["--config_file", files[0] if len(files) == 1 else json.dumps(files)]
    for key, value in overrides.items():
        # fire reads Python literals: True, not JSON's true
        text = value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)
        command += [f"--{key}", text]
    return command


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` of a successful run; otherwise fail with its command line and the ends of its output."""
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


# Bundle commands run in processes forked from one server per test worker that has imported these once.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(
    ["cli_child", "fire", "nibabel", "ignite.engine", "torch.utils.tensorboard", "monai.bundle", "monai.apps",
     "monai.engines", "monai.handlers", "monai.inferers", "monai.losses", "monai.metrics", "synth7t.bundle",
     "synth7t.engines", "synth7t.handlers", "synth7t.losses", "synth7t.networks", "synth7t.transforms"]
)  # fmt: skip
COMMAND_TIMEOUT_S = 900


def start_bundle_command(
    command: list[str],
    cwd: str,
    environment: dict,
    stdout: str = os.devnull,
    stderr: str = os.devnull,
    start_method: str | None = None,
) -> multiprocessing.process.BaseProcess:
    """Start ``command`` (a :func:`bundle_command`) in a process forked from the import server, its output to the
    files ``stdout`` and ``stderr``, with ``start_method`` chosen for its own multiprocessing (``None``: the
    platform's default); returns the started process (``join``, ``kill``, ``exitcode``)."""
    import cli_child

    arguments = (command[3:], cwd, environment, stdout, stderr, start_method)
    process = FORKSERVER.Process(target=cli_child.run_command, args=arguments)
    process.start()
    return process


def run_bundle(
    bundle: str,
    run_id: str,
    configs: list[str],
    cwd: Path | None = None,
    fresh_interpreter: bool = False,
    start_method: str | None = None,
    **overrides,
) -> subprocess.CompletedProcess:
    """Run a bundle workflow as a user would, ``python -m monai.bundle run ...`` from ``cwd`` (default: a directory
    outside the repository): :func:`run_command` of its :func:`bundle_command`."""
    command = bundle_command(bundle, run_id, configs, **overrides)
    return run_command(command, cwd or Path("/"), fresh_interpreter, start_method)


def run_command(
    command: list[str], cwd: Path | str, fresh_interpreter: bool = False, start_method: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` (a :func:`bundle_command`) from ``cwd`` in its own process with its own stdout, stderr and
    exit status, as from the shell.

    By default the process is forked from a server that has imported MONAI and synth7t already (``cli_child``),
    and the command finds ``start_method`` chosen for its multiprocessing (``None``: the platform's default);
    ``fresh_interpreter=True`` starts a new interpreter instead, for the tests about the command line itself."""
    assert not (fresh_interpreter and start_method), "a new interpreter starts with the platform's default"
    cwd, environment = str(cwd), dict(os.environ, PYTHONUNBUFFERED="1")
    if fresh_interpreter:
        return subprocess.run(
            command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    with tempfile.TemporaryDirectory() as folder:
        stdout, stderr = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = start_bundle_command(command, cwd, environment, stdout, stderr, start_method)
        process.join(COMMAND_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, COMMAND_TIMEOUT_S)
        return subprocess.CompletedProcess(
            command, process.exitcode, Path(stdout).read_text(errors="replace"), Path(stderr).read_text(errors="replace")
        )


def train_refiner_alone(bundle: str, trained_model: Path, output: Path, **overrides) -> None:
    """``--trainable refiner`` on the weights of ``trained_model`` with its refiner dropped (a network trained
    without one): trains ``bundle``'s ``train.yaml`` into ``output`` and checks that only the refiner's weights are
    new, that the others stay as loaded and that the refiner learned from its start, the identity (its last conv,
    started at zero, is not)."""
    start = {
        key: value
        for key, value in torch.load(trained_model, weights_only=True).items()
        if not key.startswith("refiner.")
    }
    start_path = output.parent / f"{output.name}_start.pt"
    torch.save(start, start_path)
    checked(
        run_bundle(
            bundle, "training", ["train.yaml"], output_dir=str(output), warm_start_from=str(start_path),
            trainable="refiner", **overrides,
        )
    )  # fmt: skip
    refined = torch.load(output / "model.pt", weights_only=True)
    assert {key.split(".")[0] for key in set(refined) - set(start)} == {"refiner"}
    for key, value in start.items():  # the moving average of unchanged weights: equal up to its rounding
        torch.testing.assert_close(refined[key], value, rtol=1e-6, atol=1e-7)
    last = max((key for key in refined if key.startswith("refiner.") and key.endswith(".weight")),
               key=lambda key: int(key.split(".")[2]))  # fmt: skip
    assert refined[last].abs().sum() > 0  # the last conv started at zero


def absolute_item(item: dict, dataset: Path) -> dict:
    """A datalist item of ``dataset`` with its file paths made absolute (``subject`` is a name, not a file)."""
    return {key: value if key == "subject" else str(dataset / value) for key, value in item.items()}


def write_datalist_of_test_items(dataset: Path, path: Path) -> Path:
    """``path``, written with the "test" list of ``dataset``'s datalist alone, paths made absolute."""
    items = json.loads((dataset / "datalist.json").read_text())["test"]
    path.write_text(json.dumps({"test": [absolute_item(item, dataset) for item in items]}))
    return path


def evaluation_results(
    bundle: str, dataset: Path, output_dir: Path, fresh_interpreter: bool = False, **overrides
) -> tuple[list[dict], dict]:
    """Run the bundle's ``evaluating`` workflow, train.yaml + evaluate.yaml as the model zoo runs it, on the "test"
    list of ``dataset`` given in a datalist that holds nothing else, into ``output_dir`` (``run_bundle``'s
    ``fresh_interpreter``); its ``metrics.csv`` rows and its ``metrics_summary.json``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    datalist = write_datalist_of_test_items(dataset, output_dir / "test_only_datalist.json")
    checked(
        run_bundle(
            bundle, "evaluating", ["train.yaml", "evaluate.yaml"], fresh_interpreter=fresh_interpreter,
            dataset_dir=str(dataset), datalist=str(datalist), output_dir=str(output_dir), **overrides,
        )
    )  # fmt: skip
    with (output_dir / "metrics.csv").open() as table:
        rows = list(csv.DictReader(table))
    return rows, json.loads((output_dir / "metrics_summary.json").read_text())


def inference_output(bundle: str, item: dict, directory: Path) -> Path:
    """The volume the bundle's own ``inferring`` workflow writes for one datalist item (absolute paths), run in
    ``directory``, which must exist and holds the datalist and the output."""
    (directory / "datalist.json").write_text(json.dumps({"test": [item]}))
    output = directory / "out"
    overrides = {"dataset_dir": str(directory), "datalist": str(directory / "datalist.json"), "output_dir": str(output)}
    checked(run_bundle(bundle, "inferring", ["inference.yaml"], **overrides))
    (written,) = output.glob("*_7t.nii.gz")
    return written
