"""Whole-volume inference: time and peak memory per bundle, configuration, backend and device.

What is timed is the bundle's ``inferer`` (slab by slab for the T1w bundles, slice by slice for ``vct_adc7t``, at the
batch size of its ``inference.yaml``) running its network over one whole, already preprocessed and padded volume:
a 182 x 218 x 182 T1w volume (the MNI grid of the TELL data), or a 173 x 204 x 173 two-channel T1w + ADC volume for
``vct_adc7t``, random values in the network's input range (timing and memory do not depend on them). File reading,
resampling and writing are not in the figure; they are the same for every backend.

Backends: ``eager`` (the ``network_def`` of ``inference.yaml`` with ``models/model.pt``), ``torchscript``
(``models/model.ts``), ``onnxruntime`` (``models/model.onnx`` through ``synth7t.engines.OnnxRuntimeNetwork``). The
paper-scale configurations (``gan_unet_t1w7t`` with ``bf_unet.yaml``, ``vct_adc7t`` with ``paper.yaml``) have no
shipped weights: they run eager with their random initialisation, which costs the same. ``watnet``'s default is the
paper's architecture followed by its full-resolution refiner. On CUDA, eager also runs under float16 autocast
(``amp``) and, for VCT, ``torch.compile``.

On the CPU a whole WATNet volume takes minutes (its convolutions run at full resolution), so there the timed unit is
a block of ``slices`` axial positions of the same volume (by default one inferer batch, 16; 4 for the paper-scale
networks): the inferers run independent, fixed-size batches of slabs or slices, so the whole-volume time is the
block time times the number of slices over the block size, reported as an estimate (``whole_volume_estimated``).
``slices=None`` times the whole volume (the default on CUDA).

Levers (``lever_cases``): ``watnet``'s default, the slowest bundle (over a minute per volume before its slab
stride 2), is also timed with one setting changed per case: contiguous instead of channels-last memory, one torch
thread instead of torch's default, bfloat16 autocast, 4 or 32 slabs per forward pass instead of 16, ``torch.compile``, slab stride 1
(the faithful scheme, every slice from three slabs) or 3 instead of the default 2 (quality in the model card). The
random volumes have no all-zero slabs, so the inferer's reuse of their prediction saves nothing here; the workflow
part, on a real volume, includes it.

Each case runs in its own process (``python -m benchmarks.inference '<case>'``), so its peak resident set size is
its own: ``peak_rss_mib`` is the process peak, ``rss_rise_mib`` its rise during the warm-up and timed runs.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.transforms import DivisiblePad

from synth7t.engines import AutocastNetwork

from benchmarks.measure import (
    REPOSITORY,
    cuda_peak_mib,
    peak_rss_mib,
    report_case,
    reset_cuda_peak,
    run_case_in_subprocess,
    time_call,
)

VOLUME_SHAPES = {"watnet": (182, 218, 182), "gan_unet_t1w7t": (182, 218, 182), "vct_adc7t": (173, 204, 173)}
PAPER_OVERLAYS = {"gan_unet_t1w7t": "bf_unet.yaml", "vct_adc7t": "paper.yaml"}
BACKENDS = ("eager", "torchscript", "onnxruntime")
CHANNELS_LAST = {"watnet"}  # the bundles whose inference.yaml runs the network channels-last
# What each case may change from its bundle's inference.yaml (the levers): torch threads (None: torch's default),
# channels-last memory format, bfloat16 autocast, slabs per forward pass and slab stride (None: the config's).
LEVER_DEFAULTS = {"threads": None, "channels_last": None, "bf16": False, "batch_size": None, "stride": None}
# watnet's levers (the slowest default): one change each from its inference.yaml
WATNET_LEVERS = (
    {"channels_last": False},
    {"threads": 1},
    {"bf16": True},
    {"batch_size": 4},
    {"batch_size": 32},
    {"compile": True},
    {"stride": 1},
    {"stride": 3},
)
# bf_unet.yaml conditions on age, sex and diagnosis (one value each, synth7t.bundle.encode_subject_context)
PAPER_CONTEXT = {"gan_unet_t1w7t": 3}


def cases(device: str) -> list[dict[str, Any]]:
    """Every case for ``device``: each bundle's default under every backend, then its paper-scale configuration;
    on CUDA also AMP and, for VCT, ``torch.compile``."""
    listed = []
    for bundle in VOLUME_SHAPES:
        listed += [{"bundle": bundle, "config": "default", "backend": backend} for backend in BACKENDS]
        if bundle in PAPER_OVERLAYS:
            listed.append({"bundle": bundle, "config": "paper", "backend": "eager"})
        if device == "cuda":
            configs = ["default", *(["paper"] if bundle in PAPER_OVERLAYS else [])]
            listed += [{"bundle": bundle, "config": config, "backend": "eager", "amp": True} for config in configs]
            if bundle == "vct_adc7t":
                listed += [{"bundle": bundle, "config": c, "backend": "eager", "compile": True} for c in configs]
    return [{"device": device, "amp": False, "compile": False, **LEVER_DEFAULTS, **case} for case in listed]


def lever_cases() -> list[dict[str, Any]]:
    """``watnet``'s default on the CPU with one lever changed per case (``WATNET_LEVERS``); the default's own eager
    and ONNX Runtime rows of :func:`cases` are the references."""
    base = {"bundle": "watnet", "config": "default", "backend": "eager", "device": "cpu", "amp": False}
    return [{**base, "compile": False, **LEVER_DEFAULTS, **lever} for lever in WATNET_LEVERS]


def bundle_parser(bundle: str, config_file: str, config: str, device: str) -> ConfigParser:
    """The bundle's ``config_file`` on ``device``; for ``config="paper"`` with the paper-scale overlay, of which an
    inference config takes the ids it has (the architecture; the overlays are written for ``train.yaml``)."""
    configs = REPOSITORY / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / config_file))
    if config == "paper":
        overlay = ConfigParser.load_config_file(str(configs / PAPER_OVERLAYS[bundle]))
        shared = config_file == "train.yaml"
        parser.update({key: value for key, value in overlay.items() if shared or key in parser.config})
    parser["bundle_root"] = str(configs.parent)
    parser["device"] = f"$torch.device('{device}')"
    return parser


def _network(parser: ConfigParser, case: dict[str, Any]) -> torch.nn.Module:
    models = Path(parser["bundle_root"]) / "models"
    device = torch.device(case["device"])
    if case["backend"] == "torchscript":
        return torch.jit.load(str(models / "model.ts"), map_location=device).eval()
    if case["backend"] == "onnxruntime":
        from synth7t.engines import OnnxRuntimeNetwork

        return OnnxRuntimeNetwork(str(models / "model.onnx"), device).eval()
    network = parser.get_parsed_content("network_def").to(device).eval()
    if case["config"] == "default":
        network.load_state_dict(torch.load(models / "model.pt", map_location=device, weights_only=True))
    channels_last = case.get("channels_last")
    if channels_last if channels_last is not None else case["bundle"] in CHANNELS_LAST:
        network = network.to(memory_format=torch.channels_last)
    if case.get("bf16"):
        network = AutocastNetwork(network, case["device"], torch.bfloat16)
    return torch.compile(network) if case["compile"] else network


def _volume(parser: ConfigParser, bundle: str, device: str, slices: int | None) -> torch.Tensor:
    """A padded ``(1, C, H, W, D)`` input as the bundle's preprocessing makes it, in its network input range, with
    ``D`` the volume's or ``slices``."""
    channels = len(parser["input_keys"]) if "input_keys" in parser else 1
    height, width, depth = VOLUME_SHAPES[bundle]
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((channels, height, width, slices or depth), generator=generator)
    if bundle == "vct_adc7t":
        volume = volume * 2 - 1  # ResViT's [-1, 1]
    divisor = parser.get_parsed_content("divisible_by")
    return DivisiblePad(k=[divisor, divisor, 1])(volume).as_tensor()[None].to(device)


def measure(case: dict[str, Any], warmup: int = 1, runs: int = 3, slices: int | None = None) -> dict[str, Any]:
    """Times one case in this process over ``slices`` axial positions or the whole volume; see the module docstring."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    parser = bundle_parser(case["bundle"], "inference.yaml", case["config"], case["device"])
    for key, lever in (("inference_batch_size", "batch_size"), ("slab_stride", "stride")):
        if case.get(lever):
            parser[key] = case[lever]
    network = _network(parser, case)
    inferer = parser.get_parsed_content("inferer")
    image = _volume(parser, case["bundle"], case["device"], slices)
    context = PAPER_CONTEXT.get(case["bundle"]) if case["config"] == "paper" else None
    kwargs = {"context": torch.zeros(1, context, device=image.device)} if context else {}
    autocast = torch.autocast("cuda", dtype=torch.float16) if case["amp"] else nullcontext()

    def infer() -> None:
        with torch.inference_mode(), autocast:
            inferer(image, network, **kwargs)

    rss_before = peak_rss_mib()
    reset_cuda_peak(case["device"])
    timing = time_call(infer, warmup, runs, case["device"])
    parameters = sum(p.numel() for p in network.parameters()) if case["backend"] == "eager" else None
    return {
        **case,
        "input_shape": list(image.shape),
        "parameters": parameters,
        "timing": timing.as_dict(),
        "slices_per_s": round(image.shape[-1] / timing.median_s, 2),
        "whole_volume_s": round(timing.median_s * VOLUME_SHAPES[case["bundle"]][-1] / image.shape[-1], 2),
        "whole_volume_estimated": slices is not None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_rise_mib": round(peak_rss_mib() - rss_before, 1),
        "cuda_peak_mib": cuda_peak_mib(case["device"]),
    }


def run(
    devices: list[str], warmup: int = 1, runs: int = 3, cpu_slices: int = 16, cpu_paper_slices: int = 4
) -> list[dict[str, Any]]:
    """Every case of every device, then the CPU levers, each in a fresh process; on the CPU over blocks of
    ``cpu_slices`` (the default configurations) or ``cpu_paper_slices`` (the paper-scale ones, 5 to 50 times slower
    per slice)."""
    results = []
    for device in devices:
        for case in cases(device) + (lever_cases() if device == "cpu" else []):
            slices = (cpu_slices if case["config"] == "default" else cpu_paper_slices) if device == "cpu" else None
            settings = {"warmup": warmup, "runs": runs, "slices": slices}
            results.append(run_case_in_subprocess("benchmarks.inference", {**case, **settings}))
            print(_line(results[-1]), flush=True)
    return results


def _label(result: dict[str, Any]) -> str:
    """The backend and every lever that differs from the bundle's inference.yaml, e.g. ``eager+stride 2``."""
    extras = [name for name in ("amp", "compile", "bf16") if result.get(name)]
    if result.get("channels_last") is not None:
        extras.append("channels-last" if result["channels_last"] else "contiguous")
    for name in ("threads", "batch_size", "stride"):
        if result.get(name):
            extras.append(f"{name.replace('_', ' ')} {result[name]}")
    return "+".join([result["backend"], *extras])


def _line(result: dict[str, Any]) -> str:
    where = f"{result['bundle']} {result['config']} {_label(result)} {result['device']}"
    if "error" in result:
        return f"{where}: error {result['error']}"
    timing = result["timing"]
    return f"{where}: {timing['median_s']:.2f} s (min {timing['min_s']:.2f}, max {timing['max_s']:.2f}) per block"


def markdown(results: list[dict[str, Any]]) -> str:
    """A table: one row per case, the timed unit's median (min-max), the whole-volume time (≈: estimated from the
    block), speed-up against eager of the same configuration."""
    eager = {
        (r["bundle"], r["config"], r["device"]): r["timing"]["median_s"]
        for r in results
        if "error" not in r and _label(r) == "eager"
    }
    rows = [
        (
            "| bundle | config | backend | device | params | timed slices | median s (min–max) | whole volume s | "
            "vs eager | slices/s | peak RSS MiB (rise) | CUDA peak MiB |"
        ),
        "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        head = f"| {r['bundle']} | {r['config']} | {_label(r)} | {r['device']} |"
        if "error" in r:
            rows.append(f"{head} | | | error: {r['error']} | | | | | |")
            continue
        t = r["timing"]
        baseline = eager.get((r["bundle"], r["config"], r["device"]))
        ratio = f"{baseline / t['median_s']:.2f}×" if baseline else ""
        params = f"{r['parameters']:,}" if r["parameters"] else ""
        cuda = f"{r['cuda_peak_mib']:.0f}" if r["cuda_peak_mib"] else ""
        whole = f"{'≈' if r['whole_volume_estimated'] else ''}{r['whole_volume_s']:.1f}"
        rows.append(
            f"{head} {params} | {r['input_shape'][-1]} | {t['median_s']:.2f} ({t['min_s']:.2f}–{t['max_s']:.2f}), "
            f"n={t['runs']} | {whole} | {ratio} | {r['slices_per_s']:.2f} | {r['peak_rss_mib']:.0f} "
            f"({r['rss_rise_mib']:.0f}) | {cuda} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    report_case(measure, ("warmup", "runs", "slices"))
