"""Folding BatchNorm into the convolution or linear layer before it (Jacob et al. 2018, section 3.2, eq. 14;
Krishnamoorthi 2018, section 2.5).

In eval mode BatchNorm is an affine map per channel, ``bn(y) = gamma (y - mu) / sqrt(var + eps) + beta``, so for
``y = W x + b`` it folds exactly into the layer:

    ``W' = W * gamma / sqrt(var + eps)``   (row ``c`` of ``W`` scaled by the factor of channel ``c``)
    ``b' = (b - mu) * gamma / sqrt(var + eps) + beta``

computed in float64 and stored in the weight's dtype. The folded model computes the same function as the
original in eval mode (the only difference is float rounding, tested). Folding needs the data flow: a BatchNorm
is folded when its input comes from a Conv2d/Linear whose output nothing else reads; it is then replaced by
``nn.Identity``. BatchNorms that cannot be folded (after another layer, or without running statistics) stay.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import nn
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
>>> model[1].running_mean[:] = [0.5, -1.0]; _ = model.eval()
>>> folded = fold_batchnorm(model)
>>> type(folded[1]).__name__
'Identity'
>>> x = no.Tensor(np.random.default_rng(0).normal(size=(2, 1, 5, 5)))
>>> bool(np.allclose(folded(x).data, model(x).data, atol=1e-6))
True
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from nanoopt.nn import BatchNorm1d, BatchNorm2d, Conv2d, Identity, Linear, Module, Parameter
from nanoopt.nn.graph import trace

__all__ = ["batchnorm_pairs", "fold_batchnorm", "fold_bn_parameters", "foldable"]


def fold_bn_parameters(weight: np.ndarray, bias: np.ndarray | None, running_mean: np.ndarray,
                       running_var: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None,
                       eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` of the module docstring for a weight ``(C_out, ...)``; float64 math, ``weight``'s dtype out.

    >>> w, b = fold_bn_parameters(np.ones((2, 3)), None, np.array([1.0, 0.0]), np.array([3.0, 0.0]),
    ...                           np.array([2.0, 1.0]), np.array([0.0, 0.5]), eps=1.0)
    >>> w[:, 0].tolist(), b.tolist()
    ([1.0, 1.0], [-1.0, 0.5])
    """
    channels = weight.shape[0]
    gamma64 = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    beta64 = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    factor = gamma64 / np.sqrt(np.asarray(running_var, np.float64) + eps)  # (C_out,)
    bias64 = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
    shape = (channels,) + (1,) * (weight.ndim - 1)
    folded_weight = np.asarray(weight, np.float64) * factor.reshape(shape)
    folded_bias = (bias64 - np.asarray(running_mean, np.float64)) * factor + beta64
    return folded_weight.astype(weight.dtype), folded_bias.astype(weight.dtype)


def foldable(layer: Module, bn: Module, output_shape: tuple[int, ...] | None = None) -> bool:
    """Whether BatchNorm ``bn`` folds into ``layer`` (whose output, of shape ``output_shape`` if known, it reads):
    a Conv2d followed by a BatchNorm2d, or a Linear with 2-D output followed by a BatchNorm1d, over the same
    channels, with running statistics.

    >>> from nanoopt import nn
    >>> foldable(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), foldable(nn.Linear(3, 2), nn.BatchNorm2d(2))
    (True, False)
    """
    if not bn.track_running_stats:
        return False
    if isinstance(layer, Conv2d):
        return isinstance(bn, BatchNorm2d) and bn.num_features == layer.out_channels
    if isinstance(layer, Linear):  # BatchNorm1d normalises axis 1: the features only for 2-D outputs
        two_d = output_shape is None or len(output_shape) == 2
        return isinstance(bn, BatchNorm1d) and bn.num_features == layer.out_features and two_d
    return False


def batchnorm_pairs(model: Module, example_input: Any = None) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` of every BatchNorm of ``model`` that folds into the layer before it: its
    input comes from a Conv2d / Linear whose output nothing else reads, and :func:`foldable` holds.

    >>> from nanoopt import nn
    >>> batchnorm_pairs(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2)))
    {'0': '1'}
    """
    graph = trace(model, example_input)
    pairs = {}
    for node in graph.nodes.values():
        if not isinstance(node.module, BatchNorm1d | BatchNorm2d):
            continue
        producer = graph.nodes.get(node.inputs[0])
        if producer is None or graph.sole_consumer(producer.name) != node.name:
            continue
        if foldable(producer.module, node.module, producer.output_shape):
            pairs[producer.name] = node.name
    return pairs


def fold_batchnorm(model: Module, example_input: Any = None) -> Module:
    """A copy of ``model`` with every foldable BatchNorm folded into the layer before it (see module docstring).

    ``example_input`` is needed when the model is not a plain (nested) Sequential, to trace its data flow.
    The original model is not modified.
    """
    folded = copy.deepcopy(model)
    for layer_name, bn_name in batchnorm_pairs(folded, example_input).items():
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        weight, bias = fold_bn_parameters(
            layer.weight.data, None if layer.bias is None else layer.bias.data, bn.running_mean, bn.running_var,
            None if bn.weight is None else bn.weight.data, None if bn.bias is None else bn.bias.data, bn.eps,
        )
        layer.weight = Parameter(weight)
        layer.bias = Parameter(bias)
        folded.set_submodule(bn_name, Identity())
    return folded
