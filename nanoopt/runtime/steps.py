"""The operations a plan executes: each validates its constants once and binds prepared kernel calls to buffers.

An operation is built from a :class:`~nanoopt.runtime.description.Step` (``Op(step)``: every check that does not
depend on the input -- dtypes, shapes, zero points against the grid, fixed-point multipliers, the accumulator
bound -- runs here, and the weights are packed). ``op.bind(inputs)`` then takes the buffers of its inputs for one
input shape, allocates its output buffer and returns it with the list of calls ``(function, arguments)`` that
fill it; the plan runs those calls, nothing else, on every call with that shape.

This module holds the base class, the checks every operation uses and the operations that work on codes and
floats alike (max pool, flatten, identity); :mod:`nanoopt.runtime.integer_steps` and
:mod:`nanoopt.runtime.float_steps` hold the rest, and :data:`nanoopt.runtime.plan.OPS` names them all.

>>> import numpy as np
>>> from nanoopt.runtime.description import Step
>>> op = MaxPool(Step("max_pool", (0,), {"kernel": [1, 2], "stride": [1, 2]}))
>>> x = np.array([[[[-1.0, 2.0]]]], np.float32)
>>> out, calls = op.bind([x])
>>> for function, arguments in calls: function(*arguments)
>>> out
array([[[[2.]]]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from nanoopt.kernels import reference as ref
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime.description import PlanFormatError, Step

Call = tuple[Callable[..., Any], tuple]

# (the _helpers are shared with integer_steps, float_steps)
__all__ = ["Call", "Flatten", "Identity", "MaxPool", "Op", "chain_calls"]


def _fail(step: Step, message: str) -> PlanFormatError:
    return PlanFormatError(f"step {step.op!r} ({step.name or 'unnamed'}): {message}")


def _array(step: Step, key: str, dtypes: tuple, ndim: int, optional: bool = False) -> np.ndarray | None:
    value = step.arrays.get(key)
    if value is None:
        if optional:
            return None
        raise _fail(step, f"needs the array {key!r}")
    if value.dtype not in [np.dtype(d) for d in dtypes] or value.ndim != ndim:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise _fail(step, f"array {key!r} must be {ndim}-D {names}, got {value.ndim}-D {value.dtype}")
    return np.ascontiguousarray(value)


def _attr(step: Step, key: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in step.attrs:
        if default is ...:
            raise _fail(step, f"needs the attribute {key!r}")
        return default
    value = step.attrs[key]
    if kind is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
            raise _fail(step, f"attribute {key!r} must be a list of ints, got {value!r}")
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(step, f"attribute {key!r} must be {kind}, got {value!r}")
    return value


def _pair(step: Step, key: str, minimum: int, default: Any = ...) -> tuple[int, int]:
    value = _attr(step, key, tuple, default)
    if len(value) != 2 or min(value) < minimum:
        raise _fail(step, f"attribute {key!r} must be two ints >= {minimum}, got {value!r}")
    return value


def _expect(step: Step, x: np.ndarray, dtype: np.dtype, ndim: int | None = None) -> None:
    """Bind-time check of an input buffer (shape errors surface before any kernel runs)."""
    if x.dtype != dtype or (ndim is not None and x.ndim != ndim):
        dims = f"{ndim}-D " if ndim is not None else ""
        raise ValueError(f"step {step.op!r} ({step.name or 'unnamed'}) expects a {dims}{dtype} input, got shape "
                         f"{x.shape} {x.dtype}")


class Op:
    """Base of the operations: ``Op(step)`` validates once; :meth:`bind` returns ``(output, calls)``."""

    arity = 1

    def __init__(self, step: Step) -> None:
        self.step = step
        if len(step.inputs) != self.arity:
            raise _fail(step, f"takes {self.arity} input(s), got {len(step.inputs)}")

    def bind(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[Call]]:
        raise NotImplementedError

    def know_input_codes(self, ranges: list[tuple[int, int] | None]) -> None:
        """Told by the plan, before any :meth:`bind`, the ``[low, high]`` of the integer codes each input can hold
        (from the grids of the plan input and of the steps that write them; ``None``: not known). Operations whose
        kernel depends on it (the 7-bit AVX2 tile) keep it; the others ignore it."""

    def input_view(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A float32 view of ``shape`` into a buffer of this operation that the plan may use as the plan's input
        buffer when this is the only step reading the input, so that the input is written where the kernel reads
        it (the interior of a convolution's zero-padded input); ``None``: no such buffer."""
        return None


def chain_calls(calls: list[Call], chains: dict[Callable, Callable]) -> list[Call]:
    """``calls`` with every run of two or more consecutive calls of one kernel that has a chain in ``chains``, with
    arguments of the same Numba types, made one call of that chain: ``chain(arguments)`` runs ``kernel(
    *arguments[i])`` for each call of the run in turn -- the same kernels in the same order, so the same results,
    with one return to Python per run instead of one per call (each return costs a Numba dispatch and, after
    milliseconds of kernels, the interpreter's cold caches: 0.5-1 us of a plan's overhead per return at batch 256,
    docs/runtime.md).

    >>> @numba.njit
    ... def add_one(x):
    ...     x += 1
    >>> @numba.njit
    ... def add_ones(arguments):
    ...     for i in range(len(arguments)):
    ...         add_one(*arguments[i])
    >>> x = np.zeros(2)
    >>> calls = chain_calls([(add_one, (x,)), (add_one, (x,))], {add_one: add_ones})
    >>> [function.__name__ for function, _ in calls], [len(arguments[0]) for _, arguments in calls]
    (['add_ones'], [2])
    >>> for function, arguments in calls: function(*arguments)
    >>> x
    array([2., 2.])
    """
    merged: list[Call] = []
    run: list[Call] = []

    def close() -> None:
        if len(run) > 1:
            merged.append((chains[run[0][0]], (tuple(arguments for _, arguments in run),)))
        else:
            merged.extend(run)
        run.clear()

    for function, arguments in calls:
        if run and (function is not run[0][0] or _types(arguments) != _types(run[0][1])):
            close()
        if function in chains:
            run.append((function, arguments))
        else:
            merged.append((function, arguments))
    close()
    return merged


def _types(arguments: tuple) -> list:
    return [numba.typeof(argument) for argument in arguments]


def _copy_result(out: np.ndarray, compute: Callable[[], np.ndarray]) -> Call:
    """A call that writes ``compute()`` into ``out`` (for the rarer paths that allocate their result)."""

    def run() -> None:
        np.copyto(out, compute(), casting="unsafe")

    return run, ()


def _maximum(x: np.ndarray, floor: Any, out: np.ndarray) -> Call:
    """A call writing ``max(x, floor)`` into ``out`` (one NumPy pass)."""

    def run() -> None:
        np.maximum(x, floor, out=out)

    return run, ()


# ================================================================================ codes and floats alike
def _pool_geometry(step: Step, x: np.ndarray, kernel, stride, padding) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"pool step {step.name!r}: expected an NCHW input, got shape {x.shape}")
    try:
        out_h = ref.conv_output_size(x.shape[2], kernel[0], stride[0], padding[0], 1, "height")
        out_w = ref.conv_output_size(x.shape[3], kernel[1], stride[1], padding[1], 1, "width")
    except ValueError as error:
        raise ValueError(f"pool step {step.name!r}: {error}") from error
    return out_h, out_w


class _Pool(Op):
    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.output_size = _pair(step, "output_size", 1, None) if "output_size" in step.attrs else None
        if self.output_size is None:
            self.kernel = _pair(step, "kernel", 1)
            self.stride = _pair(step, "stride", 1)
            self.padding = _pair(step, "padding", 0, (0, 0))
            if self.padding[0] > self.kernel[0] // 2 or self.padding[1] > self.kernel[1] // 2:
                raise _fail(step, f"padding must be at most half the kernel, got {self.padding}, kernel {self.kernel}")


class MaxPool(_Pool):
    """Max pooling (codes or float32; padded cells never win)."""

    def bind(self, inputs):
        x = inputs[0]
        out_h, out_w = _pool_geometry(self.step, x, self.kernel, self.stride, self.padding)
        out = np.empty(x.shape[:2] + (out_h, out_w), x.dtype)
        return out, [(fk.max_pool, (x, *self.kernel, *self.stride, *self.padding, out))]


class Flatten(Op):
    """Merge the axes from ``start_dim`` on: a view of the input buffer, no call."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.start_dim = _attr(step, "start_dim", int)
        if self.start_dim < 1:
            raise _fail(step, f"start_dim must be >= 1 (the batch axis stays), got {self.start_dim}")

    def bind(self, inputs):
        x = inputs[0]
        if x.ndim <= self.start_dim:
            raise ValueError(f"flatten step {self.step.name!r}: expected at least {self.start_dim + 1} dimensions, "
                             f"got shape {x.shape}")
        return x.reshape(x.shape[:self.start_dim] + (-1,)), []


class Identity(Op):
    """The input itself (Dropout and Identity in eval mode)."""

    def bind(self, inputs):
        return inputs[0], []
