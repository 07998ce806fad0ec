"""Engine-side pieces the MONAI engines lack."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AutocastNetwork"]


class AutocastNetwork(nn.Module):
    """Run a network's forward pass under ``torch.autocast(device_type, dtype)`` and return float32.

    MONAI's engines implement mixed precision as ``torch.autocast("cuda")`` with a CUDA ``GradScaler``, so their
    ``amp=True`` does nothing on a CPU. On CPUs with bfloat16 matrix units (Intel AMX, AVX512-BF16) a bfloat16
    forward is several times faster and needs no loss scaling; wrapping the network in this module lets the
    unchanged engines train and infer that way. Checkpoints should save the wrapped ``module`` so their keys do
    not depend on the wrapper.
    """

    def __init__(self, module: nn.Module, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            output = self.module(*args, **kwargs)
        return output.float()
