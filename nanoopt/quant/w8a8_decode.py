"""Batch-1 generation of the converted W8A8 GPT through one compiled call per token.

:meth:`nanoopt.quant.transformer.W8A8GPT.generate` with the KV cache at batch 1 feeds one token per step. Done
operation by operation (a LayerNorm, a quantization, a GEMM, ... each one a NumPy or kernel call), such a step
costs more than the float model's; :class:`FusedDecoder` gathers the integer GPT's constants once (again only
when one of the model's arrays has changed) into the operands of :func:`nanoopt.kernels.gpt_decode.decode_step`,
which runs the whole step -- every block's LayerNorm, quantization, int8 ``c_attn`` with requantization onto the
q/k/v grids, integer attention against the int8 KV cache, ``c_proj``, the MLP with GELU, the residual adds,
``ln_f`` and the head -- in one call. It computes what the integer GPT's own cached step computes, bit for bit
(the kernel's NumPy specification is that model's arithmetic; both are tested against the model), so the
generated tokens and logits are the same.

What it takes: a converted (not simulated) W8A8 GPT, with static activation grids or per-token scales
(``W8A8Config()`` or ``W8A8Config(per_token=True)``; any other option keeps the model's own path), and the exact
GELU. :meth:`FusedDecoder.for_model` returns None for anything else.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models
>>> from nanoopt.quant.transformer import PROB_SCALE, PROB_ZERO, convert_w8a8, prepare_w8a8
>>> no.manual_seed(0)
>>> gpt = models.gpt(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
>>> integer = convert_w8a8(prepare_w8a8(gpt).calibrate(np.random.default_rng(0).integers(0, 11, (8, 8))))
>>> decoder = FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO)
>>> caches = decoder.new_caches()
>>> first = integer.logits(np.array([[3]]), caches, last_only=True)
>>> fused = decoder.step(5, caches)
>>> check = integer._new_caches(1); _ = integer.logits(np.array([[3]]), check)
>>> bool((fused == integer.logits(np.array([[5]]), check, last_only=True)).all()), caches[0].length
(True, 2)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from nanoopt.kernels import reference
from nanoopt.kernels.gpt_decode import ACTIVATION, QKV, DecodeArrays, DecodeBuffers, decode_step
from nanoopt.models_gpt import KVCache
from nanoopt.spec import requantization_multipliers

__all__ = ["FusedCaches", "FusedDecoder"]


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _zero(layer: Any) -> int:
    """The zero point of the layer's input codes (per token: 0)."""
    return int(layer.input_zero_point) if layer.static_input else 0


def _checked_weight(layer: Any) -> np.ndarray:
    """The layer's int8 weight (N, K), after checking that its int32 accumulation is exact (as the model's GEMM
    plan does: the same refusal, :class:`~nanoopt.kernels.reference.AccumulatorOverflowError`)."""
    zero = _zero(layer)
    if not reference.int32_accumulation_is_safe(layer.weight, ACTIVATION.qmin, ACTIVATION.qmax, zero):
        raise reference.AccumulatorOverflowError(f"W8A8 layer {layer.layer_name!r}: int8 GEMM with "
                                                 f"K={layer.weight.shape[1]} could overflow int32")
    return np.ascontiguousarray(layer.weight, dtype=np.int8)


def _linear(layer: Any, width: int) -> tuple[np.float32, int, np.ndarray, np.ndarray, bool]:
    """``(s_x, z_x, s_w, bias, has_bias)`` of a linear (``s_w`` and the float bias padded to ``width``; a
    per-token input has no static grid: ``s_x = 1``, ``z_x = 0``, unused)."""
    scale, bias = np.zeros(width, np.float32), np.zeros(width, np.float32)
    n = layer.weight.shape[0]
    scale[:n] = layer.weight_scale
    if layer.bias is not None:
        bias[:n] = layer.bias
    input_scale = np.float32(layer.input_scale) if layer.static_input else np.float32(1.0)
    return input_scale, _zero(layer), scale, bias, layer.bias is not None


def _sources(model: Any) -> list[np.ndarray]:
    """Every array :meth:`FusedDecoder._arrays` reads from the model (kept in step with it)."""
    norms = [model.ln_f] + [norm for block in model.blocks for norm in (block.ln_1, block.ln_2)]
    linears = [model.lm_head] + [getattr(block, name) for block in model.blocks
                                 for name in ("c_attn", "c_proj", "c_fc", "mlp_proj")]
    arrays = [model.wte, model.wpe]
    for norm in norms:
        arrays += [norm.weight.data, np.array(norm.eps)] + ([] if norm.bias is None else [norm.bias.data])
    for layer in linears:
        arrays += [getattr(layer, name) for name in ("weight", "weight_scale", "bias", "input_scale",
                                                     "input_zero_point", "bias_q", "m0", "shift", "qkv_scale")
                   if getattr(layer, name, None) is not None]
    return [np.asarray(a) for a in arrays]


class FusedDecoder:
    """One compiled call per generated token of a converted W8A8 GPT at batch 1 (module docstring).

    ``prob_scale``/``prob_zero``: the grid of the attention probabilities of the model's integer attention.
    """

    def __init__(self, model: Any, prob_scale: np.float32, prob_zero: int) -> None:
        self.model = model
        self.prob_scale, self.prob_zero = np.float32(prob_scale), int(prob_zero)
        self.sources = [np.array(a, copy=True) for a in _sources(model)]
        self.arrays = self._arrays(model)

    @classmethod
    def for_model(cls, model: Any, prob_scale: np.float32, prob_zero: int) -> FusedDecoder | None:
        """A decoder for ``model`` (a W8A8GPT), or None where the fused step does not apply (see module doc)."""
        per_token = model.w8a8.per_token
        if model.simulated or dataclasses.replace(model.w8a8, per_token=False) != type(model.w8a8)():
            return None  # the simulation, or an option other than per-token scales
        if not all(block.approximate == "none" and block.c_proj.static_input and all(
                getattr(block, name).static_input != per_token for name in ("c_attn", "c_fc", "mlp_proj"))
                for block in model.blocks) or model.lm_head.static_input == per_token:
            return None
        cached = model.__dict__.get("_fused_decoder")
        if cached is not None and cached.current(model, prob_scale, prob_zero):
            return cached
        decoder = cls(model, prob_scale, prob_zero)
        model.__dict__["_fused_decoder"] = decoder  # reused while every array it was built from is unchanged
        return decoder

    def current(self, model: Any, prob_scale: np.float32, prob_zero: int) -> bool:
        """Whether this decoder was built from ``model`` with arrays equal to its current ones (the model's
        buffers and parameters may have been loaded or edited in place since: then it is built again)."""
        if model is not self.model or (np.float32(prob_scale), int(prob_zero)) != (self.prob_scale, self.prob_zero):
            return False
        sources = _sources(model)
        return len(sources) == len(self.sources) and all(
            a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
            for a, b in zip(sources, self.sources, strict=True))

    def _arrays(self, model: Any) -> DecodeArrays:
        c = model.config
        width, heads, blocks, per_token = c.n_embd, c.n_head, list(model.blocks), bool(model.w8a8.per_token)
        head_dim, layers = width // heads, len(blocks)
        hidden = [block.c_fc.weight.shape[0] for block in blocks]
        f_max = max(hidden)
        wide = max(3 * width, f_max, c.vocab_size)
        w_fc, w_mlp = np.zeros((layers, f_max, width), np.int8), np.zeros((layers, width, f_max), np.int8)
        weight_scale, bias = np.zeros((layers + 1, 4, wide), np.float32), np.zeros((layers + 1, 4, wide), np.float32)
        has_bias = np.zeros((layers + 1, 4), np.bool_)
        input_scale, input_zero = np.ones((layers + 1, 4), np.float32), np.zeros((layers + 1, 4), np.int64)
        ln, ln_eps = np.zeros((layers, 4, width), np.float32), np.zeros((layers, 2), np.float32)
        attn_bias, qkv_scale = np.zeros((layers, 3 * width), np.int64), np.zeros((layers, 3 * width), np.float32)
        attn_m0, attn_shift = np.full((layers, 3 * width), 2**30, np.int64), np.zeros((layers, 3 * width), np.int64)
        score_scale = np.zeros(layers, np.float32)
        pv_m0, pv_shift = np.zeros(layers, np.int64), np.zeros(layers, np.int64)
        for i, block in enumerate(blocks):
            for j, norm in enumerate((block.ln_1, block.ln_2)):
                ln[i, 2 * j] = norm.weight.data
                ln[i, 2 * j + 1] = 0.0 if norm.bias is None else norm.bias.data
                ln_eps[i, j] = norm.eps
            attn, proj = block.c_attn, block.c_proj
            grids = [proj.input_qparams()] + [layer.input_qparams() for layer in (attn, block.c_fc, block.mlp_proj)
                                              if layer.static_input]
            if any(grid.spec != ACTIVATION for grid in grids):
                raise ValueError(f"FusedDecoder: static activation grids must be {ACTIVATION}")
            if attn.qkv_qparams().spec != QKV or attn.weight.shape[0] != 3 * width:
                raise ValueError(f"FusedDecoder: c_attn must map {width} -> {3 * width} onto {QKV} codes")
            for j, layer in enumerate((attn, proj, block.c_fc, block.mlp_proj)):
                input_scale[i, j], input_zero[i, j], weight_scale[i, j], bias[i, j], has_bias[i, j] = _linear(
                    layer, wide)
            if not per_token:
                attn_bias[i] = 0 if attn.bias_q is None else attn.bias_q
                attn_m0[i], attn_shift[i] = attn.m0, attn.shift
            qkv_scale[i] = attn.qkv_scale
            s_q, s_k, s_v = (float(attn.qkv_scale[part * width]) for part in range(3))
            score_scale[i] = np.float32(np.float32(s_q) * np.float32(s_k) * np.float32(1.0 / math.sqrt(head_dim)))
            pv_m0[i], pv_shift[i] = requantization_multipliers(self.prob_scale, np.float32(s_v), proj.input_scale)
            w_fc[i, :hidden[i]] = _checked_weight(block.c_fc)
            w_mlp[i, :, :hidden[i]] = _checked_weight(block.mlp_proj)
        head = model.lm_head
        input_scale[layers, 0], input_zero[layers, 0], weight_scale[layers, 0], bias[layers, 0], has_bias[layers, 0] = (
            _linear(head, wide))
        ln_f = np.zeros((3, width), np.float32)
        ln_f[0] = model.ln_f.weight.data
        ln_f[1] = 0.0 if model.ln_f.bias is None else model.ln_f.bias.data
        ln_f[2, 0] = model.ln_f.eps
        return DecodeArrays(
            wte=_f32(model.wte), wpe=_f32(model.wpe), ln=ln, ln_eps=ln_eps, ln_f=ln_f, input_scale=input_scale,
            input_zero=input_zero, hidden=np.array(hidden, np.int64),
            w_attn=np.stack([_checked_weight(block.c_attn) for block in blocks]), attn_bias=attn_bias,
            attn_m0=attn_m0, attn_shift=attn_shift, qkv_scale=qkv_scale, score_scale=score_scale, pv_m0=pv_m0,
            pv_shift=pv_shift, w_proj=np.stack([_checked_weight(block.c_proj) for block in blocks]), w_fc=w_fc,
            w_mlp=w_mlp, w_head=_checked_weight(head), weight_scale=weight_scale, bias=bias, has_bias=has_bias,
            heads=heads, per_token=per_token)

    def new_caches(self) -> FusedCaches:
        """Empty KV caches (batch 1) of the model's layout, held with the scratch of one generation (so that
        generations in several threads do not share buffers)."""
        caches = FusedCaches(self.model._new_caches(1), DecodeBuffers.empty(self.arrays))
        for i, cache in enumerate(caches):
            cache.keys, cache.values = caches.buffers.keys[i:i + 1], caches.buffers.values[i:i + 1]
        return caches

    def step(self, token: int, caches: FusedCaches) -> np.ndarray:
        """Logits (1, 1, V) of ``token`` after the cached positions (caches from :meth:`new_caches`), which
        gain its keys and values: the model's ``logits([[token]], caches, last_only=True)``, bit for bit."""
        if not isinstance(caches, FusedCaches):
            raise TypeError(f"FusedDecoder.step: caches must come from new_caches(), got {type(caches).__name__}")
        pos = caches[0].length
        if pos >= self.arrays.wpe.shape[0]:
            raise ValueError(f"FusedDecoder: a sequence of length {pos + 1} is longer than block_size "
                             f"{self.arrays.wpe.shape[0]}")
        if not decode_step(self.arrays, caches.buffers, int(token), pos, self.prob_scale, self.prob_zero):
            # a value that is not finite: the model's own step saturates or refuses it by name
            return self.model.logits(np.array([[token]], np.int64), caches, last_only=True)
        for cache in caches:
            cache.length = pos + 1
        return caches.buffers.logits.reshape(1, 1, -1).copy()


class FusedCaches(list):
    """The KV caches of one generation (a list of :class:`~nanoopt.models_gpt.KVCache`, one per block, as the
    model's own) whose keys and values live in ``buffers`` (:class:`~nanoopt.kernels.gpt_decode.DecodeBuffers`)."""

    def __init__(self, caches: list[KVCache], buffers: DecodeBuffers) -> None:
        super().__init__(caches)
        self.buffers = buffers
