"""Differentiable quantizers: fake quantization with the straight-through estimator, LSQ and PACT.

All three round with the functions of :mod:`nanoopt.quant.spec` (``quantize`` then ``dequantize``), so what they
compute in the forward pass is, bit for bit, the value an integer model represents. They differ in what they let
the gradient see.

* :func:`fake_quantize` -- fixed ``scale`` / ``zero_point`` (from an observer). Forward
  ``x_hat = dequantize(quantize(x))``; backward the straight-through estimator (Bengio et al. 2013) in the
  convention of PyTorch's ``fake_quantize_per_tensor_affine`` / ``_per_channel_affine``:

  .. math:: \\frac{\\partial \\hat x}{\\partial x} = 1 \\text{ if } q_{min} \\le \\mathrm{rint}(x / s) + z \\le q_{max}
            \\text{ else } 0

  (``x / s`` in float32, as ``quantize`` computes it). Per tensor, or per channel along ``spec.axis``.

* :func:`lsq_quantize` -- LSQ, Esser et al. 2020, "Learned Step Size Quantization" (eq. 1-3 and section 2.2):
  the step ``s`` is a parameter. With ``v = x / s``, ``-Q_N = q_{min} - z`` and ``Q_P = q_{max} - z``, the forward
  is ``x_hat = clip(rint(v), -Q_N, Q_P) * s`` (= ``dequantize(quantize(x, s, z))``) and

  .. math:: \\frac{\\partial \\hat x}{\\partial s} = \\begin{cases} -Q_N & v \\le -Q_N \\\\
            \\mathrm{rint}(v) - v & -Q_N < v < Q_P \\\\ Q_P & v \\ge Q_P \\end{cases}
            \\qquad \\frac{\\partial \\hat x}{\\partial x} = 1 \\text{ if } -Q_N \\le v \\le Q_P \\text{ else } 0

  with the step's gradient multiplied by ``g = 1 / sqrt(N Q_P)`` (section 2.2: ``N`` = number of weights per
  step for weights, number of features per example for activations). Initial step (section 2.1):
  ``s_0 = 2 mean(|x|) / sqrt(Q_P)``.

* :func:`pact_quantize` -- PACT, Choi et al. 2018, "PACT: Parameterized Clipping Activation" (eq. 1-3): a
  learned clipping level ``alpha`` replaces ReLU, ``y = clip(x, 0, alpha)`` quantized on ``[0, alpha]``. Here the
  grid is ``(scale, zero_point) = qparams(0, alpha, spec)`` of :mod:`nanoopt.quant.spec` (so ``zero_point = qmin``
  and ``x_hat = dequantize(quantize(x))`` clips at 0 and at ``alpha``), and with the straight-through estimator

  .. math:: \\frac{\\partial \\hat x}{\\partial \\alpha} = 1 \\text{ if } x \\ge \\alpha \\text{ else } 0, \\qquad
            \\frac{\\partial \\hat x}{\\partial x} = 1 \\text{ if } 0 \\le x < \\alpha \\text{ else } 0.

  The paper regularises ``alpha`` with L2 (give it weight decay in the optimiser).

This module is only the arithmetic and its gradients (autograd :class:`~nanoopt.ops.Function` subclasses); the
modules that carry these quantizers inside a prepared model (with observers, switches and learned parameters)
are in :mod:`nanoopt.quant.simulate` and :mod:`nanoopt.quant.qat`.

>>> import numpy as np
>>> from nanoopt.tensor import Tensor
>>> from nanoopt.quant.spec import QuantSpec
>>> x = Tensor(np.array([-1.3, 0.2, 0.74, 9.0], np.float32), requires_grad=True)
>>> y = fake_quantize(x, 0.5, 0, QuantSpec(bits=4))      # grid -8..7 steps of 0.5
>>> y.data
array([-1.5,  0. ,  0.5,  3.5], dtype=float32)
>>> y.sum().backward(); x.grad                           # 9.0 saturates: no gradient
array([1., 1., 1., 0.], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanoopt.ops import Function
from nanoopt.quant.spec import FLOAT32_EPS, QuantSpec, check_scale, dequantize, qparams, quantize
from nanoopt.tensor import Tensor

__all__ = [
    "FakeQuantizeFunction",
    "LSQFunction",
    "PACTFunction",
    "fake_quantize",
    "lsq_grad_scale",
    "lsq_initial_scale",
    "lsq_quantize",
    "pact_qparams",
    "pact_quantize",
    "straight_through_mask",
]


# ------------------------------------------------------------------------------------------------ helpers
def _check_spec(spec: Any) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")


def _as_tensor(x: Any, name: str = "x") -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return Tensor(x)
    raise TypeError(f"{name} must be a Tensor or an ndarray, got {type(x).__name__}")


def _along_channels(values: np.ndarray, spec: QuantSpec, ndim: int) -> np.ndarray:
    """Shape per-channel ``values (C,)`` to broadcast along ``spec.axis`` of an ``ndim`` array (scalars as they are)."""
    if not spec.per_channel:
        return values.reshape(())
    shape = [1] * ndim
    shape[spec.axis % ndim] = -1
    return values.reshape(shape)


def _other_axes(spec: QuantSpec, ndim: int) -> tuple[int, ...]:
    """The axes a gradient of a scale (per tensor: all; per channel: all but the channel axis) sums over."""
    if not spec.per_channel:
        return tuple(range(ndim))
    channel = spec.axis % ndim
    return tuple(axis for axis in range(ndim) if axis != channel)


def _steps(x: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``x / scale`` exactly as :func:`~nanoopt.quant.spec.quantize` computes it (float32 IEEE division)."""
    scale32 = _along_channels(np.asarray(scale, np.float32), spec, x.ndim)
    with np.errstate(over="ignore"):  # huge x / tiny scale -> inf: saturated, gradient 0
        return x.astype(np.float32) / scale32


def _rounded(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``dequantize(quantize(x))`` in the dtype of ``x`` (float32 input: exactly the spec's float32 values)."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec).astype(x.dtype, copy=False)


def straight_through_mask(x: np.ndarray, scale: Any, zero_point: Any, spec: QuantSpec) -> np.ndarray:
    """Where the straight-through gradient of :func:`fake_quantize` is 1: ``qmin <= rint(x / s) + z <= qmax``.

    >>> straight_through_mask(np.array([-8.4, -8.6, 7.4, 7.6]), 1.0, 0, QuantSpec(bits=4)).tolist()   # grid -8..7
    [True, False, True, False]
    """
    _check_spec(spec)
    x = np.asarray(x)
    quantize(x, scale, zero_point, spec)  # the spec's own checks of x, scale and zero_point
    zero = _along_channels(np.asarray(zero_point, np.int64), spec, x.ndim)
    codes = np.rint(_steps(x, np.asarray(scale), spec)) + zero
    return (codes >= spec.qmin) & (codes <= spec.qmax)


# ------------------------------------------------------------------------------------------- fake quantize
class FakeQuantizeFunction(Function):
    """``dequantize(quantize(x))`` forward, straight-through gradient inside the grid (see module docstring)."""

    @staticmethod
    def forward(ctx, x, scale=None, zero_point=None, spec=None):
        out = _rounded(x, scale, zero_point, spec)
        ctx.save_for_backward(straight_through_mask(x, scale, zero_point, spec))
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved
        return (grad * inside,)


def fake_quantize(x: Any, scale: Any, zero_point: Any, spec: QuantSpec) -> Tensor:
    """Quantize and dequantize ``x`` on the grid ``(scale, zero_point, spec)``, as a differentiable op.

    Forward: ``dequantize(quantize(x, scale, zero_point, spec), ...)`` -- for float32 ``x`` bit-identical to those
    two functions (float64 ``x`` is rounded to float32 first, as ``quantize`` does, and the result is returned as
    float64). Backward: gradient 1 where ``qmin <= rint(x / scale) + zero_point <= qmax``, 0 elsewhere. ``scale``
    and ``zero_point`` are constants here (scalars, or ``(C,)`` arrays when ``spec.per_channel``); to learn the
    scale use :func:`lsq_quantize`.

    >>> x = Tensor(np.array([[0.3, -2.0], [0.5, -2.0]], np.float32), requires_grad=True)
    >>> spec = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, narrow_range=True)
    >>> y = fake_quantize(x, np.array([0.25, 0.0078125], np.float32), np.zeros(2, np.int32), spec)
    >>> y.data                                           # row 1 saturates at 127 * 2^-7
    array([[ 0.25     , -2.       ],
           [ 0.5      , -0.9921875]], dtype=float32)
    >>> y.sum().backward(); x.grad
    array([[1., 1.],
           [1., 0.]], dtype=float32)
    """
    _check_spec(spec)
    return FakeQuantizeFunction.apply(_as_tensor(x), scale=scale, zero_point=zero_point, spec=spec)


# ------------------------------------------------------------------------------------------------ LSQ
def lsq_grad_scale(num_elements: int, spec: QuantSpec, zero_point: Any = 0) -> float:
    """LSQ's step-gradient scale ``g = 1 / sqrt(N * Q_P)`` with ``Q_P = qmax - zero_point`` (Esser et al. 2020, 2.2).

    ``num_elements`` is ``N``: the number of weights one step serves (per channel: the elements of a channel),
    or the number of features of one example for activations.

    >>> round(lsq_grad_scale(1000, QuantSpec(bits=4, symmetric=True)), 6)
    0.011952
    """
    _check_spec(spec)
    if isinstance(num_elements, bool) or not isinstance(num_elements, int | np.integer) or num_elements < 1:
        raise ValueError(f"num_elements must be a positive int, got {num_elements!r}")
    positive_levels = max(int(spec.qmax - np.max(np.asarray(zero_point))), 1)
    return 1.0 / math.sqrt(float(num_elements) * positive_levels)


def lsq_initial_scale(x: np.ndarray, spec: QuantSpec, zero_point: Any = 0) -> np.ndarray:
    """LSQ's initial step ``s_0 = 2 mean(|x|) / sqrt(Q_P)`` (Esser et al. 2020, section 2.1), float32.

    Per channel (``spec.per_channel``) the mean runs over each channel's slice. A zero mean gives the smallest
    scale :func:`~nanoopt.quant.spec.qparams` would give (float32 eps).

    >>> float(lsq_initial_scale(np.array([1.0, -3.0]), QuantSpec(bits=4, symmetric=True)))   # 2 * 2 / sqrt(7)
    1.5118578672409058
    """
    _check_spec(spec)
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)) or x.size == 0:
        raise ValueError(f"lsq_initial_scale needs finite, non-empty data, got shape {x.shape}")
    positive_levels = max(int(spec.qmax - np.max(np.asarray(zero_point))), 1)
    mean_abs = np.abs(x).mean(axis=_other_axes(spec, x.ndim)) if spec.per_channel else np.abs(x).mean()
    scale = (2.0 * mean_abs / math.sqrt(positive_levels)).astype(np.float32)
    return np.maximum(scale, np.float32(FLOAT32_EPS))


class LSQFunction(Function):
    """LSQ: ``dequantize(quantize(x, s, z))`` with gradients to ``x`` and to the step ``s`` (module docstring)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point=None, spec=None, grad_scale=1.0):
        check_scale(scale, "LSQ step size (scale)")
        out = _rounded(x, scale, zero_point, spec)
        steps = _steps(x, scale, spec)  # v = x / s
        zero = _along_channels(np.asarray(zero_point, np.int64), spec, x.ndim)
        low = (spec.qmin - zero).astype(np.float32)  # -Q_N
        high = (spec.qmax - zero).astype(np.float32)  # Q_P
        d_out_d_scale = np.where(steps <= low, low, np.where(steps >= high, high, np.rint(steps) - steps))
        inside = (steps >= low) & (steps <= high)
        ctx.save_for_backward(inside, d_out_d_scale, scale.shape, spec, grad_scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, d_out_d_scale, scale_shape, spec, grad_scale = ctx.saved
        grad_x = grad * inside
        grad_step = (grad * d_out_d_scale).sum(axis=_other_axes(spec, grad.ndim), dtype=np.float64)
        grad_step = np.asarray(grad_step * grad_scale, dtype=grad.dtype).reshape(scale_shape)
        return grad_x, grad_step


def lsq_quantize(x: Any, scale: Tensor, zero_point: Any, spec: QuantSpec, grad_scale: float = 1.0) -> Tensor:
    """LSQ fake quantization: the forward of :func:`fake_quantize`, with a gradient to the step ``scale``.

    ``scale`` is a Tensor (usually a Parameter) of shape ``()`` or ``(C,)`` for a per-channel spec, positive;
    ``zero_point`` stays fixed. ``grad_scale`` multiplies the step's gradient (use :func:`lsq_grad_scale`).

    >>> x = Tensor(np.array([0.2, 0.9, -5.0], np.float32), requires_grad=True)
    >>> step = Tensor(np.float32(0.5), requires_grad=True)
    >>> y = lsq_quantize(x, step, 0, QuantSpec(bits=3, symmetric=True))    # grid -4..3
    >>> y.data
    array([ 0.,  1., -2.], dtype=float32)
    >>> y.sum().backward(); x.grad, step.grad                             # d/ds: (0 - 0.4) + (2 - 1.8) - 4
    (array([1., 1., 0.], dtype=float32), array(-4.2, dtype=float32))
    """
    _check_spec(spec)
    if not isinstance(scale, Tensor):
        raise TypeError(f"lsq_quantize: scale must be a Tensor (the learned step), got {type(scale).__name__}")
    return LSQFunction.apply(_as_tensor(x), scale, zero_point=zero_point, spec=spec, grad_scale=float(grad_scale))


# ------------------------------------------------------------------------------------------------ PACT
def _check_pact_spec(spec: QuantSpec) -> None:
    _check_spec(spec)
    if spec.symmetric or spec.per_channel:
        raise ValueError("PACT quantizes [0, alpha] per tensor with an asymmetric spec (zero point = qmin), "
                         f"got {spec}")


def pact_qparams(alpha: Any, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """The grid of PACT's range ``[0, alpha]``: ``qparams(0, alpha, spec)`` (so ``zero_point = qmin``).

    >>> scale, zero_point = pact_qparams(2.55, QuantSpec(bits=8))
    >>> float(scale), int(zero_point)
    (0.009999999776482582, -128)
    """
    _check_pact_spec(spec)
    alpha_value = float(np.asarray(alpha))
    if not alpha_value > 0 or not math.isfinite(alpha_value):
        raise ValueError(f"PACT alpha must be finite and > 0, got {alpha_value}")
    return qparams(0.0, alpha_value, spec)


class PACTFunction(Function):
    """PACT: ``dequantize(quantize(x))`` on ``qparams(0, alpha)``; gradients of Choi et al. 2018, eq. 3."""

    @staticmethod
    def forward(ctx, x, alpha, spec=None):
        scale, zero_point = pact_qparams(alpha, spec)
        out = _rounded(x, scale, zero_point, spec)
        ctx.save_for_backward(x >= alpha, (x >= 0) & (x < alpha), alpha.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        clipped, inside, alpha_shape = ctx.saved
        grad_alpha = np.asarray((grad * clipped).sum(dtype=np.float64), dtype=grad.dtype).reshape(alpha_shape)
        return grad * inside, grad_alpha


def pact_quantize(x: Any, alpha: Tensor, spec: QuantSpec) -> Tensor:
    """PACT activation: clip ``x`` to ``[0, alpha]`` and quantize it there, learning ``alpha`` (a scalar Tensor).

    >>> x = Tensor(np.array([-1.0, 0.5, 3.0], np.float32), requires_grad=True)
    >>> alpha = Tensor(np.float32(2.0), requires_grad=True)
    >>> y = pact_quantize(x, alpha, QuantSpec(bits=2))     # 4 levels on [0, 2]
    >>> y.data
    array([0.       , 0.6666667, 2.       ], dtype=float32)
    >>> y.sum().backward(); x.grad, alpha.grad
    (array([0., 1., 0.], dtype=float32), array(1., dtype=float32))
    """
    _check_pact_spec(spec)
    if not isinstance(alpha, Tensor) or alpha.size != 1:
        raise TypeError(f"pact_quantize: alpha must be a one-element Tensor, got {alpha!r}")
    return PACTFunction.apply(_as_tensor(x), alpha, spec=spec)
