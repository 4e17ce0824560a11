"""Integer-only requantization compiled by Numba: the scalar fixed-point arithmetic every integer kernel's
epilogue uses, and one pass over int64 accumulators (Jacob et al. 2018, eq. 7).

``out = clip(multiply_by_quantized_multiplier(acc, m0, shift) + zero_point, qmin, qmax)`` with the multiplier
``m0 * 2^-31 * 2^-shift`` (gemmlowp's SaturatingRoundingDoublingHighMul and RoundingDivideByPOT). Three exact
forms of the multiplication: :func:`multiply_wide` (any int64 accumulator), :func:`multiply_int32` (gemmlowp on
an int32 value) and :func:`multiply_fast` (branch-free, vectorisable, for int32 values and right shifts <= 30).
The NumPy reference is the spec's own :func:`nanoopt.spec.multiply_by_quantized_multiplier` /
:func:`nanoopt.spec.requantize` (:func:`requantize_reference`); the kernels equal it bit for bit (tested).
:func:`requantize_into` is used where an integer product has no GEMM epilogue, e.g. the ``P V`` product of
integer attention.

>>> out = np.empty(3, np.int8)
>>> requantize_into(np.array([1000, 12345, -70000], np.int64), 1374389535, 6, -3, -128, 127, out); out
array([   7,  120, -128], dtype=int8)
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.spec import INT32_MAX, INT32_MIN, WIDE_LIMIT, QuantSpec, requantize

__all__ = [
    "multiply_fast",
    "multiply_int32",
    "multiply_wide",
    "requantize_into",
    "requantize_reference",
    "requantize_value",
    "rounding_divide_by_pot",
]

@numba.njit(cache=True, inline="always")
def rounding_divide_by_pot(x, exponent):
    """gemmlowp RoundingDivideByPOT on an int64 (see nanoopt.spec.rounding_divide_by_pot)."""
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


@numba.njit(cache=True)
def multiply_wide(acc, m0, shift):
    """``spec.multiply_by_quantized_multiplier`` for an int64 accumulator (the exact wide path)."""
    left = -shift if shift < 0 else 0
    right = shift if shift > 0 else 0
    limit = np.int64(WIDE_LIMIT) >> left
    if acc > limit:
        x = np.int64(WIDE_LIMIT)
    elif acc < -limit:
        x = np.int64(-WIDE_LIMIT)
    else:
        x = acc << left
    high = x >> 31
    low = x & np.int64(0x7FFFFFFF)
    nudge = np.int64(1 << 30) if x >= 0 else np.int64(1 - (1 << 30))
    carry = low * m0 + nudge
    result = high * m0 + (carry >> 31)
    if x < 0 and (carry & np.int64(0x7FFFFFFF)) != 0:
        result += 1  # C++ division truncates toward zero
    return rounding_divide_by_pot(result, right)


@numba.njit(cache=True, inline="always")
def multiply_int32(value, m0, shift):
    """``spec.multiply_by_quantized_multiplier`` for an int32 value (gemmlowp exactly; int64 registers)."""
    left = -shift if shift < 0 else 0
    right = shift if shift > 0 else 0
    x = min(max(np.int64(value) << left, INT32_MIN), INT32_MAX)
    if x == INT32_MIN and m0 == INT32_MIN:
        high = np.int64(INT32_MAX)
    else:
        product = x * m0
        total = product + (np.int64(1 << 30) if product >= 0 else np.int64(1 - (1 << 30)))
        high = total >> 31 if total >= 0 else -((-total) >> 31)
    return rounding_divide_by_pot(high, right)


@numba.njit(cache=True, inline="always")
def multiply_fast(value, m0, shift):
    """:func:`multiply_wide` for an int32-range ``value`` and a right shift ``0 <= shift <= 30``, branch-free
    (vectorisable) and on 32-bit lanes except for one product: ``value * m0`` fits int64 and the rounded high
    half fits int32.

    gemmlowp's high half ``trunc((p + nudge) / 2^31)`` (``nudge = 2^30`` for ``p >= 0``, ``1 - 2^30`` below) is
    ``floor((p + 2^30) / 2^31)`` for every ``p``: for ``p < 0``, ``trunc(t / 2^31) = ceil(t / 2^31) = floor((t +
    2^31 - 1) / 2^31)`` with ``t = p + 1 - 2^30``. That floor fits int32, so it is the low 32 bits of the *logical*
    shift ``(p + 2^30) >>> 31`` (bits 31..62 of ``p + 2^30``, the same under either shift): one 32x32->64 product
    (``vpmuldq``), one 64-bit add and a logical shift, where the literal formula needs a select, an arithmetic
    64-bit shift (none in AVX2) and a correction."""
    product = np.int64(np.int32(value)) * np.int64(np.int32(m0))
    top = np.int32(np.uint64(product + np.int64(1 << 30)) >> np.uint64(31))
    exponent = np.int32(shift)
    mask = (np.int32(1) << exponent) - np.int32(1)
    return (top >> exponent) + np.int32((top & mask) > ((mask >> 1) + np.int32(top < 0)))


@numba.njit(cache=True, inline="always")
def requantize_value(value, m0, shift, out_zero_point, low, high, fast):
    """One exact accumulator -> output code (fast: the branch-free int32 form, else the wide form)."""
    if fast:  # clip(s + zp, low, high) = clip(s, low - zp, high - zp) + zp, all in int32 (no overflow)
        scaled = multiply_fast(value, m0, shift)
        zero = np.int32(out_zero_point)
        return min(max(scaled, np.int32(low) - zero), np.int32(high) - zero) + zero
    return min(max(multiply_wide(value, m0, shift) + out_zero_point, low), high)




@numba.njit(cache=True, nogil=True)
def requantize_into(acc, m0, shift, zero_point, low, high, out):  # pragma: no cover - compiled
    """``out[i] = min(max(multiply(acc[i], m0, shift) + zero_point, low), high)`` over flat int64 ``acc``."""
    for i in range(acc.size):
        out[i] = min(max(multiply_wide(acc[i], m0, shift) + zero_point, low), high)


def requantize_reference(acc: np.ndarray, m0: int, shift: int, zero_point: int, spec: QuantSpec) -> np.ndarray:
    """:func:`nanoopt.spec.requantize` itself (per-tensor multiplier).

    >>> requantize_reference(np.array([1000], np.int64), 1374389535, 6, -3, QuantSpec())
    array([7], dtype=int8)
    """
    return requantize(acc, m0, shift, zero_point, spec)
