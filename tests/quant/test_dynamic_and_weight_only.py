"""Dynamic quantization (exact integer products, bounded error) and weight-only storage (packing, group scales)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn
from nanoopt.quant.dynamic import (
    DynamicQuantizedLinear,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    quantize_dynamic,
    quantize_weights,
)
from nanoopt.quant.packing import pack_int4, unpack_int4
from nanoopt.report import stored_bytes
from nanoopt.spec import qparams, quantize
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(st.lists(st.integers(-8, 7), min_size=0, max_size=41))
def test_int4_packing_round_trips(values):
    array = np.array(values, np.int8)
    packed = pack_int4(array)
    assert packed.dtype == np.uint8 and packed.size == (array.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, array.size), array)


def test_packing_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8], np.int8))
    with pytest.raises(TypeError, match="int8"):
        pack_int4(np.array([1], np.int16))
    with pytest.raises(ValueError, match="count"):
        unpack_int4(np.zeros(2, np.uint8), 5)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 7), st.integers(1, 40), st.integers(1, 6), st.booleans())
def test_dynamic_linear_error_is_bounded_by_the_two_roundings(seed, batch, in_features, out_features, bias):
    rng = np.random.default_rng(seed)
    no.manual_seed(seed % 997)
    layer = nn.Linear(in_features, out_features, bias=bias)
    x = (rng.normal(size=(batch, in_features)) * rng.choice([0.01, 1.0, 20.0])).astype(np.float32)
    dynamic = DynamicQuantizedLinear(layer)
    got = dynamic(Tensor(x)).data
    # the integer product is exact: compare with int64 arithmetic from the same codes
    scale, zero_point = qparams(x.min(), x.max(), dynamic.activation_spec)
    codes = quantize(x, scale, zero_point, dynamic.activation_spec).astype(np.int64)
    acc = (codes - int(zero_point)) @ dynamic.weight.astype(np.int64).T
    expected = acc * (np.float64(scale) * dynamic.weight_scale.astype(np.float64))
    expected += 0 if layer.bias is None else layer.bias.data
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(initial=1e-30))
    # and the error against float is within the rounding of x (s_x / 2) and of w (s_w / 2)
    weight = layer.weight.data.astype(np.float64)
    exact = x.astype(np.float64) @ weight.T + (0 if layer.bias is None else layer.bias.data)
    bound = (np.float64(scale) / 2 * np.abs(weight).sum(axis=1)
             + np.abs(x).astype(np.float64) @ (dynamic.weight_scale[:, None] / 2 * np.ones_like(weight)).T
             + in_features * np.float64(scale) * dynamic.weight_scale / 4)
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-4) + 1e-5 * np.abs(exact).max(initial=0))


def test_quantize_dynamic_replaces_linear_layers_only():
    no.manual_seed(0)
    model = models.lenet5(input_size=8)
    dynamic = quantize_dynamic(model)
    assert isinstance(dynamic[0], nn.Conv2d) and isinstance(dynamic[7], DynamicQuantizedLinear)
    assert isinstance(model[7], nn.Linear)  # the original is untouched
    x = np.random.default_rng(0).uniform(size=(8, 1, 8, 8)).astype(np.float32)
    reference = model(Tensor(x)).data
    assert np.linalg.norm(dynamic(Tensor(x)).data - reference) < 0.05 * np.linalg.norm(reference)
    with pytest.raises(ValueError, match="NaN or Inf"):
        dynamic[7](np.full((1, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="bits"):
        quantize_dynamic(model, bits=16)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 3, 4, 6, 8]), st.sampled_from([None, 1, 5, 16]))
def test_weight_only_rounding_error_is_half_a_step_per_group(seed, bits, group_size):
    no.manual_seed(seed % 997)
    layer = nn.Linear(23, 4)
    layer.weight.data[...] = np.random.default_rng(seed).standard_t(3, size=(4, 23))
    stored = WeightOnlyLinear(layer, bits, group_size)
    restored = stored.dequantized_weight()
    size = 23 if group_size is None else group_size
    scales = np.repeat(stored.weight_scale, size, axis=1)[:, :23]
    assert np.all(np.abs(restored - layer.weight.data) <= scales / 2 * (1 + 1e-6))
    codes = stored.codes()
    assert np.abs(codes).max() <= 2 ** (bits - 1) - 1  # narrow range
    x = np.random.default_rng(seed + 1).normal(size=(3, 23)).astype(np.float32)
    np.testing.assert_allclose(stored(x).data, x @ restored.T + layer.bias.data, rtol=1e-5, atol=1e-5)


def test_weight_only_storage_really_shrinks():
    no.manual_seed(0)
    model = models.lenet_300_100()
    float_bytes = stored_bytes(model)
    int8 = quantize_weights(model, bits=8)
    int4 = quantize_weights(model, bits=4, group_size=32)
    assert 3.9 < float_bytes / stored_bytes(int8) <= 4.0
    assert 6.0 < float_bytes / stored_bytes(int4) < 8.0
    assert int4.state_dict()["1.weight_packed"].dtype == np.uint8
    x = np.random.default_rng(0).uniform(size=(4, 1, 28, 28)).astype(np.float32)
    reference = model(Tensor(x)).data
    assert np.linalg.norm(int8(x).data - reference) < 0.02 * np.linalg.norm(reference)


def test_weight_only_conv_matches_its_dequantized_weight():
    no.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    stored = WeightOnlyConv2d(conv, 4, 8)
    x = Tensor(np.random.default_rng(0).normal(size=(2, 2, 5, 5)).astype(np.float32))
    reference = nn.Conv2d(2, 3, 3, padding=1)
    reference.weight.data[...] = stored.dequantized_weight()
    reference.bias.data[...] = conv.bias.data
    np.testing.assert_allclose(stored(x).data, reference(x).data, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights(conv, bits=4, group_size=0)
