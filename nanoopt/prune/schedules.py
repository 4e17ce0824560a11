"""When to prune: one-shot, iterative prune-then-finetune, gradual (cubic), lottery tickets with rewinding.

* one-shot: prune to the target sparsity once (then finetune, if at all).
* iterative (Han et al. 2015, section 3.3): alternate pruning to a growing sparsity and finetuning.
* gradual (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1): at steps t = t0, t0 + dt, ..., t0 + n*dt
  the sparsity is raised to  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,  pruning fast while many
  weights are redundant and slowly near the target; :class:`GradualPruning` does it from inside
  :func:`nanoopt.fit` as a callback.
* lottery ticket (Frankle & Carbin 2019; rewinding to an early iteration k: Frankle et al. 2020, "Linear mode
  connectivity and the lottery ticket hypothesis"): train, prune a fraction p of the surviving weights by
  magnitude, reset the survivors (and every other parameter and buffer) to their values at step k, retrain;
  after r rounds the sparsity is 1 - (1 - p)^r.

Sparsity targets are fractions of the listed weights that are zero *through their masks*: reaching s prunes
exactly round(s * N) - (already pruned) more weights (globally, or per layer with ``scope="layer"``).

>>> import numpy as np
>>> from nanoopt import models
>>> model = models.lenet_300_100(in_features=64)
>>> prune_to_sparsity(prunable_parameters(model), 0.9)
>>> round(mask_sparsity(prunable_parameters(model)), 4)
0.9
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt.nn import Module
from nanoopt.prune.criteria import Key, prunable_parameters
from nanoopt.prune.masks import apply_mask, get_mask, get_parameter
from nanoopt.prune.methods import global_unstructured, l1_unstructured
from nanoopt.train import Batches, Callback, History, fit

__all__ = ["GradualPruning", "LotteryTicketResult", "cubic_sparsity", "iterative", "lottery_ticket",
           "mask_sparsity", "one_shot", "prunable_parameters", "prune_to_sparsity"]


def _check_sparsity(sparsity: float, what: str) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)) \
            or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{what}: a sparsity is a fraction in [0, 1], got {sparsity!r}")
    return float(sparsity)


def mask_sparsity(parameters: Sequence[Key]) -> float:
    """Fraction of masked-out entries over all ``parameters`` (0 for unpruned ones).

    >>> from nanoopt import nn, prune
    >>> layer = prune.l1_unstructured(nn.Linear(4, 5), "weight", amount=5)
    >>> mask_sparsity([(layer, "weight")])
    0.25
    """
    zeros = sum(int((get_mask(*key) == 0).sum()) for key in parameters)
    total = sum(get_parameter(*key).size for key in parameters)
    return zeros / total if total else 0.0


def prune_to_sparsity(parameters: Sequence[Key], sparsity: float, scope: str = "global",
                      importance_scores: Mapping[Key, Any] | None = None) -> None:
    """Prune by magnitude (or ``importance_scores``) among the survivors until exactly round(sparsity * N) of the
    N entries are masked, over all ``parameters`` together (``scope="global"``) or in each (``"layer"``).
    A target below the current sparsity prunes nothing (masks are never relaxed).

    >>> from nanoopt import models
    >>> model = models.tiny_mlp(); params = prunable_parameters(model)
    >>> prune_to_sparsity(params, 0.5, scope="layer")
    >>> [round(float((m.weight_mask == 0).mean()), 2) for m, _ in params]
    [0.5, 0.5]
    """
    sparsity = _check_sparsity(sparsity, "prune_to_sparsity")
    parameters = list(parameters)
    if scope == "global":
        total = sum(get_parameter(*key).size for key in parameters)
        pruned = sum(int((get_mask(*key) == 0).sum()) for key in parameters)
        global_unstructured(parameters, importance_scores=importance_scores,
                            amount=max(0, round(sparsity * total) - pruned))
    elif scope == "layer":
        for module, name in parameters:
            size = get_parameter(module, name).size
            pruned = int((get_mask(module, name) == 0).sum())
            scores = importance_scores.get((module, name)) if importance_scores else None
            l1_unstructured(module, name, amount=max(0, round(sparsity * size) - pruned), importance_scores=scores)
    else:
        raise ValueError(f"prune_to_sparsity: scope must be 'global' or 'layer', got {scope!r}")


def one_shot(model: Module, sparsity: float, parameters: Sequence[Key] | None = None, scope: str = "global"
             ) -> Module:
    """Magnitude-prune ``model`` (default: every Linear/Conv2d weight) to ``sparsity`` at once; returns it.

    >>> from nanoopt import models
    >>> model = one_shot(models.tiny_mlp(), 0.75)
    >>> round(mask_sparsity(prunable_parameters(model)), 2)
    0.75
    """
    _check_sparsity(sparsity, "one_shot")
    prune_to_sparsity(parameters if parameters is not None else prunable_parameters(model), sparsity, scope)
    return model


def iterative(model: Module, train_data: Batches, sparsities: Sequence[float], epochs_per_step: int = 1,
              parameters: Sequence[Key] | None = None, scope: str = "global", **fit_options: Any) -> list[History]:
    """For each target in ``sparsities`` (non-decreasing): prune to it, then finetune ``epochs_per_step``
    epochs with :func:`nanoopt.fit` (``fit_options`` are passed on). Returns one History per step.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.tiny_mlp(); x, y = np.ones((8, 64), np.float32), np.arange(8)
    >>> len(iterative(model, (x, y), [0.5, 0.75], epochs_per_step=1, progress=False))
    2
    """
    targets = [_check_sparsity(s, "iterative") for s in sparsities]
    if any(b < a for a, b in zip(targets, targets[1:], strict=False)):
        raise ValueError(f"iterative: sparsities must not decrease, got {list(sparsities)}")
    parameters = list(parameters) if parameters is not None else prunable_parameters(model)
    histories = []
    for target in targets:
        prune_to_sparsity(parameters, target, scope)
        histories.append(fit(model, train_data, epochs=epochs_per_step, **fit_options))
    return histories


def cubic_sparsity(step: int, initial_sparsity: float, final_sparsity: float, begin_step: int, frequency: int,
                   pruning_steps: int) -> float:
    """Zhu & Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3, clamped to [t0, t0 + n dt].

    >>> [round(cubic_sparsity(t, 0.0, 0.9, 0, 10, 3), 4) for t in (0, 10, 20, 30, 40)]
    [0.0, 0.6333, 0.8667, 0.9, 0.9]
    """
    span = frequency * pruning_steps
    progress = min(max(step - begin_step, 0), span) / span
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


class GradualPruning(Callback):
    """Gradual magnitude pruning (Zhu & Gupta 2017) inside :func:`nanoopt.fit`.

    At optimiser steps ``begin_step + k * frequency`` for k = 0..pruning_steps the listed parameters are pruned
    to :func:`cubic_sparsity` (globally or per layer); the masks then hold until the next pruning step.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> model = models.tiny_mlp(); params = prunable_parameters(model)
    >>> schedule = GradualPruning(params, 0.0, 0.8, begin_step=0, frequency=1, pruning_steps=3)
    >>> _ = no.fit(model, (np.ones((16, 64), np.float32), np.arange(16) % 10), epochs=1, batch_size=4,
    ...            callbacks=[schedule], progress=False)
    >>> round(mask_sparsity(params), 3), [round(s, 3) for s in schedule.history_]
    (0.8, [0.0, 0.563, 0.77, 0.8])
    """

    def __init__(self, parameters: Sequence[Key], initial_sparsity: float, final_sparsity: float, begin_step: int,
                 frequency: int, pruning_steps: int, scope: str = "global") -> None:
        self.parameters = list(parameters)
        self.initial_sparsity = _check_sparsity(initial_sparsity, "GradualPruning (initial_sparsity)")
        self.final_sparsity = _check_sparsity(final_sparsity, "GradualPruning (final_sparsity)")
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"GradualPruning: final_sparsity {final_sparsity} is below initial {initial_sparsity}")
        for label, value, low in (("begin_step", begin_step, 0), ("frequency", frequency, 1),
                                  ("pruning_steps", pruning_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"GradualPruning: {label} must be an int >= {low}, got {value!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"GradualPruning: scope must be 'global' or 'layer', got {scope!r}")
        self.begin_step, self.frequency, self.pruning_steps, self.scope = begin_step, frequency, pruning_steps, scope
        self.history_: list[float] = []   # the sparsity targets applied, in order

    def on_step_end(self, step: int, model: Module, loss: float) -> None:
        offset = step - self.begin_step
        if offset < 0 or offset % self.frequency or offset // self.frequency > self.pruning_steps:
            return
        target = cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.begin_step,
                                self.frequency, self.pruning_steps)
        prune_to_sparsity(self.parameters, target, self.scope)
        self.history_.append(target)


class _Snapshot(Callback):
    """Copies the model's state_dict after optimiser step ``step`` (or at the start, for step -1)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state_: dict[str, np.ndarray] | None = None

    def on_train_begin(self, model: Module, optimizer: Any) -> None:
        if self.step < 0:
            self.state_ = model.state_dict()

    def on_step_end(self, step: int, model: Module, loss: float) -> None:
        if step == self.step:
            self.state_ = model.state_dict()


@dataclass
class LotteryTicketResult:
    """Per round: the sparsity of the ticket and the training history of that round."""

    sparsities: list[float] = field(default_factory=list)
    histories: list[History] = field(default_factory=list)
    rewind_state: dict[str, np.ndarray] = field(default_factory=dict)


def lottery_ticket(model: Module, train_data: Batches, rounds: int, amount_per_round: float, epochs: int,
                   rewind_step: int = -1, parameters: Sequence[Key] | None = None, scope: str = "global",
                   **fit_options: Any) -> LotteryTicketResult:
    """Iterative magnitude pruning with rewinding: ``rounds`` times, train ``epochs``, prune ``amount_per_round``
    of the survivors, rewind every parameter and buffer to its value after step ``rewind_step`` (-1: the
    initialisation, Frankle & Carbin's original), keeping the masks. A final training round follows the last
    pruning. ``fit_options`` go to :func:`nanoopt.fit` (pass a ``seed``-ed DataLoader to replay the same data order).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.tiny_mlp(); x, y = np.ones((8, 64), np.float32), np.arange(8)
    >>> result = lottery_ticket(model, (x, y), rounds=2, amount_per_round=0.5, epochs=1, progress=False)
    >>> [round(s, 3) for s in result.sparsities]
    [0.5, 0.75]
    """
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"lottery_ticket: rounds must be an int >= 1, got {rounds!r}")
    _check_sparsity(amount_per_round, "lottery_ticket (amount_per_round)")
    parameters = list(parameters) if parameters is not None else prunable_parameters(model)
    for key in parameters:                       # reparametrise first, so the state dict keys stay the same
        if not hasattr(key[0], key[1] + "_orig"):
            apply_mask(key[0], key[1], np.ones(get_parameter(*key).shape, dtype=np.float32))
    result = LotteryTicketResult()
    snapshot = _Snapshot(rewind_step)
    callbacks = list(fit_options.pop("callbacks", ()))
    for round_index in range(rounds + 1):
        extra = [snapshot] if round_index == 0 else []
        history = fit(model, train_data, epochs=epochs, callbacks=callbacks + extra, **fit_options)
        if round_index == rounds:
            result.histories.append(history)
            break
        if snapshot.state_ is None:
            raise ValueError(f"lottery_ticket: rewind_step={rewind_step} was never reached in {epochs} epochs")
        for module, name in parameters:
            if scope == "layer":
                l1_unstructured(module, name, amount=amount_per_round)
        if scope == "global":
            global_unstructured(parameters, amount=amount_per_round)
        masks = {(id(key[0]), key[1]): get_mask(*key).copy() for key in parameters}
        rewind = {k: v for k, v in snapshot.state_.items() if not k.endswith("_mask")}
        model.load_state_dict(rewind, strict=False)
        for module, name in parameters:
            module._buffers[name + "_mask"] = masks[(id(module), name)]
        result.sparsities.append(mask_sparsity(parameters))
        result.histories.append(history)
    result.rewind_state = copy.deepcopy(snapshot.state_) if snapshot.state_ is not None else {}
    return result
