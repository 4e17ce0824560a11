"""What the layer-wise PTQ algorithms need from a calibrated prepared model: the inputs each weighted layer sees
in the float model and in the quantized model.

* :func:`weighted_layers` -- the simulated Linear/Conv2d layers in execution order;
* :func:`float_mode` -- a context in which every quantizer passes values through (the prepared model then
  computes the BatchNorm-folded float model);
* :func:`capture_inputs` -- run batches and keep the inputs of chosen layers (in whichever mode the model is).

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(8, 1, 8, 8)).astype(np.float32)
>>> prepared = quant.calibrate(quant.prepare(models.tiny_mlp(), example_input=x), [x], progress=False)
>>> [name for name, _ in weighted_layers(prepared)]
['1', '3']
>>> inputs = capture_inputs(prepared, [layer for _, layer in weighted_layers(prepared)], [x])
>>> [batches[0].shape for batches in inputs]
[(8, 64), (8, 32)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

from nanoopt import nn
from nanoopt.nn.graph import capture
from nanoopt.quant.fake_quant import NotCalibratedError
from nanoopt.quant.ptq import PreparedModel, quantizers
from nanoopt.quant.simulate import SimulatedConv2d, SimulatedLinear
from nanoopt.tensor import Tensor

__all__ = ["capture_inputs", "check_calibrated", "float_mode", "weighted_layers"]


def check_calibrated(prepared: PreparedModel, algorithm: str) -> None:
    """Refuse a model that is not a calibrated, frozen prepared model."""
    if not isinstance(prepared, PreparedModel):
        raise TypeError(f"{algorithm} works on a calibrated model from quant.prepare + quant.calibrate, got "
                        f"{type(prepared).__name__}")
    for quantizer in quantizers(prepared):
        if not (quantizer.is_calibrated and quantizer.frozen):
            raise NotCalibratedError(f"{algorithm}: the quantizer of {quantizer.owner} is not calibrated and "
                                     "frozen; run quant.calibrate first")


def weighted_layers(prepared: PreparedModel) -> list[tuple[str, SimulatedLinear | SimulatedConv2d]]:
    """``(name, layer)`` of every simulated Linear/Conv2d, in the order the model runs them."""
    modules = dict(prepared.model.named_modules())
    return [(name, modules[name]) for name in prepared.graph.nodes
            if isinstance(modules.get(name), SimulatedLinear | SimulatedConv2d)]


@contextlib.contextmanager
def float_mode(prepared: PreparedModel) -> Iterator[None]:
    """Within the block, no quantizer rounds (the switches are restored afterwards)."""
    saved = [(quantizer, quantizer.fake_quant_enabled) for quantizer in quantizers(prepared)]
    try:
        for quantizer, _ in saved:
            quantizer.fake_quant_enabled = False
        yield
    finally:
        for quantizer, enabled in saved:
            quantizer.fake_quant_enabled = enabled


def capture_inputs(prepared: PreparedModel, layers: Sequence[nn.Module],
                   batches: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """For each of ``layers``, the list (one per batch) of the inputs it received, running in eval mode."""
    prepared.eval()  # and it stays in eval mode
    with capture(prepared, {str(index): layer for index, layer in enumerate(layers)}, inputs=True) as seen:
        for batch in batches:
            prepared(Tensor(batch))
    return [[np.asarray(x, dtype=np.float32) for x in seen.inputs[str(index)]] for index in range(len(layers))]
