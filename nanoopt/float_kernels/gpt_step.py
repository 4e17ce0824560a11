"""One generated token of a float32 GPT at batch 1, with its KV cache, in one compiled call.

A token of the chargpt GPT (4 blocks, width 128) is about 0.8 million multiply-adds: microseconds of arithmetic,
while a step that calls one NumPy function per operation (:meth:`nanoopt.models_gpt.GPT._array_logits`) spends
most of its time in call overhead. :func:`gpt_step` runs a whole step of the nanoGPT architecture (Radford et al.
2019; pre-LN blocks, Xiong et al. 2020) over preallocated buffers with no Python per operation, the float32
counterpart of :mod:`nanoopt.kernels.gpt_decode`; :func:`gpt_step_reference` is its NumPy specification, operation
by operation. For each block ``l``, on the float32 residual stream ``x = wte[token] + wpe[pos]`` (C,):

* ``h = LayerNorm(x)`` (:func:`~nanoopt.float_kernels.layer_norm.layer_norm_row`: the bits of ``ops.LayerNorm``);
* ``qkv = h W_attn^T + b_attn`` (3I,), ``I = H_l D``; k and v of every head are written to the cache at ``pos``;
* per head: ``scores_s = (q . k_s) * (1 / sqrt D)`` for ``s <= pos``, ``p = softmax(scores)``
  (:func:`~nanoopt.float_kernels.softmax.softmax_row`, whose exponential NumPy and Numba evaluate alike),
  ``o = sum_s p_s v_s``;
* ``x = x + (o W_proj^T + b_proj)``; ``x = x + (GELU(LayerNorm(x) W_fc^T + b_fc) W_mlp^T + b_mlp)`` (the exact
  GELU of :func:`~nanoopt.float_kernels.gelu.gelu_scalar`, the bits of ``ops.GELU``);

then ``logits = LayerNorm_f(x) W_head^T``. Every product has one fixed order: ``y_n = sum_k x_k W^T_kn``
accumulated over ``k`` in increasing order, starting from ``x_0 W^T_0n``, each term a float32 product added to
the sum (no fused multiply-add: Numba does not contract without ``fastmath``), the bias added after the sum; the
dot products ``q . k_s`` over ``d`` and the sums ``sum_s p_s v_s`` over ``s`` likewise. The kernel runs these as
vector operations over ``n`` (``W^T`` stored (in, out), the keys (D, P) per head), and the reference as a loop of
NumPy vector operations in the same order, so both give the same bits (a hypothesis test checks logits and
caches token after token). BLAS sums in another order: the logits agree with ``GPT.forward`` to float32 rounding.

Arguments (``L`` blocks, width ``C``, ``H_l <= H`` heads of ``D`` per block, ``I = H D``, MLP widths
``F_l <= F``, vocabulary ``V``, context ``P``): :class:`StepArrays` (the constant operands, built and checked
once per generation by :func:`step_arrays`) and :class:`StepBuffers` (the caches and scratch). No check is made
per call beyond Numba's typing: the caller keeps ``0 <= token < V`` and ``0 <= pos < P``, positions in order.

>>> arrays = random_arrays(np.random.default_rng(0), layers=2, width=8, heads=2, hidden=12, vocab=5, context=4)
>>> fused, spec = StepBuffers.empty(arrays), StepBuffers.empty(arrays)
>>> gpt_step(arrays, fused, 3, 0); gpt_step(arrays, fused, 1, 1)
>>> first = gpt_step_reference(arrays, spec, 3, 0)
>>> bool((gpt_step_reference(arrays, spec, 1, 1) == fused.logits).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np

from nanoopt.float_kernels.gelu import gelu_forward_reference, gelu_scalar
from nanoopt.float_kernels.layer_norm import layer_norm_reference, layer_norm_row
from nanoopt.float_kernels.softmax import softmax_reference, softmax_row

__all__ = ["BlockWeights", "StepArrays", "StepBuffers", "gpt_step", "gpt_step_reference", "random_arrays",
           "step_arrays"]


class StepArrays(NamedTuple):
    """The constant operands of :func:`gpt_step` (C-contiguous float32 but ``heads``/``hidden``; padding zero)."""

    wte: np.ndarray  # (V, C) token embeddings
    wpe: np.ndarray  # (P, C) position embeddings
    ln: np.ndarray  # (L, 4, C): ln_1 weight, ln_1 bias, ln_2 weight, ln_2 bias (zeros if absent)
    ln_eps: np.ndarray  # (L, 2): ln_1 and ln_2 eps
    ln_f: np.ndarray  # (3, C): ln_f weight, bias, and eps in [2, 0]
    heads: np.ndarray  # (L,) int64: H_l, the heads of each block
    hidden: np.ndarray  # (L,) int64: F_l, the MLP width of each block
    w_attn: np.ndarray  # (L, C, 3I): c_attn's W^T, q, k, v in columns [0, I_l), [I_l, 2 I_l), [2 I_l, 3 I_l)
    b_attn: np.ndarray  # (L, 3I): its bias, same columns
    w_proj: np.ndarray  # (L, I, C): attn.c_proj's W^T (rows past I_l unused)
    b_proj: np.ndarray  # (L, C)
    w_fc: np.ndarray  # (L, C, F): mlp.c_fc's W^T (columns past F_l unused)
    b_fc: np.ndarray  # (L, F)
    w_mlp: np.ndarray  # (L, F, C): mlp.c_proj's W^T (rows past F_l unused)
    b_mlp: np.ndarray  # (L, C)
    w_head: np.ndarray  # (C, V): lm_head's W^T (no bias)
    head_dim: int  # D
    scale: np.float32  # 1 / sqrt(D), the attention scale, as float32


class StepBuffers(NamedTuple):
    """The KV cache and the scratch of :func:`gpt_step`; ``logits`` holds its result."""

    keys: np.ndarray  # (L, H, D, P) float32: keys transposed, so that the scores are vector operations over P
    values: np.ndarray  # (L, H, P, D) float32
    x: np.ndarray  # (C,) residual stream
    normed: np.ndarray  # (C,) LayerNorm output
    wide: np.ndarray  # (max(3I, F),) c_attn's output, then the MLP's hidden activations
    attended: np.ndarray  # (I,) attention output of the heads
    delta: np.ndarray  # (C,) a residual branch's product
    scores: np.ndarray  # (P,) one head's scores, then its probabilities
    logits: np.ndarray  # (V,)

    @classmethod
    def empty(cls, arrays: StepArrays) -> StepBuffers:
        """Buffers for ``arrays`` (the cache uninitialised: positions are written before they are read)."""
        layers, width = arrays.ln.shape[0], arrays.ln.shape[2]
        inner, hidden = arrays.w_proj.shape[1], arrays.w_fc.shape[2]
        context, head_dim = arrays.wpe.shape[0], arrays.head_dim
        heads = inner // head_dim
        f32 = np.float32
        return cls(np.empty((layers, heads, head_dim, context), f32), np.empty((layers, heads, context, head_dim), f32),
                   np.empty(width, f32), np.empty(width, f32), np.empty(max(3 * inner, hidden), f32),
                   np.empty(inner, f32), np.empty(width, f32), np.empty(context, f32),
                   np.empty(arrays.wte.shape[0], f32))


class BlockWeights(NamedTuple):
    """One block's float32 operands for :func:`step_arrays`, weights as ``W^T`` (in, out); absent biases None."""

    ln_1: tuple  # (weight (C,), bias (C,) or None, eps)
    attn: tuple  # (W^T (C, 3 H_l D), bias (3 H_l D,) or None)
    proj: tuple  # (W^T (H_l D, C), bias (C,) or None)
    ln_2: tuple  # (weight (C,), bias (C,) or None, eps)
    fc: tuple  # (W^T (C, F_l), bias (F_l,) or None)
    mlp: tuple  # (W^T (F_l, C), bias (C,) or None)
    heads: int  # H_l


# ------------------------------------------------------------------------------------------ compiled pieces
@numba.njit(cache=True, nogil=True)
def _product(x, rows, weight, cols, out):  # pragma: no cover - compiled
    """``out[:cols] = sum_k x[k] * weight[k, :cols]`` for k = 0..rows-1 in order (``rows >= 1``). Four rows per
    pass over ``out`` (the same additions in the same order, a quarter of the loads and stores of ``out``)."""
    first = x[0]
    for n in range(cols):
        out[n] = first * weight[0, n]
    k = 1
    while k + 4 <= rows:
        a0, a1, a2, a3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        r0, r1, r2, r3 = weight[k], weight[k + 1], weight[k + 2], weight[k + 3]
        for n in range(cols):
            out[n] = (((out[n] + a0 * r0[n]) + a1 * r1[n]) + a2 * r2[n]) + a3 * r3[n]
        k += 4
    while k < rows:
        value = x[k]
        row = weight[k]
        for n in range(cols):
            out[n] += value * row[n]
        k += 1


@numba.njit(cache=True, nogil=True)
def _add_branch(x, delta, bias):  # pragma: no cover - compiled
    """``x = x + (delta + bias)``: a residual branch's bias, then the residual."""
    for n in range(x.size):
        x[n] = x[n] + (delta[n] + bias[n])


@numba.njit(cache=True, nogil=True)
def _attention(p, b, layer, pos):  # pragma: no cover - compiled
    """q, k, v (``b.wide``) -> the heads' outputs (``b.attended``); k and v cached at ``pos``."""
    head_dim = p.head_dim
    inner = p.heads[layer] * head_dim
    q, scores, count = b.wide, b.scores, pos + 1
    for head in range(p.heads[layer]):
        base = head * head_dim
        keys, values = b.keys[layer, head], b.values[layer, head]
        for d in range(head_dim):
            keys[d, pos] = b.wide[inner + base + d]
            values[pos, d] = b.wide[2 * inner + base + d]
        first = q[base]
        for s in range(count):
            scores[s] = first * keys[0, s]
        for d in range(1, head_dim):
            value = q[base + d]
            row = keys[d]
            for s in range(count):
                scores[s] += value * row[s]
        for s in range(count):
            scores[s] = scores[s] * p.scale
        softmax_row(scores, count)
        out = b.attended[base:base + head_dim]
        first = scores[0]
        for d in range(head_dim):
            out[d] = first * values[0, d]
        for s in range(1, count):
            weight = scores[s]
            row = values[s]
            for d in range(head_dim):
                out[d] += weight * row[d]


@numba.njit(cache=True, nogil=True)
def gpt_step(p, b, token, pos):  # pragma: no cover - compiled
    """One token ``token`` at position ``pos`` (the cache holds positions ``0..pos-1``): logits into
    ``b.logits``, every block's k and v into the cache at ``pos``."""
    layers, width = p.ln.shape[0], p.ln.shape[2]
    x, normed, wide = b.x, b.normed, b.wide
    for i in range(width):
        x[i] = p.wte[token, i] + p.wpe[pos, i]
    for layer in range(layers):
        inner, hidden = p.heads[layer] * p.head_dim, p.hidden[layer]
        layer_norm_row(x, p.ln[layer, 0], p.ln[layer, 1], p.ln_eps[layer, 0], normed)
        _product(normed, width, p.w_attn[layer], 3 * inner, wide)
        for n in range(3 * inner):
            wide[n] = wide[n] + p.b_attn[layer, n]
        _attention(p, b, layer, pos)
        _product(b.attended, inner, p.w_proj[layer], width, b.delta)
        _add_branch(x, b.delta, p.b_proj[layer])
        layer_norm_row(x, p.ln[layer, 2], p.ln[layer, 3], p.ln_eps[layer, 1], normed)
        _product(normed, width, p.w_fc[layer], hidden, wide)
        for n in range(hidden):
            wide[n] = gelu_scalar(wide[n] + p.b_fc[layer, n])[0]
        _product(wide, hidden, p.w_mlp[layer], width, b.delta)
        _add_branch(x, b.delta, p.b_mlp[layer])
    layer_norm_row(x, p.ln_f[0], p.ln_f[1], p.ln_f[2, 0], normed)
    _product(normed, width, p.w_head, p.w_head.shape[1], b.logits)


# ------------------------------------------------------------------------------------------ the specification
def _product_reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``sum_k x[k] * weight[k]`` over the rows of ``weight`` in order, as float32 vector operations."""
    out = x[0] * weight[0]
    for k in range(1, x.shape[0]):
        out = out + x[k] * weight[k]
    return out


def gpt_step_reference(p: StepArrays, b: StepBuffers, token: int, pos: int) -> np.ndarray:
    """:func:`gpt_step` in NumPy (the specification): returns the logits (V,) float32 and writes k and v into
    ``b.keys``/``b.values`` at ``pos`` (``b.logits`` is left alone)."""
    head_dim = p.head_dim
    x = p.wte[token] + p.wpe[pos]  # (C,)
    for layer in range(p.ln.shape[0]):
        heads, hidden = int(p.heads[layer]), int(p.hidden[layer])
        inner = heads * head_dim
        h = layer_norm_reference(x, p.ln[layer, 0], p.ln[layer, 1], p.ln_eps[layer, 0])
        qkv = _product_reference(h, p.w_attn[layer, :, :3 * inner]) + p.b_attn[layer, :3 * inner]
        q, k, v = qkv.reshape(3, heads, head_dim)
        b.keys[layer, :heads, :, pos], b.values[layer, :heads, pos] = k, v
        out = np.empty((heads, head_dim), np.float32)
        for head in range(heads):
            keys, values = b.keys[layer, head, :, :pos + 1], b.values[layer, head, :pos + 1]  # (D, S), (S, D)
            probs = softmax_reference(_product_reference(q[head], keys) * p.scale)
            out[head] = _product_reference(probs, values)
        x = x + (_product_reference(out.reshape(inner), p.w_proj[layer, :inner]) + p.b_proj[layer])
        h = layer_norm_reference(x, p.ln[layer, 2], p.ln[layer, 3], p.ln_eps[layer, 1])
        u = gelu_forward_reference(_product_reference(h, p.w_fc[layer, :, :hidden]) + p.b_fc[layer, :hidden])[0]
        x = x + (_product_reference(u, p.w_mlp[layer, :hidden]) + p.b_mlp[layer])
    return _product_reference(layer_norm_reference(x, p.ln_f[0], p.ln_f[1], p.ln_f[2, 0]), p.w_head)


# ------------------------------------------------------------------------------------------ building the operands
def _checked(name: str, value: object, shape: tuple[int, ...], optional: bool = False) -> np.ndarray:
    """``value`` as a float32 array of ``shape`` (zeros for an optional None), or a ValueError naming it."""
    if value is None and optional:
        return np.zeros(shape, np.float32)
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != shape:
        raise ValueError(f"step_arrays: {name} must be a float32 array of shape {shape}, got "
                         f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")
    return value


def step_arrays(wte: np.ndarray, wpe: np.ndarray, blocks: Sequence[BlockWeights], ln_f: tuple, w_head: np.ndarray,
                head_dim: int) -> StepArrays:
    """The operands of :func:`gpt_step`, checked once (dtypes and shapes, each named in the error) and copied into
    C-contiguous stacked arrays: ``wte (V, C)``, ``wpe (P, C)``, one :class:`BlockWeights` per block, ``ln_f =
    (weight, bias or None, eps)``, ``w_head`` the head's ``W^T (C, V)``, and the heads' width ``head_dim``.

    >>> c, f = np.ones(4, np.float32), np.float32
    >>> block = BlockWeights((c, None, 1e-5), (np.zeros((4, 12), f), None), (np.zeros((4, 4), f), None),
    ...                      (c, None, 1e-5), (np.zeros((4, 16), f), None), (np.zeros((16, 4), f), None), 2)
    >>> step_arrays(np.zeros((3, 4), f), np.zeros((5, 4), f), [block], (c, None, 1e-5), np.zeros((4, 3), f),
    ...             2).w_attn.shape
    (1, 4, 12)
    """
    if not isinstance(head_dim, (int, np.integer)) or head_dim < 1 or not blocks:
        raise ValueError(f"step_arrays: need head_dim >= 1 and at least one block, got {head_dim!r} and "
                         f"{len(blocks)} blocks")
    if not isinstance(wte, np.ndarray) or wte.ndim != 2:
        raise ValueError(f"step_arrays: wte must be a (V, C) float32 array, got {getattr(wte, 'shape', wte)!r}")
    vocab, width = wte.shape
    _checked("wte", wte, (vocab, width))
    _checked("wpe", wpe, (getattr(wpe, "shape", (0,))[0], width))
    layers = len(blocks)
    heads = np.array([block.heads for block in blocks], np.int64)
    hidden = np.array([block.mlp[0].shape[0] if isinstance(block.mlp[0], np.ndarray) else 0 for block in blocks],
                      np.int64)
    if (heads < 1).any() or (hidden < 1).any():
        raise ValueError(f"step_arrays: every block needs heads >= 1 and an MLP width >= 1, got heads "
                         f"{heads.tolist()} and widths {hidden.tolist()}")
    inner, wide = int(heads.max()) * head_dim, int(hidden.max())
    f32 = np.float32
    ln, ln_eps = np.zeros((layers, 4, width), f32), np.zeros((layers, 2), f32)
    w_attn, b_attn = np.zeros((layers, width, 3 * inner), f32), np.zeros((layers, 3 * inner), f32)
    w_proj, b_proj = np.zeros((layers, inner, width), f32), np.zeros((layers, width), f32)
    w_fc, b_fc = np.zeros((layers, width, wide), f32), np.zeros((layers, wide), f32)
    w_mlp, b_mlp = np.zeros((layers, wide, width), f32), np.zeros((layers, width), f32)
    for layer, block in enumerate(blocks):
        i, f, name = int(heads[layer]) * head_dim, int(hidden[layer]), f"blocks[{layer}]"
        for j, norm in enumerate((block.ln_1, block.ln_2)):
            ln[layer, 2 * j] = _checked(f"{name} LayerNorm weight", norm[0], (width,))
            ln[layer, 2 * j + 1] = _checked(f"{name} LayerNorm bias", norm[1], (width,), optional=True)
            ln_eps[layer, j] = norm[2]
        w_attn[layer, :, :3 * i] = _checked(f"{name}.attn W^T", block.attn[0], (width, 3 * i))
        b_attn[layer, :3 * i] = _checked(f"{name}.attn bias", block.attn[1], (3 * i,), optional=True)
        w_proj[layer, :i] = _checked(f"{name}.proj W^T", block.proj[0], (i, width))
        b_proj[layer] = _checked(f"{name}.proj bias", block.proj[1], (width,), optional=True)
        w_fc[layer, :, :f] = _checked(f"{name}.fc W^T", block.fc[0], (width, f))
        b_fc[layer, :f] = _checked(f"{name}.fc bias", block.fc[1], (f,), optional=True)
        w_mlp[layer, :f] = _checked(f"{name}.mlp W^T", block.mlp[0], (f, width))
        b_mlp[layer] = _checked(f"{name}.mlp bias", block.mlp[1], (width,), optional=True)
    final = np.stack([_checked("ln_f weight", ln_f[0], (width,)), _checked("ln_f bias", ln_f[1], (width,), True),
                      np.full(width, ln_f[2], f32)])
    return StepArrays(np.ascontiguousarray(wte), np.ascontiguousarray(wpe), ln, ln_eps, final, heads, hidden,
                      w_attn, b_attn, w_proj, b_proj, w_fc, b_fc, w_mlp, b_mlp,
                      np.ascontiguousarray(_checked("w_head", w_head, (width, vocab))), int(head_dim),
                      np.float32(1.0 / np.sqrt(head_dim)))


def random_arrays(rng: np.random.Generator, layers: int, width: int, heads: int, hidden: int, vocab: int,
                  context: int, bias: bool = True) -> StepArrays:
    """Random operands (for tests and examples): ``heads`` heads of ``width // heads``, per block ``H_l <= heads``
    heads and an MLP width ``F_l <= hidden`` drawn at random, weights N(0, 1/in); biases absent if not ``bias``.

    >>> random_arrays(np.random.default_rng(0), 1, 4, 2, 6, 3, 5).w_attn.shape
    (1, 4, 12)
    """
    head_dim = width // heads

    def normal(scale: float, *shape: int) -> np.ndarray:
        return rng.normal(0, scale, shape).astype(np.float32)

    def optional(*shape: int) -> np.ndarray | None:
        return normal(0.1, *shape) if bias else None

    blocks = []
    for _ in range(layers):
        h, f = int(rng.integers(1, heads + 1)), int(rng.integers(1, hidden + 1))
        i = h * head_dim
        blocks.append(BlockWeights(
            (rng.uniform(0.5, 1.5, width).astype(np.float32), optional(width), 1e-5),
            (normal(width ** -0.5, width, 3 * i), optional(3 * i)), (normal(i ** -0.5, i, width), optional(width)),
            (rng.uniform(0.5, 1.5, width).astype(np.float32), optional(width), 1e-5),
            (normal(width ** -0.5, width, f), optional(f)), (normal(f ** -0.5, f, width), optional(width)), h))
    return step_arrays(normal(1.0, vocab, width), normal(0.3, context, width), blocks,
                       (rng.uniform(0.5, 1.5, width).astype(np.float32), optional(width), 1e-5),
                       normal(width ** -0.5, width, vocab), head_dim)
