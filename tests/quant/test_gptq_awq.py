"""Weight-only quantization from calibration data: round to nearest, GPTQ, AWQ and AWQ + GPTQ (issue 18).

The contracts: GPTQ reconstructs a layer's output better than round-to-nearest on the same grid when the inputs are
correlated (by a real margin), and *is* round-to-nearest when the Hessian is diagonal (with act-order too, which
therefore round-trips its permutation); codes stay on the grid; the stored, packed layer computes with exactly the
weights GPTQ chose; layers are calibrated on the outputs of the already-quantized layers before them; AWQ's search
never loses to its alpha = 0 point (RTN) and its folded or explicit scales keep the model's function; bad input
gets errors that name the layer.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layerwise_testing import ResidualMLP, correlated_inputs, error, outputs

import nanoopt as no
from nanoopt import models, nn, quant
from nanoopt.layerwise import LayerHessian
from nanoopt.quant.algorithms.awq import InputScaled, awq_plan, search_clip, search_scale
from nanoopt.quant.algorithms.gptq import gptq_quantize
from nanoopt.quant.algorithms.rtn import dequantize_groups, grid_spec, group_qparams, quantize_groups
from nanoopt.quant.dynamic import WeightOnlyLinear, quantize_weights
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=25, deadline=None)


# ------------------------------------------------------------------------------------------- helpers
def rtn_weight(weight: np.ndarray, bits: int, group_size: int | None, symmetric: bool):
    scale, zero_point = group_qparams(weight, bits, group_size, symmetric)
    codes = quantize_groups(weight, scale, zero_point, bits, symmetric)
    return codes, scale, zero_point, dequantize_groups(codes, scale, zero_point, bits, symmetric)


# ------------------------------------------------------------------------------------------- GPTQ on one layer
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([2, 3, 4]), symmetric=st.booleans(),
       act_order=st.booleans())
def test_gptq_beats_round_to_nearest_on_the_same_grid(seed, bits, symmetric, act_order):
    # one grid per row: GPTQ fits it before any update, so it is RTN's grid exactly; blocks of 16 columns
    # exercise the lazy updates. Over 200 seeds the ratio GPTQ / RTN was 0.53 on average, at most 0.65.
    x = correlated_inputs(seed)
    weight = np.random.default_rng(seed + 1).normal(size=(16, 64)).astype(np.float32)
    result = gptq_quantize(weight, 2 * x.T @ x / len(x), bits, None, symmetric, act_order, blocksize=16)
    codes, scale, zero_point, nearest = rtn_weight(weight, bits, None, symmetric)
    np.testing.assert_array_equal(result.scale, scale)
    assert error(weight, result.dequantized, x) < 0.8 * error(weight, nearest, x)


def test_gptq_error_is_well_below_round_to_nearest_on_average():
    ratios = []
    for seed in range(12):
        x = correlated_inputs(seed)
        weight = np.random.default_rng(seed + 100).normal(size=(16, 64)).astype(np.float32)
        result = gptq_quantize(weight, 2 * x.T @ x / len(x), 3, 16, False)
        ratios.append(error(weight, result.dequantized, x) / error(weight, rtn_weight(weight, 3, 16, False)[3], x))
    assert np.mean(ratios) < 0.75, ratios


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 8), symmetric=st.booleans(),
       group_size=st.sampled_from([None, 4, 8, 24]), blocksize=st.sampled_from([5, 16, 128]),
       damping=st.sampled_from([0.0, 0.01, 0.5]), scale=st.floats(0.01, 100.0))
def test_gptq_with_the_identity_hessian_is_round_to_nearest(seed, bits, symmetric, group_size, blocksize, damping,
                                                            scale):
    weight = np.random.default_rng(seed).normal(size=(6, 48)).astype(np.float32)
    result = gptq_quantize(weight, scale * np.eye(48), bits, group_size, symmetric, percdamp=damping,
                           blocksize=blocksize)
    codes, rtn_scale, rtn_zero, nearest = rtn_weight(weight, bits, group_size, symmetric)
    np.testing.assert_array_equal(result.codes, codes)
    np.testing.assert_array_equal(result.scale, rtn_scale)
    np.testing.assert_array_equal(result.zero_point, rtn_zero)
    np.testing.assert_array_equal(result.dequantized, nearest)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 8), symmetric=st.booleans(),
       group_size=st.sampled_from([None, 8, 16]))
def test_act_order_round_trips_its_permutation(seed, bits, symmetric, group_size):
    # a diagonal Hessian with distinct entries: act-order processes the columns in a shuffled order, but no update
    # moves another column, so the codes must come back in place: exactly round-to-nearest
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(5, 32)).astype(np.float32)
    diagonal = rng.permutation(np.arange(1.0, 33.0))
    result = gptq_quantize(weight, np.diag(diagonal), bits, group_size, symmetric, act_order=True, blocksize=8)
    codes, scale, zero_point, nearest = rtn_weight(weight, bits, group_size, symmetric)
    np.testing.assert_array_equal(result.codes, codes)
    np.testing.assert_array_equal(result.dequantized, nearest)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 8), symmetric=st.booleans(), act_order=st.booleans(),
       group_size=st.sampled_from([None, 8, 32]))
def test_gptq_codes_are_on_the_grid_and_the_stored_weight_is_the_one_used(seed, bits, symmetric, act_order,
                                                                          group_size):
    x = correlated_inputs(seed, rows=256, features=64)
    weight = np.random.default_rng(seed).normal(size=(8, 64)).astype(np.float32) * 3
    result = gptq_quantize(weight, 2 * x.T @ x / len(x), bits, group_size, symmetric, act_order, blocksize=32)
    spec = grid_spec(bits, symmetric)
    assert result.codes.min() >= spec.qmin and result.codes.max() <= spec.qmax
    np.testing.assert_array_equal(dequantize_groups(result.codes, result.scale, result.zero_point, bits, symmetric),
                                  result.dequantized)
    if act_order:  # static groups: the grids are round-to-nearest's, fitted on the original weights
        np.testing.assert_array_equal(result.scale, group_qparams(weight, bits, group_size, symmetric)[0])
    layer = nn.Linear(64, 8)
    layer.weight.data[...] = weight
    stored = WeightOnlyLinear(layer, bits, group_size, codes=result.codes, scale=result.scale,
                              zero_point=None if symmetric else result.zero_point)
    np.testing.assert_array_equal(stored.codes(), result.codes)  # packed two per byte up to 4 bits
    np.testing.assert_array_equal(stored.dequantized_weight(), result.dequantized)


# ------------------------------------------------------------------------------------------- GPTQ on a model
def test_gptq_model_layers_are_calibrated_sequentially_on_quantized_inputs():
    no.manual_seed(0)
    model = models.mlp(64, (32, 32))
    x = correlated_inputs(0, rows=300).astype(np.float32)
    batches = [x[:128], x[128:]]
    quantized = quant.gptq(model, batches, bits=3, group_size=16, act_order=True)
    # layer 1 from the raw inputs, layer 3 from the outputs of the *quantized* layer 1, layer 5 likewise
    expected_input = x
    for index in (1, 3, 5):
        hessian = LayerHessian(expected_input.shape[1])
        for start in (0, 128):
            hessian.add_batch(expected_input[start:start + 128] if start == 0 else expected_input[128:])
        result = gptq_quantize(model[index].weight.data, hessian.hessian(), 3, 16, False, True,
                               n_rows=hessian.n_rows_)
        layer = quantized[index]
        assert isinstance(layer, WeightOnlyLinear)
        np.testing.assert_array_equal(layer.codes(), result.codes)
        np.testing.assert_array_equal(layer.dequantized_weight(), result.dequantized)
        with no.no_grad():
            produced = layer(Tensor(expected_input)).data
        np.testing.assert_allclose(produced, expected_input @ result.dequantized.T + layer.bias, rtol=1e-5,
                                   atol=1e-5)
        expected_input = np.maximum(produced, 0) if index < 5 else produced
    assert isinstance(model[1], nn.Linear)  # the input model is unchanged


def test_rtn_symmetric_is_quantize_weights_and_ignore_keeps_a_head_in_float():
    no.manual_seed(1)
    model = models.mlp(64, (32,))
    ours = quant.rtn(model, bits=4, group_size=16, symmetric=True)
    theirs = quantize_weights(model, bits=4, group_size=16)
    np.testing.assert_array_equal(ours[1].dequantized_weight(), theirs[1].dequantized_weight())
    kept = quant.gptq(model, np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32), bits=4,
                      group_size=16, ignore=["3"])
    assert isinstance(kept[3], nn.Linear) and isinstance(kept[1], WeightOnlyLinear)


def test_gptq_on_a_residual_model_beats_round_to_nearest_and_saves_and_loads(tmp_path):
    no.manual_seed(2)
    model = ResidualMLP()
    x = correlated_inputs(3, rows=512, features=16).astype(np.float32)
    reference = outputs(model, x)
    errors = {}
    for name, compressed in (("rtn", quant.rtn(model, 3, 16, ignore=["head"])),
                             ("gptq", quant.gptq(model, [x[:256], x[256:]], 3, 16, ignore=["head"]))):
        assert isinstance(compressed.head, nn.Linear) and isinstance(compressed.blocks[1].down, WeightOnlyLinear)
        errors[name] = float(np.mean((outputs(compressed, x) - reference) ** 2))
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    path = tmp_path / "gptq.npz"
    quantized = quant.gptq(model, x, 2, 16)
    no.io.save(quantized, str(path))
    fresh = quant.gptq(model, x, 2, 16)
    no.io.load_into(fresh, str(path))
    np.testing.assert_array_equal(outputs(fresh, x), outputs(quantized, x))


# ------------------------------------------------------------------------------------------- AWQ
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 6), symmetric=st.booleans(),
       group_size=st.sampled_from([None, 8]))
def test_awq_search_never_loses_to_round_to_nearest(seed, bits, symmetric, group_size):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 32)) * np.where(rng.random(32) < 0.1, 30.0, 1.0)  # a few salient channels
    weights = [rng.normal(size=(8, 32)), rng.normal(size=(4, 32))]
    s, alpha, losses = search_scale(weights, x, np.abs(x).mean(axis=0), bits, group_size, symmetric, n_grid=10)
    assert 0.0 <= alpha <= 1.0 and np.all(s > 0)
    assert losses["awq"] <= losses["rtn"]
    total = 0.0
    for w in weights:  # the reported loss is the error of the quantized, rescaled layers
        q = rtn_weight((w * s).astype(np.float32), bits, group_size, symmetric)[3]
        total += float(np.mean((x @ w.T - (x / s) @ q.T.astype(np.float64)) ** 2))
    assert total == pytest.approx(losses["awq"], rel=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(2, 4), symmetric=st.booleans(),
       group_size=st.sampled_from([None, 8]))
def test_awq_clip_search_never_loses_to_no_clipping(seed, bits, symmetric, group_size):
    rng = np.random.default_rng(seed)
    weight = rng.standard_t(3, size=(6, 32))  # heavy tails: clipping has something to gain
    x = rng.normal(size=(128, 32))
    bound = search_clip(weight, x, bits, group_size, symmetric)
    size = 32 if group_size is None else group_size

    def group_errors(w: np.ndarray) -> np.ndarray:
        q = rtn_weight(w.astype(np.float32), bits, group_size, symmetric)[3].astype(np.float64)
        parts = [np.mean((x[:, g:g + size] @ (weight - q)[:, g:g + size].T) ** 2, axis=0) for g in range(0, 32, size)]
        return np.stack(parts, axis=1)  # (C, G)

    limit = np.abs(weight).reshape(6, -1, size).max(axis=2)
    assert np.all(bound <= limit) and np.all(bound >= 0.5 * limit)
    clipped = np.clip(weight, -np.repeat(bound, size, axis=1), np.repeat(bound, size, axis=1))
    assert np.all(group_errors(clipped) <= group_errors(weight) * (1 + 1e-9) + 1e-12)


def test_awq_folds_into_a_previous_linear_or_layernorm_else_keeps_an_explicit_scale():
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    plan = awq_plan(models.mlp(16, (32, 32)), x)
    assert [(g.layers, g.fold_into) for g in plan] == [(["1"], None), (["3"], "1"), (["5"], "3")]
    with_norm = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    assert [(g.layers, g.fold_into) for g in awq_plan(with_norm, x)] == [(["0"], None), (["2"], "1")]
    traced = [(g.layers, g.fold_into) for g in awq_plan(ResidualMLP(add_module=True), x)]
    # up folds into nothing (its input also feeds the residual add); down folds into up through the ReLU
    assert traced == [(["stem"], None), (["blocks.0.up"], None), (["blocks.0.down"], "blocks.0.up"),
                      (["blocks.1.up"], None), (["blocks.1.down"], "blocks.1.up"), (["head"], None)]
    untraceable = awq_plan(ResidualMLP(), x)  # a functional "+": no graph, every scale explicit
    assert all(g.fold_into is None for g in untraceable) and len(untraceable) == 6


@pytest.mark.parametrize("make", [lambda: models.mlp(16, (32, 32)), lambda: ResidualMLP(),
                                  lambda: ResidualMLP(add_module=True),
                                  lambda: nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))])
def test_awq_scales_keep_the_function_and_beat_round_to_nearest(make):
    no.manual_seed(3)
    model = make()
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(512, 16)) * np.where(np.arange(16) < 2, 20.0, 1.0)).astype(np.float32)
    reference = outputs(model, x)
    # 8 bits per row: the scales must keep the model's function (a scale on the wrong axis would not)
    eight = quant.awq(model, x, bits=8, group_size=None)
    span = reference.max() - reference.min()
    assert np.max(np.abs(outputs(eight, x) - reference)) < 0.02 * span
    low = {name: float(np.mean((outputs(compressed, x) - reference) ** 2)) for name, compressed in
           (("rtn", quant.rtn(model, 3, 16)), ("awq", quant.awq(model, x, 3, 16)),
            ("awq+gptq", quant.awq(model, x, 3, 16, rounding="gptq")),
            ("awq clip", quant.awq(model, x, 3, 16, clip=True)))}
    assert low["awq"] < low["rtn"] and low["awq+gptq"] < low["rtn"] and low["awq clip"] < low["rtn"], low


def test_awq_explicit_scales_live_in_an_input_scaled_wrapper():
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    groups: list = []
    small = quant.awq(ResidualMLP(), x, bits=4, group_size=16, ignore=["head"], report=groups)
    assert [g.layers[0] for g in groups][:2] == ["stem", "blocks.0.up"]
    assert all(0 <= g.alpha <= 1 and g.loss["awq"] <= g.loss["rtn"] for g in groups)
    assert isinstance(small.stem, InputScaled) and isinstance(small.stem.layer, WeightOnlyLinear)
    assert isinstance(small.head, nn.Linear)
    assert "stem.input_scale" in small.state_dict()


# ------------------------------------------------------------------------------------------- bad input
def test_too_few_calibration_rows_warn_and_proceed_or_say_how_many_are_needed():
    model = models.mlp(64, (32,))
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)  # enough for layer 3's 32 inputs only
    with pytest.warns(UserWarning, match=r"layer '1' has 64 inputs .* only 40 rows.*64 rows or more"):
        quant.gptq(model, x, bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"layer '1'.*at least 64 rows"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.gptq(model, x, bits=4, group_size=32, percdamp=0.0)


@pytest.mark.parametrize("function", [quant.gptq, quant.awq])
def test_bad_bits_groups_and_patterns_are_refused_naming_the_layer(function):
    model = models.mlp(64, (30,))
    x = np.zeros((70, 64), np.float32)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an int in"):
            function(model, x, bits=bits, group_size=None)
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=30 of layer '3'"):
        function(model, x, bits=4, group_size=32)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        function(model, x, bits=4, group_size=0)
    with pytest.raises(ValueError, match=r"ignore pattern 'head' matches no Linear layer"):
        function(model, x, bits=4, group_size=None, ignore=["head"])
    with pytest.raises(ValueError, match="percdamp"):
        function(model, x, bits=4, group_size=None, percdamp=1.5)
    with pytest.raises(ValueError, match="calibration data is empty"):
        function(model, [], bits=4, group_size=None)


def test_a_linear_layer_that_never_runs_is_named():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Any) -> Tensor:
            return self.used(x)

    model = Partial()
    with pytest.raises(ValueError, match=r"\['unused'\] are not called"):
        quant.gptq(model, np.zeros((16, 8), np.float32), group_size=None)
    assert isinstance(quant.gptq(copy.deepcopy(model), np.ones((16, 8), np.float32), group_size=None,
                                 ignore=["unused"]).used, WeightOnlyLinear)


def test_gptq_keeps_the_zeros_of_a_pruned_model():
    no.manual_seed(6)
    model = models.mlp(64, (32,))
    x = correlated_inputs(7, rows=256).astype(np.float32)
    no.prune.sparsegpt(model, x, n=2, m=4)
    for symmetric, act_order in ((False, False), (True, True)):
        quantized = quant.gptq(model, x, bits=3, group_size=16, symmetric=symmetric, act_order=act_order)
        for index in (1, 3):
            pruned = model[index].weight_mask == 0
            assert np.all(quantized[index].dequantized_weight()[pruned] == 0)
            assert np.mean(quantized[index].dequantized_weight()[~pruned] == 0) < 0.5


def test_asymmetric_and_symmetric_checkpoints_do_not_load_into_each_other(tmp_path):
    no.manual_seed(8)
    model = models.mlp(64, (32,))
    x = correlated_inputs(9, rows=128).astype(np.float32)
    asymmetric, symmetric = quant.gptq(model, x, 4, 16), quant.gptq(model, x, 4, 16, symmetric=True)
    assert "1.weight_zero_point" in asymmetric.state_dict() and "1.weight_zero_point" not in symmetric.state_dict()
    no.io.save(asymmetric, str(tmp_path / "asymmetric.npz"))
    no.io.save(symmetric, str(tmp_path / "symmetric.npz"))
    with pytest.raises((KeyError, ValueError), match="weight_zero_point"):
        no.io.load_into(copy.deepcopy(symmetric), str(tmp_path / "asymmetric.npz"))
    with pytest.raises((KeyError, ValueError), match="weight_zero_point"):
        no.io.load_into(copy.deepcopy(asymmetric), str(tmp_path / "symmetric.npz"))
    other = quant.gptq(model, x[::-1].copy(), 4, 16)
    no.io.load_into(other, str(tmp_path / "asymmetric.npz"))
    np.testing.assert_array_equal(outputs(other, x), outputs(asymmetric, x))


@pytest.mark.parametrize("function", [quant.gptq, quant.awq, no.prune.wanda, no.prune.sparsegpt])
def test_non_finite_calibration_weights_and_empty_batches_are_named(function):
    model = models.mlp(8, (8,), num_classes=4)
    keywords = dict(sparsity=0.5) if function in (no.prune.wanda, no.prune.sparsegpt) else dict(group_size=None)
    x = np.ones((16, 8), np.float32)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="calibration batch 1 holds 1 NaN/Inf"):
        function(copy.deepcopy(model), [x, bad], **keywords)
    with pytest.raises(ValueError, match="layer '1' received no calibration rows"):
        function(copy.deepcopy(model), [x[:0]], **keywords)
    broken = copy.deepcopy(model)
    broken[1].weight.data[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"'1\.weight'|layer '1' has 1 NaN/Inf weights"):
        function(broken, x, **keywords)
