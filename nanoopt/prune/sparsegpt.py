"""SparseGPT: one-shot pruning with second-order weight updates (Frantar & Alistarh 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", arXiv:2301.00774).

For a Linear layer ``W (C, K)`` with calibration inputs ``X``, SparseGPT prunes and, at the same time, moves the
surviving weights to keep ``||W X - W^ X||^2`` small. It walks the columns left to right like GPTQ, with the upper
Cholesky factor ``U`` of the damped inverse Hessian ``(H + lambda I)^-1``, ``H = 2 X X^T / n``
(:func:`nanoopt.layerwise.inverse_hessian_cholesky`); "rounding" column ``j`` means setting its pruned entries to
zero, and the Optimal Brain Surgeon update spreads that change over the columns not yet processed (Algorithm 1):

    ``err_j = (w_j - q_j) / U_jj``,  ``W[:, j:] -= err_j U[j, j:]``,  ``q_j = w_j * mask_j``.

The mask is chosen **adaptively**, block by block (section 3.4, blocks of ``B_s = 128`` columns): when a block
starts, each weight of the block is scored by the OBS error of removing it, ``w^2 / U_jj^2`` (with the weights
as updated so far), and the lowest scores are pruned. Here the selection is per output row, so every row has
exactly ``round(sparsity * K)`` zeros (the block counts are ``round(s i2) - round(s i1)``; the reference
thresholds a block over all rows at once, which gives the same layer sparsity but unequal rows). For N:M
(section 3.5) the ``n`` of every ``m`` consecutive columns with the highest scores are kept, scored when the
group's first column is reached. Updates after the block are applied lazily, once per block, as in GPTQ.

The result is nanoopt's mask reparametrisation with the updated weights in ``weight_orig`` (pruned entries zero),
so :func:`~nanoopt.prune.remove` and :func:`~nanoopt.prune.to_sparse` work. Layers are calibrated sequentially
on the model whose earlier layers are already pruned; the model is pruned in place and returned.

>>> import numpy as np
>>> from nanoopt import models
>>> x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
>>> model = sparsegpt(models.mlp(64, (32,)), [x], sparsity=0.5)
>>> model[1].weight_mask.sum(axis=1)[:3].tolist(), float((model[1].weight.data == 0).mean())
([32.0, 32.0, 32.0], 0.5)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.layerwise import LayerHessian, inverse_hessian_cholesky, layers_to_calibrate, sequential
from nanoopt.prune.calibrated import (
    Pattern,
    apply_pruned_weight,
    check_layer,
    check_pattern,
    row_mask,
)
from nanoopt.prune.methods import nm_mask

__all__ = ["sparsegpt", "sparsegpt_prune"]


def _check_options(blocksize: int, percdamp: float, pattern: Pattern, what: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 1:
        raise ValueError(f"{what}: blocksize must be a positive int, got {blocksize!r}")
    if pattern.m is not None and blocksize % pattern.m:
        raise ValueError(f"{what}: blocksize={blocksize} must be a multiple of m={pattern.m} (N:M groups may not "
                         "straddle blocks)")
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not 0 <= percdamp < 1:
        raise ValueError(f"{what}: percdamp (damping as a fraction of the mean Hessian diagonal) must be in [0, 1), "
                         f"got {percdamp!r}")


def sparsegpt_prune(weight: np.ndarray, hessian: np.ndarray, sparsity: float | None = None, *, n: int | None = None,
                    m: int | None = None, blocksize: int = 128, percdamp: float = 0.01, n_rows: int | None = None,
                    name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT on one weight matrix ``(C, K)`` with its layer Hessian: ``(updated weight, mask)``, both
    float32 ``(C, K)``, the updated weight zero where the mask is (see the module docstring).

    >>> w = np.array([[1.0, 0.2, -0.5, 0.1]], np.float32)
    >>> new, mask = sparsegpt_prune(w, np.eye(4), sparsity=0.5)     # H = I: no update, prune the smallest |w|
    >>> mask.tolist(), new.tolist()
    ([[1.0, 0.0, 1.0, 0.0]], [[1.0, 0.0, -0.5, 0.0]])
    """
    pattern = check_pattern(sparsity, n, m, "sparsegpt")
    _check_options(blocksize, percdamp, pattern, "sparsegpt")
    w = np.asarray(weight, dtype=np.float64).copy()  # (C, K)
    rows, depth = w.shape
    if np.shape(hessian) != (depth, depth):
        raise ValueError(f"sparsegpt: the Hessian of {name!r} must be ({depth}, {depth}), got {np.shape(hessian)}")
    if pattern.m is not None and depth % pattern.m:
        raise ValueError(f"sparsegpt: {name!r} has {depth} inputs, not a multiple of m={pattern.m}")
    u = inverse_hessian_cholesky(hessian, percdamp, depth if n_rows is None else n_rows, name, "sparsegpt")
    mask = np.ones((rows, depth), np.float32)
    for i1 in range(0, depth, blocksize):
        i2 = min(i1 + blocksize, depth)
        block = w[:, i1:i2].copy()  # (C, B)
        errors = np.zeros_like(block)
        diagonal = np.diag(u)[i1:i2]  # (B,)
        if pattern.sparsity is not None:  # adaptive mask of the whole block, per row
            pruned = int(round(pattern.sparsity * i2)) - int(round(pattern.sparsity * i1))
            mask[:, i1:i2] = row_mask(block**2 / diagonal**2, pruned)
        for i in range(i2 - i1):
            if pattern.m is not None and i % pattern.m == 0:  # adaptive N:M mask of the next m columns
                scores = block[:, i:i + pattern.m] ** 2 / diagonal[i:i + pattern.m] ** 2
                mask[:, i1 + i:i1 + i + pattern.m] = nm_mask(scores, np.ones(scores.shape), pattern.n, pattern.m)
            column = block[:, i].copy()
            kept = column * mask[:, i1 + i]
            error = (column - kept) / diagonal[i]  # (C,)
            block[:, i:] -= np.outer(error, u[i1 + i, i1 + i:i2])
            block[:, i] = kept
            errors[:, i] = error
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return (w * mask).astype(np.float32), mask


def sparsegpt(model: nn.Module, calibration: Any, sparsity: float | None = None, *, n: int | None = None,
              m: int | None = None, blocksize: int = 128, percdamp: float = 0.01,
              targets: Sequence[str] | None = None, ignore: Sequence[str] = (), progress: bool = False) -> nn.Module:
    """Prune the Linear layers of ``model`` (in place) with SparseGPT (see the module docstring).

    ``sparsity`` (in [0, 1), per row) or ``n`` and ``m`` (N:M); ``blocksize`` columns per adaptive-mask block
    (a multiple of ``m``); ``percdamp``: damping ``lambda = percdamp * mean(diag H)`` (0.01, as the paper);
    ``calibration``: model inputs (enough rows for a full-rank Hessian: at least the largest ``in_features``);
    ``targets`` / ``ignore``: Linear layer names or ``fnmatch`` patterns.
    """
    pattern = check_pattern(sparsity, n, m, "sparsegpt")
    _check_options(blocksize, percdamp, pattern, "sparsegpt")
    batches, layers = layers_to_calibrate(model, calibration, targets, ignore, "sparsegpt",
                                          lambda name, layer: check_layer(name, layer, pattern, "sparsegpt"))

    def start(name: str, layer: nn.Linear) -> LayerHessian:
        return LayerHessian(layer.in_features)

    def finish(name: str, layer: nn.Linear, hessian: LayerHessian) -> None:
        weight, mask = sparsegpt_prune(layer.weight.data, hessian.hessian(), pattern.sparsity, n=pattern.n,
                                       m=pattern.m, blocksize=blocksize, percdamp=percdamp,
                                       n_rows=hessian.n_rows_, name=name)
        apply_pruned_weight(layer, mask, weight)

    return sequential(model, layers, batches, start, finish, progress, desc="sparsegpt")
