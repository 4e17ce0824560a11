"""Quantization: the integer specification, observers, configuration, post-training quantization and analysis.

* the scheme (:mod:`~nanoopt.spec`): ``QuantSpec``, ``qparams``, ``quantize``, ``dequantize``,
  ``quantize_multiplier``, ``requantize``;
* statistics (:mod:`~nanoopt.quant.observers`): ``MinMaxObserver`` and friends, ``HistogramObserver`` (L2 range
  search), ``PercentileObserver``, ``EntropyObserver`` (KL);
* the flow (:mod:`~nanoopt.quant.ptq`): ``prepare`` -> ``calibrate`` -> ``convert``, or ``quantize_static``;
  configured by ``QuantConfig``; the prepared model in eval mode equals the converted integer model
  (:mod:`~nanoopt.quant.qmodules`) bit for bit; ``quantize_dynamic`` and ``quantize_weights`` need no
  calibration;
* algorithms (:mod:`~nanoopt.quant.algorithms`): ``fold_batchnorm``, ``cross_layer_equalization``,
  ``bias_correction``, ``adaround``; weight-only for the Linear layers of any model from calibration data:
  ``rtn``, ``gptq``, ``awq``; analysis (:mod:`~nanoopt.quant.analysis`): ``sqnr_per_layer``,
  ``layer_sensitivity``, ``saturation_counts``, ``mixed_precision_search``.

The integer kernels import :mod:`nanoopt.spec`, and the layers import the kernels; so the names that need
layers are loaded on first use (PEP 562), which keeps ``import nanoopt.spec`` free of a circular import.

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(32, 1, 8, 8)).astype(np.float32)
>>> qmodel = quant.quantize_static(models.tiny_mlp(), x, progress=False)
>>> qmodel.state_dict()["model.1.weight"].dtype, qmodel(x).shape
(dtype('int8'), (32, 10))
"""

import importlib
from typing import Any

from nanoopt.spec import QuantSpec, dequantize, qparams, quantize, quantize_multiplier, requantize

_LAZY = {
    "EntropyObserver": "nanoopt.quant.observers",
    "HistogramObserver": "nanoopt.quant.observers",
    "MinMaxObserver": "nanoopt.quant.observers",
    "MovingAverageMinMaxObserver": "nanoopt.quant.observers",
    "MovingAveragePerChannelMinMaxObserver": "nanoopt.quant.observers",
    "NotFittedError": "nanoopt.quant.observers",
    "Observer": "nanoopt.quant.observers",
    "PercentileObserver": "nanoopt.quant.observers",
    "PerChannelMinMaxObserver": "nanoopt.quant.observers",
    "PerChannelMSEObserver": "nanoopt.quant.observers",
    "INT8_ACTIVATION": "nanoopt.quant.config",
    "INT8_WEIGHT": "nanoopt.quant.config",
    "INT16_ACTIVATION": "nanoopt.quant.config",
    "LayerQuantConfig": "nanoopt.quant.config",
    "QuantConfig": "nanoopt.quant.config",
    "weight_spec": "nanoopt.quant.config",
    "fold_batchnorm": "nanoopt.quant.algorithms",
    "trace": "nanoopt.nn.graph",
    "QParams": "nanoopt.quant.lowering",
    "IntegerLayer": "nanoopt.quant.lowering",
    "integer_layer": "nanoopt.quant.lowering",
    "FakeQuantize": "nanoopt.quant.fake_quant",
    "NotCalibratedError": "nanoopt.quant.fake_quant",
    "PreparedModel": "nanoopt.quant.ptq",
    "prepare": "nanoopt.quant.ptq",
    "calibrate": "nanoopt.quant.ptq",
    "convert": "nanoopt.quant.ptq",
    "quantize_static": "nanoopt.quant.ptq",
    "quantizers": "nanoopt.quant.ptq",
    "set_observers": "nanoopt.quant.ptq",
    "set_fake_quant": "nanoopt.quant.ptq",
    "QuantizedModel": "nanoopt.quant.qmodules",
    "QuantizedLinear": "nanoopt.quant.qmodules",
    "QuantizedConv2d": "nanoopt.quant.qmodules",
    "tune_backends": "nanoopt.quant.qmodules",
    "quantize_dynamic": "nanoopt.quant.dynamic",
    "quantize_weights": "nanoopt.quant.dynamic",
    "cross_layer_equalization": "nanoopt.quant.algorithms",
    "bias_correction": "nanoopt.quant.algorithms",
    "adaround": "nanoopt.quant.algorithms",
    "smooth_quant": "nanoopt.quant.algorithms",
    "W8A8Config": "nanoopt.quant.transformer",
    "W8A8GPT": "nanoopt.quant.transformer",
    "prepare_w8a8": "nanoopt.quant.transformer",
    "convert_w8a8": "nanoopt.quant.transformer",
    "quantize_w8a8": "nanoopt.quant.transformer",
    "sqnr_per_layer": "nanoopt.quant.analysis",
    "layer_sensitivity": "nanoopt.quant.analysis",
    "saturation_counts": "nanoopt.quant.analysis",
    "mixed_precision_search": "nanoopt.quant.analysis",
    "fake_quantize": "nanoopt.quant.fake_quant",
    "prepare_qat": "nanoopt.quant.qat",
    "lsq_quantize": "nanoopt.quant.fake_quant",
    "pact_quantize": "nanoopt.quant.fake_quant",
    "qat_config": "nanoopt.quant.qat",
    "QATSchedule": "nanoopt.quant.qat",
    "freeze_batchnorm": "nanoopt.quant.qat",
    "LSQQuantizer": "nanoopt.quant.fake_quant",
    "PACTQuantizer": "nanoopt.quant.fake_quant",
    "WeightFakeQuantize": "nanoopt.quant.fake_quant",
    "pack_int4": "nanoopt.quant.packing",
    "unpack_int4": "nanoopt.quant.packing",
    "rtn": "nanoopt.quant.algorithms.rtn",
    "gptq": "nanoopt.quant.algorithms.gptq",
    "awq": "nanoopt.quant.algorithms.awq",
}

# internals stay reachable as attributes (and in their modules) but are not the user's vocabulary
_NOT_EXPORTED = ("IntegerLayer", "QParams", "integer_layer", "quantizers", "trace", "pack_int4", "unpack_int4",
                 "QuantizedLinear", "QuantizedConv2d", "WeightFakeQuantize")
__all__ = ["QuantSpec", "dequantize", "qparams", "quantize", "quantize_multiplier", "requantize",
           *(name for name in _LAZY if name not in _NOT_EXPORTED)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoopt.quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
