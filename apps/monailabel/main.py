"""MONAI Label app that serves the synth7t bundles: a 3T volume in, the synthetic 7T volume back.

Start it on a studies folder of 3T volumes (README "Deploy", section MONAI Label)::

    monailabel start_server --app apps/monailabel --studies /path/to/3t_volumes --host 127.0.0.1 --port 8000 \
        --conf models all

and ask ``POST /infer/<bundle>?image=<image id>&output=image`` for the synthetic 7T NIfTI. Each bundle is served by
MONAI Label's own ``BundleInferTask``, which reads the bundle's ``inference.yaml`` (``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``) and ``models/model.pt``; :class:`SynthesisInferTask` adapts it to
image synthesis (a float image is written, not a label map) and to bundles with several inputs (``vct_adc7t``: the
study image is the 3T T1w; the 3T ADC map, or the diffusion series ``dwi`` + ``bval`` + ``bvec``, comes in the
request's ``params`` as an image id of the same studies folder or a path inside it). Every input of a request is
confined to the studies folder (``request_paths``): a path that leads out of it is refused with status 400.

Options (``--conf <name> <value>``):
    models: comma-separated bundle names, or ``all`` (default) for every bundle folder under ``bundles``.
    bundles: folder holding the bundle folders (default: this repository's ``bundles/``); a folder of bundles
        downloaded with ``python -m monai.bundle download`` works too, their vendored ``synth7t`` is used.
    preload: ``true`` to load the networks at start-up.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monai.transforms import SaveImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.transform.writer import Writer
from request_paths import (  # this folder, which MONAI Label puts on sys.path
    RequestPathError,
    check_device,
    check_model_filename,
    confine_request_paths,
)

logger = logging.getLogger(__name__)

REPOSITORY_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def _synth7t(module: str) -> Any:
    """``synth7t.<module>``, imported on first use, not at module level: with downloaded bundles it is the copy
    vendored in a bundle folder, importable once ``BundleInferTask`` has put that folder on ``sys.path`` and parsed
    the bundle's config (which imports it)."""
    return importlib.import_module(f"synth7t.{module}")


class SynthesisInferTask(BundleInferTask):
    """``BundleInferTask`` for a synth7t bundle.

    - The study image is the bundle's first input (``image``, or ``t1w`` for ``vct_adc7t``); its other inputs are
      taken from the request under their datalist keys. The request is validated as a datalist item
      (``synth7t.data.check_item``) before any compute, so a missing or unreadable input fails with one message;
      :class:`Synth7TApp` has already resolved its paths to real paths inside the studies folder ``studies``.
    - The bundle's ``postprocessing`` already maps the prediction back (onto the input grid for the T1w bundles, the
      7T grid over the input's field of view for ``vct_adc7t``), so MONAI Label's ``Restored`` resize is not added;
      its ``SaveImaged`` is dropped and MONAI Label's writer returns the volume as float32 NIfTI.
    """

    def __init__(self, path: str, conf: dict[str, str], studies: str) -> None:
        self.studies = studies
        super().__init__(
            path,
            conf,
            type=InferType.OTHERS,
            extend_load_image=False,  # MONAI Label's tensor loader needs every key, a bundle's mask is optional
            add_post_restore=False,
            post_filter=[SaveImaged],
        )
        if not self.valid:
            return
        config = self.bundle_config
        self.datalist_keys: dict[str, Any] = (
            config.get_parsed_content("datalist_keys") if "datalist_keys" in config else {"image_keys": ["image"]}
        )
        self.primary_key: str = self.datalist_keys["image_keys"][0]

    def model_files(self) -> list[str]:
        """The names of the bundle's ``models/*.pt``, the values ``BundleInferTask`` offers for ``model_filename``."""
        return list(self._config["model_filename"])

    def extra_input_keys(self) -> list[str]:
        """Keys of the bundle's inputs other than the study image, that a request may carry."""
        keys = [*self.datalist_keys["image_keys"][1:], "mask"]
        return keys + [alt for alts in self.datalist_keys.get("alternatives", {}).values() for alt in alts]

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Any]:
        if data is not None:
            self._check_request(data)
        return super().pre_transforms(data)

    def _check_request(self, data: dict[str, Any]) -> None:
        """Puts the study image under the bundle's first input key and validates the inputs, before any compute."""
        study_image = data.pop("image") if self.primary_key != "image" else data["image"]  # vct: `image` is made later
        item = {self.primary_key: study_image, **{key: data[key] for key in self.extra_input_keys() if key in data}}
        check_item = _synth7t("data").check_item
        where = f"MONAI Label request to {os.path.basename(self.bundle_path)}"
        data.update(check_item(item, where, self.studies, **self.datalist_keys))

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        data[self.output_label_key] = data[self.output_label_key][0]  # (1, *spatial) -> a 3-D NIfTI
        data.setdefault("result_extension", ".nii.gz")
        data.setdefault("result_dtype", np.float32)
        return Writer(label=self.output_label_key, json=self.output_json_key, nibabel=True)(data)


class Synth7TApp(MONAILabelApp):
    """Serves the synth7t bundles named by ``--conf models`` as MONAI Label infer tasks, one per bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = Path(conf.get("bundles", REPOSITORY_BUNDLES)).expanduser().resolve()
        available = sorted(p.name for p in self.bundles_dir.iterdir() if (p / "configs" / "inference.yaml").is_file())
        requested = conf.get("models", "all")
        self.models = available if requested == "all" else [m.strip() for m in requested.split(",") if m.strip()]
        unknown = sorted(set(self.models) - set(available))
        if unknown:
            raise ValueError(f"--conf models: no bundle {unknown} in {self.bundles_dir} (there: {available}).")
        super().__init__(app_dir, studies, conf, name="synth7t", description="3T to 7T MRI synthesis bundles")

    def init_infers(self) -> dict[str, InferTask]:
        return {name: SynthesisInferTask(str(self.bundles_dir / name), self.conf, self.studies) for name in self.models}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Resolves the study image and the extra inputs (image ids of the studies folder or paths inside it) to
        their real paths, refusing any that leads out of the folder (and a ``model_filename`` other than the
        bundle's own), then infers; a refused path or bad input is answered with status 400 and the message naming
        the key or file and the problem. The study image is then a path, for which ``MONAILabelApp.infer`` saves no
        label: a request's ``save_label`` and ``label_tag`` cannot have the synthetic volume copied anywhere."""
        task = self._infers.get(request.get("model"))
        keys, model_files = ["image"], []
        if isinstance(task, SynthesisInferTask) and task.valid:
            keys += [task.primary_key, *task.extra_input_keys()]
            model_files = task.model_files()
        store = datastore if datastore else self.datastore()
        try:
            request = confine_request_paths(request, keys, self.studies, store.get_image_uri)
            check_model_filename(request, model_files)
            check_device(request)
            return super().infer(request, datastore)
        except (RequestPathError, _synth7t("errors").InputError) as error:  # the client gets the message, not a 500
            raise HTTPException(status_code=400, detail=str(error)) from error
