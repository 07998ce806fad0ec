"""MONAI Deploy application: 3T NIfTI volumes in, the synthetic 7T volume of a synth7t bundle out.

The SDK's ``MonaiBundleInferenceOperator`` runs the bundle's ``models/model.ts`` (exported by ``make export`` with
``metadata.json`` and the ``inference`` config embedded as ``extra/metadata.json`` and ``extra/inference.json``): it
takes the preprocessing, inferer and postprocessing from the embedded config, minus its ``LoadImaged`` and
``SaveImaged``, which the loader and writer operators below replace. The operator graph, as in the SDK's
``examples/apps/ai_spleen_seg_app``, has one edge per input file of the bundle::

    InputLoaderOperator --image--> SynthesisBundleInferenceOperator --pred--> NiftiWriterOperator     (T1w bundles)
    InputLoaderOperator --t1w, adc--> ItemBundleInferenceOperator --pred--> NiftiWriterOperator       (vct_adc7t)
    InputLoaderOperator --t1w, dwi, bval, bvec--> ItemBundleInferenceOperator --pred--> NiftiWriterOperator

Run it with the virtual environment of ``make monai-deploy-test`` (``.venv-monai-deploy``, monai-deploy-app-sdk and
holoscan installed; tested on CPU without a CUDA driver; the bundle config picks CUDA when torch sees a GPU)::

    .venv-monai-deploy/bin/python apps/monai_deploy/app.py -i <input> -o <output> [-m <bundle folder>]

``-m``: the bundle folder, default this repository's ``bundles/watnet`` (``bundles/gan_unet_t1w7t`` and
``bundles/vct_adc7t`` work the same). ``-i``: the input, as the bundle's inference config names its inputs
(``datalist_keys``, what its datalist loader requires):

- ``watnet``, ``gan_unet_t1w7t`` (one input, ``image``): a NIfTI file, or a folder holding exactly one
  (``.nii``/``.nii.gz``);
- ``vct_adc7t`` (``t1w`` and ``adc``, or ``t1w`` and the diffusion series ``dwi`` + ``bval`` + ``bvec``): a folder in
  which the file of each input is named with its key as suffix, case ignored: ``<name>_T1w.nii.gz`` and
  ``<name>_ADC.nii.gz``, or, without an ADC map, ``<name>_dwi.nii.gz`` with its FSL files ``<name>_dwi.bval`` and
  ``<name>_dwi.bvec`` (BIDS's T1w and dwi names; the bundle fits the ADC as its ``adc_method`` says). Other files
  are ignored.

The inputs are checked as the bundle checks a datalist item (``synth7t.data.check_item``: readable NIfTI, finite and
not blank, shared grids, a 4-D series whose b-values and b-vectors fit it) before any compute; a bad input stops the
app with exit status 1 and one line, ``error: <file>: <problem>``.

``-o``: the output folder, created if missing, that receives ``<name of the first input>_7t.nii.gz``, float32 in
[0, 1], zero outside the brain mask, as ``python -m monai.bundle run inferring`` writes it: on the input's grid and
affine for the T1w bundles, on the 7T grid (the inputs' field of view at 1.05 mm) for ``vct_adc7t``.
``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` stand in for ``-i``, ``-o`` and ``-m``;
``-l DEBUG`` logs more.

The bundle configs import ``synth7t``: install this repository (``pip install -e .``), or point ``-m`` at a released
bundle (``make release``), whose vendored ``synth7t/`` the app puts on ``sys.path``.

Why the SDK operator is subclassed (monai-deploy-app-sdk 4.0.0):

- Both subclasses: the operator passes every tensor left by the preprocessing besides the network input (the brain
  ``mask``, gan_unet_t1w7t's empty ``context``) to the inferer as keywords, which forwards them to the network, while
  the exported networks take the network input alone; and it casts an ``image`` output to uint8 in DICOM (depth,
  height, width) order, fit for label maps, whereas the 7T volume is float in [0, 1] and the writer here wants it with
  its own affine (:class:`SynthesisBundleInferenceOperator`).
- ``vct_adc7t`` only: the operator's ``compute`` makes one input port per network input of ``metadata.json`` and
  hands each to the preprocessing under that key. For the T1w bundles the network input, ``image``, is the input
  volume, so that design fits. The VCT network input ``image`` is the 3T T1w and ADC slices concatenated on the 7T
  grid, built inside the preprocessing from two volumes on their own grid (``t1w``, ``adc``) or from the T1w and a
  diffusion series with its two FSL text files, the ADC fitted there; the network input cannot come through a port.
  :class:`ItemBundleInferenceOperator` replaces ``compute`` only: one port per input file, received into one
  datalist-like item for the preprocessing; the SDK's config parsing, transform filtering, image conversion,
  inferer call, postprocessing and model objects are kept.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec, RuntimeEnv
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
    get_bundle_config,
)
from monai.transforms import LoadImage
from monai.utils import convert_to_numpy

LOGGER = logging.getLogger(__name__)
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "watnet"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
CONFIG = "inference"
#: The inputs of a bundle whose inference config has no ``datalist_keys``: one volume, ``image``.
SINGLE_INPUT = {"image_keys": ["image"]}


def nifti_stem(path: Path) -> str:
    """``path``'s name without ``.nii`` or ``.nii.gz``."""
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return path.name.endswith(NIFTI_SUFFIXES)


def find_nifti(input_path: Path) -> Path:
    """``input_path`` when it is a NIfTI file, else the one NIfTI file in the folder ``input_path``."""
    if input_path.is_file():
        return input_path
    found = sorted(p for p in input_path.iterdir() if p.is_file() and is_nifti(p))
    if len(found) != 1:
        raise ValueError(f"{input_path} must hold exactly one NIfTI file (.nii or .nii.gz), found {len(found)}.")
    return found[0]


def find_keyed_inputs(folder: Path, datalist_keys: Mapping[str, Any]) -> dict[str, Path]:
    """The file of each input key of ``datalist_keys`` in ``folder``: the one whose name ends, case ignored, with
    ``_<key>.nii``, ``_<key>.nii.gz`` or ``.<key>`` (FSL's ``.bval`` / ``.bvec``); a key without a file is replaced by
    its ``alternatives`` when all of theirs are there (``adc`` by ``dwi``, ``bval``, ``bvec``)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: -i must be a folder holding one file per input, named *_<key>.nii.gz.")
    files = sorted(p for p in folder.iterdir() if p.is_file())

    def named(key: str) -> Path | None:
        endings = tuple(ending.lower() for ending in (f"_{key}.nii", f"_{key}.nii.gz", f".{key}"))
        matches = [p for p in files if p.name.lower().endswith(endings)]
        if len(matches) > 1:
            raise ValueError(f"{folder}: input '{key}' is ambiguous, files {[p.name for p in matches]}.")
        return matches[0] if matches else None

    found: dict[str, Path] = {}
    for key in datalist_keys["image_keys"]:
        path, alternatives = named(key), list(datalist_keys.get("alternatives", {}).get(key, []))
        if path is not None:
            found[key] = path
            continue
        replacements = {alt: alt_path for alt in alternatives if (alt_path := named(alt)) is not None}
        if alternatives and len(replacements) == len(alternatives):
            found.update(replacements)
            continue
        message = f"{folder}: no file for input '{key}' (a name ending in _{key}.nii.gz)"
        if alternatives:
            missing = [alt for alt in alternatives if alt not in replacements]
            message += f" nor for all of {' + '.join(alternatives)} instead (missing: {', '.join(missing)})"
        raise ValueError(message + ".")
    return found


def bundle_model(bundle: Path) -> Path:
    """The TorchScript export ``models/model.ts`` of the bundle folder ``bundle``."""
    model = bundle / "models" / "model.ts"
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found: -m must name a bundle folder exported with `make export`.")
    return model


class InputLoaderOperator(Operator):
    """Emits each input file on the output named by its key: a NIfTI file as an SDK ``Image``, the (x, y, z) or
    (x, y, z, volumes) array with MONAI's metadata (affine, channel, file name, ...), any other file (FSL ``bval`` /
    ``bvec``) as its path, which the bundle's preprocessing reads as it reads a datalist item's.

    The SDK's ``NiftiDataLoader`` emits the array without its affine, which the bundle's ``Orientationd``,
    ``Spacingd`` and ``Invertd`` need, and loads no text files.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_files: Mapping[str, Path], **kwargs: Any) -> None:
        self.input_files = dict(input_files)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for key in self.input_files:
            spec.output(key)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        for key, path in self.input_files.items():
            if is_nifti(path):
                volume = LoadImage(image_only=True)(path)
                op_output.emit(Image(volume.numpy(), metadata=dict(volume.meta)), key)
            else:
                op_output.emit(str(path), key)


class SynthesisBundleInferenceOperator(MonaiBundleInferenceOperator):
    """``MonaiBundleInferenceOperator`` for a synthesis bundle: network input alone, float volume out."""

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the bundle's inferer on the network input alone; the other preprocessed tensors serve the
        postprocessing."""
        return self._inferer(inputs=data, network=self._model_network)

    def _send_output(self, value: Any, name: str, metadata: dict, op_output: Any, context: Any) -> None:
        """Emit the postprocessed ``(1, x, y, z)`` MetaTensor as a float32 ``Image`` with its own metadata.

        ``Invertd`` has restored the output grid and affine on ``value``; ``metadata`` is the preprocessed
        input's (reoriented, padded), and the base class would cast the array to uint8. Arrays leave the device here.
        """
        volume = convert_to_numpy(value)[0].astype(np.float32)
        op_output.emit(Image(volume, metadata=dict(value.meta, affine=convert_to_numpy(value.affine))), name)


class ItemBundleInferenceOperator(SynthesisBundleInferenceOperator):
    """Synthesis bundle operator whose inputs are the files of a datalist item, one port per key of
    ``input_mapping``, not the network's inputs (module docstring: why ``vct_adc7t`` needs it)."""

    def _load_bundle(self) -> None:
        """The network of the app context's model, and on first use the bundle config it embeds (as the base
        ``compute`` does for a model given by the app context)."""
        network = self.app_context.models.get(self._model_name) if self.app_context.models else None
        if network is None:
            raise OSError(f"{self.name}: no model in the app context (-m must name an exported bundle).")
        with self._lock:
            if not self._init_completed:
                self.bundle_path = Path(network.path)
                self._init_config(self._bundle_config_names.config_names)
                self._init_completed = True
        self._model_network = network

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        """Receive the item, preprocess it into the network input, infer, postprocess, emit the outputs."""
        self._load_bundle()
        item: dict[str, Any] = {}
        for mapping in self._input_mapping:
            value = op_input.receive(mapping.label)
            if isinstance(value, Image):
                array, metadata = self._convert_from_image(value)
                value = MetaTensor.ensure_torch_and_prune_meta(array, dict(metadata))
            item[mapping.label] = value
        network_input = next(iter(self._inputs))
        with torch.no_grad():
            data = self.pre_process(item)
            prediction = self.predict(data[network_input][None].to(self._device))[0]
            outputs = self.post_process(prediction, **{self.kw_preprocessed_inputs: data})
        for name in self._outputs:
            self._send_output(outputs[name], name, data[network_input].meta, op_output, context)


class NiftiWriterOperator(Operator):
    """Writes the ``Image`` it receives to ``output_file`` as NIfTI with the affine in its metadata.

    Named input: ``image``. The SDK's writers write DICOM (segmentation, SR, PDF) only.
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


def bundle_inputs(model: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``datalist_keys`` of the inference config embedded in ``model`` (:data:`SINGLE_INPUT` when it has none)
    and the network's input names in its ``metadata.json``, read with the SDK's own config reader."""
    parser = get_bundle_config(str(model), [CONFIG])
    datalist_keys = parser.get_parsed_content("datalist_keys") if "datalist_keys" in parser else SINGLE_INPUT
    return dict(datalist_keys), list(parser["_meta_"]["network_data_format"]["inputs"])


def checked_inputs(input_path: Path, datalist_keys: Mapping[str, Any]) -> dict[str, Path]:
    """The input files of the bundle (:func:`find_nifti` for a single ``image``, else :func:`find_keyed_inputs`),
    checked as the bundle's datalist loader checks an item (``synth7t.data.check_item``, imported now that the
    bundle's ``synth7t`` is importable)."""
    if list(datalist_keys["image_keys"]) == SINGLE_INPUT["image_keys"]:
        files = {"image": find_nifti(input_path)}
    else:
        files = find_keyed_inputs(input_path, datalist_keys)
    check_item = importlib.import_module("synth7t.data").check_item
    folder = input_path if input_path.is_dir() else input_path.parent
    item = {key: str(path) for key, path in files.items()}
    item = check_item(item, f"MONAI Deploy input {input_path}", folder, **datalist_keys)
    return {key: Path(item[key]) for key in files}


class Synth7TApp(Application):
    """3T NIfTI input(s) -> synth7t bundle (TorchScript, via ``MonaiBundleInferenceOperator``) -> synthetic 7T NIfTI."""

    def compose(self) -> None:
        runtime_env = RuntimeEnv(defaults={"model": ("HOLOSCAN_MODEL_PATH", str(DEFAULT_BUNDLE))})
        app_context: AppContext = Application.init_app_context(self.argv, runtime_env)
        bundle = Path(app_context.model_path).resolve()
        if str(bundle) not in sys.path:  # a released bundle's vendored synth7t, as MONAI's ConfigWorkflow.run does
            sys.path.insert(1, str(bundle))
        model = bundle_model(bundle)
        app_context.update({"model": str(model)})
        datalist_keys, network_inputs = bundle_inputs(model)
        try:
            input_files = checked_inputs(Path(app_context.input_path), datalist_keys)
        except ValueError as error:  # synth7t's InputError is one: the message alone, as the bundle's runs print it
            raise SystemExit(f"error: {error}") from None
        first_input = input_files[datalist_keys["image_keys"][0]]
        output_file = Path(app_context.output_path) / f"{nifti_stem(first_input)}_7t.nii.gz"

        loader = InputLoaderOperator(self, CountCondition(self, 1), input_files=input_files, name="input_loader")
        ports = [
            IOMapping(key, Image if is_nifti(path) else str, IOType.IN_MEMORY) for key, path in input_files.items()
        ]
        # The SDK's compute where the input files are the network's inputs (T1w bundles), ours where they are not
        operator = (
            SynthesisBundleInferenceOperator if list(input_files) == network_inputs else ItemBundleInferenceOperator
        )
        synthesis = operator(
            self,
            input_mapping=ports,
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=[CONFIG]),
            name="bundle_synthesis",
        )
        writer = NiftiWriterOperator(self, output_file=output_file, name="nifti_writer")
        self.add_flow(loader, synthesis, {(key, key) for key in input_files})
        self.add_flow(synthesis, writer, {("pred", "image")})


if __name__ == "__main__":
    Synth7TApp().run()
