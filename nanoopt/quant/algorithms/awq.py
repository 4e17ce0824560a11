"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan & Han 2023, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration", arXiv:2306.00978).

A few input channels of a layer carry much larger activations than the rest, and the weights that multiply them
matter most. AWQ protects them by scaling, not by keeping them in float: with a per-input-channel scale
``s > 0``, ``W x = (W diag(s)) (diag(s)^-1 x)``; quantizing ``W diag(s)`` instead of ``W`` divides the rounding
error of the salient columns by their ``s`` (section 3.2, eq. 4-5). The scales come from the activation
magnitudes, ``s = s_x^alpha`` with ``s_x = mean |x|`` per input channel over the calibration rows, and one
``alpha`` per layer (or per group of layers sharing an input) is grid-searched in ``[0, 1]`` (``n_grid + 1``
points; ``alpha = 0`` is plain round-to-nearest) to minimise the output error on calibration inputs (eq. 5)

    ``L(s) = || W X - Q(W diag(s)) diag(s)^-1 X ||^2``

with ``Q`` round-to-nearest on the group grids of :mod:`~nanoopt.quant.algorithms.rtn`. As in the reference code,
``s`` is clamped below at 1e-4 and normalised by ``sqrt(max s * min s)``.

Where ``diag(s)^-1`` goes (stated per layer by :func:`awq_plan`):

* **folded into the previous op** when the layer's input is produced by one op whose output goes only to the
  layers being scaled (found by tracing the model, :func:`nanoopt.nn.graph.trace`): a ``LayerNorm`` (its
  weight and bias are divided by ``s``), a ``Linear`` (its output rows and bias), or a ``Linear`` followed by
  ``ReLU``/``Dropout``/``Identity`` (positively homogeneous: ``relu(z) / s = relu(z / s)`` for ``s > 0``). Layers
  that share the input (e.g. the query, key and value projections after one LayerNorm) share one ``s``, searched
  on their summed error, as in the paper;
* **in the blocks of** :mod:`nanoopt.models_gpt` (which cannot be traced: their forward calls functional ops),
  by the rules of :func:`gpt_folds`, the reference code's for its decoder blocks (``auto_scale.py``):
  ``attn.c_attn``'s ``1 / s`` into ``ln_1``, ``mlp.c_fc``'s into ``ln_2`` and ``lm_head``'s into
  ``transformer.ln_f``; ``attn.c_proj``'s into the value rows ``[2 C', 3 C')`` of ``attn.c_attn`` (``C'`` the
  merged head width), because attention is linear in the values, head channel by head channel:
  ``softmax(Q K^T / sqrt(d)) (V diag(s)^-1) = (softmax(Q K^T / sqrt(d)) V) diag(s)^-1``, and the merged heads
  are ``c_proj``'s input channels one to one. ``mlp.c_proj`` keeps an explicit scale: its input is
  ``GELU(z)``, and GELU is not positively homogeneous (``GELU(z / s) != GELU(z) / s``);
* **kept as an explicit input scale** otherwise (the model input, a residual sum, a model that cannot be traced):
  the layer becomes an :class:`InputScaled` wrapper computing ``layer(x * input_scale)`` with
  ``input_scale = 1 / s`` (float32) around the quantized layer.

All scales are searched and folded in float; only then is every layer quantized (so a fold, e.g. into
``c_attn``'s value rows, never reaches an already rounded weight): round-to-nearest (``rounding="rtn"``, AWQ)
or GPTQ (``rounding="gptq"``, AWQ followed by GPTQ: the Hessians are collected on the scaled model). The search
runs on the float model, layer after layer in execution order, each on inputs from the model with the earlier
scales applied (which does not change its function).

``clip=True`` adds the weight-clipping search of the reference code (``auto_clip``; not in the paper's text):
after scaling, every group of a row is clamped to ``[-m, m]`` with ``m = max|w| (1 - i / 20)``, ``i = 0 .. 9``,
choosing per (row, group) the ``m`` whose rounded group gives the smallest error of the group's partial output
``sum_{j in group} w_j x_j`` on up to 512 calibration rows (``i = 0``, no clipping, is a candidate).

>>> import numpy as np
>>> from nanoopt import models
>>> x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
>>> model = models.mlp(64, (32,))                     # Flatten, Linear 1, ReLU, Linear 3
>>> [(group.layers, group.fold_into) for group in awq_plan(model, [x])]
[(['1'], None), (['3'], '1')]
>>> small = awq(model, [x], bits=4, group_size=32)
>>> type(small[1]).__name__, type(small[1].layer).__name__, type(small[3]).__name__
('InputScaled', 'WeightOnlyLinear', 'WeightOnlyLinear')
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt import nn, ops
from nanoopt.layerwise import calibration_batches, execution_order, layers_to_calibrate, select_linears, sequential
from nanoopt.models_gpt import GPT, MLP, Block, CausalSelfAttention
from nanoopt.nn.graph import INPUT, trace
from nanoopt.prune.masks import get_parameter, is_pruned, set_effective
from nanoopt.quant.algorithms.gptq import check_options, quantize_layers
from nanoopt.quant.algorithms.rtn import (
    check_grid,
    check_layer_groups,
    dequantize_groups,
    group_qparams,
    quantize_groups,
    rtn_linear,
)
from nanoopt.quant.checks import check_finite_parameters
from nanoopt.tensor import Tensor

__all__ = ["InputScaled", "ScaleGroup", "awq", "awq_plan", "gpt_folds", "search_clip", "search_scale"]

FOLD_THROUGH = (nn.ReLU, nn.Dropout, nn.Identity)  # elementwise and positively homogeneous in eval mode
MIN_SCALE = 1e-4  # the reference code's clamp of s_x^alpha


class InputScaled(nn.Module):
    """``layer(x * input_scale)``: AWQ's ``diag(s)^-1`` kept explicit where no previous op can absorb it.

    >>> from nanoopt import nn
    >>> wrapped = InputScaled(nn.Linear(2, 1, bias=False), np.array([2.0, 0.5]))
    >>> wrapped.layer.weight.data[:] = 1.0
    >>> wrapped(Tensor(np.array([[1.0, 4.0]], np.float32))).data.tolist()
    [[4.0]]
    """

    converted_by = "quant.awq"  # nanoopt.nn.converted.MARKER

    def __init__(self, layer: nn.Module, input_scale: np.ndarray) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("input_scale", np.asarray(input_scale, dtype=np.float32))  # (in_features,)

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        return self.layer(x * Tensor(self.input_scale))

    def forward_array(self, x: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """``layer(x * input_scale)`` on arrays (no graph), outputs ``rows`` only: for the GPT's fast generation
        path, when the wrapped layer computes on arrays too (``forward_array``) or is a plain Linear."""
        scaled = x * self.input_scale
        if hasattr(self.layer, "forward_array"):
            return self.layer.forward_array(scaled, rows)
        bias = None if self.layer.bias is None else self.layer.bias.data[rows]
        return ops.Linear.forward(ops.Context(ops.Linear), scaled, self.layer.weight.data[rows], bias)

    def extra_repr(self) -> str:
        return f"input_scale ({self.input_scale.shape[0]},)"


@dataclass
class ScaleGroup:
    """Linear layers that share one input and one AWQ scale, and where ``1 / s`` goes."""

    layers: list[str]  # Linear layer names, in execution order
    fold_into: str | None  # the module whose output is divided by s; None: an explicit InputScaled wrapper
    fold_rows: tuple[int, int] | None = None  # the output channels [start, stop) of fold_into divided (None: all)
    alpha: float | None = None  # the chosen exponent (set by awq; None in awq_plan)
    loss: dict[str, float] = field(default_factory=dict)  # output MSE of RTN at alpha = 0 and at the chosen alpha


def _fold_target(graph: Any, producer: str) -> str | None:
    """The module that can absorb ``1 / s`` for the consumers of ``producer``'s output, if any."""
    if producer == INPUT or producer == graph.output:
        return None
    module = graph.nodes[producer].module
    if isinstance(module, nn.LayerNorm):
        return producer if module.elementwise_affine else None
    if isinstance(module, nn.Linear):
        return producer
    if isinstance(module, FOLD_THROUGH):
        inputs = graph.nodes[producer].inputs
        if len(inputs) == 1 and inputs[0] != INPUT and graph.sole_consumer(inputs[0]) == producer:
            if isinstance(graph.nodes[inputs[0]].module, nn.Linear):
                return inputs[0]
    return None


def _affine_norm(module: Any) -> bool:
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


def gpt_folds(model: nn.Module) -> dict[str, tuple[str | None, tuple[int, int] | None]]:
    """Where AWQ folds ``1 / s`` of each Linear of the GPTs (:mod:`nanoopt.models_gpt`) in ``model``: layer name
    -> ``(fold_into, fold_rows)`` (see the module docstring; ``(None, None)``: an explicit scale).

    The rules hold for the stock classes only (``Block``, ``CausalSelfAttention``, ``MLP``, ``GPT``, matched by
    exact type, since a subclass may change the forward), and a fold needs a float target: a ``LayerNorm`` with
    weights, or for the value rows an ``nn.Linear`` ``c_attn`` of ``3 x`` ``c_proj``'s input width.

    >>> from nanoopt import models
    >>> for name, target in gpt_folds(models.gpt(5, 4, 1, 1, 8)).items():
    ...     print(name, target)
    lm_head ('transformer.ln_f', None)
    transformer.h.0.attn.c_attn ('transformer.h.0.ln_1', None)
    transformer.h.0.attn.c_proj ('transformer.h.0.attn.c_attn', (16, 24))
    transformer.h.0.mlp.c_fc ('transformer.h.0.ln_2', None)
    transformer.h.0.mlp.c_proj (None, None)
    """
    rules: dict[str, tuple[str | None, tuple[int, int] | None]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if type(module) is Block and type(module.attn) is CausalSelfAttention and type(module.mlp) is MLP:
            attn = module.attn
            rules[f"{prefix}attn.c_attn"] = (f"{prefix}ln_1" if _affine_norm(module.ln_1) else None, None)
            width = getattr(attn.c_proj, "in_features", None)
            if isinstance(attn.c_attn, nn.Linear) and width is not None and attn.c_attn.out_features == 3 * width:
                rules[f"{prefix}attn.c_proj"] = (f"{prefix}attn.c_attn", (2 * width, 3 * width))
            else:
                rules[f"{prefix}attn.c_proj"] = (None, None)
            rules[f"{prefix}mlp.c_fc"] = (f"{prefix}ln_2" if _affine_norm(module.ln_2) else None, None)
            rules[f"{prefix}mlp.c_proj"] = (None, None)  # after GELU, which is not positively homogeneous
        elif type(module) is GPT:
            rules[f"{prefix}lm_head"] = (f"{prefix}transformer.ln_f" if _affine_norm(module.transformer["ln_f"])
                                         else None, None)
    return rules


def _plan(model: nn.Module, names: list[str], example: Any, fold: bool) -> list[ScaleGroup]:
    """Group the layers (in execution order ``names``) and find where each group's ``1 / s`` can be folded."""
    graph = None
    rules = gpt_folds(model) if fold else {}
    if rules:  # a GPT (not traceable): its block rules, every other layer explicit
        return [ScaleGroup([name], *rules.get(name, (None, None))) for name in names]
    if fold:
        try:
            graph = trace(model, example)
        except (ValueError, TypeError):
            graph = None  # not traceable (functional ops in forward): every scale stays explicit
    if graph is None:
        return [ScaleGroup([name], None) for name in names]
    selected, done, groups = set(names), set(), []
    for name in names:
        if name in done:
            continue
        node = graph.nodes.get(name)
        target = None
        if node is not None and len(node.inputs) == 1:
            consumers = graph.consumers(node.inputs[0])
            if all(consumer in selected for consumer in consumers):
                target = _fold_target(graph, node.inputs[0])
        members = [other for other in names if other in graph.consumers(node.inputs[0])] if target else [name]
        groups.append(ScaleGroup(members, target))
        done.update(members)
    return groups


def awq_plan(model: nn.Module, calibration: Any, targets: Sequence[str] | None = None, ignore: Sequence[str] = (),
             fold: bool = True) -> list[ScaleGroup]:
    """The groups of Linear layers that :func:`awq` scales together and where each ``1 / s`` goes (no change to
    ``model``; see the module docstring)."""
    work = copy.deepcopy(model)
    batches = calibration_batches(calibration, "awq")
    layers = execution_order(work, select_linears(work, targets, ignore, "awq"), batches[0], "awq")
    return _plan(work, [name for name, _ in layers], batches[0], fold)


class _Activations:
    """Mean |x| per input channel over all rows, and the rows themselves (subsampled to ``max_rows``)."""

    def __init__(self, in_features: int, max_rows: int) -> None:
        self.abs_sum = np.zeros(in_features)
        self.rows: list[np.ndarray] = []
        self.n_rows = 0
        self.max_rows = max_rows

    def add_batch(self, inputs: np.ndarray) -> _Activations:
        self.abs_sum += np.abs(inputs.astype(np.float64)).sum(axis=0)
        self.rows.append(np.array(inputs, dtype=np.float32))
        self.n_rows += inputs.shape[0]
        return self

    def sample(self) -> np.ndarray:
        rows = np.concatenate(self.rows)  # (n, K)
        if rows.shape[0] > self.max_rows:  # evenly spaced rows: every batch contributes
            rows = rows[np.linspace(0, rows.shape[0] - 1, self.max_rows).astype(np.int64)]
        return rows.astype(np.float64)


def search_scale(weights: Sequence[np.ndarray], inputs: np.ndarray, mean_abs: np.ndarray, bits: int,
                 group_size: int | None, symmetric: bool, n_grid: int = 20) -> tuple[np.ndarray, float, dict]:
    """AWQ's grid search (eq. 5): ``alpha`` in ``{0, 1/n_grid, ..., 1}`` minimising the summed output MSE of the
    layers with weights ``weights (C_l, K)`` on ``inputs (rows, K)``; returns ``(s, alpha, losses)``.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(512, 16)) * np.r_[np.full(2, 20.0), np.ones(14)]     # two salient channels
    >>> s, alpha, losses = search_scale([rng.normal(size=(8, 16))], x, np.abs(x).mean(0), 3, None, False)
    >>> alpha > 0 and losses["awq"] < losses["rtn"]
    True
    """
    outputs = [inputs @ w.T.astype(np.float64) for w in weights]  # (rows, C_l)
    best: tuple[float, float, np.ndarray] | None = None
    losses: dict[str, float] = {}
    for step in range(n_grid + 1):
        alpha = step / n_grid
        s = np.maximum(mean_abs ** alpha, MIN_SCALE)
        s = s / np.sqrt(s.max() * s.min())
        loss = 0.0
        for w, out in zip(weights, outputs, strict=True):
            scaled = (w * s).astype(np.float32)
            scale, zero_point = group_qparams(scaled, bits, group_size, symmetric)
            q = dequantize_groups(quantize_groups(scaled, scale, zero_point, bits, symmetric), scale, zero_point,
                                  bits, symmetric)
            loss += float(np.mean((out - (inputs / s) @ q.T.astype(np.float64)) ** 2))
        if step == 0:
            losses["rtn"] = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    losses["awq"] = best[0]
    return best[2], best[1], losses


def search_clip(weight: np.ndarray, inputs: np.ndarray, bits: int, group_size: int | None, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5) -> np.ndarray:
    """The reference code's clipping search (see the module docstring): the clamp ``m (C, groups)`` per group.

    >>> rng = np.random.default_rng(0)
    >>> w = rng.normal(size=(4, 16)); w[0, 3] = 12.0                      # one outlier weight
    >>> m = search_clip(w, rng.normal(size=(64, 16)), 3, 8, False)
    >>> bool(m[0, 0] < 12.0), m.shape
    (True, (4, 2))
    """
    rows, depth = weight.shape
    size = depth if group_size is None else group_size
    groups = depth // size
    w = weight.reshape(rows, groups, size)  # (C, G, g)
    x = inputs.reshape(inputs.shape[0], groups, size)  # (R, G, g)
    reference = np.einsum("rgk,cgk->rcg", x, w)  # (R, C, G): each group's partial output
    limit = np.abs(w).max(axis=2)  # (C, G)
    best, best_error = limit.copy(), np.full(limit.shape, np.inf)
    for step in range(int(max_shrink * n_grid)):
        m = limit * (1 - step / n_grid)
        clipped = np.clip(w, -m[..., None], m[..., None]).reshape(rows, depth).astype(np.float32)
        scale, zero_point = group_qparams(clipped, bits, group_size, symmetric)
        q = dequantize_groups(quantize_groups(clipped, scale, zero_point, bits, symmetric), scale, zero_point,
                              bits, symmetric).astype(np.float64).reshape(rows, groups, size)
        error = np.mean((np.einsum("rgk,cgk->rcg", x, q) - reference) ** 2, axis=0)  # (C, G)
        better = error < best_error
        best[better], best_error[better] = m[better], error[better]
    return best


def _clip_weight(member: nn.Linear, inputs: np.ndarray, bits: int, group_size: int | None, symmetric: bool) -> None:
    """Clamp each group of ``member``'s weight to the bound :func:`search_clip` finds on ``inputs``."""
    parameter = get_parameter(member, "weight")
    rows, depth = parameter.shape
    size = depth if group_size is None else group_size
    m = search_clip(member.weight.data.astype(np.float64), inputs, bits, group_size, symmetric)
    bound = np.repeat(m, size, axis=1)  # (C, K)
    parameter.data = np.clip(parameter.data, -bound, bound).astype(np.float32)
    if is_pruned(member, "weight"):
        set_effective(member, "weight")


def _divide_output(module: nn.Module, s: np.ndarray, rows: tuple[int, int] | None = None) -> None:
    """Divide the output channels ``rows`` (all if None) of a Linear (rows, bias) or a LayerNorm (weight, bias) by
    ``s``."""
    part = slice(None) if rows is None else slice(*rows)
    weight = get_parameter(module, "weight")
    if isinstance(module, nn.LayerNorm):
        weight.data[part] = (weight.data[part] / s).astype(np.float32)
    else:
        weight.data[part] = (weight.data[part] / s[:, None]).astype(np.float32)
    if module.bias is not None:
        bias = get_parameter(module, "bias")
        bias.data[part] = (bias.data[part] / s).astype(np.float32)
    for name in ("weight", "bias"):
        if is_pruned(module, name):
            set_effective(module, name)


def awq(model: nn.Module, calibration: Any, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
        n_grid: int = 20, rounding: str = "rtn", fold: bool = True, max_rows: int = 4096, clip: bool = False,
        act_order: bool = False,
        percdamp: float = 0.01, blocksize: int = 128, targets: Sequence[str] | None = None,
        ignore: Sequence[str] = (), progress: bool = False, report: list[ScaleGroup] | None = None) -> nn.Module:
    """A copy of ``model`` with AWQ-scaled, ``bits``-bit weight-only Linear layers (see the module docstring).

    Parameters
    ----------
    model, calibration, bits, group_size, symmetric, targets, ignore : as for :func:`~nanoopt.quant.gptq`.
    n_grid : grid points of ``alpha`` in ``[0, 1]`` after 0 (20: steps of 0.05).
    rounding : ``"rtn"`` (AWQ) or ``"gptq"`` (AWQ then GPTQ with ``act_order``, ``percdamp``, ``blocksize``).
    fold : fold ``1 / s`` into the previous op where possible (else every scale is an explicit ``InputScaled``).
    max_rows : calibration rows per layer used in the search (evenly subsampled; the mean |x| uses all rows).
    clip : also search a clamp per group of weights (the reference code's ``auto_clip``, module docstring).
    report : a list to extend with the :class:`ScaleGroup` of every group, with the chosen ``alpha`` and the
        output MSE at ``alpha = 0`` (``loss["rtn"]``) and at ``alpha`` (``loss["awq"]``) on the sampled rows.
    """
    check_grid(bits, group_size, symmetric, "awq")
    check_options(percdamp, blocksize, act_order, "awq")
    for label, value in (("n_grid", n_grid), ("max_rows", max_rows)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"awq: {label} must be a positive int, got {value!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"awq: clip must be a bool, got {clip!r}")
    if rounding not in ("rtn", "gptq"):
        raise ValueError(f"awq: rounding must be 'rtn' or 'gptq', got {rounding!r}")
    work = copy.deepcopy(model)
    check_finite_parameters(work, "awq")
    batches, layers = layers_to_calibrate(work, calibration, targets, ignore, "awq",
                                          lambda name, layer: check_layer_groups(name, layer, group_size, "awq"))
    groups = _plan(work, [name for name, _ in layers], batches[0], fold)
    by_first = {group.layers[0]: group for group in groups}
    modules = dict(layers)
    originals = dict(work.named_modules())  # by name, before any layer is wrapped

    def start(name: str, layer: nn.Linear) -> _Activations:
        return _Activations(layer.in_features, max_rows)

    def finish(name: str, layer: nn.Linear, acts: _Activations) -> nn.Module | None:
        group = by_first[name]
        members = [modules[member] for member in group.layers]
        weights = [member.weight.data.astype(np.float64) for member in members]
        sample = acts.sample()
        s, group.alpha, group.loss = search_scale(weights, sample, acts.abs_sum / acts.n_rows, bits, group_size,
                                                  symmetric, n_grid)
        for member in members:
            parameter = get_parameter(member, "weight")
            parameter.data = (parameter.data * s).astype(np.float32)
            if is_pruned(member, "weight"):
                set_effective(member, "weight")
            if clip:  # on the scaled weight, whose input is x / s
                rows = sample[np.linspace(0, len(sample) - 1, min(len(sample), 512)).astype(np.int64)]
                _clip_weight(member, rows / s, bits, group_size, symmetric)
        if group.fold_into is not None:
            _divide_output(originals[group.fold_into], s, group.fold_rows)
            return None
        return InputScaled(layer, (1.0 / s).astype(np.float32))

    work = sequential(work, [(group.layers[0], modules[group.layers[0]]) for group in groups], batches, start,
                      finish, progress, desc="awq")
    if report is not None:
        report.extend(groups)
    explicit = {group.layers[0] for group in groups if group.fold_into is None}
    inner = [((f"{name}.layer" if name else "layer") if name in explicit else name, layer) for name, layer in layers]
    if rounding == "gptq":
        return quantize_layers(work, batches, inner, bits, group_size, symmetric, act_order, percdamp, blocksize,
                               progress)
    for name, layer in inner:
        if name == "":
            return rtn_linear(layer, bits, group_size, symmetric)
        work.set_submodule(name, rtn_linear(layer, bits, group_size, symmetric))
    return work
