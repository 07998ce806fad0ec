"""Shared pieces of the 3T -> 7T MRI synthesis bundles: transforms, networks, inferers, metrics, engines, data,
outputs and the resume state of training checkpoints."""

from synth7t import (
    bundle,
    data,
    engines,
    handlers,
    inferers,
    losses,
    metrics,
    networks,
    outputs,
    prepare,
    resume,
    transforms,
)

__all__ = [
    "bundle",
    "data",
    "engines",
    "handlers",
    "inferers",
    "losses",
    "metrics",
    "networks",
    "outputs",
    "prepare",
    "resume",
    "transforms",
]
