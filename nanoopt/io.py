"""Saving and loading model state as ``.npz`` files, safely.

A checkpoint is a NumPy ``.npz`` archive: one array per ``state_dict`` key (PyTorch's dotted names) plus a small
JSON header under ``__nanoopt__`` (format version and the key list). Files are always read with
``allow_pickle=False``, so a checkpoint can never run code; object arrays, truncated or corrupted archives
(zip CRC mismatch), a missing header and keys or shapes that do not match the model all raise a ``ValueError``
or ``KeyError`` that names what differs. Loading into a model checks everything before changing anything.

>>> import os, tempfile, nanoopt as no
>>> model = no.models.tiny_mlp()
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.npz")
>>> save(model, path)
>>> restored = no.models.tiny_mlp(); _ = load_into(restored, path)
>>> all((restored.state_dict()[k] == v).all() for k, v in model.state_dict().items())
True
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

from nanoopt.nn import Module

FORMAT_NAME = "nanoopt-state-dict"
FORMAT_VERSION = 1
_HEADER_KEY = "__nanoopt__"


def save(model_or_state_dict: Module | dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a model's ``state_dict()`` (or a dict of arrays) to ``path`` as an uncompressed ``.npz``.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a half-written
    checkpoint under ``path``.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, Module) else model_or_state_dict
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key == _HEADER_KEY:
            raise ValueError(f"save: the key {_HEADER_KEY!r} is reserved")
        array = np.asarray(value.data if hasattr(value, "data") and not isinstance(value, np.ndarray) else value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"save: {key!r} has dtype {array.dtype}; only numeric arrays can be saved")
        arrays[key] = array
    header = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "keys": list(arrays)})
    arrays[_HEADER_KEY] = np.frombuffer(header.encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    temporary = path + ".partial"
    with open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(temporary, path)


def load(path: str | os.PathLike) -> OrderedDict[str, np.ndarray]:
    """Read a checkpoint written by :func:`save` and return its state dict (keys in saved order)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if _HEADER_KEY not in archive.files:
                raise ValueError(f"{path}: not a nanoopt checkpoint (no {_HEADER_KEY!r} header; keys: "
                                 f"{archive.files[:5]}...)")
            header = json.loads(archive[_HEADER_KEY].tobytes().decode("utf-8"))
            if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: expected format {FORMAT_NAME} version {FORMAT_VERSION}, got "
                                 f"{header.get('format')} version {header.get('version')}")
            stored = set(archive.files) - {_HEADER_KEY}
            if set(header["keys"]) != stored:
                raise ValueError(f"{path}: header lists keys {sorted(header['keys'])} but the archive holds "
                                 f"{sorted(stored)}")
            return OrderedDict((key, archive[key]) for key in header["keys"])
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: corrupted or truncated checkpoint ({type(error).__name__}: {error})") from None
    except ValueError as error:
        if str(error).startswith(path):
            raise
        # numpy raises ValueError for object arrays when allow_pickle=False, and for malformed .npy headers
        raise ValueError(f"{path}: unreadable checkpoint ({error})") from None


def load_into(model: Module, path: str | os.PathLike, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load a checkpoint into ``model`` in place (see :meth:`Module.load_state_dict`); returns
    (missing, unexpected) keys. Mismatched keys (strict) or shapes raise without changing the model."""
    state = load(path)
    try:
        return model.load_state_dict(state, strict=strict)
    except (KeyError, ValueError) as error:
        raise type(error)(f"{os.fspath(path)} does not fit {type(model).__name__}: {error}") from None


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Keys, shapes and dtypes stored in a checkpoint, without building a model."""
    return {key: (value.shape, str(value.dtype)) for key, value in load(path).items()}
