"""Reproduce Table 1 of the seed-001 report: leave-one-out WATNet and BasicCNN against the identity baseline.

    python scripts/prepare_data.py --input_dir ../shared/data/tell7t --output_dir data/tell7t_seed001 \
        --recipe seed001 --quantize_8bit True --leave_one_out True
    python scripts/reproduce_seed001.py --data_dir data/tell7t_seed001 --output_dir runs/seed001

For every `datalist_fold<subject>.json` it trains each model with the seed's protocol (train.yaml + seed.yaml
[+ basic_cnn.yaml]), evaluates the weights of the last epoch on the held-out subject (train.yaml, the same
overlays, evaluate.yaml), and prints mean ± population std over the folds of MAE, PSNR and 2-D per-slice SSIM, as the
seed's Table 1 does. `--bf16 True` runs the networks under bfloat16 autocast on a CPU (the seed used float16 mixed
precision on a GPU). Outputs: `<output_dir>/<subject>/<model>/` per fold and model, and `<output_dir>/table.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
from monai.bundle import run as run_bundle

CONFIGS = Path(__file__).resolve().parent.parent / "bundles" / "watnet" / "configs"
MODELS = {"watnet": ["seed.yaml"], "basic_cnn": ["seed.yaml", "basic_cnn.yaml"]}
COLUMNS = ("mae", "psnr", "ssim")


def _configs(*names: str) -> list[str]:
    return [str(CONFIGS / name) for name in names]


def run_fold(datalist: Path, data_dir: Path, output: Path, model: str, bf16: bool) -> dict[str, float]:
    """Train and evaluate one model on one fold; return its metrics.csv row (one held-out subject)."""
    overrides = {"dataset_dir": str(data_dir), "datalist": str(datalist)}
    if bf16:
        overrides["network"] = "$synth7t.engines.AutocastNetwork(@network_def.to(@device))"
    if not (output / "train" / "checkpoint_final.pt").is_file():
        run_bundle(  # a fold without its final checkpoint (an interrupted run) starts over
            "training", config_file=_configs("train.yaml", *MODELS[model]), output_dir=str(output / "train"),
            overwrite=True, **overrides,
        )  # fmt: skip
    run_bundle(
        "evaluating",
        config_file=_configs("train.yaml", *MODELS[model], "evaluate.yaml"),
        output_dir=str(output / "evaluate"),
        ckpt_path=str(output / "train" / "checkpoint_final.pt"),
        overwrite=True,
        **overrides,
    )
    lines = (output / "evaluate" / "metrics.csv").read_text().splitlines()
    header, values = lines[0].split(","), lines[1].split(",")
    return {name: float(value) for name, value in zip(header, values) if name != "subject"}


def main(data_dir: str = "data/tell7t_seed001", output_dir: str = "runs/seed001", bf16: bool = False) -> None:
    data, output = Path(data_dir), Path(output_dir)
    folds = sorted(data.glob("datalist_fold*.json"))
    if not folds:
        raise SystemExit(f"error: {data}: no datalist_fold*.json; prepare the data with --leave_one_out True.")
    rows: dict[str, list[dict[str, float]]] = {"identity": [], **{model: [] for model in MODELS}}
    for fold in folds:
        subject = fold.stem.removeprefix("datalist_fold")
        for model in MODELS:
            metrics = run_fold(fold, data, output / subject / model, model, bf16)
            rows[model].append({"subject": subject, **{c: metrics[c] for c in COLUMNS}})
        rows["identity"].append({"subject": subject, **{c: metrics[f"identity_{c}"] for c in COLUMNS}})
    table = {
        name: {c: {"mean": float(np.mean([r[c] for r in rs])), "std": float(np.std([r[c] for r in rs]))} for c in COLUMNS}
        for name, rs in rows.items()
    }
    (output / "table.json").write_text(json.dumps({"folds": rows, "table": table}, indent=2) + "\n")
    print(f"\n{len(folds)} leave-one-out folds, mean ± population std")
    print("| metric | identity (worst case) | BasicCNN | WATNet (seed) |\n| --- | --- | --- | --- |")
    for c in COLUMNS:
        cells = [f"{table[n][c]['mean']:.4f} ± {table[n][c]['std']:.4f}" for n in ("identity", "basic_cnn", "watnet")]
        print(f"| {c.upper()} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    fire.Fire(main)
