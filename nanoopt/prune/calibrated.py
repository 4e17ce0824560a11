"""What the calibration-based one-shot pruners (:mod:`~nanoopt.prune.wanda`, :mod:`~nanoopt.prune.sparsegpt`)
share: the target pattern, per-row masks from scores, and writing the result as a pruning mask.

* The pattern is either an unstructured ``sparsity`` in ``[0, 1)`` -- every output row of every layer keeps all
  but ``k = round(sparsity * in_features)`` of its weights (Python's round, half to even), so each row, and
  hence each layer, has exactly the same sparsity (Wanda's per-output comparison group, Sun et al. 2023,
  section 3) -- or N:M: in every ``m`` consecutive inputs of a row, ``n`` weights are kept.
* Ties in a score are broken by position: the entry with the lower index is pruned first (unstructured) or
  kept first (N:M, as :func:`nanoopt.prune.methods.nm_mask`).
* The result is nanoopt's reparametrisation (``weight_orig``, ``weight_mask``, see :mod:`nanoopt.prune.masks`),
  so :func:`~nanoopt.prune.remove` and :func:`~nanoopt.prune.to_sparse` work on it. Methods that also change the
  surviving weights (SparseGPT) write them into ``weight_orig`` first.

>>> scores = np.array([[3.0, 1.0, 2.0, 1.0], [0.0, 5.0, 4.0, 6.0]])
>>> pattern_mask(scores, check_pattern(0.5, None, None, "example")).tolist()
[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
>>> pattern_mask(scores, check_pattern(None, 1, 2, "example")).tolist()
[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from nanoopt import nn
from nanoopt.prune.masks import apply_mask, is_pruned
from nanoopt.prune.methods import nm_mask

__all__ = ["Pattern", "apply_pruned_weight", "check_layer", "check_pattern", "pattern_mask", "row_mask"]


@dataclass(frozen=True)
class Pattern:
    """An unstructured per-row ``sparsity`` or an ``n:m`` pattern (exactly one of the two)."""

    sparsity: float | None = None  # fraction of every row pruned, in [0, 1)
    n: int | None = None  # weights kept ...
    m: int | None = None  # ... in every m consecutive inputs

    def pruned_per_row(self, in_features: int) -> int:
        """How many weights of a row of ``in_features`` are pruned."""
        if self.sparsity is not None:
            return int(round(self.sparsity * in_features))
        assert self.n is not None and self.m is not None
        return in_features // self.m * (self.m - self.n)


def check_pattern(sparsity: float | None, n: int | None, m: int | None, what: str) -> Pattern:
    """Exactly one of ``sparsity`` (a float in [0, 1)) or ``n`` and ``m`` (ints, ``1 <= n < m``).

    >>> check_pattern(None, 2, 4, "example")
    Pattern(sparsity=None, n=2, m=4)
    """
    if sparsity is None and n is None and m is None:
        raise ValueError(f"{what}: give a target: sparsity=0.5 (unstructured) or n=2, m=4 (N:M)")
    if sparsity is not None:
        if n is not None or m is not None:
            raise ValueError(f"{what}: give either sparsity or n and m, not both (got sparsity={sparsity}, n={n}, "
                             f"m={m})")
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
            raise ValueError(f"{what}: sparsity is the fraction of weights pruned, a float in [0, 1), got "
                             f"{sparsity!r}")
        return Pattern(sparsity=float(sparsity))
    for label, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{what}: N:M sparsity needs ints n and m, got {label}={value!r}")
    assert n is not None and m is not None
    if not 1 <= n < m:
        raise ValueError(f"{what}: N:M keeps n of every m weights and needs 1 <= n < m, got n={n}, m={m}")
    return Pattern(n=int(n), m=int(m))


def check_layer(name: str, layer: nn.Linear, pattern: Pattern, what: str) -> None:
    """Refuse a layer whose ``in_features`` is not a multiple of ``m``, with non-finite weights, or already pruned."""
    if pattern.m is not None and layer.in_features % pattern.m:
        raise ValueError(f"{what}: layer {name!r} has in_features={layer.in_features}, not a multiple of m="
                         f"{pattern.m}; N:M sparsity needs whole groups of {pattern.m} inputs (leave the layer out "
                         "with ignore=)")
    bad = int(layer.weight.data.size - np.isfinite(layer.weight.data).sum())
    if bad:
        raise ValueError(f"{what}: layer {name!r} has {bad} NaN/Inf weights; scores and updates need finite weights")
    if is_pruned(layer, "weight"):
        raise ValueError(f"{what}: layer {name!r} is already pruned; {what} computes a fresh mask from the dense "
                         "weight, so call prune.remove on it first")


def row_mask(scores: np.ndarray, pruned: int) -> np.ndarray:
    """Prune the ``pruned`` lowest scores of every row (ties: the lower index first); a float32 0/1 mask.

    >>> row_mask(np.array([[2.0, 1.0, 1.0, 3.0]]), 2).tolist()
    [[1.0, 0.0, 0.0, 1.0]]
    """
    mask = np.ones(scores.shape, dtype=np.float32)
    order = np.argsort(scores, axis=1, kind="stable")[:, :pruned]  # ascending; equal scores keep index order
    np.put_along_axis(mask, order, 0.0, axis=1)
    return mask


def pattern_mask(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """The mask of ``pattern`` on ``scores (C, K)``: per-row lowest pruned, or the ``n`` best of every ``m``."""
    scores = np.asarray(scores, dtype=np.float64)
    if pattern.sparsity is not None:
        return row_mask(scores, pattern.pruned_per_row(scores.shape[1]))
    assert pattern.n is not None and pattern.m is not None
    return nm_mask(scores, np.ones(scores.shape, np.float32), pattern.n, pattern.m, dim=1)


def apply_pruned_weight(layer: nn.Linear, mask: np.ndarray, weight: np.ndarray | None = None) -> nn.Linear:
    """Write ``weight`` (if given: surviving weights changed by the method) and prune ``layer`` with ``mask``."""
    if weight is not None:
        layer.weight.data = (np.asarray(weight) * mask).astype(np.float32)
    return apply_mask(layer, "weight", mask)
