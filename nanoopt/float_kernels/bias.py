"""The bias operand of the fused epilogues (:mod:`~nanoopt.float_kernels.attention_heads`,
:mod:`~nanoopt.float_kernels.gelu`, :mod:`~nanoopt.float_kernels.residual`): checked in one place, with a message
naming the caller."""

from __future__ import annotations

import numpy as np

__all__ = ["checked_bias"]


def checked_bias(function: str, bias: np.ndarray | None, n: int) -> tuple[np.ndarray, bool]:
    """``(bias, True)`` for a float32 ``bias`` of shape ``(n,)`` (made C-contiguous), ``(zeros, False)`` for None
    (a kernel then adds nothing: adding zeros would turn -0.0 into +0.0); else ValueError naming ``function``.

    >>> checked_bias("f", None, 2)
    (array([0., 0.], dtype=float32), False)
    """
    if bias is None:
        return np.zeros(n, np.float32), False
    if not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (n,):
        raise ValueError(f"{function}: bias must be float32 of shape ({n},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {getattr(bias, 'shape', '')}")
    return np.ascontiguousarray(bias), True
