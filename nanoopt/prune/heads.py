"""Attention-head pruning for the GPT (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

Each head h of a block gets a gate xi_h multiplying its output before the output projection,

    Att(x) = sum_h xi_h Att_h(x),   xi_h = 1,

and its importance is the expected sensitivity of the loss to that gate on calibration data (eq. 4 of the paper):

    I_h = E_x | dL(x) / d xi_h |
        = E_x | sum_t < Att_h(x)_t , dL(x) / d Att_h(x)_t > |

the first-order Taylor estimate of the loss change when the head is masked (xi_h: 1 -> 0). The expectation is
over calibration windows, one gate per window (one backward pass gives every window's gradient).
Scores are normalised per layer by their l2 norm (Sec. 6.1: "normalizing ... by layer is important for global
pruning"), unless ``normalize=False``.

:func:`prune_heads` removes heads physically: block b with H heads of width D keeps only the rows of ``c_attn``
that produce the surviving heads' queries, keys and values (3 H' D rows instead of 3 H D) and the matching
``H' D`` columns of ``c_proj``, and its ``attn.n_head`` becomes H'. Its output equals the output of the model in
which the removed heads are masked (:func:`mask_heads`, which zeroes their columns of ``c_proj`` as a reversible
mask) up to float rounding: a masked head contributes exactly nothing. At least one head per block survives.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models, prune
>>> no.manual_seed(0)
>>> model = models.gpt(vocab_size=7, block_size=8, n_layer=2, n_head=4, n_embd=16)
>>> x = np.random.default_rng(0).integers(0, 7, (4, 8)); y = np.roll(x, -1, axis=1)
>>> scores = prune.head_importance(model, (x, y))
>>> [s.shape for s in scores.values()]
[(4,), (4,)]
>>> heads = prune.select_heads(scores, amount=0.25)
>>> _ = prune.prune_heads(model, heads)
>>> sum(block.attn.n_head for block in model.transformer["h"])
6
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from nanoopt.models_gpt import GPT, Block
from nanoopt.nn import Module, Parameter
from nanoopt.nn import layers as L
from nanoopt.nn.converted import require_float_model
from nanoopt.nn.graph import evaluating
from nanoopt.prune.masks import get_mask, get_parameter
from nanoopt.prune.methods import count_to_prune, custom_from_mask
from nanoopt.tensor import Tensor
from nanoopt.train_lm import lm_loss


def gpt_blocks(model: Module, function: str) -> dict[str, Block]:
    """The transformer blocks of a GPT by name (``"transformer.h.0"``, ...); ``TypeError`` for other models."""
    if not isinstance(model, GPT):
        raise TypeError(f"{function}: expected a nanoopt GPT (models.gpt), got {type(model).__name__}")
    return {f"transformer.h.{i}": block for i, block in enumerate(model.transformer["h"])}


def _block_name(key: Any, blocks: Mapping[str, Block], function: str) -> str:
    """A block given by index (0, 1, ...) or by name (``"transformer.h.0"``) -> its name."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        name = f"transformer.h.{int(key)}"
    else:
        name = key
    if name not in blocks:
        raise ValueError(f"{function}: no block {key!r}; the model has blocks {list(blocks)} (or indices "
                         f"0..{len(blocks) - 1})")
    return name


def _calibration(calibration: Any, function: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2):
        raise ValueError(f"{function}: calibration must be a pair (x, y) of token windows (N, T) and their next "
                         f"tokens (N, T), got {type(calibration).__name__}")
    x, y = (np.asarray(a) for a in calibration)
    if x.ndim != 2 or x.shape != y.shape or len(x) == 0:
        raise ValueError(f"{function}: calibration x and y must both be (N, T) with N >= 1, got shapes {x.shape} "
                         f"and {y.shape}")
    return x, y


def head_importance(model: Module, calibration: tuple[np.ndarray, np.ndarray], batch_size: int = 16,
                    normalize: bool = True) -> dict[str, np.ndarray]:
    """Michel et al.'s head importance I_h = E_x |dL(x)/d xi_h| for every head of every block (module doc).

    ``calibration`` is a pair (x, y) of token windows and next tokens, each (N, T) (e.g. from
    :func:`nanoopt.data.validation_windows` on training ids); L(x) is the mean token cross-entropy of window x.
    Returns ``{block name: scores (n_head,)}``, l2-normalised per block when ``normalize``. The model's
    parameters get no gradients (their ``.grad`` is left as it was) and its training flag is restored.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> no.manual_seed(0)
    >>> model = models.gpt(vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=8)
    >>> x = np.zeros((3, 4), dtype=np.int64)
    >>> scores = head_importance(model, (x, x))
    >>> round(float(np.linalg.norm(scores["transformer.h.0"])), 6)
    1.0
    """
    blocks = gpt_blocks(model, "head_importance")
    x, y = _calibration(calibration, "head_importance")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"head_importance: batch_size must be a positive int, got {batch_size!r}")
    totals = {name: np.zeros(block.attn.n_head) for name, block in blocks.items()}
    gates: dict[str, Tensor] = {}

    def gate_hook(name: str, attn: Module):
        def hook(module: Module, inputs: tuple) -> tuple:
            merged = inputs[0]  # (B, T, H D)
            b, t, _ = merged.shape
            gate = gates[name]
            heads = merged.reshape(b, t, attn.n_head, attn.head_dim) * gate  # (B, T, H, D) * (B, 1, H, 1)
            return (heads.reshape(b, t, attn.inner_dim),)
        return hook

    parameters = list(model.parameters())
    saved_grads = [p.grad for p in parameters]
    handles = [block.attn.c_proj.register_forward_pre_hook(gate_hook(name, block.attn))
               for name, block in blocks.items()]
    try:
        with evaluating(model, grad=True):
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                for name, block in blocks.items():
                    gates[name] = Tensor(np.ones((len(xb), 1, block.attn.n_head, 1), dtype=np.float32),
                                         requires_grad=True)
                loss = lm_loss(model(xb), yb) * len(xb)  # sum over windows of each window's mean token loss
                loss.backward()
                for name in blocks:
                    totals[name] += np.abs(gates[name].grad.reshape(len(xb), -1)).sum(axis=0)
    finally:
        for handle in handles:
            handle.remove()
        for p, g in zip(parameters, saved_grads, strict=True):
            p.grad = g
    scores = {name: total / len(x) for name, total in totals.items()}
    if normalize:
        scores = {name: s / max(float(np.linalg.norm(s)), 1e-30) for name, s in scores.items()}
    return scores


def select_heads(scores: Mapping[str, np.ndarray], amount: float | int, scope: str = "global"
                 ) -> dict[str, list[int]]:
    """The heads to prune: the ``amount`` (a fraction of all heads, or a count) with the lowest scores.

    ``scope="global"`` ranks all heads together (ties broken by block, then head); ``"layer"`` prunes
    ``amount`` of each block's heads. At least one head of each block always survives (a block with one head
    left is skipped and the next lowest head elsewhere is taken). Returns ``{block name: [head indices]}``.

    >>> select_heads({"a": np.array([0.1, 0.9]), "b": np.array([0.2, 0.3])}, amount=0.5)
    {'a': [0], 'b': [0]}
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"select_heads: scope must be 'global' or 'layer', got {scope!r}")
    scores = {name: np.asarray(s, dtype=np.float64).reshape(-1) for name, s in scores.items()}
    chosen: dict[str, list[int]] = {name: [] for name in scores}
    if scope == "layer":
        for name, s in scores.items():
            k = min(count_to_prune(amount, s.size, f"select_heads({name!r})"), s.size - 1)
            chosen[name] = sorted(int(h) for h in np.argsort(s, kind="stable")[:k])
    else:
        total = sum(s.size for s in scores.values())
        k = count_to_prune(amount, total, "select_heads")
        if k > total - len(scores):
            raise ValueError(f"select_heads: cannot prune {k} of {total} heads and keep one head in each of the "
                             f"{len(scores)} blocks (at most {total - len(scores)})")
        ranked = sorted((float(v), i, h, name) for i, (name, s) in enumerate(scores.items()) for h, v in enumerate(s))
        for _, _, h, name in ranked:
            if k == 0:
                break
            if len(chosen[name]) < scores[name].size - 1:
                chosen[name].append(h)
                k -= 1
        chosen = {name: sorted(heads) for name, heads in chosen.items()}
    return {name: heads for name, heads in chosen.items() if heads}


def _check_heads(model: Module, heads: Mapping[Any, Iterable[int]], function: str) -> dict[str, np.ndarray]:
    blocks = gpt_blocks(model, function)
    require_float_model(model, function)
    if not isinstance(heads, Mapping):
        raise TypeError(f"{function}: heads must map a block (index or name) to head indices, got "
                        f"{type(heads).__name__}")
    checked: dict[str, np.ndarray] = {}
    for key, indices in heads.items():
        name = _block_name(key, blocks, function)
        n_head = blocks[name].attn.n_head
        drop = np.unique(np.asarray(list(indices), dtype=np.int64))
        if drop.size and (drop.min() < 0 or drop.max() >= n_head):
            raise ValueError(f"{function}: block {name!r} has heads 0..{n_head - 1}, got head indices "
                             f"{drop.tolist()}")
        if drop.size >= n_head:
            raise ValueError(f"{function}: removing all {n_head} heads of block {name!r} would leave no attention; "
                             "keep at least one head (or remove the block with prune.remove_blocks)")
        if drop.size:
            checked[name] = np.union1d(checked.get(name, np.array([], np.int64)), drop)
    return checked


def mask_heads(model: Module, heads: Mapping[Any, Iterable[int]]) -> Module:
    """Mask the given heads (``{block index or name: [head indices]}``): zero their columns of ``c_proj`` with a
    reversible pruning mask (``c_proj.weight_orig``, ``c_proj.weight_mask``), which is xi_h = 0. In place.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> model = mask_heads(models.gpt(5, 4, 1, 2, 8), {0: [1]})
    >>> model.transformer["h"][0].attn.c_proj.weight_mask[0].tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    """
    blocks = gpt_blocks(model, "mask_heads")
    for name, drop in _check_heads(model, heads, "mask_heads").items():
        attn = blocks[name].attn
        mask = np.ones(get_parameter(attn.c_proj, "weight").shape, dtype=np.float32)
        for h in drop:
            mask[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0.0
        custom_from_mask(attn.c_proj, "weight", mask)
    return model


def _effective(module: L.Linear, name: str) -> np.ndarray | None:
    if name not in module._parameters and name + "_orig" not in module._parameters:
        return None
    return get_parameter(module, name).data * get_mask(module, name)


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> L.Linear:
    layer = L.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = Parameter(np.ascontiguousarray(weight, dtype=np.float32))
    if bias is not None:
        layer.bias = Parameter(np.ascontiguousarray(bias, dtype=np.float32))
    return layer


def prune_heads(model: Module, heads: Mapping[Any, Iterable[int]]) -> Module:
    """Physically remove the given heads (``{block index or name: [head indices]}``) of a GPT, in place.

    Block b keeps the query, key and value rows of ``c_attn`` and the ``c_proj`` columns of its surviving heads;
    ``attn.n_head`` drops accordingly. Masks on those two layers are baked in (the new layers are plain
    Linears), so build a new optimiser afterwards. The output equals :func:`mask_heads`' masked model's.
    Head indices count the block's current heads; removing every head of a block is refused.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> model = prune_heads(models.gpt(5, 4, 1, 4, 16), {0: [0, 2]})
    >>> attn = model.transformer["h"][0].attn
    >>> attn.n_head, attn.c_attn.weight.shape, attn.c_proj.weight.shape
    (2, (24, 16), (16, 8))
    """
    blocks = gpt_blocks(model, "prune_heads")
    for name, drop in _check_heads(model, heads, "prune_heads").items():
        attn = blocks[name].attn
        h, d = attn.n_head, attn.head_dim
        keep = np.setdiff1d(np.arange(h), drop)
        columns = (keep[:, None] * d + np.arange(d)).reshape(-1)  # positions of kept heads in (H D)
        rows = np.concatenate([part * h * d + columns for part in range(3)])  # their q, k and v rows
        w_attn, b_attn = _effective(attn.c_attn, "weight"), _effective(attn.c_attn, "bias")
        w_proj, b_proj = _effective(attn.c_proj, "weight"), _effective(attn.c_proj, "bias")
        training = attn.training
        attn.c_attn = _linear(w_attn[rows], None if b_attn is None else b_attn[rows])
        attn.c_proj = _linear(w_proj[:, columns], b_proj)
        attn.c_attn.train(training)
        attn.c_proj.train(training)
        attn.n_head = int(keep.size)
    return model


def dead_heads(model: Module) -> dict[str, list[int]]:
    """Heads whose ``c_proj`` columns are all zero (masked or not): they contribute nothing and can go.

    >>> from nanoopt import models
    >>> dead_heads(mask_heads(models.gpt(5, 4, 2, 2, 8), {1: [0]}))
    {'transformer.h.1': [0]}
    """
    found: dict[str, list[int]] = {}
    for name, block in gpt_blocks(model, "dead_heads").items():
        attn = block.attn
        weight = _effective(attn.c_proj, "weight").reshape(-1, attn.n_head, attn.head_dim)
        dead = [h for h in range(attn.n_head) if not np.any(weight[:, h] != 0)]
        if dead:
            found[name] = dead
    return found
