"""Importance criteria: which weights, neurons or filters matter least. Each returns scores with the parameter's
shape, ready for ``importance_scores=`` of the pruning methods (low score = pruned first).

* magnitude (Han et al. 2015): s = |w|.
* first-order Taylor (Molchanov et al. 2017, "Pruning convolutional neural networks for resource efficient
  inference", eq. 8 per weight): s = sum over batches of |w * dL/dw|, the first-order estimate of the change in
  loss when w is set to zero.
* SNIP (Lee et al. 2019, "SNIP: single-shot network pruning based on connection sensitivity", eq. 6): at
  initialisation, on one batch, s = |g * w| / sum over all prunable weights of |g * w|.
* movement (Sanh et al. 2020, "Movement pruning", hard movement importance): S = -sum_t (dL/dW)^(t) W^(t)
  accumulated during fine-tuning by the :class:`MovementScores` callback; weights moving towards zero score low.
* FPGM (He et al. 2019, "Filter pruning via geometric median", eq. 6): the filters nearest the geometric median
  of a layer's filters are the most replaceable; score of filter i = sum_j ||F_i - F_j||_2.
* BN scale (Liu et al. 2017, "Learning efficient convolutional networks through network slimming"): the
  |gamma| of the BatchNorm after a convolution scores its channels; :func:`bn_l1_penalty` is the paper's
  sparsity term lambda * sum |gamma| to add to the training loss.

Taylor and SNIP run forward and backward in eval mode (BatchNorm uses running statistics, dropout is off), so
scoring changes no running statistic; gradients are cleared before and after.

>>> import numpy as np
>>> from nanoopt import nn, prune
>>> conv = nn.Conv2d(1, 4, 3)
>>> scores = fpgm(conv)
>>> _ = prune.ln_structured(conv, "weight", amount=1, n=1, dim=0, importance_scores=scores)
>>> int((conv.weight_mask.reshape(4, -1).sum(axis=1) == 0).sum())
1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from nanoopt.nn import Module
from nanoopt.nn import layers as L
from nanoopt.nn.graph import evaluating
from nanoopt.prune.masks import get_mask, get_parameter, module_label
from nanoopt.tensor import Tensor
from nanoopt.train import Callback, default_loss

Key = tuple[Module, str]
LossFunction = Callable[[Module, np.ndarray, np.ndarray], tuple[Tensor, Any]]


def prunable_parameters(model: Module, include_classifier: bool = True) -> list[Key]:
    """``(module, "weight")`` of every Linear and Conv2d in ``model``, in module order.

    With ``include_classifier=False`` the last Linear (the classifier, often kept dense) is left out.

    >>> from nanoopt import models
    >>> len(prunable_parameters(models.lenet_300_100())), len(prunable_parameters(models.lenet_300_100(), False))
    (3, 2)
    """
    found = [(module, "weight") for module in model.modules() if isinstance(module, (L.Linear, L.Conv2d))]
    if not include_classifier:
        linear = [i for i, (module, _) in enumerate(found) if isinstance(module, L.Linear)]
        if linear:
            found.pop(linear[-1])
    return found


def effective_weight(module: Module, name: str = "weight") -> np.ndarray:
    """``<name>_orig * <name>_mask`` (or the plain parameter) as an ndarray.

    >>> import numpy as np
    >>> from nanoopt import nn, prune
    >>> layer = prune.custom_from_mask(nn.Linear(2, 1), "weight", np.array([[0, 1]]))
    >>> float(effective_weight(layer)[0, 0]) == 0.0   # masked (its sign follows the random weight)
    True
    """
    return get_parameter(module, name).data * get_mask(module, name)


def magnitude(module: Module, name: str = "weight") -> np.ndarray:
    """|w| of the effective (masked) parameter.

    >>> from nanoopt import nn
    >>> layer = nn.Linear(2, 1); layer.weight.data[...] = [[-3.0, 1.0]]
    >>> magnitude(layer).tolist()
    [[3.0, 1.0]]
    """
    return np.abs(effective_weight(module, name))


def _gradient_products(model: Module, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                       parameters: Sequence[Key], compute_loss: LossFunction | None) -> dict[Key, np.ndarray]:
    """sum over batches of |w * dL/dw| for each parameter, computed in eval mode."""
    compute_loss = compute_loss or default_loss
    totals = {key: np.zeros(get_parameter(*key).shape, dtype=np.float64) for key in parameters}
    model.zero_grad()
    count = 0
    try:
        with evaluating(model, grad=True):
            for x, y in batches:
                loss, _ = compute_loss(model, x, y)
                loss.backward()
                for key in parameters:
                    parameter = get_parameter(*key)
                    if parameter.grad is not None:
                        totals[key] += np.abs(parameter.grad.astype(np.float64) * effective_weight(*key))
                model.zero_grad()
                count += 1
    finally:
        model.zero_grad()
    if count == 0:
        raise ValueError("the criterion needs at least one (x, y) batch, got none")
    return totals


def taylor(model: Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], parameters: Sequence[Key] | None = None,
           compute_loss: LossFunction | None = None) -> dict[Key, np.ndarray]:
    """First-order Taylor importance sum_batches |w * dL/dw| for each (module, name) (default: all prunable).

    >>> import numpy as np
    >>> from nanoopt import models, prune
    >>> model = models.tiny_mlp(); x = np.ones((4, 64), np.float32); y = np.arange(4)
    >>> scores = taylor(model, [(x, y)])
    >>> prune.global_unstructured(list(scores), importance_scores=scores, amount=0.5)
    """
    parameters = list(parameters) if parameters is not None else prunable_parameters(model)
    return _gradient_products(model, batches, parameters, compute_loss)


def snip(model: Module, batch: tuple[np.ndarray, np.ndarray], parameters: Sequence[Key] | None = None,
         compute_loss: LossFunction | None = None) -> dict[Key, np.ndarray]:
    """SNIP connection sensitivity |g * w| / sum |g * w| on one batch (call it before training).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> scores = snip(models.tiny_mlp(), (np.ones((4, 64), np.float32), np.arange(4)))
    >>> round(float(sum(s.sum() for s in scores.values())), 6)
    1.0
    """
    parameters = list(parameters) if parameters is not None else prunable_parameters(model)
    products = _gradient_products(model, [batch], parameters, compute_loss)
    total = sum(float(s.sum()) for s in products.values())
    if total == 0:
        raise ValueError("snip: every gradient-weight product is zero; is the model or the loss constant?")
    return {key: value / total for key, value in products.items()}


class MovementScores(Callback):
    """Accumulates Sanh et al.'s movement importance S = -sum_t g_t * W_t during :func:`nanoopt.fit`.

    ``W_t`` is the weight the gradient g_t was computed at (stored at the previous step), so the sum is exact.
    After training, ``scores_`` maps (module, name) to S, for ``importance_scores=`` of the pruning methods.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> model = models.tiny_mlp(); movement = MovementScores(prunable_parameters(model))
    >>> _ = no.fit(model, (np.ones((8, 64), np.float32), np.arange(8)), epochs=1, callbacks=[movement],
    ...            progress=False)
    >>> sorted(s.shape for s in movement.scores_.values())
    [(10, 32), (32, 64)]
    """

    def __init__(self, parameters: Sequence[Key]) -> None:
        self.parameters = list(parameters)
        self.scores_: dict[Key, np.ndarray] = {}
        self._previous: dict[Key, np.ndarray] = {}

    def on_train_begin(self, model: Module, optimizer: Any) -> None:
        for key in self.parameters:
            self.scores_.setdefault(key, np.zeros(get_parameter(*key).shape, dtype=np.float64))
            self._previous[key] = effective_weight(*key).astype(np.float64)

    def on_step_end(self, step: int, model: Module, loss: float) -> None:
        for key in self.parameters:
            parameter = get_parameter(*key)
            if parameter.grad is not None:
                self.scores_[key] -= parameter.grad.astype(np.float64) * get_mask(*key) * self._previous[key]
            self._previous[key] = effective_weight(*key).astype(np.float64)


def fpgm(module: Module, name: str = "weight") -> np.ndarray:
    """FPGM filter scores: for each output filter F_i, sum_j ||F_i - F_j||_2, broadcast over the filter.

    Use with ``ln_structured(module, name, amount, n=1, dim=0, importance_scores=fpgm(module))``.

    >>> from nanoopt import nn
    >>> layer = nn.Linear(2, 3); layer.weight.data[...] = [[0, 0], [1, 0], [5, 0]]
    >>> fpgm(layer)[:, 0].tolist()      # the middle filter is nearest the others
    [6.0, 5.0, 9.0]
    """
    weight = effective_weight(module, name)
    if weight.ndim < 2:
        raise ValueError(f"fpgm: {module_label(module)}.{name} has shape {weight.shape}; FPGM scores filters of a "
                         "weight with an output dimension")
    filters = weight.reshape(weight.shape[0], -1).astype(np.float64)
    distances = np.sqrt(np.maximum(((filters[:, None, :] - filters[None, :, :]) ** 2).sum(-1), 0.0))
    per_filter = distances.sum(axis=1)
    return np.broadcast_to(per_filter.reshape((-1,) + (1,) * (weight.ndim - 1)), weight.shape).copy()


def bn_scale(layer: Module, batchnorm: Module) -> np.ndarray:
    """Network-slimming scores for the output channels of ``layer``: |gamma_c| of the BatchNorm that follows it,
    broadcast over each channel's weights (for ``ln_structured(..., dim=0, importance_scores=...)``).

    >>> from nanoopt import nn
    >>> conv, bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2); bn.weight.data[...] = [0.5, -2.0]
    >>> bn_scale(conv, bn).reshape(2).tolist()
    [0.5, 2.0]
    """
    if not isinstance(batchnorm, L._BatchNorm) or batchnorm.weight is None:
        raise ValueError(f"bn_scale: expected an affine BatchNorm, got {module_label(batchnorm)}")
    weight = get_parameter(layer, "weight")
    if weight.shape[0] != batchnorm.num_features:
        raise ValueError(f"bn_scale: {module_label(layer)} has {weight.shape[0]} output channels but "
                         f"{module_label(batchnorm)} normalises {batchnorm.num_features}")
    gamma = np.abs(effective_weight(batchnorm, "weight")).astype(np.float64)
    return np.broadcast_to(gamma.reshape((-1,) + (1,) * (weight.ndim - 1)), weight.shape).copy()


def bn_l1_penalty(model: Module, strength: float = 1e-4) -> Tensor:
    """lambda * sum |gamma| over every affine BatchNorm: add it to the loss to train for slimming (Liu et al.).

    >>> from nanoopt import models
    >>> round(bn_l1_penalty(models.small_resnet(widths=(4,)), 0.5).item(), 3)   # 3 BNs of 4 ones
    6.0
    """
    if strength < 0:
        raise ValueError(f"bn_l1_penalty: strength must be >= 0, got {strength}")
    total: Tensor | None = None
    for module in model.modules():
        if isinstance(module, L._BatchNorm) and module.affine:
            term = module.weight.abs().sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("bn_l1_penalty: the model has no affine BatchNorm layer")
    return total * strength
