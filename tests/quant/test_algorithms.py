"""PTQ algorithms: CLE keeps the float function and balances ranges; bias correction zeroes the mean error;
AdaRound only chooses between floor and ceil, keeps weights on the grid and lowers the reconstruction loss."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn
from nanoopt.quant.algorithms import adaround, bias_correction, cross_layer_equalization
from nanoopt.quant.algorithms.layer_data import capture_inputs, float_mode, weighted_layers
from nanoopt.quant.config import QuantConfig
from nanoopt.quant.fake_quant import NotCalibratedError
from nanoopt.quant.ptq import calibrate, convert, prepare
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=25, deadline=None)


def to_float64(model):
    for parameter in model.parameters():
        parameter.data = parameter.data.astype(np.float64)
    return model


def conv_net():
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 4, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Dropout(),
                         nn.Linear(6, 3))


@SETTINGS
@given(st.integers(0, 2**16), st.booleans())
def test_cle_keeps_the_float_function(seed, convolutional):
    no.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = conv_net() if convolutional else models.mlp(6, (5, 4), 3)
    for parameter in model.parameters():  # unbalanced channels: what CLE is for
        parameter.data = parameter.data * np.exp(rng.normal(scale=1.5, size=parameter.shape[:1])).reshape(
            (-1,) + (1,) * (parameter.ndim - 1)).astype(np.float32)
    model = to_float64(model).eval()
    x = rng.normal(size=(3, 2, 8, 8) if convolutional else (3, 6))
    equalized = cross_layer_equalization(model, x[:1])
    np.testing.assert_allclose(equalized(Tensor(x)).data, model(Tensor(x)).data, rtol=1e-9, atol=1e-12)


def test_cle_balances_the_two_ranges_of_a_pair():
    no.manual_seed(0)
    model = models.mlp(6, (5,), 3)
    model[1].weight.data[2] *= 40.0
    equalized = cross_layer_equalization(model, iterations=1)
    first = np.abs(equalized[1].weight.data).max(axis=1)
    second = np.abs(equalized[3].weight.data).max(axis=0)
    np.testing.assert_allclose(first, second, rtol=1e-5)
    with pytest.raises(ValueError, match="iterations"):
        cross_layer_equalization(model, iterations=0)


def test_cle_helps_per_tensor_weight_quantization():
    no.manual_seed(0)
    model = models.mlp(16, (32,), 4)
    model[1].weight.data *= np.exp(np.random.default_rng(0).normal(scale=2.0, size=(32, 1))).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(256, 16)).astype(np.float32)
    config = QuantConfig(weight=QuantConfig().weight.__class__(bits=4, symmetric=True, narrow_range=True))
    reference = model(Tensor(x)).data
    errors = []
    for candidate in (model, cross_layer_equalization(model)):
        qmodel = convert(calibrate(prepare(candidate, config, x[:1]), [x], progress=False))
        errors.append(np.linalg.norm(qmodel(x).data - reference))
    assert errors[1] < 0.7 * errors[0]


def calibrated(config=None, seed=0, architecture="conv"):
    no.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = (conv_net() if architecture == "conv" else models.mlp(6, (12, 8), 3)).eval()
    shape = (2, 8, 8) if architecture == "conv" else (6,)
    x = rng.normal(size=(96,) + shape).astype(np.float32)
    return model, calibrate(prepare(model, config or QuantConfig.weights4(), x[:1]), [x[:48], x[48:]],
                            progress=False), x


def channels_last(y):
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.ndim == 4 else y


@pytest.mark.parametrize("architecture", ["conv", "mlp"])
def test_bias_correction_zeroes_the_mean_output_error_of_every_layer(architecture):
    _, prepared, x = calibrated(architecture=architecture)
    batches = [x[:48], x[48:]]
    layers = weighted_layers(prepared)
    with float_mode(prepared):  # the float model, before any correction
        float_inputs = capture_inputs(prepared, [layer for _, layer in layers], batches)
    original_bias = {name: layer.bias.data.copy() for name, layer in layers}
    bias_correction(prepared, batches)
    for (name, layer), inputs in zip(layers, float_inputs, strict=True):
        quantized = capture_inputs(prepared, [layer], batches)[0]
        params = layer.weight_quantizer.qparams()
        w_q = params.dequantize(params.quantize(layer.weight.data))
        with no.no_grad():
            outputs_q = [layer.float_op(Tensor(b), Tensor(w_q), layer.bias).data for b in quantized]
            outputs = [layer.float_op(Tensor(a), Tensor(layer.weight.data), Tensor(original_bias[name])).data
                       for a in inputs]
        error = (np.concatenate([channels_last(y) for y in outputs_q]).astype(np.float64).mean(axis=0)
                 - np.concatenate([channels_last(y) for y in outputs]).astype(np.float64).mean(axis=0))
        magnitude = np.abs(np.concatenate([channels_last(y) for y in outputs])).max()
        assert np.abs(error).max() <= 1e-5 * magnitude, name
        assert not np.allclose(layer.bias.data, original_bias[name])  # something was corrected


@pytest.mark.slow
def test_adaround_rounds_up_or_down_and_keeps_the_promise():
    _, prepared, x = calibrated(seed=3)
    before = {name: layer.weight.data.copy() for name, layer in weighted_layers(prepared)}
    report = adaround(prepared, [x], iterations=300, batch_size=32, progress=False)
    for name, layer in weighted_layers(prepared):
        params = layer.weight_quantizer.qparams()
        shape = (-1,) + (1,) * (layer.weight.ndim - 1)
        steps = before[name] / params.scale.reshape(shape)
        codes = params.quantize(layer.weight.data).astype(np.float64)
        assert np.all((codes == np.floor(steps)) | (codes == np.ceil(steps)) | (np.abs(codes) == params.spec.qmax))
        np.testing.assert_array_equal(params.dequantize(params.quantize(layer.weight.data)), layer.weight.data)
        row = report[name]
        assert row["loss_after"] <= row["loss_nearest"]                      # the promise, every layer
        assert row["loss_after"] == min(row["loss_learned"], row["loss_nearest"])
        assert row["kept_nearest"] == float(row["loss_learned"] > row["loss_nearest"])
        if row["kept_nearest"]:
            assert row["changed_fraction"] == 0.0
    assert sum(r["loss_after"] for r in report.values()) < sum(r["loss_nearest"] for r in report.values())
    qmodel = convert(prepared)
    probe = np.random.default_rng(9).normal(size=(7, 2, 8, 8)).astype(np.float32) * 3
    np.testing.assert_array_equal(qmodel(probe).data, prepared(probe).data)


def test_adaround_keeps_round_to_nearest_where_its_learned_rounding_is_worse():
    """One Adam step of size 1000 on V throws the rounding about: those layers must fall back to nearest."""
    _, prepared, x = calibrated(seed=3)
    before = {name: layer.weight.data.copy() for name, layer in weighted_layers(prepared)}
    report = adaround(prepared, [x], iterations=1, learning_rate=1e3, warmup=0.0, progress=False)
    assert any(row["kept_nearest"] for row in report.values())
    for name, layer in weighted_layers(prepared):
        row = report[name]
        assert row["loss_after"] <= row["loss_nearest"]
        if row["kept_nearest"]:
            assert row["loss_learned"] > row["loss_nearest"] == row["loss_after"]
            params = layer.weight_quantizer.qparams()
            nearest = params.dequantize(params.quantize(before[name]))
            np.testing.assert_array_equal(layer.weight.data, nearest)


def test_algorithms_refuse_uncalibrated_models():
    model, prepared, x = calibrated()
    with pytest.raises(TypeError, match="calibrated model"):
        bias_correction(model, [x])
    with pytest.raises(NotCalibratedError, match="calibrate first"):
        adaround(prepare(model, example_input=x[:1]), [x], progress=False)
    with pytest.raises(ValueError, match="iterations"):
        adaround(prepared, [x], iterations=0)
