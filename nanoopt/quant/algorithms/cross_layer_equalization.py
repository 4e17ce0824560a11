"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.1).

For two layers joined by a positive-homogeneous function ``f`` (ReLU, max/avg pooling, flatten, identity:
``f(s x) = s f(x)`` for ``s > 0``), ``W2 f(W1 x + b1) = (W2 S) f(S^-1 (W1 x + b1))`` for any positive diagonal
``S``. Each output channel ``i`` of layer 1 is scaled by ``1 / s_i`` and the matching input channel of layer 2
by ``s_i``, with (eq. 10-11)

    ``s_i = sqrt(r1_i / r2_i)``,  ``r1_i = max |W1[i, ...]|``,  ``r2_i = max |W2[:, i, ...]|``

which makes both ranges ``sqrt(r1_i r2_i)``: the per-tensor weight ranges of the two layers become as balanced
as they can be, which helps per-tensor weight quantization most. Pairs are processed repeatedly until the
scales settle (``iterations``, or all ``|log s_i| < tolerance``). The equalized model computes the same
function in float (tested).

Pairs come from the traced data flow of the BatchNorm-folded model: a Linear/Conv2d (``groups = 1``) whose
output alone feeds, through ReLU / pooling / Identity / Dropout / Flatten nodes that each have one reader, a
Linear/Conv2d (``groups = 1``). Through a Flatten, input channel ``i`` of a Linear is the block of features
``i * HW .. (i + 1) * HW - 1``.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import nn
>>> no.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> model[0].weight.data[0] *= 50.0       # one channel with a 50x larger range
>>> equalized = cross_layer_equalization(model)
>>> x = no.Tensor(np.random.default_rng(0).normal(size=(5, 4)))
>>> bool(np.allclose(equalized(x).data, model(x).data, rtol=1e-5, atol=1e-5))
True
>>> spread = lambda w: round(float(np.abs(w).max(axis=1).max() / np.abs(w).max(axis=1).min()), 1)
>>> spread(model[0].weight.data), spread(equalized[0].weight.data)   # channel ranges: max / min
(58.6, 7.2)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.nn.converted import require_float_model
from nanoopt.nn.graph import Graph, trace
from nanoopt.quant.bn_fold import fold_batchnorm

__all__ = ["cross_layer_equalization", "equalization_pairs"]

HOMOGENEOUS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Flatten)


def _weighted(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def equalization_pairs(graph: Graph) -> list[tuple[str, str, int]]:
    """``(first, second, block)`` for every equalizable pair; ``block`` input features of ``second`` belong to each
    channel of ``first`` (1 unless a Flatten lies between a conv and a linear layer)."""
    pairs = []
    for name, node in graph.nodes.items():
        if not _weighted(node.module):
            continue
        current, flattened = name, False
        while True:
            reader = graph.sole_consumer(current)
            if reader is None:
                break
            module = graph.nodes[reader].module
            if _weighted(module):
                pairs.append((name, reader, _block(node.module, module, flattened)))
                break
            if not isinstance(module, HOMOGENEOUS):
                break
            flattened = flattened or isinstance(module, nn.Flatten)
            current = reader
    return [pair for pair in pairs if pair[2] > 0]


def _block(first: nn.Module, second: nn.Module, flattened: bool) -> int:
    channels = first.weight.shape[0]
    inputs = second.weight.shape[1]  # in_features, or in_channels of a groups=1 conv
    if not flattened:
        return 1 if inputs == channels else 0
    return inputs // channels if inputs % channels == 0 and isinstance(second, nn.Linear) else 0


def _equalize(first: nn.Module, second: nn.Module, block: int) -> float:
    """Rescale one pair in place; returns ``max_i |log s_i|``."""
    w1 = first.weight.data.astype(np.float64)
    w2 = second.weight.data.astype(np.float64)
    channels = w1.shape[0]
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    columns = np.moveaxis(w2, 1, 0).reshape(channels, block, -1)  # input channel i: its `block` features
    r2 = np.abs(columns).reshape(channels, -1).max(axis=1)
    usable = (r1 > 0) & (r2 > 0)
    scale = np.where(usable, np.sqrt(np.where(usable, r1 / np.where(r2 > 0, r2, 1.0), 1.0)), 1.0)  # (C,)
    first.weight.data = (w1 / scale.reshape((-1,) + (1,) * (w1.ndim - 1))).astype(first.weight.dtype)
    if first.bias is not None:
        first.bias.data = (first.bias.data.astype(np.float64) / scale).astype(first.bias.dtype)
    per_input = np.repeat(scale, block)  # (C * block,)
    shape = (1, -1) + (1,) * (w2.ndim - 2)
    second.weight.data = (w2 * per_input.reshape(shape)).astype(second.weight.dtype)
    return float(np.abs(np.log(scale)).max(initial=0.0))


def cross_layer_equalization(model: nn.Module, example_input: Any = None, iterations: int = 20,
                             tolerance: float = 1e-6) -> nn.Module:
    """A BatchNorm-folded copy of ``model`` with every equalizable pair of layers equalized (module docstring)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    require_float_model(model, "cross_layer_equalization")
    if example_input is not None and not hasattr(example_input, "data"):
        example_input = np.asarray(example_input, dtype=np.float32)
    equalized = fold_batchnorm(model, example_input)
    graph = trace(equalized, example_input)
    pairs = equalization_pairs(graph)
    modules = dict(equalized.named_modules())
    for _ in range(iterations):
        change = max((_equalize(modules[a], modules[b], block) for a, b, block in pairs), default=0.0)
        if change < tolerance:
            break
    return equalized
