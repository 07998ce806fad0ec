"""The files a MONAI Label request names, confined to the server's studies folder (and the bundle's own weights).

MONAI Label passes a request's ``image`` and ``params`` to the app as the client sent them: its own
``MONAILabelApp.infer`` opens any existing server path given as ``image``, and its ``BundleInferTask`` loads weights
from any existing path that ``model_filename`` leads to from the bundle's ``models`` folder. Without these checks a
client could have the server open and describe any file it can read (``../``, an absolute path, a symlink in the
studies folder that leads out of it). The module imports nothing from MONAI Label, so that the rules are tested in
the main environment (``tests/test_monailabel_paths.py``), where MONAI Label is not installed; ``main.py`` applies
them to every request before any file is opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["RequestPathError", "check_device", "check_model_filename", "confine_request_paths"]


class RequestPathError(ValueError):
    """A request input that is not a file of the studies folder, or weights not the bundle's; answered with 400."""


def confine_request_paths(
    request: Mapping[str, Any],
    keys: Iterable[str],
    studies: str | os.PathLike,
    image_uri: Callable[[str], str],
) -> dict[str, Any]:
    """A copy of ``request`` whose value under each of ``keys`` is replaced by the real path of the file it names.

    A value is an image id of the studies folder (``image_uri`` gives its path, or ``""`` for an unknown id, as
    MONAI Label's ``Datastore.get_image_uri`` does) or a path, relative to ``studies`` or absolute. Its real path
    (every symlink followed) must lie inside the real path of ``studies``; otherwise the message names the key only:
    neither the value's real path nor whether anything is there, so that a client learns nothing of the files
    outside the folder. Inside it, a value that names no file or folder is refused with its key and value. Keys that
    are absent, or empty, are left to the bundle's own check of its inputs.

    Raises:
        RequestPathError: at the first value that is not a string, leads outside ``studies`` or names nothing.
    """
    root = os.path.realpath(studies)
    confined = dict(request)
    for key in keys:
        value = confined.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise RequestPathError(f"'{key}': expected an image id or a file path, got a {type(value).__name__}.")
        try:
            path = os.path.realpath(image_uri(value) or os.path.join(root, value))
        except ValueError:  # a NUL character
            path = None
        if path is None or os.path.commonpath([root, path]) != root:
            raise RequestPathError(
                f"'{key}': not an image id or a file of the studies folder; name one by its id or by a path inside "
                "the studies folder."
            )
        if not os.path.exists(path):
            raise RequestPathError(f"'{key}': {value!r} is neither an image id nor a file of the studies folder.")
        confined[key] = path
    return confined


def check_model_filename(request: Mapping[str, Any], model_files: Sequence[str]) -> None:
    """Refuses a request's ``model_filename`` unless it names one of ``model_files``, the bundle's own weights.

    ``BundleInferTask`` offers the bundle's ``models/*.pt`` file names as the option ``model_filename`` and loads
    the first name of the request's value (a name or a list of names) joined to the ``models`` folder, wherever that
    leads; here every name given must be one of the bundle's.

    Raises:
        RequestPathError: naming the key and the accepted names.
    """
    value = request.get("model_filename")
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if value is not None and not (names and all(name in model_files for name in names)):
        raise RequestPathError(f"'model_filename': expected one of the bundle's model files {list(model_files)}.")


def check_device(request: Mapping[str, Any]) -> None:
    """Refuses a request's ``device`` unless it is ``cpu``, ``cuda`` or ``cuda:<index>``.

    ``BundleInferTask`` copies the request's ``device`` into the bundle's config, where a value starting with ``$``
    would be evaluated as Python if the config were parsed again; only plain device names are let through.

    Raises:
        RequestPathError: naming the key and the accepted forms.
    """
    value = request.get("device")
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value)):
        raise RequestPathError("'device': expected 'cpu', 'cuda' or 'cuda:<index>'.")
