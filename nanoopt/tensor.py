"""Tensor: an ndarray that remembers how it was made, and reverse-mode differentiation over that record.

A :class:`Tensor` wraps a float NumPy array (float32 by default; float64 is kept, for gradient checks).
Every differentiable operation is a primitive in :mod:`nanoopt.ops`, whose forward and backward sit side by
side; a Tensor produced by one of them keeps a reference to the primitive's context (its inputs and whatever
the forward saved). :meth:`Tensor.backward` sorts that graph topologically and walks it in reverse, calling each
primitive's backward once (as in micrograd's ``engine.py`` and early tinygrad).

Gradient accumulation follows PyTorch: the gradient of a *leaf* tensor (one created by the user with
``requires_grad=True``) is **added** to ``.grad`` by every ``backward()``; clear it with ``zero_grad()`` (or an
optimiser's ``zero_grad()``) between steps. Intermediate tensors do not keep a ``.grad``. A graph is freed by the
backward pass that walks it; walking it again raises, unless the first call passed ``retain_graph=True``.

>>> import numpy as np, nanoopt as no
>>> x = no.Tensor([1.0, -2.0, 3.0], requires_grad=True)
>>> y = (x * x).sum()
>>> y.backward()
>>> x.grad
array([ 2., -4.,  6.], dtype=float32)
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

_grad_mode = threading.local()  # per thread, as in PyTorch: each thread starts with recording on


def is_grad_enabled() -> bool:
    """Whether operations currently record the graph for backward (in the calling thread)."""
    return getattr(_grad_mode, "enabled", True)


class _GradMode(contextlib.ContextDecorator):
    """Switches recording for the calling thread; the previous states are kept per thread, so one instance
    (e.g. a ``@no_grad()`` decorator) may be entered from several threads at once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        _grad_mode.__dict__.setdefault("previous", []).append(is_grad_enabled())
        _grad_mode.enabled = self.enabled

    def __exit__(self, *exc: object) -> None:
        _grad_mode.enabled = _grad_mode.previous.pop()


def no_grad() -> _GradMode:
    """Context manager (and decorator) under which no graph is recorded.

    >>> import nanoopt as no
    >>> w = no.Tensor([1.0], requires_grad=True)
    >>> with no.no_grad():
    ...     y = w * 2
    >>> y.requires_grad
    False
    """
    return _GradMode(False)


def enable_grad() -> _GradMode:
    """Context manager that re-enables graph recording inside a ``no_grad`` block."""
    return _GradMode(True)


def as_float_array(data: Any, dtype: Any = None) -> np.ndarray:
    """Convert ``data`` to a float ndarray: float32 unless it already is a float64 array (or ``dtype`` says so).

    Integer and boolean arrays are converted explicitly to float32; complex and object arrays are refused.
    """
    if isinstance(data, Tensor):
        data = data.data
    from_python = not isinstance(data, (np.ndarray, np.generic))
    array = np.asarray(data)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"Tensor dtype must be a float type, got {dtype}")
        return array.astype(dtype, copy=False)
    if from_python and array.dtype.kind in "biuf":  # lists and Python numbers: float32, like torch.tensor
        return array.astype(np.float32)
    if array.dtype == np.float32 or array.dtype == np.float64:
        return array
    if array.dtype.kind in "biuf":
        return array.astype(np.float32)
    raise TypeError(f"Tensor data must be numeric (bool, int or float), got dtype {array.dtype}")


def post_order(output: Tensor, parents: Callable[[Tensor], Iterable[Tensor]]) -> list[Tensor]:
    """Every tensor reachable from ``output`` through ``parents``, each after its parents (iterative depth-first
    search: no recursion limit). The backward pass walks ``grad_fn.inputs``; graph readers may stop elsewhere.

    >>> x = Tensor([1.0, 2.0], requires_grad=True)
    >>> y = (x * 2.0).sum()
    >>> order = post_order(y, lambda t: () if t.grad_fn is None else t.grad_fn.inputs)
    >>> len(order), order[-1] is y, order.index(x) < order.index(y.grad_fn.inputs[0])   # x, 2.0, x * 2.0, y
    (4, True, True)
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(output, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((parent, False) for parent in parents(node) if id(parent) not in visited)
    return order


class Tensor:
    """A float ndarray with an optional gradient and the record of the primitive that produced it.

    Parameters
    ----------
    data : array_like
        Numbers; integers and booleans become float32, float64 stays float64.
    requires_grad : bool
        Whether ``backward()`` should compute a gradient for this tensor.
    dtype : optional float dtype to force.
    """

    __array_priority__ = 1000  # so that ``ndarray * Tensor`` calls Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        self.data: np.ndarray = as_float_array(data, dtype)
        self.grad: np.ndarray | None = None
        self.requires_grad: bool = bool(requires_grad)
        self._ctx: Any = None  # the ops.Context of the primitive that produced this tensor, if recorded

    # ----------------------------------------------------------------- array facts
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def grad_fn(self) -> Any:
        """The autograd node that produced this tensor (None for a leaf), as PyTorch's ``grad_fn``: an
        :class:`~nanoopt.ops.Context` whose ``function`` is the primitive, ``inputs`` the tensors it read and
        ``attributes`` its named arguments (e.g. ``axes`` of a reduction, ``axis`` of a concatenation).

        >>> x = Tensor([[1.0, 2.0]], requires_grad=True)
        >>> node = x.sum(axis=1).grad_fn
        >>> node.function.__name__, node.inputs[0] is x, node.attributes
        ('Sum', True, {'axes': (1,)})
        """
        return self._ctx

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, precision=4, threshold=20)}{grad})"

    def numpy(self) -> np.ndarray:
        """The underlying array (shared, not copied)."""
        return self.data

    def item(self) -> float:
        """The value of a one-element tensor as a Python float."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return float(self.data.reshape(()))

    def detach(self) -> Tensor:
        """A tensor sharing this data, cut from the graph (no gradient flows through it)."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        """Forget the accumulated gradient (``.grad = None``)."""
        self.grad = None

    # ----------------------------------------------------------------- backward
    def backward(self, gradient: Any = None, retain_graph: bool = False) -> None:
        """Reverse-mode differentiation: add d(self)/d(leaf) to every leaf's ``.grad``.

        ``gradient`` is d(loss)/d(self); it may be omitted only when this tensor has one element (then it is 1).
        Leaf gradients *accumulate* across calls; the graph is freed unless ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was computed under no_grad())")
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} needs an explicit "
                                   "gradient of the same shape (e.g. y.backward(np.ones_like(y.data)))")
            gradient = np.ones_like(self.data)
        else:
            gradient = as_float_array(gradient, self.dtype)
            if gradient.shape != self.shape:
                raise ValueError(f"backward(gradient): expected shape {self.shape}, got {gradient.shape}")

        order = self._topological_order()
        grads: dict[int, np.ndarray] = {id(self): gradient}
        for node in reversed(order):
            grad = grads.pop(id(node), None)
            if grad is None:
                continue
            ctx = node._ctx
            if ctx is None:  # a leaf: accumulate
                node.grad = grad.copy() if node.grad is None else node.grad + grad
                continue
            if ctx.freed:
                raise RuntimeError("Trying to backward through the graph a second time; pass retain_graph=True "
                                   "to the first backward() if you need to")
            input_grads = ctx.function.backward(ctx, grad)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for parent, parent_grad in zip(ctx.inputs, input_grads, strict=True):
                if parent_grad is None or not parent.requires_grad:
                    continue
                if parent_grad.shape != parent.shape:
                    raise AssertionError(f"{ctx.function.__name__}.backward returned shape {parent_grad.shape} "
                                         f"for an input of shape {parent.shape}")
                key = id(parent)
                grads[key] = grads[key] + parent_grad if key in grads else parent_grad
            if not retain_graph:
                ctx.free()

    def _topological_order(self) -> list[Tensor]:
        """Tensors of the graph ending here, each after all of its inputs (those that require a gradient)."""
        return post_order(self, lambda node: () if node._ctx is None else
                          [parent for parent in node._ctx.inputs if parent.requires_grad])

    # ----------------------------------------------------------------- operator sugar (built on ops)
    def __add__(self, other: Any) -> Tensor:
        return ops.add(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return ops.add(other, self)

    def __sub__(self, other: Any) -> Tensor:
        return ops.sub(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return ops.sub(other, self)

    def __mul__(self, other: Any) -> Tensor:
        return ops.mul(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return ops.mul(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return ops.div(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return ops.div(other, self)

    def __neg__(self) -> Tensor:
        return ops.neg(self)

    def __pow__(self, exponent: Any) -> Tensor:
        return ops.pow(self, exponent)

    def __rpow__(self, base: Any) -> Tensor:
        return ops.pow(base, self)

    def __matmul__(self, other: Any) -> Tensor:
        return ops.matmul(self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return ops.matmul(other, self)

    def __getitem__(self, index: Any) -> Tensor:
        return ops.getitem(self, index)

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    __hash__ = object.__hash__  # tensors are identified by object, never compared elementwise with ==

    # ----------------------------------------------------------------- methods (built on ops)
    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return ops.max(self, axis=axis, keepdims=keepdims)

    def var(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, unbiased: bool = False) -> Tensor:
        """Variance, built from primitives (biased by default, as in normalisation layers)."""
        centred = self - self.mean(axis=axis, keepdims=True)
        count = self.data.size if axis is None else int(np.prod([self.shape[a] for a in np.atleast_1d(axis)]))
        return (centred * centred).sum(axis=axis, keepdims=keepdims) / (count - 1 if unbiased else count)

    def reshape(self, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return ops.reshape(self, shape=shape)

    def flatten(self, start_dim: int = 0) -> Tensor:
        """Merge the dimensions from ``start_dim`` on into one (their product, so that empty batches work).

        >>> Tensor(np.zeros((0, 3, 2))).flatten(1).shape
        (0, 6)
        """
        start_dim = start_dim % max(self.ndim, 1)
        return self.reshape(self.shape[:start_dim] + (math.prod(self.shape[start_dim:]),))

    def transpose(self, *axes: int) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return ops.transpose(self, axes=axes or None)

    def permute(self, *axes: int) -> Tensor:
        return self.transpose(*axes)

    @property
    def T(self) -> Tensor:
        return ops.transpose(self, axes=None)

    def exp(self) -> Tensor:
        return ops.exp(self)

    def log(self) -> Tensor:
        return ops.log(self)

    def sqrt(self) -> Tensor:
        return ops.sqrt(self)

    def abs(self) -> Tensor:
        return ops.abs(self)

    def tanh(self) -> Tensor:
        return ops.tanh(self)

    def sigmoid(self) -> Tensor:
        return ops.sigmoid(self)

    def relu(self) -> Tensor:
        return ops.relu(self)

    def clip(self, low: float | None, high: float | None) -> Tensor:
        return ops.clip(self, low=low, high=high)

    def softmax(self, axis: int = -1) -> Tensor:
        return ops.softmax(self, axis=axis)

    def log_softmax(self, axis: int = -1) -> Tensor:
        return ops.log_softmax(self, axis=axis)


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Shorthand for :class:`Tensor` (``no.tensor([1, 2])``)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


from nanoopt import ops  # noqa: E402  (ops builds on Tensor; Tensor's sugar calls ops at run time)
