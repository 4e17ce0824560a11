"""Layers: BatchNorm's running statistics as PyTorch, default initialisation bounds, determinism, shape errors.

BatchNorm (PyTorch's convention): in training, normalise with the biased batch variance and update
running = (1 - m) running + m batch, with the *unbiased* batch variance in running_var; ``momentum=None`` uses
m = 1 / num_batches_tracked (a cumulative average). Linear and Conv2d initialise with Kaiming-uniform, a = sqrt(5),
i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias with the same bound.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn
from nanoopt.nn import functional as F

FEW = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def hand_running_stats(batches, momentum):
    """PyTorch's update written out in float64 NumPy."""
    channels = batches[0].shape[1]
    mean, var = np.zeros(channels), np.ones(channels)
    for count, x in enumerate(batches, start=1):
        axes = (0,) + tuple(range(2, x.ndim))
        factor = 1.0 / count if momentum is None else momentum
        mean = (1 - factor) * mean + factor * x.mean(axis=axes, dtype=np.float64)
        var = (1 - factor) * var + factor * x.astype(np.float64).var(axis=axes, ddof=1)
    return mean, var


# ===================================================================== BatchNorm
@FEW
@given(st.sampled_from([(nn.BatchNorm1d, ()), (nn.BatchNorm1d, (5,)), (nn.BatchNorm2d, (3, 4))]),
       st.integers(2, 6), st.integers(1, 4), st.integers(1, 4), st.sampled_from([0.1, 0.5, None]), seeds)
def test_batch_norm_running_statistics_follow_pytorch(kind, n, channels, steps, momentum, seed):
    layer_type, spatial = kind
    layer = layer_type(channels, momentum=momentum)
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal((n, channels, *spatial)) * 3 + 1).astype(np.float32) for _ in range(steps)]
    for x in batches:
        layer(no.Tensor(x))
    expected_mean, expected_var = hand_running_stats(batches, momentum)
    np.testing.assert_allclose(layer.running_mean, expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_var, expected_var, rtol=1e-5, atol=1e-5)
    assert layer.num_batches_tracked == steps and layer.running_mean.dtype == np.float32


@FEW
@given(st.sampled_from([(nn.BatchNorm1d, ()), (nn.BatchNorm2d, (3, 2))]), st.integers(2, 5), st.integers(1, 3),
       seeds)
def test_batch_norm_training_output_uses_biased_batch_statistics(kind, n, channels, seed):
    layer_type, spatial = kind
    layer = layer_type(channels)
    rng = np.random.default_rng(seed)
    layer.weight.data[...] = rng.standard_normal(channels)
    layer.bias.data[...] = rng.standard_normal(channels)
    x = rng.standard_normal((n, channels, *spatial))
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, channels) + (1,) * len(spatial)
    normalised = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + layer.eps)
    expected = normalised * layer.weight.data.reshape(shape) + layer.bias.data.reshape(shape)
    np.testing.assert_allclose(layer(no.Tensor(x)).data, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_eval_uses_running_statistics_and_does_not_update_them():
    layer = nn.BatchNorm2d(2)
    layer.running_mean[...] = [1.0, -2.0]
    layer.running_var[...] = [4.0, 0.25]
    layer.weight.data[...] = [2.0, 1.0]
    layer.bias.data[...] = [0.0, 0.5]
    layer.eval()
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 2)).astype(np.float32)
    out = layer(no.Tensor(x)).data
    mean, var = np.array([1.0, -2.0]).reshape(1, 2, 1, 1), np.array([4.0, 0.25]).reshape(1, 2, 1, 1)
    expected = (x - mean) / np.sqrt(var + 1e-5) * np.array([2.0, 1.0]).reshape(1, 2, 1, 1) + np.array(
        [0.0, 0.5]).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert layer.running_mean.tolist() == [1.0, -2.0] and layer.num_batches_tracked == 0
    layer(no.Tensor(np.ones((1, 2, 1, 1), dtype=np.float32)))  # one value per channel is fine in eval


def test_batch_norm_without_running_statistics_or_affine():
    layer = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    assert list(layer.state_dict()) == [] and list(layer.parameters()) == []
    x = np.random.default_rng(1).standard_normal((8, 3))
    out = layer.eval()(no.Tensor(x)).data  # no running statistics: batch statistics even in eval
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(out.var(axis=0), 1, atol=1e-4)


def test_batch_norm_refuses_a_single_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.BatchNorm1d(3)(no.Tensor(np.ones((1, 3))))


def test_batch_norm_momentum_out_of_range_is_refused():
    with pytest.raises(ValueError, match="momentum must be in"):
        nn.BatchNorm2d(3, momentum=1.5)


# ===================================================================== default initialisation
@pytest.mark.parametrize("build, fan_in", [
    (lambda: nn.Linear(300, 200), 300),
    (lambda: nn.Linear(7, 500), 7),
    (lambda: nn.Conv2d(16, 32, 3), 16 * 9),
    (lambda: nn.Conv2d(8, 8, (5, 3), groups=4), 2 * 15),
    (lambda: nn.Conv2d(32, 32, 3, groups=32), 9),
])
def test_default_init_is_kaiming_uniform_with_bound_one_over_sqrt_fan_in(build, fan_in):
    no.manual_seed(0)
    layer = build()
    bound = 1 / math.sqrt(fan_in)
    for values in (layer.weight.data, layer.bias.data):
        assert np.abs(values).max() <= bound
    weight = layer.weight.data
    assert np.abs(weight).max() > 0.95 * bound  # fills the interval (a smaller bound would fail here)
    np.testing.assert_allclose(weight.std(), bound / math.sqrt(3), rtol=0.1)  # uniform: std = bound / sqrt(3)
    assert abs(weight.mean()) < 0.1 * bound
    assert weight.dtype == np.float32


def test_normalisation_layers_start_as_the_identity_transform():
    bn, ln = nn.BatchNorm2d(4), nn.LayerNorm((2, 3))
    assert bn.weight.data.tolist() == [1.0] * 4 and bn.bias.data.tolist() == [0.0] * 4
    assert bn.running_mean.tolist() == [0.0] * 4 and bn.running_var.tolist() == [1.0] * 4
    assert np.all(ln.weight.data == 1) and np.all(ln.bias.data == 0) and ln.weight.shape == (2, 3)


# ===================================================================== determinism
def resnet_ish():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), models.BasicBlock(4, 8, stride=2), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_models_built_after_the_same_seed_are_identical(seed):
    no.manual_seed(seed)
    first = resnet_ish()
    no.manual_seed(seed)
    second = resnet_ish()
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=key)
    x = no.Tensor(np.random.default_rng(seed).standard_normal((2, 1, 6, 6)).astype(np.float32))
    no.manual_seed(seed)
    out_first = first(x).data  # training mode: the dropout mask comes from the global generator too
    no.manual_seed(seed)
    np.testing.assert_array_equal(out_first, second(x).data)
    no.manual_seed(seed + 1)
    third = resnet_ish()
    assert not np.array_equal(third.state_dict()["0.weight"], first.state_dict()["0.weight"])


# ===================================================================== forward semantics
def test_linear_is_x_times_w_transposed_plus_b():
    layer = nn.Linear(3, 2)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(no.Tensor(x)).data, x @ layer.weight.data.T + layer.bias.data, rtol=1e-6)
    assert layer(no.Tensor(x[0])).shape == (2,)  # unbatched input, as in PyTorch


def test_dropout_in_training_and_eval():
    no.manual_seed(0)
    layer = nn.Dropout(0.25)
    x = no.Tensor(np.ones((200, 50), dtype=np.float32))
    out = layer(x).data
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        nn.Dropout(1.5)


def test_layer_norm_normalises_the_trailing_axes():
    x = np.random.default_rng(0).standard_normal((4, 2, 3)) * 5 + 2
    out = nn.LayerNorm((2, 3))(no.Tensor(x)).data
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(out.var(axis=(1, 2)), 1, atol=1e-4)


def test_basic_block_shapes_and_shortcuts():
    x = no.Tensor(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    assert models.BasicBlock(4, 4)(x).shape == (2, 4, 8, 8)
    assert models.BasicBlock(4, 8, stride=2)(x).shape == (2, 8, 4, 4)
    assert isinstance(models.BasicBlock(4, 4).shortcut, nn.Identity)
    assert np.all(models.BasicBlock(4, 4)(x).data >= 0)


def test_pooling_layers_default_stride_is_the_kernel_and_flatten_keeps_the_batch():
    x = no.Tensor(np.arange(32.0).reshape(2, 1, 4, 4))
    assert nn.MaxPool2d(2)(x).data[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    assert nn.AvgPool2d(2)(x).data[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert nn.AdaptiveAvgPool2d(1)(x).data.ravel().tolist() == [7.5, 23.5]
    assert nn.Flatten()(x).shape == (2, 16)
    assert nn.GELU("tanh")(x).shape == x.shape and nn.Identity()(x) is x


def test_max_and_average_pooling_are_siblings_not_parent_and_child():
    """As in PyTorch: ``isinstance`` dispatch on one pool must not catch the other (issue 12: an AvgPool2d that
    subclassed MaxPool2d was quantized as a max pool)."""
    pools = [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)]
    for pool in pools:
        assert [isinstance(pool, kind) for kind in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)] == [
            other is pool for other in pools]
    assert repr(nn.AvgPool2d(3, stride=1, padding=1)) == "AvgPool2d(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"


# ===================================================================== wrong shapes: name the layer, expected, given
@pytest.mark.parametrize("layer, shape, message", [
    (nn.Linear(3, 2), (4, 5), r"Linear\(in_features=3.*expected input \(N, 3\), got shape \(4, 5\)"),
    (nn.Conv2d(3, 2, 3), (1, 2, 5, 5), r"Conv2d\(3, 2.*expected input \(N, 3, H, W\), got shape \(1, 2, 5, 5\)"),
    (nn.Conv2d(3, 2, 3), (3, 5, 5), r"Conv2d\(3, 2.*expected input \(N, 3, H, W\), got shape \(3, 5, 5\)"),
    (nn.Conv2d(1, 2, 5), (1, 1, 3, 3), r"Conv2d\(1, 2.*input 3x3 .* smaller than the dilated kernel 5x5"),
    (nn.BatchNorm2d(3), (2, 3, 4), r"BatchNorm2d\(3.*expected a 4-D input with 3 channels.*got shape \(2, 3, 4\)"),
    (nn.BatchNorm1d(3), (2, 4), r"BatchNorm1d\(3.*expected a 2-D or 3-D input with 3 channels.*got shape \(2, 4\)"),
    (nn.LayerNorm(4), (2, 3), r"LayerNorm\(\(4,\).*expected input \(\.\.\., 4\), got shape \(2, 3\)"),
    (nn.MaxPool2d(2), (2, 3), r"MaxPool2d\(kernel_size=\(2, 2\).*expected a 4-D input.*got shape \(2, 3\)"),
    (nn.AvgPool2d(3), (1, 1, 2, 2), r"AvgPool2d\(kernel_size=\(3, 3\).*input 2x2 is smaller than the kernel"),
    (nn.AdaptiveAvgPool2d(2), (4, 4), r"AdaptiveAvgPool2d.*expected a 4-D input.*got shape \(4, 4\)"),
    (nn.Flatten(), (3,), r"Flatten\(start_dim=1\): expected at least 2 dimensions, got shape \(3,\)"),
])
def test_wrong_input_shape_names_the_layer_the_expected_and_the_given_shape(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        layer(no.Tensor(np.zeros(shape, dtype=np.float32)))


def test_add_refuses_to_broadcast():
    with pytest.raises(ValueError, match=r"Add\(\): both inputs must have the same shape, got \(2, 3\) and \(3,\)"):
        nn.Add()(no.Tensor(np.zeros((2, 3))), no.Tensor(np.zeros(3)))


def test_sequential_prefixes_the_child_name_at_every_level():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Identity(), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match=r"^layer '2' \(Sequential\): layer '1' \(Linear\): Linear\(in_features=5.*"
                                         r"expected input \(N, 5\), got shape \(7, 4\)"):
        model(no.Tensor(np.zeros((7, 3), dtype=np.float32)))


def test_non_tensor_input_is_refused_with_its_type():
    with pytest.raises(TypeError, match="expected a Tensor or ndarray input, got list"):
        nn.ReLU()([1.0, 2.0])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by groups=2"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="positive sizes"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        nn.MaxPool2d((2, 2, 2))


def test_functional_and_layer_agree_for_conv2d():
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    x = no.Tensor(np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32))
    np.testing.assert_array_equal(layer(x).data, F.conv2d(x, layer.weight, layer.bias, 2, 1, 1, 2).data)
