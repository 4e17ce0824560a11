"""The differentiable primitives of transformers: embedding lookup and fused scaled dot-product attention.

Like :mod:`nanoopt.ops` (which holds every other primitive), each is a :class:`~nanoopt.ops.Function` with its
forward and backward side by side.

**Embedding** (a row lookup): ``out[..., :] = W[ids[...], :]``; the backward scatters the output gradient back onto
the rows, ``dW[i] = sum over positions p with ids[p] = i of dout[p]`` (rows at ``padding_idx`` get none, as in
PyTorch).

**Attention** (Vaswani et al. 2017, eq. 1), for queries Q (..., L, E), keys K (..., S, E), values V (..., S, Ev),
an additive bias M (0 where a query may attend a key, -inf where it may not, or any float mask) and scale s
(default 1/sqrt(E))::

    A = s Q K^T + M                 (..., L, S)
    P = softmax(A) row-wise         (a max-shift makes it overflow-free)
    P_d = P * D                     (dropout: D = Bernoulli(1 - p) / (1 - p), or 1)
    O = P_d V                       (..., L, Ev)

and its vector-Jacobian product, with G = dL/dO::

    dV = P_d^T G;   dP = (G V^T) * D;   dA = P * (dP - rowsum(dP * P));   dQ = s dA K;   dK = s dA^T Q.

One node does all of it (no (..., L, S) intermediate becomes a graph node), which is what makes attention cheap
in a NumPy autograd. A row whose keys are all masked has no softmax; PyTorch's
``scaled_dot_product_attention`` returns 0 there (and a zero gradient), which ``masked_rows="zero"`` reproduces;
``masked_rows="nan"`` gives the NaN of a plain softmax over -inf (what ``nn.MultiheadAttention`` returns with
``need_weights=True``).

:class:`SelfAttentionQKV` is the same attention for a packed (B, T, 3C) projection ``[q | k | v]`` with H heads
(nanoGPT's ``c_attn`` output), returning the heads merged back to (B, T, C): the splitting and merging of heads
is inside the node, so a GPT block's attention is one primitive.

>>> import numpy as np, nanoopt as no
>>> q = no.Tensor(np.ones((1, 2, 4)), requires_grad=True)
>>> out = ScaledDotProductAttention.apply(q, q, q)
>>> out.shape
(1, 2, 4)
"""

from __future__ import annotations

import numpy as np

from nanoopt.ops import Function, unbroadcast


# ===================================================================== embedding
class Embedding(Function):
    """``W[ids]`` for integer ``ids`` of any shape (a constant option); the gradient scatter-adds onto rows."""

    @staticmethod
    def forward(ctx, weight, indices=None, padding_idx=None):
        ctx.save_for_backward(indices, weight.shape, weight.dtype, padding_idx)
        return np.take(weight, indices, axis=0)

    @staticmethod
    def backward(ctx, grad):
        indices, shape, dtype, padding_idx = ctx.saved
        grad_weight = np.zeros(shape, dtype=dtype)
        np.add.at(grad_weight, indices.reshape(-1), grad.reshape(-1, shape[1]).astype(dtype, copy=False))
        if padding_idx is not None:
            grad_weight[padding_idx] = 0
        return (grad_weight,)


# ===================================================================== attention
def _softmax_rows(scores: np.ndarray, zero_masked_rows: bool) -> np.ndarray:
    """Row-wise softmax of ``scores`` in place where possible; all -inf rows give 0 or NaN (see module doc)."""
    top = scores.max(axis=-1, keepdims=True)
    if zero_masked_rows:
        top = np.where(np.isneginf(top), 0, top).astype(scores.dtype, copy=False)
    scores -= top
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    if zero_masked_rows:
        total[total == 0] = 1  # an all -inf row is all zeros after exp: it stays zero
    scores /= total
    return scores


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None, scale: float,
                      keep: np.ndarray | None, zero_masked_rows: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """O = dropout(softmax(s Q K^T + M)) V; returns (O, P, P_d) (P_d is P when there is no dropout)."""
    scores = np.matmul(q, np.swapaxes(k, -1, -2))  # (..., L, S)
    scores *= np.asarray(scale, dtype=scores.dtype)
    if bias is not None:
        scores = scores + bias
    probs = _softmax_rows(scores, zero_masked_rows)
    dropped = probs if keep is None else probs * keep
    return np.matmul(dropped, v), probs, dropped


def attention_backward(grad: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, probs: np.ndarray,
                       dropped: np.ndarray, keep: np.ndarray | None, scale: float,
                       needs: tuple[bool, bool, bool]) -> tuple[np.ndarray | None, ...]:
    """The vector-Jacobian product of :func:`attention_forward` (formulas in the module docstring)."""
    grad_v = np.matmul(np.swapaxes(dropped, -1, -2), grad) if needs[2] else None
    grad_probs = np.matmul(grad, np.swapaxes(v, -1, -2))  # (..., L, S)
    if keep is not None:
        grad_probs *= keep
    grad_scores = grad_probs
    grad_scores -= (grad_probs * probs).sum(axis=-1, keepdims=True)
    grad_scores *= probs
    grad_scores *= np.asarray(scale, dtype=grad_scores.dtype)
    grad_q = np.matmul(grad_scores, k) if needs[0] else None
    grad_k = np.matmul(np.swapaxes(grad_scores, -1, -2), q) if needs[1] else None
    return grad_q, grad_k, grad_v


class ScaledDotProductAttention(Function):
    """softmax(s Q K^T + M) V with optional dropout on the attention weights; Q, K, V broadcast over leading axes.

    Options: ``bias`` (an additive float mask broadcastable to (..., L, S), -inf for "may not attend", or None),
    ``scale`` (None: 1/sqrt(E)), ``keep`` (the dropout multiplier D, or None), ``zero_masked_rows``.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias=None, scale=None, keep=None, zero_masked_rows=True):
        scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, probs, dropped = attention_forward(q, k, v, bias, scale, keep, zero_masked_rows)
        ctx.save_for_backward(q, k, v, probs, dropped, keep, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs, dropped, keep, scale = ctx.saved
        grad_q, grad_k, grad_v = attention_backward(grad, q, k, v, probs, dropped, keep, scale,
                                                    ctx.needs_input_grad)
        return (None if grad_q is None else unbroadcast(grad_q, q.shape),
                None if grad_k is None else unbroadcast(grad_k, k.shape),
                None if grad_v is None else unbroadcast(grad_v, v.shape))


class SelfAttentionQKV(Function):
    """Multi-head self-attention of a packed projection ``qkv`` (B, T, 3C) = [q | k | v], H heads of C / H.

    Heads are split as in nanoGPT (``q.view(B, T, H, C // H).transpose(1, 2)``), attended with the additive
    ``bias`` (e.g. the causal -inf upper triangle, broadcast to (B, H, T, T)) and merged back to (B, T, C).
    """

    @staticmethod
    def forward(ctx, qkv, num_heads=1, bias=None, scale=None, keep=None, zero_masked_rows=True):
        b, t, c3 = qkv.shape
        c = c3 // 3
        d = c // num_heads
        heads = qkv.reshape(b, t, 3, num_heads, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        heads = np.ascontiguousarray(heads)
        q, k, v = heads[0], heads[1], heads[2]
        scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
        out, probs, dropped = attention_forward(q, k, v, bias, scale, keep, zero_masked_rows)  # (B, H, T, D)
        ctx.save_for_backward(heads, probs, dropped, keep, scale)
        return np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(b, t, c)

    @staticmethod
    def backward(ctx, grad):
        heads, probs, dropped, keep, scale = ctx.saved
        _, b, h, t, d = heads.shape
        grad_heads = grad.reshape(b, t, h, d).transpose(0, 2, 1, 3)  # (B, H, T, D)
        grads = attention_backward(grad_heads, heads[0], heads[1], heads[2], probs, dropped, keep, scale,
                                   (True, True, True))
        packed = np.empty((b, t, 3, h, d), dtype=heads.dtype)
        for i, g in enumerate(grads):
            packed[:, :, i] = g.transpose(0, 2, 1, 3)
        return (packed.reshape(b, t, 3 * h * d),)
