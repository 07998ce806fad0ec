"""Benchmarks of synth7t (see measure.py for how each one measures)."""
