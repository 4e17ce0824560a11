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

__all__ = ["qkv_heads", "qkv_heads_into", "qkv_heads_reference"]


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
