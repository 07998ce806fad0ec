"""Intensity normalisation to [0, 1] with percentiles taken inside the brain.

Every bundle works on [0, 1] images: VCT clips its ADC maps at the 99th percentile (spec vct.md §2.3 step 4),
the Lund thesis clips T1w at the 1st and 99th (spec ganunet.md §1.7, ambiguity A1), WATNet min-max scales
(spec watnet.md §1.1, §11.1). MONAI's ``ScaleIntensityRangePercentiles`` takes its percentiles over the whole image,
where the background of a skull-stripped volume (75-80 % of the voxels) drags the lower percentile to 0 and
shifts the upper one; these transforms take them inside a brain mask instead, which is why they are ours.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_dst_type, convert_to_tensor
from monai.utils.enums import TransformBackends

__all__ = ["NonzeroMask", "NonzeroMaskd", "PercentileScaleIntensity", "PercentileScaleIntensityd"]


class NonzeroMask(Transform):
    """Brain mask of a skull-stripped volume: the voxels where any channel is non-zero, as a ``(1, *spatial)`` uint8."""

    backend = [TransformBackends.TORCH]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        img_t = convert_to_tensor(img, track_meta=False)
        mask = (img_t != 0).any(dim=0, keepdim=True).to(torch.uint8)
        return convert_to_dst_type(mask, dst=img, dtype=torch.uint8)[0]


class NonzeroMaskd(MapTransform):
    """Put a brain mask at ``mask_key``: the given mask binarised, else :class:`NonzeroMask` of ``source_key``.

    Placed right after loading, before any spatial transform, so the mask follows the same (invertible) spatial
    transforms as the images and can be inverted with them.
    """

    backend = NonzeroMask.backend

    def __init__(self, source_key: str = "image", mask_key: str = "mask") -> None:
        super().__init__(keys=[source_key])
        self.source_key = source_key
        self.mask_key = mask_key
        self.nonzero = NonzeroMask()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if d.get(self.mask_key) is None:
            d[self.mask_key] = self.nonzero(d[self.source_key])
        else:
            d[self.mask_key] = self.nonzero(d[self.mask_key])
        return d


class PercentileScaleIntensity(Transform):
    """Clip at two percentiles computed inside a mask and scale linearly to [0, 1], per channel.

    Args:
        lower: lower percentile in [0, 100] mapped to 0 (VCT 0, thesis 1).
        upper: upper percentile in [0, 100] mapped to 1 (VCT 99, thesis 99).
        clip: clip the result to [0, 1]; values below ``lower`` (the zero background included) become 0.

    ``__call__(img, mask=None)``: ``img`` is channel-first; ``mask`` (``(1, *spatial)`` or ``spatial``, non-zero
    inside) selects the voxels the percentiles are computed on; without it, the voxels where the channel is
    non-zero. Raises ``ValueError`` when the selection is empty, since a blank volume cannot be normalised.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, lower: float = 0.0, upper: float = 99.0, clip: bool = True) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        self.lower = lower
        self.upper = upper
        self.clip = clip

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        img_t = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        inside = None if mask is None else convert_to_tensor(mask, track_meta=False).reshape(img_t.shape[1:]) != 0
        channels = []
        for channel in img_t:
            selection = channel != 0 if inside is None else inside
            values = channel[selection]
            if values.numel() == 0:
                raise ValueError("cannot normalise intensities: no voxel inside the mask (the volume is blank).")
            low, high = percentile(values, [self.lower, self.upper])
            scaled = (channel - low) / torch.clamp(high - low, min=torch.finfo(torch.float32).eps)
            channels.append(scaled.clamp(0.0, 1.0) if self.clip else scaled)
        return convert_to_dst_type(torch.stack(channels), dst=img, dtype=torch.float32)[0]


class PercentileScaleIntensityd(MapTransform):
    """Dictionary form of :class:`PercentileScaleIntensity`; the mask is read from ``mask_key`` when given."""

    backend = PercentileScaleIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        lower: float = 0.0,
        upper: float = 99.0,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.scaler = PercentileScaleIntensity(lower, upper, clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], mask)
        return d

