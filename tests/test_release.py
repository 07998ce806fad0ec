"""Release archives as a user gets them (scripts/build_release.py, `make release`, README "Deploy"): built with their
SHA-256, served over HTTP, checked with `sha256sum -c` and unpacked with `python -m monai.bundle download` (and
`download_large_files`, whose entries must all carry their hash), and run from the unpacked folder by a Python that
cannot import the repository's synth7t, which the venv has installed in editable mode."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.request import urlretrieve

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import REPOSITORY
from monai.apps.utils import HashCheckError
from monai.bundle import download as monai_download
from monai.bundle import download_large_files

BUILD_RELEASE = REPOSITORY / "scripts" / "build_release.py"
BUNDLES = sorted(path.name for path in (REPOSITORY / "bundles").iterdir() if (path / "configs").is_dir())
# (dataset fixture, datalist key of the input the output is named after, key of the image whose grid it is on);
# T1w bundles read tiny_dataset's "image" and write on its grid; vct_adc7t writes on the 7T grid (the target's here)
INPUTS = {"vct_adc7t": ("tiny_diffusion_dataset", "t1w", "label")}

# `python -c HIDE_REPOSITORY <repository> <monai.bundle arguments>`: `python -m monai.bundle <arguments>` once the
# editable install's finder and the repository folder are gone from sys.meta_path and sys.path; stops if synth7t
# would still come from the repository, and prints at exit where it came from.
HIDE_REPOSITORY = """
import atexit, importlib.util, os, runpy, sys
repository = os.path.realpath(sys.argv[1])
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != repository]
sys.path_importer_cache.clear()
spec = importlib.util.find_spec("synth7t")
if spec is not None and os.path.realpath(spec.origin).startswith(repository + os.sep):
    sys.exit(f"the repository's synth7t is still importable: {spec.origin}")
atexit.register(lambda: print("synth7t imported from", getattr(sys.modules.get("synth7t"), "__file__", None)))
sys.argv = ["monai.bundle", *sys.argv[2:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def release_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 as a release page serves archives: (folder, its URL)."""
    folder = tmp_path_factory.mktemp("served")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def run(command: list[str], cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    """``command`` in a fresh process, from ``cwd``, PYTHONPATH only as given."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | environment
    return subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def build(bundle: str, output_dir: Path, *options: str) -> Path:
    """scripts/build_release.py for one bundle, as `make release` runs it; returns the archive."""
    result = run([sys.executable, str(BUILD_RELEASE), "--bundles", bundle, "--output_dir", str(output_dir), *options],
                 cwd=REPOSITORY)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.split()[-1])


def download(bundle: str, url: str, bundle_dir: Path) -> Path:
    """`python -m monai.bundle download --name <bundle> --url <url>`; returns the unpacked bundle folder."""
    command = [sys.executable, "-m", "monai.bundle", "download", "--name", bundle, "--url", url]
    result = run([*command, "--bundle_dir", str(bundle_dir)], cwd=bundle_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return bundle_dir / bundle


def infer(bundle_folder: Path, dataset: Path, datalist: Path, output_dir: Path, cwd: Path, **environment: str):
    """Inference with the unpacked bundle's inference.yaml, the repository's synth7t hidden."""
    arguments = ["run", "inferring", "--config_file", str(bundle_folder / "configs" / "inference.yaml")]
    arguments += ["--dataset_dir", str(dataset), "--datalist", str(datalist), "--output_dir", str(output_dir)]
    command = [sys.executable, "-c", HIDE_REPOSITORY, str(REPOSITORY), *arguments, "--num_workers", "0"]
    return run(command, cwd=cwd, **environment)


def first_test_item(dataset: Path, folder: Path) -> tuple[Path, dict]:
    """A datalist in ``folder`` with the first "test" item of ``dataset``'s (one volume keeps inference quick)."""
    item = json.loads((dataset / "datalist.json").read_text())["test"][0]
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"test": [item]}))
    return datalist, item


def test_archive_holds_the_bundle_and_the_vendored_package(tmp_path):
    main = runpy.run_path(str(BUILD_RELEASE))["main"]
    archive = Path(main(bundles="watnet", output_dir=str(tmp_path / "first"))[0])
    version = json.loads((REPOSITORY / "bundles" / "watnet" / "configs" / "metadata.json").read_text())["version"]
    assert archive.name == f"watnet_v{version}.zip"
    names = zipfile.ZipFile(archive).namelist()
    assert all(name.startswith("watnet/") for name in names)
    bundle = {name.removeprefix("watnet/") for name in names}
    assert {"LICENSE", "docs/README.md", "configs/metadata.json", "configs/inference.yaml", "models/model.pt"} <= bundle
    package = {path.relative_to(REPOSITORY).as_posix() for path in (REPOSITORY / "synth7t").rglob("*.py")}
    assert {name for name in bundle if name.startswith("synth7t/")} == package  # all of it, no bytecode
    assert not any(name.startswith(("runs/", "large_files")) for name in bundle)
    again = Path(main(bundles="watnet", output_dir=str(tmp_path / "again"))[0])
    assert again.read_bytes() == archive.read_bytes()  # same files, same archive
    assert sorted(path.name for path in archive.parent.iterdir()) == [archive.name, f"{archive.name}.sha256"]
    assert Path(f"{archive}.sha256").read_text() == f"{sha256(archive)}  {archive.name}\n"


def test_fetching_needs_a_url_and_a_file_some_bundle_has(tmp_path):
    main = runpy.run_path(str(BUILD_RELEASE))["main"]
    with pytest.raises(ValueError, match="--base_url"):
        main(bundles="watnet", output_dir=str(tmp_path), fetch="models/model.onnx")
    with pytest.raises(FileNotFoundError, match="models/missing.pt"):
        main(bundles="watnet", output_dir=str(tmp_path), fetch="models/missing.pt", base_url="http://127.0.0.1")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bundle", BUNDLES)
def test_downloaded_archive_infers_without_the_repository(bundle, release_server, request, tmp_path):
    """PYTHONPATH names the unpacked bundle, the working directory is elsewhere (README "Deploy")."""
    served, url = release_server
    archive = build(bundle, served / "plain")
    bundle_folder = download(bundle, f"{url}/plain/{archive.name}", tmp_path)
    fixture, key, grid_key = INPUTS.get(bundle, ("tiny_dataset", "image", "image"))
    dataset = request.getfixturevalue(fixture)
    datalist, item = first_test_item(dataset, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = infer(bundle_folder, dataset, datalist, tmp_path / "out", cwd=elsewhere, PYTHONPATH=str(bundle_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"synth7t imported from {bundle_folder / 'synth7t' / '__init__.py'}" in result.stdout
    written = nib.load(tmp_path / "out" / Path(item[key]).name.replace(".nii.gz", "_7t.nii.gz"))
    grid = nib.load(dataset / item[grid_key])
    assert written.shape == grid.shape and np.allclose(written.affine, grid.affine, atol=1e-4)


@pytest.mark.parametrize("where", ["bundle folder", "elsewhere"])
def test_vendored_package_is_found_from_the_bundle_folder_only(where, tiny_dataset, tmp_path):
    """Without PYTHONPATH: MONAI evaluates `$import synth7t` before `ConfigWorkflow.run` puts the bundle folder on
    sys.path, so only the working directory (first on sys.path, as with `python -m`) makes the copy importable."""
    zipfile.ZipFile(build("watnet", tmp_path / "dist")).extractall(tmp_path)
    cwd = tmp_path / "watnet" if where == "bundle folder" else tiny_dataset
    datalist, _ = first_test_item(tiny_dataset, tmp_path)
    result = infer(tmp_path / "watnet", tiny_dataset, datalist, tmp_path / "out", cwd=cwd)
    if where == "bundle folder":
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"synth7t imported from {tmp_path / 'watnet' / 'synth7t' / '__init__.py'}" in result.stdout
    else:
        assert result.returncode != 0 and "synth7t" in result.stderr
        assert "synth7t imported from None" in result.stdout
        assert not (tmp_path / "out").exists()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_large_files_are_fetched_and_hash_checked(release_server, tmp_path):
    """In this process: the commands run as above; the archive as in the test above."""
    served, url = release_server
    archive = build("watnet", served / "fetch", "--fetch", "models/model.pt", "--base_url", f"{url}/fetch")
    monai_download(name="watnet", url=f"{url}/fetch/{archive.name}", bundle_dir=str(tmp_path))
    bundle_folder = tmp_path / "watnet"
    assert not (bundle_folder / "models" / "model.pt").exists()
    (entry,) = yaml.safe_load((bundle_folder / "large_files.yml").read_text())["large_files"]
    assert entry == {"path": "models/model.pt", "url": f"{url}/fetch/{archive.stem}/models/model.pt",
                     "hash_val": sha256(REPOSITORY / "bundles" / "watnet" / "models" / "model.pt"),
                     "hash_type": "sha256"}  # fmt: skip
    download_large_files(bundle_path=str(bundle_folder))  # what `python -m monai.bundle download_large_files` runs
    assert sha256(bundle_folder / "models" / "model.pt") == entry["hash_val"]
    (bundle_folder / "models" / "model.pt").unlink()
    (served / "fetch" / archive.stem / "models" / "model.pt").write_bytes(b"not the released weights")
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(bundle_folder))
    assert not (bundle_folder / "models" / "model.pt").exists()


# README "Deploy": the archive and its .sha256 downloaded, the hash checked, and only then the archive unpacked
VERIFIED_DOWNLOAD = (
    "sha256sum -c {zip}.sha256 && python -m monai.bundle download --name {bundle} --url file://$PWD/{zip} "
    "--bundle_dir $PWD"
)


@pytest.mark.parametrize("altered", [False, True], ids=["as released", "altered on the server"])
def test_archive_is_unpacked_only_when_its_hash_matches(altered, release_server, tmp_path):
    served, url = release_server
    archive = build("watnet", served / ("altered" if altered else "checked"))
    if altered:
        with zipfile.ZipFile(archive, "a") as changed:
            changed.writestr("watnet/configs/altered.yaml", "a file the release did not have\n")
    for name in (archive.name, f"{archive.name}.sha256"):  # what `curl -O` does in the README
        urlretrieve(f"{url}/{archive.parent.name}/{name}", tmp_path / name)
    command = VERIFIED_DOWNLOAD.format(zip=archive.name, bundle="watnet")
    result = run(["bash", "-c", command], cwd=tmp_path, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if altered:
        assert result.returncode != 0 and f"{archive.name}: FAILED" in result.stdout
        assert not (tmp_path / "watnet").exists()
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{archive.name}: OK" in result.stdout
        assert (tmp_path / "watnet" / "configs" / "inference.yaml").read_bytes() == (
            REPOSITORY / "bundles" / "watnet" / "configs" / "inference.yaml"
        ).read_bytes()


def bundle_copy(folder: Path, large_files: object) -> Path:
    """A copy of the watnet bundle (what a release takes of it) with ``large_files`` as its own large_files.yml."""
    bundle_dir = folder / "watnet"
    for part in ("LICENSE", "configs", "docs", "models/model.pt"):
        source, target = REPOSITORY / "bundles" / "watnet" / part, bundle_dir / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    (bundle_dir / "large_files.yml").write_text(yaml.safe_dump(large_files))
    return bundle_dir


LISTED = {"path": "models/extra.pt", "url": "http://127.0.0.1:1/extra.pt", "hash_val": "0" * 64, "hash_type": "sha256"}


@pytest.mark.parametrize(
    "large_files, problem",
    [
        ({"large_files": [{**LISTED, "hash_val": ""}]}, r"large_files\[0\] \(models/extra.pt\) has no hash_val"),
        ({"large_files": [{k: v for k, v in LISTED.items() if k != "hash_val"}]}, r"\(models/extra.pt\) has no hash_"),
        ({"large_files": [{**LISTED, "hash_val": None, "url": " "}]}, r"has no url, hash_val: every large file needs"),
        ({"large_files": [LISTED, "models/other.pt"]}, r"large_files\[1\] has no path, url, hash_val"),
        ({"large_files": [LISTED, LISTED]}, r"large_files\[1\] \(models/extra.pt\): the path is listed twice"),
        ({"files": [LISTED]}, r"'large_files' must be a list of entries"),
    ],
)
def test_a_bundle_listing_a_large_file_without_its_hash_is_refused(large_files, problem, tmp_path):
    bundle_dir = bundle_copy(tmp_path, large_files)
    listed_large_files = runpy.run_path(str(BUILD_RELEASE))["listed_large_files"]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bundle_dir / 'large_files.yml'))}: .*{problem}"):
        listed_large_files(bundle_dir)


def test_listed_and_fetched_large_files_are_written_with_their_hashes(release_server, tmp_path):
    """The bundle's own entry (a file served elsewhere) and a fetched file, in one large_files.yml; both are fetched
    and checked by `download_large_files`. The fetched file may not also be listed."""
    served, url = release_server
    (served / "elsewhere").mkdir()
    (served / "elsewhere" / "extra.pt").write_bytes(b"weights hosted elsewhere")
    listed = {**LISTED, "url": f"{url}/elsewhere/extra.pt", "hash_val": sha256(served / "elsewhere" / "extra.pt")}
    release = runpy.run_path(str(BUILD_RELEASE))
    bundle_files, listed_large_files = release["bundle_files"], release["listed_large_files"]
    build_bundle = release["build_bundle"]
    bundle_dir = bundle_copy(tmp_path / "source", {"large_files": [listed]})
    output_dir, base_url = served / "listed", f"{url}/listed"
    (bundle_dir / "models" / "extra.pt").write_bytes(b"a local copy, fetched as well as listed")
    with pytest.raises(ValueError, match=r"\(models/extra.pt\): the path is listed twice"):
        build_bundle(bundle_dir, bundle_files(bundle_dir), output_dir, ["models/extra.pt"], base_url,
                     listed_large_files(bundle_dir))  # fmt: skip
    assert not output_dir.exists()
    (bundle_dir / "models" / "extra.pt").unlink()
    archive = build_bundle(bundle_dir, bundle_files(bundle_dir), output_dir, ["models/model.pt"], base_url,
                           listed_large_files(bundle_dir))  # fmt: skip
    monai_download(name="watnet", url=f"{url}/listed/{archive.name}", bundle_dir=str(tmp_path / "deploy"))
    bundle_folder = tmp_path / "deploy" / "watnet"
    entries = yaml.safe_load((bundle_folder / "large_files.yml").read_text())["large_files"]
    assert [entry["path"] for entry in entries] == ["models/extra.pt", "models/model.pt"]
    assert entries[0] == listed and all(entry["hash_val"] for entry in entries)
    download_large_files(bundle_path=str(bundle_folder))
    assert sha256(bundle_folder / "models" / "extra.pt") == listed["hash_val"]
    assert sha256(bundle_folder / "models" / "model.pt") == sha256(bundle_dir / "models" / "model.pt")
