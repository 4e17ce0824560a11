"""Attention and embeddings with PyTorch's names, arguments, parameter names and semantics.

* their functional forms, :func:`~nanoopt.nn.functional.scaled_dot_product_attention` (Vaswani et al. 2017,
  eq. 1) and :func:`~nanoopt.nn.functional.embedding`, are in :mod:`nanoopt.nn.attention_functional`;
* :class:`Embedding`: a table of ``num_embeddings`` rows looked up by integer ids.
* :class:`MultiheadAttention` (Vaswani et al. 2017, section 3.2.2): PyTorch's ``in_proj_weight`` (3E, E),
  ``in_proj_bias`` (3E,) and ``out_proj`` (a Linear), so ``state_dict`` keys and values move one to one.
  Its masks follow PyTorch's convention, the *opposite* of the SDPA boolean mask: True in ``attn_mask`` or
  ``key_padding_mask`` means "may not attend". Fully masked rows: with ``need_weights=True`` output and weights
  are NaN (a softmax over nothing, as in PyTorch); with ``need_weights=False`` the output is 0 (PyTorch's SDPA
  path in training mode; PyTorch's separate no-grad inference fast path returns NaN there instead).
* :class:`ModuleDict`: modules registered under string keys.

The attention itself is one primitive (:class:`nanoopt.ops_transformer.ScaledDotProductAttention`), forward and
backward written out, so the (..., L, S) score matrix never becomes a graph node.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import nn
>>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
>>> x = no.Tensor(np.zeros((3, 5, 8)))
>>> out, weights = mha(x, x, x)
>>> out.shape, weights.shape, sorted(mha.state_dict())
((3, 5, 8), (3, 5, 5), ['in_proj_bias', 'in_proj_weight', 'out_proj.bias', 'out_proj.weight'])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from nanoopt import ops
from nanoopt.nn import functional as F
from nanoopt.nn import init
from nanoopt.nn.attention_functional import (
    _mask_array,
    _tensor,
    check_indices,
)
from nanoopt.nn.layers import Linear
from nanoopt.nn.module import Module, Parameter
from nanoopt.ops_transformer import Embedding as _EmbeddingOp
from nanoopt.ops_transformer import ScaledDotProductAttention
from nanoopt.random import get_rng
from nanoopt.tensor import Tensor


class Embedding(Module):
    """A lookup table: ``weight`` (num_embeddings, embedding_dim), initialised N(0, 1) as in PyTorch.

    ``padding_idx``: that row starts at zero and receives no gradient.

    >>> import numpy as np
    >>> table = Embedding(10, 3)
    >>> table(np.array([[1, 2, 9]])).shape
    (1, 3, 3)
    >>> table(np.array([10]))
    Traceback (most recent call last):
    ...
    ValueError: Embedding(10, 3): ids must be in [0, 9], got range [10, 10] (shape (1,))
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"Embedding needs positive sizes, got num_embeddings={num_embeddings}, "
                             f"embedding_dim={embedding_dim}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx must be in [-{num_embeddings}, {num_embeddings - 1}], "
                                 f"got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = Parameter(np.empty((num_embeddings, embedding_dim), dtype=np.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight.data[self.padding_idx] = 0

    def forward(self, input: Any) -> Tensor:  # noqa: A002
        ids = check_indices(input, self.num_embeddings, repr(self))
        return _EmbeddingOp.apply(self.weight, indices=ids, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        return text if self.padding_idx is None else text + f", padding_idx={self.padding_idx}"


class ModuleDict(Module):
    """Modules registered as children under string keys, in insertion order (PyTorch's ``nn.ModuleDict``).

    >>> from nanoopt import nn
    >>> d = ModuleDict({"wte": Embedding(4, 2), "ln_f": nn.LayerNorm(2)})
    >>> list(d), sorted(d.state_dict())
    (['wte', 'ln_f'], ['ln_f.bias', 'ln_f.weight', 'wte.weight'])
    """

    def __init__(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]] | None = None) -> None:
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise KeyError(f"ModuleDict: keys must be non-empty strings without '.', got {key!r}")
        self.add_module(key, module)

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def keys(self) -> Iterable[str]:
        return self._modules.keys()

    def values(self) -> Iterable[Module]:
        return self._modules.values()

    def items(self) -> Iterable[tuple[str, Module]]:
        return self._modules.items()

    def update(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]]) -> None:
        pairs = modules.items() if isinstance(modules, Mapping) else modules
        for key, module in pairs:
            self[key] = module


def _attention_bias(attn_mask: Any, key_padding_mask: Any, batch: int, heads: int, length: int, source: int,
                    dtype: np.dtype, name: str) -> np.ndarray | None:
    """MultiheadAttention's masks (True = may not attend; floats added) merged into one bias (N, H, L, S)."""
    bias = None
    if attn_mask is not None:
        mask = _mask_array(attn_mask, "attn_mask", name)
        if mask.shape == (length, source):
            mask = mask[None, None]
        elif mask.shape == (batch * heads, length, source):
            mask = mask.reshape(batch, heads, length, source)
        else:
            raise ValueError(f"{name}: attn_mask must have shape (L, S) = {(length, source)} or (N * num_heads, L, "
                             f"S) = {(batch * heads, length, source)}, got {mask.shape}")
        bias = np.where(mask, -np.inf, 0).astype(dtype) if mask.dtype == bool else mask.astype(dtype)
    if key_padding_mask is not None:
        mask = _mask_array(key_padding_mask, "key_padding_mask", name)
        if mask.shape != (batch, source):
            raise ValueError(f"{name}: key_padding_mask must have shape (N, S) = {(batch, source)}, got {mask.shape}")
        padding = np.where(mask, -np.inf, 0).astype(dtype) if mask.dtype == bool else mask.astype(dtype)
        padding = padding[:, None, None, :]
        bias = padding if bias is None else bias + padding
    return bias


class MultiheadAttention(Module):
    """Multi-head attention (Vaswani et al. 2017, section 3.2.2) with PyTorch's parameters and forward.

    ``in_proj_weight`` (3E, E) stacks the query, key and value projections, ``in_proj_bias`` (3E,) their biases,
    ``out_proj`` is a Linear(E, E). Inputs are (L, N, E) (``batch_first=False``, PyTorch's default), (N, L, E)
    (``batch_first=True``) or unbatched (L, E). ``forward`` returns ``(output, weights)``; ``weights`` are the
    attention weights averaged over heads (N, L, S) (per head (N, H, L, S) with ``average_attn_weights=False``),
    or None when ``need_weights=False``. ``dropout`` applies to the attention weights in training mode. Separate
    ``kdim``/``vdim`` and ``add_bias_kv``/``add_zero_attn`` are not implemented.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}), both positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = Parameter(np.empty((3 * embed_dim, embed_dim), dtype=np.float32))
        self.register_parameter("in_proj_bias",
                                Parameter(np.zeros(3 * embed_dim, dtype=np.float32)) if bias else None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's ``_reset_parameters``: Xavier-uniform in_proj_weight, zero biases."""
        init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def _project(self, x: Tensor, part: int) -> Tensor:
        e = self.embed_dim
        weight = self.in_proj_weight[part * e:(part + 1) * e]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[part * e:(part + 1) * e]
        return F.linear(x, weight, bias)

    def forward(self, query: Any, key: Any, value: Any, key_padding_mask: Any = None, need_weights: bool = True,
                attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        name = f"{type(self).__name__}({self.extra_repr()})"
        q_in, k_in, v_in = (_tensor(x, n, name) for x, n in ((query, "query"), (key, "key"), (value, "value")))
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        unbatched = q_in.ndim == 2
        expected_ndim = 2 if unbatched else 3
        for tensor, label in ((q_in, "query"), (k_in, "key"), (v_in, "value")):
            if tensor.ndim != expected_ndim or tensor.shape[-1] != e:
                layout = "(L, E)" if unbatched else ("(N, L, E)" if self.batch_first else "(L, N, E)")
                raise ValueError(f"{name}: expected {label} {layout} with E = {e}, got shape {tensor.shape} "
                                 f"(query {q_in.shape})")
        if unbatched:
            q_in, k_in, v_in = (x.reshape((1, *x.shape)) for x in (q_in, k_in, v_in))
            if key_padding_mask is not None:
                key_padding_mask = np.asarray(key_padding_mask)[None]
        elif not self.batch_first:
            q_in, k_in, v_in = (x.transpose((1, 0, 2)) for x in (q_in, k_in, v_in))
        n, length, source = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != n:
            raise ValueError(f"{name}: key and value must share batch and source length with query's batch, got "
                             f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError(f"{name}: is_causal=True is a hint that attn_mask is the causal mask; pass attn_mask "
                             "too (as PyTorch)")
        bias = _attention_bias(attn_mask, key_padding_mask, n, h, length, source, q_in.dtype, name)

        if query is key and key is value:
            qkv = F.linear(q_in, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3E)
            q, k, v = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        else:
            q, k, v = self._project(q_in, 0), self._project(k_in, 1), self._project(v_in, 2)
        q = q.reshape((n, length, h, d)).transpose((0, 2, 1, 3))  # (N, H, L, D)
        k = k.reshape((n, source, h, d)).transpose((0, 2, 1, 3))  # (N, H, S, D)
        v = v.reshape((n, source, h, d)).transpose((0, 2, 1, 3))  # (N, H, S, D)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # composed from primitives, so that the weights are a differentiable output too
            scores = (q @ k.transpose((0, 1, 3, 2))) * (1.0 / math.sqrt(d))
            if bias is not None:
                scores = scores + bias
            with np.errstate(invalid="ignore"):
                weights = ops.softmax(scores, axis=-1)  # a fully masked row is NaN here, as in PyTorch
            weights = ops.dropout(weights, dropout_p, training=dropout_p > 0)
            heads = weights @ v
        else:
            keep = None
            if dropout_p > 0:
                keep = ((get_rng().random((n, h, length, source)) >= dropout_p).astype(q.dtype)
                        / np.asarray(1 - dropout_p, dtype=q.dtype))
            heads = ScaledDotProductAttention.apply(q, k, v, bias=bias, scale=None, keep=keep, zero_masked_rows=True)
        merged = heads.transpose((0, 2, 1, 3)).reshape((n, length, e))  # (N, L, E)
        out = self.out_proj(merged)
        if weights is not None and average_attn_weights:
            weights = weights.mean(axis=1)  # (N, L, S)
        if unbatched:
            out = out.reshape((length, e))
            weights = None if weights is None else weights.reshape(weights.shape[1:])
        elif not self.batch_first:
            out = out.transpose((1, 0, 2))
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
