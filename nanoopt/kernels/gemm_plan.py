"""An int8 GEMM with its weights and input zero point fixed: validated once, cheap per call.

:func:`nanoopt.kernels.gemm_s8s8s32` checks its arguments and the int32 overflow bound on every call (tens of
microseconds), which dominates a one-token product (M = 1) in autoregressive generation. :class:`GemmPlanS8`
does those checks once, for fixed weights ``w (N, K)`` and input zero point ``z``; per call it checks only the
input (dtype, shape, C order) and computes the same integers as :func:`nanoopt.kernels.reference.gemm_s8s8s32`:

    ``out[m, n] = sum_k (a[m, k] - z) w[n, k]``      (int32; the bound ``max |a - z| * sum_k |w_nk|`` < 2^31)

on the backend chosen at call time (``reference``, ``numba``, or ``avx2`` where the CPU and the weights allow).

>>> plan = GemmPlanS8(np.array([[3, 4], [-1, 0]], np.int8), 1)
>>> plan(np.array([[1, 2]], np.int8))
array([[4, 0]], dtype=int32)
"""

from __future__ import annotations

import numpy as np

from nanoopt import kernels
from nanoopt.kernels import numba_cpu, reference

__all__ = ["GemmPlanS8"]


class GemmPlanS8:
    """``a -> sum_k (a - a_zero_point) w`` (int32) for int8 ``a (M, K)``, fixed int8 ``w (N, K)`` and zero point."""

    def __init__(self, w, a_zero_point: int) -> None:
        self.weights = kernels.prepare_weights(w)
        reference.check_gemm_args(np.zeros((0, self.weights.numba.k), np.int8), self.weights.weight, (np.int8,),
                                  (np.int8,))
        self.zero_point = reference.check_int(a_zero_point, "a_zero_point", *reference.INT8_RANGE)
        packed = self.weights.numba
        if not reference.int32_safe_from_sign_sums(packed.positive_sums, packed.negative_sums,
                                                   *reference.INT8_RANGE, self.zero_point):
            raise reference.AccumulatorOverflowError(f"int8 GEMM with K={packed.k} could overflow int32")
        self.k, self.n = packed.k, packed.n
        self.correction = np.int32(self.zero_point) * packed.row_sums.astype(np.int32)  # fits: bound checked

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if not isinstance(a, np.ndarray) or a.dtype != np.int8 or a.ndim != 2 or a.shape[1] != self.k:
            raise TypeError(f"GemmPlanS8 takes int8 codes (M, {self.k}), got "
                            f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        a = np.ascontiguousarray(a)
        backend = kernels._resolve(self.weights, np.int8)
        if backend == "reference":
            return reference.gemm_s8s8s32(a, self.weights.weight, self.zero_point)
        if backend == "numba":
            return numba_cpu._raw_gemm(a, self.weights.numba, self.zero_point, np.int32)
        return kernels._avx2_products(self.weights, a) - self.correction
