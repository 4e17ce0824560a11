"""Analysis: SQNR definition, per-layer SQNR ordering by precision, sensitivity, saturation, mixed precision."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models
from nanoopt.quant.analysis import (
    layer_sensitivity,
    mixed_precision_search,
    saturation_counts,
    sqnr_db,
    sqnr_per_layer,
)
from nanoopt.quant.config import INT8_ACTIVATION, QuantConfig, weight_spec
from nanoopt.quant.observers import MinMaxObserver, PerChannelMSEObserver
from nanoopt.quant.ptq import calibrate, convert, prepare

SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 1e3))
def test_sqnr_definition_and_scale_invariance(seed, factor):
    rng = np.random.default_rng(seed)
    signal, noise = rng.normal(size=50), rng.normal(size=50) * 0.01
    expected = 10 * math.log10(np.sum(signal**2) / np.sum(noise**2))
    assert math.isclose(sqnr_db(signal, signal + noise), expected, rel_tol=1e-9)
    assert math.isclose(sqnr_db(signal * factor, (signal + noise) * factor), expected, rel_tol=1e-9)
    assert sqnr_db(signal, signal) == math.inf


def setup(config, seed=0):
    no.manual_seed(seed)
    model = models.lenet5(input_size=8).eval()
    x = np.random.default_rng(seed).uniform(size=(128, 1, 8, 8)).astype(np.float32)
    return model, calibrate(prepare(model, config, x[:1]), [x[:64], x[64:]], progress=False), x


def test_sixteen_bit_activations_raise_every_layer_sqnr():
    _, int8, x = setup(QuantConfig(activation_observer=MinMaxObserver))
    _, int16, _ = setup(QuantConfig.int16_activations())
    low, high = sqnr_per_layer(int8, x), sqnr_per_layer(int16, x)
    assert sorted(low) == ["0", "11", "3", "7", "9"]
    assert all(high[name] > low[name] for name in low)
    assert all(value > 15 for value in low.values())


def test_two_bit_layer_is_the_most_sensitive():
    config = QuantConfig(overrides={"7": {"weight": weight_spec(2)}})
    _, prepared, x = setup(config)
    labels = np.zeros(len(x), np.int64)
    sensitivity = layer_sensitivity(prepared, x, labels)
    assert min(sensitivity, key=lambda name: sensitivity[name]["sqnr_db"]) == "7"
    assert set(sensitivity) == {"input", "0", "3", "7", "9", "11"}
    assert 0.0 <= sensitivity["7"]["accuracy"] <= 1.0


def test_saturation_counts():
    _, prepared, x = setup(QuantConfig(activation_observer=MinMaxObserver))
    report = saturation_counts(prepared, x)
    assert all(entry["clipped"] == 0.0 for entry in report.values())  # min/max ranges cover the data
    assert report["input"]["saturated"] > 0.0  # the extremes themselves sit on qmin / qmax
    louder = saturation_counts(prepared, x * 4.0)
    assert louder["input"]["clipped"] > 0.5 and louder["0"]["saturated"] > report["0"]["saturated"]
    _, clipped_weights, _ = setup(QuantConfig.weights4())
    assert saturation_counts(clipped_weights, x)["7.weight"]["clipped"] > 0.0  # the MSE range clips tails


def test_mixed_precision_search_meets_the_budget_and_spares_sensitive_layers():
    no.manual_seed(0)
    model = models.mlp(16, (48, 24), 4).eval()
    model[1].weight.data *= np.exp(np.random.default_rng(0).normal(scale=1.5, size=(48, 16))).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(128, 16)).astype(np.float32)
    low = {"weight": weight_spec(4), "weight_observer": PerChannelMSEObserver}
    high_bytes = sum(a.nbytes for a in convert(calibrate(prepare(model, None, x[:1]), [x], progress=False))
                     .model.state_dict().values())
    budget = high_bytes - 600
    result = mixed_precision_search(model, x, budget, low)
    assert result.cost <= budget and result.low_layers
    assert result.output_sqnr_db > 10
    most_sensitive = max(result.sensitivity, key=result.sensitivity.get)
    assert most_sensitive not in result.low_layers  # a cheaper, less sensitive pair of moves meets the budget
    stored = convert(calibrate(prepare(model, result.config, x[:1]), [x], progress=False))
    assert sum(a.nbytes for a in stored.model.state_dict().values()) == result.cost
    with pytest.raises(ValueError, match="above the budget"):
        mixed_precision_search(model, x, 10, low)


def test_mixed_precision_over_activation_bytes():
    no.manual_seed(0)
    model = models.mlp(16, (48, 24), 4).eval()
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    config = QuantConfig.int16_activations()
    low = {"activation": INT8_ACTIVATION, "activation_observer": MinMaxObserver}
    result = mixed_precision_search(model, x, 2 * (48 + 24 + 4) - 40, low, config, cost="activations")
    assert result.cost <= 2 * (48 + 24 + 4) - 40 and len(result.low_layers) >= 1
    with pytest.raises(ValueError, match="cost"):
        mixed_precision_search(model, x, 100, low, config, cost="flops")
