"""`make zoo-check`: the checks the MONAI model zoo's CI makes on a bundle (Project-MONAI/model-zoo, ci/verify_bundle.py
in full mode and ci/unit_tests/, as ci/run_premerge_*.sh run them), made by this project's own code on its release
archives, in a Python that has only the packages each bundle's metadata asks for.

    python scripts/zoo_check.py                                      # every bundle, work folder build/zoo
    python scripts/zoo_check.py --bundles watnet --work_dir /tmp/zoo

1. `scripts/build_release.py --output_dir <work_dir>/dist`; each archive unpacked to <work_dir>/models/<bundle>/, the
   zoo's layout.
2. A virtual environment per requirement list, <work_dir>/venv/<key>/, as the zoo's get_bundle_requirements.py lists
   it: monai, torch and numpy at the metadata's `monai_version`, `pytorch_version` and `numpy_version`, the packages
   of `required_packages_version`, and jsonschema and pytest for the checks, installed with `pip install -c
   constraints.txt`, which pins torch (2.13.0 resolves to the local CPU wheel on the project's machines, instead of
   the registry's multi-GB CUDA build). One per list, not one for all bundles, so that a package missing from one
   bundle's list (watnet lists no einops) is not hidden by another's. The key hashes the list, constraints.txt and
   the Python version: an environment is reused until one of them changes (delete <work_dir>/venv to start over).
   None has synth7t: each bundle vendors its own copy.
3. tests/zoo/ copied to <work_dir>/unit_tests/ (the zoo's ci/unit_tests/), with an empty pytest.ini that keeps pytest
   from reading the repository's configuration (its `pythonpath` would put the repository's synth7t on sys.path).
4. Per bundle, in its environment, from <work_dir> as the zoo runs from its repository root: `zoo_check.py --verify`
   with the bundle folder first on sys.path (verify_bundle.py's way): the vendored synth7t, required files, version in
   the changelog, metadata against schemas/metadata.schema.json, `check_properties` of the train, evaluate
   (train.yaml + evaluate.yaml) and infer workflows on fake data, `verify_net_in_out`, `ckpt_export` scripted
   (no `--use_trace`) with the export's output compared to the checkpoint's, the shipped model.ts loading; then
   `pytest unit_tests/test_<bundle>.py`.

One line per check and bundle, PASS or FAIL; exit status 1 when a check failed. Each process's output is in
<work_dir>/logs/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape  # how verify_net_in_out reads spatial_shape ("16*n")

REPOSITORY = Path(__file__).resolve().parent.parent
BUILD_RELEASE = REPOSITORY / "scripts" / "build_release.py"
CONSTRAINTS = REPOSITORY / "constraints.txt"
SCHEMA = REPOSITORY / "schemas" / "metadata.schema.json"
UNIT_TESTS = REPOSITORY / "tests" / "zoo"
# the metadata's version keys and the package each pins, as the zoo's ci/get_bundle_requirements.py reads them
VERSION_KEYS = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}
PACKAGE_KEYS = ("optional_packages_version", "required_packages_version")
CHECK_PACKAGES = ("jsonschema", "pytest")  # what the checks need besides a bundle's packages (versions: constraints)
# verify_bundle.py's necessary and preferred files; the inference config with any of the suffixes it accepts
REQUIRED_FILES = ("configs/metadata.json", "models/model.pt", "docs/README.md", "LICENSE")
INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
PARITY_TOLERANCE = 1e-4  # largest difference between the scripted export's output and the checkpoint's
RESULT = "@@zoo-check@@ "  # marks the lines `--verify` prints for `main`, a JSON object after it on each


def requirements(metadata: dict) -> list[str]:
    """The packages a bundle's environment gets: the metadata's pins, then the checks' own packages."""
    listed = [f"{name}=={metadata[key]}" for name, key in VERSION_KEYS.items() if key in metadata]
    listed += [f"{name}=={version}" for key in PACKAGE_KEYS for name, version in metadata.get(key, {}).items()]
    return listed + list(CHECK_PACKAGES)


def environment(python: str, listed: Sequence[str], venv_root: Path, log: Path) -> tuple[Path, str]:
    """The virtual environment holding ``listed`` (see the module docstring), created with ``python`` unless a
    complete one for the same list, constraints and Python version exists; its folder, and "created" or "reused"."""
    if not any(line.replace(" ", "").startswith("torch==") for line in CONSTRAINTS.read_text().splitlines()):
        raise RuntimeError(f"{CONSTRAINTS}: pins no torch; an unpinned torch would install the registry's CUDA build.")
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    key = hashlib.sha256("\n".join([*sorted(listed), CONSTRAINTS.read_text(), version]).encode()).hexdigest()[:16]
    venv = venv_root / key
    if (venv / ".installed").is_file():
        return venv, "reused"
    shutil.rmtree(venv, ignore_errors=True)
    venv.mkdir(parents=True)
    with log.open("w") as stream:
        subprocess.run([python, "-m", "venv", str(venv)], check=True, stdout=stream, stderr=subprocess.STDOUT)
        (venv / "requirements.txt").write_text("".join(f"{line}\n" for line in listed))
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-c", str(CONSTRAINTS)]
        requirement_file = ["-r", str(venv / "requirements.txt")]
        installed = subprocess.run([*pip, *requirement_file], stdout=stream, stderr=subprocess.STDOUT)
    if installed.returncode:
        raise RuntimeError(f"pip install failed (exit {installed.returncode}), see {log}")
    (venv / ".installed").write_text(f"Python {version}\n")
    return venv, "created"


def build_archives(bundles: Sequence[str], work_dir: Path, log: Path) -> list[Path]:
    """The release archives (`make release`) in <work_dir>/dist, unpacked into <work_dir>/models; the bundle folders."""
    for folder in ("dist", "models"):
        shutil.rmtree(work_dir / folder, ignore_errors=True)
    command = [sys.executable, str(BUILD_RELEASE), "--output_dir", str(work_dir / "dist")]
    with log.open("w") as stream:
        subprocess.run([*command, "--bundles", ",".join(bundles)], check=True, cwd=REPOSITORY, stdout=stream,
                       stderr=subprocess.STDOUT)  # fmt: skip
    for archive in sorted((work_dir / "dist").glob("*.zip")):
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(work_dir / "models")
    return [work_dir / "models" / bundle for bundle in bundles]


def copy_unit_tests(work_dir: Path) -> None:
    """tests/zoo/ as <work_dir>/unit_tests/, with the pytest.ini that makes it pytest's root folder."""
    target = work_dir / "unit_tests"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(UNIT_TESTS, target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "pytest.ini").write_text("[pytest]\n")


def report(bundle: str, check: str, passed: bool, detail: str, seconds: float) -> bool:
    print(f"{'PASS' if passed else 'FAIL'}  {bundle:<15} {check:<27} {seconds:6.1f} s  {detail}", flush=True)
    return passed


def run_logged(command: list[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    """``command`` from ``cwd`` without PYTHONPATH (nothing but its environment and its sys.path setup may supply
    packages), its output in ``log`` and returned."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    return result


def check_bundle(bundle_dir: Path, venv: Path, work_dir: Path, logs: Path) -> bool:
    """``verify`` and the unit test of one bundle in ``venv``, from ``work_dir``; prints their lines."""
    bundle, python = bundle_dir.name, str(venv / "bin" / "python")
    started = time.monotonic()
    command = [python, str(Path(__file__).resolve()), "--verify", str(bundle_dir.relative_to(work_dir))]
    result = run_logged(command, work_dir, logs / f"{bundle}_verify.log")
    results = [json.loads(line.split(RESULT, 1)[1]) for line in result.stdout.splitlines() if RESULT in line]
    passed = all([report(bundle, **entry) for entry in results])
    if (result.returncode or not results) and passed:  # stopped before reporting a failure
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        passed = report(bundle, "verify", False, f"exit {result.returncode}: {tail}", time.monotonic() - started)

    started = time.monotonic()
    test_file = work_dir / "unit_tests" / f"test_{bundle}.py"
    if not test_file.is_file():
        return report(bundle, "unit test", False, f"no tests/zoo/{test_file.name}", 0.0) and passed
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(test_file.relative_to(work_dir))]
    result = run_logged(command, work_dir, logs / f"{bundle}_unit_test.log")
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    detail = f"{test_file.relative_to(work_dir)}: {summary}"
    tested = report(bundle, "unit test", not result.returncode, detail, time.monotonic() - started)
    return tested and passed


def main(bundles: Sequence[str], work_dir: Path, python: str) -> int:
    """Every step of the module docstring for ``bundles``; 1 when a check failed, else 0."""
    started = time.monotonic()
    logs = work_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    try:
        bundle_dirs = build_archives(bundles, work_dir, logs / "build_release.log")
    except subprocess.CalledProcessError:
        report("-", "build release archives", False, f"see {logs / 'build_release.log'}", time.monotonic() - started)
        return 1
    report("-", "build release archives", True, f"{work_dir / 'dist'} -> {work_dir / 'models'}",
           time.monotonic() - started)  # fmt: skip
    copy_unit_tests(work_dir)
    passed = True
    for bundle_dir in bundle_dirs:
        metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
        listed = requirements(metadata)
        step = time.monotonic()
        try:
            venv, how = environment(python, listed, work_dir / "venv", logs / f"{bundle_dir.name}_venv.log")
        except (RuntimeError, subprocess.CalledProcessError) as error:
            passed = report(bundle_dir.name, "environment", False, str(error), time.monotonic() - step)
            continue
        detail = f"{venv.relative_to(work_dir)} {how}, {len(listed)} packages (venv/<key>/requirements.txt)"
        report(bundle_dir.name, "environment", True, detail, time.monotonic() - step)
        passed = check_bundle(bundle_dir, venv, work_dir, logs) and passed
    print(f"{'all checks passed' if passed else 'some checks FAILED'} in {time.monotonic() - started:.0f} s; "
          f"logs in {logs}")  # fmt: skip
    return 0 if passed else 1


# --- `zoo_check.py --verify <bundle folder>`: run by `main` in the bundle's environment, from the work folder ---


def inference_config(bundle_dir: Path) -> Path | None:
    return next((bundle_dir / name for name in INFERENCE_CONFIGS if (bundle_dir / name).is_file()), None)


def vendored_synth7t(bundle_dir: Path, without_bundle: ModuleSpec | None) -> str:
    """synth7t comes from the bundle folder, and from nowhere once the folder is off sys.path (``without_bundle``,
    the spec found then)."""
    if without_bundle is not None:
        raise AssertionError(f"synth7t is importable without the bundle folder: {without_bundle.origin}")
    spec = importlib.util.find_spec("synth7t")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is None or bundle_dir.resolve() not in origin.parents:
        raise AssertionError(f"synth7t is not the vendored copy: {origin}")
    return f"from {origin.parent}"


def required_files(bundle_dir: Path) -> str:
    missing = [name for name in REQUIRED_FILES if not (bundle_dir / name).is_file()]
    if inference_config(bundle_dir) is None:
        missing.append("configs/inference.{json,yaml,yml}")
    if missing:
        raise AssertionError(f"missing {', '.join(missing)}")
    return ", ".join([*REQUIRED_FILES, str(inference_config(bundle_dir).relative_to(bundle_dir))])


def load_metadata(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "configs" / "metadata.json").read_text())


def version_in_changelog(bundle_dir: Path) -> str:
    metadata = load_metadata(bundle_dir)
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if not isinstance(changelog, dict) or version not in changelog:
        raise AssertionError(f"version {version!r} is not a key of the changelog {sorted(changelog or {})}")
    return f"version {version}"


def metadata_schema(bundle_dir: Path) -> str:
    if not SCHEMA.is_file():  # verify_metadata would download the metadata's schema URL instead
        raise AssertionError(f"{SCHEMA} not found")
    verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(SCHEMA))
    return f"against {SCHEMA.relative_to(REPOSITORY)}"


def properties(bundle_dir: Path, workflow_type: str, configs: list[str]) -> str:
    """``ConfigWorkflow(...).check_properties()`` after ``initialize`` (which loads the data) on a fake dataset
    (tests/zoo/zoo_utils.py), with the bundle's default settings."""
    from zoo_utils import FAKE_DATASETS, workflow  # <work_dir>/unit_tests, on sys.path from `verify`

    with tempfile.TemporaryDirectory() as dataset_dir:
        FAKE_DATASETS[bundle_dir.name](dataset_dir)
        flow = workflow(str(bundle_dir), workflow_type, configs, dataset_dir=dataset_dir,
                        output_dir=os.path.join(dataset_dir, "output"), num_workers=0)  # fmt: skip
        flow.initialize()
        missing = flow.check_properties()
    if missing:
        raise AssertionError(f"missing or wrongly referenced properties: {missing}")
    return f"{' + '.join(configs)} as {workflow_type}"


def net_in_out(bundle_dir: Path) -> str:
    config, meta_file = inference_config(bundle_dir), bundle_dir / "configs" / "metadata.json"
    verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(config),
                      bundle_root=str(bundle_dir))  # fmt: skip
    return f"network_def of {config.name}"


def scripted_export(bundle_dir: Path) -> str:
    """`ckpt_export` without `--use_trace` (torch.jit.script) into a temporary folder, then the export and the
    checkpoint on one random input of the metadata's shape (spatial ``n`` = 2, values in its range)."""
    config, checkpoint = inference_config(bundle_dir), bundle_dir / "models" / "model.pt"
    meta_file = bundle_dir / "configs" / "metadata.json"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.ts"
        ckpt_export(net_id="network_def", filepath=str(path), ckpt_file=str(checkpoint), meta_file=str(meta_file),
                    config_file=str(config), bundle_root=str(bundle_dir))  # fmt: skip
        exported = torch.jit.load(str(path), map_location="cpu")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    image = load_metadata(bundle_dir)["network_data_format"]["inputs"]["image"]
    low, high = image.get("value_range", [0, 1])
    shape = (1, image["num_channels"], *_get_fake_spatial_shape(image["spatial_shape"], n=2))
    x = low + (high - low) * torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (exported(x) - network(x)).abs().max().item()
    if not difference <= PARITY_TOLERANCE:
        raise AssertionError(f"scripted export differs from the checkpoint by {difference:.2e} on {list(shape)}")
    return f"scripted; max |export - checkpoint| {difference:.1e} on {list(shape)}"


def shipped_torchscript(bundle_dir: Path) -> str:
    """The shipped models/model.ts loads, as verify_bundle.py checks after its export."""
    path = bundle_dir / "models" / "model.ts"
    if not path.is_file():
        return "none shipped"
    torch.jit.load(str(path), map_location="cpu")
    return "models/model.ts"


def verify(bundle_path: str) -> int:
    """The checks of ``bundle_path`` (a folder of the unpacked archives, relative to the working directory), each
    printed as a RESULT line; 1 when one failed."""
    bundle_dir = Path(bundle_path).resolve()
    without_bundle = importlib.util.find_spec("synth7t")
    sys.path.insert(0, str(bundle_dir))  # as verify_bundle.py does; the configs import the vendored synth7t
    sys.path.insert(1, str(Path("unit_tests").resolve()))  # zoo_utils, as the zoo's scripts import their utils
    # evaluate.yaml is an overlay merged after train.yaml: its workflow keeps train's properties, and the zoo's
    # tests check it as type "train" too
    checks: list[tuple[str, Callable[[], str]]] = [
        ("vendored synth7t", lambda: vendored_synth7t(bundle_dir, without_bundle)),
        ("required files", lambda: required_files(bundle_dir)),
        ("version in changelog", lambda: version_in_changelog(bundle_dir)),
        ("metadata schema", lambda: metadata_schema(bundle_dir)),
        ("check_properties train", lambda: properties(bundle_dir, "train", ["train.yaml"])),
        ("check_properties evaluate", lambda: properties(bundle_dir, "train", ["train.yaml", "evaluate.yaml"])),
        ("check_properties infer", lambda: properties(bundle_dir, "infer", [inference_config(bundle_dir).name])),
        ("verify_net_in_out", lambda: net_in_out(bundle_dir)),
        ("ckpt_export", lambda: scripted_export(bundle_dir)),
        ("model.ts loads", lambda: shipped_torchscript(bundle_dir)),
    ]
    failed = False
    for name, check in checks:
        started = time.monotonic()
        try:
            detail, passed = check(), True
        except (Exception, SystemExit) as error:  # synth7t stops bad input with SystemExit (synth7t.bundle.BadInput)
            traceback.print_exc()
            lines = str(error).strip().splitlines()
            detail, passed = f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300], False
        failed |= not passed
        entry = {"check": name, "passed": passed, "detail": detail, "seconds": round(time.monotonic() - started, 1)}
        print(RESULT + json.dumps(entry), flush=True)
    return 1 if failed else 0


def parse_arguments(arguments: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default=None, help="comma-separated bundle names (default: every bundle)")
    parser.add_argument("--work_dir", default="build/zoo", help="the work folder (default: build/zoo)")
    parser.add_argument("--python", default="python3", help="the Python the environments are made from")
    parser.add_argument("--verify", metavar="BUNDLE_FOLDER", default=None,
                        help="internal: the in-environment checks of one unpacked bundle, run from the work folder")
    return parser.parse_args(arguments)


if __name__ == "__main__":
    options = parse_arguments(sys.argv[1:])
    if options.verify:
        sys.exit(verify(options.verify))
    names = options.bundles.split(",") if options.bundles else sorted(
        path.parent.name for path in (REPOSITORY / "bundles").glob("*/configs"))  # fmt: skip
    sys.exit(main([name.strip() for name in names], Path(options.work_dir).resolve(), options.python))
