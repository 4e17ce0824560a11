"""BatchNorm folding is exact in float (float64 to 1e-12, float32 to rounding); the tracer sees the data flow."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn
from nanoopt.nn.graph import INPUT, trace
from nanoopt.quant.bn_fold import fold_batchnorm
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=30, deadline=None)


def to_float64(model):
    for parameter in model.parameters():
        parameter.data = parameter.data.astype(np.float64)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.dtype == np.float32:
                module._buffers[name] = buffer.astype(np.float64)
    return model


def randomise_batchnorms(model, rng):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean[...] = rng.normal(size=channels)
            module.running_var[...] = rng.uniform(0.1, 3.0, size=channels)
            module.weight.data[...] = rng.normal(size=channels)
            module.bias.data[...] = rng.normal(size=channels)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.integers(1, 3))
def test_conv_bn_fold_is_exact_in_float64(seed, bias, linear, stride):
    rng = np.random.default_rng(seed)
    no.manual_seed(seed % 1000)
    if linear:
        model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.BatchNorm1d(4), nn.ReLU())
        x = rng.normal(size=(3, 5))
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=1, bias=bias), nn.BatchNorm2d(3), nn.ReLU())
        x = rng.normal(size=(2, 2, 6, 6))
    randomise_batchnorms(model, rng)
    model = to_float64(model).eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(model[1], nn.BatchNorm1d | nn.BatchNorm2d)
    expected, got = model(Tensor(x)).data, folded(Tensor(x)).data
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_resnet_folds_every_batchnorm_and_keeps_its_function():
    rng = np.random.default_rng(0)
    no.manual_seed(0)
    model = models.small_resnet(widths=(4, 8), blocks_per_stage=1)
    randomise_batchnorms(model, rng)
    model.eval()
    x = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    folded = fold_batchnorm(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    expected, got = model(Tensor(x)).data, folded(Tensor(x)).data
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_batchnorm_that_cannot_fold_stays():
    shared = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.BatchNorm1d(3))  # BN after ReLU: not foldable
    assert isinstance(fold_batchnorm(shared)[2], nn.BatchNorm1d)
    no_stats = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    assert isinstance(fold_batchnorm(no_stats)[1], nn.BatchNorm1d)


class TwoReaders(nn.Module):
    """The conv output is read by the BN and by the add: folding would change what the add sees."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.add = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Add()

    def forward(self, x):
        y = self.conv(x)
        return self.add(self.bn(y), y)


def test_batchnorm_is_not_folded_into_a_layer_read_elsewhere():
    model = TwoReaders()
    x = np.zeros((1, 2, 3, 3), np.float32)
    graph = trace(model, x)
    assert graph.nodes["add"].inputs == ["bn", "conv"] and graph.consumers("conv") == ["bn", "add"]
    assert isinstance(fold_batchnorm(model, x).bn, nn.BatchNorm2d)


def test_trace_of_a_resnet_block():
    block = models.BasicBlock(2, 4, stride=2)
    graph = trace(block, np.zeros((1, 2, 4, 4), np.float32))
    assert graph.nodes["conv1"].inputs == [INPUT] and graph.nodes["shortcut.0"].inputs == [INPUT]
    assert graph.nodes["add"].inputs == ["bn2", "shortcut.1"] and graph.output == "relu2"
    assert graph.nodes["conv1"].output_shape == (1, 4, 2, 2)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x * 2.0)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.relu(x))


def test_trace_refuses_what_eager_quantization_cannot_see():
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="not produced by a leaf module"):
        trace(Functional(), x)
    with pytest.raises(ValueError, match="called more than once"):
        trace(Twice(), x)
    with pytest.raises(ValueError, match="pass example_input"):
        trace(Functional())
