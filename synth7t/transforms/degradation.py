"""Simulated 3T T1w volumes made from 7T T1w volumes: the seed-001 recipe and a realistic recipe.

Two recipes turn a real 7T volume into a (simulated 3T, 7T) training pair:

* :func:`seed001_recipe` reproduces what seed 001 actually ran (spec watnet.md §1.3, §9 "Data list"): min-max
  scaling, additive Gaussian noise of *variance* 0.003 on the whole volume, then whole-volume histogram matching of
  both images to one reference 7T, optionally followed by the 8-bit quantisation its saved files had.
* :class:`SimulateRealistic3T` / :class:`SimulateRealistic3Td` implement the improvement of spec watnet.md §8
  item 9 ("a realistic '3T' would need blur or resolution loss, contrast change, and a Rician noise model"):
  gamma contrast change, smooth multiplicative bias field, k-space truncation to a coarser voxel size, Rician
  noise at a chosen SNR and brain masking, in that physical order.

MONAI pieces are reused wherever their semantics fit (``ScaleIntensityd``, ``RandGaussianNoised``,
``CopyItemsd``, ``AdjustContrast``, ``RandBiasField``). Each class written here says why MONAI has no equivalent.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import (
    AdjustContrast,
    Compose,
    CopyItemsd,
    MapTransform,
    RandBiasField,
    Randomizable,
    RandGaussianNoised,
    RandRicianNoise,
    ScaleIntensity,
    ScaleIntensityd,
    Transform,
)
from monai.utils import (
    MAX_SEED,
    TransformBackends,
    convert_data_type,
    convert_to_dst_type,
    convert_to_tensor,
    ensure_tuple_rep,
)
from skimage.exposure import match_histograms

__all__ = [
    "SEED001_NOISE_VARIANCE",
    "SEED001_REFERENCE_SUBJECT",
    "HistogramMatch",
    "HistogramMatchd",
    "KSpaceTruncate",
    "KSpaceTruncated",
    "Quantize8Bit",
    "Quantize8Bitd",
    "SimulateRealistic3T",
    "SimulateRealistic3Td",
    "kspace_truncate",
    "seed001_recipe",
]

SEED001_NOISE_VARIANCE: float = 0.003
"""Noise *variance* of the seed-001 degradation (spec watnet.md §1.3: "σ = 0.003" in the seed text is a variance;
its code sets ``var = 0.003`` and ``sigma = var**0.5`` = 0.0547723)."""

SEED001_REFERENCE_SUBJECT: str = "sub-TELL0106"
"""Subject whose 7T volume, divided by 255, was the histogram-matching reference of seed 001 (spec watnet.md §1.3)."""

# Relative tolerance when comparing a target voxel size with the input voxel size, so that spacings read from a
# float32 affine (e.g. 0.99999994 mm) do not trigger a truncation that only removes the Nyquist bin.
_VOXEL_SIZE_RTOL = 1e-5


# ------------------------------------------------------------------------------------------------------------------
# seed-001 recipe (spec watnet.md §1.3)
# ------------------------------------------------------------------------------------------------------------------


class HistogramMatch(Transform):
    """Whole-volume quantile (histogram) matching to a reference volume, exactly as seed 001 ran it.

    Spec watnet.md §1.3: ``y = skimage.exposure.match_histograms(x, ref)`` on the 3-D volume, with no mask and a
    single channel. This class only wraps that call as a MONAI transform: MONAI has histogram *equalisation*
    (``HistogramNormalize``) but no matching to a reference, and calling scikit-image keeps the numbers identical
    to what the seed computed. Each channel of the channel-first input is matched separately, as a single-channel
    3-D image (``channel_axis=None``).

    Note (spec watnet.md §1.3 "side effect of whole-volume matching", §8 item 8): matching whole volumes with
    different brain sizes zeroes the darkest brain voxels of subjects whose brain is larger than the
    reference's. That is the seed's behaviour, reproduced here on purpose.

    Args:
        reference: the reference volume whose intensity distribution is imposed. Either spatial only
            (``(X, Y, Z)``), used for every channel, or channel-first with 1 channel (used for every channel) or as
            many channels as the input (channel ``c`` matched to reference channel ``c``). Its shape need not equal
            the input's: only its value distribution is used. No default: seed 001 used the 7T of
            ``sub-TELL0106`` min-max scaled to [0, 1] (see :data:`SEED001_REFERENCE_SUBJECT`).

    Returns the same array type as the input (numpy / torch / MetaTensor with its metadata) in scikit-image's
    output dtype (float32 for float16/float32 input, float64 otherwise).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, reference: NdarrayOrTensor) -> None:
        self.reference: np.ndarray = np.asarray(convert_data_type(reference, np.ndarray)[0])

    def _reference_for_channel(self, channel: int, img_ndim: int, n_channels: int) -> np.ndarray:
        ref = self.reference
        if ref.ndim == img_ndim - 1:
            return ref
        if ref.ndim == img_ndim and ref.shape[0] in (1, n_channels):
            return ref[0] if ref.shape[0] == 1 else ref[channel]
        raise ValueError(
            f"reference of shape {ref.shape} does not fit a channel-first input with {n_channels} channel(s) "
            f"and {img_ndim - 1} spatial dimensions."
        )

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Match every channel of channel-first ``img`` to the reference; return the same array type."""
        img_np = np.asarray(convert_data_type(img, np.ndarray)[0])
        n_channels = img_np.shape[0]
        matched = np.stack(
            [
                match_histograms(img_np[c], self._reference_for_channel(c, img_np.ndim, n_channels))
                for c in range(n_channels)
            ]
        )
        out, *_ = convert_to_dst_type(matched, dst=img, dtype=matched.dtype)
        return out


class HistogramMatchd(MapTransform):
    """Dictionary form of :class:`HistogramMatch` (spec watnet.md §1.3): matches every item in ``keys``.

    Args:
        keys: keys of the items to match, e.g. ``["label", "image"]`` for the 7T and the simulated 3T (seed 001
            matched both to the same reference).
        reference: see :class:`HistogramMatch`.
        allow_missing_keys: do not raise if a key is missing. Default False (MONAI's default).
    """

    backend = HistogramMatch.backend

    def __init__(self, keys: KeysCollection, reference: NdarrayOrTensor, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.matcher = HistogramMatch(reference)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Return a shallow copy of ``data`` whose ``keys`` items are histogram-matched."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.matcher(d[key])
        return d


class Quantize8Bit(Transform):
    """8-bit quantisation ``v -> round(v * 255 / max) * max / 255`` of the whole array (all channels together).

    Spec watnet.md §1.3 "side effect of saving": seed 001 saved its matched volumes with nibabel using the raw
    uint8 header, which quantised them to 256 levels with slope ``max / 255``; its ``final_data`` has 256
    distinct values in "3T". Applying this after matching reproduces that. MONAI has no such quantiser
    (``ScaleIntensityRange`` + a cast would lose the original scale), hence this small class.

    It is meant for non-negative inputs whose minimum is 0, such as histogram-matched volumes; then the output
    holds at most 256 distinct values ``k * max / 255``, ``k = 0..255``, and keeps the maximum. An input whose
    maximum is <= 0 is returned unchanged (as a float copy). Rounding is half-to-even (``torch.round``), like
    numpy's ``rint`` used by nibabel. Takes no parameters. Returns the input's array type, floating point
    (float32 unless the input is float64).
    """

    backend = [TransformBackends.TORCH]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Quantise ``img`` to 256 levels between 0 and its maximum; return the same array type."""
        x = convert_to_tensor(img, track_meta=False)
        if not torch.is_floating_point(x):
            x = x.to(torch.float32)
        vmax = x.max()
        out = torch.round(x * 255.0 / vmax) * vmax / 255.0 if vmax > 0 else x.clone()
        res, *_ = convert_to_dst_type(out, dst=img, dtype=out.dtype)
        return res


class Quantize8Bitd(MapTransform):
    """Dictionary form of :class:`Quantize8Bit` (spec watnet.md §1.3): quantises every item in ``keys``.

    Args:
        keys: keys of the items to quantise.
        allow_missing_keys: do not raise if a key is missing. Default False (MONAI's default).
    """

    backend = Quantize8Bit.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quantizer = Quantize8Bit()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Return a shallow copy of ``data`` whose ``keys`` items are quantised."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.quantizer(d[key])
        return d


def seed001_recipe(
    reference: NdarrayOrTensor,
    noise_variance: float = SEED001_NOISE_VARIANCE,
    quantize_8bit: bool = False,
    source_key: str = "label",
    output_key: str = "image",
) -> Compose:
    """The seed-001 degradation and normalisation exactly as run (spec watnet.md §1.3, §9 "Data list"), as a Compose.

    Operates on a dictionary whose ``source_key`` item is the raw 7T volume, channel-first ``(1, X, Y, Z)``, and
    returns the dictionary with

    * ``source_key`` = ``y7 = match(x7, ref)``, the processed 7T, and
    * ``output_key`` = ``y3 = match(x3, ref)``, the simulated 3T,

    where ``x7`` is the 7T min-max scaled to [0, 1] (``ScaleIntensityd(minv=0, maxv=1)``, whole volume; for the
    uint8 TELL volumes, whose min is 0 and max 255, this is the seed's ``raw / 255``), ``x3 = x7 + N(0,
    noise_variance)`` on the whole volume including background with no clipping, ``ref`` is ``reference`` min-max
    scaled to [0, 1], and ``match`` is :class:`HistogramMatch` (``skimage.exposure.match_histograms``). Noise comes
    from MONAI ``RandGaussianNoised(prob=1.0, mean=0.0, std=sqrt(noise_variance), sample_std=False)``: the
    pitfall of spec watnet.md §9 is that its defaults ``prob=0.1`` and ``sample_std=True`` (std drawn uniformly
    from [0, std]) would not reproduce the seed. Computation is in float32 (MONAI's default) where the seed used
    float64; the difference is at the 1e-7 level.

    The seed fixed no random seed. Call ``set_random_state(seed)`` on the returned Compose to make it
    reproducible; without it, every run draws different noise.

    Args:
        reference: the reference 7T volume (raw, e.g. uint8 0-255, or already in [0, 1]), spatial or
            channel-first. It is min-max scaled to [0, 1] once here. No default: seed 001 used
            ``sub-TELL0106`` (:data:`SEED001_REFERENCE_SUBJECT`), itself one of the 10 subjects and a test fold.
        noise_variance: variance (not std) of the additive Gaussian noise, in squared units of the [0, 1]-scaled
            intensity. Default 0.003 (:data:`SEED001_NOISE_VARIANCE`), the value the seed's code used; the seed's
            text calls it "σ" but it is a variance, std ``sqrt(0.003)`` = 0.0547723.
        quantize_8bit: also apply :class:`Quantize8Bitd` to both outputs, reproducing the 8-bit files the seed
            saved (``final_data``). Default False: keep the float result of the recipe itself; set True to
            reproduce the saved data and the seed's reported numbers.
        source_key: key of the raw 7T on input and of the processed 7T on output. Default ``"label"``: the 7T is
            the training target.
        output_key: key written with the simulated 3T. Default ``"image"``: the 3T is the network input.

    Returns:
        a ``monai.transforms.Compose`` of ``ScaleIntensityd``, ``CopyItemsd``, ``RandGaussianNoised``,
        :class:`HistogramMatchd` and, if ``quantize_8bit``, :class:`Quantize8Bitd`.
    """
    if noise_variance < 0:
        raise ValueError(f"noise_variance must be >= 0, got {noise_variance}.")
    ref01 = ScaleIntensity(minv=0.0, maxv=1.0)(reference)
    keys = [source_key, output_key]
    transforms: list[Any] = [
        ScaleIntensityd(keys=source_key, minv=0.0, maxv=1.0),
        CopyItemsd(keys=source_key, times=1, names=output_key),
        RandGaussianNoised(keys=output_key, prob=1.0, mean=0.0, std=math.sqrt(noise_variance), sample_std=False),
        HistogramMatchd(keys=keys, reference=ref01),
    ]
    if quantize_8bit:
        transforms.append(Quantize8Bitd(keys=keys))
    return Compose(transforms)


# ------------------------------------------------------------------------------------------------------------------
# realistic recipe (spec watnet.md §8 item 9)
# ------------------------------------------------------------------------------------------------------------------


def _resolve_voxel_size(
    img: NdarrayOrTensor, voxel_size: Sequence[float] | float | None, spatial_ndim: int
) -> tuple[float, ...]:
    """Voxel size in mm per spatial axis: ``voxel_size`` if given, else the MetaTensor's ``pixdim``, else 1 mm."""
    if voxel_size is not None:
        sizes = ensure_tuple_rep(voxel_size, spatial_ndim)
    elif isinstance(img, MetaTensor) and not img.is_batch:
        sizes = tuple(float(v) for v in img.pixdim)
    else:
        sizes = (1.0,) * spatial_ndim
    sizes = tuple(float(v) for v in sizes)
    if len(sizes) != spatial_ndim or any(not v > 0 for v in sizes):
        raise ValueError(f"voxel sizes must be {spatial_ndim} positive numbers, got {sizes}.")
    return sizes


def kspace_truncate(
    img: torch.Tensor,
    target_voxel_size_mm: Sequence[float] | float,
    voxel_size: Sequence[float] | float = 1.0,
) -> torch.Tensor:
    """Resolution loss by k-space truncation to a coarser voxel size (spec watnet.md §8 item 9, "resolution loss").

    Along every spatial axis whose target voxel size is larger than the input voxel size, the volume is Fourier
    transformed and only the spatial frequencies with ``|k| < 1 / (2 * target)`` (cycles/mm, with ``k`` from
    ``fftfreq(n, d=voxel_size)``) are kept: the centred box that an acquisition at the target resolution would
    have sampled, zero-filled back onto the input grid. Axes with ``target <= voxel_size`` are left untouched (no
    resolution loss). The DC term is always kept, so the mean is preserved. The kept box is symmetric in ``k``,
    so Hermitian symmetry holds and the inverse transform is real up to rounding; its *real part* is returned
    (not the magnitude, which would rectify the negative Gibbs ringing and bias the mean; the magnitude step of
    a real reconstruction is modelled by the Rician noise of :class:`SimulateRealistic3T`).

    MONAI's ``GibbsNoise`` keeps a sphere whose radius is a fraction of the array size, not tied to a voxel
    size in mm and not anisotropic, which is why this function exists.

    Args:
        img: channel-first ``(C, *spatial)`` real tensor. Computed in its dtype promoted to at least float32.
        target_voxel_size_mm: voxel size to simulate, in mm, one per spatial axis or a scalar for all. No
            default here (see :class:`SimulateRealistic3T` for the recipe's default).
        voxel_size: voxel size of ``img`` in mm, one per spatial axis or a scalar. Default 1 mm, the grid of
            the TELL 7T volumes (1 mm MNI).

    Returns:
        a new real tensor, same shape, same (promoted) floating dtype.
    """
    spatial_ndim = img.ndim - 1
    target = tuple(float(t) for t in ensure_tuple_rep(target_voxel_size_mm, spatial_ndim))
    vox = tuple(float(v) for v in ensure_tuple_rep(voxel_size, spatial_ndim))
    if any(not t > 0 for t in target) or any(not v > 0 for v in vox):
        raise ValueError(f"voxel sizes must be positive, got target {target} and input {vox}.")
    dtype = img.dtype if img.dtype in (torch.float32, torch.float64) else torch.float32
    x = img.to(dtype)
    dims = [axis + 1 for axis in range(spatial_ndim) if target[axis] > vox[axis] * (1.0 + _VOXEL_SIZE_RTOL)]
    if not dims:
        return x.clone()
    k = torch.fft.fftn(x, dim=dims)
    for dim in dims:
        n = x.shape[dim]
        freqs = torch.fft.fftfreq(n, d=vox[dim - 1], dtype=torch.float64, device=x.device)
        keep = (freqs.abs() < 1.0 / (2.0 * target[dim - 1])).to(dtype)
        shape = [1] * x.ndim
        shape[dim] = n
        k = k * keep.view(shape)
    return torch.fft.ifftn(k, dim=dims).real.contiguous()


class KSpaceTruncate(Transform):
    """Array transform wrapping :func:`kspace_truncate` (spec watnet.md §8 item 9, resolution loss).

    Args:
        target_voxel_size_mm: voxel size to simulate, in mm, per spatial axis or a scalar. Default
            ``(1.4, 1.4, 1.4)``: about the ratio of a 1 mm 3T to a 0.7 mm 7T T1w acquisition, applied to the
            1 mm grid of the TELL volumes. A target <= the input voxel size means no loss on that axis.
        voxel_size: voxel size of the input in mm (per axis or scalar). Default None: read it from the
            MetaTensor's affine (``pixdim``), or 1 mm for plain arrays; an explicit value overrides the affine.

    Returns the same array type as the input (MetaTensor metadata kept), float32 unless the input is float64.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        target_voxel_size_mm: Sequence[float] | float = (1.4, 1.4, 1.4),
        voxel_size: Sequence[float] | float | None = None,
    ) -> None:
        self.target_voxel_size_mm = target_voxel_size_mm
        self.voxel_size = voxel_size

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Truncate the k-space of channel-first ``img``; return the same array type."""
        vox = _resolve_voxel_size(img, self.voxel_size, len(img.shape) - 1)
        x = convert_to_tensor(img, track_meta=False)
        out = kspace_truncate(x, self.target_voxel_size_mm, vox)
        res, *_ = convert_to_dst_type(out, dst=img, dtype=out.dtype)
        return res


class KSpaceTruncated(MapTransform):
    """Dictionary form of :class:`KSpaceTruncate` (spec watnet.md §8 item 9): truncates every item in ``keys``.

    Args:
        keys: keys of the items to truncate.
        target_voxel_size_mm: see :class:`KSpaceTruncate`. Default ``(1.4, 1.4, 1.4)``.
        voxel_size: see :class:`KSpaceTruncate`. Default None (from the affine, else 1 mm).
        allow_missing_keys: do not raise if a key is missing. Default False (MONAI's default).
    """

    backend = KSpaceTruncate.backend

    def __init__(
        self,
        keys: KeysCollection,
        target_voxel_size_mm: Sequence[float] | float = (1.4, 1.4, 1.4),
        voxel_size: Sequence[float] | float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.truncate = KSpaceTruncate(target_voxel_size_mm, voxel_size)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Return a shallow copy of ``data`` whose ``keys`` items are truncated."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.truncate(d[key])
        return d


class SimulateRealistic3T(Randomizable, Transform):
    """Realistic simulated 3T T1w from a 7T T1w (spec watnet.md §8 item 9; replaces the noise-only §1.3 recipe).

    Input: a 7T volume normalised to about [0, 1], channel-first ``(C, X, Y, Z)`` (C = 1 in practice), brain
    voxels > 0 and background 0. Output: the simulated 3T in the same units, float32, on the same grid, same
    array type (a MetaTensor keeps the 7T's affine and metadata). Steps, in physical order:

    1. **Contrast change.** 3T T1w has lower grey/white-matter contrast than 7T. Power law ``x -> x**gamma``,
       ``gamma ~ U(gamma_range)``, through MONAI ``AdjustContrast`` whose exact semantics are
       ``min + range * ((x - min) / (range + 1e-7))**gamma`` over the whole array: for an image spanning
       [0, 1] this is ``x**gamma`` (to 1e-7), otherwise it is the gamma of the min-max-normalised image mapped
       back to the image's own range (min and max unchanged, no NaN on negative values). ``gamma == 1`` skips it.
    2. **Bias field.** Multiplicative ``exp(P)`` with ``P`` a random Legendre polynomial field of degree
       ``bias_degree`` over the array's [-1, 1] coordinates, coefficients ``~ U(bias_coeff_range)``: MONAI
       ``RandBiasField`` (prob 1), reused by applying it to a volume of ones. With ``bias_normalize`` the field
       is divided by its mean over the brain mask, so only its shape matters and the brain mean is unchanged.
    3. **Resolution loss.** :func:`kspace_truncate` to ``target_voxel_size_mm`` given the input voxel size.
    4. **Rician noise.** ``sigma = mean(signal in brain mask) / snr`` where the signal is the image after steps
       1-3; output ``sqrt((x + n1)**2 + n2**2)``, ``n1, n2 ~ N(0, sigma**2)`` i.i.d. per voxel (the magnitude of a
       complex image with Gaussian noise in both channels). In the background this gives Rayleigh noise of
       mean ``sigma * sqrt(pi / 2)``. The noise itself is MONAI ``RandRicianNoise(prob=1.0, std=sigma,
       relative=False, sample_std=False)``, whose formula is exactly this; its ``relative`` option scales by the
       image's standard deviation, not by the mean brain signal, so sigma is computed here.
    5. **Masking.** With ``mask_background`` the result is multiplied by the brain mask (the ``mask`` argument,
       else the 7T's non-zero voxels, union over channels) so the 3T is skull-stripped like real inputs; then
       values below 0 (Gibbs ringing when noise is off) are clipped to 0.

    All randomness (gamma, bias coefficients, and the seed of the noise draw) is drawn in :meth:`randomize`
    from ``self.R``, so ``set_random_state(seed)`` makes the result reproducible and ``randomize=False`` repeats
    the last draw exactly. MONAI has no single transform for this chain and no Rician noise tied to the brain
    signal, hence this class; each step reuses MONAI where it can.

    Args:
        gamma_range: ``(low, high)`` of the uniform distribution of the contrast exponent, dimensionless,
            ``0 < low <= high``. Default ``(0.7, 0.9)``: gamma < 1 brightens mid-grey more than white matter,
            e.g. grey 0.5 / white 0.8 become 0.574 / 0.836 at gamma 0.8, a Michelson GM/WM contrast lowered by
            about 10-30 % over the range, a plausible 3T-vs-7T difference (not calibrated on paired data, which
            we do not have). ``(1.0, 1.0)`` disables the step.
        bias_degree: degree of the Legendre polynomial of the log bias field, >= 1. Default 3, MONAI's default:
            smooth, low-order spatial variation like a receive-coil inhomogeneity over the head.
        bias_coeff_range: ``(low, high)`` of the uniform distribution of every Legendre coefficient of the
            log field, dimensionless. Default ``(-0.1, 0.1)``: symmetric, so no preferred bright/dark direction,
            and measured on the seven TELL 7T brain masks (1 mm MNI grid, 200 draws, field divided by its brain
            mean): in the median draw 98 % of brain voxels lie within 0.89-1.12 and the largest deviation is
            +/-16.5 % (90th percentile of draws 22 %, worst of 200 32 %); i.e. a field of roughly +/-10-20 %.
            MONAI's default ``(0.0, 0.1)`` gives about +/-11 % peak. ``(0.0, 0.0)`` disables the step.
        bias_normalize: divide the field by its mean over the brain mask. Default True: the simulated 3T stays
            in the 7T's units (otherwise the constant Legendre term adds a random global gain, measured 0.86-1.18
            with the default range). False gives MONAI's ``RandBiasField`` semantics unchanged.
        target_voxel_size_mm: voxel size to simulate in mm, per spatial axis or a scalar. Default
            ``(1.4, 1.4, 1.4)``: about the ratio of a 1 mm 3T to a 0.7 mm 7T T1w acquisition, applied to the
            1 mm grid of the TELL volumes (which have already lost any sub-millimetre 7T detail, spec §1.2).
            A target <= the input voxel size disables the step on that axis.
        voxel_size: voxel size of the input in mm (per axis or scalar). Default None: read from the
            MetaTensor's affine (``pixdim``), else 1 mm; an explicit value overrides the affine.
        snr: signal-to-noise ratio, mean brain signal over the Gaussian sigma of each quadrature channel,
            dimensionless, > 0. Default 20.0: the order of magnitude of a clinical 1 mm 3T T1w (general
            knowledge, not measured here), noisier than the 7T. None disables the noise.
        mask_background: multiply the result by the brain mask. Default True: real 3T inputs are skull-stripped
            with a zero background, as the TELL 7T volumes are.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        gamma_range: tuple[float, float] = (0.7, 0.9),
        bias_degree: int = 3,
        bias_coeff_range: tuple[float, float] = (-0.1, 0.1),
        bias_normalize: bool = True,
        target_voxel_size_mm: Sequence[float] | float = (1.4, 1.4, 1.4),
        voxel_size: Sequence[float] | float | None = None,
        snr: float | None = 20.0,
        mask_background: bool = True,
    ) -> None:
        low, high = (float(g) for g in gamma_range)
        if not 0 < low <= high:
            raise ValueError(f"gamma_range must satisfy 0 < low <= high, got {gamma_range}.")
        if bias_coeff_range[0] > bias_coeff_range[1]:
            raise ValueError(f"bias_coeff_range must satisfy low <= high, got {bias_coeff_range}.")
        if snr is not None and not snr > 0:
            raise ValueError(f"snr must be > 0 or None, got {snr}.")
        self.gamma_range = (low, high)
        self.bias_normalize = bias_normalize
        self.target_voxel_size_mm = target_voxel_size_mm
        self.voxel_size = voxel_size
        self.snr = snr
        self.mask_background = mask_background
        self._bias = RandBiasField(degree=bias_degree, coeff_range=tuple(bias_coeff_range), prob=1.0)
        self._gamma = 1.0
        self._noise_seed = 0

    def randomize(self, img_shape: Sequence[int]) -> None:
        """Draw gamma, the bias-field coefficients and the seed of the Rician noise from ``self.R``.

        Args:
            img_shape: channel-first shape ``(C, *spatial)`` of the image to degrade.
        """
        self._gamma = float(self.R.uniform(*self.gamma_range))
        self._bias.R = self.R  # RandBiasField draws its coefficients from the same stream
        self._bias.randomize(img_size=tuple(img_shape[1:]))
        self._noise_seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    @staticmethod
    def _brain_mask(x: torch.Tensor, mask: NdarrayOrTensor | None) -> torch.Tensor:
        """Boolean ``(1, *spatial)`` brain mask: ``mask > 0`` if given, else ``x != 0``, union over channels."""
        if mask is None:
            m = x != 0
        else:
            m = convert_to_tensor(mask, track_meta=False, device=x.device)
            m = m > 0 if m.dtype != torch.bool else m
            if m.ndim == x.ndim - 1:
                m = m[None]
        if m.ndim != x.ndim or tuple(m.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"mask of shape {tuple(m.shape)} does not fit the image of shape {tuple(x.shape)}.")
        return m.any(dim=0, keepdim=True)

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> NdarrayOrTensor:
        """Simulate a 3T from channel-first 7T ``img``.

        Args:
            img: 7T volume, channel-first, about [0, 1], background 0.
            mask: optional brain mask, ``(X, Y, Z)`` or ``(1 or C, X, Y, Z)``, > 0 inside. Default None: the
                7T's non-zero voxels.
            randomize: draw new random parameters first. Default True; False reuses the last draw (made for an
                image with the same number of spatial dimensions).

        Returns:
            the simulated 3T, float32, same shape and array type as ``img`` (MetaTensor metadata copied).
        """
        vox = _resolve_voxel_size(img, self.voxel_size, len(img.shape) - 1)
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        if randomize:
            self.randomize(x.shape)
        brain = self._brain_mask(x, mask)

        # 1. contrast change (gamma), MONAI AdjustContrast
        if self._gamma != 1.0:
            x = convert_to_tensor(AdjustContrast(gamma=self._gamma)(x), dtype=torch.float32, track_meta=False)

        # 2. smooth multiplicative bias field, MONAI RandBiasField applied to ones = exp(P)
        ones = torch.ones((1, *x.shape[1:]), dtype=torch.float32)
        field = convert_to_tensor(self._bias(ones, randomize=False), dtype=torch.float32, track_meta=False)
        field = field.to(x.device)
        if self.bias_normalize and bool(brain.any()):
            field = field / field[brain].mean()
        x = x * field

        # 3. resolution loss, k-space truncation
        x = kspace_truncate(x, self.target_voxel_size_mm, vox).to(torch.float32)

        # 4. Rician noise at the chosen SNR
        if self.snr is not None:
            inside = x[brain.expand_as(x)]
            sigma = float(inside.mean()) / self.snr if inside.numel() > 0 else 0.0
            rician = RandRicianNoise(prob=1.0, mean=0.0, std=sigma, relative=False, sample_std=False)
            rician.set_random_state(self._noise_seed)
            x = convert_to_tensor(rician(x), dtype=torch.float32, track_meta=False)

        # 5. brain masking, non-negative output
        if self.mask_background:
            x = x * brain
        x = x.clamp_min(0.0)

        out, *_ = convert_to_dst_type(x, dst=img, dtype=torch.float32)
        return out


class SimulateRealistic3Td(Randomizable, MapTransform):
    """Dictionary form of :class:`SimulateRealistic3T` (spec watnet.md §8 item 9).

    Reads the 7T from ``keys_source``, writes the simulated 3T to ``output_key`` and leaves the 7T untouched; the
    output MetaTensor carries the 7T's affine and metadata. ``set_random_state(seed)`` seeds the wrapped array
    transform, so the dictionary and array forms give the same result for the same seed.

    Args:
        keys_source: key of the 7T (one key). Default ``"label"``: the 7T is the training target.
        output_key: key written with the simulated 3T. Default ``"image"``: the 3T is the network input.
        mask_key: key of a brain mask (> 0 inside). Default None: use the 7T's non-zero voxels, which is the
            brain for skull-stripped volumes such as the TELL ones.
        gamma_range, bias_degree, bias_coeff_range, bias_normalize, target_voxel_size_mm, voxel_size, snr,
            mask_background: see :class:`SimulateRealistic3T` (same defaults).
        allow_missing_keys: return the data unchanged if ``keys_source`` is missing. Default False.
    """

    backend = SimulateRealistic3T.backend

    def __init__(
        self,
        keys_source: KeysCollection = "label",
        output_key: str = "image",
        mask_key: str | None = None,
        gamma_range: tuple[float, float] = (0.7, 0.9),
        bias_degree: int = 3,
        bias_coeff_range: tuple[float, float] = (-0.1, 0.1),
        bias_normalize: bool = True,
        target_voxel_size_mm: Sequence[float] | float = (1.4, 1.4, 1.4),
        voxel_size: Sequence[float] | float | None = None,
        snr: float | None = 20.0,
        mask_background: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys_source, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"keys_source must be a single key, got {self.keys}.")
        self.output_key = output_key
        self.mask_key = mask_key
        self.simulate = SimulateRealistic3T(
            gamma_range=gamma_range,
            bias_degree=bias_degree,
            bias_coeff_range=bias_coeff_range,
            bias_normalize=bias_normalize,
            target_voxel_size_mm=target_voxel_size_mm,
            voxel_size=voxel_size,
            snr=snr,
            mask_background=mask_background,
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> SimulateRealistic3Td:
        """Seed this transform and the wrapped :class:`SimulateRealistic3T` identically."""
        super().set_random_state(seed, state)
        self.simulate.set_random_state(seed, state)
        return self

    def randomize(self, img_shape: Sequence[int]) -> None:
        """Draw the random parameters of the wrapped transform for a channel-first shape ``img_shape``."""
        self.simulate.randomize(img_shape)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Return a shallow copy of ``data`` with ``output_key`` set to the simulated 3T."""
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[self.mask_key] if self.mask_key is not None else None
            d[self.output_key] = self.simulate(d[key], mask=mask, randomize=True)
        return d
