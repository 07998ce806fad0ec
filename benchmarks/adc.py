"""ADC of full-size diffusion series: synth7t's ``ComputeADC`` against DIPY's ``TensorModel``, time and agreement.

What is measured, for each protocol of :data:`PROTOCOLS` (default: both) on a synthetic brain of 145 x 174 x 145
voxels (the HCP 1.25 mm grid):

* ``"three-shell"``: b = 1000, 2000, 3000 s/mm² with 30 directions each and 6 b=0 volumes, 96 volumes as in one HCP
  run (the series the issue's speed target is set on); ``"two-shell, 64 directions"``: b = 1000, 2000 with 64
  directions each and 6 b=0 volumes (134 volumes; the second protocol of the agreement target);
* the time to fit one ADC map with :class:`synth7t.transforms.ComputeADC` for each method of :data:`ADC_METHODS`
  (``"dti_wls"``, the default, which is DIPY's WLS tensor mean diffusivity; ``"shells"``, the mono-exponential fit of
  the direction-averaged shells), float64, on the CPU and, for the default, on the GPU when
  ``torch.cuda.is_available()`` (the series moved there before timing); and with DIPY's
  ``TensorModel(gtab).fit(data, mask=mask).md`` with DIPY's default fit method (read from DIPY, ``"WLS"`` in DIPY
  1.12: weights from a first OLS fit), single process, on the same series and brain mask. Both fit the mask voxels
  only;
* the rise of the process's peak resident set size across each method's warm-up and timed calls (and, on CUDA, of the
  allocated GPU memory). Each method runs in its own process (:func:`benchmarks.measure.run_case_in_subprocess`), which
  builds the identical series from the same seed before it reads the baseline peak, so neither the series' generation
  nor another method counts in the time or the peak. The series is written chunk by chunk into its final array, so
  generation's transient buffers stay at a few tens of MiB: the reported rise can be that much too low;
* throughput: voxels in the brain mask per second of the median time, and the ratio of DIPY's median time to each
  method's;
* agreement inside the brain mask between each ``ComputeADC`` method and DIPY's mean diffusivity (MD), both mm²/s,
  and of each against the phantom's ground truth;
* agreement with DIPY on the real series DIPY ships inside its package (``small_64D``: one shell of 64 directions,
  ``small_101D``: 101 directions over b = 20 ... 4000), :data:`DIPY_BUNDLED`, in-process (they are tiny).

How: the first call of each method is a warm-up whose duration is kept; a method whose first call takes more than
``slow_s`` (60 s; DIPY on the full volume here) is not called again: that call is its one timed run (DIPY's fit is
NumPy code with no first-call compilation or allocation to warm up), and its result says so (``runs_reduced``);
otherwise the remaining warm-ups and ``runs`` timed runs follow (:func:`benchmarks.measure.time_call`: median, min
and max).

The phantom: an ellipsoid of brain (spanning 84 % of each axis) with an outer CSF layer, two ventricles, grey matter,
and a folded white-matter core, with partial volume at every border. Tissue diffusivities and relative b=0 signals are
those of :mod:`synth7t.diffusion_phantom` (CSF 3.0e-3, grey matter 0.80e-3, white matter 0.70e-3 mm²/s); unlike that
module's isotropic model, white matter has an axially symmetric tensor (axial / radial = 4, FA 0.71, MD 0.70e-3) along a
fibre field that swirls about the z axis, so the DTI fit is not trivial. The signal is the sum of the compartments'
signals, scaled so the mean brain b=0 signal is 1000, with Rician noise of ``sigma = 1000 / snr`` (the convention of
:func:`synth7t.diffusion_phantom.simulate_dwi`; default ``snr`` that of its 3T protocol), 0 outside the brain. The
directions of each shell are a Fibonacci set of the sphere, rotated from shell to shell; ``direction_balance`` reports
``max |3/n sum g g^T - I|`` per shell (0 for a perfectly balanced set, where the geometric average equals the DTI MD).
The ground-truth MD is the b -> 0 limit of the noise-free signal's direction-averaged decay, i.e. the compartments'
MDs weighted by their b=0 signals; with free water in a voxel and high b-values, a log-linear fit of the whole series
is expected to fall below it, DIPY's and ours alike.

Nothing here is a test assertion. Usage: ``python -c "from benchmarks.adc import run, markdown; print(markdown(run()))"``;
``python -m benchmarks.adc '<case as JSON>'`` runs one method (see :func:`measure_case`) and prints its figures as
JSON on its last line.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.measure import (
    Timing,
    cuda_peak_mib,
    machine,
    peak_rss_mib,
    report_case,
    reset_cuda_peak,
    run_case_in_subprocess,
    time_call,
)
from synth7t.diffusion_phantom import (
    DIFFUSIVITY_MM2_S,
    PROTOCOL_3T,
    RELATIVE_S0,
    TISSUES,
)

MODULE = "benchmarks.adc"
SLOW_S = 60.0
#: The protocols measured: the project's three-shell HCP-like series, and a second protocol (64 directions on each of
#: two shells, as HCP's 7T diffusion runs) for agreement on another b-range and direction count.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "three-shell": {"shells": [1000.0, 2000.0, 3000.0], "directions_per_shell": 30, "b0_volumes": 6},
    "two-shell, 64 directions": {"shells": [1000.0, 2000.0], "directions_per_shell": 64, "b0_volumes": 6},
}
#: The ``ComputeADC`` methods timed and compared with DIPY (the default first; only it also runs on CUDA).
ADC_METHODS = ("dti_wls", "shells")
#: The real series DIPY ships inside its package (read offline with ``dipy.data.get_fnames``).
DIPY_BUNDLED = ("small_64D", "small_101D")
BRAIN_SEMI_AXIS_FRACTION = 0.42
WM_AXIAL_TO_RADIAL = 4.0
MEAN_BRAIN_B0 = 1000.0
CHUNK_VOXELS = 8192
CSF, GM, WM = (TISSUES.index(name) for name in ("csf", "grey_matter", "white_matter"))


@dataclass(frozen=True)
class Phantom:
    """Brain mask of the grid, and per mask voxel (C order) the CSF/GM/WM fractions and the unit WM fibre direction."""

    mask: np.ndarray
    fractions: np.ndarray
    fibres: np.ndarray


def _edge(distance: np.ndarray, width: float) -> np.ndarray:
    """Smooth 0 -> 1 step across ``distance = 0`` (partial volume over about ``4 * width``)."""
    return 0.5 + 0.5 * np.tanh(distance / (2 * width))  # the logistic function, without overflow


def brain_phantom(size: Sequence[int]) -> Phantom:
    """The ellipsoidal brain of the module docstring on a grid of ``size`` voxels."""
    semi_axes = np.asarray(size, dtype=np.float32) * BRAIN_SEMI_AXIS_FRACTION
    centre = (np.asarray(size, dtype=np.float32) - 1) / 2
    x, y, z = ((np.arange(n, dtype=np.float32) - c) / a for n, c, a in zip(size, centre, semi_axes))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    width = 0.5 / float(semi_axes.min())  # half a voxel in units of the semi-axes
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = _edge(1.0 - r, width)
    ventricles = np.maximum(
        *(
            _edge(
                0.08 * (1.0 - np.sqrt(((x - side) / 0.08) ** 2 + ((y - 0.05) / 0.3) ** 2 + ((z - 0.1) / 0.15) ** 2)),
                width,
            )
            for side in (-0.15, 0.15)
        )
    )
    csf = np.maximum(_edge(r - 0.93, width), ventricles)
    folds = 0.06 * np.sin(7 * np.arctan2(y, x)) * np.sin(5 * np.pi * z)
    wm = (1.0 - csf) * _edge(0.8 + folds - r, width)
    mask = brain > 0.5
    fractions = np.zeros((int(mask.sum()), len(TISSUES)), dtype=np.float32)
    fractions[:, CSF] = (brain * csf)[mask]
    fractions[:, WM] = (brain * wm)[mask]
    fractions[:, GM] = brain[mask] - fractions[:, CSF] - fractions[:, WM]
    fibres = np.stack(np.broadcast_arrays(-y, x, np.full_like(z, 0.5)), axis=-1)[mask]
    fibres /= np.linalg.norm(fibres, axis=1, keepdims=True)
    return Phantom(mask, fractions, fibres)


def ground_truth_md(phantom: Phantom) -> np.ndarray:
    """Per mask voxel, the compartments' MDs weighted by their b=0 signals (mm²/s): the b -> 0 slope of the signal."""
    weights = phantom.fractions * RELATIVE_S0.astype(np.float32)
    return (weights @ DIFFUSIVITY_MM2_S) / weights.sum(axis=1)


def fibonacci_directions(n: int, rotation: float) -> np.ndarray:
    """``(n, 3)`` unit vectors spread evenly over the sphere (Fibonacci lattice), turned by ``rotation`` about z."""
    z = 1.0 - (2.0 * np.arange(n) + 1.0) / n
    azimuth = np.arange(n) * np.pi * (3.0 - np.sqrt(5.0)) + rotation
    ring = np.sqrt(1.0 - z**2)
    return np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=1)


def gradient_table(
    shells: Sequence[float], directions_per_shell: int, b0_volumes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``bvals`` (N,) and unit ``bvecs`` (N, 3), b=0 volumes first (zero vectors), then shell after shell."""
    turn = 2 * np.pi / (len(shells) * directions_per_shell)
    bvecs = [np.zeros((b0_volumes, 3))] + [
        fibonacci_directions(directions_per_shell, i * turn) for i in range(len(shells))
    ]
    bvals = np.concatenate([np.zeros(b0_volumes), np.repeat(np.asarray(shells, dtype=float), directions_per_shell)])
    return bvals, np.concatenate(bvecs)


def direction_balance(bvecs: np.ndarray, directions_per_shell: int) -> float:
    """Largest ``|3/n sum g g^T - I|`` entry over the shells: 0 when every shell's directions are balanced."""
    shells = bvecs[np.linalg.norm(bvecs, axis=1) > 0].reshape(-1, directions_per_shell, 3)
    second_moments = np.einsum("sni,snj->sij", shells, shells) * 3 / directions_per_shell
    return float(np.abs(second_moments - np.eye(3)).max())


def signal_chunks(
    phantom: Phantom, bvals: np.ndarray, bvecs: np.ndarray, snr: float, seed: int
) -> Iterator[tuple[slice, np.ndarray]]:
    """The noisy series of the mask voxels, ``(slice of mask voxels, (chunk, N) float32)``, in mask order."""
    rng = np.random.default_rng(seed)
    s0 = RELATIVE_S0.astype(np.float32)
    scale = MEAN_BRAIN_B0 / float((phantom.fractions @ s0).mean())
    sigma = np.float32(MEAN_BRAIN_B0 / snr)
    md_wm = DIFFUSIVITY_MM2_S[WM]
    radial = 3 * md_wm / (WM_AXIAL_TO_RADIAL + 2)
    b = bvals.astype(np.float32)
    isotropic = np.exp(-np.outer(DIFFUSIVITY_MM2_S, b)).astype(np.float32)  # (tissues, N)
    isotropic[WM] = 0.0
    g = bvecs.astype(np.float32)
    for start in range(0, len(phantom.fractions), CHUNK_VOXELS):
        part = slice(start, start + CHUNK_VOXELS)
        weights = phantom.fractions[part] * s0 * np.float32(scale)
        cos2 = (phantom.fibres[part] @ g.T) ** 2
        wm = np.exp(-b * np.float32(radial) - b * np.float32((WM_AXIAL_TO_RADIAL - 1) * radial) * cos2)
        signal = weights @ isotropic + weights[:, WM : WM + 1] * wm
        noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * sigma
        yield part, np.hypot(signal + noise[0], noise[1])


def dwi_series(
    phantom: Phantom, bvals: np.ndarray, bvecs: np.ndarray, snr: float, seed: int, channel_first: bool
) -> np.ndarray:
    """The series as float32, ``(N, *spatial)`` (MONAI) or ``(*spatial, N)`` (DIPY); same values either way."""
    spatial, n = phantom.mask.shape, len(bvals)
    series = np.zeros((n, *spatial) if channel_first else (*spatial, n), dtype=np.float32)
    voxels = np.flatnonzero(phantom.mask)
    flat = series.reshape(n, -1) if channel_first else series.reshape(-1, n)
    for part, values in signal_chunks(phantom, bvals, bvecs, snr, seed):
        if channel_first:
            flat[:, voxels[part]] = values.T
        else:
            flat[voxels[part]] = values
    return series


def dipy_default_fit_method() -> str:
    from dipy.reconst.dti import TensorModel

    return str(inspect.signature(TensorModel).parameters["fit_method"].default)


def timed(fn: Callable[[], Any], warmup: int, runs: int, device: str, slow_s: float) -> tuple[Timing, float, bool]:
    """Timing of ``fn``, its first (warm-up) call's seconds, and whether it was slow enough for a single timed run."""
    first_s = time_call(fn, warmup=0, runs=1, device=device).median_s
    if first_s > slow_s:
        return Timing(first_s, first_s, first_s, runs=1, warmup=0), first_s, True
    timing = time_call(fn, warmup=max(warmup - 1, 0), runs=runs, device=device)
    return replace(timing, warmup=max(warmup, 1)), first_s, False


def ours_fit(case: dict[str, Any], phantom: Phantom, bvals: np.ndarray, bvecs: np.ndarray) -> Callable[[], np.ndarray]:
    """``ComputeADC`` (``case["adc_method"]``) of the series on ``case["device"]``, the series and mask already there;
    returns the map."""
    from synth7t.transforms import ComputeADC

    series = dwi_series(phantom, bvals, bvecs, case["snr"], case["seed"], channel_first=True)
    dwi = torch.from_numpy(series).to(case["device"])
    mask = torch.from_numpy(phantom.mask).to(case["device"])
    transform = ComputeADC(bvals, bvecs, method=case["adc_method"])
    return lambda: transform(dwi, mask)[0]


def dipy_fit(case: dict[str, Any], phantom: Phantom, bvals: np.ndarray, bvecs: np.ndarray) -> Callable[[], np.ndarray]:
    """DIPY ``TensorModel`` (default fit method) of the series in the mask; returns the MD map."""
    from dipy.core.gradients import gradient_table as dipy_gradient_table
    from dipy.reconst.dti import TensorModel

    series = dwi_series(phantom, bvals, bvecs, case["snr"], case["seed"], channel_first=False)
    model = TensorModel(dipy_gradient_table(bvals, bvecs=bvecs))
    return lambda: model.fit(series, mask=phantom.mask).md


METHODS: dict[str, Callable[[dict[str, Any], Phantom, np.ndarray, np.ndarray], Callable[[], Any]]] = {
    "synth7t": ours_fit,
    "dipy": dipy_fit,
}


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """One method in this process: build the series, then time the fit and read the peak memory around it.

    ``case``: ``method`` (``"synth7t"`` or ``"dipy"``), ``adc_method`` (for ``"synth7t"``: one of
    :data:`ADC_METHODS`), ``device``, ``size``, ``shells``, ``directions_per_shell``, ``b0_volumes``, ``snr``,
    ``seed``, ``warmup``, ``runs``, ``slow_s``, and ``output``: the ``.npy`` path where the fitted map (float32,
    mm²/s) is saved for the agreement figures.
    """
    phantom = brain_phantom(case["size"])
    bvals, bvecs = gradient_table(case["shells"], case["directions_per_shell"], case["b0_volumes"])
    fit = METHODS[case["method"]](case, phantom, bvals, bvecs)
    device = case["device"]
    reset_cuda_peak(device)
    cuda_before = torch.cuda.memory_allocated(device) / 2**20 if device == "cuda" else None
    last: list[Any] = []

    def call() -> None:
        last.clear()  # the previous map is freed before the next fit, so it does not add to the peak
        last.append(fit())

    rss_before = peak_rss_mib()
    timing, first_s, reduced = timed(call, case["warmup"], case["runs"], device, case["slow_s"])
    rss_rise = peak_rss_mib() - rss_before
    cuda_peak = cuda_peak_mib(device)
    md = last[0].cpu().numpy() if isinstance(last[0], torch.Tensor) else last[0]
    np.save(case["output"], md.astype(np.float32))
    voxels = int(phantom.mask.sum())
    return {
        "method": case["method"],
        "adc_method": case.get("adc_method"),
        "device": device,
        "timing": timing.as_dict(),
        "first_call_s": round(first_s, 4),
        "runs_reduced": reduced,
        "peak_rss_mib_rise": round(rss_rise, 1),
        "peak_cuda_mib_rise": None if cuda_peak is None else round(cuda_peak - cuda_before, 1),
        "voxels_per_s": round(voxels / timing.median_s),
    }


def compare(values: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Median, 95th percentile and maximum of ``|values - reference| / reference`` (4 significant digits: the
    default method agrees with DIPY to ~1e-7), and Pearson r."""
    relative = np.abs(values - reference) / reference
    return {
        "median_rel_diff": float(f"{np.median(relative):.4g}"),
        "p95_rel_diff": float(f"{np.percentile(relative, 95):.4g}"),
        "max_rel_diff": float(f"{relative.max():.4g}"),
        "pearson_r": round(float(np.corrcoef(values, reference)[0, 1]), 6),
    }


def agreement(phantom: Phantom, ours: np.ndarray, dipy: np.ndarray) -> dict[str, Any]:
    """Ours against DIPY, and both against the ground truth, in the mask voxels where DIPY's MD is positive."""
    ours, dipy = ours[phantom.mask].astype(np.float64), dipy[phantom.mask].astype(np.float64)
    truth = ground_truth_md(phantom).astype(np.float64)
    used = dipy > 0
    ours, dipy, truth = ours[used], dipy[used], truth[used]
    return {
        "voxels": int(used.sum()),
        "mask_voxels_dipy_md_not_positive": int((~used).sum()),
        "ours_vs_dipy": compare(ours, dipy),
        "ours_vs_truth": compare(ours, truth),
        "dipy_vs_truth": compare(dipy, truth),
        "mean_md_mm2_s": {"ours": float(ours.mean()), "dipy": float(dipy.mean()), "truth": float(truth.mean())},
    }


def dipy_bundled_agreement(name: str) -> dict[str, Any]:
    """``ComputeADC`` (default method) against DIPY's default ``TensorModel`` MD on a series DIPY ships, in the voxels
    with a positive mean b=0 signal and a positive MD."""
    import nibabel as nib
    from dipy.core.gradients import gradient_table as dipy_gradient_table
    from dipy.data import get_fnames
    from dipy.reconst.dti import TensorModel

    from synth7t.transforms import ComputeADC, read_fsl_bvals, read_fsl_bvecs

    nii, bval_path, bvec_path = get_fnames(name=name)
    data = np.asarray(nib.load(nii).dataobj)
    bvals, bvecs = read_fsl_bvals(bval_path), read_fsl_bvecs(bvec_path)
    dipy = TensorModel(dipy_gradient_table(bvals, bvecs=np.nan_to_num(bvecs.T))).fit(data).md
    ours = ComputeADC(bvals, bvecs)(np.moveaxis(data, -1, 0))[0]
    used = (data[..., bvals <= 50].mean(-1) > 0) & (dipy > 0)
    return {
        "name": name,
        "shape": list(data.shape),
        "b_range": [float(bvals.min()), float(bvals.max())],
        "voxels": int(used.sum()),
        "ours_vs_dipy": compare(ours[used].astype(np.float64), dipy[used]),
    }


def run_protocol(
    name: str, phantom: Phantom, devices: Sequence[str], common: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """Each ``ComputeADC`` method and DIPY on the series of protocol ``name``, one process each, and their agreement."""
    protocol = PROTOCOLS[name]
    cases = [("synth7t", ADC_METHODS[0], device) for device in devices]
    cases += [("synth7t", method, "cpu") for method in ADC_METHODS[1:]] + [("dipy", None, "cpu")]
    outputs = {case: str(folder / f"{len(protocol['shells'])}_{case[0]}_{case[1]}_{case[2]}.npy") for case in cases}
    methods = []
    for key in cases:
        method, adc_method, device = key
        case = {"method": method, "adc_method": adc_method, "device": device, "output": outputs[key]}
        methods.append(run_case_in_subprocess(MODULE, {**case, **protocol, **common}))
    maps = {key: np.load(path) for key, path in outputs.items() if Path(path).is_file()}
    dipy = next(m for m in methods if m.get("method") == "dipy")
    for method in methods:
        if "error" not in method and "error" not in dipy:
            method["speedup_vs_dipy"] = round(dipy["timing"]["median_s"] / method["timing"]["median_s"], 2)
    bvals, bvecs = gradient_table(protocol["shells"], protocol["directions_per_shell"], protocol["b0_volumes"])
    reference = maps.get(("dipy", None, "cpu"))
    agreements = {
        adc_method: agreement(phantom, maps[("synth7t", adc_method, "cpu")], reference)
        for adc_method in ADC_METHODS
        if reference is not None and ("synth7t", adc_method, "cpu") in maps
    }
    result: dict[str, Any] = {
        "name": name,
        "data": {
            **protocol,
            "directions": len(protocol["shells"]) * protocol["directions_per_shell"],
            "volumes": len(bvals),
            "direction_balance": round(direction_balance(bvecs, protocol["directions_per_shell"]), 5),
        },
        "methods": methods,
        "agreement": agreements,
    }
    gpu, cpu = ("synth7t", ADC_METHODS[0], "cuda"), ("synth7t", ADC_METHODS[0], "cpu")
    if gpu in maps and cpu in maps:
        result["cuda_vs_cpu_max_abs_diff"] = float(np.abs(maps[gpu] - maps[cpu]).max())
    return result


def run(
    size: Sequence[int] = (145, 174, 145),
    protocols: Sequence[str] = tuple(PROTOCOLS),
    warmup: int = 1,
    runs: int = 3,
    seed: int = 0,
    snr: float = PROTOCOL_3T.snr,
    slow_s: float = SLOW_S,
) -> dict[str, Any]:
    """Times ``ComputeADC`` (each of :data:`ADC_METHODS` on the CPU, the default on CUDA when available) and DIPY's
    ``TensorModel``, one process each, on every protocol of ``protocols``, compares their maps, and compares the
    default with DIPY on DIPY's bundled real series; returns a JSON-serialisable dict (see the module docstring)."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    phantom = brain_phantom(size)
    common = {"size": list(size), "snr": snr, "seed": seed, "warmup": warmup, "runs": runs, "slow_s": slow_s}
    with tempfile.TemporaryDirectory() as folder:
        measured = [run_protocol(name, phantom, devices, common, Path(folder)) for name in protocols]
    return {
        "benchmark": "adc",
        "machine": machine(),
        "data": {
            "size": list(size),
            "snr": snr,
            "noise": f"Rician, sigma = mean brain b=0 signal ({MEAN_BRAIN_B0:g}) / snr",
            "seed": seed,
            "voxels_in_mask": int(phantom.mask.sum()),
        },
        "dipy_fit_method": dipy_default_fit_method(),
        "slow_s": slow_s,
        "protocols": measured,
        "dipy_bundled": [dipy_bundled_agreement(name) for name in DIPY_BUNDLED],
    }


def _method_row(method: dict[str, Any], fit_method: str, slow_s: float) -> str:
    if method.get("method") == "dipy":
        name = f"DIPY TensorModel {fit_method}"
    else:
        name = f"synth7t ComputeADC {method.get('adc_method')}"
    if "error" in method:
        return f"| {name} | {method['device']} | error: {method['error']} | | | |"
    timing = method["timing"]
    seconds = f"{timing['median_s']:.2f} ({timing['min_s']:.2f}–{timing['max_s']:.2f}), n={timing['runs']}"
    if method["runs_reduced"]:
        seconds += f" (one call: over {slow_s:g} s)"
    memory = f"{method['peak_rss_mib_rise']:.0f}"
    if method["peak_cuda_mib_rise"] is not None:
        memory += f" (GPU {method['peak_cuda_mib_rise']:.0f})"
    ratio = method.get("speedup_vs_dipy")
    return (
        f"| {name} | {method['device']} | {seconds} | {method['voxels_per_s']:,} | {memory} | "
        f"{'' if ratio is None else f'{ratio:g}×'} |"
    )


def _agreement_line(adc_method: str, figures: dict[str, Any]) -> str:
    versus, means = figures["ours_vs_dipy"], figures["mean_md_mm2_s"]
    return (
        f"- `{adc_method}` in {figures['voxels']:,} brain voxels: |ours − DIPY| / DIPY median "
        f"{versus['median_rel_diff']:.2g}, 95th percentile {versus['p95_rel_diff']:.2g}, max "
        f"{versus['max_rel_diff']:.2g}, Pearson r {versus['pearson_r']:.6f}; mean MD ours {means['ours']:.4e}, "
        f"DIPY {means['dipy']:.4e}, truth {means['truth']:.4e} mm²/s; median |error| vs truth ours "
        f"{figures['ours_vs_truth']['median_rel_diff']:.2%}, DIPY {figures['dipy_vs_truth']['median_rel_diff']:.2%}."
    )


def markdown(result: dict[str, Any]) -> str:
    """Per protocol, a Markdown table of the methods (time, throughput, peak memory, speed-up over DIPY) and the
    agreement of each method with DIPY; then the agreement on DIPY's bundled real series."""
    data, lines = result["data"], []
    for protocol in result["protocols"]:
        shape = protocol["data"]
        lines += [
            f"**{protocol['name']}**: {'×'.join(map(str, data['size']))} voxels, {data['voxels_in_mask']:,} in the "
            f"brain; b = {', '.join(map('{:g}'.format, shape['shells']))} s/mm² × {shape['directions_per_shell']} "
            f"directions + {shape['b0_volumes']} b=0 ({shape['volumes']} volumes), SNR {data['snr']:g}.",
            "",
            "| method | device | median s (min–max) | voxels/s | peak MiB rise | ratio vs DIPY |",
            "| --- | --- | --- | --- | --- | --- |",
            *(_method_row(method, result["dipy_fit_method"], result["slow_s"]) for method in protocol["methods"]),
            "",
            *(_agreement_line(name, figures) for name, figures in protocol["agreement"].items()),
        ]
        if not protocol["agreement"]:
            lines.append("- Agreement: not computed (a method failed).")
        if "cuda_vs_cpu_max_abs_diff" in protocol:
            lines.append(f"- CUDA against CPU: max |difference| {protocol['cuda_vs_cpu_max_abs_diff']:.2e} mm²/s.")
        lines.append("")
    real = "; ".join(
        f"{item['name']} ({'×'.join(map(str, item['shape']))}, b {item['b_range'][0]:g}–{item['b_range'][1]:g}, "
        f"{item['voxels']:,} voxels) median {item['ours_vs_dipy']['median_rel_diff']:.1e}, max "
        f"{item['ours_vs_dipy']['max_rel_diff']:.1e}"
        for item in result["dipy_bundled"]
    )
    lines.append(f"Default method against DIPY on the real series DIPY ships, |ours − DIPY| / DIPY: {real}.")
    return "\n".join(lines)


if __name__ == "__main__":
    report_case(measure_case)
