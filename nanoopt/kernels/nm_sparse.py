"""``y = x W^T + b`` for an N:M-sparse float32 weight, laid out so that the inner loop runs over outputs with SIMD.

N:M sparsity (Mishra et al. 2021, "Accelerating sparse deep neural networks", arXiv:2104.08378; Zhou et al. 2021,
"Learning N:M fine-grained structured sparse neural networks from scratch") keeps at most ``n`` of every ``m``
consecutive weights of a row along the input dimension, so a weight ``W (N, K)`` is stored as ``K / m * n``
values per row plus, for each, its column inside its group of ``m`` (the :class:`~nanoopt.kernels.sparse.NMMatrix`
format: ``values (N, S)``, ``offsets (N, S)``, ``S = K / m * n``). At 2:4 that reads half the weight bytes of the
dense product plus a byte of offset per kept weight, and does half the multiplications.

The scalar N:M kernel of :mod:`nanoopt.kernels.sparse` walks each row of that format and gathers one input per
weight; it does not vectorise and runs at a fraction of dense BLAS. Here :func:`prepare_nm` lays the same
weight out once as ``(S, N)``, *slot-major*: slot ``s = g n + t`` (the t-th kept weight of group ``g``) of every
output is one contiguous row of ``values`` and of ``offsets``. The kernel then runs, for each slot, one pass over
the outputs: it loads ``m`` inputs ``x[g m .. g m + m - 1]`` once, picks for each output the input its offset
names (for ``m = 4`` by compares and blends, no gather instruction: three blends, or two at 2:4, where
:func:`prepare_nm` sorts the offsets of a group so that slot 0 is column 0, 1 or 2 and slot 1 column 1, 2 or 3),
multiplies by the contiguous values and adds into the contiguous outputs, all in vector registers; 2:4 takes both
slots of a group in one pass. With several rows of ``x`` it does four rows per pass over the weight, so the values,
offsets and blend masks are loaded once for four rows. Other ``m`` read the picked input with an indexed load.

What it gains (``python -m benchmarks.nm_kernels``): 1:4 does fewer vector operations per row than a dense
fused-multiply-add product and is faster than BLAS at batch 1-32; 2:4 reads 62.5% of the dense bytes but, with a
separate multiply and add (a fused one would change the bits against the reference) and the blends, does about as
many vector operations as the dense product, so it is faster where the product is bound by memory (batch 1) and
about even with BLAS at batch 4-32.

Arithmetic, the contract (float32, each product rounded before it is added, no fused multiply-add; the NumPy
reference :func:`nm_linear_reference` is the specification and the Numba kernel :func:`nm_linear` equals it bit for
bit, tested with hypothesis):

.. math::

    y_{i,j} = \\Big(\\big(\\cdots\\big((0 + p_{i,j,0}) + p_{i,j,1}\\big) + \\cdots\\big) + p_{i,j,S-1}\\Big) + b_j,
    \\qquad p_{i,j,s} = \\mathrm{fl}\\big(v_{s,j} \\, x_{i,\\, \\lfloor s/n \\rfloor m + o_{s,j}}\\big)

one running sum per output, over the slots in increasing order, starting from +0.0; the bias (if any) last.
Against a dense float32 ``x @ W.T`` (BLAS, another order) the results agree to float tolerance,
``|y - y_dense| <= 2 K eps (|x| |W|^T)``.

>>> import numpy as np
>>> from nanoopt.kernels.sparse import NMMatrix
>>> w = np.array([[0, 3, 0, 1, 2, 0, 0, 5], [1, 0, 0, 0, 0, 0, 4, 0]], dtype=np.float32)
>>> weight = prepare_nm(NMMatrix.from_dense(w, n=2, m=4))
>>> x = np.arange(8, dtype=np.float32)[None]
>>> nm_linear(x, weight, np.ones(2, np.float32)).tolist(), (x @ w.T + 1).tolist()
([[50.0, 25.0]], [[50.0, 25.0]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numba import njit

from nanoopt.kernels.sparse import NMMatrix

__all__ = ["NMWeight", "nm_linear", "nm_linear_reference", "nm_row_kernel", "prepare_nm"]


class NMWeight(NamedTuple):
    """An N:M weight laid out for :func:`nm_linear` (made by :func:`prepare_nm`)."""

    values: np.ndarray  # float32 (S, N), S = K / m * n: row s holds slot s (kept weight t of group g, s = g n + t)
    offsets: np.ndarray  # uint8 (S, N): the column of values[s, j] inside its group, 0..m-1
    n: int
    m: int
    out_features: int  # N
    in_features: int  # K


def prepare_nm(matrix: NMMatrix) -> NMWeight:
    """Lay out an :class:`~nanoopt.kernels.sparse.NMMatrix` (row-major ``values (N, S)``) slot-major, ``(S, N)``,
    with the offsets of each group in increasing order (so that slot t of a group names one of columns t..m-n+t).
    This is the only way to make an :class:`NMWeight`; :func:`nm_linear` checks the order unless told not to.

    >>> w = prepare_nm(NMMatrix.from_dense(np.array([[0, 3, 0, 1], [2, 0, 5, 0]], np.float32), 2, 4))
    >>> w.values.tolist(), w.offsets.tolist()
    ([[3.0, 2.0], [1.0, 5.0]], [[1, 0], [3, 2]])
    """
    if not isinstance(matrix, NMMatrix):
        raise TypeError(f"prepare_nm: matrix must be an NMMatrix, got {type(matrix).__name__}")
    rows, cols = matrix.shape
    n, m = int(matrix.n), int(matrix.m)
    shape = (rows, cols // m, n)  # (N, groups, n)
    order = np.argsort(matrix.offsets.reshape(shape), axis=-1, kind="stable")  # offsets ascending in each group
    offsets = np.take_along_axis(matrix.offsets.reshape(shape), order, axis=-1).reshape(rows, -1)
    values = np.take_along_axis(matrix.values.reshape(shape), order, axis=-1).reshape(rows, -1)
    return NMWeight(np.ascontiguousarray(values.T), np.ascontiguousarray(offsets.T), n, m, int(rows), int(cols))


def _check_call(x: np.ndarray, weight: NMWeight, bias: np.ndarray | None,
                rows: tuple[int, int] | None) -> tuple[int, int]:
    """The output range ``(start, stop)`` of a valid call; else an error naming the argument."""
    if not isinstance(weight, NMWeight):
        raise TypeError(f"nm_linear: weight must be an NMWeight (from prepare_nm), got {type(weight).__name__}")
    n, k = weight.out_features, weight.in_features
    start, stop = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
    slots = k // weight.m * weight.n
    refusals = (  # (is it wrong?, what was expected) in the order of the arguments
        (not isinstance(x, np.ndarray) or x.dtype != np.float32 or np.ndim(x) != 2 or np.shape(x)[1] != k,
         f"x must be a float32 array (M, {k}), got {getattr(x, 'dtype', type(x).__name__)} {np.shape(x)}"),
        (k % weight.m != 0 or any(not isinstance(a, np.ndarray) or a.shape != (slots, n) or not a.flags.c_contiguous
                                  for a in (weight.values, weight.offsets))
         or (weight.values.dtype, weight.offsets.dtype) != (np.float32, np.uint8),
         f"weight must hold C-contiguous float32 values and uint8 offsets of shape ({slots}, {n}) (from "
         f"prepare_nm), got {weight.values.dtype} {weight.values.shape} and {weight.offsets.dtype} "
         f"{weight.offsets.shape}"),
        (bias is not None and (not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (n,)),
         f"bias must be float32 ({n},), got {getattr(bias, 'dtype', type(bias).__name__)} {np.shape(bias)}"),
        (not 0 <= start <= stop <= n, f"rows must satisfy 0 <= start <= stop <= {n}, got {rows}"),
    )
    for wrong, expected in refusals:
        if wrong:
            raise ValueError(f"nm_linear: {expected}")
    grouped = weight.offsets.reshape(k // weight.m, weight.n, n).astype(np.int16)
    if grouped.size and (grouped.max() >= weight.m or np.any(np.diff(grouped, axis=1) <= 0)):
        raise ValueError(f"nm_linear: the offsets of each group must be increasing and below m={weight.m} (as "
                         "prepare_nm lays them out)")
    return start, stop


def nm_linear_reference(x: np.ndarray, weight: NMWeight, bias: np.ndarray | None = None,
                        rows: tuple[int, int] | None = None) -> np.ndarray:
    """The specification (pure NumPy) of :func:`nm_linear`: outputs ``rows = (start, stop)`` (default all) of
    ``x (M, K) W^T + b``, float32 ``(M, stop - start)``, in the order of the module docstring.

    >>> w = prepare_nm(NMMatrix.from_dense(np.array([[0, 2, 0, 1]], np.float32), 2, 4))
    >>> nm_linear_reference(np.ones((1, 4), np.float32), w).tolist()
    [[3.0]]
    """
    start, stop = _check_call(x, weight, bias, rows)
    slots = weight.values.shape[0]
    columns = (np.arange(slots)[:, None] // weight.n) * weight.m + weight.offsets[:, start:stop]  # (S, c)
    y = np.zeros((x.shape[0], stop - start), np.float32)
    for s in range(slots):
        y += weight.values[s, start:stop] * x[:, columns[s]]  # (M, c): rounded products, then one add each
    if bias is not None:
        y += bias[start:stop]
    return y


@njit(inline="always")
def _pick(offset, x0, x1, x2, x3):  # pragma: no cover - compiled
    """The input of a group of four that ``offset`` (0..3) names: compares and blends, which vectorise."""
    return x0 if offset == 0 else (x1 if offset == 1 else (x2 if offset == 2 else x3))


@njit(inline="always")
def _add_bias(out, bias):  # pragma: no cover - compiled
    """``out (M, c) += bias (c,)``, row by row: the bias is added last, as the contract says."""
    for i in range(out.shape[0]):
        yi = out[i]
        for j in range(bias.size):
            yi[j] += bias[j]


@njit(inline="always")
def _pick3(offset, x0, x1, x2):  # pragma: no cover - compiled
    """The input of three that ``offset`` (0..2) names."""
    return x0 if offset == 0 else (x1 if offset == 1 else x2)


@njit(cache=True, nogil=True)
def _nm4(x, values, offsets, n, bias, has_bias, start, stop, out):  # pragma: no cover - compiled
    """m = 4: per slot, the group's four inputs of each row, blended by the offsets; four rows per pass."""
    rows = x.shape[0]
    slots = values.shape[0]
    out[:] = 0.0
    i = 0
    while i + 4 <= rows:
        y0, y1, y2, y3 = out[i], out[i + 1], out[i + 2], out[i + 3]
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for s in range(slots):
            b = (s // n) * 4
            a0, a1, a2, a3 = x0[b], x0[b + 1], x0[b + 2], x0[b + 3]
            c0, c1, c2, c3 = x1[b], x1[b + 1], x1[b + 2], x1[b + 3]
            d0, d1, d2, d3 = x2[b], x2[b + 1], x2[b + 2], x2[b + 3]
            e0, e1, e2, e3 = x3[b], x3[b + 1], x3[b + 2], x3[b + 3]
            v, o = values[s, start:stop], offsets[s, start:stop]  # contiguous: the loop below vectorises
            for j in range(stop - start):
                oj, vj = o[j], v[j]
                y0[j] += vj * _pick(oj, a0, a1, a2, a3)
                y1[j] += vj * _pick(oj, c0, c1, c2, c3)
                y2[j] += vj * _pick(oj, d0, d1, d2, d3)
                y3[j] += vj * _pick(oj, e0, e1, e2, e3)
        i += 4
    while i < rows:
        y0, x0 = out[i], x[i]
        for s in range(slots):
            b = (s // n) * 4
            a0, a1, a2, a3 = x0[b], x0[b + 1], x0[b + 2], x0[b + 3]
            v, o = values[s, start:stop], offsets[s, start:stop]
            for j in range(stop - start):
                y0[j] += v[j] * _pick(o[j], a0, a1, a2, a3)
        i += 1
    if has_bias:
        _add_bias(out, bias[start:stop])


@njit(inline="always")
def _add_row24(x0, values, offsets, start, stop, y0):  # pragma: no cover - compiled
    """``y0 += x0 W[start:stop]^T`` at 2:4 for one row, group by group (both slots per pass over the outputs)."""
    for g in range(values.shape[0] // 2):
        b = 4 * g
        a0, a1, a2, a3 = x0[b], x0[b + 1], x0[b + 2], x0[b + 3]
        v, o = values[2 * g, start:stop], offsets[2 * g, start:stop]
        w, p = values[2 * g + 1, start:stop], offsets[2 * g + 1, start:stop]
        for j in range(stop - start):
            y0[j] = (y0[j] + v[j] * _pick3(o[j], a0, a1, a2)) + w[j] * _pick3(p[j] - 1, a1, a2, a3)


@njit(cache=True, nogil=True)
def _nm24(x, values, offsets, bias, has_bias, start, stop, out):  # pragma: no cover - compiled
    """2:4 with offsets ascending in each group (:func:`prepare_nm`): slot 0 of a group is column 0, 1 or 2 and
    slot 1 is column 1, 2 or 3, so each pick is two blends; one pass per group (both slots), four rows per pass."""
    out[:] = 0.0
    groups = values.shape[0] // 2
    full = x.shape[0] - x.shape[0] % 4  # rows in blocks of four, then one by one
    for i in range(0, full, 4):
        y0, y1, y2, y3 = out[i], out[i + 1], out[i + 2], out[i + 3]
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for g in range(groups):
            b = 4 * g
            a0, a1, a2, a3 = x0[b], x0[b + 1], x0[b + 2], x0[b + 3]
            c0, c1, c2, c3 = x1[b], x1[b + 1], x1[b + 2], x1[b + 3]
            d0, d1, d2, d3 = x2[b], x2[b + 1], x2[b + 2], x2[b + 3]
            e0, e1, e2, e3 = x3[b], x3[b + 1], x3[b + 2], x3[b + 3]
            v, o = values[2 * g, start:stop], offsets[2 * g, start:stop]  # contiguous: the loop vectorises
            w, p = values[2 * g + 1, start:stop], offsets[2 * g + 1, start:stop]
            for j in range(stop - start):
                oj, vj, pj, wj = o[j], v[j], p[j], w[j]
                y0[j] = (y0[j] + vj * _pick3(oj, a0, a1, a2)) + wj * _pick3(pj - 1, a1, a2, a3)
                y1[j] = (y1[j] + vj * _pick3(oj, c0, c1, c2)) + wj * _pick3(pj - 1, c1, c2, c3)
                y2[j] = (y2[j] + vj * _pick3(oj, d0, d1, d2)) + wj * _pick3(pj - 1, d1, d2, d3)
                y3[j] = (y3[j] + vj * _pick3(oj, e0, e1, e2)) + wj * _pick3(pj - 1, e1, e2, e3)
    for i in range(full, x.shape[0]):
        _add_row24(x[i], values, offsets, start, stop, out[i])
    if has_bias:
        _add_bias(out, bias[start:stop])


@njit(cache=True, nogil=True)
def _nm24_row(x, values, offsets, bias, has_bias, start, stop, out):  # pragma: no cover - compiled
    """2:4 for one row of inputs: ``x`` and ``out`` C-contiguous of any shape holding ``K`` and ``stop - start``
    values (a layer's ``(1, 1, K)`` input and output as they come, no reshape in Python). Per output, the sum and
    its order are those of :func:`_nm24` (both slots of a group per pass, +0.0 first, the bias last)."""
    y = out.reshape(1, out.size)
    y[:] = 0.0
    _add_row24(x.reshape(x.size), values, offsets, start, stop, y[0])
    if has_bias:
        _add_bias(y, bias[start:stop])


@njit(cache=True, nogil=True)
def _nm_any(x, values, offsets, n, m, bias, has_bias, start, stop, out):  # pragma: no cover - compiled
    """Any m: per slot and row, the input of each output read at its group's start plus its offset."""
    rows = x.shape[0]
    slots = values.shape[0]
    out[:] = 0.0
    for i in range(rows):
        yi = out[i]
        for s in range(slots):
            group = x[i, (s // n) * m:(s // n) * m + m]
            v, o = values[s, start:stop], offsets[s, start:stop]
            for j in range(stop - start):
                yi[j] += v[j] * group[o[j]]
    if has_bias:
        _add_bias(out, bias[start:stop])


_NO_BIAS = np.zeros(0, np.float32)


def nm_row_kernel(weight: NMWeight) -> Callable | None:
    """The compiled one-row kernel for ``weight`` (2:4 only; None for other n:m), for a caller that calls it per
    token and has checked everything itself: ``kernel(x, values, offsets, bias, has_bias, start, stop, out)`` with
    ``x`` float32 C-contiguous of any shape holding one row of ``K`` inputs, ``out`` float32 C-contiguous of any
    shape holding ``stop - start`` outputs (written whole), ``bias`` float32 ``(N,)`` (any when ``has_bias`` is
    false). Bit-identical to :func:`nm_linear` (and so to :func:`nm_linear_reference`) on that row; it saves
    :func:`nm_linear`'s reshapes and look-ups, which at batch 1 cost more than the product.

    >>> w = prepare_nm(NMMatrix.from_dense(np.array([[1, 0, 0, 2], [0, 3, 4, 0]], np.float32), 2, 4))
    >>> x, out = np.ones((1, 1, 4), np.float32), np.empty((1, 1, 2), np.float32)
    >>> nm_row_kernel(w)(x, w.values, w.offsets, np.zeros(2, np.float32), False, 0, 2, out); out.tolist()
    [[[3.0, 7.0]]]
    """
    if not isinstance(weight, NMWeight):
        raise TypeError(f"nm_row_kernel: weight must be an NMWeight (from prepare_nm), got {type(weight).__name__}")
    return _nm24_row if (weight.n, weight.m) == (2, 4) else None


def nm_linear(x: np.ndarray, weight: NMWeight, bias: np.ndarray | None = None, rows: tuple[int, int] | None = None,
              validate: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Outputs ``rows = (start, stop)`` (default all) of ``x (M, K) W^T + b`` for the prepared N:M ``weight``
    (Numba, any CPU; bit-identical to :func:`nm_linear_reference`), written into ``out`` (float32, C-contiguous
    ``(M, stop - start)``) when given, else into a new array. ``validate=False`` skips the argument checks, for a
    caller that made ``weight`` and checked ``x``, ``bias``, ``rows`` and ``out`` itself (a layer, once per token;
    an execution plan's step).

    >>> w = prepare_nm(NMMatrix.from_dense(np.array([[1, 0, 0, 2], [0, 3, 4, 0]], np.float32), 1, 2))
    >>> nm_linear(np.ones((2, 4), np.float32), w, rows=(1, 2)).tolist()
    [[7.0], [7.0]]
    """
    if validate:
        start, stop = _check_call(x, weight, bias, rows)
    else:
        start, stop = (0, weight.out_features) if rows is None else rows
    x = np.ascontiguousarray(x)
    if out is None:
        out = np.empty((x.shape[0], stop - start), np.float32)
    elif validate and (not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous
                       or out.shape != (x.shape[0], stop - start)):
        raise ValueError(f"nm_linear: out must be a C-contiguous float32 array {(x.shape[0], stop - start)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    b = _NO_BIAS if bias is None else bias
    if weight.m == 4 and weight.n == 2:
        _nm24(x, weight.values, weight.offsets, b, bias is not None, start, stop, out)
    elif weight.m == 4:
        _nm4(x, weight.values, weight.offsets, weight.n, b, bias is not None, start, stop, out)
    else:
        _nm_any(x, weight.values, weight.offsets, weight.n, weight.m, b, bias is not None, start, stop, out)
    return out
