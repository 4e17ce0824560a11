"""Small modules for ONNX operators that have no nanoopt layer of their own, and the graph container.

Each is a leaf module computing one ONNX operator with nanoopt primitives (so gradients flow and quantization's
tracer sees it as one step); their semantics follow the ONNX operator specification (onnx.ai/onnx/operators):

* :class:`Clip` ``min(max(x, low), high)``; :class:`Softmax` (opset >= 13: along ``axis``; before 13: over the
  input coerced to 2-D at ``axis``); :class:`Reshape` (``0`` copies the input dimension, ``-1`` is inferred);
  :class:`OnnxFlatten` (to 2-D: ``(prod(d[:axis]), prod(d[axis:]))``); :class:`Transpose`; :class:`Pad2d`;
* :class:`Concat` of runtime inputs and stored constants; :class:`Binary` (Add/Sub/Mul/Div of two runtime
  tensors, NumPy broadcasting); :class:`ConstantBinary` (the same with one operand a stored buffer);
  :class:`MatMul` of two runtime tensors;
* :class:`GraphModule`: runs named child modules in a fixed order over a table of named values, for graphs that
  are not a chain (a chain becomes a plain :class:`~nanoopt.nn.Sequential`).

>>> import numpy as np, nanoopt as no
>>> Reshape((0, -1))(no.Tensor(np.zeros((2, 3, 4)))).shape
(2, 12)
>>> ConstantBinary("mul", np.float32(2.0))(no.Tensor([1.0, 3.0])).data.tolist()
[2.0, 6.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import ops
from nanoopt.nn import Module
from nanoopt.tensor import Tensor

__all__ = ["Binary", "Clip", "Concat", "ConstantBinary", "GraphModule", "MatMul", "OnnxFlatten", "Pad2d", "Reshape",
           "Softmax", "Transpose"]

_BINARY = {"add": ops.add, "sub": ops.sub, "mul": ops.mul, "div": ops.div}


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


class Clip(Module):
    """``clip(x, low, high)`` (either bound may be None)."""

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: Any) -> Tensor:
        return ops.clip(_tensor(x), self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class Softmax(Module):
    """Softmax along ``axis``; ``coerce_2d=True`` gives the opset < 13 semantics (over all axes from ``axis`` on)."""

    def __init__(self, axis: int = -1, coerce_2d: bool = False) -> None:
        super().__init__()
        self.axis, self.coerce_2d = axis, coerce_2d

    def forward(self, x: Any) -> Tensor:
        x = _tensor(x)
        if not self.coerce_2d:
            return ops.softmax(x, self.axis)
        axis = self.axis % x.ndim
        rows = int(np.prod(x.shape[:axis], dtype=np.int64))
        return ops.softmax(x.reshape(rows, -1), -1).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"axis={self.axis}" + (", coerce_2d=True" if self.coerce_2d else "")


def onnx_reshape_target(in_shape: Sequence[int], shape: Sequence[int], allowzero: bool = False) -> tuple[int, ...]:
    """ONNX Reshape's output shape: ``0`` copies the input dimension (unless ``allowzero``), one ``-1`` is inferred.

    >>> onnx_reshape_target((2, 3, 4), (0, -1))
    (2, 12)
    """
    out = [in_shape[i] if (d == 0 and not allowzero) else int(d) for i, d in enumerate(shape)]
    if out.count(-1) > 1:
        raise ValueError(f"Reshape: at most one -1 in the target shape, got {tuple(shape)}")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known == 0 or total % known:
            raise ValueError(f"Reshape: cannot reshape {tuple(in_shape)} to {tuple(shape)}")
        out[out.index(-1)] = total // known
    return tuple(out)


class Reshape(Module):
    """ONNX Reshape with a fixed target: ``0`` copies the input's dimension, ``-1`` takes what is left."""

    def __init__(self, shape: Sequence[int], allowzero: bool = False) -> None:
        super().__init__()
        self.shape, self.allowzero = tuple(int(d) for d in shape), bool(allowzero)

    def forward(self, x: Any) -> Tensor:
        x = _tensor(x)
        return x.reshape(onnx_reshape_target(x.shape, self.shape, self.allowzero))

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class OnnxFlatten(Module):
    """ONNX Flatten: ``(prod(d[:axis]), prod(d[axis:]))`` (``nn.Flatten()`` is the case ``axis = 1``)."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: Any) -> Tensor:
        x = _tensor(x)
        axis = self.axis % x.ndim if self.axis < 0 else self.axis
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class Transpose(Module):
    """Permute the axes (``perm``; reversed when None, as ONNX)."""

    def __init__(self, perm: Sequence[int] | None = None) -> None:
        super().__init__()
        self.perm = None if perm is None else tuple(int(p) for p in perm)

    def forward(self, x: Any) -> Tensor:
        x = _tensor(x)
        return ops.transpose(x, self.perm if self.perm is not None else tuple(reversed(range(x.ndim))))


class Pad2d(Module):
    """Constant padding of the last two axes by (top, bottom, left, right)."""

    def __init__(self, padding: Sequence[int], value: float = 0.0) -> None:
        super().__init__()
        self.padding, self.value = tuple(int(p) for p in padding), float(value)

    def forward(self, x: Any) -> Tensor:
        return ops.pad2d(_tensor(x), self.padding, self.value)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


class Binary(Module):
    """``a op b`` for two runtime tensors (op: add, sub, mul, div), NumPy broadcasting."""

    def __init__(self, op: str) -> None:
        super().__init__()
        if op not in _BINARY:
            raise ValueError(f"Binary: op must be one of {sorted(_BINARY)}, got {op!r}")
        self.op = op

    def forward(self, a: Any, b: Any) -> Tensor:
        return _BINARY[self.op](_tensor(a), _tensor(b))

    def extra_repr(self) -> str:
        return self.op


class ConstantBinary(Module):
    """``x op c`` (or ``c op x`` with ``constant_first``) with ``c`` a stored buffer named ``constant``."""

    def __init__(self, op: str, constant: Any, constant_first: bool = False) -> None:
        super().__init__()
        if op not in _BINARY:
            raise ValueError(f"ConstantBinary: op must be one of {sorted(_BINARY)}, got {op!r}")
        self.op, self.constant_first = op, constant_first
        self.register_buffer("constant", np.array(constant, dtype=np.float32))

    def forward(self, x: Any) -> Tensor:
        x, c = _tensor(x), Tensor(self.constant)
        return _BINARY[self.op](c, x) if self.constant_first else _BINARY[self.op](x, c)

    def extra_repr(self) -> str:
        return f"{self.op}, constant shape {self.constant.shape}" + (", constant first" if self.constant_first else "")


class MatMul(Module):
    """``a @ b`` for two runtime tensors (NumPy matmul semantics)."""

    def forward(self, a: Any, b: Any) -> Tensor:
        return ops.matmul(_tensor(a), _tensor(b))


class Concat(Module):
    """Concatenate along ``axis``; ``constants[i]`` (a buffer ``constant_i``) fills slot ``i`` when given."""

    def __init__(self, axis: int, slots: int = 0, constants: dict[int, np.ndarray] | None = None) -> None:
        super().__init__()
        self.axis = axis
        self.slots = slots
        self.constant_slots = sorted((constants or {}).keys())
        for index, value in (constants or {}).items():
            self.register_buffer(f"constant_{index}", np.asarray(value, dtype=np.float32))

    def forward(self, *inputs: Any) -> Tensor:
        runtime = iter(inputs)
        total = max(self.slots, len(inputs) + len(self.constant_slots))
        parts = [Tensor(getattr(self, f"constant_{i}")) if i in self.constant_slots else _tensor(next(runtime))
                 for i in range(total)]
        return ops.concatenate(parts, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class GraphModule(Module):
    """Named child modules run in order over named values: ``steps`` is ``[(child, input names, output name)]``.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import nn
    >>> g = GraphModule({"relu": nn.ReLU(), "add": nn.Add()},
    ...                 [("relu", ["x"], "r"), ("add", ["x", "r"], "y")], inputs=["x"], outputs=["y"])
    >>> g(no.Tensor([-1.0, 2.0])).data.tolist()
    [-1.0, 4.0]
    """

    def __init__(self, modules: dict[str, Module], steps: Sequence[tuple[str, Sequence[str], str]],
                 inputs: Sequence[str], outputs: Sequence[str]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.steps = [(name, list(sources), output) for name, sources, output in steps]
        self.input_names, self.output_names = list(inputs), list(outputs)

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"GraphModule: expected {len(self.input_names)} inputs {self.input_names}, "
                             f"got {len(inputs)}")
        values: dict[str, Any] = dict(zip(self.input_names, inputs, strict=True))
        for name, sources, output in self.steps:
            module = self._modules[name]
            try:
                values[output] = module(*[values[s] for s in sources])
            except ValueError as error:
                raise ValueError(f"node {name!r} ({type(module).__name__}): {error}") from None
        results = tuple(values[o] for o in self.output_names)
        return results[0] if len(results) == 1 else results
