"""Shared pieces of the 3T -> 7T MRI synthesis bundles: transforms, networks, inferers, metrics, engines, data."""

from synth7t import bundle, data, engines, handlers, inferers, losses, metrics, networks, prepare, transforms

__all__ = ["bundle", "data", "engines", "handlers", "inferers", "losses", "metrics", "networks", "prepare", "transforms"]
