"""One-shot pruning from calibration data: Wanda and SparseGPT (issue 18).

The contracts: exact sparsity in every row (or exactly n of every m); SparseGPT reconstructs a layer's output
better than magnitude pruning on correlated inputs (by a real margin) and is magnitude pruning when the Hessian is
the identity; Wanda with equal input norms is magnitude pruning per row; the results are nanoopt's masks, so
``prune.remove`` and ``prune.to_sparse`` work; layers are calibrated on the already-pruned model; bad input gets
errors that name the layer.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layerwise_testing import ResidualMLP, correlated_inputs, error, outputs

import nanoopt as no
from nanoopt import models, nn, prune
from nanoopt.layerwise import LayerHessian
from nanoopt.prune.calibrated import row_mask
from nanoopt.prune.methods import nm_mask
from nanoopt.prune.sparsegpt import sparsegpt_prune
from nanoopt.prune.wanda import wanda_scores
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=25, deadline=None)


def magnitude_mask(weight: np.ndarray, sparsity: float | None = None, n: int | None = None, m: int | None = None
                   ) -> np.ndarray:
    """Magnitude pruning per row (independent of the code under test: argsort of |w| in each row)."""
    if sparsity is None:
        return nm_mask(np.abs(weight), np.ones(weight.shape), n, m)
    pruned = int(round(sparsity * weight.shape[1]))
    mask = np.ones(weight.shape, np.float32)
    for row, values in enumerate(np.abs(weight)):
        mask[row, np.argsort(values, kind="stable")[:pruned]] = 0
    return mask


PATTERNS = st.one_of(st.builds(dict, sparsity=st.floats(0.0, 0.95)),
                     st.sampled_from([dict(n=2, m=4), dict(n=1, m=4), dict(n=4, m=8), dict(n=1, m=2)]))


def check_pattern_exact(mask: np.ndarray, pattern: dict) -> None:
    rows, depth = mask.shape
    if "sparsity" in pattern:
        np.testing.assert_array_equal((mask == 0).sum(axis=1), int(round(pattern["sparsity"] * depth)))
    else:
        kept = mask.reshape(rows, depth // pattern["m"], pattern["m"]).sum(axis=-1)
        np.testing.assert_array_equal(kept, pattern["n"])


# ------------------------------------------------------------------------------------------- one layer
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pattern=PATTERNS, blocksize=st.sampled_from([8, 16, 128]))
def test_sparsegpt_masks_are_exact_per_row_and_the_weights_are_zero_there(seed, pattern, blocksize):
    x = correlated_inputs(seed, rows=256, features=48)
    weight = np.random.default_rng(seed).normal(size=(6, 48)).astype(np.float32)
    new, mask = sparsegpt_prune(weight, 2 * x.T @ x / len(x), blocksize=blocksize, **pattern)
    check_pattern_exact(mask, pattern)
    assert np.all(new[mask == 0] == 0) and np.all(np.isfinite(new))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pattern=st.sampled_from([dict(sparsity=0.5), dict(n=2, m=4)]))
def test_sparsegpt_beats_magnitude_pruning_on_correlated_inputs(seed, pattern):
    # measured over 400 cases: SparseGPT / magnitude error ratio 0.65 on average, at most 0.87
    x = correlated_inputs(seed)
    weight = np.random.default_rng(seed + 1).normal(size=(16, 64)).astype(np.float32)
    new, _ = sparsegpt_prune(weight, 2 * x.T @ x / len(x), blocksize=16, **pattern)
    assert error(weight, new, x) < 0.95 * error(weight, weight * magnitude_mask(weight, **pattern), x)


def test_sparsegpt_error_is_well_below_magnitude_on_average():
    ratios = []
    for seed in range(10):
        x = correlated_inputs(seed)
        weight = np.random.default_rng(seed + 50).normal(size=(16, 64)).astype(np.float32)
        new, _ = sparsegpt_prune(weight, 2 * x.T @ x / len(x), 0.5, blocksize=16)  # 4 adaptive blocks
        ratios.append(error(weight, new, x) / error(weight, weight * magnitude_mask(weight, 0.5), x))
    assert np.mean(ratios) < 0.8, ratios


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pattern=PATTERNS, scale=st.floats(0.1, 10.0))
def test_sparsegpt_with_the_identity_hessian_is_magnitude_pruning_per_row(seed, pattern, scale):
    weight = np.random.default_rng(seed).normal(size=(5, 32)).astype(np.float32)
    new, mask = sparsegpt_prune(weight, scale * np.eye(32), blocksize=32, **pattern)
    expected = magnitude_mask(weight, **pattern)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(new, weight * expected)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pattern=PATTERNS)
def test_wanda_with_equal_input_norms_is_magnitude_pruning_per_row(seed, pattern):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(32, 8))
    x = rng.choice([-1.0, 1.0], size=(40, 32)).astype(np.float32)  # every input column has norm sqrt(40)
    prune.wanda(model, x, **pattern)
    expected = magnitude_mask(model[0].weight_orig.data, **pattern)
    np.testing.assert_array_equal(model[0].weight_mask, expected)
    check_pattern_exact(model[0].weight_mask, pattern)


def test_wanda_scores_weigh_by_the_input_norm():
    weight = np.array([[1.0, -0.5, 0.2, 0.1]])
    x = np.array([[0.0, 1.0, 10.0, 0.0], [0.0, 1.0, 10.0, 1.0]], np.float32)
    scores = wanda_scores(weight, np.sqrt((x.astype(np.float64) ** 2).sum(axis=0)))
    assert scores.tolist() == [[0.0, 0.5 * np.sqrt(2), 0.2 * np.sqrt(200), 0.1]]
    np.testing.assert_array_equal(row_mask(scores, 2), [[0, 1, 1, 0]])  # the largest |w| goes: no input
    layer = nn.Linear(4, 1)
    layer.weight.data[...] = weight
    np.testing.assert_array_equal(prune.wanda(nn.Sequential(layer), x, sparsity=0.5)[0].weight_mask, [[0, 1, 1, 0]])


# ------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("method", [prune.wanda, prune.sparsegpt])
@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_models_are_pruned_sequentially_as_masks_that_remove_and_to_sparse_accept(method, pattern):
    no.manual_seed(0)
    model = models.mlp(64, (32, 32))
    x = correlated_inputs(0, rows=300).astype(np.float32)
    pruned = method(copy.deepcopy(model), [x[:150], x[150:]], **pattern)
    # recompute each layer from the inputs produced by the pruned layers before it
    layer_input = x
    for index in (1, 3, 5):
        layer = pruned[index]
        assert prune.is_pruned(layer, "weight")
        check_pattern_exact(layer.weight_mask, pattern)
        weight = model[index].weight.data
        if method is prune.wanda:
            mask = (row_mask(wanda_scores(weight, np.sqrt((layer_input.astype(np.float64) ** 2).sum(axis=0))),
                             int(round(0.5 * weight.shape[1]))) if "sparsity" in pattern
                    else nm_mask(wanda_scores(weight, np.sqrt((layer_input.astype(np.float64) ** 2).sum(axis=0))),
                                 np.ones(weight.shape), 2, 4))
            np.testing.assert_array_equal(layer.weight_mask, mask)
        else:
            hessian = LayerHessian(weight.shape[1]).add_batch(layer_input[:150]).add_batch(layer_input[150:])
            new, mask = sparsegpt_prune(weight, hessian.hessian(), **pattern)
            np.testing.assert_array_equal(layer.weight_mask, mask)
            np.testing.assert_array_equal(layer.weight_orig.data, new)
        with no.no_grad():
            produced = layer(Tensor(layer_input)).data
        layer_input = np.maximum(produced, 0)
    expected = outputs(pruned, x)
    sparse = prune.to_sparse(copy.deepcopy(pruned), format="nm" if "n" in pattern else "csr")
    assert sorted(sparse) == ["1", "3", "5"]
    prune.remove_all(pruned)
    np.testing.assert_allclose(outputs(pruned, x), expected, rtol=1e-6, atol=1e-6)


def test_sparsegpt_on_a_residual_model_beats_magnitude_and_ignore_keeps_the_head():
    no.manual_seed(5)
    model = ResidualMLP()
    x = correlated_inputs(6, rows=512, features=16).astype(np.float32)
    reference = outputs(model, x)
    magnitude = copy.deepcopy(model)
    for name, layer in magnitude.named_modules():
        if isinstance(layer, nn.Linear) and name != "head":
            prune.custom_from_mask(layer, "weight", magnitude_mask(layer.weight.data, 0.5))
    errors = {"magnitude": float(np.mean((outputs(magnitude, x) - reference) ** 2))}
    for method in (prune.wanda, prune.sparsegpt):
        pruned = method(copy.deepcopy(model), x, sparsity=0.5, ignore=["head"])
        assert not prune.is_pruned(pruned.head) and prune.is_pruned(pruned.blocks[1].down)
        errors[method.__name__] = float(np.mean((outputs(pruned, x) - reference) ** 2))
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", [prune.wanda, prune.sparsegpt])
def test_bad_targets_are_refused_naming_the_layer(method):
    model = models.mlp(64, (30,))
    x = np.random.default_rng(0).normal(size=(80, 64)).astype(np.float32)
    for sparsity in (1.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"sparsity .* in \[0, 1\)"):
            method(model, x, sparsity=sparsity)
    with pytest.raises(ValueError, match=r"layer '3' has in_features=30, not a multiple of m=4"):
        method(model, x, n=2, m=4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        method(model, x, n=4, m=4)
    with pytest.raises(ValueError, match="either sparsity or n and m"):
        method(model, x, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="give a target"):
        method(model, x)
    pruned = method(copy.deepcopy(model), x, n=2, m=4, ignore=["3"])
    with pytest.raises(ValueError, match=r"layer '1' is already pruned"):
        method(pruned, x, sparsity=0.5, ignore=["3"])


def test_sparsegpt_with_too_few_rows_warns_or_says_how_many_are_needed():
    model = models.mlp(64, (32,))
    x = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"layer '1' has 64 inputs .* only 10 rows"):
        prune.sparsegpt(copy.deepcopy(model), x, sparsity=0.5, ignore=["3"])
    with pytest.raises(ValueError, match=r"layer '1'.*at least 64 rows"):
        prune.sparsegpt(copy.deepcopy(model), x, sparsity=0.5, percdamp=0.0, ignore=["3"])
    with pytest.raises(ValueError, match="blocksize=6 must be a multiple of m=4"):
        prune.sparsegpt(copy.deepcopy(model), x, n=2, m=4, blocksize=6)


@pytest.mark.parametrize("method", [prune.wanda, prune.sparsegpt, no.quant.awq])
def test_tied_weights_are_refused_naming_the_layer(method):
    class Tied(nn.Module):  # an embedding-like input layer whose weight the output layer reuses
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.out.weight = self.inp.weight

        def forward(self, x: Any) -> Tensor:
            return self.out(self.inp(x))

    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    keywords = dict(sparsity=0.5) if method is not no.quant.awq else dict(group_size=None)
    with pytest.raises(ValueError, match=r"layer 'inp' is shared with \['inp.weight', 'out.weight'\]"):
        method(Tied(), x, **keywords)
    model = Tied()
    before = model.inp.weight.data.copy()
    quantized = no.quant.gptq(model, x, group_size=None)  # GPTQ replaces the layers, it changes no weight in place
    assert type(quantized.out).__name__ == "WeightOnlyLinear"
    np.testing.assert_array_equal(model.inp.weight.data, before)
