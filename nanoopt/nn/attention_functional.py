"""The functional forms of attention and embedding, with PyTorch's names and semantics (re-exported by
:mod:`nanoopt.nn.functional`; the modules built on them are in :mod:`nanoopt.nn.attention`).

* :func:`scaled_dot_product_attention` (Vaswani et al. 2017, eq. 1): softmax(s Q K^T + M) V, the signature of
  ``torch.nn.functional.scaled_dot_product_attention``; a boolean ``attn_mask`` marks with True the pairs that
  *take part*, a float mask is added to the scores, ``is_causal`` masks the upper triangle (top-left aligned,
  query i sees keys 0..i). A query whose keys are all masked gets output 0 and gradient 0, as PyTorch's.
* :func:`embedding`: rows of a table looked up by integer ids (:func:`check_indices` checks the ids).

>>> import numpy as np
>>> causal_bias(2, 2).tolist()
[[0.0, -inf], [0.0, 0.0]]
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from nanoopt.ops_transformer import Embedding as _EmbeddingOp
from nanoopt.ops_transformer import ScaledDotProductAttention
from nanoopt.random import get_rng
from nanoopt.tensor import Tensor

__all__ = ["causal_bias", "check_indices", "embedding", "scaled_dot_product_attention"]


def _tensor(x: Any, name: str, function: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return Tensor(x)
    raise TypeError(f"{function}: {name} must be a Tensor or ndarray, got {type(x).__name__}")


def _mask_array(mask: Any, name: str, function: str) -> np.ndarray:
    array = np.asarray(mask.data if isinstance(mask, Tensor) else mask)
    if array.dtype.kind not in "bf":
        raise TypeError(f"{function}: {name} must be a boolean or float mask, got dtype {array.dtype}")
    return array


@functools.lru_cache(maxsize=32)
def causal_bias(length: int, source_length: int, dtype: str = "float32") -> np.ndarray:
    """The additive causal mask (L, S): 0 on and below the diagonal, -inf above (query i sees keys 0..i).

    Cached and read-only.

    >>> causal_bias(2, 3).tolist()
    [[0.0, -inf, -inf], [0.0, 0.0, -inf]]
    """
    bias = np.triu(np.full((length, source_length), -np.inf, dtype=np.dtype(dtype)), k=1)
    bias.flags.writeable = False
    return bias


def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(scale * Q K^T + mask) V, with PyTorch's arguments and semantics.

    ``query`` (..., L, E), ``key`` (..., S, E), ``value`` (..., S, Ev); the leading axes broadcast. ``attn_mask``
    broadcastable to (..., L, S): boolean (True = take part) or float (added to the scores). ``dropout_p`` drops
    attention weights (always, as the functional form in PyTorch; modules pass 0 in eval mode). ``scale``
    defaults to 1/sqrt(E).

    >>> import numpy as np, nanoopt as no
    >>> q = no.Tensor(np.eye(2)[None])                      # (1, 2, 2)
    >>> scaled_dot_product_attention(q, q, q, is_causal=True).numpy()[0, 0].tolist()   # row 0 sees key 0 only
    [1.0, 0.0]
    """
    name = "scaled_dot_product_attention"
    q, k, v = (_tensor(x, n, name) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(f"{name}: query, key and value need at least 2 dimensions (..., L, E), got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{name}: expected query (..., L, E), key (..., S, E), value (..., S, Ev), got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"{name}: the leading axes of query {q.shape}, key {k.shape} and value {v.shape} do not "
                         "broadcast") from None
    length, source = q.shape[-2], k.shape[-2]
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")
    bias = None
    if is_causal:
        if attn_mask is not None:
            raise ValueError(f"{name}: pass either attn_mask or is_causal=True, not both (as PyTorch)")
        bias = causal_bias(length, source, str(q.dtype))
    elif attn_mask is not None:
        mask = _mask_array(attn_mask, "attn_mask", name)
        scores_shape = (*batch, length, source)
        try:
            fits = np.broadcast_shapes(mask.shape, scores_shape) == scores_shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{name}: attn_mask of shape {mask.shape} does not broadcast to the attention scores "
                             f"(..., L, S) = {scores_shape}")
        bias = np.where(mask, 0, -np.inf).astype(q.dtype) if mask.dtype == bool else mask.astype(q.dtype)
    keep = None
    if dropout_p > 0.0:
        shape = (*batch, length, source)
        keep = (get_rng().random(shape) >= dropout_p).astype(q.dtype) / np.asarray(1 - dropout_p, dtype=q.dtype)
    return ScaledDotProductAttention.apply(q, k, v, bias=bias, scale=scale, keep=keep, zero_masked_rows=True)


def check_indices(indices: Any, num_embeddings: int, name: str) -> np.ndarray:
    """Integer ids as an int64 array, refused (naming ``name`` and the range) when outside [0, num_embeddings)."""
    array = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if array.dtype.kind == "f" and array.size and np.array_equal(array, np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: ids must be integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_embeddings):
        raise ValueError(f"{name}: ids must be in [0, {num_embeddings - 1}], got range [{array.min()}, "
                         f"{array.max()}] (shape {array.shape})")
    return array.astype(np.int64, copy=False)


def embedding(input: Any, weight: Any, padding_idx: int | None = None) -> Tensor:  # noqa: A002
    """``weight[input]``: rows of ``weight`` (num_embeddings, embedding_dim) at integer ids of any shape.

    >>> import numpy as np, nanoopt as no
    >>> embedding(np.array([[2, 0]]), no.Tensor(np.arange(6.0).reshape(3, 2))).numpy().tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    weight = _tensor(weight, "weight", "embedding")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
    ids = check_indices(input, weight.shape[0], "embedding")
    return _EmbeddingOp.apply(weight, indices=ids, padding_idx=padding_idx)
