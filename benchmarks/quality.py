"""Quality of the shipped weights on held-out subjects, and the figures.

- Each T1w bundle's evaluation (``train.yaml`` + ``evaluate.yaml``) on the ``test`` subjects of the TELL data
  prepared under both degradation recipes (README "Preparing training data": ``realistic`` and ``seed001``; the same
  held-out subjects, sub-TELL0106 and sub-TELL0107, never seen in training), next to the identity baseline (the 3T
  input scored as the prediction), the Gaussian baseline (the 3T input filtered with the per-subject best sigma of
  ``synth7t.handlers.GAUSSIAN_SIGMAS``, an upper bound for any fixed blur) and, for the seed-001 recipe, next to the seed's Table 1 (spec ``watnet.md`` §6.1:
  10-fold leave-one-out means over ten subjects of which seven are public, so a reference, not a like-for-like
  comparison).
- A figure per bundle: ``scripts/demo.py`` on the shipped sample (input, prediction, real 7T and error on the same
  axial, coronal and sagittal sections).

The evaluations run the bundles' default configs, as the model cards' commands do. Missing prepared data are
prepared first from the 7T volumes in ``$SYNTH7T_TELL7T`` (default ``../shared/data/tell7t`` beside the repository).
This part still runs whole volumes (about 9 minutes here, most of it WATNet), so :func:`run` reuses an earlier
result whose inputs (weights and data, by SHA-256) are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.measure import REPOSITORY

T1W_BUNDLES = ("watnet", "gan_unet_t1w7t")
ALL_BUNDLES = (*T1W_BUNDLES, "vct_adc7t")
TELL7T = Path(os.environ.get("SYNTH7T_TELL7T", REPOSITORY.parent / "shared" / "data" / "tell7t"))
RECIPES = {  # the README's preparation commands
    "realistic": [],
    "seed001": ["--recipe", "seed001", "--quantize_8bit", "True", "--leave_one_out", "True"],
}
EVALUATION_CONFIGS = ("train.yaml", "evaluate.yaml")  # merged in this order
COLUMNS = ("psnr", "ssim", "mae", "psnr_brain", "ssim_brain")
SEED_TABLE_1 = {  # spec watnet.md §6.1, full precision (mean, std)
    "identity": {"mae": (0.012005, 0.004080), "psnr": (28.7586, 2.8865), "ssim": (0.94902, 0.01728)},
    "basic_cnn": {"mae": (0.013583, 0.004005), "psnr": (28.0283, 2.0203), "ssim": (0.95267, 0.01632)},
    "watnet": {"mae": (0.011912, 0.004119), "psnr": (28.8904, 2.8821), "ssim": (0.94868, 0.01783)},
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepared_data(folder: str, script: str, options: Sequence[str] = ()) -> Path:
    """``data/<folder>``, written first by ``script`` (with ``options``) from the TELL7T volumes if it holds no
    datalist (README "Preparing training data")."""
    directory = REPOSITORY / "data" / folder
    if not (directory / "datalist.json").is_file():
        command = [sys.executable, script, "--input_dir", str(TELL7T), "--output_dir", str(directory), *options]
        subprocess.run(command, cwd=REPOSITORY, check=True)
    return directory


def dataset(recipe: str) -> Path:
    """The prepared data of ``recipe`` under ``data/``, prepared first if missing."""
    return prepared_data(f"tell7t_{recipe}", "scripts/prepare_data.py", RECIPES[recipe])


def inputs_fingerprint() -> dict[str, str]:
    """What the quality figures depend on: the evaluation configs, and by SHA-256 every bundle's weights and the
    held-out volumes (the preparation is seeded and writes deterministic gzip, so a fresh preparation matches)."""
    weights = [f"{bundle}/models/{name}" for bundle in ALL_BUNDLES for name in ("model.pt", "model.onnx")]
    prints = {"evaluation": " + ".join(EVALUATION_CONFIGS)}
    prints |= {path: _sha256(REPOSITORY / "bundles" / path) for path in weights}
    for recipe in RECIPES:
        directory = dataset(recipe)
        test_items = json.loads((directory / "datalist.json").read_text())["test"]
        files = sorted({item[key] for item in test_items for key in ("image", "label", "mask") if key in item})
        prints |= {f"data/tell7t_{recipe}/{name}": _sha256(directory / name) for name in files}
    return prints


def _bundle_run(run_id: str, configs: list[Path], **overrides: str) -> None:
    config_files = str([str(config) for config in configs])
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_files]
    command += [arg for key, value in overrides.items() for arg in (f"--{key}", value)]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def evaluate(bundle: str, recipe: str, work: Path) -> dict[str, Any]:
    """The bundle's evaluation on the recipe's test subjects: mean and std of each column, model and baselines."""
    output = work / f"{bundle}_{recipe}"
    configs = [REPOSITORY / "bundles" / bundle / "configs" / name for name in EVALUATION_CONFIGS]
    _bundle_run("evaluating", configs, dataset_dir=str(dataset(recipe)), output_dir=str(output), overwrite="True")
    return summarise(output)


def summarise(output: Path) -> dict[str, Any]:
    """Mean and std of each column, model and baselines, from an evaluation's ``metrics_summary.json``."""
    summary = json.loads((output / "metrics_summary.json").read_text())
    columns = {
        name: {c: (round(summary[f"{prefix}{c}"]["mean"], 4), round(summary[f"{prefix}{c}"]["std"], 4)) for c in COLUMNS}
        for name, prefix in (("model", ""), ("identity", "identity_"), ("gaussian", "gaussian_"))
    }
    return {"subjects": summary["psnr"]["n"], **columns}


def figures(work: Path, destination: Path) -> dict[str, str]:
    """``scripts/demo.py`` for every bundle; its PNGs copied to ``destination/<bundle>_sample.png``, returned as paths
    relative to ``destination``'s parent (the report's folder)."""
    demo = work / "demo"
    subprocess.run([sys.executable, "scripts/demo.py", "--output_dir", str(demo)], cwd=REPOSITORY, check=True)
    destination.mkdir(parents=True, exist_ok=True)
    written = {}
    for bundle in ALL_BUNDLES:
        (png,) = sorted((demo / bundle).glob("*.png"))
        written[bundle] = str(
            Path(shutil.copy(png, destination / f"{bundle}_sample.png")).relative_to(destination.parent)
        )
    return written


def run(work: Path, figure_dir: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quality figures and sample figures; ``previous`` (an earlier result) is returned as is when its inputs are
    the current ones and its figures exist."""
    fingerprint = inputs_fingerprint()
    unchanged = previous is not None and previous.get("inputs") == fingerprint
    if unchanged and all((figure_dir.parent / path).is_file() for path in previous["figures"].values()):
        return {**previous, "reused": True}
    evaluations = {f"{b}/{r}": evaluate(b, r, work) for b in T1W_BUNDLES for r in RECIPES}
    return {"inputs": fingerprint, "evaluations": evaluations, "figures": figures(work, figure_dir), "reused": False}


def _cell(pair: tuple[float, float], digits: int) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """PSNR / SSIM / MAE (mean ± std over the held-out subjects) of model / identity / Gaussian, whether the model
    beats both baselines on all three, then the seed's Table 1."""
    rows = [
        "| bundle | recipe | n | PSNR model / identity / Gaussian | SSIM model / identity / Gaussian | "
        "MAE model / identity / Gaussian | beats both baselines |",
        "| --- | --- | ---: | --- | --- | --- | --- |",
    ]
    names = ("model", "identity", "gaussian")
    for key, e in result["evaluations"].items():
        bundle, recipe = key.split("/")
        cells = {c: " / ".join(_cell(e[n][c], 2 if c == "psnr" else 4) for n in names) for c in ("psnr", "ssim", "mae")}
        beats = all(e["model"][c][0] > max(e["identity"][c][0], e["gaussian"][c][0]) for c in ("psnr", "ssim")) and (
            e["model"]["mae"][0] < min(e["identity"]["mae"][0], e["gaussian"]["mae"][0])
        )
        rows.append(
            f"| {bundle} | {recipe} | {e['subjects']} | {cells['psnr']} | {cells['ssim']} | {cells['mae']} | "
            f"{'yes' if beats else '**no**'} |"
        )
    for name, values in SEED_TABLE_1.items():
        label = {"identity": "identity (worst case)", "basic_cnn": "BasicCNN", "watnet": "WATNet"}[name]
        rows.append(
            f"| seed 001 Table 1: {label} | seed001 | 10 (LOO) | {_cell(values['psnr'], 2)} | "
            f"{_cell(values['ssim'], 4)} | {_cell(values['mae'], 4)} | |"
        )
    return "\n".join(rows)
