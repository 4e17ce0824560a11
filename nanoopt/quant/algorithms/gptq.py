"""GPTQ: layer-wise second-order rounding of weights (Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", arXiv:2210.17323).

For a Linear layer with weight ``W (C, K)`` and calibration inputs ``X (K, n)``, GPTQ looks for quantized weights
``W^`` minimising the layer's reconstruction error ``||W X - W^ X||_F^2`` (eq. 1), one row at a time with the
Hessian ``H = 2 X X^T / n`` shared by all rows. It quantizes the columns of ``W`` left to right; after rounding
column ``j`` to ``q_j`` it moves the not-yet-quantized columns to compensate (the Optimal Brain Quantization update,
eq. 2-3, with ``F`` the remaining columns)

    ``delta_F = - (w_j - q_j) / [H_F^-1]_jj  *  (H_F^-1)_{j, F}``.

The inverses ``H_F^-1`` of all the shrinking column sets are the rows of the upper Cholesky factor ``U`` of
``H^-1`` (``H^-1 = U^T U``, section 4 step 3), so the update of column ``j`` is ``err_j = (w_j - q_j) / U_jj``,
``W[:, j:] -= err_j U[j, j:]``. Updates are applied lazily (step 2): within a block of ``blocksize`` (128)
columns immediately, to the columns after the block once per block, ``W[:, i2:] -= Err U[i1:i2, i2:]``.

Options and how they are done here:

* ``percdamp`` -- ``H + lambda I`` with ``lambda = percdamp * mean(diag H)`` (default 1%, the paper's
  "dampening"), which also keeps ``H`` invertible with few calibration rows (see
  :func:`nanoopt.layerwise.inverse_hessian_cholesky`);
* ``group_size`` -- one grid per ``group_size`` inputs of a row (see :mod:`~nanoopt.quant.algorithms.rtn`); a
  group's grid is fitted when its first column is reached, on the weights as updated so far (the reference
  code's behaviour), so later groups' grids see the error feedback;
* ``act_order`` -- columns are processed in order of decreasing ``H_jj`` (the "act-order" heuristic of the
  reference code: inputs with large activations first). With groups, the grids are then fitted *before* the
  permutation on the original contiguous groups ("static groups"), so the stored format is the same as without
  act-order (contiguous groups, no column index per weight) and every column is rounded on the grid it is
  stored with;
* symmetric or asymmetric grids (``symmetric``), 2-8 bits (``bits``).

With ``H`` the identity (or any diagonal ``H``) no update moves another column and GPTQ is exactly
round-to-nearest on the same grid; tested.

The model-level :func:`gptq` calibrates the layers **sequentially** (:func:`nanoopt.layerwise.sequential`):
each layer's Hessian comes from the inputs produced by the model whose earlier layers are already quantized, and
every quantized layer becomes a :class:`~nanoopt.quant.dynamic.WeightOnlyLinear` holding GPTQ's codes (GPTQ
changes which codes and scales go in, not how they are stored or run).

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
>>> model = models.mlp(64, (32,))
>>> small = gptq(model, [x], bits=4, group_size=32)
>>> type(small[1]).__name__, small[1].weight_scale.shape
('WeightOnlyLinear', (32, 2))
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.layerwise import (
    LayerHessian,
    calibration_batches,
    execution_order,
    inverse_hessian_cholesky,
    select_linears,
    sequential,
)
from nanoopt.prune.masks import get_mask, is_pruned
from nanoopt.quant.algorithms.rtn import (
    check_grid,
    check_layer_groups,
    grid_spec,
    group_qparams,
    weight_only_linear,
)
from nanoopt.quant.checks import check_finite_parameters
from nanoopt.spec import dequantize, qparams, quantize

__all__ = ["GPTQResult", "gptq", "gptq_quantize"]


@dataclass
class GPTQResult:
    """What GPTQ chose for one weight matrix ``(C, K)``."""

    codes: np.ndarray  # (C, K) int8, in the original column order
    scale: np.ndarray  # (C, groups) float32
    zero_point: np.ndarray  # (C, groups) int32 (all 0 on a symmetric grid)
    dequantized: np.ndarray  # (C, K) float32: s (code - z), the weight the quantized layer uses
    loss: float  # sum_j ||w_j - q_j||^2 / (2 U_jj^2): GPTQ's estimate of the added error ||(W - W^) X||^2 / n


def check_options(percdamp: float, blocksize: int, act_order: bool, what: str) -> None:
    """Refuse damping outside [0, 1), a block size that is not a positive int, a non-bool ``act_order``."""
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not 0 <= percdamp < 1:
        raise ValueError(f"{what}: percdamp (damping as a fraction of the mean Hessian diagonal) must be in [0, 1), "
                         f"got {percdamp!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 1:
        raise ValueError(f"{what}: blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"{what}: act_order must be a bool, got {act_order!r}")


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                  n_rows: int | None = None, name: str = "weight", mask: np.ndarray | None = None) -> GPTQResult:
    """GPTQ on one weight matrix ``(C, K)`` with the layer Hessian ``(K, K)`` (see the module docstring).

    ``n_rows`` (the number of calibration rows behind ``hessian``) only serves the singular-Hessian message.
    ``mask`` (0/1, the weight's shape; a pruned layer's ``weight_mask``): the masked weights are kept exactly
    zero (their code is the zero point) and their change is compensated like a rounding error, as SparseGPT's
    joint sparsification and quantization does (Frantar & Alistarh 2023, section 3.5).

    >>> w = np.array([[0.4, -1.0, 0.3]], np.float32)
    >>> r = gptq_quantize(w, np.eye(3), bits=2, group_size=None, symmetric=True)    # H = I: round to nearest
    >>> r.codes.tolist(), r.dequantized.tolist()
    ([[0, -1, 0]], [[0.0, -1.0, 0.0]])
    """
    check_grid(bits, group_size, symmetric, "gptq")
    check_options(percdamp, blocksize, act_order, "gptq")
    original = np.asarray(weight, dtype=np.float32)
    rows, depth = original.shape
    if np.shape(hessian) != (depth, depth):
        raise ValueError(f"gptq: the Hessian of {name!r} must be ({depth}, {depth}), got {np.shape(hessian)}")
    size = depth if group_size is None else group_size
    if depth % size:
        raise ValueError(f"gptq: group_size={group_size} does not divide the {depth} inputs of {name!r}")
    spec = grid_spec(bits, symmetric)
    h = np.asarray(hessian, dtype=np.float64)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(depth)
    u = inverse_hessian_cholesky(h[np.ix_(order, order)], percdamp, depth if n_rows is None else n_rows, name,
                                 "gptq")
    w = original.astype(np.float64)[:, order]  # (C, K), columns in processing order
    keep = np.ones((rows, depth), bool) if mask is None else np.asarray(mask)[:, order] > 0
    groups = depth // size
    scale = np.zeros((rows, groups), np.float32)
    zero_point = np.zeros((rows, groups), np.int32)
    if act_order:  # static groups: the grids of the original contiguous groups, fitted before any update
        scale[...], zero_point[...] = group_qparams(original, bits, group_size, symmetric)
    codes = np.zeros((rows, depth), np.int8)
    q = np.zeros((rows, depth))
    loss = 0.0
    for i1 in range(0, depth, blocksize):
        i2 = min(i1 + blocksize, depth)
        block = w[:, i1:i2].copy()  # (C, B): this block, updated immediately
        errors = np.zeros_like(block)
        for i in range(i2 - i1):
            column = int(order[i1 + i])  # index in the original order
            group = column // size
            if not act_order and column % size == 0:  # the group starts here: fit its grid on current weights
                current = np.concatenate([block[:, i:], w[:, i2:]], axis=1)[:, :size]
                current = current * keep[:, i1 + i:i1 + i + size]  # pruned weights will be 0, not their value
                scale[:, group], zero_point[:, group] = qparams(current.min(axis=1), current.max(axis=1), spec)
            code = quantize(block[:, i], scale[:, group], zero_point[:, group], spec)  # (C,)
            code = np.where(keep[:, i1 + i], code, zero_point[:, group]).astype(code.dtype)  # pruned: exactly 0
            value = dequantize(code, scale[:, group], zero_point[:, group], spec).astype(np.float64)
            codes[:, column], q[:, column] = code, value
            diagonal = u[i1 + i, i1 + i]
            error = (block[:, i] - value) / diagonal  # (C,)
            loss += float(np.sum(error * error)) / 2.0
            block[:, i:] -= np.outer(error, u[i1 + i, i1 + i:i2])
            errors[:, i] = error
        w[:, i2:] -= errors @ u[i1:i2, i2:]  # the lazy update of everything after the block
    return GPTQResult(codes, scale, zero_point, q.astype(np.float32), loss)


def gptq(model: nn.Module, calibration: Any, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
         act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128,
         targets: Sequence[str] | None = None, ignore: Sequence[str] = (), progress: bool = False) -> nn.Module:
    """A copy of ``model`` whose Linear layers hold GPTQ-rounded ``bits``-bit weights (see the module docstring).

    Parameters
    ----------
    model : any Module; its ``nn.Linear`` layers (``targets``, minus ``ignore``: dotted names or ``fnmatch``
        patterns, e.g. ``ignore=["head"]``) are quantized; everything else is kept in float.
    calibration : model inputs: an array (one batch) or an iterable of batches (``(x, y)`` pairs give x).
        Run once per quantized layer. Enough rows (batches x tokens) for ``H`` of full rank: at least the
        largest ``in_features``; fewer work through the damping with a warning.
    bits : 2..8. group_size : inputs per grid (must divide every quantized layer's ``in_features``; None: one
        grid per row). symmetric : narrow-range symmetric grids (no zero point) or asymmetric min-max grids.
    act_order : process columns by decreasing ``H_jj`` (static groups). percdamp : ``lambda / mean(diag H)``,
        in [0, 1); 0.01 as in the paper. blocksize : columns per lazy-update block (128 as in the paper).

    Returns a new model (the input model is not changed) whose quantized layers are ``WeightOnlyLinear``. A
    pruned layer (``weight_mask``) keeps its zeros exactly (codes at the zero point), so pruning (e.g.
    :func:`~nanoopt.prune.sparsegpt`) followed by GPTQ gives a sparse, quantized model.
    """
    check_grid(bits, group_size, symmetric, "gptq")
    check_options(percdamp, blocksize, act_order, "gptq")
    converted = copy.deepcopy(model)
    check_finite_parameters(converted, "gptq")
    batches = calibration_batches(calibration, "gptq")
    layers = select_linears(converted, targets, ignore, "gptq")
    for name, layer in layers:
        check_layer_groups(name, layer, group_size, "gptq")
    return quantize_layers(converted, batches, layers, bits, group_size, symmetric, act_order, percdamp, blocksize,
                           progress)


def quantize_layers(model: nn.Module, batches: list[Any], layers: list[tuple[str, nn.Linear]], bits: int,
                    group_size: int | None, symmetric: bool, act_order: bool, percdamp: float, blocksize: int,
                    progress: bool = False) -> nn.Module:
    """GPTQ on ``layers`` of ``model`` (in place), sequentially in execution order; the arguments are checked."""
    layers = execution_order(model, layers, batches[0], "gptq")

    def start(name: str, layer: nn.Linear) -> LayerHessian:
        return LayerHessian(layer.in_features)

    def finish(name: str, layer: nn.Linear, hessian: LayerHessian) -> nn.Module:
        mask = get_mask(layer, "weight") if is_pruned(layer, "weight") else None
        result = gptq_quantize(layer.weight.data, hessian.hessian(), bits, group_size, symmetric, act_order,
                               percdamp, blocksize, n_rows=hessian.n_rows_, name=name, mask=mask)
        return weight_only_linear(layer, result.codes, result.scale, result.zero_point, bits, group_size, symmetric)

    return sequential(model, layers, batches, start, finish, progress, desc="gptq")
