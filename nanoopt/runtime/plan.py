"""The executor: a plan description turned into a flat list of prepared kernel calls over preallocated buffers.

``Plan(description)`` builds every operation once (:mod:`nanoopt.runtime.steps`: constants validated, weights
packed). The first call with a given input shape binds the operations to buffers for that shape -- one buffer per
value, allocated once -- and keeps the resulting list of ``(function, arguments)`` calls; every later call with
that shape checks the input (type, dtype, shape, and, for an integer plan, that every value is finite: NaN has no
code and the integer models refuse +-inf rather than saturate it silently), writes it
into the first buffer (quantizing it, for an integer plan), runs the calls, and returns the output (dequantized,
for an integer plan) as a new array. No autograd, no module dispatch, no validation of constants per call.

A plain float32 array of a shape seen before is checked by its type, its dtype and the lookup of its shape among
the bound ones (every bound shape passed the full check once); any other input takes the full check. The new
output arrays are allocated ahead, several at a time (:data:`FRESH_BYTES`): each is handed out once, owned by the
caller, and never touched by the plan again.

Buffers are reused across calls, so a plan is not re-entrant: use one plan per thread.

>>> import numpy as np
>>> from nanoopt.runtime.description import PlanDescription, Step
>>> weight = np.array([[1.0, -1.0]], np.float32)
>>> plan = Plan(PlanDescription("float", (2,), None, None, [Step("linear", (0,), {"relu": True},
...                                                            {"weight": weight})], output=1))
>>> plan(np.array([[3.0, 1.0], [1.0, 3.0]], np.float32))
array([[2.],
       [0.]], dtype=float32)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt.kernels import avx512
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime import float_steps as F
from nanoopt.runtime import integer_steps as Q
from nanoopt.runtime.boundary import dequantize_into, quantize_into
from nanoopt.runtime.description import PlanDescription, PlanFormatError, spec_from_json
from nanoopt.runtime.steps import Call, Flatten, Identity, MaxPool, Op, chain_calls
from nanoopt.spec import check_scale, check_zero_point

__all__ = ["CHAINS", "FLOAT_OPS", "INT_OPS", "OPS", "Plan"]

OPS: dict[str, type[Op]] = {
    "linear_q": Q.LinearQ, "conv2d_q": Q.Conv2dQ, "add_q": Q.AddQ, "avg_pool_q": Q.AvgPoolQ, "relu_q": Q.ReluQ,
    "max_pool": MaxPool, "flatten": Flatten, "identity": Identity,
    "linear": F.Linear, "conv2d": F.Conv2d, "affine": F.ChannelAffine, "relu": F.Relu, "add": F.Add,
    "avg_pool": F.AvgPool, "csr_linear": F.CsrLinear, "nm_linear": F.NmLinear,
}
SHARED_OPS = frozenset({"max_pool", "flatten", "identity"})
INT_OPS = frozenset({"linear_q", "conv2d_q", "add_q", "avg_pool_q", "relu_q"}) | SHARED_OPS
FLOAT_OPS = frozenset(OPS) - INT_OPS | SHARED_OPS
# Kernels whose consecutive calls run as one call of a chain (steps.chain_calls): the float linear layers' and the
# AVX-512 int8 ones'. Each chain compiles its kernel into itself once more on an empty Numba cache (measured in
# docs/runtime.md; nothing once `nanoopt precompile` has run); each saves a return to Python per layer, which after
# milliseconds of kernels costs 0.5-3 us (LeNet-5 at batch 256).
CHAINS = {fk.linear_bias_act: fk.linear_chain, avx512.linear_s8_into: avx512.linear_s8_chain}


def _not_finite(x: np.ndarray) -> str:
    """The error message for an input with NaN or +-inf values: how many, and the first one."""
    bad = ~np.isfinite(x)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"plan input is not finite at {int(bad.sum())} of {x.size} values, first at {first} ({x[first]}); an "
            "integer plan needs finite inputs (NaN has no code, and infinities are refused rather than saturated)")


# Operations whose output codes lie in the range of their first input's (a maximum, a reshape, a ReLU at the zero
# point, an average); the integer steps with an ``out_spec`` saturate to its [qmin, qmax].
_RANGE_KEEPING = frozenset({"max_pool", "flatten", "identity", "relu_q", "avg_pool_q"})


def _code_ranges(description: PlanDescription) -> list[tuple[int, int] | None]:
    """The ``[low, high]`` of the codes of every value of an integer plan (``None``: not known; every value of a
    float plan): the input grid's ``[qmin, qmax]`` for value 0, then along the steps. Only a choice of kernel rests
    on it (the 7-bit AVX2 tile, which also checks its operand), never a result."""
    if description.kind != "int":
        return [None] * (len(description.steps) + 1)
    spec = description.input_grid.spec
    ranges: list[tuple[int, int] | None] = [(spec.qmin, spec.qmax)]
    for step in description.steps:
        if "out_spec" in step.attrs:
            out = spec_from_json(step.attrs["out_spec"], f"step {step.name!r} attribute 'out_spec'")
            ranges.append((out.qmin, out.qmax))
        elif step.op in _RANGE_KEEPING and step.inputs:
            ranges.append(ranges[step.inputs[0]])
        else:
            ranges.append(None)
    return ranges


# Fresh output arrays are allocated ahead, several in one go, up to this many bytes (at most FRESH_MAX arrays): at
# batch 256 a call runs for milliseconds, long enough for its kernels (and, on a shared machine, other processes) to
# evict the few pages of interpreter, NumPy and allocator state that one np.empty walks; a lone allocation after the
# kernels then costs 8-20 us of cache misses (measured on LeNet-5 on a loaded machine, docs/runtime.md), a run of
# them about 0.5 us each after the first. Each array is handed out once and never touched by the plan again.
FRESH_BYTES = 256 * 1024
FRESH_MAX = 16
_FLOAT32 = np.dtype(np.float32)
_NDARRAY = np.ndarray


@dataclass
class _Bound:
    """The calls and buffers of one input shape."""

    input: np.ndarray  # value 0's buffer (codes for an integer plan, float32 otherwise)
    output: np.ndarray  # the buffer of the output value
    calls: list[Call]  # what a call runs: the steps' calls in order, runs of one chained kernel merged (CHAINS)
    per_step: list[list[Call]]  # each step's calls as it bound them (for profiling)
    fresh: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # outputs allocated ahead (and flat)

    def __post_init__(self) -> None:
        # flat views for the boundary kernels of an integer plan (whose buffers are contiguous)
        self.input_flat = self.input.reshape(-1) if self.input.flags.c_contiguous else None
        self.output_flat = self.output.reshape(-1) if self.output.flags.c_contiguous else None
        self.refill = max(1, min(FRESH_MAX, FRESH_BYTES // max(1, 4 * self.output.size)))

    def new_output(self) -> tuple[np.ndarray, np.ndarray]:
        """A new float32 array of the output's shape, owned by the caller, and a flat view of it: the next of a run
        of ``refill`` allocated together, after allocating a run if the last one is used up."""
        if not self.fresh:
            shape = self.output.shape
            arrays = [np.empty(shape, _FLOAT32) for _ in range(self.refill)]
            self.fresh.extend([(array, array.reshape(-1)) for array in arrays])
        return self.fresh.pop()


class Plan:
    """A callable ``plan(x: np.ndarray) -> np.ndarray`` made from a :class:`PlanDescription`."""

    def __init__(self, description: PlanDescription) -> None:
        if not isinstance(description, PlanDescription):
            raise TypeError(f"Plan takes a PlanDescription, got {type(description).__name__}")
        self.description = description
        allowed = INT_OPS if description.kind == "int" else FLOAT_OPS
        self.ops: list[Op] = []
        for index, step in enumerate(description.steps):
            if step.op not in OPS:
                raise PlanFormatError(f"step {index}: unknown operation {step.op!r} (known: {sorted(OPS)})")
            if step.op not in allowed:
                raise PlanFormatError(f"step {index}: operation {step.op!r} does not belong in a {description.kind} "
                                      "plan")
            self.ops.append(OPS[step.op](step))
        ranges = _code_ranges(description)
        for op, step in zip(self.ops, description.steps, strict=True):
            op.know_input_codes([ranges[i] for i in step.inputs])
        self.input_shape = description.input_shape
        self._bound: dict[tuple[int, ...], _Bound] = {}
        self._int = description.kind == "int"
        if description.kind == "int":
            self._boundary()

    def _boundary(self) -> None:
        """Validate the input and output grids once; keep the scalars the boundary kernels take."""
        grids = (self.description.input_grid, self.description.output_grid)
        for name, grid in zip(("input", "output"), grids, strict=True):
            try:
                check_scale(grid.scale, f"{name} scale")
                check_zero_point(grid.zero_point, grid.spec.qmin, grid.spec.qmax, f"{name} zero_point")
            except (TypeError, ValueError) as error:
                raise PlanFormatError(f"plan {name} grid: {error}") from error
        grid_in, grid_out = grids
        self.input_dtype, self.output_dtype = grid_in.spec.dtype, grid_out.spec.dtype
        zero = grid_in.zero_point
        self._quantize = (np.float32(grid_in.scale), np.int64(zero), np.float32(grid_in.spec.qmin - zero),
                          np.float32(grid_in.spec.qmax - zero))
        self._dequantize = (np.float32(grid_out.scale), np.int64(grid_out.zero_point))

    @property
    def kind(self) -> str:
        """``"int"`` or ``"float"``."""
        return self.description.kind

    # ---------------------------------------------------------------------------------------- binding
    def _bind(self, shape: tuple[int, ...]) -> _Bound:
        dtype = self.input_dtype if self.kind == "int" else np.dtype(np.float32)
        readers = [op for op, step in zip(self.ops, self.description.steps, strict=True) if 0 in step.inputs]
        view = readers[0].input_view(shape) if len(readers) == 1 and self.kind == "float" else None
        values = [np.empty(shape, dtype) if view is None else view]  # (a view: the input is written in place)
        calls: list[Call] = []
        per_step = []
        for op, step in zip(self.ops, self.description.steps, strict=True):
            out, step_calls = op.bind([values[i] for i in step.inputs])
            values.append(out)
            calls.extend(step_calls)
            per_step.append(step_calls)
        calls = chain_calls(calls, CHAINS)  # (per_step keeps each step's own calls)
        output = values[self.description.output]
        if self.kind == "int" and output.dtype != self.output_dtype:
            raise PlanFormatError(f"the plan's output value has dtype {output.dtype}, its output grid expects "
                                  f"{self.output_dtype}")
        return _Bound(values[0], output, calls, per_step)

    def _check(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"plan input must be a NumPy array, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise TypeError(f"plan input must be floating point (float32 preferred), got dtype {x.dtype}")
        if x.ndim < 1:
            raise ValueError("plan input must have a batch axis, got a 0-d array")
        if self.input_shape is not None and x.shape[1:] != self.input_shape:
            expected = ", ".join(map(str, self.input_shape))
            raise ValueError(f"plan input must have shape (N, {expected}), got {x.shape}")
        return x

    # ------------------------------------------------------------------------------------------- calls
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run the plan on a float batch ``x`` (N, ...) and return a new float32 array."""
        bound = self._bound.get(x.shape) if type(x) is _NDARRAY and x.dtype is _FLOAT32 else None
        if bound is None:  # not a plain float32 array of a shape bound before: the full check (and binding)
            x, bound = self._checked_bound(x)
            if bound is None:
                return self._no_rows(x)
        try:  # the output array is taken before the kernels, while the interpreter's state is still in cache
            out, out_flat = bound.fresh.pop()
        except IndexError:  # the run of new outputs is used up
            out, out_flat = bound.new_output()
        if self._int:  # the boundary kernels inline (each Python operation after the kernels costs a cache miss)
            flat = x.reshape(-1) if x.dtype is _FLOAT32 else np.ascontiguousarray(x, np.float32).reshape(-1)
            if not quantize_into(flat, *self._quantize, bound.input_flat):  # (reshape copies a strided x)
                raise ValueError(_not_finite(x))
            for function, arguments in bound.calls:
                function(*arguments)
            dequantize_into(bound.output_flat, *self._dequantize, out_flat)
            return out
        np.copyto(bound.input, x, casting="same_kind")
        for function, arguments in bound.calls:
            function(*arguments)
        np.copyto(out, bound.output)
        return out

    def _checked_bound(self, x: Any) -> tuple[np.ndarray, _Bound | None]:
        """The input checked in full, with the calls bound to its shape (binding them on first sight); ``None``
        for a batch of no samples."""
        x = self._check(x)
        if x.shape[0] == 0:
            return x, None
        bound = self._bound.get(x.shape)
        if bound is None:
            bound = self._bound[x.shape] = self._bind(x.shape)
        return x, bound

    def _no_rows(self, x: np.ndarray) -> np.ndarray:
        """No samples: no rows, with the output shape of one sample."""
        single = (1, *x.shape[1:])
        if single not in self._bound:
            self._bound[single] = self._bind(single)
        return np.empty((0, *self._bound[single].output.shape[1:]), np.float32)

    def _enter(self, x: np.ndarray, bound: _Bound) -> None:
        """The input boundary kernel: quantize ``x`` into the input codes in one pass that also checks that every
        value is finite (an integer plan), or copy it into the input buffer (a float plan)."""
        if self._int:
            flat = x.reshape(-1) if x.dtype is _FLOAT32 else np.ascontiguousarray(x, np.float32).reshape(-1)
            if not quantize_into(flat, *self._quantize, bound.input_flat):  # (reshape copies a strided x)
                raise ValueError(_not_finite(x))
        else:
            np.copyto(bound.input, x, casting="same_kind")

    def _leave(self, bound: _Bound, out: np.ndarray) -> None:
        """The output boundary kernel: dequantize the output codes into ``out`` (or copy the float output)."""
        if self._int:
            dequantize_into(bound.output_flat, *self._dequantize, out.reshape(-1))
        else:
            np.copyto(out, bound.output)

    def forward_int(self, x_q: np.ndarray) -> np.ndarray:
        """An integer plan on input codes: codes in, output codes out (a new array)."""
        if self.kind != "int":
            raise TypeError("forward_int needs an integer plan")
        if not isinstance(x_q, np.ndarray) or x_q.dtype != self.input_dtype:
            raise TypeError(f"forward_int takes {self.input_dtype} codes, got {getattr(x_q, 'dtype', type(x_q))}")
        spec = self.description.input_grid.spec
        if x_q.size and (int(x_q.min()) < spec.qmin or int(x_q.max()) > spec.qmax):
            raise ValueError(f"forward_int takes codes of the plan's input grid, in [{spec.qmin}, {spec.qmax}] "
                             f"({spec.bits}-bit), got codes in [{int(x_q.min())}, {int(x_q.max())}]")
        bound = self._bound.get(x_q.shape)
        if bound is None:
            self._check(np.empty(x_q.shape, np.float32))
            bound = self._bound[x_q.shape] = self._bind(x_q.shape)
        np.copyto(bound.input, x_q)
        for function, arguments in bound.calls:
            function(*arguments)
        return bound.output.copy()

    def profile(self, x: np.ndarray, repeats: int = 100) -> dict[str, float]:
        """Where the time of a call on ``x`` goes: median seconds over ``repeats`` calls.

        * ``whole``: a plain call, ``plan(x)``, timed from outside;
        * ``kernels``: inside one instrumented call, the sum of the times of its kernels -- the boundary kernels
          (the input quantization with its finiteness check, or the copy into the input buffer; the output
          dequantization or copy) and every layer's calls, each timed by itself;
        * ``boundary``: the part of ``kernels`` spent in the two boundary kernels;
        * ``overhead``: in the same instrumented call, its time minus its kernels' time -- what the plan adds around
          the kernels: the input checks (type, dtype, shape), the buffer lookup, the loop over the calls, taking
          a new output array (and the profiler's own clock reads, about 0.05 us per kernel when the caches are
          warm). Taken from one call at a time (the median of the per-call differences), so that it does not carry
          the noise of two separately measured totals;
        * ``overhead_mean``: the mean of the same differences, which also carries what the median passes over:
          the call in ``refill`` that allocates a run of output arrays (a few microseconds for the run) and the
          machine's interruptions (on a shared machine, a few calls in a few hundred lose tens of microseconds to
          other processes, which dominate the mean).
        """
        self(x)
        clock = time.perf_counter
        whole, kernel, boundary, overhead = [], [], [], []
        for _ in range(repeats):
            start = clock()
            self(x)
            whole.append(clock() - start)
            begin = clock()
            bound = self._bound.get(x.shape) if type(x) is _NDARRAY and x.dtype is _FLOAT32 else None
            checked = x
            if bound is None:
                checked, bound = self._checked_bound(x)
            try:
                out, _ = bound.fresh.pop()
            except IndexError:
                out, _ = bound.new_output()
            start = clock()
            self._enter(checked, bound)
            edges = clock() - start
            inside = 0.0
            for function, arguments in bound.calls:
                start = clock()
                function(*arguments)
                inside += clock() - start
            start = clock()
            self._leave(bound, out)
            end = clock()
            edges += end - start
            kernel.append(edges + inside)
            boundary.append(edges)
            overhead.append(end - begin - edges - inside)
        return {"whole": float(np.median(whole)), "kernels": float(np.median(kernel)),
                "boundary": float(np.median(boundary)), "overhead": float(np.median(overhead)),
                "overhead_mean": float(np.mean(overhead)),
                "steps": len(self.ops), "calls": len(bound.calls)}

    def __repr__(self) -> str:
        ops = ", ".join(step.op for step in self.description.steps)
        return f"Plan({self.kind}, input {self.input_shape}, [{ops}])"
