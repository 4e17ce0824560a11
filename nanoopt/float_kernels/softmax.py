"""Float32 softmax over the last axis with a fixed exp: a NumPy reference and a Numba kernel, bit-identical.

``softmax(s)_j = e_j / sum_i e_i`` with ``e_j = exp(s_j - max_i s_i)`` (float32 throughout, as the integer
attention of :mod:`nanoopt.quant.transformer` uses it on the scaled int32 scores). NumPy's float32 ``np.exp``
is a SIMD polynomial chosen at run time by CPU feature (AVX-512F, AVX2 or the C library), which a compiled loop
cannot reproduce on every machine; so the exponential here is a fixed sequence of float64 operations that NumPy
(elementwise, vectorised) and Numba (scalar, no fused multiply-add without ``fastmath``) evaluate identically:

    ``z`` clamped to ``[-110, 100]`` (``e^-110`` rounds to float32 0, ``e^100`` to float32 inf; NaN stays NaN),
    ``n = rint(z log2 e)``, ``r = (z - n ln2_hi) - n ln2_lo`` (Cody & Waite 1980; ``|r| <= ln2 / 2``),
    ``e^r`` by Horner's rule on the Taylor polynomial of degree 11 (truncation below ``3e-14`` relative),
    ``e^z = ldexp(e^r, n)`` (exact), rounded once to float32: within half an ulp plus ``3e-14`` relative.

The row sum is NumPy's own float32 ``np.sum`` order -- pairwise summation (Higham 1993): blocks of at most 128
values summed by eight interleaved accumulators, halves split at multiples of 8 -- which :func:`pairwise_sum`
reproduces (NumPy 2's ``@TYPE@_pairwise_sum``, reduction started from the identity 0), so the reference is
plain NumPy. The kernel is tested against the reference bit for bit.

>>> s = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, -np.inf]], np.float32)
>>> out = softmax(s); bool((out == softmax_reference(s)).all()), out[1].tolist()
(True, [0.5, 0.5, 0.0])
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["exp_reference", "pairwise_sum", "softmax", "softmax_reference", "softmax_row"]

_FLOOR, _CEILING = -110.0, 100.0
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's ln2_hi: 32 significant bits, so n * ln2_hi is exact
_LN2_LO = 1.90821492927058770002e-10
C11, C10, C9, C8, C7, C6, C5, C4, C3, C2, C1, C0 = (1.0 / math.factorial(k) for k in range(11, -1, -1))


def exp_reference(z: np.ndarray) -> np.ndarray:
    """``exp(z)`` of a float32 array by the fixed float64 formula (module docstring), rounded to float32.

    >>> exp_reference(np.array([0.0, -1.0, -np.inf], np.float32)).tolist()
    [1.0, 0.3678794503211975, 0.0]
    """
    a = np.asarray(z, np.float32).astype(np.float64)
    a = np.where(a < _FLOOR, _FLOOR, a)
    a = np.where(a > _CEILING, _CEILING, a)
    n = np.rint(a * _LOG2E)
    r = (a - n * _LN2_HI) - n * _LN2_LO
    p = C11 * r + C10
    for c in (C9, C8, C7, C6, C5, C4, C3, C2, C1, C0):
        p = p * r + c
    with np.errstate(over="ignore"):  # e^z above the float32 range is inf, as it should be
        return np.ldexp(p, np.nan_to_num(n).astype(np.int32)).astype(np.float32)


def softmax_reference(scores: np.ndarray) -> np.ndarray:
    """Softmax of float32 ``scores`` over the last axis (a new float32 array); the specification.

    >>> softmax_reference(np.array([0.0, 0.0], np.float32)).tolist()
    [0.5, 0.5]
    """
    e = exp_reference(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@numba.njit(cache=True, nogil=True)
def exp32(z):  # pragma: no cover - compiled
    """:func:`exp_reference` of one float32 value (the same float64 operations in the same order)."""
    a = np.float64(z)
    a = _FLOOR if a < _FLOOR else a
    a = _CEILING if a > _CEILING else a
    n = np.rint(a * _LOG2E)
    r = (a - n * _LN2_HI) - n * _LN2_LO
    p = C11 * r + C10
    p = p * r + C9
    p = p * r + C8
    p = p * r + C7
    p = p * r + C6
    p = p * r + C5
    p = p * r + C4
    p = p * r + C3
    p = p * r + C2
    p = p * r + C1
    p = p * r + C0
    if a != a:  # NaN: ldexp of NaN is NaN whatever the exponent
        return np.float32(a)
    return np.float32(math.ldexp(p, np.int32(n)))


_LANES = ir.VectorType(ir.FloatType(), 8)


@intrinsic
def _lane_sums(typingctx, x, start, blocks):
    """The eight accumulators ``r_l = x[start + l] + x[start + 8 + l] + ... + x[start + 8 (blocks - 1) + l]``
    (``blocks >= 1``), each summed in that order, as a tuple: one ``<8 x float>`` register that every iteration adds
    the next eight values to, lane by lane (exact IEEE float32 additions, no reassociation; LLVM lowers the vector
    to whatever registers the target has, so this needs no CPU feature). For a C-contiguous 1-D float32 ``x``."""
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C" and x.dtype == types.float32
            and isinstance(start, types.Integer) and isinstance(blocks, types.Integer)):
        return None
    result = types.UniTuple(types.float32, 8)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        begin = context.cast(builder, args[1], signature.args[1], types.intp)
        count = context.cast(builder, args[2], signature.args[2], types.intp)
        intp = context.get_value_type(types.intp)

        def load(offset):
            pointer = builder.bitcast(builder.gep(array.data, [offset]), _LANES.as_pointer())
            return builder.load(pointer, align=4)

        accumulator = cgutils.alloca_once_value(builder, load(begin))
        with cgutils.for_range(builder, builder.sub(count, ir.Constant(intp, 1))) as loop:
            block = builder.add(loop.index, ir.Constant(intp, 1))
            offset = builder.add(begin, builder.mul(block, ir.Constant(intp, 8)))
            builder.store(builder.fadd(builder.load(accumulator), load(offset)), accumulator)
        total = builder.load(accumulator)
        lanes = [builder.extract_element(total, ir.Constant(ir.IntType(32), lane)) for lane in range(8)]
        return context.make_tuple(builder, result, lanes)

    return result(x, start, blocks), codegen


@numba.njit(cache=True, nogil=True)
def _block_sum(x, start, count):  # pragma: no cover - compiled
    """NumPy's leaf of the pairwise sum, ``count <= 128`` values: eight interleaved accumulators (one register)."""
    if count < 8:
        total = np.float32(0.0)
        for i in range(start, start + count):
            total += x[i]
        return total
    r = _lane_sums(x, start, count // 8)
    i = start + count - count % 8
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < start + count:
        total += x[i]
        i += 1
    return total


@numba.njit(cache=True, nogil=True)
def pairwise_sum(x, start, count):  # pragma: no cover - compiled
    """``x[start:start + count].sum()`` of a float32 array in NumPy's pairwise order (module docstring).

    NumPy recurses: above 128 values, ``half = count // 2`` rounded down to a multiple of 8, then the sum of the
    two halves. The same tree is walked here with an explicit stack (a cached Numba function must not recurse)."""
    if count <= 128:
        return _block_sum(x, start, count)
    starts, counts = np.empty(128, np.int64), np.empty(128, np.int64)
    opened = np.zeros(128, np.bool_)
    values = np.empty(128, np.float32)
    starts[0], counts[0], top, done = start, count, 1, 0
    while top > 0:
        s, c = starts[top - 1], counts[top - 1]
        if c <= 128:  # a leaf
            values[done] = _block_sum(x, s, c)
            done += 1
            top -= 1
        elif opened[top - 1]:  # both halves summed: combine them (left + right)
            values[done - 2] = values[done - 2] + values[done - 1]
            done -= 1
            opened[top - 1] = False
            top -= 1
        else:  # push the right half, then the left one (summed first)
            half = c // 2
            half -= half % 8
            opened[top - 1] = True
            starts[top], counts[top], opened[top] = s + half, c - half, False
            starts[top + 1], counts[top + 1], opened[top + 1] = s, half, False
            top += 2
    return values[0]


@numba.njit(cache=True, nogil=True)
def softmax_row(row, count):  # pragma: no cover - compiled
    """Softmax of the float32 ``row[:count]`` in place, as :func:`softmax_reference` computes it."""
    peak = row[0]
    for j in range(1, count):
        peak = row[j] if row[j] > peak else peak
    for j in range(count):
        row[j] = exp32(row[j] - peak)
    total = np.float32(0.0) + pairwise_sum(row, 0, count)  # NumPy's reduction starts from its identity, 0
    for j in range(count):
        row[j] = row[j] / total


@numba.njit(cache=True, nogil=True)
def _softmax_rows(rows):  # pragma: no cover - compiled
    for i in range(rows.shape[0]):
        softmax_row(rows[i], rows.shape[1])


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax of float32 ``scores`` over the last axis (a new array), by the Numba kernel; equals
    :func:`softmax_reference` bit for bit.

    >>> softmax(np.array([1.0, 1.0, 1.0, 1.0], np.float32)).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    if not isinstance(scores, np.ndarray) or scores.dtype != np.float32 or scores.ndim < 1 or scores.shape[-1] < 1:
        raise TypeError(f"softmax: expected a float32 array with a non-empty last axis, got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)} {getattr(scores, 'shape', '')}")
    out = np.array(scores, dtype=np.float32, order="C", copy=True)
    _softmax_rows(out.reshape(-1, out.shape[-1]))
    return out
