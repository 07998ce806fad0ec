"""MONAI Deploy application: a 3T T1w NIfTI volume in, the synthetic 7T T1w volume of a synth7t bundle out.

The SDK's ``MonaiBundleInferenceOperator`` runs the bundle's ``models/model.ts`` (exported by ``make export`` with
``metadata.json`` and the ``inference`` config embedded as ``extra/metadata.json`` and ``extra/inference.json``): it
takes the preprocessing, inferer and postprocessing from the embedded config, minus its ``LoadImaged`` and
``SaveImaged``, which the loader and writer operators below replace. The operator graph, as in the SDK's
``examples/apps/ai_spleen_seg_app``::

    NiftiLoaderOperator --image--> SynthesisBundleInferenceOperator --pred--> NiftiWriterOperator

Run it with the virtual environment of ``make monai-deploy-test`` (``.venv-monai-deploy``, monai-deploy-app-sdk and
holoscan installed; tested on CPU without a CUDA driver; the bundle config picks CUDA when torch sees a GPU)::

    .venv-monai-deploy/bin/python apps/monai_deploy/app.py -i <input> -o <output> [-m <bundle folder>]

``-i``: a NIfTI file, or a folder holding exactly one (``.nii``/``.nii.gz``); ``-o``: the output folder, created if
missing, that receives ``<input name>_7t.nii.gz``: float32 in [0, 1] on the input's grid and affine, zero outside
the brain mask, as ``python -m monai.bundle run inferring`` writes it; ``-m``: the bundle folder, default this
repository's ``bundles/watnet`` (``bundles/gan_unet_t1w7t`` works the same). ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` stand in for ``-i``, ``-o`` and ``-m``; ``-l DEBUG`` logs more.

The bundle configs import ``synth7t``: install this repository (``pip install -e .``), or point ``-m`` at a released
bundle (``make release``), whose vendored ``synth7t/`` the app puts on ``sys.path``.

Two things of the SDK operator (monai-deploy-app-sdk 4.0.0) do not fit a synthesis bundle, so this app subclasses it:
it passes every tensor left by the preprocessing besides the image (the brain ``mask``, gan_unet_t1w7t's empty
``context``) to the inferer as keywords, which forwards them to the network, while the exported networks take the
image alone; and it casts an ``image`` output to uint8 in DICOM (depth, height, width) order, fit for label maps,
whereas the 7T volume is float in [0, 1] and the writer here wants it on the input grid with its own affine.

``vct_adc7t`` is not supported: the operator makes one input port per network input of ``metadata.json`` (``image``,
the T1w and ADC channels concatenated inside the preprocessing) and hands it to the preprocessing under that key,
whereas that preprocessing reads two volumes, ``t1w`` and ``adc`` (each on its own grid), and builds ``image`` itself.
Supporting it would mean replacing the operator's ``compute``, not configuring it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec, RuntimeEnv
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from monai.transforms import LoadImage
from monai.utils import convert_to_numpy

LOGGER = logging.getLogger(__name__)
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "watnet"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_stem(path: Path) -> str:
    """``path``'s name without ``.nii`` or ``.nii.gz``."""
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def find_nifti(input_path: Path) -> Path:
    """``input_path`` when it is a NIfTI file, else the one NIfTI file in the folder ``input_path``."""
    if input_path.is_file():
        return input_path
    found = sorted(p for p in input_path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if len(found) != 1:
        raise ValueError(f"{input_path} must hold exactly one NIfTI file (.nii or .nii.gz), found {len(found)}.")
    return found[0]


def bundle_model(bundle: Path) -> Path:
    """The TorchScript export ``models/model.ts`` of the bundle folder ``bundle``."""
    model = bundle / "models" / "model.ts"
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found: -m must name a bundle folder exported with `make export`.")
    return model


class NiftiLoaderOperator(Operator):
    """Emits a NIfTI file as an SDK ``Image``: the (x, y, z) array and MONAI's metadata (affine, channel, ...).

    Named output: ``image``. The SDK's ``NiftiDataLoader`` emits the array without its affine, which the bundle's
    ``Orientationd`` and ``Invertd`` need.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_file: Path, **kwargs: Any) -> None:
        self.input_file = input_file
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        volume = LoadImage(image_only=True)(self.input_file)
        op_output.emit(Image(volume.numpy(), metadata=dict(volume.meta)), "image")


class SynthesisBundleInferenceOperator(MonaiBundleInferenceOperator):
    """``MonaiBundleInferenceOperator`` for a synthesis bundle: image-only network input, float volume out."""

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the bundle's inferer on the image alone; the other preprocessed tensors serve the postprocessing."""
        return self._inferer(inputs=data, network=self._model_network)

    def _send_output(self, value: Any, name: str, metadata: dict, op_output: Any, context: Any) -> None:
        """Emit the postprocessed ``(1, x, y, z)`` MetaTensor as a float32 ``Image`` with its own metadata.

        ``Invertd`` has restored the input's grid and affine on ``value``; ``metadata`` is the preprocessed
        input's (reoriented, padded), and the base class would cast the array to uint8. Arrays leave the device here.
        """
        volume = convert_to_numpy(value)[0].astype(np.float32)
        op_output.emit(Image(volume, metadata=dict(value.meta, affine=convert_to_numpy(value.affine))), name)


class NiftiWriterOperator(Operator):
    """Writes the ``Image`` it receives to ``output_file`` as NIfTI with the affine in its metadata.

    Named input: ``image``.
    """

    def __init__(self, fragment: Fragment, *args: Any, output_file: Path, **kwargs: Any) -> None:
        self.output_file = output_file
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        image = op_input.receive("image")
        affine = np.asarray(image.metadata()["affine"], dtype=np.float64)
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.asnumpy(), affine), self.output_file)
        LOGGER.info(f"Wrote {self.output_file}")


class Synth7TApp(Application):
    """3T T1w NIfTI -> synth7t bundle (TorchScript, via ``MonaiBundleInferenceOperator``) -> synthetic 7T NIfTI."""

    def compose(self) -> None:
        runtime_env = RuntimeEnv(defaults={"model": ("HOLOSCAN_MODEL_PATH", str(DEFAULT_BUNDLE))})
        app_context: AppContext = Application.init_app_context(self.argv, runtime_env)
        bundle = Path(app_context.model_path).resolve()
        if str(bundle) not in sys.path:  # a released bundle's vendored synth7t, as MONAI's ConfigWorkflow.run does
            sys.path.insert(1, str(bundle))
        app_context.update({"model": str(bundle_model(bundle))})
        input_file = find_nifti(Path(app_context.input_path))
        output_file = Path(app_context.output_path) / f"{nifti_stem(input_file)}_7t.nii.gz"

        loader = NiftiLoaderOperator(self, CountCondition(self, 1), input_file=input_file, name="nifti_loader")
        synthesis = SynthesisBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="bundle_synthesis",
        )
        writer = NiftiWriterOperator(self, output_file=output_file, name="nifti_writer")
        self.add_flow(loader, synthesis, {("image", "image")})
        self.add_flow(synthesis, writer, {("pred", "image")})


if __name__ == "__main__":
    Synth7TApp().run()
