"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach
for Large Language Models", arXiv:2306.11695).

The score of weight ``W_ij`` (output ``i``, input ``j``) is its magnitude times the norm of its input over the
calibration rows (eq. 1)

    ``S_ij = |W_ij| * ||X_j||_2``,

and the scores are compared **per output row** (section 3, "comparison group"): every row loses its
``round(sparsity * K)`` lowest-scoring weights, or, for N:M, the ``m - n`` lowest of every ``m`` consecutive
inputs. No weight is updated and nothing is retrained. With equal input norms Wanda is magnitude pruning per
row (tested). As in the reference code, the layers are pruned sequentially: each layer's input norms come from
the model whose earlier layers are already pruned (:func:`nanoopt.layerwise.sequential`).

The result is nanoopt's mask reparametrisation (``weight_orig``, ``weight_mask``): :func:`~nanoopt.prune.remove`
makes it permanent and :func:`~nanoopt.prune.to_sparse` runs it on sparse kernels. The model is pruned in place
(like every ``prune`` function) and returned.

>>> import numpy as np
>>> from nanoopt import models
>>> x = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
>>> model = wanda(models.mlp(64, (32,)), [x], sparsity=0.5)
>>> model[1].weight_mask.sum(axis=1)[:3].tolist(), model[3].weight_mask.sum(axis=1)[:3].tolist()
([32.0, 32.0, 32.0], [16.0, 16.0, 16.0])
>>> model = wanda(models.mlp(64, (32,)), [x], n=2, m=4, ignore=["3"])
>>> model[1].weight_mask.reshape(32, 16, 4).sum(axis=-1).min(), hasattr(model[3], "weight_mask")
(np.float32(2.0), False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.layerwise import layers_to_calibrate, sequential
from nanoopt.prune.calibrated import apply_pruned_weight, check_layer, check_pattern, pattern_mask

__all__ = ["InputNorms", "wanda", "wanda_scores"]


class InputNorms:
    """``||X_j||_2^2 = sum_rows x_j^2`` per input channel, accumulated batch by batch (float64)."""

    def __init__(self, in_features: int) -> None:
        self.sq_sum_ = np.zeros(in_features)
        self.n_rows_ = 0

    def add_batch(self, inputs: np.ndarray) -> InputNorms:
        x = np.asarray(inputs, dtype=np.float64)
        self.sq_sum_ += (x * x).sum(axis=0)
        self.n_rows_ += x.shape[0]
        return self

    def norms(self) -> np.ndarray:
        """``||X_j||_2`` per input channel."""
        return np.sqrt(self.sq_sum_)


def wanda_scores(weight: np.ndarray, input_norms: np.ndarray) -> np.ndarray:
    """``|W_ij| * ||X_j||_2`` (float64, the weight's shape).

    >>> wanda_scores(np.array([[1.0, -2.0]]), np.array([3.0, 1.0])).tolist()
    [[3.0, 2.0]]
    """
    return np.abs(np.asarray(weight, dtype=np.float64)) * np.asarray(input_norms, dtype=np.float64)[None, :]


def wanda(model: nn.Module, calibration: Any, sparsity: float | None = None, *, n: int | None = None,
          m: int | None = None, targets: Sequence[str] | None = None, ignore: Sequence[str] = (),
          progress: bool = False) -> nn.Module:
    """Prune the Linear layers of ``model`` (in place) with Wanda's scores (see the module docstring).

    ``sparsity`` (in [0, 1), per row) or ``n`` and ``m`` (N:M); ``calibration``: model inputs, an array or an
    iterable of batches; ``targets`` / ``ignore``: Linear layer names or ``fnmatch`` patterns.
    """
    pattern = check_pattern(sparsity, n, m, "wanda")
    batches, layers = layers_to_calibrate(model, calibration, targets, ignore, "wanda",
                                          lambda name, layer: check_layer(name, layer, pattern, "wanda"))

    def start(name: str, layer: nn.Linear) -> InputNorms:
        return InputNorms(layer.in_features)

    def finish(name: str, layer: nn.Linear, norms: InputNorms) -> None:
        apply_pruned_weight(layer, pattern_mask(wanda_scores(layer.weight.data, norms.norms()), pattern))

    return sequential(model, layers, batches, start, finish, progress, desc="wanda")
