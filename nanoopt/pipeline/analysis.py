"""What the plots need, computed once when a recipe runs and kept in its report: per-layer sensitivity of the
float model (accuracy with only that layer pruned to the recipe's sparsity; SQNR of that layer's weights on the
recipe's weight grid), and per-layer weight histograms with the quantization grid of the compressed model.

Weight SQNR (dB) = 10 log10(sum w^2 / sum (w - Q(w))^2) with Q the per-output-channel symmetric grid of
``bits`` bits (scale = max |w| / (2^(bits-1) - 1)), the grid the integer layers use.

>>> import numpy as np
>>> round(weight_sqnr_db(np.array([[1.0, -0.5, 0.25]]), bits=8), 1)
48.3
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from nanoopt import nn, prune
from nanoopt.quant.analysis import sqnr_db
from nanoopt.report import _layer_weight

__all__ = ["layer_analysis", "weight_sqnr_db"]

BINS = 80


def weight_sqnr_db(weight: np.ndarray, bits: int) -> float:
    """SQNR of ``weight`` rounded to its per-output-channel symmetric grid of ``bits`` bits."""
    flat = weight.reshape(len(weight), -1).astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(flat).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    return sqnr_db(flat, np.clip(np.round(flat / scale), -qmax, qmax) * scale)


def _targets(recipe_steps: list[dict[str, Any]]) -> tuple[float, int]:
    """The recipe's final sparsity (0.9 if it does not prune) and its lowest weight bits (4 if none)."""
    sparsities = [step["sparsity"] for step in recipe_steps if step["kind"] == "prune"]
    bits = [step["bits"] for step in recipe_steps if step["kind"] in ("qat", "ptq", "weight_only")]
    return (max(sparsities) if sparsities else 0.9), (min(bits) if bits else 4)


def _grid(module: nn.Module, bits: int) -> list[float]:
    """The levels k * s (k = -qmax..qmax) of the layer's median channel scale, when it has integer weights."""
    scale = module._buffers.get("weight_scale") if hasattr(module, "_buffers") else None
    if scale is None or bits >= 16:
        return []
    qmax = 2 ** (bits - 1) - 1
    return [float(k * np.median(scale)) for k in range(-qmax, qmax + 1)]


def layer_analysis(baseline: nn.Module, compressed: nn.Module, test_data: tuple[np.ndarray, np.ndarray],
                   recipe_steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Sensitivity per layer of ``baseline`` and weight histograms of both models (see the module docstring)."""
    sparsity, bits = _targets(recipe_steps)
    float_model = prune.remove_all(copy.deepcopy(baseline))
    pruning = prune.layer_sensitivity(float_model, test_data, amounts=(sparsity,))
    unpruned = pruning.pop("(none)")[0.0]
    layers = []
    compressed_modules = {name.removeprefix("model."): module for name, module in compressed.named_modules()}
    for name, module in float_model.named_modules():
        found = _layer_weight(module)
        if found is None or name not in pruning:
            continue
        weight = found[0]
        counts, edges = np.histogram(weight, bins=BINS)
        entry: dict[str, Any] = {"name": name, "pruned_accuracy": pruning[name][sparsity],
                                 "sqnr_db": weight_sqnr_db(weight, bits),
                                 "float_histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}
        other = compressed_modules.get(name)
        found_compressed = _layer_weight(other) if other is not None else None
        if found_compressed is not None:
            values = found_compressed[0]
            survivors = values[values != 0]
            counts, edges = np.histogram(survivors, bins=BINS) if survivors.size else (np.zeros(0), np.zeros(0))
            entry["compressed_histogram"] = {"counts": np.asarray(counts).tolist(), "edges": np.asarray(edges).tolist()}
            entry["grid"] = _grid(other, found_compressed[1])
            entry["bits"] = found_compressed[1]
        layers.append(entry)
    return {"sparsity": sparsity, "bits": bits, "float_accuracy": unpruned, "layers": layers}
