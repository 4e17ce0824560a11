"""Where a model is sparse, and where it can afford to be: per-layer sparsity reports and sensitivity scans.

* :func:`sparsity_report`: for every Linear/Conv2d weight (and any other pruned parameter), the number of
  entries, of exact zeros in the effective weight, and the whole-neuron/filter count that is entirely zero.
* :func:`layer_sensitivity` (Han et al. 2015, Fig. 6; Li et al. 2017, Fig. 2): prune one layer at a time to each
  sparsity in ``amounts`` (magnitude, on a copy) and measure the accuracy; layers whose accuracy falls fast
  deserve a lower sparsity.

>>> from nanoopt import models, prune
>>> model = models.tiny_mlp()
>>> _ = prune.l1_unstructured(model[1], "weight", amount=0.5)
>>> print(format_sparsity(sparsity_report(model)))
| layer | shape | entries | zeros | sparsity | empty rows |
|---|---|---:|---:|---:|---:|
| 1.weight | 32x64 | 2,048 | 1,024 | 50.0% | 0/32 |
| 3.weight | 10x32 | 320 | 0 | 0.0% | 0/10 |
| total | | 2,368 | 1,024 | 43.2% | |
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nanoopt.nn import Module
from nanoopt.nn import layers as L
from nanoopt.prune.masks import get_mask, get_parameter, pruned_names
from nanoopt.prune.methods import l1_unstructured
from nanoopt.train import evaluate


@dataclass
class LayerSparsity:
    """One parameter's sparsity."""

    name: str                 # dotted name, e.g. "1.weight"
    shape: tuple[int, ...]
    entries: int
    zeros: int                # exact zeros of the effective (masked) parameter
    empty_rows: int           # output neurons / filters that are entirely zero

    @property
    def sparsity(self) -> float:
        return self.zeros / self.entries if self.entries else 0.0


def sparsity_report(model: Module) -> list[LayerSparsity]:
    """Sparsity of every Linear/Conv2d weight and every other pruned parameter of ``model``.

    >>> from nanoopt import models
    >>> [row.name for row in sparsity_report(models.tiny_mlp())]
    ['1.weight', '3.weight']
    """
    rows = []
    for module_name, module in model.named_modules():
        names = list(pruned_names(module))
        if isinstance(module, (L.Linear, L.Conv2d)) and "weight" not in names:
            names.insert(0, "weight")
        for name in names:
            values = get_parameter(module, name).data * get_mask(module, name)
            flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)
            rows.append(LayerSparsity(f"{module_name}.{name}" if module_name else name, values.shape, values.size,
                                      int(np.count_nonzero(values == 0)), int((~flat.any(axis=1)).sum())))
    return rows


def format_sparsity(report: Sequence[LayerSparsity]) -> str:
    """A Markdown table of :func:`sparsity_report` with a total line.

    >>> from nanoopt import models
    >>> format_sparsity(sparsity_report(models.tiny_mlp())).splitlines()[-1]
    '| total | | 2,368 | 0 | 0.0% | |'
    """
    lines = ["| layer | shape | entries | zeros | sparsity | empty rows |", "|---|---|---:|---:|---:|---:|"]
    for row in report:
        lines.append(f"| {row.name} | {'x'.join(map(str, row.shape))} | {row.entries:,} | {row.zeros:,} | "
                     f"{100 * row.sparsity:.1f}% | {row.empty_rows}/{row.shape[0]} |")
    entries, zeros = sum(r.entries for r in report), sum(r.zeros for r in report)
    lines.append(f"| total | | {entries:,} | {zeros:,} | {100 * zeros / max(entries, 1):.1f}% | |")
    return "\n".join(lines)


def layer_sensitivity(model: Module, test_data: tuple[np.ndarray, np.ndarray],
                      amounts: Sequence[float] = (0.5, 0.7, 0.9, 0.95), layers: Sequence[str] | None = None
                      ) -> dict[str, dict[float, float]]:
    """Accuracy on ``test_data`` after magnitude-pruning one layer's weight to each amount, the rest untouched.

    ``layers`` are dotted module names (default: every Linear/Conv2d); the key ``"(none)"`` holds the unpruned
    accuracy. ``model`` itself is not modified (each trial prunes a deep copy).

    >>> from nanoopt import data, models
    >>> result = layer_sensitivity(models.tiny_mlp(), data.load_digits("test"), amounts=(0.5,))
    >>> sorted(result)
    ['(none)', '1', '3']
    """
    modules = dict(model.named_modules())
    if layers is None:
        layers = [name for name, module in modules.items() if isinstance(module, (L.Linear, L.Conv2d))]
    weighted = [name for name, module in modules.items() if hasattr(module, "weight")]
    for name in layers:
        if name not in weighted:
            raise ValueError(f"layer_sensitivity: {name!r} is not a layer with a weight in this model; its layers "
                             f"with a weight are {weighted}")
    result: dict[str, dict[float, float]] = {"(none)": {0.0: evaluate(model, test_data)["accuracy"]}}
    for name in layers:
        result[name] = {}
        for amount in amounts:
            trial = copy.deepcopy(model)
            l1_unstructured(trial.get_submodule(name), "weight", amount=amount)
            result[name][amount] = evaluate(trial, test_data)["accuracy"]
    return result


def format_sensitivity(result: dict[str, dict[float, float]]) -> str:
    """A Markdown table: one row per layer, one column per amount (accuracy in %).

    >>> print(format_sensitivity({"(none)": {0.0: 0.9}, "fc": {0.5: 0.85}}))
    | layer | 50% |
    |---|---:|
    | unpruned: 90.00% | |
    | fc | 85.00 |
    """
    amounts = sorted({a for name, row in result.items() if name != "(none)" for a in row})
    lines = ["| layer | " + " | ".join(f"{100 * a:g}%" for a in amounts) + " |",
             "|---|" + "---:|" * len(amounts)]
    if "(none)" in result:
        lines.append(f"| unpruned: {100 * result['(none)'][0.0]:.2f}% |" + " |" * len(amounts))
    for name, row in result.items():
        if name != "(none)":
            lines.append(f"| {name} | " + " | ".join(f"{100 * row[a]:.2f}" for a in amounts) + " |")
    return "\n".join(lines)
