"""A GPT (Radford et al. 2018/2019) in nanoopt, following karpathy/nanoGPT's ``model.py`` layer for layer.

Token and position embeddings, ``n_layer`` pre-LayerNorm blocks (Xiong et al. 2020) of causal multi-head
self-attention and a GELU MLP with residual connections, a final LayerNorm and a language-model head whose weight
*is* the token embedding (weight tying, Press & Wolf 2017). Parameter names are nanoGPT's
(``transformer.wte.weight``, ``transformer.h.0.attn.c_attn.weight``, ..., ``lm_head.weight``), so a nanoGPT
checkpoint's ``state_dict`` loads one to one. Initialisation is nanoGPT's: every Linear and Embedding weight
N(0, 0.02^2), biases zero, and the residual projections (``c_proj``) N(0, (0.02 / sqrt(2 n_layer))^2) (GPT-2).

Each block's attention is one fused primitive (:class:`nanoopt.ops_transformer.SelfAttentionQKV`) on the
packed (B, T, 3C) projection, so a training step builds a small graph.

:meth:`GPT.generate` extends a context token by token. With ``use_cache=True`` each layer keeps the keys and
values of the tokens seen so far (a KV cache), so one new token costs one row of every projection instead of a
whole window; it computes what the cache-less path computes (the same modules, the same masks), and at
temperature 0 both give identical tokens. Positions are absolute, so once the context is longer than
``block_size`` the window slides and every key changes: nothing can be reused, and each step recomputes the
window. Both paths call the primitives' forwards on arrays (:meth:`GPT._array_logits`: no graph, Tensor or
module overhead, and the last block only for the last position), except that a float32 model of stock layers at
batch 1 runs each cached token through every block in one compiled call
(:func:`nanoopt.float_kernels.gpt_step.gpt_step`, :class:`StepDecoder`: its own KV cache, the prompt fed token
by token; equal to the array path to float32 rounding, as that path is to :meth:`GPT.forward`, since a one-token
step is mostly call overhead around tiny products); replaced Linear layers that compute on arrays
(``forward_array``, as the weight-only low-bit layers of :mod:`nanoopt.quant.dynamic`) take part; a model with
hooks or other replaced layers (observed, int8-quantized, pruned) goes through its modules instead. A cache
therefore pays within the first ``block_size`` positions; beyond, each token costs about one forward pass of the
window, as without it.

>>> import numpy as np, nanoopt as no
>>> no.manual_seed(0)
>>> model = gpt(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
>>> model(np.zeros((3, 8), dtype=np.int64)).shape
(3, 8, 11)
>>> out = model.generate(np.zeros((1, 2), dtype=np.int64), max_new_tokens=10, temperature=0.0)
>>> out.shape, bool((out == model.generate(np.zeros((1, 2), dtype=np.int64), 10, 0.0, use_cache=False)).all())
((1, 12), True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nanoopt import nn, ops
from nanoopt.data.text import CharTokenizer
from nanoopt.float_kernels.attention_heads import qkv_heads, qkv_heads_into, qkv_heads_panels_into
from nanoopt.float_kernels.bias import checked_bias
from nanoopt.float_kernels.causal_softmax import causal_normalise_rows, causal_shift_rows, causal_softmax_
from nanoopt.float_kernels.gelu import bias_gelu_, bias_gelu_rows
from nanoopt.float_kernels.gpt_step import BlockWeights, StepArrays, StepBuffers, gpt_step, step_arrays
from nanoopt.float_kernels.layer_norm import layer_norm_rows, layer_norm_rows_into
from nanoopt.float_kernels.residual import bias_residual_, bias_residual_rows
from nanoopt.kernels import float_gemm_avx2
from nanoopt.nn import init
from nanoopt.nn.attention_functional import causal_bias, check_indices
from nanoopt.ops import Context
from nanoopt.ops_transformer import ScaledDotProductAttention, SelfAttentionQKV
from nanoopt.random import get_rng
from nanoopt.tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    """The hyper-parameters of :class:`GPT` (nanoGPT's ``GPTConfig``)."""

    vocab_size: int = 65  # number of distinct tokens (characters for a character-level model)
    block_size: int = 64  # longest context the model sees (number of position embeddings)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; n_embd must be divisible by it
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # on embeddings, attention weights and residual branches, in training mode
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of one attention layer for positions 0..length-1, in preallocated (B, H, block, D) arrays."""

    def __init__(self, batch: int, heads: int, block_size: int, head_dim: int, dtype: Any) -> None:
        self.keys = np.empty((batch, heads, block_size, head_dim), dtype=dtype)
        self.values = np.empty((batch, heads, block_size, head_dim), dtype=dtype)
        self.length = 0

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store (B, H, T, D) keys and values after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nanoGPT's ``c_attn`` (C -> 3C) and ``c_proj`` (C -> C).

    ``n_head`` heads of ``head_dim = n_embd // config.n_head`` each. Head pruning
    (:func:`nanoopt.prune.prune_heads`) lowers ``n_head`` of one block: ``c_attn`` then maps C -> 3 n_head head_dim
    and ``c_proj`` n_head head_dim -> C, while ``config.n_head`` keeps the unpruned count.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def inner_dim(self) -> int:
        """Width of the merged heads, n_head * head_dim (n_embd unless heads were pruned)."""
        return self.n_head * self.head_dim

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        b, t, c = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        if cache is None:
            p = self.dropout if self.training else 0.0
            keep = None
            if p > 0:
                keep = (get_rng().random((b, self.n_head, t, t)) >= p).astype(x.dtype) / np.asarray(1 - p, x.dtype)
            y = SelfAttentionQKV.apply(qkv, num_heads=self.n_head, bias=causal_bias(t, t, str(x.dtype)), keep=keep)
        else:  # inference with a KV cache: queries at positions start..start+T-1 see keys 0..their own position
            d = self.head_dim
            heads = qkv.data.reshape(b, t, 3, self.n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
            start = cache.length
            keys, values = cache.append(heads[1], heads[2])
            bias = None if t == 1 else np.triu(np.full((t, start + t), -np.inf, dtype=x.dtype), k=start + 1)
            out = ScaledDotProductAttention.apply(Tensor(np.ascontiguousarray(heads[0])), Tensor(keys),
                                                  Tensor(values), bias=bias)  # (B, H, T, D)
            y = Tensor(np.ascontiguousarray(out.data.transpose(0, 2, 1, 3)).reshape(b, t, self.inner_dim))
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """C -> 4C -> GELU -> C (nanoGPT's ``c_fc``, ``gelu``, ``c_proj``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT: ``forward(idx)`` maps token ids (B, T), T <= block_size, to next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer["wte"].weight = self.lm_head.weight  # weight tying: one Parameter under two names
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanoGPT's ``_init_weights``: N(0, 0.02^2) weights, zero biases, residual projections scaled down."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init.normal_(module.weight, 0.0, 0.02)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                init.normal_(parameter, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (nanoGPT's convention)."""
        total = super().num_parameters()
        return total - self.transformer["wpe"].weight.size if non_embedding else total

    def _check_ids(self, idx: Any, name: str) -> np.ndarray:
        ids = check_indices(idx, self.config.vocab_size, name)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"{name}: expected token ids (B, T) with T >= 1, got shape {ids.shape}")
        return ids

    def _embed(self, ids: np.ndarray, start: int) -> Tensor:
        t = ids.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(f"GPT: a sequence of length {start + t} is longer than block_size "
                             f"{self.config.block_size}")
        tok = self.transformer["wte"](ids)  # (B, T, C)
        pos = self.transformer["wpe"](np.arange(start, start + t))  # (T, C)
        return self.transformer["drop"](tok + pos)

    def forward(self, idx: Any) -> Tensor:
        ids = self._check_ids(idx, "GPT.forward")
        x = self._embed(ids, 0)
        for block in self.transformer["h"]:
            x = block(x)
        return self.lm_head(self.transformer["ln_f"](x))  # (B, T, V)

    def _logits_with_cache(self, ids: np.ndarray, caches: list[KVCache]) -> np.ndarray:
        """Next-token logits (B, V) after feeding ``ids`` (B, T) through the cached layers (no graph)."""
        x = self._embed(ids, caches[0].length)
        for block, cache in zip(self.transformer["h"], caches, strict=True):
            x = block(x, cache)
        return self.lm_head(self.transformer["ln_f"](x[:, -1])).data

    def _plain(self) -> bool:
        """True when every submodule is one of the stock layers without hooks and their parameters are float32 (so
        that the primitives' forwards, and the float32 kernels of the fast path, may be called on the arrays
        directly); quantized, pruned, hooked or float64 models take the module path."""
        stock = (GPT, nn.ModuleDict, nn.ModuleList, Block, CausalSelfAttention, MLP, nn.Linear, nn.LayerNorm,
                 nn.Embedding, nn.Dropout, nn.GELU)
        return all((type(m) in stock or _array_linear(m)) and not m._forward_hooks and not m._forward_pre_hooks
                   and (type(m) not in stock or all(p is None or p.data.dtype == np.float32
                                                    for p in m._parameters.values()))
                   for m in self.modules())

    def _array_plan(self, arrays: StepArrays | None = None) -> tuple:
        """The arrays :meth:`_array_logits` reads, gathered once per generation (module attribute look-ups cost
        more than a one-token step's arithmetic): per block (heads, head_dim, ln_1, c_attn, c_proj, ln_2, c_fc,
        mlp.c_proj, GELU approximation), then (wte, wpe, ln_f, lm_head). A LayerNorm is (weight, bias, eps); a
        stock Linear is (None, weight, bias), a replaced one with an array forward (module, None, None). Given
        ``arrays`` (this model's :class:`~nanoopt.float_kernels.gpt_step.StepArrays`), the stock Linears' ``W^T``
        are its copies (views) instead of copies of their own. Last, the :class:`_WindowBlocks` of the blocks
        before the last (None where one of them does not qualify)."""
        def norm(module: nn.LayerNorm) -> tuple:
            bias = module.bias.data if module.bias is not None else np.zeros_like(module.weight.data)
            return module.weight.data, bias, module.eps

        def lin(module: nn.Module, stacked: np.ndarray | None = None) -> tuple:
            if type(module) is not nn.Linear:  # a replaced layer with an array forward (e.g. weight-only low-bit)
                return module, None, None
            # W^T stored contiguous (a copy per generation): OpenBLAS multiplies by a row-major (in, out) operand
            # about a quarter faster than by the transposed view of W at the window's sizes (the same products;
            # the library may sum them in another order, so equal to the module path to float32 rounding)
            weight_t = np.ascontiguousarray(module.weight.data.T if stacked is None else stacked)
            return None, weight_t, None if module.bias is None else module.bias.data

        def views(i: int, block: Block) -> tuple:  # block i's W^T in ``arrays`` (padding cut off), or Nones
            if arrays is None:
                return None, None, None, None
            inner, hidden = block.attn.inner_dim, block.mlp.c_fc.out_features
            return (arrays.w_attn[i, :, :3 * inner], arrays.w_proj[i, :inner], arrays.w_fc[i, :, :hidden],
                    arrays.w_mlp[i, :hidden])

        blocks = tuple((block.attn.n_head, block.attn.head_dim, norm(block.ln_1), lin(block.attn.c_attn, attn),
                        lin(block.attn.c_proj, proj), norm(block.ln_2), lin(block.mlp.c_fc, fc),
                        lin(block.mlp.c_proj, mlp), block.mlp.gelu.approximate)
                       for i, block in enumerate(self.transformer["h"]) for attn, proj, fc, mlp in [views(i, block)])
        return blocks, (self.transformer["wte"].weight.data, self.transformer["wpe"].weight.data,
                        norm(self.transformer["ln_f"]), lin(self.lm_head, None if arrays is None else arrays.w_head)), \
            _WindowBlocks.build(blocks[:-1])

    def _array_logits(self, ids: np.ndarray, caches: list[KVCache] | None = None,
                      plan: tuple | None = None) -> np.ndarray:
        """Next-token logits (B, V) after ``ids`` (B, T), from the primitives' forwards called on arrays.

        The same primitives as :meth:`forward` (and the module path of :meth:`_logits_with_cache`), without graph,
        Tensor or module overhead (``plan``: :meth:`_array_plan`, built here if not given). LayerNorm runs through
        :func:`nanoopt.float_kernels.layer_norm.layer_norm_rows`, which gives ``ops.LayerNorm``'s bits; a window's
        causal attention through :func:`_causal_self_attention` (``SelfAttentionQKV``'s operations with the scores
        updated in place) and the MLP's bias and GELU through :func:`nanoopt.float_kernels.gelu.bias_gelu_` (the
        GELU operator's bits in one pass); a stock layer's bias joins the pass after its product (the qkv bias the
        heads' layout, :func:`~nanoopt.float_kernels.attention_heads.qkv_heads`; the projections' the residual
        addition, :func:`~nanoopt.float_kernels.residual.bias_residual_`), each with the bits of adding it first.
        With ``caches``
        the ids continue the cached positions and their keys and values are appended; without, ``ids`` is a whole
        window. The last block computes keys and values for every position but its query, attention output and MLP
        for the last position only, the one whose logits are asked for. A whole window at batch 1 runs the blocks
        before the last through the plan's :class:`_WindowBlocks` (the same operations on preallocated buffers,
        without the wrappers' per-call checks; its products on register tiles where they are available, so equal to
        this path to float32 rounding, else by BLAS with this path's bits).
        """
        def call(function: type, *arrays: Any, **options: Any) -> np.ndarray:
            return function.forward(Context(function), *arrays, **options)

        def layer_norm(params: tuple, x: np.ndarray) -> np.ndarray:
            weight, bias, eps = params
            if x.dtype == np.float32 and weight.dtype == np.float32 and bias.dtype == np.float32:
                return layer_norm_rows(x, weight, bias, eps)  # ops.LayerNorm's bits in one pass
            return call(ops.LayerNorm, x, weight, bias, ndim_normalised=1, eps=eps)

        def linear(params: tuple, x: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
            module, weight_t, bias = params
            if module is not None:
                return module.forward_array(x, rows)
            out = np.matmul(x.reshape(-1, x.shape[-1]), weight_t[:, rows])
            if bias is not None:
                out += bias[rows]
            return out.reshape(*x.shape[:-1], out.shape[-1])

        def product(params: tuple, x: np.ndarray) -> np.ndarray | None:
            """A stock float32 Linear's ``x W^T`` without its bias (for a fused epilogue), else None."""
            module, weight_t, bias = params
            if module is not None or x.dtype != np.float32 or weight_t.dtype != np.float32 \
                    or (bias is not None and bias.dtype != np.float32):
                return None
            return np.matmul(x.reshape(-1, x.shape[-1]), weight_t).reshape(*x.shape[:-1], weight_t.shape[1])

        def add_residual(x: np.ndarray, params: tuple, y: np.ndarray) -> np.ndarray:
            """``x + linear(params, y)``; for a stock float32 layer the bias and the residual added in one pass
            (:func:`~nanoopt.float_kernels.residual.bias_residual_`, the same bits), in place on ``x``, which is
            this function's own array (the embeddings' sum, or a copy)."""
            out = product(params, y) if x.dtype == np.float32 and x.flags.c_contiguous else None
            if out is None:
                return x + linear(params, y)
            return bias_residual_(x, out, params[2])

        def fc_gelu(params: tuple, x: np.ndarray, approximate: str) -> np.ndarray:
            module, weight_t, bias = params
            if module is not None or approximate != "none" or x.dtype != np.float32:
                return call(ops.GELU, linear(params, x), approximate=approximate)
            out = np.matmul(x.reshape(-1, x.shape[-1]), weight_t)
            return bias_gelu_(out, bias).reshape(*x.shape[:-1], out.shape[-1])  # ops.GELU's bits, one pass

        blocks, (wte, wpe, ln_f, lm_head), lean = self._array_plan() if plan is None else plan
        b, t = ids.shape
        start = caches[0].length if caches is not None else 0
        if start + t > self.config.block_size:
            raise ValueError(f"GPT: a sequence of length {start + t} is longer than block_size "
                             f"{self.config.block_size}")
        x = wte[ids] + wpe[start:start + t]
        first = 0
        if caches is None and b == 1 and lean is not None and x.dtype == np.float32:
            lean(x[0])  # the blocks before the last, on preallocated buffers (the same operations)
            first = len(blocks) - 1
        for i, (h, d, ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj, approximate) in enumerate(blocks):
            if i < first:
                continue
            c, scale = h * d, 1.0 / math.sqrt(d)  # per block: heads may have been pruned
            hidden = layer_norm(ln_1, x)  # (B, T, C)
            if i == len(blocks) - 1:  # keys and values of every position, everything else for the last one only
                kv = linear(c_attn, hidden, slice(c, 3 * c)).reshape(b, t, 2, h, d).transpose(2, 0, 3, 1, 4)
                keys, values = kv[0], kv[1]  # (B, H, T, D)
                if caches is not None:
                    keys, values = caches[i].append(keys, values)
                q = linear(c_attn, hidden[:, -1:], slice(0, c)).reshape(b, 1, h, d).transpose(0, 2, 1, 3)
                out = _attend(q, np.ascontiguousarray(keys), np.ascontiguousarray(values), scale, None)  # no mask:
                # the last query sees every key
                y = out.transpose(0, 2, 1, 3).reshape(b, 1, c)
                x = np.ascontiguousarray(x[:, -1:])
            elif caches is None:
                qkv = product(c_attn, hidden)  # the bias is added while the heads are laid out
                y = (_causal_self_attention(linear(c_attn, hidden), h, d) if qkv is None
                     else _causal_self_attention(qkv, h, d, c_attn[2]))  # (B, T, C)
            else:
                heads = linear(c_attn, hidden).reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)
                keys, values = caches[i].append(heads[1], heads[2])
                out = _attend(np.ascontiguousarray(heads[0]), keys, values, scale, start)  # causal
                y = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(b, t, c)
            x = add_residual(x, c_proj, y)
            x = add_residual(x, mlp_proj, fc_gelu(c_fc, layer_norm(ln_2, x), approximate))
        return linear(lm_head, layer_norm(ln_f, x[:, -1]))  # (B, V)

    def _step_decoder(self, batch: int) -> StepDecoder | None:
        """The fused one-token step of :mod:`nanoopt.float_kernels.gpt_step` for this model (its operands copied
        once, ``W^T`` contiguous), or None where it does not apply: batch > 1, a replaced Linear, a tanh GELU, a
        LayerNorm without weight, or a parameter not float32. Call on a :meth:`_plain` model."""
        blocks = list(self.transformer["h"])
        linears = [self.lm_head] + [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        norms = [self.transformer["ln_f"]] + [m for b in blocks for m in (b.ln_1, b.ln_2)]
        if (batch != 1 or any(type(m) is not nn.Linear for m in linears) or any(m.weight is None for m in norms)
                or any(b.mlp.gelu.approximate != "none" or b.attn.head_dim != blocks[0].attn.head_dim for b in blocks)
                or any(p.dtype != np.float32 for p in self.parameters())):
            return None

        def norm(module: nn.LayerNorm) -> tuple:
            return module.weight.data, None if module.bias is None else module.bias.data, module.eps

        def lin(module: nn.Linear) -> tuple:
            return module.weight.data.T, None if module.bias is None else module.bias.data

        weights = [BlockWeights(norm(b.ln_1), lin(b.attn.c_attn), lin(b.attn.c_proj), norm(b.ln_2), lin(b.mlp.c_fc),
                                lin(b.mlp.c_proj), b.attn.n_head) for b in blocks]
        return StepDecoder(step_arrays(self.transformer["wte"].weight.data, self.transformer["wpe"].weight.data,
                                       weights, norm(self.transformer["ln_f"]), self.lm_head.weight.data.T,
                                       blocks[0].attn.head_dim))

    def _new_caches(self, batch: int) -> list[KVCache]:
        dtype = self.transformer["wte"].weight.dtype  # (the head may have been replaced by a quantized layer)
        return [KVCache(batch, block.attn.n_head, self.config.block_size, block.attn.head_dim, dtype)
                for block in self.transformer["h"]]

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """Append ``max_new_tokens`` sampled tokens to each row of ``idx`` (B, T); returns int64 ids (B, T + new).

        Each step conditions on the last ``block_size`` tokens, divides the logits by ``temperature``, keeps the
        ``top_k`` largest (if given) and samples from the softmax (from ``rng``, default the global generator);
        ``temperature=0`` takes the most likely token (greedy). Runs in eval mode without a graph; the module's
        training flag is restored afterwards.
        """
        ids = self._check_ids(idx, "GPT.generate")
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"GPT.generate: need max_new_tokens >= 0 and temperature >= 0, got {max_new_tokens} "
                             f"and {temperature}")
        if top_k is not None and not 1 <= top_k:
            raise ValueError(f"GPT.generate: top_k must be >= 1, got {top_k}")
        rng = get_rng() if rng is None else rng
        block = self.config.block_size
        was_training = self.training
        self.eval()
        out = np.empty((ids.shape[0], ids.shape[1] + max_new_tokens), dtype=np.int64)
        out[:, :ids.shape[1]] = ids
        length = ids.shape[1]
        caches: list[KVCache] | None = None
        plain = self._plain()
        decoder = (self._step_decoder(ids.shape[0]) if plain and use_cache and ids.shape[1] <= block
                   and max_new_tokens > 0 else None)  # float32 at batch 1: one compiled call per cached step
        # gathered once: the weights do not change while generating (W^T shared with the decoder's copies)
        plan = self._array_plan(None if decoder is None else decoder.arrays) if plain else None
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    window = out[:, max(0, length - block):length]
                    if not use_cache:
                        logits = self.forward(window).data[:, -1]
                    elif decoder is not None and length <= block:  # the tokens its cache has not seen (the prompt,
                        logits = decoder.feed(out[0, decoder.length:length])  # then one at a time)
                    elif caches is not None and length <= block:  # the cache holds window[:, :-1]: feed one token
                        step = window[:, -1:]
                        logits = (self._array_logits(step, caches, plan) if plain
                                  else self._logits_with_cache(step, caches))
                    elif length > block and plain:  # the window slid: every position changed, recompute it
                        logits = self._array_logits(window, None, plan)
                    else:  # first step (or, with hooks or replaced layers, a slid window): fill the cache anew
                        caches = self._new_caches(ids.shape[0])
                        logits = (self._array_logits(window, caches, plan) if plain
                                  else self._logits_with_cache(window, caches))
                    out[:, length] = sample_tokens(logits, temperature, top_k, rng)
                    length += 1
        finally:
            self.train(was_training)
        return out

    def checkpoint_state(self, tokenizer: Any = None) -> dict[str, np.ndarray]:
        """The state_dict plus the config (and a tokenizer's vocabulary), for ``nanoopt.io.save``.

        :meth:`from_checkpoint_state` rebuilds the model (and tokenizer) from ``nanoopt.io.load(path)``.
        """
        state: dict[str, np.ndarray] = dict(self.state_dict())
        c = self.config
        state["_gpt.config"] = np.array([c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, int(c.bias)],
                                        dtype=np.int64)
        state["_gpt.dropout"] = np.array(c.dropout, dtype=np.float64)
        blocks = list(self.transformer["h"])
        heads = [block.attn.n_head for block in blocks]
        hidden = [block.mlp.c_fc.out_features for block in blocks]
        if heads != [c.n_head] * c.n_layer or hidden != [4 * c.n_embd] * c.n_layer:  # pruned heads or neurons
            state["_gpt.heads"] = np.array(heads, dtype=np.int64)
            state["_gpt.mlp_hidden"] = np.array(hidden, dtype=np.int64)
        if tokenizer is not None:
            state["_gpt.vocab"] = tokenizer.to_array()
        return state

    @classmethod
    def from_checkpoint_state(cls, state: dict[str, np.ndarray]) -> tuple[GPT, Any]:
        """Inverse of :meth:`checkpoint_state`: ``(model, tokenizer or None)``."""
        state = dict(state)
        if "_gpt.config" not in state:
            raise KeyError("GPT.from_checkpoint_state: no '_gpt.config' entry (not saved by checkpoint_state)")
        v, b, n_layer, n_head, n_embd, bias = (int(x) for x in state.pop("_gpt.config"))
        config = GPTConfig(v, b, n_layer, n_head, n_embd, float(state.pop("_gpt.dropout", 0.0)), bool(bias))
        vocab = state.pop("_gpt.vocab", None)
        heads, hidden = state.pop("_gpt.heads", None), state.pop("_gpt.mlp_hidden", None)
        model = cls(config)
        if heads is not None and hidden is not None:
            if len(heads) != n_layer or len(hidden) != n_layer:
                raise ValueError(f"GPT.from_checkpoint_state: '_gpt.heads' and '_gpt.mlp_hidden' need {n_layer} "
                                 f"entries (one per block), got {len(heads)} and {len(hidden)}")
            for block, h, w in zip(model.transformer["h"], heads, hidden, strict=True):
                resize_block(block, int(h), int(w))
        model.load_state_dict(state)
        return model, None if vocab is None else CharTokenizer.from_array(vocab)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


class _WindowBlocks:
    """The blocks of a whole window before the last, at batch 1, with no Python per operation beyond the calls:
    :meth:`GPT._array_logits`'s operations for those blocks, each compiled kernel called without its wrapper's checks
    (made once here, when the plan is built), every product written into a buffer kept per window length. Where the
    register tiles of :mod:`nanoopt.kernels.float_gemm_avx2` are available, the linear layers' products run on them
    (their weights packed here, once per generation) and so do the heads' scores and outputs, over the causal
    triangle only (keys and values laid out as panels by
    :func:`~nanoopt.float_kernels.attention_heads.qkv_heads_panels_into`): faster than BLAS at a window's sizes
    (``docs/kernels.md``), summed in another order, so equal to the array path to float32 rounding. Elsewhere every
    product goes through ``np.matmul``, and the result is the array path's bits exactly."""

    def __init__(self, blocks: list[tuple]) -> None:
        self.blocks = blocks
        self.buffers: dict[int, tuple] = {}

    @classmethod
    def build(cls, blocks: tuple, tiles: bool | None = None) -> _WindowBlocks | None:
        """For ``blocks`` of :meth:`GPT._array_plan` (without the last), or None unless every one is stock float32:
        plain Linears (``W^T`` float32, biases float32 or absent), LayerNorms with float32 parameters, the exact
        GELU. ``tiles``: the products on the register tiles (default: where they are available) or by BLAS."""
        tiles = float_gemm_avx2.available() if tiles is None else tiles

        def operand(weight_t: np.ndarray) -> tuple:  # (W^T, its panels or None)
            return weight_t, float_gemm_avx2.pack_panels(weight_t) if tiles else None

        prepared = []
        for h, d, ln_1, c_attn, c_proj, ln_2, c_fc, mlp_proj, approximate in blocks:
            linears, norms = (c_attn, c_proj, c_fc, mlp_proj), (ln_1, ln_2)
            if approximate != "none" or any(module is not None or weight_t.dtype != np.float32
                                            or (bias is not None and bias.dtype != np.float32)
                                            for module, weight_t, bias in linears):
                return None
            if any(weight.dtype != np.float32 or bias.dtype != np.float32 for weight, bias, _ in norms):
                return None
            width = c_proj[1].shape[1]
            qkv_bias, has_qkv_bias = checked_bias("GPT window", c_attn[2], 3 * h * d)  # zeros where absent
            prepared.append((h, d, (ln_1[0], ln_1[1], np.float32(ln_1[2])), operand(c_attn[1]),
                             qkv_bias.reshape(3, h, d), has_qkv_bias, np.float32(1.0 / math.sqrt(d)),
                             (operand(c_proj[1]), *checked_bias("GPT window", c_proj[2], width)),
                             (ln_2[0], ln_2[1], np.float32(ln_2[2])), operand(c_fc[1]),
                             checked_bias("GPT window", c_fc[2], c_fc[1].shape[1])[0],  # GELU(+-0) alike: no flag
                             (operand(mlp_proj[1]), *checked_bias("GPT window", mlp_proj[2], width))))
        return cls(prepared)

    def _scratch(self, length: int, width: int) -> tuple:
        """The buffers of a window of ``length`` positions, per block: (normed, qkv, scores, y, product, hidden),
        then for the tiles the queries, key panels and value panels, or for BLAS the heads and their outputs."""
        if length not in self.buffers:
            f32, panel = np.float32, float_gemm_avx2.PANEL
            self.buffers[length] = tuple(
                (np.empty((length, width), f32), np.empty((length, 3 * h * d), f32),
                 np.empty((h, length, length), f32), np.empty((length, h * d), f32), np.empty((length, width), f32),
                 np.empty((length, fc_bias.shape[0]), f32))
                + ((np.empty((h, length, d), f32), np.empty((h, -(-length // panel), d, panel), f32),
                    np.empty((h, -(-d // panel), length, panel), f32)) if w_qkv[1] is not None
                   else (np.empty((3, 1, h, length, d), f32), np.empty((h, length, d), f32)))
                for h, d, _, w_qkv, _, _, _, _, _, _, fc_bias, _ in self.blocks)
        return self.buffers[length]

    def __call__(self, x: np.ndarray) -> None:
        """Run the blocks on the residual stream ``x (T, C)`` (float32, C-contiguous) in place."""
        length = x.shape[0]
        for (h, d, ln_1, w_qkv, qkv_bias, has_qkv_bias, scale, proj, ln_2, w_fc, fc_bias, mlp), \
                (normed, qkv, scores, y, product, hidden, *attention) \
                in zip(self.blocks, self._scratch(length, x.shape[1]), strict=True):
            layer_norm_rows_into(x, ln_1[0], ln_1[1], ln_1[2], normed)
            _product(normed, w_qkv, qkv)
            tiles = w_qkv[1] is not None
            if tiles:  # keys and values laid out as panels, the products over the causal triangle
                queries, key_panels, value_panels = attention
                qkv_heads_panels_into(qkv.reshape(length, 3, h, d), qkv_bias, has_qkv_bias, queries, key_panels,
                                      value_panels)
                float_gemm_avx2.causal_scores_into(queries, key_panels, scores)
            else:
                heads, attended = attention
                qkv_heads_into(qkv.reshape(1, length, 3, h, d), qkv_bias, has_qkv_bias, heads)
                np.matmul(heads[0, 0], heads[1, 0].transpose(0, 2, 1), out=scores)  # (H, T, T)
            rows = scores.reshape(-1, length)
            causal_shift_rows(rows, length, scale, 0)
            np.exp(scores, out=scores)
            causal_normalise_rows(rows)
            if tiles:
                float_gemm_avx2.causal_attend_into(scores, value_panels, y)
            else:
                np.matmul(scores, heads[2, 0], out=attended)  # (H, T, D)
                y.reshape(length, h, d)[:] = attended.transpose(1, 0, 2)
            _product(y, proj[0], product)
            bias_residual_rows(x, product, proj[1], proj[2])
            layer_norm_rows_into(x, ln_2[0], ln_2[1], ln_2[2], normed)
            _product(normed, w_fc, hidden)
            bias_gelu_rows(hidden, fc_bias)
            _product(hidden, mlp[0], product)
            bias_residual_rows(x, product, mlp[1], mlp[2])


def _product(x: np.ndarray, operand: tuple, out: np.ndarray) -> None:
    """``out = x W^T`` for ``operand = (W^T, panels or None)``: the register tiles where the weights were packed,
    else BLAS."""
    weight_t, panels = operand
    if panels is not None:
        float_gemm_avx2.matmul_packed_into(x, panels, out)
    else:
        np.matmul(x, weight_t, out=out)


class StepDecoder:
    """The state of :func:`nanoopt.float_kernels.gpt_step.gpt_step` over one generation: its operands, its KV cache
    and scratch, and ``length``, the number of positions the cache holds."""

    def __init__(self, arrays: StepArrays) -> None:
        self.arrays, self.buffers, self.length = arrays, StepBuffers.empty(arrays), 0

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Run ``tokens`` (1-D ids in range, at most ``block_size - length`` of them, at least one) through the
        model at the next positions; the last one's logits (1, V), a new array."""
        for token in tokens:
            gpt_step(self.arrays, self.buffers, int(token), self.length)
            self.length += 1
        return self.buffers.logits[None].copy()


def resize_block(block: Block, n_head: int, mlp_hidden: int) -> Block:
    """Give ``block`` fresh attention and MLP layers for ``n_head`` heads and ``mlp_hidden`` MLP neurons, in place.

    The shapes of a block whose heads or neurons were pruned (for loading its checkpoint); the new layers are
    freshly initialised, to be overwritten by ``load_state_dict``.

    >>> b = resize_block(Block(GPTConfig(n_embd=8, n_head=2)), 1, 5)
    >>> b.attn.c_attn.weight.shape, b.attn.c_proj.weight.shape, b.mlp.c_fc.weight.shape
    ((12, 8), (8, 4), (5, 8))
    """
    attn, c = block.attn, block.attn.n_embd
    if not 1 <= n_head or not 1 <= mlp_hidden:
        raise ValueError(f"resize_block: need n_head >= 1 and mlp_hidden >= 1, got {n_head} and {mlp_hidden}")
    bias = attn.c_attn.bias is not None
    attn.n_head = n_head
    attn.c_attn = nn.Linear(c, 3 * attn.inner_dim, bias=bias)
    attn.c_proj = nn.Linear(attn.inner_dim, c, bias=bias)
    block.mlp.c_fc = nn.Linear(c, mlp_hidden, bias=bias)
    block.mlp.c_proj = nn.Linear(mlp_hidden, c, bias=bias)
    return block


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, offset: int | None) -> np.ndarray:
    """:func:`~nanoopt.ops_transformer.attention_forward`'s output without dropout, on arrays, with no mask
    (``offset`` None) or the causal one of queries that continue ``offset`` earlier keys: the same operations in the
    same order, so the same bits, the softmax fused by :func:`~nanoopt.float_kernels.causal_softmax.causal_softmax_`
    (every query sees a key, so attention_forward's fully-masked-row handling changes nothing). (..., L, D)."""
    scores = np.matmul(q, np.swapaxes(k, -1, -2))  # (..., L, S)
    causal_softmax_(scores, scale, scores.shape[-1] if offset is None else offset)
    return np.matmul(scores, v)


def _causal_self_attention(qkv: np.ndarray, heads: int, head_dim: int, bias: np.ndarray | None = None) -> np.ndarray:
    """:class:`~nanoopt.ops_transformer.SelfAttentionQKV`'s forward with the causal mask (its bits), by
    :func:`_attend`: ``qkv (B, T, 3C)`` (plus ``bias (3C,)``, added as the heads are laid out, by
    :func:`~nanoopt.float_kernels.attention_heads.qkv_heads`: the bits of adding it first) -> ``(B, T, C)``."""
    b, t, _ = qkv.shape
    parts = (np.ascontiguousarray(qkv.reshape(b, t, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)) if bias is None
             else qkv_heads(qkv, bias, heads))  # (3, B, H, T, D)
    out = _attend(parts[0], parts[1], parts[2], 1.0 / np.sqrt(head_dim), 0)
    return out.transpose(0, 2, 1, 3).reshape(b, t, heads * head_dim)


def _array_linear(module: nn.Module) -> bool:
    """True for a replacement of a GPT Linear that computes on arrays: it has ``forward_array(x, rows)``, returning
    ``x W[rows]^T + b[rows]`` as its forward would (e.g. :class:`nanoopt.quant.dynamic.WeightOnlyLinear`)."""
    return callable(getattr(type(module), "forward_array", None)) and not isinstance(module, nn.Linear)


def sample_tokens(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``logits`` (B, V): argmax at temperature 0, else softmax(logits / T) over the top k
    (the sampling step of :meth:`GPT.generate` and of the quantized GPTs).

    >>> logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    >>> sample_tokens(logits, 0.0, None, np.random.default_rng(0)).tolist()
    [1, 0]
    >>> sample_tokens(logits, 1.0, 1, np.random.default_rng(0)).tolist()    # top-1: the argmax again
    [1, 0]
    """
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
    u = rng.random((len(z), 1))
    return np.minimum((cdf < u).sum(axis=-1), z.shape[-1] - 1)


def gpt(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0,
        bias: bool = True) -> GPT:
    """The nanoGPT architecture (see the module docstring) with the given sizes.

    >>> model = gpt(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    >>> model.num_parameters()          # without position embeddings, as nanoGPT reports
    801664
    >>> list(model.state_dict())[:3]
    ['transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.0.ln_1.weight']
    """
    return GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias))
