"""Quantization: the integer specification, observers, configuration, post-training quantization and analysis.

* the scheme (:mod:`~nanoopt.spec`): ``QuantSpec``, ``qparams``, ``quantize``, ``dequantize``,
  ``quantize_multiplier``, ``requantize``;
* statistics (:mod:`~nanoopt.quant.observers`): ``MinMaxObserver`` and friends, ``HistogramObserver`` (L2 range
  search), ``PercentileObserver``, ``EntropyObserver`` (KL);
* the flow (:mod:`~nanoopt.quant.ptq`): ``prepare`` -> ``calibrate`` -> ``convert``, or ``quantize_static``;
  configured by ``QuantConfig``; the prepared model in eval mode equals the converted integer model
  (:mod:`~nanoopt.quant.qmodules`) bit for bit; ``quantize_dynamic`` and ``quantize_weights`` need no
  calibration;
* float rewrites that the flows call: ``fold_batchnorm`` (:mod:`~nanoopt.quant.bn_fold`, in ``prepare``) and
  ``smooth_quant`` (:mod:`~nanoopt.quant.smoothquant`, in ``quantize_w8a8``);
* algorithms (:mod:`~nanoopt.quant.algorithms`): ``cross_layer_equalization``, ``bias_correction``,
  ``adaround``; weight-only for the Linear layers of any model from calibration data: ``rtn``, ``gptq``, ``awq``;
  analysis (:mod:`~nanoopt.quant.analysis`): ``sqnr_per_layer``,
  ``layer_sensitivity``, ``saturation_counts``, ``mixed_precision_search``.

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(32, 1, 8, 8)).astype(np.float32)
>>> qmodel = quant.quantize_static(models.tiny_mlp(), x, progress=False)
>>> qmodel.state_dict()["model.1.weight"].dtype, qmodel(x).shape
(dtype('int8'), (32, 10))
"""

from nanoopt.nn.graph import trace  # noqa: F401
from nanoopt.quant.algorithms import adaround, awq, bias_correction, cross_layer_equalization, gptq, rtn
from nanoopt.quant.analysis import layer_sensitivity, mixed_precision_search, saturation_counts, sqnr_per_layer
from nanoopt.quant.bn_fold import fold_batchnorm
from nanoopt.quant.config import (
    INT7_ACTIVATION,
    INT8_ACTIVATION,
    INT8_WEIGHT,
    INT16_ACTIVATION,
    LayerQuantConfig,
    QuantConfig,
    weight_spec,
)
from nanoopt.quant.dynamic import quantize_dynamic, quantize_weights
from nanoopt.quant.fake_quant import (
    FakeQuantize,
    LSQQuantizer,
    NotCalibratedError,
    PACTQuantizer,
    WeightFakeQuantize,  # noqa: F401
    fake_quantize,
    lsq_quantize,
    pact_quantize,
)
from nanoopt.quant.lowering import IntegerLayer, QParams, integer_layer  # noqa: F401
from nanoopt.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    Observer,
    PercentileObserver,
    PerChannelMinMaxObserver,
    PerChannelMSEObserver,
)
from nanoopt.quant.observers import NotFittedError as NotFittedError  # an explicit re-export
from nanoopt.quant.packing import pack_int4, unpack_int4  # noqa: F401
from nanoopt.quant.ptq import (
    PreparedModel,
    calibrate,
    convert,
    prepare,
    quantize_static,
    quantizers,  # noqa: F401
    set_fake_quant,
    set_observers,
)
from nanoopt.quant.qat import QATSchedule, freeze_batchnorm, prepare_qat, qat_config
from nanoopt.quant.qmodules import QuantizedConv2d, QuantizedLinear, QuantizedModel, tune_backends  # noqa: F401
from nanoopt.quant.smoothquant import smooth_quant
from nanoopt.quant.transformer import W8A8GPT, W8A8Config, convert_w8a8, prepare_w8a8, quantize_w8a8
from nanoopt.spec import QuantSpec, dequantize, qparams, quantize, quantize_multiplier, requantize

# the user's vocabulary (DESIGN.md's public API). Internals stay reachable as attributes (and in their modules)
# but are not exported: IntegerLayer, QParams, integer_layer, quantizers, trace, pack_int4, unpack_int4,
# QuantizedLinear, QuantizedConv2d, WeightFakeQuantize.
__all__ = [
    "QuantSpec", "dequantize", "qparams", "quantize", "quantize_multiplier", "requantize",
    "EntropyObserver", "HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "NotFittedError", "Observer", "PercentileObserver",
    "PerChannelMinMaxObserver", "PerChannelMSEObserver",
    "INT7_ACTIVATION", "INT8_ACTIVATION", "INT8_WEIGHT", "INT16_ACTIVATION", "LayerQuantConfig", "QuantConfig",
    "weight_spec",
    "fold_batchnorm", "FakeQuantize", "NotCalibratedError",
    "PreparedModel", "prepare", "calibrate", "convert", "quantize_static", "set_observers", "set_fake_quant",
    "QuantizedModel", "tune_backends", "quantize_dynamic", "quantize_weights",
    "cross_layer_equalization", "bias_correction", "adaround", "smooth_quant",
    "W8A8Config", "W8A8GPT", "prepare_w8a8", "convert_w8a8", "quantize_w8a8",
    "sqnr_per_layer", "layer_sensitivity", "saturation_counts", "mixed_precision_search",
    "fake_quantize", "prepare_qat", "lsq_quantize", "pact_quantize", "qat_config", "QATSchedule",
    "freeze_batchnorm", "LSQQuantizer", "PACTQuantizer", "rtn", "gptq", "awq",
]
