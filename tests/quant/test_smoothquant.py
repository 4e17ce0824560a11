"""SmoothQuant: the smoothed copy computes the same function in float, and the smoothed Linear inputs have
smaller outliers; bad alpha and empty calibration are refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, quant
from nanoopt.quant.smoothquant import activation_channel_max, outlier_ratio, smoothing_pairs

SETTINGS = settings(max_examples=20, deadline=None)


def small_gpt(seed=0, outlier=None):
    no.manual_seed(seed)
    model = models.gpt(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():  # non-trivial LayerNorms and biases
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
            parameter.data[...] = rng.uniform(0.5, 1.5, parameter.shape).astype(np.float32)
        elif name.endswith(".bias"):
            parameter.data[...] = rng.normal(0, 0.1, parameter.shape).astype(np.float32)
    if outlier is not None:  # one LayerNorm channel 30x larger than the rest, as in LLM activations
        for block in model.transformer["h"]:
            block.ln_1.weight.data[outlier] *= 30
            block.ln_2.weight.data[outlier] *= 30
    return model


def windows(seed=0, n=6):
    return np.random.default_rng(seed).integers(0, 13, size=(n, 8))


@SETTINGS
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_smoothed_copy_computes_the_same_function(alpha, seed):
    model = small_gpt(seed % 7)
    ids = windows(seed)
    smoothed = quant.smooth_quant(model, ids, alpha=alpha)
    expected = model(ids).data
    np.testing.assert_allclose(smoothed(ids).data, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert smoothed is not model
    changed = [name for name, value in smoothed.state_dict().items()
               if not np.array_equal(value, model.state_dict()[name])]
    if alpha > 0.05:  # the factors do something, and only to the LayerNorms and the Linears they feed
        assert changed
    assert all(any(part in name for part in ("ln_1", "ln_2", "c_attn.weight", "c_fc.weight")) for name in changed)
    assert smoothed.transformer["wte"].weight is smoothed.lm_head.weight  # weight tying survives the copy


def test_smoothing_reduces_the_activation_outlier_ratio():
    model = small_gpt(1, outlier=3)
    ids = windows(1, 16)
    names = [norm for norm, _ in smoothing_pairs(model)]
    before = activation_channel_max(model, ids, names)
    smoothed = quant.smooth_quant(model, ids, alpha=0.5)
    after = activation_channel_max(smoothed, ids, names)
    for name in names:
        assert outlier_ratio(before[name]) > 10
        assert outlier_ratio(after[name]) < outlier_ratio(before[name]) / 2  # sqrt of a 30x outlier is ~5.5x


def test_alpha_one_puts_the_range_into_the_weights():
    model = small_gpt(2, outlier=5)
    ids = windows(2, 16)
    names = [norm for norm, _ in smoothing_pairs(model)]
    smoothed = quant.smooth_quant(model, ids, alpha=1.0)
    after = activation_channel_max(smoothed, ids, names)
    for name in names:  # s_j = max|X_j|: every smoothed channel peaks at 1
        np.testing.assert_allclose(after[name], 1.0, rtol=1e-4)


@pytest.mark.parametrize("alpha", [-0.1, 1.01, float("nan"), "0.5", True])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
        quant.smooth_quant(small_gpt(), windows(), alpha=alpha)


def test_empty_calibration_is_refused():
    with pytest.raises(ValueError, match="calibration is empty"):
        quant.smooth_quant(small_gpt(), np.zeros((0, 8), np.int64))
    with pytest.raises(ValueError, match="calibration is empty"):
        quant.smooth_quant(small_gpt(), [])


def test_a_model_without_layernorm_linear_pairs_is_refused():
    with pytest.raises(ValueError, match="no LayerNorm -> Linear pair"):
        quant.smooth_quant(models.tiny_mlp(), np.zeros((1, 1, 8, 8), np.float32))
