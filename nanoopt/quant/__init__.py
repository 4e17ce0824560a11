"""Quantization: the integer specification, observers, configuration and post-training quantization.

The integer kernels import :mod:`nanoopt.quant.spec`, and the layers import the kernels; so the names below
that need layers (configs, transforms, quantized modules) are loaded on first use (PEP 562), which keeps
``import nanoopt.quant.spec`` free of a circular import.

>>> import numpy as np
>>> from nanoopt import quant
>>> observer = quant.MinMaxObserver().fit(np.array([-1.0, 3.0]))
>>> float(observer.scale_)
0.01568627543747425
"""

import importlib
from typing import Any

from nanoopt.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NotFittedError,
    Observer,
    PercentileObserver,
    PerChannelMinMaxObserver,
    PerChannelMSEObserver,
)
from nanoopt.quant.spec import QuantSpec, dequantize, qparams, quantize, quantize_multiplier, requantize

_LAZY = {
    "INT8_ACTIVATION": "nanoopt.quant.config",
    "INT8_WEIGHT": "nanoopt.quant.config",
    "INT16_ACTIVATION": "nanoopt.quant.config",
    "LayerQuantConfig": "nanoopt.quant.config",
    "QuantConfig": "nanoopt.quant.config",
    "weight_spec": "nanoopt.quant.config",
    "fold_batchnorm": "nanoopt.quant.algorithms",
    "trace": "nanoopt.quant.graph",
    "QParams": "nanoopt.quant.lowering",
    "IntegerLayer": "nanoopt.quant.lowering",
    "integer_layer": "nanoopt.quant.lowering",
    "FakeQuantize": "nanoopt.quant.simulate",
    "NotCalibratedError": "nanoopt.quant.simulate",
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
    "sqnr_per_layer": "nanoopt.quant.analysis",
    "layer_sensitivity": "nanoopt.quant.analysis",
    "saturation_counts": "nanoopt.quant.analysis",
    "mixed_precision_search": "nanoopt.quant.analysis",
    "pack_int4": "nanoopt.quant.packing",
    "unpack_int4": "nanoopt.quant.packing",
}

__all__ = [
    "EntropyObserver", "HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "NotFittedError", "Observer", "PerChannelMSEObserver",
    "PerChannelMinMaxObserver", "PercentileObserver", "QuantSpec", "dequantize", "qparams", "quantize",
    "quantize_multiplier", "requantize", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoopt.quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
