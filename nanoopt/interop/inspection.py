"""``nanoopt inspect FILE``: what a checkpoint or model file holds, without building a model.

Reads nanoopt ``.npz`` checkpoints (and any ``.npz`` of arrays), ``.safetensors``, PyTorch ``.pth``/``.pt`` (through
the restricted reader of :mod:`nanoopt.interop.torch_pickle`) and ``.onnx`` (initializers and operator counts), and
reports, per layer (the tensors sharing a dotted prefix) and in total: parameter count, dtypes, stored bytes,
sparsity (fraction of exact zeros) and bit-width. The bit-width of an integer tensor is the width its values need
(signed: ``max(bitlen(max), bitlen(-min - 1)) + 1``), so 4-bit codes stored in int8 show as 4, or, in a nanoopt
checkpoint, the bit width its description records for the codes (3-bit codes that happen to fit 2 bits show 3); packed
buffers (``*_packed``, two 4-bit codes per byte: counted and checked for zeros code by code) and ONNX ``INT4`` tensors
show as 4 or less; floats show their dtype's width.
A PyTorch bfloat16 tensor is shown as the float32 it is read as (dtype, bits and bytes of the widened array).

>>> import os, tempfile, nanoopt as no
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.npz"); no.io.save(no.models.tiny_mlp(), path)
>>> info = inspect_file(path)
>>> info["format"], info["parameters"], [layer["name"] for layer in info["layers"]]
('nanoopt .npz', 2410, ['1', '3'])
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from nanoopt import io
from nanoopt.interop.onnx_import import require_onnx
from nanoopt.interop.safetensors_io import load_safetensors
from nanoopt.interop.torch_pickle import load_torch, load_torch_checkpoint
from nanoopt.quant.packing import unpack_int4

__all__ = ["format_inspection", "inspect_file", "tensor_bits"]

# integer tensors that parametrise a grid rather than hold codes on it: their width is what their values need
_NOT_CODES = ("zero_point", "shift", "m0", "bias", "num_batches_tracked")


def tensor_bits(array: np.ndarray, name: str = "") -> int:
    """Bits per element: the width an integer tensor's values need, 4 for packed 4-bit buffers, else the dtype's.

    >>> tensor_bits(np.array([-8, 7], np.int8)), tensor_bits(np.array([0, 255], np.uint8)), tensor_bits(np.zeros(2))
    (4, 8, 64)
    """
    if name.endswith("_packed"):
        return 4
    if array.dtype.kind == "b":
        return 1
    if array.dtype.kind in "iu" and array.size:
        low, high = int(array.min()), int(array.max())
        if array.dtype.kind == "u":
            return max(high.bit_length(), 1)
        return max(high.bit_length(), (-low - 1).bit_length()) + 1
    return array.dtype.itemsize * 8


def _flatten(obj: Any, prefix: str, out: OrderedDict) -> None:
    """Every array inside nested dicts/lists, under dotted names."""
    if isinstance(obj, np.ndarray):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), out)


def _read(path: str) -> tuple[str, OrderedDict[str, tuple[np.ndarray, int, int]], dict[str, Any]]:
    """(format, {name: (array, bits, stored bytes)}, extra facts)."""
    extension = os.path.splitext(path)[1].lower()
    tensors: OrderedDict[str, tuple[np.ndarray, int, int]] = OrderedDict()
    extra: dict[str, Any] = {}
    if extension == ".onnx":
        onnx = require_onnx()
        from onnx import numpy_helper

        model = onnx.load(path)
        for initializer in model.graph.initializer:
            array = numpy_helper.to_array(initializer)
            four = initializer.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
            bits = 4 if four else tensor_bits(np.asarray(array))
            stored = -(-array.size // 2) if four else np.asarray(array).nbytes
            tensors[initializer.name] = (np.asarray(array), bits, stored)
        extra["operators"] = dict(Counter(node.op_type for node in model.graph.node))
        extra["opset"] = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        return "ONNX", tensors, extra
    if extension == ".safetensors":
        arrays: OrderedDict[str, np.ndarray] = load_safetensors(path)
        kind = "safetensors"
    elif zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()) \
            or extension in (".pth", ".pt", ".bin", ".ckpt"):
        kind = "PyTorch checkpoint"
        try:
            arrays = load_torch(path)               # the state dict, unwrapped from {"state_dict": ...} & co.
        except (KeyError, ValueError) as error:
            if "holds no state dict" not in str(error) and "not a state dict" not in str(error):
                raise
            arrays = OrderedDict()
            _flatten(load_torch_checkpoint(path), "", arrays)
    else:
        try:
            arrays, kind = io.load(path), "nanoopt .npz"
        except ValueError as error:
            if "not a nanoopt checkpoint" not in str(error):
                raise
            with np.load(path, allow_pickle=False) as archive:
                arrays, kind = OrderedDict((k, archive[k]) for k in archive.files), ".npz"
    descriptions = getattr(arrays, "metadata", None) or {}   # nanoopt checkpoints describe their integer codes
    for name, array in arrays.items():
        description = descriptions.get(name, {})
        values = array
        if name.endswith("_packed") and array.dtype == np.uint8 and array.ndim == 1:  # two 4-bit codes per byte
            shape = description.get("weight_shape")
            count = int(np.prod(shape)) if shape else 2 * array.size
            values = unpack_int4(array, min(count, 2 * array.size))
        bits = tensor_bits(values)
        if description.get("bits") is not None and array.dtype.kind in "iu" and not name.endswith(_NOT_CODES):
            bits = int(description["bits"])
        tensors[name] = (values, bits, array.nbytes)
    return kind, tensors, extra



def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Per-tensor and per-layer facts about a checkpoint or model file (see the module docstring)."""
    path = os.fspath(path)
    kind, tensors, extra = _read(path)
    rows = []
    for name, (array, bits, stored) in tensors.items():
        dtype = "int4 (packed)" if name.endswith("_packed") and bits <= 4 else str(array.dtype)
        rows.append({"name": name, "shape": tuple(array.shape), "dtype": dtype, "elements": int(array.size),
                     "bytes": int(stored), "zeros": int(np.count_nonzero(array == 0)), "bits": int(bits)})
    layers: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for row in rows:
        layer = row["name"].rsplit(".", 1)[0] if "." in row["name"] else "(top level)"
        entry = layers.setdefault(layer, {"name": layer, "tensors": 0, "elements": 0, "bytes": 0, "zeros": 0,
                                          "dtypes": [], "bits": []})
        entry["tensors"] += 1
        for key in ("elements", "bytes", "zeros"):
            entry[key] += row[key]
        if row["dtype"] not in entry["dtypes"]:
            entry["dtypes"].append(row["dtype"])
        if row["bits"] not in entry["bits"]:
            entry["bits"].append(row["bits"])
    elements = sum(r["elements"] for r in rows)
    return {"path": path, "format": kind, "file_bytes": os.path.getsize(path), "tensors": rows,
            "layers": list(layers.values()), "parameters": elements, "stored_bytes": sum(r["bytes"] for r in rows),
            "sparsity": sum(r["zeros"] for r in rows) / elements if elements else 0.0, **extra}


def format_inspection(info: dict[str, Any], tensors: bool = False) -> str:
    """A readable table of :func:`inspect_file`'s result (one row per layer, or per tensor with ``tensors``)."""
    lines = [f"{info['path']}: {info['format']}, {info['file_bytes']:,} bytes on disk"]
    if "opset" in info:
        lines.append(f"opset {info['opset']}; operators: " + ", ".join(f"{op} x{n}" for op, n in info["operators"]
                                                                          .items()))
    if tensors:
        header = f"{'tensor':<40} {'shape':<18} {'dtype':<13} {'bits':>4} {'bytes':>10} {'sparsity':>8}"
        lines += ["", header, "-" * len(header)]
        for r in info["tensors"]:
            sparsity = r["zeros"] / r["elements"] if r["elements"] else 0.0
            lines.append(f"{r['name'][:40]:<40} {str(r['shape'])[:18]:<18} {r['dtype']:<13} {r['bits']:>4} "
                         f"{r['bytes']:>10,} {100 * sparsity:>7.1f}%")
    else:
        header = f"{'layer':<32} {'tensors':>7} {'parameters':>11} {'bytes':>10} {'sparsity':>8}  {'dtypes (bits)'}"
        lines += ["", header, "-" * len(header)]
        for layer in info["layers"]:
            sparsity = layer["zeros"] / layer["elements"] if layer["elements"] else 0.0
            kinds = ", ".join(layer["dtypes"]) + " (" + "/".join(map(str, sorted(layer["bits"]))) + ")"
            lines.append(f"{layer['name'][:32]:<32} {layer['tensors']:>7} {layer['elements']:>11,} "
                         f"{layer['bytes']:>10,} {100 * sparsity:>7.1f}%  {kinds}")
    lines.append(f"\ntotal: {info['parameters']:,} elements in {len(info['tensors'])} tensors, "
                 f"{info['stored_bytes']:,} bytes stored, sparsity {100 * info['sparsity']:.1f}%")
    return "\n".join(lines)
