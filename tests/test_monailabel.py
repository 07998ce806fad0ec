"""Serving the bundles from a MONAI Label server (apps/monailabel), end to end over its REST API.

Runs where ``monailabel`` is installed: ``make monailabel-test`` builds that environment (``.venv-monailabel``) and
runs this file; in the main environment (CI) it is skipped. The server starts on 127.0.0.1 with a studies folder
of 3T volumes; ``POST /infer/<bundle>`` must return the synthetic 7T NIfTI that the bundle's own inference
workflow writes for the same input, and refuse with status 400, quoting no file, a request that names a file
outside the studies folder (the rule itself is tested in CI by ``tests/test_monailabel_paths.py``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPOSITORY, inference_output

pytest.importorskip("monailabel", reason="MONAI Label is not installed here: run `make monailabel-test`")

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


SECRET = "alpha:x:0:0:bravo:/home/charlie:/bin/delta\n"  # a text file's content, never to be quoted back


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path, tiny_diffusion_dataset: Path) -> Path:
    """A tiny test subject's 3T T1w; the first tiny diffusion test subject's 3T T1w and 3T ADC map; the second's 3T
    T1w, diffusion series and b-vectors, with a text file of other content beside them; and ``linked_adc``, a symlink
    to the first subject's ADC map in the dataset folder, outside the studies."""
    folder = tmp_path_factory.mktemp("studies")
    t1w_item = json.loads((tiny_dataset / "datalist.json").read_text())["test"][0]
    shutil.copy(tiny_dataset / t1w_item["image"], folder / "t1w_3t.nii.gz")
    item, series = json.loads((tiny_diffusion_dataset / "datalist.json").read_text())["test"]
    shutil.copy(tiny_diffusion_dataset / item["t1w"], folder / "vct_t1w.nii.gz")
    shutil.copy(tiny_diffusion_dataset / item["adc"], folder / "vct_adc.nii.gz")
    (folder / "linked_adc.nii.gz").symlink_to(tiny_diffusion_dataset / item["adc"])
    shutil.copy(tiny_diffusion_dataset / series["t1w"], folder / "vct2_t1w.nii.gz")
    shutil.copy(tiny_diffusion_dataset / series["dwi"], folder / "vct2_dwi.nii.gz")
    shutil.copy(tiny_diffusion_dataset / series["bvec"], folder / "vct2_dwi.bvec")
    (folder / "notes.txt").write_text(SECRET)
    return folder


@pytest.fixture(scope="module")
def server(studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MONAI Label server of apps/monailabel with every bundle, started as a user would; yields its URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("monailabel") / "server.log").open("w")
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(REPOSITORY / "apps" / "monailabel"),
    ]
    command += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "models", "all"]
    process = subprocess.Popen(command, cwd="/", stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            try:
                _get(f"{url}/info/")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"MONAI Label server did not start; see {log.name}")
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def _infer(url: str, model: str, image: str, params: dict | None = None) -> urllib.request.Request:
    query = urllib.parse.urlencode({"image": image, "output": "image"})
    form = urllib.parse.urlencode({"params": json.dumps(params or {})}).encode()
    return urllib.request.Request(f"{url}/infer/{model}?{query}", data=form, method="POST")


def _synthesize(url: str, model: str, image: str, destination: Path, params: dict | None = None) -> Path:
    with urllib.request.urlopen(_infer(url, model, image, params), timeout=600) as response:
        destination.write_bytes(response.read())
    return destination


def _refusal(url: str, model: str, image: str, params: dict | None = None) -> str:
    """The detail of the status 400 that the request must get."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(_infer(url, model, image, params), timeout=600)
    assert caught.value.code == 400
    return json.loads(caught.value.read())["detail"]


def test_info_lists_every_bundle(server: str) -> None:
    info = json.loads(_get(f"{server}/info/"))
    assert set(info["models"]) == {"watnet", "gan_unet_t1w7t", "vct_adc7t"}
    assert info["models"]["watnet"]["version"] == "0.2.4"


@pytest.mark.parametrize("bundle", ["watnet", "gan_unet_t1w7t"])
def test_t1w_bundle_served_matches_bundle_inference(server: str, studies: Path, bundle: str, tmp_path: Path) -> None:
    served = nib.load(_synthesize(server, bundle, "t1w_3t", tmp_path / "served.nii.gz"))
    expected = nib.load(inference_output(bundle, {"image": str(studies / "t1w_3t.nii.gz")}, tmp_path))
    source = nib.load(studies / "t1w_3t.nii.gz")
    assert served.shape == source.shape
    np.testing.assert_allclose(served.affine, source.affine, atol=1e-4)
    served_data, expected_data = served.get_fdata(dtype=np.float32), expected.get_fdata(dtype=np.float32)
    assert np.isfinite(served_data).all() and served_data.min() >= 0 and served_data.max() <= 1
    np.testing.assert_allclose(served_data, expected_data, atol=1e-4)


def test_vct_served_with_adc_from_params_matches_bundle_inference(server: str, studies: Path, tmp_path: Path) -> None:
    served_path = _synthesize(server, "vct_adc7t", "vct_t1w", tmp_path / "served.nii.gz", {"adc": "vct_adc"})
    item = {"t1w": str(studies / "vct_t1w.nii.gz"), "adc": str(studies / "vct_adc.nii.gz")}
    served, expected = nib.load(served_path), nib.load(inference_output("vct_adc7t", item, tmp_path))
    assert served.shape == expected.shape  # the 7T grid, not the 3T input's
    np.testing.assert_allclose(served.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(served.get_fdata(dtype=np.float32), expected.get_fdata(dtype=np.float32), atol=1e-4)


def test_vct_request_without_adc_fails_naming_it(server: str) -> None:
    assert "missing 'adc' (needs t1w, adc (or dwi + bval + bvec))" in _refusal(server, "vct_adc7t", "vct_t1w")


SERIES = {"dwi": "vct2_dwi", "bvec": "vct2_dwi.bvec"}


@pytest.mark.parametrize(
    "model, image, params, key",
    [
        ("vct_adc7t", "vct2_t1w", {**SERIES, "bval": "../../etc/passwd"}, "bval"),
        ("vct_adc7t", "vct2_t1w", {**SERIES, "bval": "/etc/passwd"}, "bval"),
        ("vct_adc7t", "vct2_t1w", {**SERIES, "bval": "/etc/no_such_file"}, "bval"),  # same answer as an existing one
        ("vct_adc7t", "vct_t1w", {"adc": "linked_adc"}, "adc"),  # an image id, but a symlink out of the folder
        ("vct_adc7t", "vct_t1w", {"adc": "vct_adc", "mask": "../../../../etc/hostname"}, "mask"),
        ("watnet", "../../../../../../etc/passwd", None, "image"),
        ("watnet", "t1w_3t", {"image": "/etc/passwd"}, "image"),
    ],
)
def test_paths_outside_the_studies_folder_are_refused_naming_the_key_only(server, model, image, params, key) -> None:
    detail = _refusal(server, model, image, params)
    assert detail == (
        f"'{key}': not an image id or a file of the studies folder; name one by its id or by a path inside the "
        "studies folder."
    )


def test_weights_other_than_the_bundles_are_refused(server: str) -> None:
    detail = _refusal(server, "watnet", "t1w_3t", {"model_filename": "../../../../../../etc/passwd"})
    assert detail == "'model_filename': expected one of the bundle's model files ['model.pt']."


def test_a_diffusion_file_that_is_not_numbers_is_refused_without_quoting_it(server: str, studies: Path) -> None:
    detail = _refusal(server, "vct_adc7t", "vct2_t1w", {**SERIES, "bval": "notes.txt"})
    assert detail == f"{(studies / 'notes.txt').resolve()}: line 1: value 1 is not a number."
    assert not any(word in detail for word in ("alpha", "bravo", "charlie", "delta", "root:"))
