"""Copy measured evaluation figures into a bundle's `metadata.json` `eval_metrics`, model and identity side by side.

    python scripts/fill_eval_metrics.py --bundle watnet --validation runs/eval_validation --test runs/eval_test

Each folder is the output of the bundle's evaluation, train.yaml + evaluate.yaml (`metrics_summary.json`); the means
of the main columns are written as `val_<name>`, `val_identity_<name>`, `test_<name>`, ... with the number of
subjects. `--columns` picks other columns of the summary (vct_adc7t adds "mse", the paper's first metric).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

REPOSITORY = Path(__file__).resolve().parent.parent
COLUMNS = ("psnr", "ssim", "ssim3d", "mae", "psnr_brain", "ssim_brain")


def main(
    bundle: str, validation: str | None = None, test: str | None = None, columns: tuple[str, ...] = COLUMNS
) -> dict[str, float]:
    metadata_path = REPOSITORY / "bundles" / bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metrics: dict[str, float] = {}
    for prefix, folder in (("val", validation), ("test", test)):
        if folder is None:
            continue
        summary = json.loads((Path(folder) / "metrics_summary.json").read_text())
        for name in columns:
            metrics[f"{prefix}_{name}"] = round(summary[name]["mean"], 4)
            metrics[f"{prefix}_identity_{name}"] = round(summary[f"identity_{name}"]["mean"], 4)
        metrics[f"{prefix}_subjects"] = summary["psnr"]["n"]
    metadata["eval_metrics"] = metrics
    metadata_path.write_text(json.dumps(metadata, indent=4) + "\n")
    return metrics


if __name__ == "__main__":
    fire.Fire(main)
