"""The error every check of user input raises; :mod:`synth7t.bundle` turns it into one clean message."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input found before any compute; the message names the file and the problem."""
