"""Three-class Gaussian-mixture intensity augmentation (spec ganunet.md §2.1, after Meyer et al.).

The thesis fits a 3-component Gaussian mixture (CSF, grey matter, white matter) to the brain intensities of a
[0, 1]-normalised volume, moves each component's mean and spread, and maps every voxel to the same standardised
distance from its moved component: ``v' = mu'_k + (v - mu_k) / sigma_k * sigma'_k``. It prototyped the scheme but
trained no reported model with it (spec §2, A27), so the bundles leave it off by default. MONAI has no such
transform; the mixture fit is scikit-learn's ``GaussianMixture``, as in the thesis.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor
from monai.utils.enums import TransformBackends
from sklearn.mixture import GaussianMixture

__all__ = ["RandGMMIntensity", "RandGMMIntensityd"]


class RandGMMIntensity(RandomizableTransform):
    """Move the means and spreads of a 3-class brain intensity mixture by random amounts (spec §2.1).

    Args:
        prob: probability of augmenting a volume.
        mean_shift: each component mean moves by ``U(-mean_shift, mean_shift)``; 0.05 of the [0, 1] range is the
            spec's suggestion (the thesis gives no range).
        std_shift: each component standard deviation changes by ``U(-std_shift, std_shift)`` (0.02, likewise),
            kept at least 10 % of its fitted value.
        soft_assignment: map each voxel with the posterior-weighted mixture of the three component maps instead
            of the single most probable one. The thesis used hard assignment and saw an artefact near 0.4 from
            voxels far from their component; soft assignment keeps the mapping continuous (spec §2.1 [R]).
        num_components: mixture components (3: CSF, grey and white matter).
        max_fit_voxels: the mixture is fitted to at most this many randomly chosen brain voxels, for speed.

    ``__call__(img, mask)`` augments the voxels where ``mask`` is non-zero (all non-zero voxels when no mask is
    given) and leaves the others unchanged. The output is not clipped.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 1.0,
        mean_shift: float = 0.05,
        std_shift: float = 0.02,
        soft_assignment: bool = True,
        num_components: int = 3,
        max_fit_voxels: int = 100_000,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.mean_shift = mean_shift
        self.std_shift = std_shift
        self.soft_assignment = soft_assignment
        self.num_components = num_components
        self.max_fit_voxels = max_fit_voxels
        self._mean_deltas = np.zeros(num_components)
        self._std_deltas = np.zeros(num_components)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._mean_deltas = self.R.uniform(-self.mean_shift, self.mean_shift, self.num_components)
            self._std_deltas = self.R.uniform(-self.std_shift, self.std_shift, self.num_components)

    def fit(self, values: np.ndarray) -> GaussianMixture:
        """Fit the mixture to 1-D brain intensities, components sorted by mean (dark to bright)."""
        if values.size < 10 * self.num_components:
            raise ValueError(f"too few brain voxels ({values.size}) to fit a {self.num_components}-class mixture.")
        if values.size > self.max_fit_voxels:
            values = self.R.choice(values, self.max_fit_voxels, replace=False)
        mixture = GaussianMixture(self.num_components, random_state=int(self.R.randint(2**31))).fit(values[:, None])
        order = np.argsort(mixture.means_[:, 0])
        mixture.weights_, mixture.means_ = mixture.weights_[order], mixture.means_[order]
        mixture.covariances_ = mixture.covariances_[order]
        mixture.precisions_cholesky_ = mixture.precisions_cholesky_[order]
        return mixture

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        image = convert_to_tensor(img, track_meta=False, dtype=torch.float64).numpy()
        inside = (
            (image != 0)
            if mask is None
            else np.broadcast_to(convert_to_tensor(mask, track_meta=False).numpy() != 0, image.shape)
        )
        values = image[inside]
        mixture = self.fit(values)
        means = mixture.means_[:, 0]
        stds = np.sqrt(mixture.covariances_.reshape(self.num_components))
        new_means = means + self._mean_deltas
        new_stds = np.maximum(stds + self._std_deltas, 0.1 * stds)
        # (voxels, components): the voxel's value mapped through each component
        mapped = new_means + (values[:, None] - means) / stds * new_stds
        if self.soft_assignment:
            moved = (mixture.predict_proba(values[:, None]) * mapped).sum(axis=1)
        else:
            moved = mapped[np.arange(values.size), mixture.predict(values[:, None])]
        out = image.copy()
        out[inside] = moved
        return convert_to_dst_type(out, dst=img, dtype=img.dtype)[0]


class RandGMMIntensityd(RandomizableTransform, MapTransform):
    """Dictionary form of :class:`RandGMMIntensity`: the same random change for every key (e.g. the 3T image)."""

    backend = RandGMMIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = "mask",
        prob: float = 1.0,
        mean_shift: float = 0.05,
        std_shift: float = 0.02,
        soft_assignment: bool = True,
        max_fit_voxels: int = 100_000,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mask_key = mask_key
        self.augment = RandGMMIntensity(1.0, mean_shift, std_shift, soft_assignment, max_fit_voxels=max_fit_voxels)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandGMMIntensityd:
        super().set_random_state(seed, state)
        self.augment.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.augment.randomize()
        mask = d.get(self.mask_key) if self.mask_key else None
        for key in self.key_iterator(d):
            d[key] = self.augment(d[key], mask, randomize=False)
        return d
