"""State dicts as ``.safetensors`` (optional extra ``safetensors``, through the package's NumPy API).

safetensors (Hugging Face) is a header of JSON (name -> dtype, shape, byte range) followed by the raw tensor bytes:
no code, no pickle, so reading one is as safe as reading ``.npz`` with ``allow_pickle=False``. The header's
``__metadata__`` (strings only) records here the key order of the state dict, which the format itself does not
keep, and that nanoopt wrote the file.

>>> import os, tempfile, nanoopt as no
>>> model = no.models.tiny_mlp()
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.safetensors")
>>> save_safetensors(model, path)
>>> list(load_safetensors(path)) == list(model.state_dict())
True
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from nanoopt.nn import Module

__all__ = ["load_safetensors", "save_safetensors"]

_ORDER_KEY = "nanoopt.key_order"


def _require() -> Any:
    try:
        import safetensors.numpy
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("safetensors support needs the optional extra: pip install 'nanoopt[safetensors]'") from None
    return safetensors


def save_safetensors(model_or_state_dict: Module | dict[str, Any], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a model's ``state_dict()`` (or a dict of arrays) to ``path`` as safetensors (written to a temporary
    name, then renamed). ``metadata``: extra string pairs for the header."""
    safetensors = _require()
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, Module) else model_or_state_dict
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        raw = value.data if hasattr(value, "data") and not isinstance(value, np.ndarray) else value
        array = np.asarray(raw, order="C")     # not ascontiguousarray: that makes a 0-d array 1-d
        if array.dtype.kind not in "biuf":
            raise TypeError(f"save_safetensors: {key!r} has dtype {array.dtype}; only numeric arrays can be saved")
        arrays[key] = array
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[_ORDER_KEY] = json.dumps(list(arrays))
    path = os.fspath(path)
    temporary = path + ".partial"
    safetensors.numpy.save_file(arrays, temporary, metadata=header)
    os.replace(temporary, path)


def load_safetensors(path: str | os.PathLike) -> OrderedDict[str, np.ndarray]:
    """Read a safetensors file as ``{name: ndarray}`` (in the order it was saved when nanoopt wrote it).

    A truncated or malformed file raises ``ValueError`` naming it. bfloat16 tensors (common in published language
    models) have no NumPy dtype and are refused by the package's NumPy API with an error naming the dtype.
    """
    safetensors = _require()
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            order = json.loads(metadata[_ORDER_KEY]) if _ORDER_KEY in metadata else keys
            if sorted(order) != sorted(keys):
                raise ValueError(f"{path}: the key order in the header lists {sorted(order)} but the file holds "
                                 f"{sorted(keys)}")
            return OrderedDict((key, handle.get_tensor(key)) for key in order)
    except FileNotFoundError:
        raise
    except (OSError, TypeError, json.JSONDecodeError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
