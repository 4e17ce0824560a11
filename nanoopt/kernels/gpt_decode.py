"""One generated token of a W8A8 GPT at batch 1, with its int8 KV cache, in one compiled call.

At batch 1 a token of a 128-wide GPT is about a million multiply-adds: in microseconds of arithmetic, while a
step that calls one NumPy function or kernel per operation spends most of its time in call overhead.
:func:`decode_step` runs a whole step of the integer GPT of :mod:`nanoopt.quant.transformer` over preallocated
buffers, with no Python per operation; :func:`decode_step_reference` is its NumPy specification, operation by
operation the arithmetic of that model (Xiao et al. 2022 for the W8A8 linears; Jacob et al. 2018 for the grids
and the fixed-point requantization). For each block ``l``, on the float32 residual stream ``x (C,)``:

* ``h = LayerNorm(x)`` (float32, NumPy's ``mean``/``var`` order: pairwise sums, :func:`~.softmax.pairwise_sum`);
  ``a = clip(rint(h / s_x), qmin - z_x, qmax - z_x)``: the int8 input codes minus their zero point;
* ``c_attn``: ``acc_n = sum_k a_k W_nk + bias_n`` (exact integers), ``qkv_n = clip(M(acc_n; m0_n, shift_n),
  -127, 127)`` (gemmlowp's fixed-point multiply, the wide form of :func:`nanoopt.spec.requantize`); k and v are
  written to the cache at position ``pos``. With per-token activations (``per_token``) every linear that reads a
  float op quantizes its input symmetrically with ``s_x = max(float32(max |h| / 127), eps)``
  (:func:`nanoopt.spec.qparams`), and ``c_attn``'s dequantized output is rounded onto the q, k, v grids:
  ``clip(rint(y_n / s_n), -127, 127)``;
* per head: ``scores_s = float32(q . k_s) * (s_q s_k / sqrt(D))`` for ``s <= pos``, ``p = softmax(scores)``
  (:mod:`~nanoopt.float_kernels.softmax`), ``c_s = clip(rint(p_s / s_p), qmin - z_p, qmax - z_p)`` (0..255),
  ``o_d = clip(M(sum_s c_s v_sd; m0, shift) + z_o, qmin, qmax)``, the input codes of ``c_proj``;
* ``x += float32(sum_k (o_k - z_o) W_nk) * (s_x s_w)_n + b_n`` (``c_proj``); then
  ``x += mlp.c_proj(GELU(c_fc(LayerNorm(x))))`` with the same dequantized linears and the float32 GELU of
  :mod:`~nanoopt.float_kernels.gelu`;

then ``logits = lm_head(LayerNorm_f(x))``. Every float32 operation is the model's, in its order; every integer
sum is exact (int64; the int32 bound of each product is checked once by the caller). The kernel returns False
when a value it quantized was not finite (the caller then takes the model's own path, which raises or saturates).

Arguments (``L`` blocks, width ``C``, ``H`` heads of ``D``, MLP widths ``F_l <= F``, vocabulary ``V``, context
``P``): :class:`DecodeArrays` (the constant operands, built once per generation) and :class:`DecodeBuffers`
(the caches and scratch). The doctest below checks the kernel against the reference on random operands.

>>> arrays = random_arrays(np.random.default_rng(0), layers=2, width=8, heads=2, hidden=12, vocab=5, context=4)
>>> one, two = DecodeBuffers.empty(arrays), DecodeBuffers.empty(arrays)
>>> decode_step(arrays, one, 3, 0, 0.0039215689, -128), decode_step(arrays, one, 1, 1, 0.0039215689, -128)
(True, True)
>>> first = decode_step_reference(arrays, two, 3, 0, 0.0039215689, -128)
>>> bool((decode_step_reference(arrays, two, 1, 1, 0.0039215689, -128) == one.logits).all())
True
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np

from nanoopt.float_kernels.gelu import gelu_forward_reference, gelu_scalar
from nanoopt.float_kernels.layer_norm import layer_norm_row as _layer_norm
from nanoopt.float_kernels.softmax import softmax_reference, softmax_row
from nanoopt.kernels.requant import multiply_wide
from nanoopt.spec import QuantSpec, qparams, quantize, requantize

__all__ = ["ACTIVATION", "QKV", "TOKEN", "DecodeArrays", "DecodeBuffers", "decode_step", "decode_step_reference",
           "random_arrays"]

ACTIVATION = QuantSpec(bits=8)  # the linears' inputs and the attention output: asymmetric int8 per tensor
QKV = QuantSpec(bits=8, symmetric=True, narrow_range=True)  # q, k and v codes (zero point 0)
TOKEN = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, narrow_range=True)  # per-token rows
_ACT_MIN, _ACT_MAX, _QKV_MIN, _QKV_MAX = ACTIVATION.qmin, ACTIVATION.qmax, QKV.qmin, QKV.qmax
_TOKEN_MIN, _TOKEN_MAX, _TOKEN_HALF_LEVELS = TOKEN.qmin, TOKEN.qmax, (TOKEN.qmax - TOKEN.qmin) / 2.0
_EPS32 = np.float32(np.finfo(np.float32).eps)


class DecodeArrays(NamedTuple):
    """The constant operands of :func:`decode_step` (C order; biases of absent layers are zeros and unused)."""

    wte: np.ndarray  # (V, C) float32 token embeddings
    wpe: np.ndarray  # (P, C) float32 position embeddings
    ln: np.ndarray  # (L, 4, C) float32: ln_1 weight, ln_1 bias, ln_2 weight, ln_2 bias (zeros if absent)
    ln_eps: np.ndarray  # (L, 2) float32: ln_1 and ln_2 eps
    ln_f: np.ndarray  # (3, C) float32: ln_f weight, bias, and eps in [2, 0]
    input_scale: np.ndarray  # (L + 1, 4) float32: static input scales of c_attn, c_proj, c_fc, mlp.c_proj; head [L, 0]
    input_zero: np.ndarray  # (L + 1, 4) int64: their zero points, same places (per token: only c_proj's are used)
    hidden: np.ndarray  # (L,) int64: the MLP width F_l of each block
    w_attn: np.ndarray  # (L, 3C, C) int8
    attn_bias: np.ndarray  # (L, 3C) int64: bias codes (scale s_x s_w)
    attn_m0: np.ndarray  # (L, 3C) int64: fixed-point multipliers onto the q, k, v grids
    attn_shift: np.ndarray  # (L, 3C) int64
    qkv_scale: np.ndarray  # (L, 3C) float32: the q, k, v grids (per token: the float output is rounded onto them)
    score_scale: np.ndarray  # (L,) float32: s_q s_k / sqrt(D), as float32 products
    pv_m0: np.ndarray  # (L,) int64: the P V multiplier s_p s_v / s_o
    pv_shift: np.ndarray  # (L,) int64
    w_proj: np.ndarray  # (L, C, C) int8 (attn.c_proj)
    w_fc: np.ndarray  # (L, F, C) int8 (rows past F_l unused)
    w_mlp: np.ndarray  # (L, C, F) int8 (mlp.c_proj; columns past F_l unused)
    w_head: np.ndarray  # (V, C) int8
    weight_scale: np.ndarray  # (L + 1, 4, max(3C, F, V)) float32: s_w of c_attn, c_proj, c_fc, mlp.c_proj; head [L, 0]
    bias: np.ndarray  # (L + 1, 4, max(3C, F, V)) float32: their float biases, same places
    has_bias: np.ndarray  # (L + 1, 4) bool: whether those biases exist
    heads: int  # H
    per_token: bool  # c_attn, c_fc, mlp.c_proj and the head quantize their input per token (symmetric, dynamic)


class DecodeBuffers(NamedTuple):
    """The KV cache (int8 codes) and the scratch of :func:`decode_step`; ``logits`` holds its result."""

    keys: np.ndarray  # (L, H, P, D) int8
    values: np.ndarray  # (L, H, P, D) int8
    x: np.ndarray  # (C,) float32 residual stream
    h: np.ndarray  # (max(C, F),) float32 LayerNorm / MLP activations
    centred: np.ndarray  # (max(C, F),) int16 input codes minus zero point
    qkv: np.ndarray  # (3C,) int8
    projected: np.ndarray  # (3C,) float32 (per token: c_attn's float output)
    attended: np.ndarray  # (C,) int16 attention output codes minus zero point
    scores: np.ndarray  # (P,) float32
    weights: np.ndarray  # (P,) int16 probability codes minus zero point (0..255)
    head_acc: np.ndarray  # (D,) int64
    logits: np.ndarray  # (V,) float32

    @classmethod
    def empty(cls, arrays: DecodeArrays) -> DecodeBuffers:
        """Buffers for ``arrays`` (the cache uninitialised: positions are written before they are read)."""
        layers, width = arrays.ln.shape[0], arrays.ln.shape[2]
        wide = max(width, arrays.w_fc.shape[1])
        context, head_dim = arrays.wpe.shape[0], width // arrays.heads
        cache = (layers, arrays.heads, context, head_dim)
        f32, i16 = np.float32, np.int16
        return cls(np.empty(cache, np.int8), np.empty(cache, np.int8), np.empty(width, f32), np.empty(wide, f32),
                   np.empty(wide, i16), np.empty(3 * width, np.int8), np.empty(3 * width, f32), np.empty(width, i16),
                   np.empty(context, f32), np.empty(context, i16), np.empty(head_dim, np.int64),
                   np.empty(arrays.wte.shape[0], f32))


# ------------------------------------------------------------------------------------------ compiled pieces
@numba.njit(cache=True, nogil=True)
def _quantize_centred(x, count, scale, zero, qmin, qmax, out):  # pragma: no cover - compiled
    """``out[:count] = clip(rint(x / scale), qmin - zero, qmax - zero)`` (float32 quotient, half to even): the
    codes of :func:`nanoopt.spec.quantize` minus ``zero``; False if a value was not finite."""
    low, high = np.float32(qmin - zero), np.float32(qmax - zero)
    finite = True
    for i in range(count):
        value = x[i]
        finite &= value - value == 0
        out[i] = np.int64(min(max(np.float32(np.rint(value / scale)), low), high))
    return finite


@numba.njit(cache=True, nogil=True)
def _round_onto_grids(y, scales, out):  # pragma: no cover - compiled
    """``out = clip(rint(y / scales), qmin, qmax)`` elementwise on the QKV grids (zero point 0); False if a value
    was not finite."""
    finite = True
    for i in range(y.size):
        value = y[i]
        finite &= value - value == 0
        out[i] = np.int64(min(max(np.float32(np.rint(value / scales[i])), np.float32(_QKV_MIN)),
                              np.float32(_QKV_MAX)))
    return finite


@numba.njit(cache=True, nogil=True)
def _token_scale(x, count):  # pragma: no cover - compiled
    """:func:`nanoopt.spec.qparams` of ``[-max |x|, max |x|]`` on the TOKEN grid: ``max(float32(peak / 127), eps)``."""
    peak = np.float32(0.0)
    for i in range(count):
        value = abs(x[i])
        peak = value if value > peak else peak
    return max(np.float32(np.float64(peak) / _TOKEN_HALF_LEVELS), _EPS32)


@numba.njit(cache=True, nogil=True)
def _input_codes(x, count, scale, zero, per_token, out):  # pragma: no cover - compiled
    """A linear's input codes minus zero point into ``out``: on its static grid, or per token (symmetric, scale
    from the row's peak). Returns (all values finite, the scale used)."""
    if per_token:
        scale = _token_scale(x, count)
        return _quantize_centred(x, count, scale, 0, _TOKEN_MIN, _TOKEN_MAX, out), scale
    return _quantize_centred(x, count, scale, zero, _ACT_MIN, _ACT_MAX, out), scale


@numba.njit(cache=True, nogil=True)
def _dequantized_linear(a, weight, rows, cols, x_scale, w_scale, bias, has_bias, out, accumulate):  # pragma: no cover
    """``out[n] (+)= float32(sum_k a_k weight[n, k]) * (s_x s_w[n]) (+ bias[n])`` for n < rows, k < cols."""
    for n in range(rows):
        acc = 0
        for k in range(cols):
            acc += np.int32(a[k]) * np.int32(weight[n, k])
        y = np.float32(acc) * (x_scale * w_scale[n])
        if has_bias:
            y = y + bias[n]
        out[n] = out[n] + y if accumulate else y


@numba.njit(cache=True, nogil=True)
def _attention(p, b, layer, pos, prob_scale, prob_zero):  # pragma: no cover - compiled
    """q, k, v codes (``b.qkv``) -> attention output codes minus zero point (``b.attended``); caches k and v."""
    width = p.ln.shape[2]
    head_dim = width // p.heads
    zero_out = p.input_zero[layer, 1]
    for head in range(p.heads):
        base = head * head_dim
        for d in range(head_dim):
            b.keys[layer, head, pos, d] = b.qkv[width + base + d]
            b.values[layer, head, pos, d] = b.qkv[2 * width + base + d]
        for s in range(pos + 1):
            acc = 0
            for d in range(head_dim):
                acc += np.int32(b.qkv[base + d]) * np.int32(b.keys[layer, head, s, d])
            b.scores[s] = np.float32(acc) * p.score_scale[layer]
        softmax_row(b.scores, pos + 1)
        _quantize_centred(b.scores, pos + 1, prob_scale, prob_zero, _ACT_MIN, _ACT_MAX, b.weights)
        b.head_acc[:] = 0
        for s in range(pos + 1):
            weight = np.int64(b.weights[s])
            for d in range(head_dim):
                b.head_acc[d] += weight * b.values[layer, head, s, d]
        for d in range(head_dim):
            code = min(max(multiply_wide(b.head_acc[d], p.pv_m0[layer], p.pv_shift[layer]) + zero_out, _ACT_MIN),
                       _ACT_MAX)
            b.attended[base + d] = code - zero_out


@numba.njit(cache=True, nogil=True)
def decode_step(p, b, token, pos, prob_scale, prob_zero):  # pragma: no cover - compiled
    """One token ``token`` at position ``pos`` (the cache holds positions ``0..pos-1``): logits into
    ``b.logits``, k and v into the cache at ``pos``. ``prob_scale``/``prob_zero``: the grid of the attention
    probabilities (float32, int). Returns False if a quantized value was not finite."""
    layers, width = p.ln.shape[0], p.ln.shape[2]
    x, h, a = b.x, b.h, b.centred
    for i in range(width):
        x[i] = p.wte[token, i] + p.wpe[pos, i]
    finite = True
    for layer in range(layers):
        _layer_norm(x, p.ln[layer, 0], p.ln[layer, 1], p.ln_eps[layer, 0], h[:width])
        ok, s_x = _input_codes(h, width, p.input_scale[layer, 0], p.input_zero[layer, 0], p.per_token, a)
        finite &= ok
        if p.per_token:  # float output rounded onto the q, k, v grids
            _dequantized_linear(a, p.w_attn[layer], 3 * width, width, s_x, p.weight_scale[layer, 0], p.bias[layer, 0],
                                p.has_bias[layer, 0], b.projected, False)
            finite &= _round_onto_grids(b.projected, p.qkv_scale[layer], b.qkv)
        else:  # integer requantization onto the q, k, v grids
            for n in range(3 * width):
                acc = np.int64(p.attn_bias[layer, n])
                for k in range(width):
                    acc += np.int32(a[k]) * np.int32(p.w_attn[layer, n, k])
                b.qkv[n] = min(max(multiply_wide(acc, p.attn_m0[layer, n], p.attn_shift[layer, n]), _QKV_MIN),
                               _QKV_MAX)
        _attention(p, b, layer, pos, np.float32(prob_scale), prob_zero)
        _dequantized_linear(b.attended, p.w_proj[layer], width, width, p.input_scale[layer, 1],
                            p.weight_scale[layer, 1], p.bias[layer, 1], p.has_bias[layer, 1], x, True)
        _layer_norm(x, p.ln[layer, 2], p.ln[layer, 3], p.ln_eps[layer, 1], h[:width])
        ok, s_x = _input_codes(h, width, p.input_scale[layer, 2], p.input_zero[layer, 2], p.per_token, a)
        finite &= ok
        hidden = p.hidden[layer]
        _dequantized_linear(a, p.w_fc[layer], hidden, width, s_x, p.weight_scale[layer, 2], p.bias[layer, 2],
                            p.has_bias[layer, 2], h, False)
        for n in range(hidden):
            h[n] = gelu_scalar(h[n])[0]
        ok, s_x = _input_codes(h, hidden, p.input_scale[layer, 3], p.input_zero[layer, 3], p.per_token, a)
        finite &= ok
        _dequantized_linear(a, p.w_mlp[layer], width, hidden, s_x, p.weight_scale[layer, 3], p.bias[layer, 3],
                            p.has_bias[layer, 3], x, True)
    _layer_norm(x, p.ln_f[0], p.ln_f[1], p.ln_f[2, 0], h[:width])
    ok, s_x = _input_codes(h, width, p.input_scale[layers, 0], p.input_zero[layers, 0], p.per_token, a)
    finite &= ok
    _dequantized_linear(a, p.w_head, p.w_head.shape[0], width, s_x, p.weight_scale[layers, 0], p.bias[layers, 0],
                        p.has_bias[layers, 0], b.logits, False)
    return finite


# ------------------------------------------------------------------------------------------ the specification
def _layer_norm_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: np.float32) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    return ((x - mean) * inv_std).astype(x.dtype) * weight + bias


def _centred_reference(x: np.ndarray, scale: np.float32, zero: int, per_token: bool) -> tuple[np.ndarray, Any]:
    """A linear's input codes minus zero point, and their scale (static grid, or per token)."""
    if per_token:  # as one row (M = 1) of the model's per-token quantization
        peak = np.abs(x).max(axis=-1, keepdims=True)
        scale, _ = qparams(-peak.reshape(-1), peak.reshape(-1), TOKEN)
        return quantize(x[None], scale, np.zeros(1, np.int32), TOKEN)[0].astype(np.int64), scale[0]
    return quantize(x, scale, np.int32(zero), ACTIVATION).astype(np.int64) - zero, scale


def _linear_reference(a: np.ndarray, weight: np.ndarray, x_scale: Any, w_scale: np.ndarray, bias: np.ndarray,
                      has_bias: bool) -> np.ndarray:
    acc = weight.astype(np.int64) @ a  # exact
    y = acc.astype(np.float32) * (np.asarray(x_scale, np.float32) * w_scale)
    return y + bias if has_bias else y


def decode_step_reference(p: DecodeArrays, b: DecodeBuffers, token: int, pos: int, prob_scale: float,
                          prob_zero: int) -> np.ndarray:
    """:func:`decode_step` in NumPy (the specification): returns the logits (V,) float32 and writes k, v codes
    into ``b.keys``/``b.values`` at ``pos`` (``b.logits`` is left alone)."""
    layers, width = p.ln.shape[0], p.ln.shape[2]
    heads, head_dim = p.heads, width // p.heads
    x = p.wte[token] + p.wpe[pos]  # (C,)
    for layer in range(layers):
        scales, zeros, w_scale, bias, has_bias = (p.input_scale[layer], p.input_zero[layer], p.weight_scale[layer],
                                                  p.bias[layer], p.has_bias[layer])
        h = _layer_norm_reference(x, p.ln[layer, 0], p.ln[layer, 1], p.ln_eps[layer, 0])
        a, s_x = _centred_reference(h, scales[0], zeros[0], p.per_token)
        if p.per_token:
            y = _linear_reference(a, p.w_attn[layer], s_x, w_scale[0, :3 * width], bias[0, :3 * width], has_bias[0])
            spec = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=-1, narrow_range=True)
            qkv = quantize(y, p.qkv_scale[layer], np.zeros(3 * width, np.int32), spec)
        else:
            acc = p.w_attn[layer].astype(np.int64) @ a + p.attn_bias[layer]
            qkv = requantize(acc, p.attn_m0[layer], p.attn_shift[layer], 0, QKV)
        qkv = qkv.reshape(3, heads, head_dim)
        b.keys[layer, :, pos], b.values[layer, :, pos] = qkv[1], qkv[2]
        keys, values = b.keys[layer, :, :pos + 1].astype(np.int64), b.values[layer, :, :pos + 1].astype(np.int64)
        scores = np.einsum("hd,hsd->hs", qkv[0].astype(np.int64), keys).astype(np.float32) * p.score_scale[layer]
        probs = quantize(softmax_reference(scores), np.float32(prob_scale), np.int32(prob_zero), ACTIVATION)
        acc = np.einsum("hs,hsd->hd", probs.astype(np.int64) - prob_zero, values)  # (H, D)
        out = requantize(acc, p.pv_m0[layer], p.pv_shift[layer], zeros[1], ACTIVATION).reshape(width)
        x = x + _linear_reference(out.astype(np.int64) - zeros[1], p.w_proj[layer], scales[1], w_scale[1, :width],
                                  bias[1, :width], has_bias[1])
        h = _layer_norm_reference(x, p.ln[layer, 2], p.ln[layer, 3], p.ln_eps[layer, 1])
        a, s_x = _centred_reference(h, scales[2], zeros[2], p.per_token)
        hidden = p.hidden[layer]
        u = _linear_reference(a, p.w_fc[layer, :hidden], s_x, w_scale[2, :hidden], bias[2, :hidden], has_bias[2])
        a, s_x = _centred_reference(gelu_forward_reference(u)[0], scales[3], zeros[3], p.per_token)
        x = x + _linear_reference(a, p.w_mlp[layer, :, :hidden], s_x, w_scale[3, :width], bias[3, :width],
                                  has_bias[3])
    h = _layer_norm_reference(x, p.ln_f[0], p.ln_f[1], p.ln_f[2, 0])
    a, s_x = _centred_reference(h, p.input_scale[layers, 0], p.input_zero[layers, 0], p.per_token)
    vocab = p.w_head.shape[0]
    return _linear_reference(a, p.w_head, s_x, p.weight_scale[layers, 0, :vocab], p.bias[layers, 0, :vocab],
                             p.has_bias[layers, 0])


def random_arrays(rng: np.random.Generator, layers: int, width: int, heads: int, hidden: int, vocab: int,
                  context: int, per_token: bool = False) -> DecodeArrays:
    """Random operands of the right shapes and ranges (for tests and examples; MLP widths drawn up to ``hidden``).

    >>> random_arrays(np.random.default_rng(0), 1, 4, 2, 6, 3, 5).w_attn.shape
    (1, 12, 4)
    """
    f32 = np.float32

    def codes(*shape: int) -> np.ndarray:
        return rng.integers(-127, 128, size=shape).astype(np.int8)

    def multipliers(*shape: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(2**30, 2**31, size=shape), rng.integers(8, 14, size=shape)

    wide = max(3 * width, hidden, vocab)
    ln = np.stack([rng.uniform(0.5, 1.5, (layers, width)), rng.normal(0, 0.1, (layers, width))] * 2, axis=1)
    attn_m0, attn_shift = multipliers(layers, 3 * width)
    pv_m0, pv_shift = rng.integers(2**30, 2**31, size=layers), rng.integers(14, 18, size=layers)
    return DecodeArrays(
        wte=rng.normal(0, 1, (vocab, width)).astype(f32), wpe=rng.normal(0, 0.3, (context, width)).astype(f32),
        ln=ln.astype(f32), ln_eps=np.full((layers, 2), 1e-5, f32),
        ln_f=np.concatenate([ln[0, :2], np.full((1, width), 1e-5)]).astype(f32),
        input_scale=rng.uniform(0.01, 0.05, (layers + 1, 4)).astype(f32),
        input_zero=rng.integers(-20, 21, size=(layers + 1, 4)), hidden=rng.integers(1, hidden + 1, size=layers),
        w_attn=codes(layers, 3 * width, width), attn_bias=rng.integers(-3000, 3001, size=(layers, 3 * width)),
        attn_m0=attn_m0, attn_shift=attn_shift, qkv_scale=rng.uniform(0.005, 0.05, (layers, 3 * width)).astype(f32),
        score_scale=rng.uniform(1e-4, 1e-3, layers).astype(f32),
        pv_m0=pv_m0, pv_shift=pv_shift, w_proj=codes(layers, width, width), w_fc=codes(layers, hidden, width),
        w_mlp=codes(layers, width, hidden), w_head=codes(vocab, width),
        weight_scale=rng.uniform(1e-4, 3e-3, (layers + 1, 4, wide)).astype(f32),
        bias=rng.normal(0, 0.1, (layers + 1, 4, wide)).astype(f32), has_bias=rng.random((layers + 1, 4)) < 0.7,
        heads=heads, per_token=per_token)
