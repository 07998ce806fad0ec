"""Build MONAI Bundle release archives, `<output_dir>/<bundle>_v<version>.zip`, one per bundle (`make release`), each
with its SHA-256 beside it in `<zip>.sha256`, the line `sha256sum -c` checks.

    python scripts/build_release.py                                   # every bundle, into dist/
    python scripts/build_release.py --bundles watnet --output_dir /tmp/release
    python scripts/build_release.py --fetch models/model.onnx --base_url https://example.org/synth7t

Each archive unpacks to `<bundle>/` in the MONAI model zoo layout (`configs/`, `models/`, `docs/`, `LICENSE`),
the name `python -m monai.bundle download --name <bundle> --url <zip url>` extracts it under. The configs do
`$import synth7t`, which is not on PyPI, so the package is vendored as `<bundle>/synth7t/` (the repository's
`synth7t/`, without `__pycache__`). MONAI evaluates a config's imports when it first resolves the config, before
`ConfigWorkflow.run` adds the bundle folder to `sys.path`, so the vendored package is found only when the bundle
folder is on `sys.path` already: run from the bundle folder (`python -m` puts the working directory first, the
model zoo convention) or with `PYTHONPATH=<bundle>`.

Files named by `--fetch` (paths inside the bundle, comma-separated or a list) are left out of the zip and listed,
with their URL and SHA-256, in `<bundle>/large_files.yml`, the file
`python -m monai.bundle download_large_files --bundle_path <bundle>` reads. They are copied to
`<output_dir>/<bundle>_v<version>/<path>`, to be uploaded beside the zip so that they are served at
`<base_url>/<bundle>_v<version>/<path>`. A `--fetch` path that none of the built bundles has is an error. A bundle
that fetches files from elsewhere lists them in its own `large_files.yml` (the model zoo's convention); its entries
are copied into the archive's. `download_large_files` fetches an entry without `hash_val` unchecked, so every entry,
listed or fetched, must have its path, URL and hash: a bundle listing one without is refused before any archive is
written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import fire
import yaml

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGE = REPOSITORY / "synth7t"
BUNDLE_PARTS = ("LICENSE", "configs", "models", "docs")  # BUNDLES.md "Layout"; runs/ and other outputs stay out
REQUIRED = ("LICENSE", "configs/metadata.json", "configs/inference.yaml", "models/model.pt", "docs/README.md")
LARGE_FILES = "large_files.yml"  # at the bundle root, where `monai.bundle download_large_files` looks for it
LARGE_FILE_KEYS = ("path", "url", "hash_val")  # hash_type may be left out: MONAI then checks a SHA-256
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp: the same files give the same archive bytes (and hash)


def bundle_version(bundle_dir: Path) -> str:
    """The release version: `version` of the bundle's metadata.json, as the MONAI model zoo names its archives."""
    return json.loads((bundle_dir / "configs" / "metadata.json").read_text())["version"]


def release_name(bundle_dir: Path) -> str:
    return f"{bundle_dir.name}_v{bundle_version(bundle_dir)}"


def _files_under(root: Path, names: Sequence[str]) -> dict[str, Path]:
    """Archive paths (POSIX, relative to ``root``) of the files under ``root / name`` for each name, bytecode left
    out, sorted so that the archive does not depend on the order the file system lists them in."""
    files: dict[str, Path] = {}
    for name in names:
        path = root / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
        for file in candidates:
            bytecode = "__pycache__" in file.parts or file.suffix == ".pyc"  # of whichever Python imported it last
            if file.is_file() and not bytecode:
                files[file.relative_to(root).as_posix()] = file
    return files


def bundle_files(bundle_dir: Path) -> dict[str, Path]:
    """What a bundle archive holds, by path inside the bundle folder: the bundle's files and the vendored package."""
    missing = [name for name in REQUIRED if not (bundle_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle_dir}: cannot release without {', '.join(missing)}.")
    return {**_files_under(bundle_dir, BUNDLE_PARTS), **_files_under(PACKAGE.parent, [PACKAGE.name])}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_large_files(entries: object, source: str) -> list[dict]:
    """``entries``, the list under `large_files` of ``source``, each with a non-empty path, URL and hash, and no path
    twice: `monai.bundle.download_large_files` checks a downloaded file against its entry's hash, and fetches one
    whose `hash_val` is missing or empty without any check."""
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'large_files' must be a list of entries ({', '.join(LARGE_FILE_KEYS)}).")
    paths = []
    for index, entry in enumerate(entries):
        values = entry if isinstance(entry, dict) else {}
        where = f"{source}: large_files[{index}]" + (f" ({values['path']})" if values.get("path") else "")
        missing = [key for key in LARGE_FILE_KEYS if not (isinstance(values.get(key), str) and values[key].strip())]
        if missing:
            raise ValueError(
                f"{where} has no {', '.join(missing)}: every large file needs its URL and hash, or "
                "download_large_files would fetch it unchecked."
            )
        if values["path"] in paths:
            raise ValueError(f"{where}: the path is listed twice.")
        paths.append(values["path"])
    return entries


def listed_large_files(bundle_dir: Path) -> list[dict]:
    """The checked entries of the bundle's own `large_files.yml`, files it fetches from elsewhere (none without)."""
    path = bundle_dir / LARGE_FILES
    if not path.is_file():
        return []
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not readable YAML ({' '.join(str(error).split())}).") from error
    return check_large_files(content.get("large_files") if isinstance(content, dict) else None, str(path))


def large_files_yaml(listed: Sequence[dict], files: dict[str, Path], base_url: str, source: str) -> str:
    """`large_files.yml` in the format of `monai.bundle.download_large_files` (and the model zoo): the ``listed``
    entries, then one per fetched file with its path in the bundle, URL and hash, checked after download; ``source``
    names it in the error if an entry lacks its hash."""
    fetched = [
        {"path": path, "url": f"{base_url}/{path}", "hash_val": sha256(file), "hash_type": "sha256"}
        for path, file in files.items()
    ]
    return yaml.safe_dump({"large_files": check_large_files([*listed, *fetched], source)}, sort_keys=False)


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16  # rw-r--r--, whatever the working tree's permissions are
    return info


def write_archive(archive: Path, root: str, files: dict[str, Path], extra: dict[str, str]) -> None:
    """A zip whose entries all sit under ``root/``: ``files`` copied, ``extra`` written from text."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as output:
        for name, file in files.items():
            output.writestr(_zip_entry(f"{root}/{name}"), file.read_bytes())
        for name, text in extra.items():
            output.writestr(_zip_entry(f"{root}/{name}"), text)


def build_bundle(
    bundle_dir: Path,
    files: dict[str, Path],
    output_dir: Path,
    fetch: Sequence[str] = (),
    base_url: str | None = None,
    listed: Sequence[dict] = (),
) -> Path:
    """Write ``output_dir/<bundle>_v<version>.zip`` holding ``files`` (from :func:`bundle_files`) and its SHA-256 in
    ``<zip>.sha256``; the ``fetch`` paths go to ``output_dir/<bundle>_v<version>/`` instead, behind
    ``large_files.yml``, after the ``listed`` entries (from :func:`listed_large_files`). Returns the archive path."""
    release = release_name(bundle_dir)
    files = dict(files)
    fetched = {path: files.pop(path) for path in fetch if path in files}
    extra = {}
    if fetched or listed:
        base = f"{str(base_url).rstrip('/')}/{release}"
        extra[LARGE_FILES] = large_files_yaml(listed, fetched, base, f"{release}.zip {bundle_dir.name}/{LARGE_FILES}")
        for path, file in fetched.items():
            (output_dir / release / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, output_dir / release / path)
    archive = output_dir / f"{release}.zip"
    write_archive(archive, bundle_dir.name, files, extra)
    archive.with_name(f"{archive.name}.sha256").write_text(f"{sha256(archive)}  {archive.name}\n")  # sha256sum -c
    return archive


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A comma-separated string or a sequence: fire passes `--fetch a.pt,b.pt` as a string, `--bundles a,b` as a
    tuple (it parses as a Python literal) and `--fetch "['a.pt','b.pt']"` as a list."""
    if value is None:
        return ()
    return tuple(item.strip() for item in value.split(",")) if isinstance(value, str) else tuple(value)


def main(
    bundles: str | Sequence[str] | None = None,
    output_dir: str = "dist",
    fetch: str | Sequence[str] | None = None,
    base_url: str | None = None,
) -> list[str]:
    """Build the archive of each of ``bundles`` (default: every folder of bundles/ with a configs/ folder)."""
    names = _as_tuple(bundles) or tuple(sorted(p.parent.name for p in (REPOSITORY / "bundles").glob("*/configs")))
    fetch_paths = tuple(Path(path).as_posix() for path in _as_tuple(fetch))  # ./models/x.onnx -> models/x.onnx
    if fetch_paths and not base_url:
        raise ValueError("--fetch needs --base_url, the URL the fetched files are served under.")
    bundle_dirs = [REPOSITORY / "bundles" / name for name in names]
    unknown = [path for path in fetch_paths if not any((d / path).is_file() for d in bundle_dirs)]
    if unknown:
        raise FileNotFoundError(f"--fetch {', '.join(unknown)}: in none of the bundles {', '.join(names)}.")
    # every bundle complete, and its own large files' entries checked, before any archive is written
    contents = {d: (bundle_files(d), listed_large_files(d)) for d in bundle_dirs}
    return [
        str(build_bundle(d, files, Path(output_dir), fetch_paths, base_url, listed))
        for d, (files, listed) in contents.items()
    ]


if __name__ == "__main__":
    fire.Fire(main)
