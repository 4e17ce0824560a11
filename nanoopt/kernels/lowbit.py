"""``y = x W^T + b`` with ``W`` stored as low-bit codes and a scale (and zero point) per group: weight-only GEMM for
few rows (token-by-token generation), reading the packed codes once per call.

The stored format is group-wise W4A16 as GPTQ and AWQ use it (Frantar et al. 2022, Lin et al. 2023) and as
:class:`nanoopt.quant.dynamic.WeightOnlyLinear` stores it: integer codes ``q (N, K)`` of an ``N x K`` weight, a
float32 scale ``s (N, G)`` and optionally an int8 zero point ``z (N, G)`` per group of ``group_size`` consecutive
inputs of a row (the last group of a row may be shorter), ``W[n, k] = s[n, g] (q[n, k] - z[n, g])`` with
``g = k // group_size``.

:func:`prepare_lowbit` lays the codes out once for the kernel (as :func:`nanoopt.kernels.prepare_weights` does for
the int8 GEMM): the codes of 2..4 bits transposed to ``(K, N)`` and packed two per byte exactly as
:func:`nanoopt.quant.packing.pack_int4` packs them (output ``2j`` in the low nibble of byte ``j`` of an input row,
``2j + 1`` in the high nibble; an odd ``N`` is padded with a zero code), 5..8 bits as int8 ``(K, N)``; scales and
zero points as ``(G, N)``. So each call streams the packed bytes once, input by input, and updates all outputs
with vector instructions (no horizontal sums, any ``K``, ``N`` and group size).

Arithmetic (float32 throughout, every operation rounded to float32, no fused multiply-add; the NumPy reference
:func:`lowbit_linear_reference` is the specification and the Numba kernel equals it bit for bit):

.. math::

    t_{m,n,g} = \\sum_{k \\in g} x_{m,k} \\, (q_{n,k} - z_{n,g}) \\quad (\\text{in increasing } k, \\text{ from } 0),
    \\qquad
    y_{m,n} = \\Big(\\sum_{g} s_{n,g} \\, t_{m,n,g}\\Big) + b_n \\quad (\\text{in increasing } g, \\text{ from } 0)

``q - z`` is an exact small integer in float32, so this is the dequantized product ``x W^T`` with the group scale
applied once per group instead of once per weight (the same value up to float32 rounding).

>>> import numpy as np
>>> codes = np.array([[1, -2, 3], [4, 0, -1]], np.int8)           # W (2, 3), 4-bit codes, one group per row
>>> weight = prepare_lowbit(codes, np.array([[0.5], [0.25]], np.float32), None, group_size=3, bits=4)
>>> x = np.array([[1.0, 2.0, 3.0]], np.float32)
>>> lowbit_linear_reference(x, weight, None).tolist(), lowbit_linear(x, weight, np.ones(2, np.float32)).tolist()
([[3.0, 0.25]], [[4.0, 1.25]])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

__all__ = ["LowBitWeight", "lowbit_linear", "lowbit_linear_reference", "prepare_lowbit"]


class LowBitWeight(NamedTuple):
    """A low-bit weight laid out for :func:`lowbit_linear` (made by :func:`prepare_lowbit`)."""

    codes: np.ndarray  # packed: uint8 (K, C = ceil(N / 2)), output 2j | 2j+1 in the low | high nibble; else int8 (K, N)
    scale: np.ndarray  # float32 (G, 2, C): [g, p, j] of output 2j + p (packed; padding scale 0), else (G, 1, N)
    offset: np.ndarray  # float32, as scale: subtracted from float32(decoded nibble or code) (prepare_lowbit)
    out_features: int  # N
    in_features: int  # K
    group_size: int
    packed: bool


def prepare_lowbit(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, group_size: int,
                   bits: int) -> LowBitWeight:
    """Lay out integer ``codes (N, K)`` (int8, within ``bits``), ``scale (N, G)`` and ``zero_point (N, G)`` or
    None for :func:`lowbit_linear` (see the module docstring).

    The kernel decodes a nibble ``v`` (0..15) as ``float32(v ^ 8) = q + 8`` (two's complement plus 8), so the packed
    layout stores ``offset = 8 + z``; the int8 layout stores ``offset = z``. Both are exact integers in float32.

    >>> w = prepare_lowbit(np.array([[1, -1, 2]], np.int8), np.ones((1, 1), np.float32), None, 3, 4)
    >>> w.codes.shape, w.offset.tolist()
    ((3, 1), [[[8.0], [8.0]]])
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"prepare_lowbit: bits must be an int in [2, 8], got {bits!r}")
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int8 or codes.ndim != 2:
        raise ValueError(f"prepare_lowbit: codes must be an int8 array (N, K), got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {getattr(codes, 'shape', '')}")
    n, k = codes.shape
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"prepare_lowbit: group_size must be a positive int, got {group_size!r}")
    groups = -(-k // group_size)
    scale = np.asarray(scale)
    if scale.shape != (n, groups):
        raise ValueError(f"prepare_lowbit: scale must have shape {(n, groups)} (outputs, groups of {group_size}), "
                         f"got {scale.shape}")
    if zero_point is not None and np.shape(zero_point) != (n, groups):
        raise ValueError(f"prepare_lowbit: zero_point must have shape {(n, groups)}, got {np.shape(zero_point)}")
    zeros = np.zeros((n, groups), np.float32) if zero_point is None else np.asarray(zero_point, np.float32)
    packed = bits <= 4
    if packed:
        if codes.size and (codes.min() < -8 or codes.max() > 7):
            raise ValueError(f"prepare_lowbit: {bits}-bit codes must lie in [-8, 7], got range "
                             f"[{codes.min()}, {codes.max()}]")
        columns = -(-n // 2)
        nibbles = np.zeros((k, 2 * columns), np.uint8)
        nibbles[:, :n] = codes.T.astype(np.uint8) & 0x0F  # two's complement nibbles, as pack_int4 stores them
        layout = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)  # (K, columns): output 2j low, 2j + 1 high
        planes = np.zeros((groups, 2 * columns), np.float32), np.full((groups, 2 * columns), 8.0, np.float32)
        planes[0][:, :n], planes[1][:, :n] = scale.T, 8.0 + zeros.T
        scale_t, offset_t = (plane.reshape(groups, columns, 2).transpose(0, 2, 1) for plane in planes)
    else:
        layout, scale_t, offset_t = codes.T, scale.T[:, None, :], zeros.T[:, None, :]
    return LowBitWeight(np.ascontiguousarray(layout), np.ascontiguousarray(scale_t, np.float32),
                        np.ascontiguousarray(offset_t, np.float32), n, k, int(group_size), packed)


def _check_call(x: np.ndarray, weight: LowBitWeight, bias: np.ndarray | None,
                rows: tuple[int, int] | None) -> tuple[int, int]:
    if not isinstance(weight, LowBitWeight):
        raise TypeError(f"lowbit_linear: weight must be a LowBitWeight (from prepare_lowbit), got "
                        f"{type(weight).__name__}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"lowbit_linear: x must be a float32 array (M, {weight.in_features}), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n = weight.out_features
    if bias is not None and (not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (n,)):
        raise ValueError(f"lowbit_linear: bias must be float32 ({n},), got {getattr(bias, 'dtype', type(bias))} "
                         f"{getattr(bias, 'shape', '')}")
    start, stop = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= start <= stop <= n:
        raise ValueError(f"lowbit_linear: rows must satisfy 0 <= start <= stop <= {n}, got {rows}")
    return start, stop


def _columns(weight: LowBitWeight, start: int, stop: int) -> tuple[int, int]:
    """The stored columns (bytes of a packed row, or codes) that hold outputs ``start..stop-1``."""
    return (start // 2, (stop + 1) // 2) if weight.packed else (start, stop)


def _finish(y: np.ndarray, weight: LowBitWeight, start: int, stop: int, bias: np.ndarray | None) -> np.ndarray:
    """``y (M, planes, columns)`` -> outputs ``start..stop-1`` ``(M, stop - start)``, plus the bias."""
    m = y.shape[0]
    flat = y.transpose(0, 2, 1).reshape(m, y.shape[1] * y.shape[2])  # packed: plane 0 = even outputs, 1 = odd
    first = 2 * (start // 2) if weight.packed else start
    out = np.ascontiguousarray(flat[:, start - first:stop - first])
    if bias is not None:
        out += bias[start:stop]
    return out


def lowbit_linear_reference(x: np.ndarray, weight: LowBitWeight, bias: np.ndarray | None,
                            rows: tuple[int, int] | None = None) -> np.ndarray:
    """The specification (pure NumPy) of :func:`lowbit_linear`: outputs ``rows = (start, stop)`` (default all) of
    ``x (M, K) W^T + b``, float32 ``(M, stop - start)``, in the order of the module docstring.

    >>> codes = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    >>> w = prepare_lowbit(codes, np.full((2, 2), 0.5, np.float32), None, group_size=4, bits=4)
    >>> lowbit_linear_reference(np.ones((1, 8), np.float32), w, None).tolist()
    [[-18.0, 14.0]]
    """
    start, stop = _check_call(x, weight, bias, rows)
    first, last = _columns(weight, start, stop)
    if weight.packed:
        stored = weight.codes[:, first:last].astype(np.int32)  # (K, C) bytes
        planes = np.stack([stored & 15, stored >> 4], axis=1) ^ 8  # (K, 2, C): q + 8 of outputs 2j and 2j + 1
    else:
        planes = weight.codes[:, None, first:last].astype(np.int32)  # (K, 1, C)
    offset, scale = weight.offset[:, :, first:last], weight.scale[:, :, first:last]  # (G, planes, C)
    m = x.shape[0]
    y = np.zeros((m,) + planes.shape[1:], np.float32)  # (M, planes, C)
    for g in range(scale.shape[0]):
        t = np.zeros_like(y)
        for k in range(g * weight.group_size, min((g + 1) * weight.group_size, weight.in_features)):
            centred = planes[k].astype(np.float32) - offset[g]  # q - z, exact
            t += x[:, k, None, None] * centred
        y += scale[g] * t
    return _finish(y, weight, start, stop, bias)


@njit(cache=True, nogil=True)
def _interleave(y, bias, has_bias, start, stop, first, planes):  # pragma: no cover - compiled
    """``y (M, planes, C)`` -> outputs ``start..stop-1`` (output ``planes * (first + j) + p`` is ``y[:, p, j]``),
    plus the bias."""
    m = y.shape[0]
    out = np.empty((m, stop - start), np.float32)
    for i in range(m):
        for n in range(start, stop):
            column = n // planes - first
            value = y[i, n - planes * (n // planes), column]
            if has_bias:
                value += bias[n]
            out[i, n - start] = value
    return out


@njit(cache=True, nogil=True, inline="always")
def _close_group(y, t, scale):  # pragma: no cover
    """End of a group: ``y += scale * t`` per output (float32, in order), and ``t`` back to zero."""
    for j in range(y.shape[0]):
        y[j] += scale[j] * t[j]
        t[j] = np.float32(0.0)


@njit(cache=True, nogil=True)
def _lowbit_packed(x, codes, scale, offset, group_size, bias, has_bias, start, stop):  # pragma: no cover
    m, depth = x.shape
    first, last = start // 2, (stop + 1) // 2
    c = last - first
    y = np.zeros((m, 2, c), np.float32)
    t = np.zeros((m, 2, c), np.float32)
    low = np.empty(c if m != 1 else 0, np.float32)  # (one row needs no buffers)
    high = np.empty(c if m != 1 else 0, np.float32)
    for g in range(scale.shape[0]):
        off_low, off_high = offset[g, 0, first:last], offset[g, 1, first:last]
        for k in range(g * group_size, min((g + 1) * group_size, depth)):
            row = codes[k, first:last]  # a contiguous slice: the loops below vectorize
            if m == 1:  # one row (generation): decode and accumulate in one pass, the same operations
                xi = x[0, k]
                t_low, t_high = t[0, 0], t[0, 1]
                for j in range(c):
                    t_low[j] += xi * (np.float32((np.int32(row[j]) & 15) ^ 8) - off_low[j])
                for j in range(c):
                    t_high[j] += xi * (np.float32((np.int32(row[j]) >> 4) ^ 8) - off_high[j])
                continue
            for j in range(c):
                low[j] = np.float32((np.int32(row[j]) & 15) ^ 8) - off_low[j]
            for j in range(c):
                high[j] = np.float32((np.int32(row[j]) >> 4) ^ 8) - off_high[j]
            for i in range(m):
                xi = x[i, k]
                t_low, t_high = t[i, 0], t[i, 1]
                for j in range(c):
                    t_low[j] += xi * low[j]
                for j in range(c):
                    t_high[j] += xi * high[j]
        for i in range(m):
            for p in range(2):
                _close_group(y[i, p], t[i, p], scale[g, p, first:last])
    return _interleave(y, bias, has_bias, start, stop, first, 2)


@njit(cache=True, nogil=True)
def _lowbit_int8(x, codes, scale, offset, group_size, bias, has_bias, start, stop):  # pragma: no cover
    m, depth = x.shape
    c = stop - start
    y = np.zeros((m, 1, c), np.float32)
    t = np.zeros((m, 1, c), np.float32)
    centred = np.empty(c, np.float32)
    for g in range(scale.shape[0]):
        off = offset[g, 0, start:stop]
        for k in range(g * group_size, min((g + 1) * group_size, depth)):
            row = codes[k, start:stop]
            for j in range(c):
                centred[j] = np.float32(row[j]) - off[j]
            for i in range(m):
                xi = x[i, k]
                tp = t[i, 0]
                for j in range(c):
                    tp[j] += xi * centred[j]
        for i in range(m):
            _close_group(y[i, 0], t[i, 0], scale[g, 0, start:stop])
    return _interleave(y, bias, has_bias, start, stop, start, 1)


@njit(cache=True, nogil=True)
def _lowbit_packed_row(x, codes, scale, offset, group_size, bias, has_bias, start, stop):  # pragma: no cover
    """One row ``x (K,)`` (a GEMV, token-by-token generation): :func:`_lowbit_packed` with ``M = 1``, the same
    operations in the same order per output (``t`` of a group summed over increasing ``k`` from 0, then ``y`` over
    increasing groups, then the bias) on one-dimensional buffers, the result written interleaved with its bias in
    one pass. (Fusing the two nibble loops stops LLVM vectorizing them; four inputs per pass gain nothing over two.)"""
    depth = x.shape[0]
    first, last = start // 2, (stop + 1) // 2
    c = last - first
    y_low, y_high = np.zeros(c, np.float32), np.zeros(c, np.float32)
    t_low, t_high = np.zeros(c, np.float32), np.zeros(c, np.float32)
    for g in range(scale.shape[0]):
        off_low, off_high = offset[g, 0, first:last], offset[g, 1, first:last]
        k, end = g * group_size, min((g + 1) * group_size, depth)
        while k + 2 <= end:  # two inputs per pass: t is loaded and stored half as often, in the same order
            x0, x1, r0, r1 = x[k], x[k + 1], codes[k, first:last], codes[k + 1, first:last]
            for j in range(c):
                o = off_low[j]
                t0 = t_low[j] + x0 * (np.float32((np.int32(r0[j]) & 15) ^ 8) - o)
                t_low[j] = t0 + x1 * (np.float32((np.int32(r1[j]) & 15) ^ 8) - o)
            for j in range(c):
                o = off_high[j]
                t0 = t_high[j] + x0 * (np.float32((np.int32(r0[j]) >> 4) ^ 8) - o)
                t_high[j] = t0 + x1 * (np.float32((np.int32(r1[j]) >> 4) ^ 8) - o)
            k += 2
        if k < end:
            row, xi = codes[k, first:last], x[k]
            for j in range(c):
                t_low[j] += xi * (np.float32((np.int32(row[j]) & 15) ^ 8) - off_low[j])
            for j in range(c):
                t_high[j] += xi * (np.float32((np.int32(row[j]) >> 4) ^ 8) - off_high[j])
        s_low, s_high = scale[g, 0, first:last], scale[g, 1, first:last]
        for j in range(c):
            y_low[j] += s_low[j] * t_low[j]
            t_low[j] = np.float32(0.0)
        for j in range(c):
            y_high[j] += s_high[j] * t_high[j]
            t_high[j] = np.float32(0.0)
    out = np.empty((1, stop - start), np.float32)
    for n in range(start, stop):
        value = y_high[n // 2 - first] if n & 1 else y_low[n // 2 - first]
        if has_bias:
            value += bias[n]
        out[0, n - start] = value
    return out


_NO_BIAS = np.zeros(0, np.float32)


def lowbit_linear(x: np.ndarray, weight: LowBitWeight, bias: np.ndarray | None,
                  rows: tuple[int, int] | None = None, validate: bool = True) -> np.ndarray:
    """Outputs ``rows = (start, stop)`` (default all) of ``x (M, K) W^T + b`` from the prepared low-bit ``weight``
    (Numba; bit-identical to :func:`lowbit_linear_reference`). Made for few rows (``M`` of 1 in token-by-token
    generation, up to a few hundred), where streaming the packed codes once beats dequantizing them for BLAS.
    ``validate=False`` skips the argument checks, for a caller that made ``weight`` and checked ``x``, ``bias`` and
    ``rows`` itself (a layer's forward, once per generated token).

    >>> codes = np.array([[7, -7, 1, 0, 2]], np.int8)
    >>> w = prepare_lowbit(codes, np.full((1, 3), 0.5, np.float32), np.array([[1, 0, 0]], np.int8), 2, 4)
    >>> lowbit_linear(np.ones((2, 5), np.float32), w, None).tolist()
    [[0.5], [0.5]]
    """
    if validate:
        start, stop = _check_call(x, weight, bias, rows)
    else:
        start, stop = (0, weight.out_features) if rows is None else rows
    if weight.packed and x.shape[0] == 1:  # one row (generation): the GEMV variant, the same bits
        return _lowbit_packed_row(x[0] if x.flags.c_contiguous else np.ascontiguousarray(x[0]), weight.codes,
                                  weight.scale, weight.offset, weight.group_size, _NO_BIAS if bias is None else bias,
                                  bias is not None, start, stop)
    kernel = _lowbit_packed if weight.packed else _lowbit_int8
    return kernel(np.ascontiguousarray(x), weight.codes, weight.scale, weight.offset, weight.group_size,
                  _NO_BIAS if bias is None else bias, bias is not None, start, stop)
