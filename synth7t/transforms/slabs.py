"""2.5-D slabs: neighbouring axial slices stacked as channels of a 2-D image.

WATNet trains on 64x64x3 patches, "3 consecutive axial slices, fed to a 2-D network as 3 input channels"
(spec watnet.md §1.4); the thesis U-Net takes 3 (or 5) neighbouring slices and predicts the middle one
(spec ganunet.md §1.8). A spatial crop of depth k along the slice axis followed by this transform gives such a
training sample; :class:`synth7t.inferers.SlabInferer` applies the trained 2-D network to whole volumes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.transforms.utils_pytorch_numpy_unification import moveaxis
from monai.utils.enums import TransformBackends

__all__ = ["SlabToChannels", "SlabToChannelsd", "slab_to_channels"]


def slab_to_channels(img: NdarrayOrTensor) -> NdarrayOrTensor:
    """``(C, X, Y, K)`` -> ``(C * K, X, Y)``, modality-major: channel ``c * K + k`` is slice ``k`` of modality ``c``.

    The same layout :class:`synth7t.inferers.SlabInferer` feeds the network, so a network trained on these
    samples sees identical inputs at inference.
    """
    channels, height, width, depth = img.shape
    return moveaxis(img, -1, 1).reshape(channels * depth, height, width)


class SlabToChannels(Transform):
    """Move the last (slice) axis of a channel-first 3-D slab into the channels: ``(C, X, Y, K)`` -> ``(C*K, X, Y)``."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first 3-D slab (C, X, Y, K), got shape {tuple(img.shape)}.")
        return slab_to_channels(img)


class SlabToChannelsd(MapTransform):
    """Dictionary form of :class:`SlabToChannels`."""

    backend = SlabToChannels.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SlabToChannels()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
