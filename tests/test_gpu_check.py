"""``make gpu-check`` (benchmarks/gpu_check.py): its CPU smoke runs every case that needs no CUDA, as CI runs it.

The smoke's structure and verdicts are asserted, not its figures: float16 on a CPU is another kernel set than on a GPU,
so its differences are reported, not judged; the GPU run is not tested (CI has no GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.measure import REPOSITORY


def test_cpu_smoke_runs_every_case(tmp_path) -> None:
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--output_dir", str(tmp_path)]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=900, check=False)
    assert (tmp_path / "gpu.json").is_file(), completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert completed.returncode == (0 if result["passed"] else 1), completed.stderr[-3000:]
    written = f"wrote {tmp_path / 'gpu.json'} and {tmp_path / 'gpu.md'}"
    assert completed.stdout.strip().splitlines()[-1].endswith(written)
    assert (result["mode"], result["device"]) == ("cpu-smoke", "cpu")
    bundles = {bundle["bundle"]: bundle for bundle in result["bundles"]}
    assert list(bundles) == list(gpu_check.BUNDLES) and not any("error" in bundle for bundle in bundles.values())

    for name, bundle in bundles.items():
        compiled = [("float16", "eager")] if name == "vct_adc7t" else []
        expected = [("float16", None), *compiled, ("bfloat16", None)]
        assert [(row["precision"], row["compile"]) for row in bundle["training"]] == expected
        assert all(row["passed"] and len(row["losses"]) == 2 for row in bundle["training"])
        assert [row["precision"] for row in bundle["attention"]] == ([] if name == "watnet" else ["float32", "float16"])
        parity = [(row["backend"], row["precision"]) for row in bundle["parity"]]
        assert parity == [("eager", "float32"), ("eager", "float16"), ("torchscript", "float32"),
                          ("torchscript", "float16"), ("onnxruntime", "float32")]  # fmt: skip
        assert [(row["backend"], row["passed"]) for row in bundle["torchrun"]] == [("gloo", True)]
        assert [(row["backend"], row["passed"]) for row in bundle["volume"]] == [("eager", True)]
        assert bundle["volume"][0]["input_shape"][-1] == 1
        for row in bundle["attention"] + bundle["parity"]:
            assert "traceback" not in row, row["traceback"]
            assert row["judged"] == (row["precision"] == "float32") and row["max_abs_difference"] >= 0.0
            assert row["passed"], row  # float32 within 1e-4 of the CPU float32 output

    (throughput,) = bundles["vct_adc7t"]["throughput"]
    assert (throughput["config"], throughput["precision"], throughput["passed"]) == ("paper", "float32", True)
    assert throughput["parameters"] == 123_271_105 and throughput["paper_slices_per_s"] == 64.4
    assert result["failures"] == gpu_check.failures(result)
    report = (tmp_path / "gpu.md").read_text()
    assert "CPU smoke: toy sizes on the CPU, not GPU results" in report
    assert "| vct_adc7t | float16 | eager | 1 × 2×32×32 |" in report and "| watnet | gloo |" in report
    assert "| float32 | off | 123,271,105 | 1 × 2×32×32 |" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU")
def test_gpu_run_without_cuda_stops_at_once(tmp_path) -> None:
    with pytest.raises(SystemExit, match="^error: the GPU check needs a CUDA GPU"):
        gpu_check.main(output_dir=str(tmp_path / "report"), smoke=False)
    assert not (tmp_path / "report").exists()


def test_unknown_bundle_stops_at_once() -> None:
    with pytest.raises(SystemExit, match=r"^error: --bundles: unknown \['nope'\]"):
        gpu_check.main(bundles=["watnet", "nope"])


def test_root_cause_of_a_failed_torchrun_is_the_workers_exception() -> None:
    output = (
        "Traceback (most recent call last):\n  File ...\n"
        "[rank0]: ValueError: WATNet needs H and W divisible by 8, got (15, 15); pad the input first.\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n  error_file: <N/A>\n"
    )
    cause, end = gpu_check._root_cause(output)
    assert cause == "ValueError: WATNet needs H and W divisible by 8, got (15, 15); pad the input first."
    assert output[:end].endswith(cause)
    assert gpu_check._root_cause("loading\nerror: data/x.nii.gz: file not found.\n")[0].startswith("error: data/x")
    assert gpu_check._root_cause("a\nlast line\n")[0] == "last line"


def test_precision_restores_the_tf32_switches() -> None:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with gpu_check.precision("float32", torch.device("cpu")):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with gpu_check.precision("bfloat16", torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == saved
