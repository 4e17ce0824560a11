"""Bad input to the quantization flows: each is refused with the argument, what was expected and what came.

NaN/Inf in calibration data, example inputs or weights (at prepare, prepare_qat, calibrate, convert,
quantize_dynamic, quantize_weights); empty calibration; inputs of the wrong shape or dtype to an integer model;
QuantConfig fields out of range. (Pruning amounts out of range: tests/prune/test_prune_bad_amounts.py.)
"""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn, quant

SETTINGS = settings(max_examples=20, deadline=None)
BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf])


def label(value):
    return "NaN" if np.isnan(value) else "Inf"


def lenet():
    no.manual_seed(0)
    return models.lenet5(input_size=8)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((24, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def integer_model(images):
    return quant.quantize_static(lenet(), images, progress=False)


def corrupt(array, draw, value):
    """A copy of ``array`` with ``value`` at a drawn index; returns (copy, index)."""
    index = tuple(draw(st.integers(0, size - 1)) for size in array.shape)
    bad = array.copy()
    bad[index] = value
    return bad, index


# ----------------------------------------------------------------- calibration data
@SETTINGS
@given(st.data(), BAD_VALUES, st.integers(0, 2))
def test_non_finite_calibration_data_names_the_batch_the_count_and_the_first_index(images, data, value, which):
    batches = [images[:8], images[8:16], images[16:]]
    batches[which], index = corrupt(batches[which], data.draw, value)
    expected = (rf"calibration batch {which} \(shape \(8, 1, 8, 8\), float32\) contains 1 {label(value)} "
                rf"\(first at index {re.escape(str(index))}\); expected finite numbers")
    with pytest.raises(ValueError, match=expected):
        quant.quantize_static(lenet(), batches, progress=False)
    prepared = quant.prepare(lenet(), example_input=images[:1])
    with pytest.raises(ValueError, match=expected):
        quant.calibrate(prepared, batches, progress=False)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_, np.complex64])
def test_calibration_batches_must_be_floating_point(images, dtype):
    prepared = quant.prepare(lenet(), example_input=images[:1])
    with pytest.raises(TypeError, match=rf"calibration batch 0 must be a floating-point array .* got dtype "
                                        rf"{np.dtype(dtype)} with shape \(24, 1, 8, 8\)"):
        quant.calibrate(prepared, [images.astype(dtype)], progress=False)


@pytest.mark.parametrize("empty", [[], (), np.zeros((0, 1, 8, 8), np.float32), iter([])])
def test_empty_calibration_is_refused(images, empty):
    with pytest.raises(ValueError, match="no calibration batches were given.*expected at least one batch"):
        quant.quantize_static(lenet(), empty, progress=False)
    prepared = quant.prepare(lenet(), example_input=images[:1])
    with pytest.raises(ValueError, match="calibrate: no calibration batches were given.*expected at least one"):
        quant.calibrate(prepared, empty, progress=False)


def test_an_empty_batch_among_calibration_batches_is_named(images):
    prepared = quant.prepare(lenet(), example_input=images[:1])
    with pytest.raises(ValueError, match=r"calibration batch 1 is empty \(shape \(0, 1, 8, 8\)\); expected at "
                                         r"least one example"):
        quant.calibrate(prepared, [images[:4], images[:0], images[4:]], progress=False)


# ----------------------------------------------------------------- weights and example inputs
@SETTINGS
@given(st.data(), BAD_VALUES, st.sampled_from(["0.weight", "0.bias", "3.weight", "7.weight", "11.bias"]))
def test_non_finite_weights_are_refused_at_prepare_naming_the_parameter_and_layer(images, data, value, key):
    model = lenet()
    parameter = dict(model.named_parameters())[key]
    _, index = corrupt(parameter.data, data.draw, value)
    parameter.data[index] = value
    layer = key.split(".")[0]
    kind = type(model[int(layer)]).__name__
    message = (rf"parameter '{re.escape(key)}' of layer '{layer}' \({kind}\) \(shape "
               rf"{re.escape(str(parameter.shape))}, float32\) contains 1 {label(value)} \(first at index "
               rf"{re.escape(str(index))}\); expected finite numbers")
    for run, where in ((lambda: quant.prepare(model, example_input=images[:1]), "quant.prepare"),
                       (lambda: quant.quantize_static(model, images, progress=False), "quant.prepare"),
                       (lambda: quant.prepare_qat(model, example_input=images[:1]), "quant.prepare_qat"),
                       (lambda: quant.quantize_weights(model, bits=4), "quant.quantize_weights")):
        with pytest.raises(ValueError, match=f"{where}: {message}"):
            run()


def test_non_finite_weights_are_refused_by_quantize_dynamic():
    model = models.mlp(16, (8,))
    model[3].bias.data[2] = np.inf
    with pytest.raises(ValueError, match=r"quant.quantize_dynamic: parameter '3.bias' of layer '3' \(Linear\) "
                                         r"\(shape \(10,\), float32\) contains 1 Inf \(first at index \(2,\)\)"):
        quant.quantize_dynamic(model)


def test_weights_made_non_finite_after_calibration_are_refused_at_convert(images):
    prepared = quant.calibrate(quant.prepare(lenet(), example_input=images[:1]), images, progress=False)
    prepared.model.get_submodule("3").weight.data[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"quant.convert: parameter 'model.3.weight' of layer 'model.3' "
                                         r"\(SimulatedConv2d\) .* contains 1 NaN \(first at index \(1, 2, 0, 0\)\)"):
        quant.convert(prepared)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_example_input_is_refused(images, value):
    bad = images[:2].copy()
    bad[1, 0, 3, 4] = value
    for run, where in ((quant.prepare, "quant.prepare"), (quant.prepare_qat, "quant.prepare_qat")):
        with pytest.raises(ValueError, match=rf"{where}: example_input \(shape \(2, 1, 8, 8\), float32\) contains "
                                             rf"1 {label(value)} \(first at index \(1, 0, 3, 4\)\)"):
            run(lenet(), example_input=bad)


# ----------------------------------------------------------------- the integer model's input
@pytest.mark.parametrize("shape", [(2, 1, 9, 9), (2, 3, 8, 8), (2, 64), (2, 1, 8), (1, 1)])
def test_integer_model_refuses_inputs_of_the_wrong_shape(integer_model, shape):
    with pytest.raises(ValueError, match=rf"QuantizedModel: expected inputs of shape \(N, 1, 8, 8\), got "
                                         rf"{re.escape(str(shape))}"):
        integer_model(np.zeros(shape, np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int64, np.bool_, np.complex64])
def test_integer_model_refuses_inputs_that_are_not_floating_point(integer_model, dtype):
    with pytest.raises(TypeError, match=rf"QuantizedModel: the input x must be a floating-point array \(float16, "
                                        rf"float32 or float64\), got dtype {np.dtype(dtype)} with shape "
                                        rf"\(3, 1, 8, 8\)"):
        integer_model(np.zeros((3, 1, 8, 8), dtype))


@SETTINGS
@given(st.data(), BAD_VALUES)
def test_integer_model_refuses_non_finite_inputs_instead_of_saturating_them(integer_model, images, data, value):
    bad, index = corrupt(images[:5], data.draw, value)
    with pytest.raises(ValueError, match=rf"QuantizedModel: the input x \(shape \(5, 1, 8, 8\), float32\) contains "
                                         rf"1 {label(value)} \(first at index {re.escape(str(index))}\)"):
        integer_model(bad)


def test_integer_model_takes_float64_and_tensors_as_the_same_numbers(integer_model, images):
    expected = integer_model(images).data
    np.testing.assert_array_equal(integer_model(images.astype(np.float64)).data, expected)
    np.testing.assert_array_equal(integer_model(no.Tensor(images)).data, expected)


# ----------------------------------------------------------------- QuantConfig out of range
@pytest.mark.parametrize("bits", [-1, 0, 1, 17, 32])
def test_quant_spec_bits_out_of_range_name_the_field_the_range_and_the_value(bits):
    with pytest.raises(ValueError, match=rf"QuantSpec.bits must be in \[2, 16\], got {bits}"):
        quant.QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [8.0, True, "8", None])
def test_quant_spec_bits_of_the_wrong_type(bits):
    with pytest.raises(TypeError, match=rf"QuantSpec.bits must be an int, got {type(bits).__name__}"):
        quant.QuantSpec(bits=bits)


@pytest.mark.parametrize("fields, message", [
    ({"activation": quant.QuantSpec(bits=8, per_channel=True)}, "QuantConfig: activations are quantized per tensor"),
    ({"activation": quant.QuantSpec(bits=12)}, "QuantConfig: activations wider than 8 bits must be symmetric"),
    ({"activation": quant.QuantSpec(bits=8, signed=False)}, "QuantConfig: the integer kernels use signed"),
    ({"weight": quant.QuantSpec(bits=8, symmetric=False)}, "QuantConfig: weights must be signed and symmetric"),
    ({"weight": quant.weight_spec(12)}, "QuantConfig: weights wider than 8 bits need 16-bit activations"),
    ({"weight": quant.QuantSpec(bits=8, symmetric=True, per_channel=True, axis=1)},
     "QuantConfig: per-channel weights are quantized along axis 0"),
    ({"overrides": {"fc": {"wieght": quant.weight_spec(4)}}}, r"QuantConfig.overrides\['fc'\] has unknown fields"),
])
def test_quant_config_out_of_range_names_the_field_and_what_came(fields, message):
    with pytest.raises(ValueError, match=message):
        quant.QuantConfig(**fields)


@pytest.mark.parametrize("field", ["activation_observer", "weight_observer"])
def test_quant_config_observers_must_be_callables(field):
    with pytest.raises(TypeError, match=rf"QuantConfig.{field} must be a callable QuantSpec -> Observer .* got 3"):
        quant.QuantConfig(**{field: 3})


def test_an_override_out_of_range_is_refused_at_prepare_naming_the_layer(images):
    config = quant.QuantConfig(overrides={"7": {"weight": quant.QuantSpec(bits=8, symmetric=False)}})
    with pytest.raises(ValueError, match="QuantConfig for layer '7': weights must be signed and symmetric"):
        quant.prepare(lenet(), config, example_input=images[:1])
    with pytest.raises(TypeError, match="weight must be a QuantSpec, got int"):
        quant.prepare(lenet(), quant.QuantConfig(overrides={nn.Linear: {"weight": 8}}), example_input=images[:1])


@pytest.mark.parametrize("call, message", [
    (lambda m: quant.quantize_dynamic(m, bits=1), r"quantize_dynamic: bits must be an int in \[2, 8\], got 1"),
    (lambda m: quant.quantize_dynamic(m, bits=9), r"quantize_dynamic: bits must be an int in \[2, 8\], got 9"),
    (lambda m: quant.quantize_weights(m, bits=0), r"quantize_weights: bits must be an int in \[2, 8\], got 0"),
    (lambda m: quant.quantize_weights(m, bits=4, group_size=0),
     "quantize_weights: group_size must be a positive int or None, got 0"),
])
def test_weight_only_and_dynamic_bits_out_of_range(call, message):
    with pytest.raises(ValueError, match=message):
        call(models.mlp(16, (8,)))
