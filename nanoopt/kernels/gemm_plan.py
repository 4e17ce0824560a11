"""An int8 GEMM with its weights and input zero point fixed: validated once, cheap per call.

:func:`nanoopt.kernels.gemm_s8s8s32` checks its arguments and the int32 overflow bound on every call (tens of
microseconds), which dominates a one-token product (M = 1) in autoregressive generation. :class:`GemmPlanS8`
(:class:`nanoopt.kernels.PreparedGemm` for int8 activations) does those checks once, for fixed weights
``w (N, K)`` and input zero point ``z``; per call it checks only the input (dtype, shape) and computes the same
integers as :func:`nanoopt.kernels.reference.gemm_s8s8s32`:

    ``out[m, n] = sum_k (a[m, k] - z) w[n, k]``      (int32; the bound ``max |a - z| * sum_k |w_nk|`` < 2^31)

on the backend chosen at call time (``reference``, ``numba``, or ``avx2`` where the CPU and the weights allow).

>>> plan = GemmPlanS8(np.array([[3, 4], [-1, 0]], np.int8), 1)
>>> plan(np.array([[1, 2]], np.int8))
array([[4, 0]], dtype=int32)
"""

from __future__ import annotations

import numpy as np

from nanoopt.kernels import PreparedGemm

__all__ = ["GemmPlanS8"]


class GemmPlanS8(PreparedGemm):
    """``a -> sum_k (a - a_zero_point) w`` (int32) for int8 ``a (M, K)``, fixed int8 ``w (N, K)`` and zero point."""

    def __init__(self, w, a_zero_point: int) -> None:
        super().__init__(w, np.int8, a_zero_point)
