"""`make demo`: synthesize 7T from the shipped sample 3T volume with each bundle's shipped weights.

    python scripts/demo.py [--output_dir demo_output] [--bundles "[watnet]"]

For every T1w bundle it runs the bundle's own inference workflow (`python -m monai.bundle run inferring`,
in-process) on the sample of `samples/`, writes the synthetic 7T NIfTI and a PNG figure (axial, coronal, sagittal:
3T input | synthetic 7T | real 7T | input error | output error, both errors on one colour scale) under `<output_dir>/<bundle>/`, and prints where they are with the
PSNR and SSIM of the input (identity baseline), of the input under the best Gaussian filter of a small grid (the
Gaussian baseline) and of the output against the real 7T. A T1w bundle joins the demo by
adding a `Demo` to `DEMOS`.

`vct_adc7t` needs a diffusion series: its demo first simulates one from the sample's 7T volume, as
`scripts/prepare_diffusion_data.py` does for the training data (3T T1w and DWI at 1.25 mm, 7T ADC target at
1.05 mm), then runs the bundle's inference on the raw DWI and its evaluation (model and 3T ADC baseline).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle
from nibabel.processing import resample_from_to

from synth7t.diffusion_phantom import simulate_subject
from synth7t.figures import comparison_figure
from synth7t.handlers import gaussian_baseline
from synth7t.metrics import volume_metrics
from synth7t.transforms import PercentileScaleIntensity, fit_adc, read_fsl_bvals, read_fsl_bvecs

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


def _print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    print(f"{'against the real 7T':<22}{'PSNR':>8}{'SSIM':>8}{'PSNR brain':>12}{'SSIM brain':>12}")
    for name, values in metrics.items():
        print(
            f"{name:<22}{values['psnr']:>8.2f}{values['ssim']:>8.4f}{values['psnr_brain']:>12.2f}"
            f"{values['ssim_brain']:>12.4f}"
        )


def run_demo(demo: Demo, output_root: Path) -> dict[str, dict[str, float]]:
    """Run one bundle's inference on its sample, write the figure, return the metrics of input and output."""
    bundle_dir = REPOSITORY / "bundles" / demo.bundle
    config = bundle_dir / "configs" / "inference.yaml"
    output_dir = output_root / demo.bundle
    output_dir.mkdir(parents=True, exist_ok=True)
    datalist = output_dir / "datalist.json"
    datalist.write_text(json.dumps({"test": [demo.item]}, indent=2) + "\n")
    run_bundle(
        "inferring",
        config_file=str(config),
        dataset_dir=str(SAMPLES),
        datalist=str(datalist),
        output_dir=str(output_dir),
        overwrite=True,  # the demo's own folder: a rerun replaces its results
    )

    input_name = demo.item[demo.input_key].removesuffix(".nii.gz")
    prediction_path = output_dir / f"{input_name}_7t.nii.gz"
    parser = ConfigParser()
    parser.read_config(str(config))
    scale = PercentileScaleIntensity(parser["lower_percentile"], parser["upper_percentile"])
    mask = _load_ras(SAMPLES / demo.item[demo.mask_key]) > 0
    image = np.asarray(scale(_load_ras(SAMPLES / demo.item[demo.input_key])[None], mask[None])[0])
    target = np.asarray(scale(_load_ras(SAMPLES / demo.target)[None], mask[None])[0])
    prediction = _load_ras(prediction_path)

    sigma, smoothed = gaussian_baseline(*(torch.as_tensor(a, dtype=torch.float32)[None] for a in (image, target, mask)))
    metrics = {
        "3T input": volume_metrics(image, target, mask),
        f"3T Gaussian σ {sigma}": volume_metrics(smoothed[0].numpy(), target, mask),
        "synthetic 7T": volume_metrics(prediction, target, mask),
    }
    figure = comparison_figure(
        image, prediction, target, mask, output_dir / f"{input_name}_7t.png", title=f"{demo.bundle}: {input_name}"
    )
    print(f"\n{demo.bundle}: synthetic 7T {prediction_path}\n{demo.bundle}: figure       {figure}")
    _print_metrics(metrics)
    return metrics


def run_vct_demo(output_root: Path) -> dict[str, dict[str, float]]:
    """Simulate a diffusion subject from the sample's 7T volume, infer its 7T ADC map from the raw 3T DWI with
    vct_adc7t, and score it (and the 3T ADC baseline) with the bundle's evaluation workflow."""
    bundle, configs = "vct_adc7t", REPOSITORY / "bundles" / "vct_adc7t" / "configs"
    output_dir = output_root / bundle
    sample_dir = output_dir / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    anatomy = nib.load(SAMPLES / "mni152_t1w_7t.nii.gz")
    item = simulate_subject(np.asarray(anatomy.dataobj, np.float32), anatomy.affine, sample_dir, "mni152", seed=2009)
    inputs = {key: item[key] for key in ("t1w", "dwi", "bval", "bvec", "mask")}
    runs = {  # the evaluation is train.yaml with the evaluate.yaml overlay, as the MONAI model zoo runs it
        "inferring": (["inference.yaml"], inputs, output_dir),
        "evaluating": (["train.yaml", "evaluate.yaml"], item, sample_dir),
    }
    for run_id, (config_names, datalist_item, out) in runs.items():
        datalist = out / f"datalist_{run_id}.json"
        datalist.write_text(json.dumps({"test": [datalist_item]}, indent=2) + "\n")
        run_bundle(
            run_id, config_file=[str(configs / name) for name in config_names], dataset_dir=str(sample_dir),
            datalist=str(datalist), output_dir=str(out), overwrite=True,
        )  # fmt: skip

    prediction_path = output_dir / item["t1w"].replace(".nii.gz", "_7t.nii.gz")
    target_image = nib.as_closest_canonical(nib.load(sample_dir / item["label"]))
    mask = _load_ras(sample_dir / item["mask"]) > 0
    dwi = nib.load(sample_dir / item["dwi"])
    adc_3t = fit_adc(
        np.moveaxis(np.asarray(dwi.dataobj, np.float32), -1, 0),
        read_fsl_bvals(sample_dir / item["bval"]),
        bvecs=read_fsl_bvecs(sample_dir / item["bvec"]),
    )
    on_target = {
        name: np.asarray(resample_from_to(image, target_image, order=1).get_fdata(), np.float32)
        for name, image in (("3T", nib.Nifti1Image(adc_3t.numpy(), dwi.affine)), ("pred", nib.load(prediction_path)))
    }
    scale = PercentileScaleIntensity(0.0, 99.0)
    adc_3t, target = (
        np.asarray(scale((volume * mask)[None], mask[None])[0])
        for volume in (on_target["3T"], np.asarray(target_image.get_fdata(), np.float32))
    )
    figure = comparison_figure(
        adc_3t, on_target["pred"], target, mask, output_dir / "mni152_adc_7t.png", title=f"{bundle}: mni152"
    )
    with (sample_dir / "metrics.csv").open() as table:
        row = {k: float(v) for k, v in next(csv.DictReader(table)).items() if k != "subject"}
    metrics = {
        "3T ADC (resampled)": {k.removeprefix("identity_"): v for k, v in row.items() if k.startswith("identity_")},
        f"3T ADC Gaussian σ {row['gaussian_sigma']:g}": {
            k.removeprefix("gaussian_"): v for k, v in row.items() if k.startswith("gaussian_")
        },
        "synthetic 7T ADC": {k: v for k, v in row.items() if not k.startswith(("identity_", "gaussian_"))},
    }
    print(f"\n{bundle}: synthetic 7T ADC {prediction_path}\n{bundle}: figure           {figure}")
    _print_metrics(metrics)
    return metrics


def main(output_dir: str = "demo_output", bundles: Sequence[str] | None = None) -> None:
    """Run the demo of every bundle (or of ``bundles``) into ``output_dir``."""
    selected = [demo for demo in DEMOS if bundles is None or demo.bundle in bundles]
    for demo in selected:
        run_demo(demo, Path(output_dir).resolve())
    if bundles is None or "vct_adc7t" in bundles:
        run_vct_demo(Path(output_dir).resolve())


if __name__ == "__main__":
    fire.Fire(main)
