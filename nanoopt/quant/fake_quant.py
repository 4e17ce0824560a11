"""Differentiable quantizers: fake quantization with the straight-through estimator, LSQ and PACT.

All three round with the functions of :mod:`nanoopt.spec` (``quantize`` then ``dequantize``), so what they
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
  grid is ``(scale, zero_point) = qparams(0, alpha, spec)`` of :mod:`nanoopt.spec` (so ``zero_point = qmin``
  and ``x_hat = dequantize(quantize(x))`` clips at 0 and at ``alpha``), and with the straight-through estimator

  .. math:: \\frac{\\partial \\hat x}{\\partial \\alpha} = 1 \\text{ if } x \\ge \\alpha \\text{ else } 0, \\qquad
            \\frac{\\partial \\hat x}{\\partial x} = 1 \\text{ if } 0 \\le x < \\alpha \\text{ else } 0.

  The paper regularises ``alpha`` with L2 (give it weight decay in the optimiser).

Beside the arithmetic and its gradients (autograd :class:`~nanoopt.ops.Function` subclasses) live the modules
that carry these quantizers inside a prepared model: :class:`FakeQuantize` (an observer, two switches and the
``scale`` / ``zero_point`` buffers, as PyTorch's ``FakeQuantize``), :class:`WeightFakeQuantize` (re-fitted to
the current weights at every step, for QAT), and the learned quantizers :class:`LSQQuantizer` and
:class:`PACTQuantizer`. The simulated layers (:mod:`nanoopt.quant.simulate`) and ``prepare_qat``
(:mod:`nanoopt.quant.qat`) place them.

>>> import numpy as np
>>> from nanoopt.tensor import Tensor
>>> from nanoopt.spec import QuantSpec
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

from nanoopt import nn
from nanoopt.nn import Parameter
from nanoopt.ops import Function
from nanoopt.quant.lowering import QParams
from nanoopt.quant.metadata import check_codes_fit, spec_metadata
from nanoopt.quant.observers import Observer
from nanoopt.spec import FLOAT32_EPS, QuantSpec, check_scale, dequantize, qparams, quantize
from nanoopt.tensor import Tensor

__all__ = [
    "FakeQuantize",
    "FakeQuantizeFunction",
    "LSQQuantizer",
    "NotCalibratedError",
    "PACTQuantizer",
    "WeightFakeQuantize",
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
    """``x / scale`` exactly as :func:`~nanoopt.spec.quantize` computes it (float32 IEEE division)."""
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
    scale :func:`~nanoopt.spec.qparams` would give (float32 eps).

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


# ================================================================================================ modules
class NotCalibratedError(ValueError):
    """A quantizer has no scale yet: its observer saw no data."""


class FakeQuantize(nn.Module):
    """Observer + fake quantization with separate switches; ``scale``/``zero_point`` buffers are its state.

    ``channels`` sizes the buffers of a per-channel spec (one scale per output channel).
    """

    converted_by = "quant.prepare / prepare_qat"  # nanoopt.nn.converted.MARKER

    def __init__(self, observer: Observer, channels: int | None = None, owner: str = "") -> None:
        super().__init__()
        if not isinstance(observer, Observer):
            raise TypeError(f"FakeQuantize needs an Observer, got {type(observer).__name__}")
        if observer.spec.per_channel and channels is None:
            raise ValueError("a per-channel FakeQuantize needs the number of channels")
        self.observer = observer
        self.spec = observer.spec
        self.owner = owner  # e.g. "layer '3' output", for error messages
        self.observer_enabled = True
        self.fake_quant_enabled = True
        shape = (channels,) if self.spec.per_channel else ()
        self.register_buffer("scale", np.ones(shape, np.float32))
        self.register_buffer("zero_point", np.zeros(shape, np.int32))
        self.register_buffer("calibrated", np.zeros((), np.bool_))
        self._stale = False  # the observer saw data since the buffers were last updated

    # ------------------------------------------------------------------------------------------ state
    def observe(self, x: Any) -> None:
        """Feed ``x`` (ndarray or Tensor) to the observer; the buffers follow on the next :meth:`qparams`."""
        self.observer.partial_fit(x)
        self._stale = True

    def qparams(self) -> QParams:
        """The current scale and zero point (refreshed from the observer if it saw new data)."""
        if self._stale:
            self.scale[...] = self.observer.scale_
            self.zero_point[...] = self.observer.zero_point_
            self.calibrated[...] = True
            self._stale = False
        if not self.calibrated:
            raise NotCalibratedError(f"the quantizer of {self.owner or 'this tensor'} has seen no data; run "
                                     "calibration batches through the prepared model first (quant.calibrate)")
        return QParams(self.scale.copy(), self.zero_point.copy(), self.spec)

    def set_qparams(self, scale: Any, zero_point: Any) -> None:
        """Fix the scale and zero point by hand (the observer's statistics are then ignored until it observes)."""
        self.scale[...] = scale
        self.zero_point[...] = zero_point
        self.calibrated[...] = True
        self._stale = False

    @property
    def is_calibrated(self) -> bool:
        return bool(self.calibrated) or self._stale

    @property
    def frozen(self) -> bool:
        """Observer disabled: the scale and zero point no longer change."""
        return not self.observer_enabled

    def freeze(self) -> None:
        """Take the final qparams from the observer and stop observing."""
        if self._stale:
            self.qparams()
        self.observer_enabled = False

    # ------------------------------------------------------------------------------------------ checkpoints
    _FLAGS = ("observer_enabled", "fake_quant_enabled", "observer_pending")

    def get_extra_state(self) -> dict[str, np.ndarray]:
        """The switches (``observer_enabled``, ``fake_quant_enabled``, and whether the observer saw data the
        buffers do not reflect yet) and everything the observer learned (``observer.*``): a reloaded quantizer
        observes, rounds and refreshes its grid exactly as this one would."""
        state = {"observer_enabled": np.array(bool(self.observer_enabled)),
                 "fake_quant_enabled": np.array(bool(self.fake_quant_enabled)),
                 "observer_pending": np.array(bool(self._stale))}
        if self.observer is not None:
            state.update({f"observer.{name}": value for name, value in self.observer.state_arrays().items()})
        return state

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Switches are bool scalars, scales (and PACT's alpha) positive, zero points codes of the spec, and the
        observer accepts its statistics."""
        for name in ("scale", "alpha"):
            if name in state and not np.all(state[name] > 0):
                raise ValueError(f"{name!r} must be positive, got {state[name]}")
        if "zero_point" in state:
            check_codes_fit(state["zero_point"], self.spec.qmin, self.spec.qmax,
                            f"zero_point ({self.spec.bits}-bit grid)")
        for name in self._FLAGS:
            if name in state and (state[name].dtype != np.bool_ or state[name].shape != ()):
                raise ValueError(f"{name!r} must be a bool scalar, got {state[name].dtype} {state[name].shape}")
        observed = {name[len("observer."):]: value for name, value in state.items() if name.startswith("observer.")}
        if self.observer is not None and observed:
            self.observer.check_state_arrays(observed)

    def set_extra_state(self, state: dict[str, np.ndarray]) -> None:
        if "observer_enabled" in state:
            self.observer_enabled = bool(state["observer_enabled"])
        if "fake_quant_enabled" in state:
            self.fake_quant_enabled = bool(state["fake_quant_enabled"])
        if "observer_pending" in state:
            self._stale = bool(state["observer_pending"])
        observed = {name[len("observer."):]: value for name, value in state.items() if name.startswith("observer.")}
        if self.observer is not None and observed:
            self.observer.load_state_arrays(observed)

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """``scale`` and ``zero_point`` describe the grid: the spec and the observer (class, hyper-parameters)."""
        description = {**spec_metadata(self.spec), **self._quantizer_config()}
        return {"scale": description, "zero_point": dict(description)}

    def _quantizer_config(self) -> dict[str, Any]:
        return {"quantizer": type(self).__name__, **self.observer.config()}

    # ------------------------------------------------------------------------------------------ forward
    def fake_quantize(self, x: Tensor) -> Tensor:
        """``dequantize(quantize(x))`` on the current grid, straight-through gradient inside the range
        (:func:`nanoopt.quant.fake_quant.fake_quantize`, the one differentiable fake-quant op)."""
        params = self.qparams()
        return fake_quantize(x, params.scale, params.zero_point, self.spec)

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        if self.observer_enabled:
            self.observe(x.data)
        if not self.fake_quant_enabled:
            return x
        return self.fake_quantize(x)

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else "observing"
        return f"{self.spec}, {type(self.observer).__name__}, {state}, fake_quant={self.fake_quant_enabled}"


class WeightFakeQuantize(FakeQuantize):
    """A weight quantizer for QAT: while observing, its observer is *re-fitted* to the current weights at every
    call (``fit``, not ``partial_fit``), so the grid follows the weights as they train; frozen, it keeps the last.

    >>> from nanoopt.quant.observers import MinMaxObserver
    >>> quantizer = WeightFakeQuantize(MinMaxObserver(QuantSpec(bits=8, symmetric=True)))
    >>> _ = quantizer(Tensor(np.array([1.0, -2.0]))); _ = quantizer(Tensor(np.array([0.5, -1.0])))
    >>> bool(quantizer.qparams().scale == np.float32(1.0 / 127.5))     # the range of the last weights only
    True
    """

    def observe(self, x: Any) -> None:
        self.observer.fit(x)
        self._stale = True


class _LearnedQuantizer(FakeQuantize):
    """A quantizer whose grid is a trained parameter (LSQ, PACT) instead of an observer's range.

    It has the interface of :class:`FakeQuantize` (so the switches, the simulated layers
    and ``convert`` treat it like any quantizer) but no observer: the grid is initialised from the first batch
    it sees, then learned. It counts as ``frozen`` (its grid no longer follows statistics) once initialised;
    ``observer_enabled`` has no effect on it.
    """

    def __init__(self, spec: QuantSpec, owner: str = "") -> None:
        nn.Module.__init__(self)  # no observer: FakeQuantize.__init__ would require one
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__}: spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.owner = owner
        self.observer = None
        self.observer_enabled = False
        self.fake_quant_enabled = True
        self.register_buffer("calibrated", np.zeros((), np.bool_))
        self._stale = False

    # the parts of FakeQuantize that refer to an observer
    @property
    def is_calibrated(self) -> bool:
        return bool(self.calibrated)

    @property
    def frozen(self) -> bool:
        return bool(self.calibrated)

    def observe(self, x: Any) -> None:
        """Initialise the grid from ``x`` if it is not yet (later data change nothing: the grid is learned)."""
        if not self.calibrated:
            self.initialise(np.asarray(getattr(x, "data", x)))

    def freeze(self) -> None:
        self.observer_enabled = False

    def initialise(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _require_initialised(self) -> None:
        if not self.calibrated:
            raise NotCalibratedError(f"the learned quantizer of {self.owner or 'this tensor'} has seen no data yet; "
                                     "run a training batch through the model (it initialises from the first one)")

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        self.observe(x.data)
        if not self.fake_quant_enabled:
            return x
        return self.fake_quantize(x)

    def _quantizer_config(self) -> dict[str, Any]:
        return {"quantizer": type(self).__name__}

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The spec and the kind of learned quantizer, for its parameter and its zero point."""
        description = {**spec_metadata(self.spec), **self._quantizer_config()}
        return {name: dict(description) for name in ("scale", "zero_point", "alpha")}

    def extra_repr(self) -> str:
        state = "initialised" if self.calibrated else "uninitialised"
        return f"{self.spec}, {state}, fake_quant={self.fake_quant_enabled}"


class LSQQuantizer(_LearnedQuantizer):
    """Learned step size quantization (Esser et al. 2020): a ``scale`` Parameter, a fixed ``zero_point`` buffer.

    ``channels`` sizes a per-channel spec (weights: one step per output channel). ``per_example`` chooses the
    ``N`` of the gradient scale ``g = 1 / sqrt(N Q_P)``: the features of one example (activations, ``True``) or
    every element one step serves (weights, ``False``). The zero point is the spec's for a symmetric spec (0 when
    signed) and, for an asymmetric one, ``qparams`` of the first batch's range (non-negative data: ``qmin``, the
    unsigned grid LSQ uses after a ReLU); it stays fixed. The first batch also sets the step to LSQ's
    ``s_0 = 2 mean(|x|) / sqrt(Q_P)``. Forward and gradients: :func:`~nanoopt.quant.fake_quant.lsq_quantize`.

    >>> quantizer = LSQQuantizer(QuantSpec(bits=4, symmetric=True))
    >>> y = quantizer(Tensor(np.array([0.5, -1.0, 2.0], np.float32)))
    >>> float(quantizer.scale.data), y.data                 # s_0 = 2 * (3.5 / 3) / sqrt(7)
    (0.8819171190261841, array([ 0.8819171, -0.8819171,  1.7638342], dtype=float32))
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None, per_example: bool = False,
                 owner: str = "") -> None:
        super().__init__(spec, owner)
        if spec.per_channel and (channels is None or channels < 1):
            raise ValueError(f"a per-channel LSQQuantizer needs the number of channels, got {channels!r}")
        shape = (channels,) if spec.per_channel else ()
        self.per_example = bool(per_example)
        self.scale = Parameter(np.ones(shape, np.float32))
        self.register_buffer("zero_point", np.zeros(shape, np.int32))

    def initialise(self, x: np.ndarray) -> None:
        """Zero point and ``s_0`` from the batch ``x`` (see the class docstring)."""
        data = np.asarray(x, np.float64)
        if data.size == 0 or not np.all(np.isfinite(data)):
            raise ValueError(f"LSQQuantizer of {self.owner or 'this tensor'}: the first batch must be finite and "
                             f"non-empty, got shape {data.shape}")
        if self.spec.per_channel:
            axis = self.spec.axis % data.ndim
            if data.shape[axis] != self.scale.shape[0]:
                raise ValueError(f"LSQQuantizer of {self.owner or 'this tensor'}: expected {self.scale.shape[0]} "
                                 f"channels along axis {self.spec.axis}, got data of shape {data.shape}")
            rows = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
            low, high = rows.min(axis=1), rows.max(axis=1)
        else:
            low, high = data.min(), data.max()
        zero_point = qparams(np.zeros_like(low), np.zeros_like(high), self.spec)[1] if self.spec.symmetric else \
            qparams(low, high, self.spec)[1]
        self.zero_point[...] = zero_point
        self.scale.data[...] = lsq_initial_scale(data, self.spec, zero_point)
        self.calibrated[...] = True

    def grad_scale(self, shape: tuple[int, ...]) -> float:
        """``1 / sqrt(N Q_P)`` for data of ``shape``."""
        count = math.prod(shape)
        if self.spec.per_channel:
            count //= shape[self.spec.axis % len(shape)]
        if self.per_example and len(shape) > 1:
            count //= shape[0]
        return lsq_grad_scale(max(count, 1), self.spec, self.zero_point)

    def qparams(self) -> QParams:
        """The learned grid (what ``convert`` uses)."""
        self._require_initialised()
        return QParams(check_scale(self.scale.data, "LSQ step size (scale)").copy(), self.zero_point.copy(),
                       self.spec)

    def set_qparams(self, scale: Any, zero_point: Any) -> None:
        """Set the step and the zero point by hand (marks the quantizer initialised)."""
        self.scale.data[...] = check_scale(scale, "LSQ step size (scale)")
        self.zero_point[...] = zero_point
        self.calibrated[...] = True

    def fake_quantize(self, x: Tensor) -> Tensor:
        self._require_initialised()
        return lsq_quantize(x, self.scale, self.zero_point, self.spec, self.grad_scale(x.shape))

    def _quantizer_config(self) -> dict[str, Any]:
        return {"quantizer": type(self).__name__, "per_example": self.per_example}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_example={self.per_example}"


class PACTQuantizer(_LearnedQuantizer):
    """PACT (Choi et al. 2018): a learned clipping level ``alpha`` (Parameter); the grid is
    ``qparams(0, alpha)`` (:func:`~nanoopt.quant.fake_quant.pact_qparams`), so it is also a ReLU.

    ``alpha=None`` initialises ``alpha`` to the maximum of the first batch (suited to fine-tuning a trained model;
    the paper starts from 10). Give ``alpha`` weight decay in the optimiser: the paper's L2 regulariser.

    >>> quantizer = PACTQuantizer(QuantSpec(bits=8), alpha=2.55)
    >>> quantizer(Tensor(np.array([-1.0, 0.123, 7.0], np.float32))).data
    array([0.  , 0.12, 2.55], dtype=float32)
    """

    def __init__(self, spec: QuantSpec, alpha: float | None = None, owner: str = "") -> None:
        super().__init__(spec, owner)
        pact_qparams(1.0, spec)  # refuses specs PACT cannot use (symmetric, per channel)
        self.alpha = Parameter(np.float32(1.0 if alpha is None else alpha))
        if alpha is not None:
            pact_qparams(alpha, spec)  # refuses alpha <= 0
            self.calibrated[...] = True

    def initialise(self, x: np.ndarray) -> None:
        """``alpha`` = the maximum of the batch ``x``."""
        top = float(np.max(x)) if np.size(x) else float("nan")
        if not top > 0 or not math.isfinite(top):
            raise ValueError(f"PACTQuantizer of {self.owner or 'this tensor'}: cannot initialise alpha from a first "
                             f"batch whose maximum is {top} (needs a finite positive value; pass alpha=)")
        self.alpha.data[...] = np.float32(top)
        self.calibrated[...] = True

    def qparams(self) -> QParams:
        self._require_initialised()
        scale, zero_point = pact_qparams(self.alpha.data, self.spec)
        return QParams(scale, zero_point, self.spec)

    def set_qparams(self, scale: Any, zero_point: Any) -> None:
        raise TypeError("a PACTQuantizer's grid is qparams(0, alpha): set quantizer.alpha instead")

    def fake_quantize(self, x: Tensor) -> Tensor:
        self._require_initialised()
        return pact_quantize(x, self.alpha, self.spec)
