"""A causal softmax over attention scores in place, with NumPy's bits: two Numba passes around NumPy's ``np.exp``.

:func:`nanoopt.ops_transformer.attention_forward` takes the softmax of ``s Q K^T + M`` (Vaswani et al. 2017, eq. 1)
with the causal mask ``M`` (0 where query ``i`` may see key ``j``, i.e. ``j <= i + offset``; -inf elsewhere) in
seven NumPy passes over the (..., L, S) scores, two of them reductions over short rows, which cost more than the
two matrix products around them at a GPT's window sizes. Here, for each row::

    pass 1:  v_j = (s_j * scale) + 0   for j <= i + offset,  -inf beyond;   s_j = v_j - max_j v_j
    np.exp(s, out=s)                                          (NumPy's own float32 exp, so its bits)
    pass 2:  s_j = s_j / sum_j s_j                            (the sum in NumPy's pairwise order)

which are NumPy's operations in NumPy's order: float32 products and sums (no fused multiply-add: Numba does not
contract without ``fastmath``), the maximum (exact in any order), and the row sum over the whole row, masked zeros
included, by :func:`~nanoopt.float_kernels.softmax.pairwise_sum` (NumPy's pairwise summation). So the result is
``attention_forward``'s softmax bit for bit (:func:`causal_softmax_reference` is that NumPy sequence; the tests
check both). Every row must see at least one key (``offset >= 0``), as under a causal mask.

>>> s = np.array([[[0.0, 9.0], [1.0, 1.0]]], np.float32)
>>> causal_softmax_(s.copy(), scale=1.0, offset=0).tolist()
[[[1.0, 0.0], [0.5, 0.5]]]
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.float_kernels.softmax import pairwise_sum

__all__ = ["causal_normalise_rows", "causal_shift_rows", "causal_softmax_", "causal_softmax_reference"]


def causal_softmax_reference(scores: np.ndarray, scale: float, offset: int) -> np.ndarray:
    """The specification: ``softmax(scores * scale + M)`` over the last axis by NumPy's operations (a new array),
    ``M`` 0 on ``j <= i + offset`` and -inf above.

    >>> causal_softmax_reference(np.zeros((2, 2), np.float32), 1.0, 0).tolist()
    [[1.0, 0.0], [0.5, 0.5]]
    """
    length, keys = scores.shape[-2:]
    mask = np.triu(np.full((length, keys), -np.inf, np.float32), k=offset + 1)
    out = scores * np.asarray(scale, dtype=np.float32)
    out += mask
    out -= out.max(axis=-1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz"})
def _peak(row, count):  # pragma: no cover - compiled
    """``max(row[:count])`` (``count >= 1``). The flags only let the loop run on vectors: the maximum of numbers is
    exact in any order, and a NaN anywhere in the row makes every output NaN whichever maximum is found."""
    peak = row[0]
    for j in range(1, count):
        peak = max(peak, row[j])
    return peak


@numba.njit(cache=True, nogil=True)
def causal_shift_rows(rows, length, scale, offset):  # pragma: no cover - compiled
    """Pass 1 of :func:`causal_softmax_` on ``rows (R, S)`` (row ``r`` is query ``r % length``; ``scale`` float32),
    without its checks: for a caller that checked its operands once."""
    keys = rows.shape[1]
    zero = np.float32(0.0)
    for r in range(rows.shape[0]):
        row = rows[r]
        seen = min(keys, r % length + offset + 1)
        for j in range(seen):
            row[j] = row[j] * scale + zero
        peak = _peak(row, seen)
        for j in range(seen):
            row[j] = row[j] - peak
        for j in range(seen, keys):
            row[j] = np.float32(-np.inf)


@numba.njit(cache=True, nogil=True)
def causal_normalise_rows(rows):  # pragma: no cover - compiled
    """Pass 2 of :func:`causal_softmax_` on ``rows (R, S)``: each row divided by its sum (NumPy's pairwise order,
    started from 0), without its checks."""
    keys = rows.shape[1]
    for r in range(rows.shape[0]):
        row = rows[r]
        total = np.float32(0.0) + pairwise_sum(row, 0, keys)
        for j in range(keys):
            row[j] = row[j] / total


def causal_softmax_(scores: np.ndarray, scale: float, offset: int) -> np.ndarray:
    """``softmax(scores * scale + M)`` over the last axis of C-contiguous float32 ``scores (..., L, S)`` in place
    (``M``: 0 where key ``j <= i + offset`` for query ``i``, -inf elsewhere; ``offset = S - L`` for queries that
    continue a cache, ``S`` or more for no mask); equals :func:`causal_softmax_reference` bit for bit.

    >>> causal_softmax_(np.zeros((1, 3), np.float32), scale=0.5, offset=3).tolist()
    [[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]
    """
    if (not isinstance(scores, np.ndarray) or scores.dtype != np.float32 or scores.ndim < 2
            or not scores.flags.c_contiguous or scores.size == 0):
        raise TypeError(f"causal_softmax_: expected a non-empty C-contiguous float32 array (..., L, S), got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)} {getattr(scores, 'shape', '')}")
    if offset < 0:
        raise ValueError(f"causal_softmax_: offset must be >= 0 (every query sees a key), got {offset}")
    length, keys = scores.shape[-2:]
    rows = scores.reshape(-1, keys)
    causal_shift_rows(rows, length, np.float32(scale), offset)
    np.exp(scores, out=scores)
    causal_normalise_rows(rows)
    return scores
