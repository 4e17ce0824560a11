"""Saving and loading model state as ``.npz`` files, safely.

A checkpoint is a NumPy ``.npz`` archive: one array per ``state_dict`` key (PyTorch's dotted names) plus a small
JSON header under ``__nanoopt__``: format version, the key list, and a description of every entry that needs
more than a dtype and a shape -- the quantization it holds (bit width, grid, packing, group size) or its sparse
layout (the model's ``state_dict().metadata``, see :meth:`nanoopt.nn.Module.describe_state`). Arrays keep
their exact dtype, so integer codes, sparse structures and switches round-trip bit for bit.

Files are always read with ``allow_pickle=False``, so a checkpoint can never run code. What cannot be loaded is
refused with a message that names it: object arrays, truncated or corrupted archives (zip CRC mismatch), a
missing header, files that are not ``.npz`` archives at all (a ``.npy`` array, a text file: the message says
which), and a checkpoint that does not fit the model -- the first key whose name, shape, dtype or description
differs, with both sides (see :meth:`nanoopt.nn.Module.load_state_dict`; values are cast only losslessly).
:func:`save` refuses what :func:`load` would refuse (NaN or Inf values, non-numeric arrays). Loading into a
model checks everything before changing anything.

Format version 2 added the descriptions; version 1 files (without them) still load, checked by
name, shape, dtype and value only.

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
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanoopt.nn import Module

FORMAT_NAME = "nanoopt-state-dict"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_HEADER_KEY = "__nanoopt__"


def save(model_or_state_dict: Module | Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a model's ``state_dict()`` (or a dict of arrays) to ``path`` as an uncompressed ``.npz``.

    The descriptions of the entries (``state_dict().metadata``) go into the header. Values that
    :func:`load` would refuse are refused here, naming the key: NaN or Inf, non-numeric dtypes. The file is
    written to a temporary name and renamed, so an interrupted save never leaves a half-written checkpoint.

    >>> import os, tempfile, numpy as np
    >>> save([np.ones(2)], os.path.join(tempfile.mkdtemp(), "x.npz"))
    Traceback (most recent call last):
    ...
    TypeError: save: expected a nanoopt Module or a dict of arrays keyed by name, got list
    """
    if isinstance(model_or_state_dict, Module):
        state: Mapping[str, Any] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(f"save: expected a nanoopt Module or a dict of arrays keyed by name, got "
                        f"{type(model_or_state_dict).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"save: state dict keys must be str, got {key!r} ({type(key).__name__})")
        if key == _HEADER_KEY:
            raise ValueError(f"save: the key {_HEADER_KEY!r} is reserved")
        array = np.asarray(value.data if hasattr(value, "data") and not isinstance(value, np.ndarray) else value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"save: {key!r} has dtype {array.dtype}; only numeric arrays can be saved")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ValueError(f"save: {key!r} contains NaN or Inf ({int(np.count_nonzero(~np.isfinite(array)))} of "
                             f"{array.size} values); such a checkpoint would be refused on load")
        arrays[key] = array
    metadata = {key: dict(value) for key, value in (getattr(state, "metadata", None) or {}).items() if key in arrays}
    header = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "keys": list(arrays),
                         "descriptions": metadata})
    arrays[_HEADER_KEY] = np.frombuffer(header.encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    temporary = path + ".partial"
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _not_an_archive(path: str) -> str | None:
    """What the file at ``path`` is, if it is not a zip archive (the container of ``.npz``); else None."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a single NumPy array (.npy, as np.save writes it)"
    if head[:1] == b"\x80":
        return "a Python pickle stream (code that runs when unpickled; nanoopt never unpickles)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a binary file of an unknown format (it starts with {head[:8]!r})"
    return f"a text file (it starts with {text[:40]!r})"


def load(path: str | os.PathLike) -> OrderedDict[str, np.ndarray]:
    """Read a checkpoint written by :func:`save` and return its state dict (keys in saved order).

    The result carries ``metadata`` (the descriptions of the header; ``None`` for a version 1
    file), which :meth:`~nanoopt.nn.Module.load_state_dict` checks against the model.
    """
    path = os.fspath(path)
    kind = _not_an_archive(path)
    if kind is not None:
        raise ValueError(f"{path}: not a nanoopt checkpoint: this is {kind}. A nanoopt checkpoint is an .npz "
                         "archive written by nanoopt.io.save")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if _HEADER_KEY not in archive.files:
                raise ValueError(f"{path}: not a nanoopt checkpoint (no {_HEADER_KEY!r} header; keys: "
                                 f"{archive.files[:5]}...)")
            header = json.loads(archive[_HEADER_KEY].tobytes().decode("utf-8"))
            if header.get("format") != FORMAT_NAME or header.get("version") not in READABLE_VERSIONS:
                raise ValueError(f"{path}: expected format {FORMAT_NAME} version {FORMAT_VERSION}, got "
                                 f"{header.get('format')} version {header.get('version')}")
            stored = set(archive.files) - {_HEADER_KEY}
            if set(header["keys"]) != stored:
                raise ValueError(f"{path}: header lists keys {sorted(header['keys'])} but the archive holds "
                                 f"{sorted(stored)}")
            metadata = header.get("descriptions") if header["version"] >= 2 else None
            if metadata is not None and not (isinstance(metadata, dict) and all(
                    key in stored and isinstance(value, dict) for key, value in metadata.items())):
                raise ValueError(f"{path}: malformed descriptions in the header")
            state = OrderedDict((key, archive[key]) for key in header["keys"])
            state.metadata = metadata  # type: ignore[attr-defined]
            return state
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: corrupted or truncated checkpoint ({type(error).__name__}: {error})") from None
    except ValueError as error:
        if str(error).startswith(path):
            raise
        # numpy raises ValueError for object arrays (allow_pickle=False) and malformed .npy headers in the archive
        what = "holds Python objects (an object array)" if "pickle" in str(error) else \
            f"is malformed ({str(error).split('.')[0]})"
        raise ValueError(f"{path}: unreadable checkpoint: an entry {what}; a nanoopt checkpoint holds numeric "
                         "arrays only") from None


def load_into(model: Module, path: str | os.PathLike, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load a checkpoint into ``model`` in place (see :meth:`Module.load_state_dict`); returns
    (missing, unexpected) keys. A checkpoint that does not fit (keys with ``strict``, shapes, dtypes,
    descriptions (quantization, sparse layout), values the model's layers refuse) raises, naming the first
    mismatched key, without changing the model."""
    if not isinstance(model, Module):
        raise TypeError(f"load_into: expected a nanoopt Module to load into, got {type(model).__name__}")
    state = load(path)
    try:
        return model.load_state_dict(state, strict=strict)
    except (KeyError, ValueError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise type(error)(f"{os.fspath(path)} does not fit {type(model).__name__}: {message}") from None


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Keys, shapes and dtypes stored in a checkpoint, without building a model."""
    return {key: (value.shape, str(value.dtype)) for key, value in load(path).items()}


def descriptions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The description of every entry of a checkpoint that has one: quantization (bits, grid, packing) or sparse
    layout (``{}`` for a float model or a version 1 file).

    >>> import os, tempfile, nanoopt as no
    >>> path = os.path.join(tempfile.mkdtemp(), "w4.npz")
    >>> save(no.quant.quantize_weights(no.models.tiny_mlp(), bits=4), path)
    >>> descriptions(path)["1.weight_packed"]["bits"]
    4
    """
    return dict(load(path).metadata or {})
