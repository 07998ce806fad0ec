"""A ``model.pt`` of the gan_unet_t1w7t network widened to twice the channels, computing the same function
(``synth7t.widen``, Net2WiderNet), to train on from where the narrow network stopped:

    python scripts/widen_checkpoint.py --checkpoint runs/model_0.5.0.pt --output runs/model_0.5.0_wide.pt

The other network arguments are ``train.yaml``'s defaults (flags change them, e.g. ``--channel_mult "[1, 2, 2, 2]"``);
the width is read from the checkpoint. Before writing, both networks run on one random batch and must agree within
1e-3 of the output's range (AdaDM's standard deviation over twice the values differs by Bessel's correction alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import fire
import torch

from synth7t.bundle import require_file
from synth7t.networks import AttentionResUNet
from synth7t.outputs import check_absent
from synth7t.widen import widen_attention_res_unet


def widen_checkpoint(
    checkpoint: str,
    output: str,
    in_channels: int = 3,
    out_channels: int = 1,
    channel_mult: Sequence[int] = (1, 2, 4, 4),
    num_res_blocks: int = 1,
    norm_num_groups: int = 8,
    global_residual: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Writes the widened weights to ``output`` and prints the check batch's largest output difference, relative to
    the narrow output's largest magnitude."""
    check_absent([output], overwrite)
    narrow_weights = torch.load(require_file(checkpoint, "checkpoint to widen"), map_location="cpu", weights_only=True)
    arguments = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        norm_num_groups=norm_num_groups,
        global_residual=global_residual,
    )
    wide_weights = widen_attention_res_unet(narrow_weights, seed)
    channels = narrow_weights["stem.conv.weight"].shape[0]
    narrow = AttentionResUNet(channels=channels, **arguments).eval()
    narrow.load_state_dict(narrow_weights)
    wide = AttentionResUNet(channels=2 * channels, **arguments).eval()
    wide.load_state_dict(wide_weights)
    size = 2 ** len(channel_mult) * 4
    batch = torch.rand(2, in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = narrow(batch)
        difference = ((wide(batch) - expected).abs().max() / expected.abs().max()).item()
    if difference > 1e-3:
        raise RuntimeError(f"the widened network differs from {checkpoint} by {difference:.3g}; nothing written.")
    torch.save(wide.state_dict(), output)
    print(f"{checkpoint}: {channels} -> {2 * channels} channels, relative output difference {difference:.2g}; {output}")


if __name__ == "__main__":
    fire.Fire(widen_checkpoint)
