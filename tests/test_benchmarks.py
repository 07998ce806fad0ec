"""The benchmark code runs and reports (README "Benchmarks"); the figures themselves are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import adc, inference, quality, reference_cnn, training, workflows
from benchmarks.measure import REPOSITORY, run_case_in_subprocess, time_call


def test_time_call_counts_warmup_apart_from_timed_runs() -> None:
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, runs=3)
    assert len(calls) == 5 and timing.runs == 3 and timing.warmup == 2
    assert timing.min_s <= timing.median_s <= timing.max_s


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_inference_case_runs_each_backend_on_a_block(backend: str) -> None:
    case = {"bundle": "gan_unet_t1w7t", "config": "default", "backend": backend, "device": "cpu"}
    result = run_case_in_subprocess(
        "benchmarks.inference", {**case, "amp": False, "compile": False, "warmup": 0, "runs": 1, "slices": 2}
    )
    assert "error" not in result, result
    assert result["input_shape"] == [1, 1, 192, 224, 2]  # 182 x 218 padded to a multiple of 2^4
    assert result["whole_volume_estimated"] and result["whole_volume_s"] == pytest.approx(
        result["timing"]["median_s"] * 182 / 2, rel=1e-3
    )
    assert "| gan_unet_t1w7t | default |" in inference.markdown([result])


def test_adc_benchmark_times_each_method_and_compares_with_dipy() -> None:
    result = adc.run(size=(16, 18, 16), protocols=["three-shell"], warmup=0, runs=1)
    protocol = result["protocols"][0]
    cpu = [method for method in protocol["methods"] if method["device"] == "cpu"]
    assert [(m["method"], m["adc_method"], "error" in m) for m in cpu] == [
        ("synth7t", "dti_wls", False),
        ("synth7t", "shells", False),
        ("dipy", None, False),
    ]
    assert set(protocol["agreement"]) == {"dti_wls", "shells"} and protocol["data"]["volumes"] == 96
    assert [item["name"] for item in result["dipy_bundled"]] == list(adc.DIPY_BUNDLED)
    report = adc.markdown(result)
    assert "| synth7t ComputeADC dti_wls | cpu |" in report and "| DIPY TensorModel WLS | cpu |" in report
    assert "- `shells` in " in report and "small_101D (6×10×10×102" in report


def test_failed_case_is_reported_not_raised() -> None:
    result = run_case_in_subprocess("benchmarks.inference", {"bundle": "no_such_bundle", "config": "default"})
    assert "error" in result and result["bundle"] == "no_such_bundle"


def test_cases_add_amp_and_compile_only_on_cuda() -> None:
    cpu, cuda = inference.cases("cpu"), inference.cases("cuda")
    assert not any(case["amp"] or case["compile"] for case in cpu)
    assert any(case["compile"] and case["bundle"] == "vct_adc7t" for case in cuda)
    assert {case["config"] for case in training.cases("cuda") if case["bundle"] == "vct_adc7t"} == {"paper"}


def test_report_with_training_curves(tmp_path) -> None:
    command = [sys.executable, "-m", "benchmarks", "--parts", "['curves']", "--output_dir", str(tmp_path)]
    subprocess.run(command, cwd=REPOSITORY, check=True, capture_output=True)
    report = (tmp_path / "bench.md").read_text()
    result = json.loads((tmp_path / "bench.json").read_text())
    assert "Machine:" in report and "![vct_adc7t](figures/vct_adc7t_training.png)" in report
    assert all((tmp_path / path).is_file() for path in result["curves"].values())


def test_a_run_of_some_parts_keeps_the_others_with_their_date(tmp_path, monkeypatch) -> None:
    from benchmarks import __main__ as bench

    monkeypatch.setattr(bench.adc, "run", lambda: {"cases": "first"})
    monkeypatch.setattr(bench.adc, "markdown", lambda result: f"ADC table {result['cases']}")
    bench.main(output_dir=str(tmp_path), parts=("adc",))
    first = json.loads((tmp_path / "bench.json").read_text())
    monkeypatch.setattr(bench, "_curves", lambda figure_dir: {})
    bench.main(output_dir=str(tmp_path), parts=("curves",))
    second = json.loads((tmp_path / "bench.json").read_text())
    assert second["adc"] == {"cases": "first"} and second["kept"] == {"adc": first["date"]}
    assert set(second["seconds"]) == {"curves"} and "--parts \"['curves']\"" in second["command"]
    report = (tmp_path / "bench.md").read_text()
    assert "ADC table first" in report and f"'adc': '{first['date']}'" in report


def test_a_kept_part_in_an_older_format_is_refused_before_any_part_runs(tmp_path, monkeypatch) -> None:
    from benchmarks import __main__ as bench

    monkeypatch.setattr(bench.adc, "run", lambda: {"cases": "first"})
    monkeypatch.setattr(bench.adc, "markdown", lambda result: f"ADC table {result['cases']}")
    bench.main(output_dir=str(tmp_path), parts=("adc",))
    stored = (tmp_path / "bench.json").read_text()
    monkeypatch.setattr(bench.adc, "markdown", lambda result: f"ADC table {result['rows']}")  # a newer format
    ran = []
    monkeypatch.setattr(bench, "_curves", lambda figure_dir: ran.append("curves") or {})
    with pytest.raises(ValueError, match="stored 'adc' result is in an older format"):
        bench.main(output_dir=str(tmp_path), parts=("curves",))
    assert ran == [] and (tmp_path / "bench.json").read_text() == stored


def test_quality_report_sets_the_model_beside_both_baselines(tmp_path) -> None:
    def summary(model: float, identity: float, gaussian: float) -> dict:
        columns = {}
        for prefix, psnr in (("", model), ("identity_", identity), ("gaussian_", gaussian)):
            for column in quality.COLUMNS:
                value = psnr if column.startswith("psnr") else 0.9 + psnr / 1000 if "ssim" in column else 1 / psnr
                columns[f"{prefix}{column}"] = {"mean": value, "std": 0.5, "n": 2}
        return columns

    result = {"evaluations": {}}
    for key, figures in {"watnet/realistic": (31.0, 28.0, 29.0), "watnet/seed001": (29.5, 28.0, 30.0)}.items():
        (tmp_path / key).mkdir(parents=True)
        (tmp_path / key / "metrics_summary.json").write_text(json.dumps(summary(*figures)))
        result["evaluations"][key] = quality.summarise(tmp_path / key)
    report = quality.markdown(result)
    assert "| watnet | realistic | 2 | 31.00 ± 0.50 / 28.00 ± 0.50 / 29.00 ± 0.50 |" in report
    assert report.splitlines()[2].endswith("| yes |") and report.splitlines()[3].endswith("| **no** |")


def test_each_lever_changes_one_setting_of_watnets_default() -> None:
    default = next(c for c in inference.cases("cpu") if c["bundle"] == "watnet" and c["backend"] == "eager")
    for lever in inference.lever_cases():
        changed = {key for key in lever if lever[key] != default[key]}
        assert changed and changed <= set(inference.LEVER_DEFAULTS) | {"compile"}, changed
        assert len(changed) == 1
    assert len({inference._label(lever) for lever in inference.lever_cases()}) == len(inference.WATNET_LEVERS)


def test_a_lever_case_runs_and_is_labelled_by_what_it_changes() -> None:
    case = {**inference.lever_cases()[0], "stride": 3, "threads": 1, "warmup": 0, "runs": 1, "slices": 3}
    result = run_case_in_subprocess("benchmarks.inference", case)
    assert "error" not in result, result
    assert result["input_shape"] == [1, 1, 184, 224, 3]
    assert "| watnet | default | eager+contiguous+threads 1+stride 3 | cpu |" in inference.markdown([result])


def test_workflow_timing_runs_the_users_command(tiny_dataset, tmp_path) -> None:
    from conftest import write_datalist_of_test_items

    datalist = write_datalist_of_test_items(tiny_dataset, tmp_path / "datalist.json")
    assert workflows.time_workflow("watnet", "inferring", datalist, tmp_path / "out") > 0
    assert sorted(path.name for path in (tmp_path / "out").glob("*_7t.nii.gz"))
    result = {"bundle": "watnet", "workflow": "inferring", "configs": "inference.yaml", "slab_stride": 2}
    result |= {"median_s": 61.0, "min_s": 59.0, "max_s": 70.0, "runs": 3}
    assert "| watnet | inferring | inference.yaml | 2 | 61.0 (59.0–70.0), n=3 | **no** |" in (
        workflows.markdown([result])
    )


def test_curves_export_joins_the_event_files_of_a_resumed_run(tmp_path, monkeypatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks import curves

    run_dir = tmp_path / "run"
    for start, steps, value in ((1796000000, (1, 2, 3), 1.0), (1796000900, (3, 4, 5), 2.0)):  # resumed at step 3
        writer = SummaryWriter(str(tmp_path / "writing"))
        for step in steps:
            writer.add_scalar("train_loss", value, step)
        writer.close()
        (written,) = (tmp_path / "writing").iterdir()
        run_dir.mkdir(exist_ok=True)
        written.rename(run_dir / f"events.out.tfevents.{start}.host.{100 + start % 7}.0")
    monkeypatch.setattr(curves, "LOGS", tmp_path / "logs")
    exported = json.loads(curves.export("watnet", str(run_dir)).read_text())
    assert exported["scalars"]["train_loss"] == [[1, 1.0], [2, 1.0], [3, 2.0], [4, 2.0], [5, 2.0]]


def test_reference_cnn_starts_as_the_identity_and_learns_a_denoising_on_tiny_data() -> None:
    rng = np.random.default_rng(0)
    clean = np.kron(rng.random((10, 10, 6)), np.ones((8, 8, 1))).astype(np.float32)  # 8 x 8 blocks: easy to denoise
    mask = np.ones_like(clean)
    noisy = (clean + rng.normal(0, 0.1, clean.shape)).astype(np.float32)
    torch.manual_seed(0)
    network = reference_cnn.residual_cnn(width=8, depth=3)
    assert np.array_equal(reference_cnn.predict(network, noisy, mask), np.clip(noisy, 0, 1))
    losses = reference_cnn.train(network, [{"image": noisy, "label": clean, "mask": mask}], iterations=60)
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    prediction = reference_cnn.predict(network.eval(), noisy, np.zeros_like(mask))
    assert prediction.shape == clean.shape and not prediction.any()  # zero outside the mask
