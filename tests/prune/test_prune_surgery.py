"""Physical surgery: shrunk models compute what the masked models computed; groups, refusals and errors."""

import numpy as np
import pytest
from batchnorm_testing import randomise_batchnorm
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn, prune
from nanoopt.train import predict


def assert_same_outputs(model, x, expected):
    got = predict(model, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(0, 0.9), st.floats(0, 0.9))   # at least one neuron per layer survives
def test_shrinking_an_mlp_with_biases_folds_dead_neurons_and_keeps_outputs(seed, first, second):
    no.manual_seed(seed % 1000)
    model = models.mlp(12, hidden=(10, 8))
    prune.ln_structured(model[1], "weight", amount=first, n=1, dim=0)
    prune.ln_structured(model[3], "weight", amount=second, n=2, dim=0)
    x = np.random.default_rng(seed).standard_normal((5, 12)).astype(np.float32)
    expected = predict(model, x)
    report = prune.shrink(model, x)
    assert model[1].out_features == 10 - round(first * 10)
    assert model[3].in_features == model[1].out_features
    assert model[3].out_features == 8 - round(second * 8)
    assert report.parameters_after <= report.parameters_before
    assert_same_outputs(model, x, expected)
    fresh = np.random.default_rng(seed + 1).standard_normal((3, 12)).astype(np.float32)
    assert predict(model, fresh).shape == (3, 10)


def test_lenet_300_100_half_the_hidden_neurons_become_physically_smaller():
    model = models.lenet_300_100(in_features=64)
    for index in (1, 3):
        prune.ln_structured(model[index], "weight", amount=0.5, n=1, dim=0)
    x = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
    expected = predict(model, x)
    report = prune.shrink(model, x)
    assert (model[1].out_features, model[3].in_features, model[3].out_features, model[5].in_features) == \
        (150, 150, 50, 50)
    assert model.num_parameters() == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    assert "300 -> 150 channels" in str(report) and "folded" in str(report)
    assert "not shrinkable" in str(report)          # the classifier's outputs are the model's outputs
    assert_same_outputs(model, x, expected)
    assert prune.is_pruned(model[1], "weight")      # surviving masks are kept (sliced)


def test_conv_filters_through_pool_and_flatten_into_linear():
    no.manual_seed(0)
    model = models.lenet5(input_size=28)           # conv(pad 2) -> pool -> conv(pad 0) -> pool -> flatten -> fc
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    prune.ln_structured(model[3], "weight", amount=0.25, n=2, dim=0)
    x = np.random.default_rng(1).random((2, 1, 28, 28)).astype(np.float32)
    expected = predict(model, x)
    prune.shrink(model, x)
    assert (model[0].out_channels, model[3].in_channels, model[3].out_channels) == (3, 3, 12)
    assert model[7].in_features == 12 * 5 * 5       # flatten's channel-to-feature expansion followed
    assert_same_outputs(model, x, expected)


def test_a_nonzero_constant_entering_a_padded_convolution_is_kept_and_explained():
    model = models.lenet5(input_size=8)            # the second convolution has padding 1
    model[0].bias.data[...] = 0.5                  # dead filters output relu(0.5) = 0.5 everywhere
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    x = np.random.default_rng(2).random((2, 1, 8, 8)).astype(np.float32)
    expected = predict(model, x)
    report = prune.shrink(model, x)
    assert model[0].out_channels == 6
    assert "zero-padded" in str(report) and "'3'" in str(report)
    assert_same_outputs(model, x, expected)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.0, 0.9), st.sampled_from(["l1", "l2", "bn_scale"]))
def test_resnet_with_batchnorm_and_residuals_shrinks_with_equal_outputs(seed, amount, criterion):
    no.manual_seed(seed % 1000)
    model = models.small_resnet(widths=(4, 8), blocks_per_stage=2)
    randomise_batchnorm(model, np.random.default_rng(seed))
    x = np.random.default_rng(seed).random((2, 1, 8, 8)).astype(np.float32)
    prune.prune_channels(model, x, amount=amount, criterion=criterion)
    expected = predict(model, x)
    prune.shrink(model, x)
    assert_same_outputs(model, x, expected)
    # the residual stream: stem, both conv2's and the projection shortcut's channels stay tied
    assert model.stem[0].out_channels == model.stages[0][0].conv2.out_channels == \
        model.stages[0][1].conv2.out_channels == model.stages[1][0].conv1.in_channels
    assert model.stages[1][0].shortcut[0].out_channels == model.stages[1][1].conv2.out_channels == \
        model.fc.in_features
    assert model.stem[0].out_channels == max(1, 4 - round(amount * 4))


def test_dependency_groups_tie_the_residual_stream():
    model = models.small_resnet(widths=(4, 8), blocks_per_stage=1)
    groups = prune.dependency_groups(model, np.zeros((1, 1, 8, 8), np.float32))
    producers = sorted(sorted(g.producers) for g in groups)
    assert ["stages.1.0.conv2", "stages.1.0.shortcut.0"] in producers
    assert ["stages.0.0.conv2", "stem.0"] in producers
    assert all(not g.pinned for g in groups if "fc" not in g.producers)
    assert [g.pinned for g in groups if "fc" in g.producers] == ["its channels are the model's output"]


def test_shrink_refuses_to_remove_every_channel_of_a_group():
    model = models.mlp(6, hidden=(4,))
    prune.ln_structured(model[1], "weight", amount=1.0, n=1, dim=0)
    with pytest.raises(ValueError, match="refuses to remove every channel.*'1'"):
        prune.shrink(model, np.ones((1, 6), np.float32))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(5, 3), nn.Linear(7, 2)

    def forward(self, x):
        joined = no.concatenate([self.a(x).relu(), self.b(x) * 2.0], axis=1)   # raw ops: relu, mul, concat
        return self.head(joined)


def test_raw_operations_and_concatenation_are_followed():
    model = Concat()
    prune.ln_structured(model.a, "weight", amount=2, n=1, dim=0)
    prune.ln_structured(model.b, "weight", amount=1, n=1, dim=0)
    x = np.random.default_rng(3).random((4, 5)).astype(np.float32)
    expected = predict(model, x)
    prune.shrink(model, x)
    assert (model.a.out_features, model.b.out_features, model.head.in_features) == (2, 2, 4)
    assert_same_outputs(model, x, expected)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(4, 6)
        self.mixing = nn.Parameter(np.ones((6, 6), np.float32))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.features(x) @ self.mixing)


class Custom(nn.Module):
    def forward(self, x):
        return x * 1.0


def test_models_the_tracer_cannot_follow_raise_naming_the_layers():
    with pytest.raises(ValueError, match=r"channels of 'features' through the primitive MatMul"):
        prune.shrink(Untraceable(), np.ones((1, 4), np.float32))
    model = nn.Sequential(nn.Linear(3, 4), Custom(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"channels of '0' through layer '1' \(Custom\(\)\)"):
        prune.shrink(model, np.ones((1, 3), np.float32))
    grouped = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="grouped convolutions"):
        prune.shrink(grouped, np.ones((1, 1, 1, 1), np.float32))
    with pytest.raises(TypeError, match="ndarray or Tensor"):
        prune.shrink(models.tiny_mlp(), [[1.0] * 64])


def test_layernorm_pins_its_channels():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=0)
    report = prune.shrink(model, np.ones((2, 3), np.float32))
    assert model[0].out_features == 4 and "LayerNorm" in str(report)


def test_prune_blocks_removes_the_most_identity_like_block_and_keeps_shapes():
    no.manual_seed(0)
    model = models.small_resnet(widths=(4, 8), blocks_per_stage=2)
    x = np.random.default_rng(4).random((3, 1, 8, 8)).astype(np.float32)
    distances = prune.block_angular_distances(model, x)
    assert set(distances) == {"stages.0.0", "stages.0.1", "stages.1.1"}
    assert all(0.0 <= d <= 1.0 for d in distances.values())
    removed = prune.prune_blocks(model, x, count=2)
    assert removed == sorted(distances, key=distances.get)[:2]
    assert all(isinstance(model.get_submodule(name), nn.Identity) for name in removed)
    assert predict(model, x).shape == (3, 10)
    with pytest.raises(ValueError, match="changes the shape"):
        prune.remove_blocks(model, ["stages.1.0"], x)
    with pytest.raises(ValueError, match="count"):
        prune.prune_blocks(model, x, count=5)
