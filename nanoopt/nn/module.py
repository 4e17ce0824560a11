"""Module and Parameter: the tree that every nanoopt technique transforms.

A :class:`Module` owns parameters (:class:`Parameter`, trainable tensors), buffers (plain ndarrays such as
BatchNorm's running statistics, or a pruning mask) and child modules, all registered by attribute assignment as
in PyTorch. ``state_dict()`` names them with PyTorch's dotted keys (``"0.weight"``, ``"bn.running_mean"``), so
checkpoints move between the two. Forward pre-hooks and forward hooks (with removable handles) let observers,
pruning reparametrisations and distillation read or rewrite what flows through a module without changing it.

>>> import nanoopt as no
>>> from nanoopt import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> sorted(model.state_dict())
['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from nanoopt.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable (``requires_grad=True`` by default)."""

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class RemovableHandle:
    """Returned by ``register_*_hook``; ``remove()`` unregisters the hook (idempotent)."""

    _next_id = 0

    def __init__(self, hooks: dict[int, Callable]) -> None:
        self._hooks = hooks
        self.id = RemovableHandle._next_id
        RemovableHandle._next_id += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Module:
    """Base class of every layer and model. Subclasses set attributes in ``__init__`` and define ``forward``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_forward_pre_hooks", OrderedDict())
        object.__setattr__(self, "_forward_hooks", OrderedDict())
        object.__setattr__(self, "training", True)

    # ----------------------------------------------------------------- registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning "
                               f"attribute {name!r}")
        for table, kind in _TABLE_KINDS:  # a name lives in at most one table: leave any other it was in
            if name in self.__dict__[table] and not isinstance(value, kind) and value is not None:
                del self.__dict__[table][name]
        if isinstance(value, Parameter):
            self.__dict__.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self.__dict__.pop(name, None)
            self._modules[name] = value
        elif value is None and name in self._parameters:  # an optional parameter made absent (PyTorch)
            self._parameters[name] = None
        elif value is None and name in self._modules:
            self._modules[name] = None
        elif name in self._buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"buffer {name!r} must be a numpy array, got {type(value).__name__}")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        for table in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for table in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__[table]:
                del self.__dict__[table][name]
                self._non_persistent.discard(name)
                return
        object.__delattr__(self, name)

    def register_parameter(self, name: str, parameter: Parameter | None) -> None:
        """Register ``parameter`` under ``name`` (``None`` registers an absent optional parameter)."""
        if parameter is not None and not isinstance(parameter, Parameter):
            raise TypeError(f"register_parameter({name!r}): expected a Parameter, got {type(parameter).__name__}")
        self.__dict__.pop(name, None)
        self._parameters[name] = parameter

    def register_buffer(self, name: str, array: np.ndarray | None, persistent: bool = True) -> None:
        """Register a non-trainable array saved in ``state_dict`` (unless ``persistent=False``)."""
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"register_buffer({name!r}): expected a numpy array, got {type(array).__name__}")
        self.__dict__.pop(name, None)
        self._buffers[name] = array
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module({name!r}): expected a Module, got {type(module).__name__}")
        self._modules[name] = module

    # ----------------------------------------------------------------- calling
    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        for hook in list(self._forward_pre_hooks.values()):
            result = hook(self, inputs)
            if result is not None:
                inputs = result if isinstance(result, tuple) else (result,)
        output = self.forward(*inputs, **kwargs)
        for hook in list(self._forward_hooks.values()):
            result = hook(self, inputs, output)
            if result is not None:
                output = result
        return output

    def register_forward_pre_hook(self, hook: Callable[[Module, tuple], Any]) -> RemovableHandle:
        """``hook(module, inputs)`` runs before ``forward``; a non-None return value replaces the inputs."""
        handle = RemovableHandle(self._forward_pre_hooks)
        self._forward_pre_hooks[handle.id] = hook
        return handle

    def register_forward_hook(self, hook: Callable[[Module, tuple, Any], Any]) -> RemovableHandle:
        """``hook(module, inputs, output)`` runs after ``forward``; a non-None return value replaces the output.

        >>> import nanoopt as no
        >>> from nanoopt import nn
        >>> layer, seen = nn.ReLU(), []
        >>> handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        >>> _ = layer(no.Tensor([[1.0, -1.0]])); handle.remove(); _ = layer(no.Tensor([[1.0]]))
        >>> seen
        [(1, 2)]
        """
        handle = RemovableHandle(self._forward_hooks)
        self._forward_hooks[handle.id] = hook
        return handle

    # ----------------------------------------------------------------- traversal
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, module in self._modules.items():
            if module is not None:
                yield name, module

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "", memo: set[int] | None = None) -> Iterator[tuple[str, Module]]:
        """This module and every descendant, depth first, each once, with its dotted name ('' for the root)."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for module_name, module in modules:
            for name, parameter in module._parameters.items():
                if parameter is None or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                yield (f"{module_name}.{name}" if module_name else name), parameter

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, parameter in self.named_parameters(recurse=recurse):
            yield parameter

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for module_name, module in modules:
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    yield (f"{module_name}.{name}" if module_name else name), buffer

    def buffers(self, recurse: bool = True) -> Iterator[np.ndarray]:
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    def get_submodule(self, target: str) -> Module:
        """The descendant at dotted path ``target`` ('' is this module)."""
        module: Module = self
        if target == "":
            return module
        for part in target.split("."):
            if part not in module._modules or module._modules[part] is None:
                raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking for {target!r}; "
                                     f"children: {list(module._modules)})")
            module = module._modules[part]
        return module

    def set_submodule(self, target: str, module: Module) -> None:
        """Replace the descendant at dotted path ``target`` by ``module`` (the parent must already have it)."""
        if not target:
            raise ValueError("set_submodule needs a non-empty dotted name")
        parent_name, _, child = target.rpartition(".")
        parent = self.get_submodule(parent_name)
        if child not in parent._modules:
            raise AttributeError(f"{type(parent).__name__} has no submodule {child!r} to replace ({target!r})")
        if not isinstance(module, Module):
            raise TypeError(f"set_submodule({target!r}): expected a Module, got {type(module).__name__}")
        parent._modules[child] = module

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call ``fn`` on every descendant (children first) and on this module; returns self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ----------------------------------------------------------------- modes and gradients
    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for parameter in self.parameters():
            parameter.requires_grad = requires_grad
        return self

    def num_parameters(self) -> int:
        """Number of parameter elements (trainable or not)."""
        return int(sum(p.size for p in self.parameters()))

    # ----------------------------------------------------------------- state
    def state_dict(self, prefix: str = "") -> OrderedDict[str, np.ndarray]:
        """Copies of every parameter, persistent buffer and extra state array, keyed with PyTorch's dotted names, in
        PyTorch's order (a module's parameters, then its buffers, then its extra state, then its children's).

        The returned dict carries ``metadata``: ``{key: description}`` for the entries that need more than a dtype
        and a shape (the quantization a tensor holds, a sparse layout; see :meth:`describe_state`).
        :meth:`load_state_dict` compares it with the model's own and refuses a mismatch; ``nanoopt.io.save`` writes
        it into the checkpoint.
        """
        state: OrderedDict[str, np.ndarray] = OrderedDict()
        self._save_to(state, prefix)
        state.metadata = self.state_metadata(prefix)  # type: ignore[attr-defined]
        return state

    def _save_to(self, state: OrderedDict[str, np.ndarray], prefix: str) -> None:
        for name, parameter in self._parameters.items():
            if parameter is not None:
                state[prefix + name] = parameter.data.copy()
        for name, buffer in self._buffers.items():
            if buffer is not None and name not in self._non_persistent:
                state[prefix + name] = buffer.copy()
        for name, value in self.get_extra_state().items():
            state[prefix + name] = np.array(value, copy=True)
        for name, child in self.named_children():
            child._save_to(state, prefix + name + ".")

    def get_extra_state(self) -> dict[str, np.ndarray]:
        """State that is neither a parameter nor a buffer but changes what the module computes (switches,
        observer statistics), as named arrays saved in ``state_dict`` under this module's prefix. Default: none.

        A module that defines it also defines :meth:`set_extra_state` (and may check values in
        :meth:`check_state`). The key set must not depend on the data seen (a fresh module lists the same keys).
        """
        return {}

    def set_extra_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`get_extra_state` returned (called after every entry was checked)."""
        if state:
            raise NotImplementedError(f"{type(self).__name__} has extra state {sorted(state)} but no set_extra_state")

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Refuse values this module cannot hold (``ValueError`` naming the entry), before anything is loaded.

        ``state`` maps this module's own names (``"weight"``, not ``"0.weight"``) to the arrays about to be loaded.
        Default: no check beyond the generic ones of :meth:`load_state_dict`.
        """

    def resizable_state(self) -> frozenset[str]:
        """Names of buffers whose shape depends on the data (e.g. the non-zeros of a sparse weight): loading
        replaces them instead of copying into them, after :meth:`check_state` validated the whole set."""
        return frozenset()

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """``{own state name: description}`` for the entries a dtype and a shape do not describe: quantized values
        or their grids (bits, signedness, symmetry, per-channel axis, packing, group size, ...), a sparse layout;
        JSON-serialisable dicts. A checkpoint records them, and an entry only loads into one with the same
        description. Default: none."""
        return {}

    def state_metadata(self, prefix: str = "") -> OrderedDict[str, dict[str, Any]]:
        """:meth:`describe_state` of every module, keyed like ``state_dict`` (only keys that have one).

        >>> from nanoopt import nn, quant
        >>> model = quant.quantize_weights(nn.Sequential(nn.Linear(4, 2)), bits=8)
        >>> model.state_metadata()["0.weight_codes"]["bits"]
        8
        """
        metadata: OrderedDict[str, dict[str, Any]] = OrderedDict()
        for key, (module, name, _) in self._state_slots().items():
            description = module.describe_state().get(name)
            if description:
                metadata[prefix + key] = description
        return metadata

    def _state_slots(self) -> OrderedDict[str, tuple[Module, str, str]]:
        """Every key of state_dict(), mapped to (owning module, attribute name, 'parameter'|'buffer'|'extra')."""
        slots: OrderedDict[str, tuple[Module, str, str]] = OrderedDict()
        self._collect_slots(slots, "")
        return slots

    def _collect_slots(self, slots: OrderedDict[str, tuple[Module, str, str]], prefix: str) -> None:
        # the same walk as _save_to (a module shared under two names has keys under both, as in PyTorch)
        for name, parameter in self._parameters.items():
            if parameter is not None:
                slots[prefix + name] = (self, name, "parameter")
        for name, buffer in self._buffers.items():
            if buffer is not None and name not in self._non_persistent:
                slots[prefix + name] = (self, name, "buffer")
        for name in self.get_extra_state():
            slots[prefix + name] = (self, name, "extra")
        for name, child in self.named_children():
            child._collect_slots(slots, prefix + name + ".")

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy arrays into the existing parameters and buffers, in place; returns (missing, unexpected) keys.

        Everything is checked before anything changes, in the model's key order, and the first mismatch raises
        naming the key:

        * missing or unexpected keys (``KeyError``, with ``strict=True``, the default);
        * a shape that differs (``ValueError``, both shapes), except for a module's :meth:`resizable_state`;
        * a dtype that cannot hold the values exactly (``TypeError``, both dtypes). Values are cast only
          losslessly: integer widening (int8 -> int16 -> int32 -> int64, uint -> a wider int), float widening
          (float16 -> float32 -> float64), and float64 -> float32 when every value is exactly a float32. Never
          float -> int, int -> float, bool <-> number or a narrower integer, even when the values would fit: an
          integer's width is the bit width of the codes it stores;
        * NaN or Inf in a float entry (``ValueError``);
        * a description (quantization bits, grid, packing; sparse layout) that differs from the model's, when
          ``state_dict`` carries ``metadata`` (as ``state_dict()`` and ``nanoopt.io.load`` return it; a plain dict
          of arrays has none) (``ValueError``, both);
        * values a module refuses in its :meth:`check_state` (codes outside their bit width, an invalid sparse
          structure; ``ValueError``).
        """
        slots = self._state_slots()
        missing = [k for k in slots if k not in state_dict]
        unexpected = [k for k in state_dict if k not in slots]
        if strict and (missing or unexpected):
            pruned = any(k.endswith(("_orig", "_mask")) for k in unexpected + missing)
            hint = ("; the checkpoint or the model is pruned (<name>_orig / <name>_mask): use "
                    "nanoopt.prune.load_pruned_state_dict, or prune.remove_all before saving") if pruned else ""
            first = (f"first: {missing[0]!r} is in the model but not in the checkpoint" if missing else
                     f"first: {unexpected[0]!r} is in the checkpoint but not in the model")
            raise KeyError(f"load_state_dict: missing keys {_listed(missing)}, unexpected keys {_listed(unexpected)} "
                           f"({first}){hint}")
        stored_metadata = getattr(state_dict, "metadata", None)
        converted: dict[str, np.ndarray] = {}
        per_module: dict[int, tuple[Module, str, dict[str, np.ndarray]]] = {}
        for key, (module, name, kind) in slots.items():
            if key not in state_dict:
                continue
            value = np.asarray(state_dict[key].data if isinstance(state_dict[key], Tensor) else state_dict[key])
            if value.dtype.kind not in "biuf":
                raise TypeError(f"load_state_dict: {key!r} has non-numeric dtype {value.dtype}")
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise ValueError(f"load_state_dict: {key!r} contains NaN or Inf")
            if kind != "extra":
                target = module._parameters[name].data if kind == "parameter" else module._buffers[name]
                resizable = kind == "buffer" and name in module.resizable_state()
                if value.shape != target.shape and not (resizable and value.ndim == target.ndim):
                    raise ValueError(f"load_state_dict: {key!r} has shape {value.shape} in the checkpoint but "
                                     f"{target.shape} in the model")
                cast = lossless_cast(value, target.dtype)
                if cast is None:
                    raise TypeError(f"load_state_dict: {key!r} is {value.dtype} in the checkpoint but "
                                    f"{target.dtype} in the model; values are cast only losslessly (integer or "
                                    "float widening, float64 values that are exact float32s)")
                value = cast
            if stored_metadata is not None:
                expected = module.describe_state().get(name) or {}
                stored = stored_metadata.get(key) or {}
                if stored != expected:
                    raise ValueError(f"load_state_dict: {key!r} is described differently: "
                                     f"{_difference(stored, expected)}")
            converted[key] = value
            prefix = key[: len(key) - len(name)]
            per_module.setdefault(id(module), (module, prefix, {}))[2][name] = value
        for module, prefix, local in per_module.values():
            try:
                module.check_state(local)
            except ValueError as error:
                where = f"layer {prefix[:-1]!r}" if prefix else "the model"
                raise ValueError(f"load_state_dict: {where} ({type(module).__name__}): {error}") from None
        extra: dict[int, tuple[Module, dict[str, np.ndarray]]] = {}
        for key, value in converted.items():
            module, name, kind = slots[key]
            if kind == "extra":
                extra.setdefault(id(module), (module, {}))[1][name] = value.copy()
            elif kind == "parameter":
                module._parameters[name].data[...] = value
            elif value.shape != module._buffers[name].shape:  # a resizable buffer of another size
                module._buffers[name] = np.array(value, copy=True)
            else:
                module._buffers[name][...] = value
        for module, local in extra.values():
            module.set_extra_state(local)
        for module, _, _ in per_module.values():
            module.after_load()
        return missing, unexpected

    def after_load(self) -> None:
        """Called on every module that received entries, once :meth:`load_state_dict` has copied them in (rebuild
        caches derived from the state here). Default: nothing."""

    # ----------------------------------------------------------------- printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(child).replace("\n", "\n  ") for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


_TABLE_KINDS = (("_parameters", Parameter), ("_modules", Module), ("_buffers", np.ndarray))


def lossless_cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """``value`` as ``dtype`` if that keeps every value exactly and the kind of number (see
    :meth:`Module.load_state_dict`), else ``None``.

    >>> lossless_cast(np.array([1, -2], np.int8), np.dtype(np.int32)).dtype
    dtype('int32')
    >>> lossless_cast(np.array([0.5, 0.1]), np.dtype(np.float32)) is None      # 0.1 is not a float32
    True
    >>> lossless_cast(np.array([3], np.int64), np.dtype(np.int8)) is None      # narrower codes: never
    True
    """
    dtype = np.dtype(dtype)
    if value.dtype == dtype:
        return value
    kinds = value.dtype.kind + dtype.kind
    if kinds in ("ii", "uu", "ui") and np.can_cast(value.dtype, dtype, "safe"):
        return value.astype(dtype)
    if kinds == "ff":
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(dtype)
            if np.can_cast(value.dtype, dtype, "safe") or np.array_equal(cast.astype(value.dtype), value):
                return cast
    return None


def _listed(keys: list[str], limit: int = 8) -> str:
    """``keys`` for a message: all of them, or the first ``limit`` and how many more.

    >>> _listed(["a", "b", "c"], limit=2)
    "['a', 'b'] and 1 more"
    """
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} and {len(keys) - limit} more"


def _difference(stored: dict[str, Any], expected: dict[str, Any]) -> str:
    """The fields where two descriptions differ, checkpoint first, for messages.

    >>> _difference({"bits": 4, "packed": True}, {"bits": 3, "packed": True})
    'bits=4 in the checkpoint but bits=3 in the model'
    >>> _difference({}, {"bits": 8})
    'nothing in the checkpoint but {bits=8} in the model'
    """
    def whole(description: dict[str, Any]) -> str:
        return "{" + ", ".join(f"{k}={v}" for k, v in description.items()) + "}" if description else "nothing"

    if not stored or not expected:
        return f"{whole(stored)} in the checkpoint but {whole(expected)} in the model"
    fields = [k for k in dict.fromkeys([*stored, *expected]) if stored.get(k) != expected.get(k)]
    return (", ".join(f"{k}={stored.get(k)}" for k in fields) + " in the checkpoint but "
            + ", ".join(f"{k}={expected.get(k)}" for k in fields) + " in the model")
