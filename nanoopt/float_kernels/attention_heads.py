"""A fused projection epilogue for self-attention: the qkv bias added while the heads are laid out for attention.

Multi-head self-attention (Vaswani et al. 2017, sec. 3.2.2) projects each position ``t`` of ``x (B, T, C)`` to
``qkv[b, t] = x[b, t] W + bias``, a row of ``3 C`` values ``[q | k | v]``, each of ``H`` heads of ``D = C / H``
values, and attends per head over ``(B, H, T, D)`` arrays. In NumPy that is an addition over the ``(B T, 3C)``
product and a strided copy of its transposed view::

    heads = (qkv + bias).reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)     # (3, B, H, T, D), then copied

:func:`qkv_heads` does both in one pass over the product (each output element is the same float32 sum
``qkv + bias``, so the same bits as that reference, :func:`qkv_heads_reference`). For the no-grad window recompute
of :meth:`nanoopt.models_gpt.GPT.generate`, where the two NumPy passes cost a third of the attention's products.

>>> qkv = np.arange(12, dtype=np.float32).reshape(1, 2, 6)      # B=1, T=2, C=2: [q0 q1 | k0 k1 | v0 v1]
>>> qkv_heads(qkv, np.zeros(6, np.float32), heads=2)[1, 0, :, :, 0].tolist()   # k of both heads, both positions
[[2.0, 8.0], [3.0, 9.0]]
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.float_kernels.bias import checked_bias

__all__ = ["qkv_heads", "qkv_heads_into", "qkv_heads_panels_into", "qkv_heads_panels_reference", "qkv_heads_reference"]


def qkv_heads_reference(qkv: np.ndarray, bias: np.ndarray | None, heads: int) -> np.ndarray:
    """``(qkv + bias)`` of ``qkv (B, T, 3C)`` as a C-contiguous ``(3, B, H, T, D)`` array (the specification)."""
    b, t, three_c = qkv.shape
    summed = qkv + bias if bias is not None else qkv
    return np.ascontiguousarray(summed.reshape(b, t, 3, heads, three_c // (3 * heads)).transpose(2, 0, 3, 1, 4))


@numba.njit(cache=True, nogil=True)
def qkv_heads_into(qkv, bias, has_bias, out):  # pragma: no cover - compiled
    """``out[s, b, h, t, :] = qkv[b, t, s, h, :] + bias[s, h, :]`` (``qkv (B, T, 3, H, D)`` and ``bias (3, H, D)``
    split into heads; a copy where not ``has_bias``), the compiled pass of :func:`qkv_heads` without its checks:
    for a caller that checked its operands once (the GPT window of :class:`nanoopt.models_gpt.GPT`)."""
    parts, batch, heads, length, depth = out.shape
    for s in range(parts):
        for b in range(batch):
            for h in range(heads):
                added = bias[s, h]
                for t in range(length):
                    source, target = qkv[b, t, s, h], out[s, b, h, t]
                    if has_bias:
                        for d in range(depth):
                            target[d] = source[d] + added[d]
                    else:  # a copy (adding zeros would turn -0.0 into +0.0)
                        for d in range(depth):
                            target[d] = source[d]


def qkv_heads_panels_reference(qkv: np.ndarray, bias: np.ndarray | None, heads: int,
                               panel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(queries (H, T, D), key_panels (H, ceil(T / panel), D, panel), value_panels (H, ceil(D / panel), T,
    panel))`` of ``qkv (T, 3C) + bias`` at batch 1 (the specification of :func:`qkv_heads_panels_into`): ``K_h^T``
    and ``V_h`` cut into column panels, zeros past ``T`` and ``D``.

    >>> q, k, v = qkv_heads_panels_reference(np.arange(6, dtype=np.float32).reshape(1, 6), None, 1, 4)
    >>> q.tolist(), k[0, 0, :, 0].tolist(), v[0, 0, 0].tolist()
    ([[[0.0, 1.0]]], [2.0, 3.0], [4.0, 5.0, 0.0, 0.0])
    """
    length, three_c = qkv.shape
    depth = three_c // (3 * heads)
    parts = qkv_heads_reference(qkv[None], bias, heads)[:, 0]  # (3, H, T, D)
    key_panels = np.zeros((heads, -(-length // panel) * panel, depth), np.float32)
    key_panels[:, :length] = parts[1]
    value_panels = np.zeros((heads, length, -(-depth // panel) * panel), np.float32)
    value_panels[:, :, :depth] = parts[2]
    return (parts[0].copy(), key_panels.reshape(heads, -1, panel, depth).transpose(0, 1, 3, 2).copy(),
            value_panels.reshape(heads, length, -1, panel).transpose(0, 2, 1, 3).copy())


@numba.njit(cache=True, nogil=True)
def qkv_heads_panels_into(qkv, bias, has_bias, queries, key_panels, value_panels):  # pragma: no cover - compiled
    """:func:`qkv_heads_panels_reference` into preallocated arrays (``qkv (T, 3, H, D)``, ``bias (3, H, D)``; the
    panels' zero padding written too), for products by the packed register tiles of
    :mod:`nanoopt.kernels.float_gemm_avx2` (the keys as the "weights" of the scores, the values as those of the
    attention output). No checks: for a caller that checked its operands once."""
    length, _, heads, depth = qkv.shape
    panel = key_panels.shape[3]
    zero = np.float32(0.0)
    for h in range(heads):
        for t in range(length):  # queries: rows as they lie
            for d in range(depth):
                queries[h, t, d] = qkv[t, 0, h, d] + bias[0, h, d] if has_bias else qkv[t, 0, h, d]
        for p in range(key_panels.shape[1]):  # keys transposed: panel p holds keys p panel .. (p + 1) panel - 1
            for d in range(depth):
                target, added = key_panels[h, p, d], bias[1, h, d]
                for j in range(panel):
                    t = p * panel + j
                    if t < length:
                        target[j] = qkv[t, 1, h, d] + added if has_bias else qkv[t, 1, h, d]
                    else:
                        target[j] = zero
        for p in range(value_panels.shape[1]):  # values: panel p holds columns p panel .. (p + 1) panel - 1
            for t in range(length):
                target = value_panels[h, p, t]
                for j in range(panel):
                    d = p * panel + j
                    if d < depth:
                        target[j] = qkv[t, 2, h, d] + bias[2, h, d] if has_bias else qkv[t, 2, h, d]
                    else:
                        target[j] = zero


def qkv_heads(qkv: np.ndarray, bias: np.ndarray | None, heads: int) -> np.ndarray:
    """``qkv (B, T, 3C)`` plus ``bias (3C,)`` (or None) laid out as a new C-contiguous ``(3, B, H, T, D)`` float32
    array of queries, keys and values per head, in one pass; equals :func:`qkv_heads_reference` bit for bit.

    >>> qkv_heads(np.ones((1, 1, 6), np.float32), np.arange(6, dtype=np.float32), heads=1)[:, 0, 0, 0].tolist()
    [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    """
    if not isinstance(qkv, np.ndarray) or qkv.dtype != np.float32 or qkv.ndim != 3:
        raise TypeError(f"qkv_heads: qkv must be a float32 array (B, T, 3C), got "
                        f"{getattr(qkv, 'dtype', type(qkv).__name__)} {getattr(qkv, 'shape', '')}")
    b, t, three_c = qkv.shape
    if not isinstance(heads, int | np.integer) or heads < 1 or three_c % (3 * heads):
        raise ValueError(f"qkv_heads: the last axis ({three_c}) must be 3 * heads * head_dim with heads >= 1, got "
                         f"heads={heads}")
    bias, has_bias = checked_bias("qkv_heads", bias, three_c)
    depth = three_c // (3 * heads)
    out = np.empty((3, b, heads, t, depth), np.float32)
    qkv_heads_into(np.ascontiguousarray(qkv).reshape(b, t, 3, heads, depth), bias.reshape(3, heads, depth), has_bias,
               out)
    return out
