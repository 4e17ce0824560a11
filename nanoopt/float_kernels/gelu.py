"""Float32 GELU forward kernel: a NumPy reference and a Numba version, bit-identical.

GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (Hendrycks & Gimpel 2016). SciPy's ``erf`` on a float32
array costs about 45 ns per element, thirty times a whole PyTorch GELU, so float32 tensors use this kernel: erf
is the odd/even rational minimax approximation of Eigen's ``generic_fast_erf_float`` (also XLA's float erf),

    erf(z) ~ z P(z^2) / Q(z^2),  z clamped to [-4, 4] (erf is +-1 to float32 precision outside),

with P of degree 6 and Q of degree 4 in z^2, evaluated here in float64 by Horner's rule (absolute error of erf
below 7e-8, under half a float32 ulp of 1; Phi is set to exactly 0 and 1 beyond the clamp and kept in [0, 1]),
then Phi and x * Phi rounded once to float32: the absolute error of GELU is below 5e-7 for every float32 x
(PyTorch's own vectorised CPU erf, Abramowitz & Stegun 7.1.26, is accurate to 1.5e-7). Pure arithmetic, so
the Numba loop vectorises, and the reference, doing the same float64 operations in the same order, gives the
same bits (no fused multiply-add: Numba does not contract without ``fastmath``). Both return (GELU(x), Phi(x))
for the backward pass.

>>> import numpy as np
>>> y, cdf = gelu_forward(np.array([-1.0, 0.0, 2.0], dtype=np.float32))
>>> [round(v, 5) for v in y.tolist()], [round(v, 5) for v in cdf.tolist()]
([-0.15866, 0.0, 1.9545], [0.15866, 0.5, 0.97725])
"""

from __future__ import annotations

import numba
import numpy as np

_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # z^12 ... z^0 terms of P
_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                -1.42647390514189e-02)  # z^8 ... z^0 terms of Q
_INV_SQRT2 = 0.7071067811865476
A12, A10, A8, A6, A4, A2, A0 = _NUMERATOR
B8, B6, B4, B2, B0 = _DENOMINATOR


def gelu_forward_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(GELU(x), Phi(x)) as float32, computed elementwise in float64 with NumPy (the specification)."""
    a = x.astype(np.float64)
    z = np.minimum(np.maximum(a * _INV_SQRT2, -4.0), 4.0)
    z2 = z * z
    p = A12 * z2 + A10
    for c in (A8, A6, A4, A2, A0):
        p = p * z2 + c
    q = B8 * z2 + B6
    for c in (B4, B2, B0):
        q = q * z2 + c
    cdf = np.where(z <= -4.0, 0.0, np.where(z >= 4.0, 1.0, 0.5 * (1.0 + z * p / q)))
    cdf = np.where(cdf < 0.0, 0.0, np.where(cdf > 1.0, 1.0, cdf))
    return (a * cdf).astype(np.float32), cdf.astype(np.float32)


@numba.njit(cache=True, nogil=True, error_model="numpy")  # no zero-division check: Q < 0 on [-4, 4]
def gelu_scalar(x):  # pragma: no cover - compiled
    """(GELU(x), Phi(x)) of one float32 value, as float32: the reference's float64 operations in its order."""
    a = np.float64(x)
    z = a * _INV_SQRT2
    z = -4.0 if z < -4.0 else z
    z = 4.0 if z > 4.0 else z
    z2 = z * z
    p = A12 * z2 + A10
    p = p * z2 + A8
    p = p * z2 + A6
    p = p * z2 + A4
    p = p * z2 + A2
    p = p * z2 + A0
    q = B8 * z2 + B6
    q = q * z2 + B4
    q = q * z2 + B2
    q = q * z2 + B0
    cdf = 0.5 * (1.0 + z * p / q)
    cdf = 0.0 if z <= -4.0 else cdf  # exactly 0 and 1 beyond the clamp (the error there is below 8e-9)
    cdf = 1.0 if z >= 4.0 else cdf
    cdf = 0.0 if cdf < 0.0 else cdf  # and never outside [0, 1]
    cdf = 1.0 if cdf > 1.0 else cdf
    return np.float32(a * cdf), np.float32(cdf)


@numba.njit(cache=True, nogil=True)
def _gelu_forward_numba(x, out, cdf_out):
    for i in range(x.size):
        out[i], cdf_out[i] = gelu_scalar(x[i])


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(GELU(x), Phi(x)) for a float32 array, by the Numba kernel; bit-identical to the reference."""
    if x.dtype != np.float32:
        raise TypeError(f"gelu_forward: expected a float32 array, got dtype {x.dtype}")
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    cdf = np.empty_like(flat)
    _gelu_forward_numba(flat, out, cdf)
    return out.reshape(x.shape), cdf.reshape(x.shape)


@numba.njit(cache=True, nogil=True)
def _bias_gelu_rows(x, bias):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        row = x[r]
        for j in range(row.size):
            row[j], _ = gelu_scalar(row[j] + bias[j])


def bias_gelu_(x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x = GELU(x + bias)`` in place for a C-contiguous float32 ``x (..., n)`` and ``bias (n,)`` (or None): one
    pass instead of three (the bias addition, GELU and its Phi, which only the backward pass needs), the same bits
    as ``gelu_forward_reference(x + bias)[0]``. For inference (a linear layer's output followed by GELU).

    >>> x = np.array([[-1.0, 0.0], [1.0, 2.0]], np.float32)
    >>> [round(v, 5) for v in bias_gelu_(x, np.array([0.0, 1.0], np.float32)).ravel().tolist()]
    [-0.15866, 0.84134, 0.84134, 2.99595]
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1 or not x.flags.c_contiguous:
        raise TypeError(f"bias_gelu_: expected a C-contiguous float32 array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n = x.shape[-1]
    if bias is None:
        bias = np.zeros(n, np.float32)
    if not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (n,):
        raise ValueError(f"bias_gelu_: bias must be float32 of shape ({n},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {getattr(bias, 'shape', '')}")
    _bias_gelu_rows(x.reshape(-1, n), bias)
    return x
