"""A residual connection's epilogue in one pass: ``x += product + bias``.

A pre-LN transformer block adds each sub-layer's output to its input, ``x = x + (h W + b)`` (He et al. 2016;
Radford et al. 2019): after the matrix product, NumPy adds the bias in one pass and the residual in another.
:func:`bias_residual_` adds both in one pass, element by element in the same order -- ``product + bias`` rounded
to float32, then ``x +`` that -- so it gives the bits of :func:`bias_residual_reference`. For the no-grad window
recompute of :meth:`nanoopt.models_gpt.GPT.generate`.

>>> x = np.ones((1, 2), np.float32)
>>> bias_residual_(x, np.array([[1.0, 2.0]], np.float32), np.array([0.5, 0.5], np.float32)).tolist()
[[2.5, 3.5]]
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.float_kernels.bias import checked_bias

__all__ = ["bias_residual_", "bias_residual_reference", "bias_residual_rows"]


def bias_residual_reference(x: np.ndarray, product: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x + (product + bias)`` as a new array (the specification)."""
    return x + (product + bias if bias is not None else product)


@numba.njit(cache=True, nogil=True)
def bias_residual_rows(x, product, bias, has_bias):  # pragma: no cover - compiled
    """``x[r] = x[r] + (product[r] + bias)`` row by row in place (2-D C arrays; ``product[r]`` alone where not
    ``has_bias``), the compiled pass of :func:`bias_residual_` without its checks: for a caller that checked its
    operands once."""
    for r in range(x.shape[0]):
        row, added = x[r], product[r]
        if has_bias:
            for j in range(row.size):
                row[j] = row[j] + (added[j] + bias[j])
        else:  # no zero added: -0.0 + 0.0 would be +0.0
            for j in range(row.size):
                row[j] = row[j] + added[j]


def bias_residual_(x: np.ndarray, product: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x = x + (product + bias)`` in place for C-contiguous float32 ``x`` and ``product`` of one shape
    ``(..., n)`` and ``bias (n,)`` (or None); returns ``x``, equal to :func:`bias_residual_reference` bit for bit.

    >>> bias_residual_(np.zeros((2, 1), np.float32), np.ones((2, 1), np.float32), None).ravel().tolist()
    [1.0, 1.0]
    """
    for name, value in (("x", x), ("product", product)):
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim < 1 \
                or not value.flags.c_contiguous:
            raise TypeError(f"bias_residual_: {name} must be a C-contiguous float32 array, got "
                            f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")
    if product.shape != x.shape:
        raise ValueError(f"bias_residual_: product must have x's shape {x.shape}, got {product.shape}")
    n = x.shape[-1]
    bias, has_bias = checked_bias("bias_residual_", bias, n)
    bias_residual_rows(x.reshape(-1, n), product.reshape(-1, n), bias, has_bias)
    return x
