"""Float32 LayerNorm over the last axis, row by row: a Numba kernel bit-identical to :class:`nanoopt.ops.LayerNorm`.

For each row ``x`` of ``n`` values (Ba et al. 2016, biased variance)::

    mean = sum(x) / n,  var = sum((x - mean)^2) / n,  y = ((x - mean) * (1 / sqrt(var + eps))) * weight + bias,

every operation in float32 and every sum in NumPy's pairwise order (:func:`~nanoopt.kernels.softmax.pairwise_sum`),
as NumPy's ``x.mean`` and ``x.var`` over the last axis compute them -- so the kernel returns the bits of
``ops.LayerNorm.forward`` with one normalised axis (:func:`layer_norm_reference` is that formula; a hypothesis
test checks both). It exists for the no-grad window recompute of :meth:`nanoopt.models_gpt.GPT.generate`, where
NumPy's seven passes per call over a (64, 128) window cost as much as a quarter of a projection; the training
path keeps the NumPy operator (it also saves the normalised input and ``1/std`` for the backward pass).

>>> x = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
>>> w, b = np.ones(4, np.float32), np.zeros(4, np.float32)
>>> bool((layer_norm_rows(x, w, b, 1e-5) == layer_norm_reference(x, w, b, 1e-5)).all())
True
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.float_kernels.softmax import pairwise_sum

__all__ = ["layer_norm_reference", "layer_norm_row", "layer_norm_rows", "layer_norm_rows_into"]


def layer_norm_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm of float32 ``x`` over its last axis, as :class:`nanoopt.ops.LayerNorm` computes it (the spec).

    >>> layer_norm_reference(np.array([[0.0, 2.0]], np.float32), np.ones(2, np.float32), np.zeros(2, np.float32),
    ...                      0.0).tolist()
    [[-1.0, 1.0]]
    """
    mean = x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    return ((x - mean) * inv_std).astype(x.dtype) * weight + bias


@numba.njit(cache=True, nogil=True)
def layer_norm_row(x, weight, bias, eps, out):  # pragma: no cover - compiled
    """``out = (x - mean) / sqrt(var + eps) * weight + bias`` of one float32 row, as :class:`nanoopt.ops.LayerNorm`
    computes it (also a step of :mod:`nanoopt.kernels.gpt_decode`)."""
    n = x.size
    count = np.float32(n)
    mean = (np.float32(0.0) + pairwise_sum(x, 0, n)) / count  # NumPy's reduction starts from its identity, 0
    for i in range(n):
        out[i] = (x[i] - mean) * (x[i] - mean)
    var = (np.float32(0.0) + pairwise_sum(out, 0, n)) / count
    inv_std = np.float32(1.0) / np.sqrt(var + eps)
    for i in range(n):
        out[i] = ((x[i] - mean) * inv_std) * weight[i] + bias[i]


@numba.njit(cache=True, nogil=True)
def layer_norm_rows_into(x, weight, bias, eps, out):  # pragma: no cover - compiled
    """:func:`layer_norm_row` on every row, by phases over all rows (every mean, then every ``1/std``, then the
    outputs): the same operations per row, but each row's chain of dependent sums no longer waits for the row
    before, so the CPU overlaps them (a (64, 128) window: 5.0 against 6.7 us row by row). The compiled pass of
    :func:`layer_norm_rows` without its checks (2-D C arrays, ``eps`` float32): for a caller that checked its
    operands once (the GPT window of :class:`nanoopt.models_gpt.GPT`)."""
    rows, n = x.shape
    count = np.float32(n)
    means = np.empty(rows, np.float32)
    for r in range(rows):
        means[r] = (np.float32(0.0) + pairwise_sum(x[r], 0, n)) / count
    inv_stds = np.empty(rows, np.float32)
    for r in range(rows):
        row, target, mean = x[r], out[r], means[r]
        for i in range(n):
            target[i] = (row[i] - mean) * (row[i] - mean)
        var = (np.float32(0.0) + pairwise_sum(target, 0, n)) / count
        inv_stds[r] = np.float32(1.0) / np.sqrt(var + eps)
    for r in range(rows):
        row, target, mean, inv_std = x[r], out[r], means[r], inv_stds[r]
        for i in range(n):
            target[i] = ((row[i] - mean) * inv_std) * weight[i] + bias[i]


def layer_norm_rows(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                    out: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm of float32 ``x (..., n)`` over its last axis with float32 ``weight``, ``bias`` (n,), by the Numba
    kernel, into ``out`` (a new array if None); equals :func:`layer_norm_reference` bit for bit.

    >>> layer_norm_rows(np.array([2.0, 4.0], np.float32), np.ones(2, np.float32), np.ones(2, np.float32),
    ...                 0.0).tolist()
    [0.0, 2.0]
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1:
        raise TypeError(f"layer_norm_rows: x must be a float32 array of at least 1 dimension, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")
    n = x.shape[-1]
    for name, value in (("weight", weight), ("bias", bias)):
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != (n,):
            raise ValueError(f"layer_norm_rows: {name} must be float32 of shape ({n},), got "
                             f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', None)}")
    if out is None:
        out = np.empty(x.shape, np.float32)
    elif out.shape != x.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"layer_norm_rows: out must be a C-contiguous float32 array of shape {x.shape}, got "
                         f"{out.dtype} {out.shape}")
    rows = np.ascontiguousarray(x).reshape(-1, n)
    layer_norm_rows_into(rows, np.ascontiguousarray(weight), np.ascontiguousarray(bias), np.float32(eps),
                     out.reshape(-1, n))
    return out
