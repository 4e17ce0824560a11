"""The integer specification: what a quantized number means, and the fixed-point requantization.

Implements the affine scheme of Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference" (eq. 1: ``real = scale * (q - zero_point)``; eq. 5-6: the
real multiplier ``M = 2^-n * M0`` with ``M0`` in ``[0.5, 1)``), with the rounding primitives of gemmlowp
(``SaturatingRoundingDoublingHighMul`` and ``RoundingDivideByPOT`` in ``fixedpoint/fixedpoint.h``) as
TFLite uses them in ``MultiplyByQuantizedMultiplier``.

This module is the single home of

* :class:`QuantSpec` -- bit width, signedness, symmetry, granularity; ``qmin``/``qmax``/``dtype``;
* :func:`qparams` -- THE scale / zero-point formula (nowhere else in nanoopt);
* :func:`quantize`, :func:`dequantize` -- the float <-> integer maps (also used, unchanged, by the
  fake-quant op so that simulation and integer inference agree bit for bit);
* :func:`quantize_multiplier`, :func:`requantization_multipliers`, :func:`quantize_bias`,
  :func:`bias_fitting_weight_scale` (ONNX Runtime's weight-scale adjustment for a bias that would not fit);
* :func:`saturating_rounding_doubling_high_mul`, :func:`rounding_divide_by_pot`,
  :func:`multiply_by_quantized_multiplier`, :func:`requantize` -- integer-only rescaling.

Float arithmetic used (fixed, so that other code can reproduce it exactly)
--------------------------------------------------------------------------
* ``qparams``: ranges are taken in float64; the scale is computed in float64, rounded once to float32 and
  raised to at least ``float32 eps`` (2^-23, as PyTorch does); the zero point is computed in float64 from
  that float32 scale, rounded half to even and clamped to ``[qmin, qmax]``.
* ``quantize``: ``x`` is converted to float32, then ``q = clip(rint(x / scale), qmin - zp, qmax - zp) + zp``
  with ``x / scale`` an IEEE float32 division (not a multiplication by ``1/scale``) and ``rint`` rounding
  half to even. float64 input is therefore rounded to float32 first, deliberately.
* ``dequantize``: ``float32(q - zp) * scale`` in float32 (``q - zp`` is exact in float32 for <= 16 bits,
  so there is exactly one rounding).
* ``quantize_multiplier`` / ``requantization_multipliers`` / ``quantize_bias``: float64.
* ``bias_fitting_weight_scale``: the overflow test as ``quantize_bias`` (float64); the raised scale exactly
  (rational arithmetic), rounded up to float32.

Sign convention of ``shift``
----------------------------
``real_multiplier ~= m0 * 2^-31 * 2^-shift`` with ``m0`` in ``[2^30, 2^31)``. A positive ``shift`` is a
rounding right shift (multiplier < 0.5), a negative one a left shift (multiplier >= 1). (TFLite stores the
opposite sign; gemmlowp's older ``right_shift`` argument has ours.)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# The int64 requantization path treats accumulators as "wide registers" of 63 bits: |acc| <= 2^62.
WIDE_LIMIT = 2**62
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23, the smallest scale qparams returns
# Shifts accepted by the requantization: left shifts up to 31, right shifts up to 62.
MIN_SHIFT = -31
MAX_SHIFT = 62
# ONNX Runtime's ``multiplicative_epsilon`` (quantization/qdq_quantizer.py, _adjust_weight_scale_for_int32_bias):
# a raised weight scale leaves the largest bias code 1/10^4 inside the limit.
BIAS_SCALE_MARGIN = Fraction(10001, 10000)


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized.

    ``qmin = -2^(bits-1)`` (signed) or ``0`` (unsigned), plus one with ``narrow_range``;
    ``qmax = 2^(bits-1) - 1`` (signed) or ``2^bits - 1`` (unsigned). Values are stored in the smallest
    NumPy integer type that holds the range (``dtype``).

    >>> spec = QuantSpec(bits=8, signed=True, narrow_range=True)
    >>> spec.qmin, spec.qmax, spec.dtype
    (-127, 127, dtype('int8'))
    >>> QuantSpec(bits=4, signed=False).qmax
    15
    """

    bits: int = 8  # number of bits of the integer grid, 2..16
    signed: bool = True  # signed grid (int8 style) or unsigned (uint8 style)
    symmetric: bool = False  # symmetric: zero point fixed (0 signed, mid-grid unsigned); asymmetric: fitted
    per_channel: bool = False  # one scale/zero point per slice along `axis` instead of one per tensor
    axis: int = 0  # the channel axis for per_channel (0 = out_features / out_channels of a weight)
    narrow_range: bool = False  # drop the most negative code (int8: [-127, 127]) so that -q is representable

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer):
            raise TypeError(f"QuantSpec.bits must be an int, got {type(self.bits).__name__}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be in [2, 16], got {self.bits}")
        for name in ("signed", "symmetric", "per_channel", "narrow_range"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"QuantSpec.{name} must be a bool, got {type(value).__name__}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int | np.integer):
            raise TypeError(f"QuantSpec.axis must be an int, got {type(self.axis).__name__}")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        base = -(2 ** (self.bits - 1)) if self.signed else 0
        return base + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> np.dtype:
        """Smallest NumPy integer type holding ``[qmin, qmax]``."""
        if self.signed:
            return np.dtype(np.int8 if self.bits <= 8 else np.int16)
        return np.dtype(np.uint8 if self.bits <= 8 else np.uint16)


# --------------------------------------------------------------------------------------------- validation
def _check_spec(spec: QuantSpec, name: str = "spec") -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{name} must be a QuantSpec, got {type(spec).__name__}")


def _as_float64_finite(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return array


def check_scale(scale, name: str = "scale") -> np.ndarray:
    """Return ``scale`` as a float32 array after checking it is finite and > 0.

    >>> check_scale(0.5)
    array(0.5, dtype=float32)
    """
    array = np.asarray(scale)
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise TypeError(f"{name} must be a positive float, got dtype {array.dtype}")
    if np.any(np.isnan(array)) or np.any(array <= 0) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
    array32 = array.astype(np.float32)
    if np.any(array32 <= 0) or not np.all(np.isfinite(array32)):
        raise ValueError(f"{name} must be representable as a positive finite float32, got {scale!r}")
    return array32


def check_zero_point(zero_point, qmin: int, qmax: int, name: str = "zero_point") -> np.ndarray:
    """Return ``zero_point`` as an int64 array after checking it is an integer in ``[qmin, qmax]``.

    Python ints, NumPy integer scalars and arrays are accepted; floats are refused (no silent cast).

    >>> check_zero_point(3, -128, 127)
    array(3)
    """
    array = np.asarray(zero_point)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer (or integer array), got dtype {array.dtype}")
    if array.size and (array.min() < qmin or array.max() > qmax):
        raise ValueError(f"{name} must lie in [{qmin}, {qmax}], got {zero_point!r}")
    return array.astype(np.int64)


def _channel_shape(x_ndim: int, spec: QuantSpec) -> tuple[int, int]:
    axis = spec.axis if spec.axis >= 0 else spec.axis + x_ndim
    if not 0 <= axis < x_ndim:
        raise ValueError(f"spec.axis={spec.axis} is out of range for an array with {x_ndim} dimensions")
    return axis, x_ndim


def _broadcast_params(scale, zero_point, x_shape: tuple[int, ...], spec: QuantSpec):
    """Check scale/zero_point against the granularity of ``spec`` and shape them for broadcasting."""
    scale32 = check_scale(scale)
    zero = check_zero_point(zero_point, spec.qmin, spec.qmax)
    if spec.per_channel:
        axis, ndim = _channel_shape(len(x_shape), spec)
        channels = x_shape[axis]
        for name, value in (("scale", scale32), ("zero_point", zero)):
            if value.ndim != 1 or value.shape[0] != channels:
                raise ValueError(
                    f"per-channel {name} must have shape ({channels},) (size of axis {spec.axis}), "
                    f"got shape {value.shape}"
                )
        shape = [1] * ndim
        shape[axis] = channels
        return scale32.reshape(shape), zero.reshape(shape)
    if scale32.size != 1 or zero.size != 1:
        raise ValueError(
            f"per-tensor scale and zero_point must be scalars, got shapes {scale32.shape} and {zero.shape}"
        )
    return scale32.reshape(()), zero.reshape(())


# ------------------------------------------------------------------------------------- scale, zero point
def qparams(min_val, max_val, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for the range ``[min_val, max_val]`` -- the one place this formula lives.

    With ``lo = min(min_val, 0)`` and ``hi = max(max_val, 0)`` (the range always contains 0, so real zero
    is exactly representable):

    * asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - rint(lo / scale)``;
    * symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)``, ``zero_point = 0`` (signed) or
      ``(qmin + qmax + 1) // 2`` (unsigned, e.g. 128 for uint8);

    then ``scale = max(float32(scale), float32 eps)`` (a zero-width range gets this safe scale) and the
    zero point is clamped to ``[qmin, qmax]``. Arrays (per-channel statistics) give arrays.

    Returns ``(scale, zero_point)`` as float32 and int32 NumPy values (0-d for scalar input).

    >>> spec = QuantSpec(bits=8, signed=False)
    >>> scale, zero_point = qparams(-1.0, 3.0, spec)
    >>> float(scale), int(zero_point)
    (0.01568627543747425, 64)
    >>> bool(qparams(0.0, 0.0, QuantSpec())[0] == np.finfo(np.float32).eps)
    True
    """
    _check_spec(spec)
    lo = _as_float64_finite(min_val, "min_val")
    hi = _as_float64_finite(max_val, "max_val")
    if lo.shape != hi.shape:
        raise ValueError(f"min_val and max_val must have the same shape, got {lo.shape} and {hi.shape}")
    if np.any(lo > hi):
        raise ValueError(f"min_val must be <= max_val, got min_val={min_val!r}, max_val={max_val!r}")
    if spec.per_channel and lo.ndim != 1:
        raise ValueError(f"per-channel qparams need 1-D min_val/max_val, got shape {lo.shape}")
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    levels = float(spec.qmax - spec.qmin)
    if spec.symmetric:
        scale64 = np.maximum(-lo, hi) / (levels / 2.0)
    else:
        scale64 = (hi - lo) / levels
    with np.errstate(over="raise"):
        try:
            scale = scale64.astype(np.float32)
        except FloatingPointError:
            raise ValueError(f"range [{min_val!r}, {max_val!r}] gives a scale beyond float32") from None
    scale = np.maximum(scale, np.float32(FLOAT32_EPS))
    if spec.symmetric:
        mid = 0 if spec.signed else (spec.qmin + spec.qmax + 1) // 2
        zero_point = np.full(scale.shape, mid, dtype=np.int32)
    else:
        zero64 = spec.qmin - np.rint(lo / scale.astype(np.float64))
        zero_point = np.clip(zero64, spec.qmin, spec.qmax).astype(np.int32)
    return scale, zero_point


# -------------------------------------------------------------------------------- quantize / dequantize
def quantize(x, scale, zero_point, spec: QuantSpec) -> np.ndarray:
    """Map reals to integer codes: ``q = clip(rint(x / scale) + zero_point, qmin, qmax)``.

    Arithmetic (bit-exact contract): ``x`` and ``scale`` in float32, IEEE division, ``rint`` (round half
    to even), saturation, result in ``spec.dtype``. Per-channel parameters broadcast along ``spec.axis``.
    ``+-inf`` saturates; NaN raises ``ValueError``.

    >>> quantize(np.array([-1.0, 0.0, 0.25, 0.75, 9.0]), 0.5, 0, QuantSpec())
    array([-2,  0,  0,  2, 18], dtype=int8)
    """
    _check_spec(spec)
    x_array = np.asarray(x)
    if x_array.dtype.kind != "f":
        raise TypeError(f"x must be a floating-point array, got dtype {x_array.dtype}")
    x32 = x_array.astype(np.float32)
    if np.any(np.isnan(x32)):
        raise ValueError("x contains NaN; quantize needs numbers (clean the input first)")
    scale32, zero = _broadcast_params(scale, zero_point, x32.shape, spec)
    with np.errstate(over="ignore"):  # huge x / tiny scale -> inf, then saturated just below
        steps = np.rint(x32 / scale32)  # float32, half to even
    low = (spec.qmin - zero).astype(np.float32)  # small integers: exact in float32
    high = (spec.qmax - zero).astype(np.float32)
    steps = np.clip(steps, low, high)
    return (steps.astype(np.int64) + zero).astype(spec.dtype)


def dequantize(q, scale, zero_point, spec: QuantSpec) -> np.ndarray:
    """Map integer codes back to reals: ``x = float32(q - zero_point) * scale`` (float32 arithmetic).

    >>> dequantize(np.array([-2, 0, 18], dtype=np.int8), 0.5, 0, QuantSpec())
    array([-1.,  0.,  9.], dtype=float32)
    """
    _check_spec(spec)
    q_array = np.asarray(q)
    if q_array.dtype != spec.dtype:
        raise TypeError(f"q must have dtype {spec.dtype} (from spec), got {q_array.dtype}")
    scale32, zero = _broadcast_params(scale, zero_point, q_array.shape, spec)
    centred = (q_array.astype(np.int64) - zero).astype(np.float32)
    return centred * scale32


# --------------------------------------------------------------------------- fixed-point multipliers
def quantize_multiplier(real_multiplier) -> tuple:
    """Represent ``real_multiplier > 0`` as ``m0 * 2^-31 * 2^-shift`` with ``m0`` in ``[2^30, 2^31)``.

    ``real = f * 2^e`` with ``f`` in ``[0.5, 1)`` (``frexp``), ``m0 = round(f * 2^31)`` (half away from
    zero, float64), ``shift = -e``; if rounding gives ``m0 = 2^31`` it becomes ``2^30`` and ``shift``
    decreases by one. Supported: ``shift`` in ``[-31, 62]``, i.e. ``real`` roughly in ``[2^-63, 2^31)``.
    Scalars give ``(int, int)``; arrays (per-channel) give ``(int32 array, int32 array)``.

    >>> quantize_multiplier(0.25)
    (1073741824, 1)
    >>> quantize_multiplier(3.0)
    (1610612736, -2)
    """
    real = _as_float64_finite(real_multiplier, "real_multiplier")
    if np.any(real <= 0):
        raise ValueError(f"real_multiplier must be > 0, got {real_multiplier!r}")
    fraction, exponent = np.frexp(real)
    m0 = np.floor(fraction * 2.0**31 + 0.5).astype(np.int64)
    carry = m0 == 2**31
    m0 = np.where(carry, 2**30, m0)
    shift = -(exponent.astype(np.int64) + carry)
    if np.any(shift < MIN_SHIFT) or np.any(shift > MAX_SHIFT):
        raise ValueError(
            f"real_multiplier must lie in [2^-63, 2^31) so that shift fits [{MIN_SHIFT}, {MAX_SHIFT}], "
            f"got {real_multiplier!r}"
        )
    if real.ndim == 0:
        return int(m0), int(shift)
    return m0.astype(np.int32), shift.astype(np.int32)


def requantization_multipliers(input_scale, weight_scale, output_scale) -> tuple:
    """Fixed-point multipliers of a linear/conv layer: ``real = input_scale * weight_scale / output_scale``.

    Computed in float64 from the float32 scales (the product of two float32 is exact in float64; the
    division rounds once), then :func:`quantize_multiplier`. A per-channel ``weight_scale`` gives arrays.

    >>> requantization_multipliers(np.float32(0.5), np.float32(0.25), np.float32(0.5))
    (1073741824, 1)
    """
    real = (
        check_scale(input_scale, "input_scale").astype(np.float64)
        * check_scale(weight_scale, "weight_scale").astype(np.float64)
        / check_scale(output_scale, "output_scale").astype(np.float64)
    )
    return quantize_multiplier(real)


def quantize_bias(bias, input_scale, weight_scale, dtype=np.int32) -> np.ndarray:
    """Quantize a float bias with ``scale = input_scale * weight_scale`` and zero point 0.

    ``q = rint(float64(bias) / (float64(input_scale) * float64(weight_scale)))`` (half to even), stored as
    int32 (int8 mode) or int64 (16x8 mode). A value that does not fit raises ``ValueError``.

    >>> quantize_bias(np.array([1.0, -0.3]), np.float32(0.5), np.float32(0.1))
    array([20, -6], dtype=int32)
    """
    target = np.dtype(dtype)
    if target not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(f"dtype must be int32 or int64, got {target}")
    bias64 = _as_float64_finite(bias, "bias")
    scale = check_scale(input_scale, "input_scale").astype(np.float64) * check_scale(
        weight_scale, "weight_scale"
    ).astype(np.float64)
    steps = np.rint(bias64 / scale)
    if np.any(np.abs(steps) > bias_limit(target)):
        raise ValueError(f"bias / (input_scale * weight_scale) does not fit {target}: max |q| = {np.abs(steps).max()}")
    return steps.astype(target)


def bias_limit(dtype=np.int32) -> int:
    """The largest ``|q|`` a quantized bias may take: ``2^31 - 1`` (int32) or ``2^62`` (int64, the wide range).

    >>> bias_limit(np.int32), bias_limit(np.int64) == WIDE_LIMIT
    (2147483647, True)
    """
    target = np.dtype(dtype)
    if target not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(f"dtype must be int32 or int64, got {target}")
    return min(int(np.iinfo(target).max), WIDE_LIMIT)


def _float32_at_least(value: Fraction) -> np.float32:
    """The smallest float32 ``>= value`` (a positive rational in the float32 range)."""
    candidate = np.float32(float(value))  # within one float32 step of value (two roundings)
    up, down = np.float32(np.inf), np.float32(0)
    if Fraction(float(candidate)) < value:
        candidate = np.nextafter(candidate, up)
    elif Fraction(float(np.nextafter(candidate, down))) >= value:
        candidate = np.nextafter(candidate, down)
    if not np.isfinite(candidate):
        raise ValueError(f"the weight scale a bias needs ({float(value):.6g}) exceeds the float32 range")
    return candidate


def bias_fitting_weight_scale(bias, input_scale, weight_scale, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Raise the weight scales whose bias would not fit ``dtype`` on the grid ``input_scale * weight_scale``.

    ONNX Runtime's rule ("adjust weight scale for int32 bias": ``quantize_static``, ``qdq_quantizer.py``
    ``_adjust_weight_scale_for_int32_bias``, tests ``TestAdjustWeightScaleForInt32Bias``; after TFLite's
    ``quantization_utils.cc``), with the limit ``L`` of :func:`bias_limit` (int32, or int64 in 16x8 mode):

    * a channel is adjusted iff :func:`quantize_bias` would not fit it: ``|rint(b / (s_in s_w))| > L``;
    * its scale becomes the smallest float32 ``s_w' >= BIAS_SCALE_MARGIN |b| / (s_in L)`` (margin 1.0001,
      ONNX Runtime's ``multiplicative_epsilon``; ``|b| / (s_in s_w') <= L / 1.0001``, so the bias fits).

    Per channel for a ``(C,)`` ``weight_scale``; for a per-tensor (0-d) one, the single scale with
    ``|b| = max_c |b_c|``. Every scale that was not adjusted is returned bit for bit. Returns
    ``(scale, adjusted)``: float32 of ``weight_scale``'s shape and a bool mask of the adjusted scales.

    >>> scale, adjusted = bias_fitting_weight_scale(np.array([1.0, 50.0]), np.float32(1e-6),
    ...                                             np.array([0.01, 0.01], np.float32))
    >>> adjusted.tolist(), scale.tolist()  # 1 / (1e-6 * 0.01) = 1e8 fits; 50 / 1e-8 = 5e9 does not
    ([False, True], [0.009999999776482582, 0.02328539453446865])
    >>> quantize_bias(np.array([1.0, 50.0]), np.float32(1e-6), scale)  # the largest code: (2^31 - 1) / 1.0001
    array([ 100000002, 2147268755], dtype=int32)
    """
    target = np.dtype(dtype)
    limit = bias_limit(target)
    bias64 = _as_float64_finite(bias, "bias")
    s_in = check_scale(input_scale, "input_scale")
    s_w = check_scale(weight_scale, "weight_scale")
    if s_in.ndim != 0:
        raise ValueError(f"input_scale must be a scalar (one input grid), got shape {s_in.shape}")
    steps = np.rint(bias64 / (np.float64(s_in) * s_w.astype(np.float64)))  # as quantize_bias
    overflow = np.abs(steps) > limit
    scale, adjusted = s_w.copy(), np.zeros(s_w.shape, bool)
    if s_w.ndim == 0:
        if np.any(overflow):
            needed = Fraction(float(np.abs(bias64).max())) * BIAS_SCALE_MARGIN / (Fraction(float(s_in)) * limit)
            scale, adjusted = np.asarray(_float32_at_least(needed)), np.asarray(True)
        return scale, adjusted
    if bias64.shape != s_w.shape:
        raise ValueError(f"bias must have the shape of the per-channel weight_scale {s_w.shape}, got {bias64.shape}")
    for channel in np.flatnonzero(overflow):
        needed = Fraction(float(abs(bias64[channel]))) * BIAS_SCALE_MARGIN / (Fraction(float(s_in)) * limit)
        scale[channel], adjusted[channel] = _float32_at_least(needed), True
    return scale, adjusted


# ---------------------------------------------------------------- gemmlowp rounding primitives (int32)
def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 arrays: ``round(a * b / 2^31)``.

    ``ab = int64(a) * b``; ``nudge = 2^30`` if ``ab >= 0`` else ``1 - 2^30``;
    result = ``(ab + nudge) / 2^31`` truncated toward zero, except ``a = b = INT32_MIN`` which saturates to
    ``INT32_MAX`` (the only overflowing case).

    >>> saturating_rounding_doubling_high_mul(np.int32(2**30), np.int32(2**30))
    array(536870912, dtype=int32)
    >>> saturating_rounding_doubling_high_mul(np.int32(-2**31), np.int32(-2**31))
    array(2147483647, dtype=int32)
    """
    a_array, b_array = np.asarray(a), np.asarray(b)
    for name, value in (("a", a_array), ("b", b_array)):
        if value.dtype != np.int32:
            raise TypeError(f"{name} must be int32, got {value.dtype}")
    product = a_array.astype(np.int64) * b_array.astype(np.int64)
    nudge = np.where(product >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    total = product + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C++ '/' truncates toward zero
    overflow = (a_array == INT32_MIN) & (b_array == INT32_MIN)
    return np.where(overflow, np.int64(INT32_MAX), high).astype(np.int32)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded half away from zero (int32 or int64).

    ``mask = 2^exponent - 1``, ``remainder = x & mask``, ``threshold = (mask >> 1) + (x < 0)``,
    result = ``(x >> exponent) + (remainder > threshold)``; ``exponent`` in ``[0, 62]``.

    >>> rounding_divide_by_pot(np.array([5, -5, 6, -6], dtype=np.int32), 2)
    array([ 1, -1,  2, -2], dtype=int32)
    """
    x_array = np.asarray(x)
    if x_array.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"x must be int32 or int64, got {x_array.dtype}")
    exp = np.asarray(exponent).astype(np.int64)
    if np.any(exp < 0) or np.any(exp > MAX_SHIFT):
        raise ValueError(f"exponent must lie in [0, {MAX_SHIFT}], got {exponent!r}")
    wide = x_array.astype(np.int64)
    mask = (np.int64(1) << exp) - 1
    remainder = wide & mask
    threshold = (mask >> 1) + (wide < 0)
    return ((wide >> exp) + (remainder > threshold)).astype(x_array.dtype)


def _wide_rounding_doubling_high_mul(x: np.ndarray, m0: np.ndarray) -> np.ndarray:
    """The same formula as :func:`saturating_rounding_doubling_high_mul`, exact for int64 ``|x| <= 2^62``
    and ``m0`` in ``[2^30, 2^31)`` (no saturation case). ``x * m0`` needs ~94 bits, so ``x`` is split as
    ``x = high * 2^31 + low`` (``0 <= low < 2^31``) and ``(x * m0 + nudge) / 2^31`` is assembled exactly."""
    high = x >> 31
    low = x & np.int64(2**31 - 1)
    nudge = np.where(x >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))  # sign(x*m0) = sign(x)
    carry = low * m0 + nudge  # |.| < 2^62
    floor_result = high * m0 + (carry >> 31)  # floor((x*m0 + nudge) / 2^31)
    inexact = (carry & np.int64(2**31 - 1)) != 0
    return floor_result + ((x < 0) & inexact)  # negative totals truncate toward zero


def multiply_by_quantized_multiplier(acc, m0, shift) -> np.ndarray:
    """``acc * m0 * 2^-31 * 2^-shift``, rounded as TFLite's ``MultiplyByQuantizedMultiplier`` does.

    ``left = max(-shift, 0)``, ``right = max(shift, 0)``;
    ``result = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc * 2^left, m0), right)``.

    * int32 ``acc``: exactly gemmlowp/TFLite; ``acc * 2^left`` saturates to the int32 range (gemmlowp's
      ``SaturatingRoundingMultiplyByPOT``); result int32.
    * int64 ``acc`` (16x8 mode): the *same* two formulas evaluated exactly in wide integers, as if the
      register had 63 bits (``|acc * 2^left|`` saturates at ``2^62``); result int64. Any int32 value gives
      the same answer through either path. (TFLite's 64-bit variant instead rounds ``m0`` to 16 bits,
      losing precision; we do not.)

    ``m0`` / ``shift`` broadcast against ``acc`` (per-channel: shape ``(N,)`` against ``acc (M, N)``).

    >>> multiply_by_quantized_multiplier(np.array([100, -100], dtype=np.int32), 1073741824, 1)
    array([ 25, -25], dtype=int32)
    """
    acc_array = np.asarray(acc)
    if acc_array.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"acc must be int32 or int64, got {acc_array.dtype}")
    m0_array, shift_array = check_multiplier(m0, shift)
    left = np.maximum(-shift_array, 0)
    right = np.maximum(shift_array, 0)
    wide = acc_array.astype(np.int64)
    if acc_array.dtype == np.int32:
        shifted = np.clip(wide << left, INT32_MIN, INT32_MAX).astype(np.int32)
        high = saturating_rounding_doubling_high_mul(shifted, m0_array.astype(np.int32))
        return rounding_divide_by_pot(high, right)
    if np.any(np.abs(wide) > WIDE_LIMIT):
        raise ValueError(f"int64 acc must satisfy |acc| <= 2^62, got max |acc| = {np.abs(wide).max()}")
    limit = np.int64(WIDE_LIMIT) >> left  # saturate acc * 2^left at +-2^62 without overflowing
    shifted = np.where(wide > limit, WIDE_LIMIT, np.where(wide < -limit, -WIDE_LIMIT, wide << left))
    high = _wide_rounding_doubling_high_mul(shifted.astype(np.int64), m0_array)
    return rounding_divide_by_pot(high, right)


def check_multiplier(m0, shift) -> tuple[np.ndarray, np.ndarray]:
    """Check ``m0`` in ``[2^30, 2^31)`` and ``shift`` in ``[-31, 62]`` (both integers); return int64 arrays.

    >>> check_multiplier(2**30, 3)
    (array(1073741824), array(3))
    """
    m0_array, shift_array = np.asarray(m0), np.asarray(shift)
    for name, value in (("m0", m0_array), ("shift", shift_array)):
        if value.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer (or integer array), got dtype {value.dtype}")
    if np.any(m0_array < 2**30) or np.any(m0_array >= 2**31):
        raise ValueError(f"m0 must lie in [2^30, 2^31) (use quantize_multiplier), got {m0!r}")
    if np.any(shift_array < MIN_SHIFT) or np.any(shift_array > MAX_SHIFT):
        raise ValueError(f"shift must lie in [{MIN_SHIFT}, {MAX_SHIFT}], got {shift!r}")
    return m0_array.astype(np.int64), shift_array.astype(np.int64)


def requantize(acc, m0, shift, zero_point, spec: QuantSpec) -> np.ndarray:
    """Integer-only rescaling of accumulators to output codes (Jacob et al. 2018, eq. 7):

    ``q = clip(multiply_by_quantized_multiplier(acc, m0, shift) + zero_point, qmin, qmax)`` in
    ``spec.dtype``. ``acc`` may be int32 or int64 (see :func:`multiply_by_quantized_multiplier`).

    >>> m0, shift = quantize_multiplier(0.01)
    >>> requantize(np.array([1000, 12345, -70000], dtype=np.int32), m0, shift, -3, QuantSpec())
    array([   7,  120, -128], dtype=int8)
    """
    _check_spec(spec)
    zero = check_zero_point(zero_point, spec.qmin, spec.qmax)
    scaled = multiply_by_quantized_multiplier(acc, m0, shift).astype(np.int64)
    return np.clip(scaled + zero, spec.qmin, spec.qmax).astype(spec.dtype)
