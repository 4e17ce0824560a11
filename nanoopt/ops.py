"""Every differentiable primitive of nanoopt, each with its forward and its backward side by side.

A primitive is a :class:`Function` subclass with two static methods:

* ``forward(ctx, *arrays, **options) -> ndarray`` computes the output from plain ndarrays and saves on ``ctx``
  whatever the backward needs;
* ``backward(ctx, grad) -> tuple`` receives d(loss)/d(output) and returns d(loss)/d(input) for every tensor
  input (``None`` where no gradient is needed), i.e. the vector-Jacobian product.

A unary elementwise primitive (``Exp``, ``Log``, ...) gives only ``f`` and its ``vjp`` in one line each; the
forward and backward above are written once, in ``_Elementwise``.

Everything else (variance, MSE, KL divergence, dropout, ...) is composed from these, and gets its gradient for
free. Broadcasting is undone in exactly one place, :func:`unbroadcast`. The design follows early tinygrad's
``Function`` / ``ctx.save_for_backward`` and HIPS/autograd's one-VJP-per-primitive layout.

Convolution uses im2col (:mod:`nanoopt.float_kernels.im2col`): columns ``(N, G, Cg*KH*KW, OH*OW)``, one BLAS
product per image and group (already NCHW), and col2im scatters the column gradient back; max pooling runs the
kernels of :mod:`nanoopt.float_kernels.pooling`. Average pooling uses :func:`_windows`, a strided view ``(N, C, OH,
OW, KH, KW)`` of the (padded) input, and its adjoint :func:`_col2im` (``KH * KW`` strided additions).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import special

from nanoopt.float_kernels import gelu as gelu_kernels
from nanoopt.float_kernels import im2col, pooling
from nanoopt.random import get_rng
from nanoopt.tensor import Tensor, is_grad_enabled


# ===================================================================== machinery
class Context:
    """What one application of a primitive remembers for its backward pass."""

    __slots__ = ("function", "inputs", "saved", "needs_input_grad", "options", "attributes", "freed")

    def __init__(self, function: type[Function]) -> None:
        self.function = function
        self.inputs: tuple[Tensor, ...] = ()
        self.saved: tuple[Any, ...] = ()
        self.needs_input_grad: tuple[bool, ...] = ()
        self.options: dict[str, Any] = {}
        self.attributes: dict[str, Any] = {}  # named arguments of the call, for readers of the graph (grad_fn)
        self.freed = False

    def save_for_backward(self, *values: Any) -> None:
        self.saved = values

    def free(self) -> None:
        self.saved = ()
        self.options = {}
        self.freed = True


class Function:
    """Base class of a primitive: subclasses define ``forward`` and ``backward`` as static methods."""

    @staticmethod
    def forward(ctx: Context, *arrays: np.ndarray, **options: Any) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad: np.ndarray) -> Any:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **options: Any) -> Tensor:
        tensors = _to_tensors(inputs)
        ctx = Context(cls)
        record = is_grad_enabled() and builtins.any(t.requires_grad for t in tensors)
        if record:
            ctx.needs_input_grad = tuple(t.requires_grad for t in tensors)
        out_data = cls.forward(ctx, *(t.data for t in tensors), **options)
        out = Tensor.__new__(Tensor)
        out.data = out_data
        out.grad = None
        out.requires_grad = record
        out._ctx = None
        if record:
            ctx.inputs = tensors
            out._ctx = ctx
        return out


def _to_tensors(inputs: Sequence[Any]) -> tuple[Tensor, ...]:
    """Wrap constants as tensors; Python scalars take the dtype of the first Tensor input (float32 stays float32)."""
    reference = next((x for x in inputs if isinstance(x, Tensor)), None)
    dtype = reference.dtype if reference is not None else np.float32
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            out.append(x)
        elif isinstance(x, (int, float, np.number)) and not isinstance(x, bool):
            out.append(Tensor(np.asarray(x, dtype=dtype)))
        else:
            out.append(Tensor(x))
    return tuple(out)


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched, so that it has ``shape`` again.

    The one place where broadcasting is undone: every binary primitive calls it.

    >>> unbroadcast(np.ones((4, 2, 3)), (2, 1)).tolist()
    [[12.0], [12.0]]
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _normalise_axis(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    result = []
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        result.append(int(a) % builtins.max(ndim, 1))
    return tuple(sorted(set(result)))


def _expand_reduced(grad: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """Give a reduced gradient back its reduced axes (size 1) so that it broadcasts against the input."""
    if keepdims:
        return grad
    return np.expand_dims(grad, axes) if axes else grad


# ===================================================================== elementwise arithmetic
class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.saved
        return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.saved
        return unbroadcast(grad, a_shape), unbroadcast(-grad, b_shape)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        grad_a = unbroadcast(grad * b, a.shape) if ctx.needs_input_grad[0] else None
        grad_b = unbroadcast(grad * a, b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        grad_a = unbroadcast(grad / b, a.shape) if ctx.needs_input_grad[0] else None
        grad_b = unbroadcast(-grad * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return (-grad,)


class Pow(Function):
    """a ** b; d/da = b a^(b-1), d/db = a^b ln a (defined where a > 0)."""

    @staticmethod
    def forward(ctx, a, b):
        out = np.power(a, b)
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, out = ctx.saved
        grad_a = unbroadcast(grad * b * np.power(a, b - 1), a.shape) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                log_a = np.where(a > 0, np.log(np.where(a > 0, a, 1)), 0)
            grad_b = unbroadcast(grad * out * log_a, b.shape)
        return grad_a, grad_b


class Maximum(Function):
    """Elementwise max; on ties the gradient is split equally between both inputs (as PyTorch does)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return np.maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        share_a = (a > b) + 0.5 * (a == b)
        grad_a = unbroadcast(grad * share_a, a.shape) if ctx.needs_input_grad[0] else None
        grad_b = unbroadcast(grad * (1 - share_a), b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class Where(Function):
    """``where(condition, a, b)``; the condition is a constant boolean array."""

    @staticmethod
    def forward(ctx, a, b, condition):
        ctx.save_for_backward(a.shape, b.shape, condition)
        return np.where(condition, a, b)

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape, condition = ctx.saved
        zero = np.zeros((), dtype=grad.dtype)
        return (unbroadcast(np.where(condition, grad, zero), a_shape),
                unbroadcast(np.where(condition, zero, grad), b_shape))


# ===================================================================== elementwise functions
class _Elementwise(Function):
    """A unary elementwise primitive ``y = f(a)``. Its backward is ``vjp(grad, saved)``, the incoming gradient
    times f'(a), where ``saved`` is the output ``y`` or the input ``a`` (``saves``), whichever f' is written in."""

    saves = "output"

    @staticmethod
    def f(a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def vjp(grad: np.ndarray, saved: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, a):
        out = cls.f(a)
        ctx.save_for_backward(out if cls.saves == "output" else a)
        return out

    @classmethod
    def backward(cls, ctx, grad):
        (saved,) = ctx.saved
        return (cls.vjp(grad, saved),)


class Exp(_Elementwise):
    """exp(a); d/da = exp(a), the output."""

    f = staticmethod(np.exp)
    vjp = staticmethod(lambda grad, out: grad * out)


class Log(_Elementwise):
    """log(a); d/da = 1 / a."""

    saves = "input"
    f = staticmethod(np.log)
    vjp = staticmethod(lambda grad, a: grad / a)


class Sqrt(_Elementwise):
    """sqrt(a); d/da = 1 / (2 sqrt(a))."""

    f = staticmethod(np.sqrt)
    vjp = staticmethod(lambda grad, out: grad / (2 * out))


class Abs(_Elementwise):
    """|a|; the subgradient at 0 is 0 (as PyTorch)."""

    saves = "input"
    f = staticmethod(np.abs)
    vjp = staticmethod(lambda grad, a: grad * np.sign(a))


class Tanh(_Elementwise):
    """tanh(a); d/da = 1 - tanh(a)^2."""

    f = staticmethod(np.tanh)
    vjp = staticmethod(lambda grad, out: grad * (1 - out * out))


class Sigmoid(_Elementwise):
    """sigma(a) = 1 / (1 + exp(-a)); d/da = sigma(a) (1 - sigma(a))."""

    f = staticmethod(special.expit)
    vjp = staticmethod(lambda grad, out: grad * out * (1 - out))


class ReLU(Function):
    @staticmethod
    def forward(ctx, a):
        mask = a > 0
        ctx.save_for_backward(mask)
        return a * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved
        return (grad * mask,)


class Clip(Function):
    """Clamp to [low, high]; gradient 1 strictly inside and at the bounds, 0 where the input was clipped."""

    @staticmethod
    def forward(ctx, a, low=None, high=None):
        inside = np.ones(a.shape, dtype=bool)
        if low is not None:
            inside &= a >= low
        if high is not None:
            inside &= a <= high
        ctx.save_for_backward(inside)
        return np.clip(a, low, high).astype(a.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved
        return (grad * inside,)


class GELU(Function):
    """GELU(x) = x * Phi(x) with Phi the standard normal CDF (Hendrycks & Gimpel 2016), exact (erf) form;
    ``approximate="tanh"`` uses 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as PyTorch."""

    @staticmethod
    def forward(ctx, a, approximate="none"):
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)
            t = np.tanh(inner)
            ctx.save_for_backward(a, t)
            ctx.options["approximate"] = approximate
            return (0.5 * a * (1 + t)).astype(a.dtype, copy=False)
        ctx.options["approximate"] = approximate
        if a.dtype == np.float32:  # SciPy's erf is slow on float32: a fused kernel (error < 5e-7, see its doc)
            out, cdf = gelu_kernels.gelu_forward(a)
            ctx.save_for_backward(a, cdf)
            return out
        cdf = 0.5 * (1 + special.erf(a / np.sqrt(2)))
        ctx.save_for_backward(a, cdf)
        return (a * cdf).astype(a.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        a, saved = ctx.saved
        if ctx.options["approximate"] == "tanh":
            t = saved
            d_inner = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * a * a)
            return ((grad * (0.5 * (1 + t) + 0.5 * a * (1 - t * t) * d_inner)).astype(a.dtype, copy=False),)
        out = np.asarray(a * a)  # d/da = Phi(a) + a phi(a), phi(a) = exp(-a^2 / 2) / sqrt(2 pi); in place: one buffer
        out *= np.asarray(-0.5, dtype=out.dtype)
        np.exp(out, out=out)
        out *= a
        out *= np.asarray(1 / np.sqrt(2 * np.pi), dtype=out.dtype)
        out += saved
        out *= grad
        return (out.astype(a.dtype, copy=False),)


# ===================================================================== reductions
def _save_reduction(ctx: Context, a: np.ndarray, axis: int | Sequence[int] | None, keepdims: bool
                    ) -> tuple[int, ...]:
    """The normalised ``axes`` of a sum or mean of ``a``, recorded as the node's attribute and saved, with the
    input shape and ``keepdims``, for the backward (which broadcasts the gradient back over them)."""
    axes = _normalise_axis(axis, a.ndim)
    ctx.attributes["axes"] = axes
    ctx.save_for_backward(a.shape, axes, keepdims)
    return axes


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = _save_reduction(ctx, a, axis, keepdims)
        return np.asarray(a.sum(axis=axes, keepdims=keepdims))

    @staticmethod
    def backward(ctx, grad):
        shape, axes, keepdims = ctx.saved
        return (np.broadcast_to(_expand_reduced(grad, axes, keepdims), shape).copy(),)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = _save_reduction(ctx, a, axis, keepdims)
        return np.asarray(a.mean(axis=axes, keepdims=keepdims), dtype=a.dtype)

    @staticmethod
    def backward(ctx, grad):
        shape, axes, keepdims = ctx.saved
        count = int(np.prod([shape[a] for a in axes])) if axes else 1
        return (np.broadcast_to(_expand_reduced(grad, axes, keepdims) / count, shape).astype(grad.dtype),)


class Max(Function):
    """Maximum over axes; the gradient is shared equally among tied maxima (PyTorch's ``amax`` convention)."""

    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = _normalise_axis(axis, a.ndim)
        out = np.max(a, axis=axes, keepdims=True)
        ctx.attributes["axes"] = axes
        ctx.save_for_backward(a, out, axes, keepdims)
        return out if keepdims else np.squeeze(out, axis=axes)

    @staticmethod
    def backward(ctx, grad):
        a, out, axes, keepdims = ctx.saved
        winners = a == out
        share = winners / winners.sum(axis=axes, keepdims=True)
        return ((_expand_reduced(grad, axes, keepdims) * share).astype(grad.dtype),)


# ===================================================================== shape and indexing
class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape=()):
        ctx.save_for_backward(a.shape)
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (shape,) = ctx.saved
        return (grad.reshape(shape),)


class Transpose(Function):
    @staticmethod
    def forward(ctx, a, axes=None):
        axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(int(x) % a.ndim for x in axes)
        if sorted(axes) != list(range(a.ndim)):
            raise ValueError(f"transpose axes {axes} are not a permutation of {a.ndim} dimensions")
        ctx.save_for_backward(axes)
        return a.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        (axes,) = ctx.saved
        return (grad.transpose(np.argsort(axes)),)


def _is_basic_index(index: Any) -> bool:
    """True when an index selects each element at most once (slices, ints, None, Ellipsis): no scatter-add needed."""
    parts = index if isinstance(index, tuple) else (index,)
    return builtins.all(isinstance(p, (slice, int, np.integer, type(None), type(Ellipsis))) for p in parts)


class GetItem(Function):
    @staticmethod
    def forward(ctx, a, index=None):
        ctx.save_for_backward(a.shape, a.dtype, index)
        return np.asarray(a[index])

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, index = ctx.saved
        full = np.zeros(shape, dtype=dtype)
        if _is_basic_index(index):
            full[index] = grad
        else:
            np.add.at(full, index, grad)  # advanced indices may repeat: accumulate, don't overwrite
        return (full,)


class Concatenate(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        axis = axis % arrays[0].ndim
        ctx.attributes["axis"] = axis
        ctx.save_for_backward(axis, np.cumsum([x.shape[axis] for x in arrays])[:-1])
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        axis, splits = ctx.saved
        return tuple(np.split(grad, splits, axis=axis))


class Stack(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        out = np.stack(arrays, axis=axis)
        ctx.save_for_backward(axis % out.ndim, len(arrays))
        return out

    @staticmethod
    def backward(ctx, grad):
        axis, count = ctx.saved
        return tuple(np.take(grad, i, axis=axis) for i in range(count))


class Pad2d(Function):
    """Constant padding of the last two axes by (top, bottom, left, right)."""

    @staticmethod
    def forward(ctx, a, padding=(0, 0, 0, 0), value=0.0):
        top, bottom, left, right = padding
        ctx.save_for_backward(a.shape, padding)
        widths = [(0, 0)] * (a.ndim - 2) + [(top, bottom), (left, right)]
        return np.pad(a, widths, constant_values=value)

    @staticmethod
    def backward(ctx, grad):
        shape, (top, _, left, _) = ctx.saved
        return (grad[..., top:top + shape[-2], left:left + shape[-1]],)


# ===================================================================== linear algebra
class MatMul(Function):
    """Batched matrix product with NumPy's ``matmul`` semantics (1-D operands are promoted and squeezed)."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul needs at least 1-D operands, got shapes {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"matmul: inner dimensions differ, {a.shape} @ {b.shape}")
        ctx.save_for_backward(a, b)
        return np.matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g = grad
        if b.ndim == 1:  # first, so that vector @ vector (a 0-d grad) becomes (1, 1)
            g = np.expand_dims(g, -1)
        if a.ndim == 1:
            g = np.expand_dims(g, -2)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = unbroadcast(np.matmul(g, np.swapaxes(b2, -1, -2)), a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = unbroadcast(np.matmul(np.swapaxes(a2, -1, -2), g), b2.shape).reshape(b.shape)
        return grad_a, grad_b


class Linear(Function):
    """``y = x W^T + b`` for ``x (..., in)``, ``W (out, in)`` (PyTorch's layout) and an optional ``b (out,)``: one
    node instead of transpose, matmul and add (the same arithmetic; a third of the bookkeeping per layer).

    Backward, with ``G`` the output gradient and ``X`` the input, both flattened to 2-D over the leading axes:
    ``dx = G W``, ``dW = G^T X``, ``db = sum of G's rows``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        if x.ndim == 0 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: expected input (..., {weight.shape[-1]}), got shape {x.shape} (weight "
                             f"{weight.shape})")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: expected bias ({weight.shape[0]},), got shape {bias.shape}")
        rows = x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x  # one 2-D product, not one per leading index
        out = np.matmul(rows, weight.T)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight, bias is not None)
        return out.reshape(*x.shape[:-1], weight.shape[0]) if x.ndim > 2 else out

    @staticmethod
    def backward(ctx, grad):
        x, weight, has_bias = ctx.saved
        grad_rows = grad.reshape(-1, weight.shape[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = np.matmul(grad_rows, weight).reshape(x.shape) if x.ndim > 2 else np.matmul(grad, weight)
        grad_weight = grad_rows.T @ x.reshape(-1, weight.shape[1]) if ctx.needs_input_grad[1] else None
        if not has_bias:
            return grad_x, grad_weight
        return grad_x, grad_weight, grad_rows.sum(axis=0) if ctx.needs_input_grad[2] else None


# ===================================================================== softmax family
class Softmax(Function):
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x) (the max shift makes it overflow-free)."""

    @staticmethod
    def forward(ctx, a, axis=-1):
        shifted = np.exp(a - a.max(axis=axis, keepdims=True))
        out = shifted / shifted.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(out, axis)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, axis = ctx.saved
        return (out * (grad - (grad * out).sum(axis=axis, keepdims=True)),)


class LogSoftmax(Function):
    """log_softmax(x) = x - max x - log sum exp(x - max x)."""

    @staticmethod
    def forward(ctx, a, axis=-1):
        shifted = a - a.max(axis=axis, keepdims=True)
        out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(out, axis)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, axis = ctx.saved
        return (grad - np.exp(out) * grad.sum(axis=axis, keepdims=True),)


class CrossEntropy(Function):
    """Mean cross-entropy of logits (N, C) against class indices (N,) or class probabilities (N, C).

    With label smoothing eps the target distribution is (1 - eps) * onehot + eps / C (Szegedy et al. 2016),
    as in ``torch.nn.functional.cross_entropy(..., label_smoothing=eps)``.
    loss = -(1/N) sum_n sum_c target_nc * log_softmax(logits)_nc; d loss / d logits = (softmax - target) / N.
    """

    @staticmethod
    def forward(ctx, logits, target, label_smoothing=0.0, reduction="mean"):
        n, classes = logits.shape
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        if target.ndim == 1:
            dist = np.zeros_like(logits)
            dist[np.arange(n), target.astype(np.int64)] = 1
        else:
            dist = target.astype(logits.dtype, copy=False)
        if label_smoothing:
            dist = dist * (1 - label_smoothing) + label_smoothing / classes
        per_sample = -(dist * log_probs).sum(axis=1)
        ctx.save_for_backward(log_probs, dist, reduction, label_smoothing)
        if reduction == "none":
            return per_sample
        total = per_sample.sum()
        return np.asarray(total / n if reduction == "mean" else total, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        log_probs, dist, reduction, label_smoothing = ctx.saved
        n = log_probs.shape[0]
        diff = np.exp(log_probs) - dist
        scale = grad[:, None] if reduction == "none" else (grad / n if reduction == "mean" else grad)
        grad_logits = (diff * scale).astype(log_probs.dtype, copy=False)
        grad_target = None
        if ctx.needs_input_grad[1]:  # probability targets: d loss / d target = -(1 - eps) * log_softmax / N
            grad_target = -(1 - label_smoothing) * log_probs * scale
        return grad_logits, grad_target


# ===================================================================== normalisation
class BatchNorm(Function):
    """Batch normalisation over every axis but 1 (Ioffe & Szegedy 2015, Algorithm 1).

    training: y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta with biased batch variance; the running
    statistics are updated in place, running = (1 - momentum) * running + momentum * batch, with the *unbiased*
    batch variance (PyTorch's convention). eval: the running statistics are used instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        axes = (0,) + tuple(range(2, x.ndim))
        shape = [1] * x.ndim
        shape[1] = x.shape[1]
        if training:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            count = x.size // x.shape[1]
            if running_mean is not None:
                running_mean *= 1 - momentum
                running_mean += momentum * mean
            if running_var is not None:
                running_var *= 1 - momentum
                running_var += momentum * var * (count / builtins.max(count - 1, 1))
        else:
            mean, var = running_mean, running_var
        inv_std = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
        x_hat = (x - mean.reshape(shape).astype(x.dtype)) * inv_std.reshape(shape)
        ctx.save_for_backward(x_hat, inv_std, weight, axes, shape, training)
        return x_hat * weight.reshape(shape) + bias.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        x_hat, inv_std, weight, axes, shape, training = ctx.saved
        grad_weight = (grad * x_hat).sum(axis=axes)
        grad_bias = grad.sum(axis=axes)
        grad_x_hat = grad * weight.reshape(shape)
        if training:
            count = grad.size // grad.shape[1]
            grad_x = (inv_std.reshape(shape) / count) * (
                count * grad_x_hat
                - grad_x_hat.sum(axis=axes, keepdims=True)
                - x_hat * (grad_x_hat * x_hat).sum(axis=axes, keepdims=True)
            )
        else:
            grad_x = grad_x_hat * inv_std.reshape(shape)
        return grad_x, grad_weight, grad_bias


class LayerNorm(Function):
    """Layer normalisation over the last ``ndim_normalised`` axes (Ba et al. 2016), biased variance."""

    @staticmethod
    def forward(ctx, x, weight, bias, ndim_normalised=1, eps=1e-5):
        axes = tuple(range(x.ndim - ndim_normalised, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        inv_std = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
        x_hat = ((x - mean) * inv_std).astype(x.dtype)
        ctx.save_for_backward(x_hat, inv_std.astype(x.dtype), weight, axes)
        return x_hat * weight + bias

    @staticmethod
    def backward(ctx, grad):
        x_hat, inv_std, weight, axes = ctx.saved
        batch_axes = tuple(range(grad.ndim - len(axes)))
        grad_weight = (grad * x_hat).sum(axis=batch_axes)
        grad_bias = grad.sum(axis=batch_axes)
        grad_x_hat = grad * weight
        count = int(np.prod([grad.shape[a] for a in axes]))
        grad_x = (inv_std / count) * (
            count * grad_x_hat
            - grad_x_hat.sum(axis=axes, keepdims=True)
            - x_hat * (grad_x_hat * x_hat).sum(axis=axes, keepdims=True)
        )
        return grad_x, grad_weight, grad_bias


# ===================================================================== convolution and pooling
def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not builtins.all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1, as in PyTorch's Conv2d docs."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int]) -> np.ndarray:
    """Strided view (N, C, OH, OW, KH, KW) of the already padded input ``x`` (N, C, H, W); no copy."""
    kh, kw = kernel
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    view = sliding_window_view(x, (span_h, span_w), axis=(2, 3))  # (N, C, H', W', span_h, span_w)
    return view[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]


def _col2im(cols: np.ndarray, padded_shape: tuple[int, ...], stride: tuple[int, int],
            dilation: tuple[int, int]) -> np.ndarray:
    """Adjoint of :func:`_windows`: add every window's values back onto the padded input grid.

    ``cols`` is (N, C, OH, OW, KH, KW); one strided addition per kernel position (KH * KW of them).
    """
    _, _, oh, ow, kh, kw = cols.shape
    out = np.zeros(padded_shape, dtype=cols.dtype)
    for i in range(kh):
        top = i * dilation[0]
        for j in range(kw):
            left = j * dilation[1]
            out[:, :, top:top + stride[0] * (oh - 1) + 1:stride[0],
                left:left + stride[1] * (ow - 1) + 1:stride[1]] += cols[:, :, :, :, i, j]
    return out


def _unpad(x: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    ph, pw = padding
    return x[:, :, ph:x.shape[2] - ph, pw:x.shape[3] - pw]


class Conv2d(Function):
    """2-D cross-correlation, NCHW, weight (OC, C/groups, KH, KW), by im2col and one matrix product per image.

    out[n, o, y, x] = bias[o] + sum_{c, i, j} w[o, c, i, j] * in_pad[n, g*Cg + c, y*s + i*d, x*s + j*d]

    The column layout and its adjoint are the Numba kernels of :mod:`nanoopt.float_kernels.im2col`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
        n = x.shape[0]
        oc, cg, kh, kw = weight.shape
        ph, pw = padding
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        cols = im2col.im2col(padded, groups, kh, kw, *stride, *dilation)  # (N, G, Cg*KH*KW, OH*OW)
        oh = im2col.output_size(padded.shape[2], kh, stride[0], dilation[0])
        ow = im2col.output_size(padded.shape[3], kw, stride[1], dilation[1])
        w_mat = weight.reshape(groups, oc // groups, cg * kh * kw)  # (G, OCg, Cg*KH*KW)
        out = np.matmul(w_mat, cols).reshape(n, oc, oh, ow)  # one product per image and group, already NCHW
        if bias is not None:
            out += bias.reshape(1, oc, 1, 1)
        ctx.save_for_backward(cols, weight, padded.shape, stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        cols, weight, padded_shape, stride, padding, dilation, groups, has_bias = ctx.saved
        n, oc, oh, ow = grad.shape
        _, cg, kh, kw = weight.shape
        grad_mat = np.ascontiguousarray(grad).reshape(n, groups, oc // groups, oh * ow)  # (N, G, OCg, OH*OW)
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:  # sum over images of grad[n, g] @ cols[n, g]^T
            # which operand order is faster depends on the shape (timings: docs/measurements.md)
            if oh * ow >= 2 * cg * kh * kw:  # long products (e.g. LeNet-5's first layer)
                per_image = np.matmul(grad_mat, cols.transpose(0, 1, 3, 2))
            else:  # short ones (its second layer): C-ordered operands for BLAS
                per_image = np.matmul(cols, np.ascontiguousarray(grad_mat.transpose(0, 1, 3, 2))).transpose(0, 1, 3, 2)
            # the sum over images in float64: the per-image products are float32 sums over OH*OW terms only
            grad_weight = per_image.sum(axis=0, dtype=np.float64).astype(per_image.dtype).reshape(weight.shape)
        if ctx.needs_input_grad[0]:
            w_mat = weight.reshape(groups, oc // groups, cg * kh * kw)
            grad_cols = np.matmul(w_mat.transpose(0, 2, 1), grad_mat)  # (N, G, Cg*KH*KW, OH*OW)
            grad_x = _unpad(im2col.col2im(grad_cols, padded_shape, kh, kw, *stride, *dilation), padding)
        grads = (grad_x, grad_weight)
        if has_bias:
            grads += (grad.sum(axis=(0, 2, 3)),)
        return grads


class MaxPool2d(Function):
    """Max over each window (padding counts as -inf); the gradient goes to the first maximum of each window.

    Runs the Numba kernels of :mod:`nanoopt.float_kernels.pooling` (bit-identical to their NumPy references there).
    """

    @staticmethod
    def forward(ctx, x, kernel=(2, 2), stride=(2, 2), padding=(0, 0)):
        ph, pw = padding
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf) if ph or pw else x
        out, argmax = pooling.max_pool2d_forward(padded, *kernel, *stride)
        ctx.save_for_backward(argmax, padded.shape, kernel, stride, padding)
        return out

    @staticmethod
    def backward(ctx, grad):
        argmax, padded_shape, kernel, stride, padding = ctx.saved
        return (_unpad(pooling.max_pool2d_backward(grad, argmax, padded_shape, *kernel, *stride), padding),)


class AvgPool2d(Function):
    """Mean over each window; zero padding counts in the divisor (PyTorch's ``count_include_pad=True``)."""

    @staticmethod
    def forward(ctx, x, kernel=(2, 2), stride=(2, 2), padding=(0, 0)):
        ph, pw = padding
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        win = _windows(padded, kernel, stride, (1, 1))
        ctx.save_for_backward(padded.shape, kernel, stride, padding)
        return win.mean(axis=(4, 5), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        padded_shape, (kh, kw), stride, padding = ctx.saved
        cols = np.broadcast_to((grad / (kh * kw))[..., None, None], grad.shape + (kh, kw))
        return (_unpad(_col2im(cols, padded_shape, stride, (1, 1)), padding),)


def adaptive_pool_bins(size: int, output_size: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins: bin i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // output_size, -(-(i + 1) * size // output_size)) for i in range(output_size)]


class AdaptiveAvgPool2d(Function):
    @staticmethod
    def forward(ctx, x, output_size=(1, 1)):
        rows = adaptive_pool_bins(x.shape[2], output_size[0])
        columns = adaptive_pool_bins(x.shape[3], output_size[1])
        out = np.empty(x.shape[:2] + tuple(output_size), dtype=x.dtype)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(columns):
                out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
        ctx.save_for_backward(x.shape, rows, columns)
        return out

    @staticmethod
    def backward(ctx, grad):
        shape, rows, columns = ctx.saved
        out = np.zeros(shape, dtype=grad.dtype)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(columns):
                out[:, :, r0:r1, c0:c1] += (grad[:, :, i, j] / ((r1 - r0) * (c1 - c0)))[:, :, None, None]
        return (out,)


# ===================================================================== public functional forms
def add(a: Any, b: Any) -> Tensor:
    """a + b with broadcasting."""
    return Add.apply(a, b)


def sub(a: Any, b: Any) -> Tensor:
    """a - b with broadcasting."""
    return Sub.apply(a, b)


def mul(a: Any, b: Any) -> Tensor:
    """a * b with broadcasting."""
    return Mul.apply(a, b)


def div(a: Any, b: Any) -> Tensor:
    """a / b with broadcasting."""
    return Div.apply(a, b)


def neg(a: Any) -> Tensor:
    """-a."""
    return Neg.apply(a)


def pow(a: Any, b: Any) -> Tensor:  # noqa: A001 - mirrors the operator's name
    """a ** b with broadcasting."""
    return Pow.apply(a, b)


def maximum(a: Any, b: Any) -> Tensor:
    """Elementwise maximum (ties share the gradient)."""
    return Maximum.apply(a, b)


def where(condition: Any, a: Any, b: Any) -> Tensor:
    """Elementwise ``condition ? a : b``; ``condition`` is a constant boolean array."""
    condition = np.asarray(condition.data if isinstance(condition, Tensor) else condition).astype(bool)
    return Where.apply(a, b, condition=condition)


def exp(a: Any) -> Tensor:
    return Exp.apply(a)


def log(a: Any) -> Tensor:
    return Log.apply(a)


def sqrt(a: Any) -> Tensor:
    return Sqrt.apply(a)


def abs(a: Any) -> Tensor:  # noqa: A001
    return Abs.apply(a)


def tanh(a: Any) -> Tensor:
    return Tanh.apply(a)


def sigmoid(a: Any) -> Tensor:
    return Sigmoid.apply(a)


def relu(a: Any) -> Tensor:
    return ReLU.apply(a)


def clip(a: Any, low: float | None = None, high: float | None = None) -> Tensor:
    return Clip.apply(a, low=low, high=high)


def gelu(a: Any, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELU.apply(a, approximate=approximate)


def sum(a: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def max(a: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Max.apply(a, axis=axis, keepdims=keepdims)


def reshape(a: Any, shape: Sequence[int]) -> Tensor:
    return Reshape.apply(a, shape=tuple(shape))


def transpose(a: Any, axes: Sequence[int] | None = None) -> Tensor:
    return Transpose.apply(a, axes=axes)


def _tensor_index(index: Tensor) -> np.ndarray:
    """A Tensor used as an index must hold whole numbers (Tensors are float; a boolean mask is an ndarray)."""
    values = index.data
    if not np.array_equal(values, np.round(values)):
        raise TypeError("a Tensor index must hold whole numbers (integer positions); pass a boolean mask as a "
                        f"numpy bool array, got values such as {values.ravel()[:3].tolist()}")
    return values.astype(np.int64)


def getitem(a: Any, index: Any) -> Tensor:
    """``a[index]`` with NumPy semantics; repeated advanced indices accumulate their gradients."""
    if isinstance(index, Tensor):
        index = _tensor_index(index)
    elif isinstance(index, tuple):
        index = tuple(_tensor_index(i) if isinstance(i, Tensor) else i for i in index)
    return GetItem.apply(a, index=index)


def concatenate(tensors: Sequence[Any], axis: int = 0) -> Tensor:
    if len(tensors) == 0:
        raise ValueError("concatenate needs at least one tensor")
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors: Sequence[Any], axis: int = 0) -> Tensor:
    if len(tensors) == 0:
        raise ValueError("stack needs at least one tensor")
    return Stack.apply(*tensors, axis=axis)


def pad2d(a: Any, padding: Sequence[int], value: float = 0.0) -> Tensor:
    """Pad the last two axes by (top, bottom, left, right) with a constant."""
    return Pad2d.apply(a, padding=tuple(int(p) for p in padding), value=value)


def matmul(a: Any, b: Any) -> Tensor:
    return MatMul.apply(a, b)


def softmax(a: Any, axis: int = -1) -> Tensor:
    return Softmax.apply(a, axis=axis)


def log_softmax(a: Any, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(a, axis=axis)


def dropout(a: Any, p: float = 0.5, training: bool = True) -> Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by 1/(1-p).

    Built from :func:`mul`; the mask comes from the global generator (``nanoopt.manual_seed``).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    a = a if isinstance(a, Tensor) else Tensor(a)
    if not training or p == 0.0:
        return a
    if p == 1.0:
        return a * np.zeros(a.shape, dtype=a.dtype)
    keep = (get_rng().random(a.shape) >= p).astype(a.dtype) / np.asarray(1.0 - p, dtype=a.dtype)
    return a * keep
