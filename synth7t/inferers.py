"""Whole-volume inference with a 2-D network trained on 2.5-D slabs.

The seed-001 report infers on whole slices "instead of small patches" (spec watnet.md §5); the original WATNet
test script runs every 3-slice stack with stride 1 in z and averages the overlapping predictions (§11.1 "Test"),
and the thesis U-Net predicts the middle slice of each stack (spec ganunet.md §1.8, A20). MONAI's
``SliceInferer`` runs a 2-D network on single slices only, so this inferer is ours.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, convert_to_tensor, optional_import

tqdm, _ = optional_import("tqdm", name="tqdm")

__all__ = ["SlabInferer"]


class SlabInferer(Inferer):
    """Run a 2-D network over the axial slabs of ``slab_size`` slices of a volume, in batches: every slab (stride 1,
    the faithful scheme of the papers' test scripts) or every ``stride``-th one.

    The input ``(B, C, X, Y, Z)`` is padded by ``slab_size // 2`` slices at both ends of the slice axis
    (``padding_mode``, default replicating the edge slice), so that every slice is the centre of one slab. Each
    slab reaches the network as ``(N, C * slab_size, X, Y)`` in the layout of
    :func:`synth7t.transforms.slab_to_channels` (channel ``c * slab_size + k`` is slice ``k`` of channel ``c``).

    Args:
        slab_size: odd number of neighbouring slices per network input (3 for WATNet).
        output: ``"slab"`` when the network predicts every slice of its input slab (WATNet: output
            ``(N, C_out * slab_size, X, Y)``); each slice then receives ``slab_size`` predictions, from the slabs
            that contain it, and gets their mean (predictions of padded slices are dropped). ``"center"`` when it
            predicts the middle slice only (output ``(N, C_out, X, Y)``).
        stride: slices between the centres of consecutive slabs. 1 (default): every slice is the centre of a slab.
            ``s > 1`` (``output="slab"`` only, ``s <= slab_size``): the centres are slices ``slab_size // 2``,
            ``slab_size // 2 + s``, ... and the last slice when those slabs miss it, so every slice is predicted at
            least once and the network runs about ``s`` times less often; ``s = slab_size`` predicts each slice once
            (slabs side by side).
        batch_size: slabs per forward pass.
        padding_mode: ``torch.nn.functional.pad`` mode for the slice axis ("replicate", "reflect", "constant").
        append_slice_position: give the network a ``context`` keyword whose last entry is the position of the
            slab's centre slice, ``linspace(-0.5, 0.5, Z)[z]`` (the coordinate MONAI's ``AddCoordinateChannels`` gives
            the training slabs), after the ``context`` passed to this inferer, if any.
        progress: show a ``tqdm`` progress bar over each volume's batches of slabs, as MONAI's
            ``SlidingWindowInferer(progress=True)`` does over its windows.
        reuse_empty_slabs: run the network on one all-zero slab per volume and give its prediction to every other
            all-zero slab (the slices above and below a skull-stripped brain: about a quarter of the slabs of the
            TELL volumes) instead of computing the same prediction again for each. The network gets the same
            input either way, so the output is the same up to float rounding (tests/test_inferers.py). Not with
            ``append_slice_position``, where each slab's context differs.

    A ``context`` keyword of shape ``(B, D)`` (per-volume conditioning, e.g. age, sex, diagnosis) is given to the
    network for every slab of volume ``b`` as ``context[b]``.

    Returns ``(B, C_out, X, Y, Z)`` on the input's device, float32; a ``MetaTensor`` carrying the input's metadata
    (affine, applied transforms) when the input is one, so ``Invertd`` can undo the preprocessing on it, as with
    MONAI's own inferers.
    """

    def __init__(
        self,
        slab_size: int = 3,
        output: str = "slab",
        stride: int = 1,
        batch_size: int = 16,
        padding_mode: str = "replicate",
        append_slice_position: bool = False,
        progress: bool = False,
        reuse_empty_slabs: bool = True,
    ) -> None:
        super().__init__()
        self.reuse_empty_slabs = reuse_empty_slabs and not append_slice_position
        self.append_slice_position = append_slice_position
        self.progress = progress
        if slab_size < 1 or slab_size % 2 == 0:
            raise ValueError(f"slab_size must be a positive odd number, got {slab_size}.")
        if output not in ("slab", "center"):
            raise ValueError(f"output must be 'slab' or 'center', got {output!r}.")
        if not 1 <= stride <= (slab_size if output == "slab" else 1):
            raise ValueError(
                f"stride must be between 1 and slab_size ({slab_size}) with output 'slab', and 1 with output "
                f"'center', so that every slice is predicted; got {stride} with output {output!r}."
            )
        self.slab_size = slab_size
        self.output = output
        self.stride = stride
        self.batch_size = batch_size
        self.padding_mode = padding_mode

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"SlabInferer expects (B, C, X, Y, Z) volumes, got shape {tuple(inputs.shape)}.")
        volumes = convert_to_tensor(inputs, track_meta=False)
        k, half = self.slab_size, self.slab_size // 2
        padded = F.pad(volumes, (half, half, 0, 0, 0, 0), mode=self.padding_mode) if half else volumes
        # (B, C, X, Y, Z, k): slab z covers padded slices z .. z + k - 1, i.e. input slices z - half .. z + half.
        slabs = padded.unfold(-1, k, 1)
        context = kwargs.pop("context", None)
        outputs = torch.stack(
            [
                self._infer_volume(volume_slabs, network, None if context is None else context[b], *args, **kwargs)
                for b, volume_slabs in enumerate(slabs)
            ]
        )
        return convert_to_dst_type(outputs, dst=inputs)[0]

    def _centres(self, depth: int, device: torch.device) -> torch.Tensor:
        """The slices the network's slabs are centred on (see ``stride``)."""
        half = self.slab_size // 2
        first = 0 if self.stride == 1 else min(half, depth - 1)
        centres = list(range(first, depth, self.stride))
        if centres[-1] + half < depth - 1:
            centres.append(depth - 1)
        return torch.tensor(centres, device=device)

    def _slab_context(self, context: torch.Tensor | None, centres: torch.Tensor, depth: int):
        """The ``context`` of the slabs centred on ``centres``: the volume's vector, then the slice position if asked
        for."""
        parts = []
        if context is not None:
            vector = torch.as_tensor(context, device=centres.device).float().reshape(1, -1)
            parts.append(vector.expand(len(centres), -1))
        if self.append_slice_position:
            parts.append(torch.linspace(-0.5, 0.5, depth, device=centres.device)[centres, None])
        return torch.cat(parts, dim=1) if parts else None

    def _infer_volume(
        self,
        slabs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        context: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        channels, height, width, depth, k = slabs.shape
        total: torch.Tensor | None = None
        coverage = slabs.new_zeros(depth, dtype=torch.float32)
        centres = self._centres(depth, slabs.device)
        empty_centres = centres[:0]  # all-zero slabs: the first is computed, the others take its prediction
        if self.reuse_empty_slabs:
            empty_centres = centres[~slabs[:, :, :, centres].ne(0).any(dim=4).flatten(0, 2).any(dim=0)]
            centres = centres[~torch.isin(centres, empty_centres[1:])]
        empty_prediction: torch.Tensor | None = None
        batches = centres.split(self.batch_size)
        for centres in tqdm(batches, desc="slabs", unit="batch", leave=False) if self.progress else batches:
            batch = slabs[:, :, :, centres].permute(3, 0, 4, 1, 2).reshape(len(centres), channels * k, height, width)
            slab_context = self._slab_context(context, centres, depth)
            if slab_context is not None:
                kwargs["context"] = slab_context
            prediction = network(batch, *args, **kwargs).float()
            if total is None:
                out_channels = prediction.shape[1] // (k if self.output == "slab" else 1)
                total = prediction.new_zeros(out_channels, height, width, depth)
            self._place(total, coverage, prediction, centres)
            if len(empty_centres) > 1 and bool((centres == empty_centres[0]).any()):
                empty_prediction = prediction[centres == empty_centres[0]]
        if empty_prediction is not None:
            assert total is not None
            reused = empty_centres[1:]
            self._place(total, coverage, empty_prediction.expand(len(reused), *empty_prediction.shape[1:]), reused)
        assert total is not None
        return total / coverage.to(total.device) if self.output == "slab" else total

    def _place(
        self, total: torch.Tensor, coverage: torch.Tensor, prediction: torch.Tensor, centres: torch.Tensor
    ) -> None:
        """Write (``"center"``) or accumulate (``"slab"``) the predictions of the slabs centred on ``centres``."""
        if self.output == "center":
            total[..., centres] = prediction.permute(1, 2, 3, 0)
        else:
            self._accumulate_slab(total, coverage, prediction, centres)

    def _accumulate_slab(
        self, total: torch.Tensor, coverage: torch.Tensor, prediction: torch.Tensor, centres: torch.Tensor
    ) -> None:
        """Add slice ``j`` of the slab centred on ``z`` to output slice ``z - half + j`` when that slice exists, and
        count it in ``coverage``."""
        k, half, depth = self.slab_size, self.slab_size // 2, total.shape[-1]
        prediction = prediction.reshape(len(centres), total.shape[0], k, *prediction.shape[-2:])
        for j in range(k):
            target = centres - half + j
            valid = (target >= 0) & (target < depth)
            total.index_add_(-1, target[valid], prediction[valid, :, j].permute(1, 2, 3, 0))
            coverage[target[valid]] += 1  # one slab per centre: no slice twice in one index
