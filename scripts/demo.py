"""`make demo`: synthesize 7T from the shipped sample 3T volume with each bundle's shipped weights.

    python scripts/demo.py [--output_dir demo_output] [--bundles "[watnet]"]

For every bundle it runs the bundle's own inference workflow (`python -m monai.bundle run inferring`, in-process)
on the sample of `samples/`, writes the synthetic 7T NIfTI and a PNG figure (axial, coronal, sagittal:
3T input | synthetic 7T | real 7T | error map) under `<output_dir>/<bundle>/`, and prints where they are with the
PSNR and SSIM of the input (identity baseline) and of the output against the real 7T. A bundle joins the demo by
adding a `Demo` to `DEMOS`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle

from synth7t.figures import comparison_figure
from synth7t.metrics import volume_metrics
from synth7t.transforms import PercentileScaleIntensity

REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLES = REPOSITORY / "samples"


@dataclass(frozen=True)
class Demo:
    """One bundle's demo: the datalist item it infers on, and the real 7T it is compared with."""

    bundle: str
    item: dict[str, str]
    target: str
    input_key: str = "image"
    mask_key: str = "mask"


DEMOS = (
    Demo(
        bundle="watnet",
        item={"image": "mni152_t1w_3t.nii.gz", "mask": "mni152_brain_mask.nii.gz"},
        target="mni152_t1w_7t.nii.gz",
    ),
    Demo(
        bundle="gan_unet_t1w7t",
        item={"image": "mni152_t1w_3t.nii.gz", "mask": "mni152_brain_mask.nii.gz"},
        target="mni152_t1w_7t.nii.gz",
    ),
)


def _load_ras(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(), dtype=np.float32)


def run_demo(demo: Demo, output_root: Path) -> dict[str, dict[str, float]]:
    """Run one bundle's inference on its sample, write the figure, return the metrics of input and output."""
    bundle_dir = REPOSITORY / "bundles" / demo.bundle
    config = bundle_dir / "configs" / "inference.yaml"
    output_dir = output_root / demo.bundle
    output_dir.mkdir(parents=True, exist_ok=True)
    datalist = output_dir / "datalist.json"
    datalist.write_text(json.dumps({"test": [demo.item]}, indent=2) + "\n")
    run_bundle("inferring", config_file=str(config), dataset_dir=str(SAMPLES), datalist=str(datalist), output_dir=str(output_dir))

    input_name = demo.item[demo.input_key].removesuffix(".nii.gz")
    prediction_path = output_dir / f"{input_name}_7t.nii.gz"
    parser = ConfigParser()
    parser.read_config(str(config))
    scale = PercentileScaleIntensity(parser["lower_percentile"], parser["upper_percentile"])
    mask = _load_ras(SAMPLES / demo.item[demo.mask_key]) > 0
    image = np.asarray(scale(_load_ras(SAMPLES / demo.item[demo.input_key])[None], mask[None])[0])
    target = np.asarray(scale(_load_ras(SAMPLES / demo.target)[None], mask[None])[0])
    prediction = _load_ras(prediction_path)

    metrics = {"3T input": volume_metrics(image, target, mask), "synthetic 7T": volume_metrics(prediction, target, mask)}
    figure = comparison_figure(
        image, prediction, target, mask, output_dir / f"{input_name}_7t.png", title=f"{demo.bundle}: {input_name}"
    )
    print(f"\n{demo.bundle}: synthetic 7T {prediction_path}\n{demo.bundle}: figure       {figure}")
    print(f"{'against the real 7T':<22}{'PSNR':>8}{'SSIM':>8}{'PSNR brain':>12}{'SSIM brain':>12}")
    for name, values in metrics.items():
        print(
            f"{name:<22}{values['psnr']:>8.2f}{values['ssim']:>8.4f}{values['psnr_brain']:>12.2f}"
            f"{values['ssim_brain']:>12.4f}"
        )
    return metrics


def main(output_dir: str = "demo_output", bundles: Sequence[str] | None = None) -> None:
    """Run the demo of every bundle (or of ``bundles``) into ``output_dir``."""
    selected = [demo for demo in DEMOS if bundles is None or demo.bundle in bundles]
    for demo in selected:
        run_demo(demo, Path(output_dir).resolve())


if __name__ == "__main__":
    fire.Fire(main)
