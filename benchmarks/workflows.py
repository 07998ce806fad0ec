"""One volume through each bundle's default workflows, as a user runs them: wall-clock seconds per command.

For every bundle, ``python -m monai.bundle run inferring`` with its ``inference.yaml`` and ``run evaluating`` with
``train.yaml`` + ``evaluate.yaml``, each left at its defaults (backend, slab stride, batch size, workers), on one
subject of the prepared TELL data: the validation subject sub-TELL0105, a 182 x 218 x 182 T1w volume
(``data/tell7t_realistic``) or, for ``vct_adc7t``, its 3T T1w and raw diffusion series
(``data/tell7t_diffusion``, the ADC fitted in the workflow). The time is the whole command: interpreter and library
start-up, config parsing, the pre-compute checks, reading, inference, metrics and writing. Each command runs
``runs`` times in a fresh process; median (min–max). Missing prepared data are prepared first.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from benchmarks.measure import REPOSITORY, markdown_table
from benchmarks.quality import dataset, prepared_data

SUBJECT = "sub-TELL0105"
WORKFLOWS = {  # run id: the configs merged, in order
    "inferring": ("inference.yaml",),
    "evaluating": ("train.yaml", "evaluate.yaml"),
}
BUNDLES = ("watnet", "gan_unet_t1w7t", "vct_adc7t")
TARGET_S = 60.0  # the bound on one volume's inference or evaluation on the 2-core machine


def one_subject_datalist(bundle: str, work: Path) -> Path:
    """A datalist whose ``test`` list is :data:`SUBJECT` of the bundle's prepared data, paths made absolute."""
    if bundle == "vct_adc7t":
        directory = prepared_data("tell7t_diffusion", "scripts/prepare_diffusion_data.py")
    else:
        directory = dataset("realistic")
    items = [i for split in json.loads((directory / "datalist.json").read_text()).values() for i in split]
    (item,) = [i for i in items if i.get("subject") == SUBJECT]
    absolute = {key: value if key == "subject" else str(directory / value) for key, value in item.items()}
    path = work / f"{bundle}_datalist.json"
    path.write_text(json.dumps({"test": [absolute]}))
    return path


def time_workflow(bundle: str, run_id: str, datalist: Path, output_dir: Path) -> float:
    """Seconds of one ``python -m monai.bundle run <run_id>`` of ``bundle`` at its defaults."""
    configs = str([str(REPOSITORY / "bundles" / bundle / "configs" / name) for name in WORKFLOWS[run_id]])
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs]
    command += ["--datalist", str(datalist), "--output_dir", str(output_dir)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def slab_stride(bundle: str) -> int | None:
    """The ``slab_stride`` of the bundle's ``inference.yaml`` (``None`` where slabs are not strided)."""
    config = ConfigParser.load_config_file(str(REPOSITORY / "bundles" / bundle / "configs" / "inference.yaml"))
    return config.get("slab_stride")


def run(work: Path, runs: int = 3) -> list[dict[str, Any]]:
    """Every bundle's two default workflows on one subject, ``runs`` times each."""
    results = []
    for bundle in BUNDLES:
        datalist = one_subject_datalist(bundle, work)
        for run_id in WORKFLOWS:
            timings = [time_workflow(bundle, run_id, datalist, work / f"{bundle}_{run_id}_{i}") for i in range(runs)]
            result = {
                "bundle": bundle,
                "workflow": run_id,
                "configs": " + ".join(WORKFLOWS[run_id]),
                "slab_stride": slab_stride(bundle),
                "median_s": round(statistics.median(timings), 1),
                "min_s": round(min(timings), 1),
                "max_s": round(max(timings), 1),
                "runs": runs,
            }
            results.append(result)
            print(f"{bundle} {run_id}: {result['median_s']} s", flush=True)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per bundle and workflow: configs, slab stride, median (min–max) seconds, within 60 s."""
    header = ["bundle", "workflow", "configs", "slab stride", "median s (min–max)", f"≤ {TARGET_S:.0f} s"]
    rows = [
        [
            r["bundle"], r["workflow"], r["configs"], r["slab_stride"] or "",
            f"{r['median_s']:.1f} ({r['min_s']:.1f}–{r['max_s']:.1f}), n={r['runs']}",
            "yes" if r["median_s"] <= TARGET_S else "**no**",
        ]
        for r in results
    ]  # fmt: skip
    return markdown_table(header, rows)
