"""What the model zoo style unit tests (tests/zoo/test_<bundle>.py) and the `check_properties` step of
scripts/zoo_check.py share, as the MONAI model zoo's ci/unit_tests/utils.py does for its tests: fake datasets, the
bundle workflow built as the zoo builds it, and the zoo's initialize / check_properties / run / finalize sequence.

`make zoo-check` copies this folder to <work_dir>/unit_tests/ and runs it from <work_dir>, against the unpacked release
archives in <work_dir>/models/, in an environment that holds only the packages of the bundles' metadata: nothing here
may import the repository (its tests or its synth7t); the bundles' configs import the copy of synth7t vendored in
each bundle folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

SPLITS = {"training": (1, 2), "validation": (3,), "test": (4,)}  # subject numbers of each datalist list
T1W_SHAPE = (68, 66, 12)  # in-plane at least watnet's default 64 x 64 training patch, not a multiple of 8 or 16
T1W_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-like axes: the workflows reorient to RAS and back
ADC_SHAPE = (34, 30, 14)
ADC_AFFINE = np.diag([-1.05, -1.05, 1.05, 1.0])  # vct_adc7t's 7T grid: inference resamples its inputs to 1.05 mm


def brain(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like float32 volume in [0, 1] (an ellipsoid with smooth texture and a darker core, zero outside) and
    its uint8 mask: enough structure for the brain-percentile scaling, mask-centred sampling and the metrics."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.85, 0.8, 0.9])[:, None, None, None]) ** 2).sum(0))
    mask = radius < 1
    texture = sum(np.sin(f * grid[axis] + rng.uniform(0, 2 * np.pi)) for axis, f in enumerate(rng.uniform(3, 9, 3)))
    values = 0.6 + 0.1 * texture - 0.3 * (radius < 0.3)
    return np.where(mask, values, 0).astype(np.float32), mask.astype(np.uint8)


def degraded(volume: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """``volume`` blurred in-plane, with noise of 2 % of its maximum and zero outside ``mask``: a stand-in for the 3T
    image of a 7T one."""
    blurred = sum(np.roll(volume, shift, axis) for shift in (-1, 1) for axis in (0, 1)) / 4
    noisy = 0.9 * blurred + np.random.default_rng(seed).normal(0, 0.02 * float(volume.max()), volume.shape)
    return np.where(mask > 0, np.clip(noisy, 0, None), 0).astype(np.float32)


def write_datalist(directory: str, items: dict[int, dict[str, str]]) -> None:
    """``directory``/datalist.json, the bundles' default datalist under ``dataset_dir``, items split by SPLITS."""
    datalist = {name: [items[subject] for subject in subjects] for name, subjects in SPLITS.items()}
    with open(os.path.join(directory, "datalist.json"), "w") as stream:
        json.dump(datalist, stream, indent=2)


def write_volumes(directory: str, subject: int, volumes: dict[str, np.ndarray], affine: np.ndarray) -> dict[str, str]:
    """One NIfTI per datalist key, ``sub-<subject>_<key>.nii.gz``; returns the datalist item (relative names)."""
    item = {}
    for key, volume in volumes.items():
        item[key] = f"sub-{subject}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), os.path.join(directory, item[key]))
    return item


def write_t1w_dataset(directory: str) -> None:
    """3T/7T T1w pairs with brain masks (`image`, `label`, `mask`), the items of watnet and gan_unet_t1w7t."""
    items = {}
    for subject in sorted(s for subjects in SPLITS.values() for s in subjects):
        label, mask = brain(T1W_SHAPE, subject)
        volumes = {"image": degraded(label, mask, subject), "label": label, "mask": mask}
        items[subject] = write_volumes(directory, subject, volumes, T1W_AFFINE)
    write_datalist(directory, items)


def write_adc_dataset(directory: str) -> None:
    """3T T1w, 3T ADC map, 7T ADC map and brain mask on one 1.05 mm grid (`t1w`, `adc`, `label`, `mask`), the items
    of vct_adc7t; ADC values in mm^2/s, higher in the core (the "ventricles") as in cerebrospinal fluid."""
    items = {}
    for subject in sorted(s for subjects in SPLITS.values() for s in subjects):
        t1w, mask = brain(ADC_SHAPE, subject)
        adc_7t = np.where(mask > 0, 0.7e-3 + 2.0e-3 * (1 - t1w), 0).astype(np.float32)
        volumes = {"t1w": degraded(t1w, mask, subject), "adc": degraded(adc_7t, mask, subject + 100)}
        volumes |= {"label": adc_7t, "mask": mask}
        items[subject] = write_volumes(directory, subject, volumes, ADC_AFFINE)
    write_datalist(directory, items)


FAKE_DATASETS: dict[str, Callable[[str], None]] = {
    "watnet": write_t1w_dataset,
    "gan_unet_t1w7t": write_t1w_dataset,
    "vct_adc7t": write_adc_dataset,
}
# the datalist key whose file name names each inference output (<name>_7t.nii.gz)
INPUT_KEYS = {"watnet": "image", "gan_unet_t1w7t": "image", "vct_adc7t": "t1w"}


def workflow(bundle_root: str, workflow_type: str, configs: Sequence[str], **override: object) -> ConfigWorkflow:
    """``ConfigWorkflow`` of the bundle's ``configs`` (names in its configs/ folder, merged in order) with its metadata
    and logging.conf, as the zoo's tests build it. The bundle folder goes first on ``sys.path`` (the zoo's tests do
    the same for bundles with code): the configs `$import synth7t`, which MONAI evaluates when it parses them,
    before ``ConfigWorkflow.run`` would add the folder itself."""
    root = os.path.abspath(bundle_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    config_dir = os.path.join(root, "configs")
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[os.path.join(config_dir, name) for name in configs],
        meta_file=os.path.join(config_dir, "metadata.json"),
        logging_file=os.path.join(config_dir, "logging.conf"),
        bundle_root=root,
        **override,
    )


def check_workflow(flow: ConfigWorkflow) -> None:
    """The zoo's sequence: initialize, no missing or wrongly referenced property, run, finalize."""
    flow.initialize()
    missing = flow.check_properties()
    if missing:
        raise ValueError(f"check_properties: missing or wrongly referenced properties {missing}")
    flow.run()
    flow.finalize()


class BundleWorkflowTests:
    """The zoo's unit test of one bundle (its ci/unit_tests/test_<bundle>.py): on a fake dataset, train for one tiny
    epoch, evaluate the checkpoint that training wrote (evaluate.yaml merged after train.yaml, workflow type "train"
    as in the zoo's tests), and infer with the shipped weights (inference.yaml alone, the default network).

    A mixin, not a ``unittest.TestCase``, so that test runners collect only the subclasses, one per bundle, each a
    ``unittest.TestCase`` that sets ``bundle`` and the tiny settings."""

    bundle: str
    tiny_network: dict  # the network at toy size (train and evaluate: the checkpoint must fit it)
    tiny_training: dict  # one short epoch with validation

    def setUp(self) -> None:
        self.bundle_root = os.path.join("models", self.bundle)  # the zoo's layout, run from its root
        self.dataset_dir = tempfile.mkdtemp()
        FAKE_DATASETS[self.bundle](self.dataset_dir)
        with open(os.path.join(self.dataset_dir, "datalist.json")) as stream:
            self.datalist = json.load(stream)

    def tearDown(self) -> None:
        shutil.rmtree(self.dataset_dir)

    def test_train_eval_config(self) -> None:
        train_dir = os.path.join(self.dataset_dir, "train")
        override = {"dataset_dir": self.dataset_dir, "num_workers": 0, **self.tiny_network}
        check_workflow(
            workflow(self.bundle_root, "train", ["train.yaml"], output_dir=train_dir, **override, **self.tiny_training)
        )
        checkpoint = os.path.join(train_dir, "model.pt")
        self.assertTrue(os.path.isfile(checkpoint), f"training wrote no {checkpoint}")

        eval_dir = os.path.join(self.dataset_dir, "evaluate")
        configs = ["train.yaml", "evaluate.yaml"]
        check_workflow(
            workflow(self.bundle_root, "train", configs, output_dir=eval_dir, ckpt_path=checkpoint, **override)
        )
        with open(os.path.join(eval_dir, "metrics.csv")) as stream:
            rows = list(csv.DictReader(stream))
        self.assertEqual(len(rows), len(self.datalist["test"]))
        self.assertTrue(all(np.isfinite(float(row["psnr"])) for row in rows), rows)
        self.assertTrue(os.path.isfile(os.path.join(eval_dir, "metrics_summary.json")))

    def test_infer_config(self) -> None:
        output_dir = os.path.join(self.dataset_dir, "inference")
        override = {"dataset_dir": self.dataset_dir, "output_dir": output_dir, "num_workers": 0}
        check_workflow(workflow(self.bundle_root, "infer", ["inference.yaml"], **override))
        for item in self.datalist["test"]:
            name = item[INPUT_KEYS[self.bundle]]
            source = nib.load(os.path.join(self.dataset_dir, name))
            written = nib.load(os.path.join(output_dir, name.replace(".nii.gz", "_7t.nii.gz")))
            self.assertEqual(written.shape, source.shape)
            np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
            values = np.asarray(written.dataobj)
            self.assertTrue(np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1)
