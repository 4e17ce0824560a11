"""QuantConfig: override precedence, float-kept layers, and refusal of specs the kernels cannot run."""

import numpy as np
import pytest

from nanoopt import nn
from nanoopt.quant.config import INT16_ACTIVATION, QuantConfig, bias_dtype, weight_spec
from nanoopt.quant.observers import HistogramObserver, MinMaxObserver, PerChannelMSEObserver
from nanoopt.spec import QuantSpec


def test_defaults_follow_the_integer_scheme():
    layer = QuantConfig().for_layer("fc", nn.Linear(2, 2))
    assert layer.activation == QuantSpec(bits=8, signed=True, symmetric=False)
    assert layer.weight == QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, narrow_range=True)
    assert isinstance(layer.make_activation_observer(), HistogramObserver)
    assert isinstance(layer.make_weight_observer(), MinMaxObserver)
    assert bias_dtype(layer.activation) == np.int32 and bias_dtype(INT16_ACTIVATION) == np.int64


def test_name_override_wins_over_type_override():
    config = QuantConfig(overrides={nn.Linear: {"weight": weight_spec(4)}, "head": {"weight": weight_spec(2)},
                                    nn.Conv2d: {"activation_observer": MinMaxObserver}})
    assert config.for_layer("body", nn.Linear(2, 2)).weight.bits == 4
    assert config.for_layer("head", nn.Linear(2, 2)).weight.bits == 2
    assert config.for_layer("conv", nn.Conv2d(1, 1, 1)).weight.bits == 8
    assert config.for_layer("conv", nn.Conv2d(1, 1, 1)).activation_observer is MinMaxObserver


def test_keep_float_by_name_and_type():
    config = QuantConfig(keep_float=["head", nn.Sigmoid])
    assert config.keeps_float("head", nn.Linear(1, 1)) and config.keeps_float("x", nn.Sigmoid())
    assert not config.keeps_float("body", nn.Linear(1, 1))


def test_presets():
    assert QuantConfig.int16_activations().activation == INT16_ACTIVATION
    w4 = QuantConfig.weights4()
    assert w4.weight.qmin == -7 and w4.weight_observer is PerChannelMSEObserver
    assert QuantConfig.weights4(per_channel=False).weight.per_channel is False


@pytest.mark.parametrize("changes, message", [
    ({"activation": QuantSpec(signed=False)}, "signed activations"),
    ({"activation": QuantSpec(per_channel=True)}, "per tensor"),
    ({"activation": QuantSpec(bits=12)}, "must be symmetric"),
    ({"weight": QuantSpec(symmetric=False)}, "signed and symmetric"),
    ({"weight": QuantSpec(symmetric=True, per_channel=True, axis=1)}, "axis 0"),
    ({"weight": QuantSpec(bits=16, symmetric=True)}, "16-bit activations"),
    ({"overrides": {"fc": {"bits": 4}}}, "unknown fields"),
    ({"overrides": {3: {}}}, "names or types"),
    ({"keep_float": [3]}, "names or types"),
])
def test_configs_the_kernels_cannot_run_are_refused(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        QuantConfig(**changes)


def test_bad_override_is_refused_when_resolved():
    config = QuantConfig(overrides={"fc": {"weight": QuantSpec(symmetric=False)}})
    with pytest.raises(ValueError, match="layer 'fc'"):
        config.for_layer("fc", nn.Linear(1, 1))
    assert QuantConfig(activation=INT16_ACTIVATION, weight=weight_spec(16, False)).weight.bits == 16
