"""Integer-only requantization of int64 accumulators to output codes, one compiled pass (Jacob et al. 2018, eq. 7).

``out = clip(multiply_by_quantized_multiplier(acc, m0, shift) + zero_point, qmin, qmax)`` with one per-tensor
multiplier ``m0 * 2^-31 * 2^-shift`` (gemmlowp's SaturatingRoundingDoublingHighMul and RoundingDivideByPOT, the
exact wide form of :mod:`nanoopt.kernels.numba_cpu`). The NumPy reference is the spec's own
:func:`nanoopt.spec.requantize` (:func:`requantize_reference`); the kernel equals it bit for bit (tested).
Used where an integer product has no GEMM epilogue, e.g. the ``P V`` product of integer attention.

>>> out = np.empty(3, np.int8)
>>> requantize_into(np.array([1000, 12345, -70000], np.int64), 1374389535, 6, -3, -128, 127, out); out
array([   7,  120, -128], dtype=int8)
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.kernels.numba_cpu import _multiply_wide
from nanoopt.spec import QuantSpec, requantize

__all__ = ["requantize_into", "requantize_reference"]


@numba.njit(cache=True, nogil=True)
def requantize_into(acc, m0, shift, zero_point, low, high, out):  # pragma: no cover - compiled
    """``out[i] = min(max(multiply(acc[i], m0, shift) + zero_point, low), high)`` over flat int64 ``acc``."""
    for i in range(acc.size):
        out[i] = min(max(_multiply_wide(acc[i], m0, shift) + zero_point, low), high)


def requantize_reference(acc: np.ndarray, m0: int, shift: int, zero_point: int, spec: QuantSpec) -> np.ndarray:
    """:func:`nanoopt.spec.requantize` itself (per-tensor multiplier).

    >>> requantize_reference(np.array([1000], np.int64), 1374389535, 6, -3, QuantSpec())
    array([7], dtype=int8)
    """
    return requantize(acc, m0, shift, zero_point, spec)
