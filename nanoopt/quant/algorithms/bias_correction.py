"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2, empirical variant; Finkelstein et al. 2019).

Quantizing the weights (and the inputs) of a layer shifts the mean of its outputs: with ``e = W~ x~ - W x`` the
expected output error ``E[e]`` is generally not zero, and a biased error accumulates through the network. The
correction subtracts it from the bias (eq. 14-15, with the expectation measured on data):

    ``b <- b - E[W~ x~ - W x]``   (per output channel; the mean runs over examples and spatial positions)

where ``x`` is the layer's input in the float model and ``x~`` its input in the quantized model, ``W~`` the
dequantized integer weight. Layers are corrected in execution order, each measured with the layers before it
already corrected. The activation ranges stay as calibrated.

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(64, 1, 8, 8)).astype(np.float32)
>>> prepared = quant.calibrate(quant.prepare(models.tiny_mlp(), quant.QuantConfig.weights4(), x[:1]), [x],
...                            progress=False)
>>> shift = bias_correction(prepared, [x])
>>> sorted(shift), shift["1"].shape
(['1', '3'], (32,))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanoopt.nn import Parameter
from nanoopt.quant.algorithms.layer_data import capture_inputs, check_calibrated, float_mode, weighted_layers
from nanoopt.quant.ptq import PreparedModel, iterate_batches
from nanoopt.quant.simulate import SimulatedConv2d
from nanoopt.tensor import Tensor, no_grad

__all__ = ["bias_correction"]


def _mean_output(layer, inputs: list[np.ndarray], weight: np.ndarray) -> np.ndarray:
    """Mean over everything but the channel axis of ``layer``'s product (no bias) with ``weight``."""
    axes = (0, 2, 3) if isinstance(layer, SimulatedConv2d) else None
    total, count = 0.0, 0
    with no_grad():
        for x in inputs:
            y = layer.float_op(Tensor(x), Tensor(weight), None).data.astype(np.float64)
            if axes is None:
                y = y.reshape(-1, y.shape[-1])
                total, count = total + y.sum(axis=0), count + y.shape[0]
            else:
                total, count = total + y.sum(axis=axes), count + y.size // y.shape[1]
    return total / count


def bias_correction(prepared: PreparedModel, batches: Any, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """Correct the biases of a calibrated prepared model in place; returns the shift applied to each layer.

    Layers without a bias get one.
    """
    check_calibrated(prepared, "bias_correction")
    batch_list = list(iterate_batches(batches))[:max_batches]
    if not batch_list:
        raise ValueError("bias_correction: no batches were given")
    layers = weighted_layers(prepared)
    with float_mode(prepared):
        float_inputs = capture_inputs(prepared, [layer for _, layer in layers], batch_list)
    shifts = {}
    for (name, layer), inputs in zip(layers, float_inputs, strict=True):
        expected = _mean_output(layer, inputs, layer.weight.data)
        quantized_inputs = capture_inputs(prepared, [layer], batch_list)[0]  # earlier layers already corrected
        weight_params = layer.weight_quantizer.qparams()
        dequantized = weight_params.dequantize(weight_params.quantize(layer.weight.data))
        got = _mean_output(layer, quantized_inputs, dequantized)
        shift = (expected - got).astype(np.float32)
        if layer.bias is None:
            layer.bias = Parameter(np.zeros(layer.weight.shape[0], np.float32))
        layer.bias.data = (layer.bias.data + shift).astype(layer.bias.dtype)
        shifts[name] = shift
    return shifts
