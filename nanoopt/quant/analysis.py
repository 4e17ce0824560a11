"""Where quantization hurts: per-layer SQNR, one-layer-at-a-time sensitivity, saturation counters, and a greedy
mixed-precision search under a size budget.

All of it works on a calibrated prepared model (``quant.prepare`` + ``quant.calibrate``), whose eval mode is the
integer model (bit for bit) and whose quantizers can be switched off to get the (BatchNorm-folded) float model.

* :func:`sqnr_per_layer` -- for every layer that starts a grid (Linear, Conv2d, Add, float-kept layers) the
  signal-to-quantization-noise ratio of its output, float model against quantized model, both run end to end
  (errors of earlier layers included): ``SQNR = 10 log10(sum y^2 / sum (y - y~)^2)`` dB.
* :func:`layer_sensitivity` -- quantize one layer alone (its weights, its output and, through its integer path,
  its input), everything else float; report the SQNR of the model output (and the accuracy with labels). The
  lower the SQNR, the more sensitive the layer (the usual way to find layers to keep in higher precision).
* :func:`saturation_counts` -- per quantizer: the fraction of float values outside its representable range
  (clipped) and the fraction of integer codes at ``qmax``, or at ``qmin`` unless ``qmin`` is the zero point (a
  ReLU output's zeros), in the quantized model (saturated).
* :func:`mixed_precision_search` -- start with every layer at the high precision; while the total cost exceeds
  the budget, move to the low precision the layer with the smallest sensitivity per byte saved (sensitivity =
  the loss of output SQNR when that layer alone is at low precision) -- or, when a single move is enough to
  meet the budget, the least sensitive such move. Costs are either the bytes the converted
  layer stores (weights, bias, scales: the choice "4 or 8-bit weights") or the bytes of its output activation
  per example (the choice "8 or 16-bit activations").

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(64, 1, 8, 8)).astype(np.float32)
>>> prepared = quant.calibrate(quant.prepare(models.tiny_mlp(), example_input=x[:1]), [x], progress=False)
>>> sorted(sqnr_per_layer(prepared, [x]))
['1', '3']
>>> all(value > 20 for value in sqnr_per_layer(prepared, [x]).values())   # int8: > 20 dB
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.nn.graph import INPUT, capture
from nanoopt.quant.algorithms.layer_data import check_calibrated, float_mode
from nanoopt.quant.config import QuantConfig
from nanoopt.quant.fake_quant import FakeQuantize
from nanoopt.quant.ptq import PreparedModel, calibrate, convert, iterate_batches, prepare
from nanoopt.tensor import Tensor

__all__ = ["MixedPrecisionResult", "layer_sensitivity", "mixed_precision_search", "saturation_counts",
           "sqnr_db", "sqnr_per_layer"]


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """``10 log10(sum reference^2 / sum (reference - approximation)^2)`` (inf when equal).

    >>> round(sqnr_db(np.array([1.0, -1.0]), np.array([1.1, -1.0])), 2)
    23.01
    """
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum((reference - np.asarray(approximation, np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _grid_layers(prepared: PreparedModel) -> list[tuple[str, nn.Module]]:
    """Layers owning an output quantizer, in execution order."""
    modules = dict(prepared.model.named_modules())
    return [(name, modules[name]) for name in prepared.graph.nodes
            if isinstance(getattr(modules.get(name), "output_quantizer", None), FakeQuantize)]


def _outputs(prepared: PreparedModel, layers: list[tuple[str, nn.Module]], batches: list[np.ndarray]):
    """The model output and every listed layer's output, concatenated over the batches."""
    prepared.eval()  # and it stays in eval mode
    outputs = []
    with capture(prepared, dict(layers), outputs=True) as seen:
        for batch in batches:
            outputs.append(prepared(Tensor(batch)).data)
    return np.concatenate(outputs), {name: np.concatenate(values) for name, values in seen.outputs.items()}


def sqnr_per_layer(prepared: PreparedModel, batches: Any) -> dict[str, float]:
    """SQNR (dB) of each grid-starting layer's output, float model vs quantized model (module docstring)."""
    check_calibrated(prepared, "sqnr_per_layer")
    batch_list = list(iterate_batches(batches))
    layers = _grid_layers(prepared)
    with float_mode(prepared):
        _, reference = _outputs(prepared, layers, batch_list)
    _, quantized = _outputs(prepared, layers, batch_list)
    return {name: sqnr_db(reference[name], quantized[name]) for name, _ in layers}


def _layer_quantizers(prepared: PreparedModel) -> dict[str, list[FakeQuantize]]:
    """The quantizers that belong to each layer (``"input"``: the model input's)."""
    owned = {INPUT: [prepared.input_quantizer]}
    for name, module in _grid_layers(prepared):
        owned[name] = [q for q in (getattr(module, "weight_quantizer", None), module.output_quantizer) if q is not None]
    return owned


def layer_sensitivity(prepared: PreparedModel, batches: Any, labels: np.ndarray | None = None) -> dict[str, dict]:
    """For each layer quantized alone: ``{"sqnr_db": output SQNR vs float}`` (+ ``"accuracy"`` with ``labels``)."""
    check_calibrated(prepared, "layer_sensitivity")
    batch_list = list(iterate_batches(batches))
    with float_mode(prepared):
        reference, _ = _outputs(prepared, [], batch_list)
    results = {}
    for name, owned in _layer_quantizers(prepared).items():
        with float_mode(prepared):
            for quantizer in owned:
                quantizer.fake_quant_enabled = True
            output, _ = _outputs(prepared, [], batch_list)
        result = {"sqnr_db": sqnr_db(reference, output)}
        if labels is not None:
            result["accuracy"] = float(np.mean(output.argmax(axis=1) == np.asarray(labels)[:len(output)]))
        results[name] = result
    return results


def saturation_counts(prepared: PreparedModel, batches: Any) -> dict[str, dict[str, float]]:
    """Per quantizer (named by its owner): ``clipped`` (float values outside the range) and ``saturated``
    (codes at ``qmin``/``qmax`` in the quantized model) fractions; weights report ``clipped`` only."""
    check_calibrated(prepared, "saturation_counts")
    batch_list = list(iterate_batches(batches))
    layers = _grid_layers(prepared)
    with float_mode(prepared):
        float_input = np.concatenate(batch_list)
        _, float_outputs = _outputs(prepared, layers, batch_list)
    _, quantized_outputs = _outputs(prepared, layers, batch_list)
    report = {}

    def clipped(quantizer: FakeQuantize, values: np.ndarray) -> float:
        params = quantizer.qparams()
        scale, zero = params.scale.astype(np.float64), params.zero_point.astype(np.float64)
        if params.spec.per_channel:
            shape = (-1,) + (1,) * (values.ndim - 1)
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        low, high = (params.spec.qmin - zero) * scale, (params.spec.qmax - zero) * scale
        return float(np.mean((values < low - scale / 2) | (values > high + scale / 2)))

    def saturated(quantizer: FakeQuantize, values: np.ndarray) -> float:
        params = quantizer.qparams()
        codes = params.quantize(values)
        at_bottom = (codes == params.spec.qmin) & (params.spec.qmin != params.zero)  # qmin = zero point: real 0
        return float(np.mean(at_bottom | (codes == params.spec.qmax)))

    report[INPUT] = {"clipped": clipped(prepared.input_quantizer, float_input),
                     "saturated": saturated(prepared.input_quantizer, float_input)}
    for name, module in layers:
        output_quantizer = module.output_quantizer
        report[name] = {"clipped": clipped(output_quantizer, float_outputs[name]),
                        "saturated": saturated(output_quantizer, quantized_outputs[name])}
        weight_quantizer = getattr(module, "weight_quantizer", None)
        if weight_quantizer is not None:
            report[f"{name}.weight"] = {"clipped": clipped(weight_quantizer, module.weight.data)}
    return report


# ------------------------------------------------------------------------------------------- mixed precision
@dataclass
class MixedPrecisionResult:
    """The outcome of :func:`mixed_precision_search`."""

    config: QuantConfig  # the base config with one override per layer moved to low precision
    low_layers: list[str]  # layers at the low precision, in the order they were moved
    cost: int  # total cost of the chosen assignment (bytes)
    output_sqnr_db: float  # SQNR of the model output with that assignment (calibration data)
    sensitivity: dict[str, float] = field(default_factory=dict)  # output SQNR lost by each layer alone at low


def _calibrated(model: nn.Module, config: QuantConfig, example: np.ndarray, batches: list[np.ndarray]):
    return calibrate(prepare(model, config, example), batches, progress=False)


def _layer_costs(prepared: PreparedModel, cost: str, example: np.ndarray) -> dict[str, int]:
    """Per grid-starting layer: bytes stored by its converted form, or bytes of its output per example."""
    if cost == "stored":
        qmodel = convert(prepared)
        modules = dict(qmodel.model.named_modules())
        return {name: int(sum(a.nbytes for a in modules[name].state_dict().values()))
                for name, _ in _grid_layers(prepared)}
    layers = _grid_layers(prepared)
    _, outputs = _outputs(prepared, layers, [example[:1]])
    return {name: int(outputs[name].size * module.output_quantizer.spec.dtype.itemsize) for name, module in layers}


def mixed_precision_search(model: nn.Module, batches: Any, budget_bytes: int, low: dict[str, Any],
                           config: QuantConfig | None = None, cost: str = "stored",
                           example_input: Any = None) -> MixedPrecisionResult:
    """Greedy mixed precision (module docstring): ``low`` is the per-layer override of the low precision, e.g.
    ``{"weight": weight_spec(4), "weight_observer": PerChannelMSEObserver}`` (with ``cost="stored"``) or
    ``{"activation": INT8_ACTIVATION}`` over a 16-bit ``config`` (with ``cost="activations"``)."""
    if cost not in ("stored", "activations"):
        raise ValueError(f"cost must be 'stored' or 'activations', got {cost!r}")
    config = QuantConfig() if config is None else config
    batch_list = list(iterate_batches(batches))
    if not batch_list:
        raise ValueError("mixed_precision_search: no batches were given")
    example = batch_list[0][:1] if example_input is None else np.asarray(example_input, np.float32)
    high_model = _calibrated(model, config, example, batch_list)
    with float_mode(high_model):
        reference, _ = _outputs(high_model, [], batch_list)
    high_output, _ = _outputs(high_model, [], batch_list)
    high_sqnr = sqnr_db(reference, high_output)
    high_costs = _layer_costs(high_model, cost, example)
    names = list(high_costs)
    low_all = config.replace(overrides={**config.overrides, **{name: {**config.overrides.get(name, {}), **low}
                                                                for name in names}})
    low_costs = _layer_costs(_calibrated(model, low_all, example, batch_list), cost, example)
    if sum(low_costs.values()) > budget_bytes:
        raise ValueError(f"mixed_precision_search: even all layers at the low precision cost "
                         f"{sum(low_costs.values())} bytes, above the budget of {budget_bytes}")
    sensitivity = {}
    for name in names:
        single = config.replace(overrides={**config.overrides, name: {**config.overrides.get(name, {}), **low}})
        output, _ = _outputs(_calibrated(model, single, example, batch_list), [], batch_list)
        sensitivity[name] = high_sqnr - sqnr_db(reference, output)
    chosen: list[str] = []
    total = sum(high_costs.values())
    candidates = [name for name in names if high_costs[name] > low_costs[name]]
    while total > budget_bytes and candidates:
        closing = [n for n in candidates if total - (high_costs[n] - low_costs[n]) <= budget_bytes]
        if closing:  # one more move is enough: take the least sensitive move that suffices
            best = min(closing, key=lambda n: sensitivity[n])
        else:
            best = min(candidates, key=lambda n: max(sensitivity[n], 0.0) / (high_costs[n] - low_costs[n]))
        candidates.remove(best)
        chosen.append(best)
        total -= high_costs[best] - low_costs[best]
    final = config.replace(overrides={**config.overrides,
                                      **{name: {**config.overrides.get(name, {}), **low} for name in chosen}})
    output, _ = _outputs(_calibrated(model, final, example, batch_list), [], batch_list)
    return MixedPrecisionResult(copy.deepcopy(final), chosen, total, sqnr_db(reference, output), sensitivity)
