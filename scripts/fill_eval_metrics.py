"""Copy measured evaluation figures into a bundle's `metadata.json` `eval_metrics`, model and baselines side by side.

    python scripts/fill_eval_metrics.py --bundle vct_adc7t --validation runs/eval_validation --test runs/eval_test
    python scripts/fill_eval_metrics.py --bundle watnet \
        --folders "{'test_realistic': 'runs/eval_realistic', 'test_seed001': 'runs/eval_seed001'}"

Each folder is the output of the bundle's evaluation, train.yaml + evaluate.yaml (`metrics_summary.json`); the means
of the main columns are written as `<prefix>_<name>`, `<prefix>_identity_<name>` and, where the evaluation has the
Gaussian baseline, `<prefix>_gaussian_<name>`, with the number of subjects; the prefix is `val` and `test` for
`--validation` and `--test`, the key for `--folders` (one prefix per degradation recipe). `--columns` picks other
columns of the summary (vct_adc7t adds "mse", the paper's first metric).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

REPOSITORY = Path(__file__).resolve().parent.parent
COLUMNS = ("psnr", "ssim", "ssim3d", "mae", "psnr_brain", "ssim_brain")


def main(
    bundle: str,
    validation: str | None = None,
    test: str | None = None,
    columns: tuple[str, ...] = COLUMNS,
    folders: dict[str, str] | None = None,
) -> dict[str, float]:
    metadata_path = REPOSITORY / "bundles" / bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metrics: dict[str, float] = {}
    evaluations = {"val": validation, "test": test, **(folders or {})}
    for prefix, folder in evaluations.items():
        if folder is None:
            continue
        summary = json.loads((Path(folder) / "metrics_summary.json").read_text())
        for name in columns:
            for baseline in ("", "identity_", "gaussian_"):
                if f"{baseline}{name}" in summary:
                    metrics[f"{prefix}_{baseline}{name}"] = round(summary[f"{baseline}{name}"]["mean"], 4)
        metrics[f"{prefix}_subjects"] = summary["psnr"]["n"]
    metadata["eval_metrics"] = metrics
    metadata_path.write_text(json.dumps(metadata, indent=4) + "\n")
    return metrics


if __name__ == "__main__":
    fire.Fire(main)
