"""Training throughput (samples per second) and peak memory, one configuration per bundle.

A training step is the bundle's own ``network_def``, ``loss`` and ``optimizer`` from ``train.yaml`` (with the
overlay of the configuration): forward, loss, backward, optimizer step, on a batch of ``batch_size`` random samples of
the shape the bundle trains on. Data loading is not in the figure (the bundles cache their deterministic transforms;
random crops and flips cost little beside the network). A sample is one 2.5-D training example:

- ``watnet``: a 3-slice 64 x 64 patch (``patch_size``), predicting the same 3 slices;
- ``gan_unet_t1w7t``: a 3-slice axial slab of the padded 192 x 224 slice, predicting its centre slice (generator
  alone, as ``train.yaml`` trains it; ``perceptual_weight`` 0 on CPU, where the RadImageNet weights are not present);
- ``vct_adc7t``: one 2-channel (T1w, ADC) 176 x 208 axial slice, predicting the 7T ADC slice.

On CPU the default (compact) configurations run; on CUDA the paper-scale ones (``bf_unet.yaml``, ``paper.yaml``) with
AMP, beside the VCT paper's own figure: 16,434 slices per epoch in 4.25 min on one RTX 4090 at batch 80 (spec
``vct.md`` §8), 64.4 slices/s. Each case runs in its own process (``python -m benchmarks.training '<case>'``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from monai.bundle import ConfigParser

from benchmarks.inference import PAPER_CONTEXT, PAPER_OVERLAYS, bundle_parser
from benchmarks.measure import (
    cuda_peak_mib,
    peak_rss_mib,
    report_case,
    reset_cuda_peak,
    run_case_in_subprocess,
    time_call,
)

SAMPLE_SHAPES = {"watnet": (3, 64, 64), "gan_unet_t1w7t": (3, 192, 224), "vct_adc7t": (2, 176, 208)}
VCT_PAPER_SLICES_PER_S = round(16434 / (4.25 * 60), 1)


def cases(device: str) -> list[dict[str, Any]]:
    config = "paper" if device == "cuda" else "default"
    return [
        {
            "bundle": bundle,
            "config": config if bundle in PAPER_OVERLAYS else "default",
            "device": device,
            "amp": device == "cuda",
        }
        for bundle in SAMPLE_SHAPES
    ]


def _parser(case: dict[str, Any]) -> ConfigParser:
    parser = bundle_parser(case["bundle"], "train.yaml", case["config"], case["device"])
    if case["device"] == "cpu" and "perceptual_weight" in parser:
        parser["perceptual_weight"] = 0.0
    return parser


def measure(case: dict[str, Any], warmup: int = 2, runs: int = 5) -> dict[str, Any]:
    """Times training steps of one case in this process; see the module docstring."""
    parser = _parser(case)
    device = torch.device(case["device"])
    network = parser.get_parsed_content("network").train()
    loss_function = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    batch_size = parser.get_parsed_content("batch_size")
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand((batch_size, *SAMPLE_SHAPES[case["bundle"]]), generator=generator).to(device)
    context_size = PAPER_CONTEXT.get(case["bundle"]) if case["config"] == "paper" else None
    kwargs = {"context": torch.zeros(batch_size, context_size + 1, device=device)} if context_size else {}
    with torch.no_grad():
        targets = torch.rand_like(network(inputs, **kwargs))
    scaler = torch.amp.GradScaler("cuda", enabled=case["amp"])
    autocast = torch.autocast("cuda", dtype=torch.float16) if case["amp"] else nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_function(network(inputs, **kwargs), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    rss_before = peak_rss_mib()
    reset_cuda_peak(device)
    timing = time_call(step, warmup, runs, device)
    return {
        **case,
        "batch_size": batch_size,
        "sample_shape": list(SAMPLE_SHAPES[case["bundle"]]),
        "parameters": sum(p.numel() for p in network.parameters()),
        "timing": timing.as_dict(),
        "samples_per_s": round(batch_size / timing.median_s, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_rise_mib": round(peak_rss_mib() - rss_before, 1),
        "cuda_peak_mib": cuda_peak_mib(device),
    }


def run(devices: list[str], warmup: int = 2, runs: int = 5) -> list[dict[str, Any]]:
    results = []
    for device in devices:
        for case in cases(device):
            results.append(run_case_in_subprocess("benchmarks.training", {**case, "warmup": warmup, "runs": runs}))
            print(f"training {case}: {results[-1].get('samples_per_s', results[-1].get('error'))}", flush=True)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        (
            "| bundle | config | device | params | batch × sample | step s, median (min–max) | samples/s | "
            "peak RSS MiB (rise) | CUDA peak MiB |"
        ),
        "| --- | --- | --- | ---: | --- | --- | ---: | --- | ---: |",
    ]
    for r in results:
        device = f"{r['device']}{' + AMP' if r.get('amp') else ''}"
        head = f"| {r['bundle']} | {r['config']} | {device} |"
        if "error" in r:
            rows.append(f"{head} | | | error: {r['error']} | | | |")
            continue
        t = r["timing"]
        shape = "×".join(str(n) for n in r["sample_shape"])
        cuda = f"{r['cuda_peak_mib']:.0f}" if r["cuda_peak_mib"] else ""
        rows.append(
            f"{head} {r['parameters']:,} | {r['batch_size']} × {shape} | {t['median_s']:.3f} ({t['min_s']:.3f}–"
            f"{t['max_s']:.3f}), n={t['runs']} | {r['samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} "
            f"({r['rss_rise_mib']:.0f}) | {cuda} |"
        )
    rows.append(
        f"| vct_adc7t (paper's figure) | paper | RTX 4090 + AMP | 123,271,105 | 80 × 2×176×208 (slices) | "
        f"{80 / VCT_PAPER_SLICES_PER_S:.3f} (derived) | {VCT_PAPER_SLICES_PER_S} | | |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    report_case(measure, ("warmup", "runs"))
