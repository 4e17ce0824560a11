"""Float32 GELU forward kernel: a NumPy reference and a Numba version, bit-identical.

GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (Hendrycks & Gimpel 2016). SciPy's ``erf`` on a float32
array costs about 45 ns per element, thirty times a whole PyTorch GELU, so float32 tensors use this kernel, all in
float32 (16 lanes with AVX-512, 8 with AVX2; one division). It computes the lower tail of the normal distribution

    Q(t) = Phi(-t) = erfc(t / sqrt 2) / 2,  t = min(|x|, 6),

with a small *relative* error, and from it

    GELU(x) = max(x, 0) - t Q(t)   (x - x Q(x) for x >= 0, x Q(-x) for x < 0),
    Phi(x) = 1 - Q(t) for x >= 0,  Q(t) for x < 0,

so that Q's relative error is multiplied by t Q(t) <= 0.17, not by |x| up to 6 as the absolute error of an erf
would be (Eigen's erf rational, ``generic_fast_erf_float``, evaluated in float32 is 2.5e-7 off in Phi and 1.07e-6
in GELU). Q is a Gaussian times a rational function, as in Cody's erfc approximations (W. J. Cody, "Rational
Chebyshev approximations for the error function", Math. Comp. 23 (1969) 631-637):

    Q(t) = exp(-t^2 / 2) R(t) = 2^k E(f) P(t) / D(t),  w = t (t (-1 / (2 ln 2))),  k = rint(w),  f = w - k,

with P / D ~ R = erfcx(t / sqrt 2) / 2 (degrees 3 / 3, P(0) = 1/2 and D(0) = 1, so Phi(0) = 1/2 exactly) and
E(f) ~ 2^f (degree 5 on [-1/2, 1/2]); f = w - k is exact and 2^k (k in [-26, 0]) is made exactly from its exponent
bits (range reduction of Cody & Waite, *Software Manual for the Elementary Functions*, 1980; Muller, *Elementary
Functions*, 3rd ed. 2016, ch. 11). The coefficients are weighted minimax fits made by ``docs/gelu_fit.py`` (Loeb's
linearisation and Lawson's reweighting; R's relative error times (1 + t) Q(t) below 2.3e-8, 2^f's below 9.2e-8).
Beyond |x| = 6 (Phi(-6) = 9.9e-10) Phi is exactly 0 or 1 and GELU(x) is x or 0. ``python docs/gelu_fit.py --check``
evaluates the kernel on every float32 with 2^-12 <= |x| < 8: the absolute error of GELU is at most 2.46e-7 (half
a float32 ulp of x in [4, 8): the rounding of the result), that of Phi at most 1.50e-7, Phi in [0, 1]; the documented
bound is 5e-7 (PyTorch's own vectorised CPU erf, Abramowitz & Stegun 7.1.26, is accurate to 1.5e-7).

The reference performs the same float32 operations in the same order (the kernel's conditional expressions as
``np.where``), so kernel and reference give the same bits: no fused multiply-add (Numba does not contract without
``fastmath``), ``rint`` rounds half to even in both. Both return (GELU(x), Phi(x)) for the backward pass.

>>> import numpy as np
>>> y, cdf = gelu_forward(np.array([-1.0, 0.0, 2.0], dtype=np.float32))
>>> [round(v, 5) for v in y.tolist()], [round(v, 5) for v in cdf.tolist()]
([-0.15866, 0.0, 1.9545], [0.15866, 0.5, 0.97725])
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanoopt.float_kernels.bias import checked_bias

_F = np.float32
T = _F(6.0)  # |x| beyond which Phi is 0 or 1 (Phi(-6) = 9.9e-10; 6 Phi(-6) < 6e-9)
W = _F(-0.5 / np.log(2))  # w = t (t W) = -t^2 / (2 ln 2): exp(-t^2 / 2) = 2^w
P0, P1, P2, P3 = _F(0.5), _F(0.18746507), _F(0.035313014), _F(-0.00013390192)  # P(t), t^0 first (docs/gelu_fit.py)
D0, D1, D2, D3 = _F(1.0), _F(1.1728168), _F(0.5063706), _F(0.08344306)  # D(t)
E0, E1, E2, E3, E4, E5 = _F(1.0), _F(0.693147), _F(0.24022242), _F(0.055507336), _F(0.009671513), _F(0.0013264726)
ZERO, ONE = _F(0.0), _F(1.0)


@intrinsic
def _power_of_two(typingctx, k):
    """2^k as float32 for an integral float32 ``k`` in [-126, 127]: the exponent field ``(k + 127) << 23``."""
    if k != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


def gelu_forward_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(GELU(x), Phi(x)) of a float32 array, elementwise in float32 with NumPy (the specification).

    >>> [v.tolist() for v in gelu_forward_reference(np.array([-7.0, 0.0, 7.0], np.float32))]
    [[0.0, 0.0, 7.0], [0.0, 0.5, 1.0]]
    """
    shape = np.shape(x)
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    t = np.abs(x)
    beyond = t > T
    t = np.where(beyond, T, t)
    w = t * (t * W)
    k = np.rint(w)
    f = w - k
    e = E5 * f + E4
    for c in (E3, E2, E1, E0):
        e = e * f + c
    num = P3 * t + P2
    for c in (P1, P0):
        num = num * t + c
    den = D3 * t + D2
    for c in (D1, D0):
        den = den * t + c
    with np.errstate(invalid="ignore"):  # NaN's k: any bits (Q is NaN anyway), as in the kernel
        power = ((k.astype(np.int32) + np.int32(127)) << np.int32(23)).view(np.float32)
    q = (e * power) * (num / den)
    q = np.where(beyond, ZERO, q)
    out = np.where(x > ZERO, x, ZERO) - t * q
    cdf = np.where(x >= ZERO, ONE - q, q)
    return out.astype(np.float32, copy=False).reshape(shape), cdf.astype(np.float32, copy=False).reshape(shape)


@numba.njit(cache=True, nogil=True, error_model="numpy")  # no zero-division check: D(t) >= 1
def gelu_scalar(x):  # pragma: no cover - compiled
    """(GELU(x), Phi(x)) of one value rounded to float32, as float32: the reference's operations in its order."""
    x = np.float32(x)
    t = abs(x)
    beyond = t > T
    t = T if beyond else t
    w = t * (t * W)
    k = np.rint(w)
    f = w - k
    e = E5 * f + E4
    e = e * f + E3
    e = e * f + E2
    e = e * f + E1
    e = e * f + E0
    num = P3 * t + P2
    num = num * t + P1
    num = num * t + P0
    den = D3 * t + D2
    den = den * t + D1
    den = den * t + D0
    q = (e * _power_of_two(k)) * (num / den)
    q = ZERO if beyond else q  # exactly 0 beyond |x| = 6: GELU(x) is x or 0, Phi 1 or 0
    out = (x if x > ZERO else ZERO) - t * q
    cdf = ONE - q if x >= ZERO else q
    return out, cdf


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
def bias_gelu_rows(x, bias):  # pragma: no cover - compiled
    """``x[r] = GELU(x[r] + bias)`` row by row in place (2-D C arrays), the compiled pass of :func:`bias_gelu_` without
    its checks: for a caller that checked its operands once (the GPT window of :class:`nanoopt.models_gpt.GPT`)."""
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
    bias, _ = checked_bias("bias_gelu_", bias, n)  # (None: zeros, added: GELU(+-0) is +0 either way)
    bias_gelu_rows(x.reshape(-1, n), bias)
    return x
