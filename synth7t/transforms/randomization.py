"""Degradation-randomized 3T simulation: a new 3T-like degradation of the 7T target for every training sample.

The shipped T1w models must serve 3T inputs whose degradation is unknown: the two fixed recipes of this project
(:class:`synth7t.transforms.SimulateRealistic3T` and :func:`synth7t.transforms.seed001_recipe`) and real scans that
match neither. Following the domain randomization of SynthSR (Iglesias et al., "SynthSR: A public AI tool to turn
heterogeneous clinical brain scans into high-resolution T1-weighted images for 3D morphometry", Science Advances
9(5):eadd3607, 2023, https://doi.org/10.1126/sciadv.add3607), :class:`RandSimulate3T` draws every step of the
degradation, and whether it happens at all, anew for each sample, over ranges that contain both fixed recipes:

=====================  ======================================================  ====================================
step                   range (default)                                         realistic recipe / seed-001 recipe
=====================  ======================================================  ====================================
contrast change        gamma in [0.6, 1.1] (MONAI ``RandAdjustContrast``)      gamma 0.7-0.9 / off
bias field             peak deviation 0-20 % (MONAI ``RandBiasField`` shape)   about +/-16 % / off
resolution loss        voxel size 1.0-1.8 mm per axis, k-space truncation      1.4 mm k-space / off
                       (:func:`kspace_truncate`) or Gaussian blur of that FWHM
                       (MONAI ``GaussianSmooth``)
noise                  Gaussian of variance 0.0005-0.006 on the whole volume   Rician SNR 20 / Gaussian 0.003
                       (MONAI ``RandGaussianNoise``) or Rician at SNR 10-40
                       of the mean brain signal (MONAI ``RandRicianNoise``)
skull stripping        zero outside the brain mask                             on / off
histogram matching     image and target matched to another subject's 7T        off / on (sub-TELL0106)
8-bit quantisation     256 levels between 0 and the maximum                    off / on (saved files)
=====================  ======================================================  ====================================

MONAI has each random piece but no chain that draws which pieces apply, ties the noise to the brain signal, or
changes the target with the input (histogram matching): hence this module. Histogram matching here is
:class:`QuantileHistogramMatch`, a quantile-grid form of :class:`synth7t.transforms.HistogramMatch` that costs a
fraction of scikit-image's exact matching on a whole volume (the exact form stays for the fixed seed recipe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import (
    GaussianSmooth,
    LoadImage,
    MapTransform,
    RandAdjustContrast,
    RandBiasField,
    Randomizable,
    RandGaussianNoise,
    RandRicianNoise,
    Transform,
)
from monai.utils import MAX_SEED, TransformBackends, convert_to_dst_type, convert_to_tensor

from synth7t.transforms.degradation import Quantize8Bit, _resolve_voxel_size, kspace_truncate

__all__ = ["QuantileHistogramMatch", "RandSimulate3T", "RandSimulate3Td"]

# The bias field is evaluated every _BIAS_GRID_STEP voxels and interpolated in between.
_BIAS_GRID_STEP = 4
# FWHM of a Gaussian in units of its standard deviation, 2 sqrt(2 ln 2).
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _quantile_function(values: torch.Tensor, num_quantiles: int, max_samples: int) -> torch.Tensor:
    """``num_quantiles`` quantiles (probabilities ``linspace(0, 1)``) of ``values``, from an evenly strided subsample
    of at most ``max_samples`` values (float64)."""
    flat = values.reshape(-1)
    stride = max(1, math.ceil(flat.numel() / max_samples))
    ordered = torch.sort(flat[::stride].to(torch.float64)).values
    positions = torch.linspace(0, ordered.numel() - 1, num_quantiles, dtype=torch.float64).round().long()
    return ordered[positions]


class QuantileHistogramMatch(Transform):
    """Histogram matching of a whole volume to a reference through their quantile functions on a grid.

    The same mapping as scikit-image's ``match_histograms`` (used by :class:`synth7t.transforms.HistogramMatch`):
    each voxel takes the reference value at its own quantile in the source, the quantile of a value shared by many
    voxels (the zero background) being the upper end of its range. Here both quantile functions are sampled on
    ``num_quantiles`` probabilities from at most ``max_samples`` voxels and interpolated linearly, so matching a
    182 x 218 x 182 volume takes about 0.2 s instead of 1-2 s, with voxel differences to the exact matching of the
    order of one grid step of the reference's quantile function. Whole volumes, background included, as seed 001 matched
    (spec watnet.md §1.3).

    Args:
        reference: the reference volume (any shape; only its values are used), or its quantile function from
            :meth:`reference_quantiles`.
        num_quantiles: probabilities the quantile functions are sampled on. Default 4097.
        max_samples: voxels drawn (evenly strided) to estimate a quantile function. Default 2**20.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, reference: NdarrayOrTensor, num_quantiles: int = 4097, max_samples: int = 2**20) -> None:
        if num_quantiles < 2:
            raise ValueError(f"num_quantiles must be at least 2, got {num_quantiles}.")
        self.num_quantiles = num_quantiles
        self.max_samples = max_samples
        self.reference = self.reference_quantiles(reference)

    def reference_quantiles(self, reference: NdarrayOrTensor) -> torch.Tensor:
        """The quantile function of ``reference`` on this matcher's grid (returned as is if it already is one)."""
        ref = convert_to_tensor(reference, track_meta=False, dtype=torch.float64)
        if ref.ndim == 1 and ref.numel() == self.num_quantiles and bool((ref[1:] >= ref[:-1]).all()):
            return ref
        return _quantile_function(ref, self.num_quantiles, self.max_samples)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Match ``img`` (all channels together) to the reference; return the same array type, float32."""
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        source = _quantile_function(x, self.num_quantiles, self.max_samples).numpy()
        probabilities = np.linspace(0.0, 1.0, self.num_quantiles)
        # A value repeated over a run of the grid (ties) takes the upper end of its run, as scikit-image does.
        last_of_run = np.append(source[1:] != source[:-1], True)
        target_levels = np.interp(probabilities[last_of_run], probabilities, self.reference.numpy())
        matched = _monotone_map(x, source[last_of_run], target_levels)
        return convert_to_dst_type(matched, dst=img, dtype=torch.float32)[0]


def _monotone_map(x: torch.Tensor, levels: np.ndarray, values: np.ndarray, table_size: int = 2**16) -> torch.Tensor:
    """``numpy.interp(x, levels, values)`` through a table of ``table_size`` points between the extremes of ``x``.

    ``numpy.interp`` searches the knots for every voxel (about 1.2 s for a noisy 182 x 218 x 182 volume and 4,000
    knots on this project's CPU); tabulating the piecewise-linear map once and interpolating the table by index
    takes a tenth of that, with an error below the map's slope times the table step.
    """
    low, high = float(x.min()), float(x.max())
    if high <= low:
        return torch.full_like(x, float(np.interp(low, levels, values)))
    table = torch.as_tensor(np.interp(np.linspace(low, high, table_size), levels, values), dtype=torch.float32)
    position = (x - low) * ((table_size - 1) / (high - low))
    index = position.long().clamp_(0, table_size - 2)
    weight = position - index
    return torch.lerp(table[index], table[index + 1], weight)


def _load_reference(reference: NdarrayOrTensor | str | os.PathLike) -> NdarrayOrTensor:
    if isinstance(reference, (str, os.PathLike)):
        return LoadImage(image_only=True)(reference)
    return reference


class RandSimulate3T(Randomizable, Transform):
    """A randomly degraded 3T-like T1w from a 7T T1w target, new parameters every call (module docstring).

    Input: the 7T target normalised to about [0, 1] (brain percentiles, as the bundles scale it), channel-first
    ``(C, X, Y, Z)``, background 0. ``__call__`` returns ``(image, target)``: the simulated 3T and the target, which
    is the input itself unless histogram matching is drawn, in which case it is the input matched to the drawn
    reference (seed 001 matched both images, spec watnet.md §1.3). Both keep the input's array type and metadata.
    The steps, in physical order, each drawn on or off with its probability:

    1. contrast change ``x -> x**gamma`` (MONAI ``RandAdjustContrast``: on [0, 1] exactly the power law);
    2. bias field: a smooth Legendre field of degree ``bias_degree`` drawn by MONAI ``RandBiasField``, its log
       centred on the brain mean and scaled so that its largest deviation in the brain is ``d``, ``d`` uniform in
       ``[0, bias_max_deviation]``: the field lies in ``[1 / (1 + d), 1 + d]``;
    3. resolution loss to a voxel size drawn per axis from ``voxel_size_range_mm``: k-space truncation
       (:func:`synth7t.transforms.kspace_truncate`) or, with probability ``blur_fraction``, a Gaussian blur whose
       FWHM widens the native voxel to that size (``sigma = sqrt(t**2 - v**2) / 2.355``, MONAI ``GaussianSmooth``);
    4. noise: Gaussian with variance log-uniform in ``gaussian_variance_range`` over the whole volume, background
       included (MONAI ``RandGaussianNoise``), or, with probability ``rician_fraction``, Rician with
       ``sigma = mean brain signal / snr``, ``snr`` log-uniform in ``snr_range`` (MONAI ``RandRicianNoise``);
    5. skull stripping: multiplied by the brain mask, negatives clipped;
    6. histogram matching of the image and the target to one of ``references`` (:class:`QuantileHistogramMatch`);
    7. 8-bit quantisation of the image (:class:`synth7t.transforms.Quantize8Bit`).

    All randomness is drawn from ``self.R`` in :meth:`randomize` (the noise through a seed drawn there), so
    ``set_random_state`` makes a sequence of calls reproducible and ``randomize=False`` repeats the last draw.

    Args:
        references: whole 7T volumes (arrays, or NIfTI paths loaded once) whose intensity distributions the
            histogram-matching step draws from; other training subjects. Empty: the step never happens.
        gamma_prob, gamma_range: probability and uniform range of the contrast exponent. Default 0.5, (0.6, 1.1).
        bias_prob, bias_max_deviation, bias_degree: probability, largest peak deviation (fraction) and Legendre
            degree of the bias field. Default 0.5, 0.2, 3.
        resolution_prob, voxel_size_range_mm, blur_fraction: probability of the resolution loss, the uniform range
            of the simulated voxel size in mm (drawn per axis), and the share of blurs among the losses. Default
            0.75, (1.0, 1.8), 0.5.
        voxel_size: voxel size of the input in mm; None reads the MetaTensor's affine, else 1 mm.
        noise_prob, rician_fraction, gaussian_variance_range, snr_range: probability of noise, the share of
            Rician among it, and the log-uniform ranges of the Gaussian variance (on the [0, 1] scale) and of the
            Rician SNR. Default 0.9, 0.5, (0.0005, 0.006), (10, 40).
        mask_prob: probability of zeroing the background (skull-stripped input). Default 0.5.
        histogram_match_prob: probability of histogram matching (needs ``references``). Default 0.3.
        quantize_prob: probability of 8-bit quantisation. Default 0.25.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        references: Sequence[NdarrayOrTensor | str | os.PathLike] = (),
        gamma_prob: float = 0.5,
        gamma_range: tuple[float, float] = (0.6, 1.1),
        bias_prob: float = 0.5,
        bias_max_deviation: float = 0.2,
        bias_degree: int = 3,
        resolution_prob: float = 0.75,
        voxel_size_range_mm: tuple[float, float] = (1.0, 1.8),
        blur_fraction: float = 0.5,
        voxel_size: Sequence[float] | float | None = None,
        noise_prob: float = 0.9,
        rician_fraction: float = 0.5,
        gaussian_variance_range: tuple[float, float] = (0.0005, 0.006),
        snr_range: tuple[float, float] = (10.0, 40.0),
        mask_prob: float = 0.5,
        histogram_match_prob: float = 0.3,
        quantize_prob: float = 0.25,
    ) -> None:
        for name, (low, high) in {
            "gamma_range": gamma_range,
            "voxel_size_range_mm": voxel_size_range_mm,
            "gaussian_variance_range": gaussian_variance_range,
            "snr_range": snr_range,
        }.items():
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}.")
        if not bias_max_deviation >= 0:
            raise ValueError(f"bias_max_deviation must be >= 0, got {bias_max_deviation}.")
        self.probabilities = {
            "gamma": gamma_prob,
            "bias": bias_prob,
            "resolution": resolution_prob,
            "noise": noise_prob,
            "mask": mask_prob,
            "histogram_match": histogram_match_prob if references else 0.0,
            "quantize": quantize_prob,
        }
        for name, p in self.probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability must be in [0, 1], got {p}.")
        self.gamma_range = gamma_range
        self.bias_max_deviation = bias_max_deviation
        self.voxel_size_range_mm = voxel_size_range_mm
        self.blur_fraction = blur_fraction
        self.voxel_size = voxel_size
        self.rician_fraction = rician_fraction
        self.gaussian_variance_range = gaussian_variance_range
        self.snr_range = snr_range
        self._contrast = RandAdjustContrast(prob=1.0, gamma=gamma_range)
        self._bias = RandBiasField(degree=bias_degree, coeff_range=(-1.0, 1.0), prob=1.0)
        self._matcher = QuantileHistogramMatch(np.zeros(2, np.float32))
        self.references = [self._matcher.reference_quantiles(_load_reference(r)) for r in references]
        self._quantize = Quantize8Bit()
        self.draw: dict[str, Any] = {}

    def _log_uniform(self, bounds: tuple[float, float]) -> float:
        return float(math.exp(self.R.uniform(math.log(bounds[0]), math.log(bounds[1]))))

    def randomize(self, img_shape: Sequence[int]) -> None:
        """Draw which steps apply and their parameters for a channel-first shape ``img_shape`` into :attr:`draw`."""
        on = {name: bool(self.R.rand() < p) for name, p in self.probabilities.items()}
        spatial_ndim = len(img_shape) - 1
        draw: dict[str, Any] = {"mask": on["mask"], "quantize": on["quantize"]}
        if on["gamma"]:
            self._contrast.R = self.R
            self._contrast.randomize(None)
            draw["gamma"] = float(self._contrast.gamma_value)
        if on["bias"]:
            self._bias.R = self.R
            self._bias.randomize(img_size=tuple(img_shape[1:]))
            draw["bias_deviation"] = float(self.R.uniform(0.0, self.bias_max_deviation))
        if on["resolution"]:
            draw["voxel_size_mm"] = tuple(float(self.R.uniform(*self.voxel_size_range_mm)) for _ in range(spatial_ndim))
            draw["blur"] = bool(self.R.rand() < self.blur_fraction)
        if on["noise"]:
            if self.R.rand() < self.rician_fraction:
                draw["snr"] = self._log_uniform(self.snr_range)
            else:
                draw["gaussian_std"] = math.sqrt(self._log_uniform(self.gaussian_variance_range))
            draw["noise_seed"] = int(self.R.randint(MAX_SEED, dtype="uint32"))
        if on["histogram_match"]:
            draw["reference"] = int(self.R.randint(len(self.references)))
        self.draw = draw

    def _bias_field(self, brain: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        # The smooth field is drawn, centred and scaled on a grid _BIAS_GRID_STEP times coarser (both grids span
        # [-1, 1]) and interpolated: a degree-3 polynomial is linear to within 1e-3 over a few voxels, and the whole
        # step costs a tenth of a full-grid evaluation.
        # Coarse nodes are the corners of the cells that hold brain voxels (a max-pool over the cells around each
        # node), so the interpolated field inside the brain stays within the extremes fixed on the nodes.
        step = _BIAS_GRID_STEP
        pool = (torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d)
        coarse_brain = pool[len(shape) - 2](brain[None].float(), 2 * step - 1, step, step - 1)[0] > 0
        coarse = tuple(coarse_brain.shape[1:])
        field = self._bias(torch.ones((1, *coarse), dtype=torch.float32), randomize=False)
        log_field = torch.log(convert_to_tensor(field, dtype=torch.float64, track_meta=False))
        inside = log_field[coarse_brain] if bool(coarse_brain.any()) else log_field.reshape(-1)
        log_field = log_field - inside.mean()
        peak = float((inside - inside.mean()).abs().max())
        log_field = log_field * (math.log1p(self.draw["bias_deviation"]) / peak if peak > 0 else 0.0)
        mode = ("linear", "bilinear", "trilinear")[len(coarse) - 1]
        size = tuple((n - 1) // step * step + 1 for n in shape[1:])  # the coarse grid's extent in fine voxels
        fine = torch.nn.functional.interpolate(log_field[None].float(), size=size, mode=mode, align_corners=True)[0]
        pad = [p for n, m in zip(reversed(shape[1:]), reversed(size)) for p in (0, n - m)]
        return torch.exp(torch.nn.functional.pad(fine[None], pad, mode="replicate")[0])

    def _resolution_loss(self, x: torch.Tensor, voxel: tuple[float, ...]) -> torch.Tensor:
        target = self.draw["voxel_size_mm"]
        if not self.draw["blur"]:
            return kspace_truncate(x, target, voxel).to(torch.float32)
        sigma = [math.sqrt(max(t * t - v * v, 0.0)) / _FWHM_PER_SIGMA / v for t, v in zip(target, voxel)]
        if not any(s > 0 for s in sigma):
            return x
        return convert_to_tensor(GaussianSmooth(sigma=sigma)(x), dtype=torch.float32, track_meta=False)

    def _noise(self, x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        if "snr" in self.draw:
            inside = x[brain.expand_as(x)]
            sigma = float(inside.mean()) / self.draw["snr"] if inside.numel() else 0.0
            noise: Randomizable = RandRicianNoise(prob=1.0, std=sigma, relative=False, sample_std=False)
        else:
            noise = RandGaussianNoise(prob=1.0, mean=0.0, std=self.draw["gaussian_std"], sample_std=False)
        noise.set_random_state(self.draw["noise_seed"])
        return convert_to_tensor(noise(x), dtype=torch.float32, track_meta=False)

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Degrade the channel-first 7T ``img``; return ``(simulated 3T, target)``.

        Args:
            img: the 7T target, channel-first, about [0, 1], background 0.
            mask: brain mask (``spatial`` or ``(1, *spatial)``, > 0 inside). Default: the non-zero voxels of ``img``.
            randomize: draw new parameters first (default); False repeats the last draw.
        """
        voxel = _resolve_voxel_size(img, self.voxel_size, len(img.shape) - 1)
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        if randomize:
            self.randomize(x.shape)
        brain = (x != 0).any(0, keepdim=True) if mask is None else _as_mask(mask, x)
        target = x
        if "gamma" in self.draw:
            x = convert_to_tensor(self._contrast(x, randomize=False), dtype=torch.float32, track_meta=False)
        if "bias_deviation" in self.draw:
            x = x * self._bias_field(brain, x.shape)
        if "voxel_size_mm" in self.draw:
            x = self._resolution_loss(x, voxel)
        if "noise_seed" in self.draw:
            x = self._noise(x, brain)
        if self.draw["mask"]:
            x = (x * brain).clamp_min(0.0)
        if "reference" in self.draw:
            self._matcher.reference = self.references[self.draw["reference"]]
            x = convert_to_tensor(self._matcher(x), track_meta=False)
            target = convert_to_tensor(self._matcher(target), track_meta=False)
        if self.draw["quantize"]:
            x = convert_to_tensor(self._quantize(x), dtype=torch.float32, track_meta=False)
        image_out = convert_to_dst_type(x, dst=img, dtype=torch.float32)[0]
        target_out = convert_to_dst_type(target, dst=img, dtype=torch.float32)[0]
        return image_out, target_out


def _as_mask(mask: NdarrayOrTensor, x: torch.Tensor) -> torch.Tensor:
    m = convert_to_tensor(mask, track_meta=False)
    m = m.reshape(1, *x.shape[1:]) if m.numel() == math.prod(x.shape[1:]) else m.any(0, keepdim=True)
    if tuple(m.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit the image of shape {tuple(x.shape)}.")
    return m != 0


class RandSimulate3Td(Randomizable, MapTransform):
    """Dictionary form of :class:`RandSimulate3T`: the 7T at ``keys`` degraded into ``output_key``.

    ``keys`` (one key) is replaced by the target (changed only when histogram matching is drawn) and ``output_key``
    receives the simulated 3T, with the 7T's metadata. ``set_random_state`` seeds the wrapped transform, so both
    forms give the same result for the same seed (without ``fixed_pair_prob``).

    An item that already holds a 3T image at ``output_key`` (a fixed-recipe pair of the datalist) keeps it, unchanged
    with its target, with probability ``fixed_pair_prob``: training then mixes the fixed recipes, which are the
    evaluation's degradations, into the randomized ones (the bundles' default, see their model cards).

    Args:
        keys: key of the 7T target. Default ``"label"``.
        output_key: key written with the simulated 3T. Default ``"image"``.
        mask_key: key of the brain mask; None uses the 7T's non-zero voxels. Default ``"mask"``.
        fixed_pair_prob: probability of keeping an item's own ``output_key`` image instead of simulating one; items
            without one are always simulated. Default 0.
        kwargs: the arguments of :class:`RandSimulate3T`.
    """

    backend = RandSimulate3T.backend

    def __init__(
        self,
        keys: KeysCollection = "label",
        output_key: str = "image",
        mask_key: str | None = "mask",
        fixed_pair_prob: float = 0.0,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"keys must be a single key, got {self.keys}.")
        if not 0.0 <= fixed_pair_prob <= 1.0:
            raise ValueError(f"fixed_pair_prob must be in [0, 1], got {fixed_pair_prob}.")
        self.fixed_pair_prob = fixed_pair_prob
        self.output_key = output_key
        self.mask_key = mask_key
        self.simulate = RandSimulate3T(**kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandSimulate3Td:
        """Seed this transform and the wrapped :class:`RandSimulate3T` identically."""
        super().set_random_state(seed, state)
        self.simulate.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw the wrapped transform's parameters for the channel-first shape ``data``."""
        self.simulate.randomize(data)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Return a shallow copy of ``data`` with the simulated 3T at ``output_key`` and the target at ``keys`` (or,
        drawn with ``fixed_pair_prob``, the item's own pair)."""
        d = dict(data)
        if self.fixed_pair_prob > 0 and self.output_key in d and self.R.rand() < self.fixed_pair_prob:
            return d
        for key in self.key_iterator(d):
            mask = d.get(self.mask_key) if self.mask_key is not None else None
            d[self.output_key], d[key] = self.simulate(d[key], mask=mask)
        return d
