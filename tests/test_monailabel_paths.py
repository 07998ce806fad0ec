"""The MONAI Label app's confinement of request inputs to the studies folder (apps/monailabel/request_paths.py).

MONAI Label is not installed here (``tests/test_monailabel.py`` covers the served app over HTTP where it is); the
module imports nothing from it, so the rule and the bundle's input check that follows it run in CI as the app runs
them: ``confine_request_paths`` with the server's image ids, then ``synth7t.data.check_item`` with the bundle's
``datalist_keys``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import REPOSITORY

from synth7t.data import check_item
from synth7t.errors import InputError

_SPEC = importlib.util.spec_from_file_location("request_paths", REPOSITORY / "apps" / "monailabel" / "request_paths.py")
request_paths = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(request_paths)
RequestPathError = request_paths.RequestPathError
check_model_filename = request_paths.check_model_filename
check_device = request_paths.check_device
confine_request_paths = request_paths.confine_request_paths

VCT_KEYS = ["image", "t1w", "adc", "mask", "dwi", "bval", "bvec"]  # what the app confines for vct_adc7t
SECRET = "alpha:x:0:0:bravo:/home/charlie:/bin/delta\necho foxtrot\n"
SECRET_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(studies folder, a folder beside it): the studies hold an image (id ``t1w``) and ``sub/adc.nii.gz``, symlinks
    that lead out (to a file, to nothing, to a folder) and one that stays inside; outside lies a secret file."""
    studies, outside = tmp_path / "studies", tmp_path / "outside"
    (studies / "sub").mkdir(parents=True)
    outside.mkdir()
    (studies / "t1w.nii.gz").write_bytes(b"3T image")
    (studies / "sub" / "adc.nii.gz").write_bytes(b"3T ADC map")
    (outside / "secret.txt").write_text(SECRET)
    (studies / "out.txt").symlink_to(outside / "secret.txt")
    (studies / "dangling.txt").symlink_to(outside / "missing.txt")
    (studies / "out_folder").symlink_to(outside, target_is_directory=True)
    (studies / "in.nii.gz").symlink_to(studies / "sub" / "adc.nii.gz")
    return studies, outside


def image_ids(studies: Path):
    """``Datastore.get_image_uri`` of a MONAI Label datastore holding ``t1w``: its path, ``""`` for other ids."""
    return lambda image_id: str(studies / "t1w.nii.gz") if image_id == "t1w" else ""


def refusal(studies: Path, key: str, value: object) -> str:
    with pytest.raises(RequestPathError) as caught:
        confine_request_paths({key: value}, VCT_KEYS, studies, image_ids(studies))
    return str(caught.value)


def test_paths_leading_out_of_the_studies_folder_get_one_message_naming_the_key_only(folders, tmp_path):
    """``..``, absolute paths elsewhere, symlinks out: whether the target exists or not, the message is the same and
    tells neither the resolved path nor anything of the file."""
    studies, outside = folders
    values = [
        "../outside/secret.txt",
        "../outside/missing.txt",  # does not exist: same answer as an existing file
        "sub/../../outside/secret.txt",
        "../../../../../../../../etc/passwd",
        str(outside / "secret.txt"),
        "/etc/passwd",
        "/",
        "out.txt",  # symlink to a file outside
        "dangling.txt",  # symlink to nothing outside
        "out_folder/secret.txt",  # through a symlinked folder
        "..",
        "bad\0path",
    ]
    messages = {refusal(studies, "bval", value) for value in values}
    assert len(messages) == 1
    (message,) = messages
    assert message.startswith("'bval': ") and "studies folder" in message
    assert str(tmp_path) not in message and "outside" not in message and "secret" not in message
    assert not any(word in message for word in SECRET_WORDS)


def test_image_ids_and_paths_inside_resolve_to_their_real_paths(folders, tmp_path):
    studies, _ = folders
    adc = os.path.realpath(studies / "sub" / "adc.nii.gz")
    for value in ("sub/adc.nii.gz", "./sub/../sub/adc.nii.gz", str(studies / "sub" / "adc.nii.gz"), "in.nii.gz"):
        assert confine_request_paths({"adc": value}, VCT_KEYS, studies, image_ids(studies))["adc"] == adc
    (tmp_path / "studies_link").symlink_to(studies, target_is_directory=True)  # a studies folder named by a symlink
    request = {"model": "vct_adc7t", "image": "t1w", "adc": str(tmp_path / "studies_link" / "sub" / "adc.nii.gz")}
    confined = confine_request_paths(request, VCT_KEYS, tmp_path / "studies_link", image_ids(studies))
    assert confined == {"model": "vct_adc7t", "image": os.path.realpath(studies / "t1w.nii.gz"), "adc": adc}
    assert request["adc"] == str(tmp_path / "studies_link" / "sub" / "adc.nii.gz")  # the request is not changed


def test_other_params_and_absent_inputs_are_left_alone(folders):
    studies, _ = folders
    request = {"model": "watnet", "image": "t1w", "device": "cpu", "mask": "", "label": "/not/an/input"}
    confined = confine_request_paths(request, ["image", "mask"], studies, image_ids(studies))
    assert confined == {**request, "image": os.path.realpath(studies / "t1w.nii.gz")}


def test_an_id_from_the_datastore_that_leads_out_is_refused(folders):
    """MONAI Label lists a symlinked study as an image id; its real path is outside, so it is refused as well."""
    studies, outside = folders
    with pytest.raises(RequestPathError, match=r"^'image': not an image id"):
        confine_request_paths({"image": "linked"}, VCT_KEYS, studies, lambda _: str(outside / "secret.txt"))


def test_inside_the_folder_a_missing_file_and_a_non_string_are_named(folders):
    studies, _ = folders
    assert refusal(studies, "adc", "sub/missing.nii.gz") == (
        "'adc': 'sub/missing.nii.gz' is neither an image id nor a file of the studies folder."
    )
    assert refusal(studies, "adc", ["t1w"]) == "'adc': expected an image id or a file path, got a list."


@pytest.mark.parametrize("value", [None, "model.pt", ["model.pt"]])
def test_model_filename_may_name_the_bundles_own_weights(value):
    check_model_filename({"model": "watnet", "model_filename": value}, ["model.pt"])


@pytest.mark.parametrize("value", ["../../../tmp/other.pt", "/etc/passwd", "model.ts", ["model.pt", "../x.pt"], [], 3])
def test_model_filename_naming_other_files_is_refused(value):
    with pytest.raises(RequestPathError) as caught:
        check_model_filename({"model_filename": value}, ["model.pt"])
    assert str(caught.value) == "'model_filename': expected one of the bundle's model files ['model.pt']."


def write_volume(path: Path, shape: tuple[int, ...]) -> None:
    data = np.random.default_rng(0).uniform(1, 2, size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


@pytest.mark.parametrize("key", ["bval", "bvec"])
@pytest.mark.parametrize("content", [SECRET.encode(), b"\xff\xfe" + SECRET.encode("utf-16-le")], ids=["text", "binary"])
def test_a_diffusion_file_that_is_not_numbers_is_refused_without_quoting_it(folders, key, content):
    """A ``vct_adc7t`` request whose ``bval`` (or ``bvec``) is some other file of the studies folder: the bundle's
    check names the file and the line, never its content."""
    studies, _ = folders
    write_volume(studies / "t1w_3t.nii.gz", (6, 5, 4))
    write_volume(studies / "dwi.nii.gz", (6, 5, 4, 3))
    (studies / "dwi.bval").write_text("0 1000 1000\n")
    (studies / "dwi.bvec").write_text("1 0 0\n0 1 0\n0 0 1\n")
    (studies / "notes.txt").write_bytes(content)
    request = {"image": "t1w_3t.nii.gz", "dwi": "dwi.nii.gz", "bval": "dwi.bval", "bvec": "dwi.bvec", key: "notes.txt"}
    confined = confine_request_paths(request, VCT_KEYS, studies, image_ids(studies))
    config = yaml.safe_load((REPOSITORY / "bundles" / "vct_adc7t" / "configs" / "inference.yaml").read_text())
    item = {"t1w": confined.pop("image"), **confined}  # as SynthesisInferTask puts the study image under `t1w`
    with pytest.raises(InputError) as caught:
        check_item(item, "MONAI Label request to vct_adc7t", studies, **config["datalist_keys"])
    message = str(caught.value)
    assert message.startswith(f"{os.path.realpath(studies / 'notes.txt')}: ")
    assert ("line 1: value 1 is not a number" if content.isascii() else "not UTF-8 text") in message
    assert not any(word in message for word in SECRET_WORDS) and "xff" not in message


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_plain_device_names_pass(device):
    check_device({"device": device})
    check_device({})


@pytest.mark.parametrize("device", ["$__import__('os').system('true')", "cuda:x", "", 3, ["cpu"]])
def test_other_device_values_are_refused(device):
    with pytest.raises(RequestPathError, match="'device': expected 'cpu'"):
        check_device({"device": device})
