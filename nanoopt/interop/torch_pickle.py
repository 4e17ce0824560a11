"""Read PyTorch checkpoints (``torch.save`` files, ``.pth``/``.pt``) into NumPy arrays without torch, safely.

``torch.save`` writes a Python pickle. Unpickling runs whatever callables the file names, so a checkpoint from
an untrusted source is a program (the "pickle problem" PyTorch's own ``weights_only=True`` mode exists for).
This reader never lets the pickle name an arbitrary callable: :class:`RestrictedUnpickler` resolves only the
handful of globals that rebuilding tensors needs and refuses every other one with :class:`UnsafeCheckpointError`
naming it, *before* anything from the file is called.

Two container formats exist:

* **zip** (``torch.save`` since 1.6): ``<archive>/data.pkl`` is the pickle; each storage is a raw record
  ``<archive>/data/<key>``; ``<archive>/byteorder`` says ``little`` or ``big`` (absent = little).
* **legacy** (``_use_new_zipfile_serialization=False``): five consecutive pickles (magic number
  ``0x1950a86a20f9469cfc6c``, protocol 1001, system info, the object, the sorted storage keys) followed by each
  storage as an int64 element count and its raw bytes. The very old tar format is refused.

In the pickle a tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
backward_hooks)`` and a storage is a *persistent id* ``("storage", torch.FloatStorage, key, location, numel)``.
Element ``i`` of a tensor is ``storage[offset + sum_d i_d * stride_d]``: strided, non-contiguous views and
several tensors sharing one storage are rebuilt exactly (each returned array is an independent copy).
``bfloat16`` has no NumPy dtype; it is widened exactly to float32 (its 16 bits are the top half of a float32).

>>> import io, pickle, zipfile, os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.pth")
>>> with zipfile.ZipFile(path, "w") as archive:  # what torch.save({"w": torch.tensor([1., 2.])}) writes
...     archive.writestr("tiny/data.pkl", _EXAMPLE_PICKLE)
...     archive.writestr("tiny/data/0", np.array([1.0, 2.0], dtype="<f4").tobytes())
>>> dict(load_torch(path))
{'w': array([1., 2.], dtype=float32)}
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafeCheckpointError", "load_torch", "load_torch_checkpoint"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# a stride-0 (expanded) tensor may view fewer elements than it has; beyond this many it is refused, so that a
# small file cannot demand terabytes
_MAX_BROADCAST_ELEMENTS = 1 << 24
# keys under which training scripts commonly nest the state dict, tried in this order
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle asked for a global this reader does not admit (nothing from it was run)."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co.: only its element type matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# element types by storage class; "bfloat16" is read as uint16 bits and widened to float32
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}


class _Storage:
    """A storage's elements as a flat NumPy array (bfloat16 already widened)."""

    __slots__ = ("key", "array")

    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array

    def __setstate__(self, state: Any) -> None:  # the pickle may not BUILD into our objects
        raise UnsafeCheckpointError("the checkpoint tries to set the state of a storage")


class _TensorRecord:
    """A rebuilt tensor, kept opaque while unpickling (so no pickle opcode can act on the NumPy array)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("the checkpoint tries to set the state of a tensor")


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRecord:
    """``tensor[i] = storage[offset + sum_d i_d * stride_d]``, bounds-checked against the storage, then copied."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor must be rebuilt from a storage, got {type(storage).__name__}")
    size, stride = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} must have the same length and be >= 0")
    flat = storage.array
    elements = int(np.prod(size, dtype=np.int64))
    if elements > max(flat.size, 1) and elements > _MAX_BROADCAST_ELEMENTS:
        raise pickle.UnpicklingError(f"tensor of size {size} would repeat the {flat.size} elements of storage "
                                     f"{storage.key!r} into {elements}; refusing to materialise it")
    if 0 in size:
        return _TensorRecord(np.zeros(size, dtype=flat.dtype))
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise pickle.UnpicklingError(f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches "
                                     f"element {last} of storage {storage.key!r} which holds {flat.size}")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size, strides=[s * item for s in stride],
                                           writeable=False)
    return _TensorRecord(np.array(view, copy=True, order="C"))


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _TensorRecord:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None) -> _TensorRecord:
    if not isinstance(data, _TensorRecord):
        raise pickle.UnpicklingError(f"a parameter must wrap a tensor, got {type(data).__name__}")
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    if len(args) > 1:
        raise pickle.UnpicklingError(f"OrderedDict takes at most one argument, got {len(args)}")
    items = args[0] if args else ()
    if not isinstance(items, list | tuple | dict):
        raise pickle.UnpicklingError(f"OrderedDict items must be a list, tuple or dict, got {type(items).__name__}")
    return OrderedDict(items)


# (module, name) -> what the pickle gets instead; nothing else resolves
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that admits only the globals needed to rebuild tensors, storages and ordered dicts.

    ``find_class`` is the single point through which a pickle reaches any Python object (GLOBAL, STACK_GLOBAL,
    INST, OBJ, NEWOBJ and the extension registry all go through it); here it returns stand-ins from a fixed table
    and raises :class:`UnsafeCheckpointError` for anything else. Storages arrive as persistent ids and are
    resolved by ``load_storage(key, dtype, numel)``.

    >>> import pickle
    >>> dict(RestrictedUnpickler(io.BytesIO(pickle.dumps(OrderedDict(a=1))), None).load())
    {'a': 1}
    >>> try:
    ...     RestrictedUnpickler(io.BytesIO(b"cos\\nsystem\\n(S'echo hi'\\ntR."), None).load()
    ... except UnsafeCheckpointError as error:
    ...     print(str(error)[:60])
    the checkpoint's pickle asks for os.system, which nanoopt do
    """

    def __init__(self, file: Any, load_storage: Any) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            hint = (" (the file pickles a whole model object: save model.state_dict() instead)"
                    if str(module).startswith("torch.nn") or str(module).startswith("__main__") else "")
            raise UnsafeCheckpointError(f"the checkpoint's pickle asks for {module}.{name}, which nanoopt does not "
                                        f"load (only tensors, storages and ordered dicts are admitted; nothing from "
                                        f"the file was run){hint}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} (expected a storage reference)")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key!r} has type {storage_type!r}, not a storage class")
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"storage {key!r} has invalid element count {numel!r}")
        if key not in self._storages:
            if self._load_storage is None:
                raise pickle.UnpicklingError(f"storage {key!r} referenced but no storages are available")
            self._storages[key] = _Storage(key, self._load_storage(key, storage_type.dtype, numel))
        storage = self._storages[key]
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy format: (view_key, offset, numel) of a storage inside the root storage
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
                raise pickle.UnpicklingError(f"storage {key!r} has invalid view metadata {view!r}")
            view_key, offset, view_numel = view
            if offset < 0 or view_numel < 0 or offset + view_numel > storage.array.size:
                raise pickle.UnpicklingError(f"storage view {view_key!r} ({offset}+{view_numel}) exceeds storage "
                                             f"{key!r} of {storage.array.size} elements")
            return _Storage(str(view_key), storage.array[offset:offset + view_numel])
        return storage


def _decode(raw: bytes | memoryview, dtype: str, numel: int, big_endian: bool, where: str) -> np.ndarray:
    """Raw storage bytes -> flat array of ``numel`` elements (bfloat16 widened exactly to float32)."""
    stored = np.dtype("uint16" if dtype == "bfloat16" else dtype).newbyteorder(">" if big_endian else "<")
    needed = numel * stored.itemsize
    if len(raw) < needed:
        raise ValueError(f"{where}: storage needs {needed} bytes ({numel} x {dtype}) but the record holds {len(raw)}")
    flat = np.frombuffer(raw, dtype=stored, count=numel).astype(stored.newbyteorder("="))
    if dtype == "bfloat16":
        return (flat.astype(np.uint32) << 16).view(np.float32)
    return flat


def _materialise(obj: Any, depth: int = 0) -> Any:
    """Replace tensor records by arrays throughout dicts, lists and tuples."""
    if depth > 100:
        raise ValueError("checkpoint nesting deeper than 100 levels")
    if isinstance(obj, _TensorRecord):
        return obj.array
    if isinstance(obj, _Storage):
        return obj.array.copy()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialise(value, depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, depth + 1) for v in obj)
    return obj


def _read_zip(path: str, archive: zipfile.ZipFile) -> Any:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"{path}: a torch zip checkpoint holds exactly one '<archive>/data.pkl'; found {pickles} "
                         f"among {names[:8]}")
    prefix = pickles[0][: -len("data.pkl")]
    order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
        raise ValueError(f"{path}: unknown byte order {order!r} in {prefix}byteorder")
    present = set(names)

    def load_storage(key: str, dtype: str, numel: int) -> np.ndarray:
        record = f"{prefix}data/{key}"
        if record not in present:
            raise ValueError(f"{path}: the pickle refers to storage {key!r} but the archive has no record {record!r}")
        return _decode(archive.read(record), dtype, numel, order == "big", f"{path}:{record}")

    return RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Everything a ``torch.save`` file holds (dicts, lists, numbers, strings), with every tensor as a NumPy array.

    Only tensors, storages and ordered dicts are rebuilt; a pickle naming any other global raises
    :class:`UnsafeCheckpointError` (naming it) before anything runs. A truncated file, a non-checkpoint, a missing
    storage record or a tensor reaching past its storage raise ``ValueError`` naming the file.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "junk.pth")
    >>> _ = open(path, "wb").write(b"not a checkpoint")
    >>> load_torch_checkpoint(path)
    Traceback (most recent call last):
    ...
    ValueError: ...junk.pth: not a torch checkpoint (reading the magic number: ...)
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(0)
        if head == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(handle) as archive:
                    return _materialise(_read_zip(path, archive))
            except UnsafeCheckpointError:
                raise
            except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error, OSError, TypeError, KeyError,
                    IndexError, AttributeError, RecursionError) as error:  # a malformed pickle, not our bug
                raise ValueError(f"{path}: corrupted or truncated torch checkpoint ({type(error).__name__}: "
                                 f"{error})") from None
        if _looks_like_tar(handle):
            raise ValueError(f"{path}: the tar-based torch format (before PyTorch 0.4) is not supported")
        return _materialise(_read_legacy(path, handle))


def _looks_like_tar(handle: Any) -> bool:
    handle.seek(257)
    magic = handle.read(5)
    handle.seek(0)
    return magic == b"ustar"


def _read_legacy(path: str, handle: Any) -> Any:
    """Legacy files store the storages' bytes after the pickle: pass 1 unpickles against zero-filled storages to
    learn their keys and reads the bytes that follow; pass 2 unpickles again, rebuilding from the real bytes."""
    start = handle.tell()
    arrays: dict[str, np.ndarray] = {}
    _read_legacy_pass(path, handle, arrays, collect=True)
    handle.seek(start)
    return _read_legacy_pass(path, handle, arrays, collect=False)


def _read_legacy_pass(path: str, handle: Any, arrays: dict[str, np.ndarray], collect: bool) -> Any:
    def next_pickle(what: str, load_storage: Any = None) -> Any:
        try:
            return RestrictedUnpickler(handle, load_storage).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, struct.error, IndexError, TypeError, KeyError,
                AttributeError, RecursionError) as error:
            raise ValueError(f"{path}: not a torch checkpoint (reading the {what}: {error})") from None

    if next_pickle("magic number") != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a torch checkpoint (neither a zip archive nor the legacy magic number)")
    if next_pickle("protocol version") != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy torch protocol (expected {_LEGACY_PROTOCOL})")
    sys_info = next_pickle("system info")
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    requests: dict[str, tuple[str, int]] = {}

    def load_storage(key: str, dtype: str, numel: int) -> np.ndarray:
        requests[key] = (dtype, numel)
        if collect:
            return np.zeros(numel, dtype=np.float32 if dtype == "bfloat16" else dtype)
        if key not in arrays:
            raise ValueError(f"{path}: storage {key!r} has no data")
        return arrays[key]

    obj = next_pickle("checkpoint object", load_storage)
    if not collect:
        return obj
    keys = next_pickle("storage key list")
    if not isinstance(keys, list) or set(map(str, keys)) != set(requests):
        raise ValueError(f"{path}: the storage key list {keys!r} does not match the storages the pickle uses "
                         f"{sorted(requests)}")
    for key in map(str, keys):
        dtype, numel = requests[key]
        header = handle.read(8)
        if len(header) != 8:
            raise ValueError(f"{path}: truncated before storage {key!r}")
        stored_numel = struct.unpack(">q" if big_endian else "<q", header)[0]
        if stored_numel != numel:
            raise ValueError(f"{path}: storage {key!r} holds {stored_numel} elements, the pickle expects {numel}")
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        arrays[key] = _decode(handle.read(numel * itemsize), dtype, numel, big_endian, f"{path}: storage {key!r}")
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def load_torch(path: str | os.PathLike, key: str | None = None,
               strip_prefix: str | None = None) -> OrderedDict[str, np.ndarray]:
    """Read the state dict of a PyTorch ``.pth``/``.pt`` checkpoint as ``{name: ndarray}``, without torch.

    The file may hold the state dict itself or wrap it: ``{"state_dict": sd, "epoch": 3, ...}`` or
    ``{"model": sd, "optimizer": ...}`` (the keys in :data:`WRAPPER_KEYS` are tried in order; pass ``key`` to
    choose). ``strip_prefix="module."`` removes the prefix ``nn.DataParallel`` adds to every name. Arrays keep the
    stored dtype (float32, float16, int8, int64, ...; bfloat16 becomes float32 exactly). The pickle is read with
    :class:`RestrictedUnpickler`: a checkpoint naming any other global is refused and nothing from it runs.

    >>> import os, tempfile, zipfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.pth")
    >>> with zipfile.ZipFile(path, "w") as archive:
    ...     archive.writestr("tiny/data.pkl", _EXAMPLE_PICKLE)
    ...     archive.writestr("tiny/data/0", np.array([3.0, 4.0], dtype="<f4").tobytes())
    >>> load_torch(path)["w"]
    array([3., 4.], dtype=float32)
    """
    path = os.fspath(path)
    obj = load_torch_checkpoint(path)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"load_torch: {path} has no entry {key!r} (top level: {found})")
        obj = obj[key]
    elif not _is_state_dict(obj) and isinstance(obj, Mapping):
        for wrapper in WRAPPER_KEYS:
            if wrapper in obj and _is_state_dict(obj[wrapper]):
                obj = obj[wrapper]
                break
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            kinds = {k: type(v).__name__ for k, v in list(obj.items())[:10]}
            raise ValueError(f"load_torch: {path} holds no state dict (a dict of name -> tensor); top-level entries "
                             f"{kinds}; pass key=... to choose one")
        raise ValueError(f"load_torch: {path} holds a {type(obj).__name__}, not a state dict")
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, value in obj.items():
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        state[name] = value
    return state


# the pickle torch.save({"w": torch.tensor([1., 2.])}) writes (protocol 2), for the examples above
_EXAMPLE_PICKLE = (
    b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03"
    b"ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x02tq\x07QK\x00K\x02\x85q\x08K"
    b"\x01\x85q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs."
)

