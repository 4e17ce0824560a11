"""Pruning methods: exact counts (ties included), equality with plain reference implementations, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt import nn, prune
from nanoopt.prune import methods

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def weights_with_ties(draw, min_dims=2, max_dims=2):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=min_dims, max_size=max_dims)))
    # few distinct magnitudes and both signs: many ties in |w|
    values = draw(st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]),
                           min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.array(values, dtype=np.float32).reshape(shape)


def amounts(count):
    return st.one_of(st.floats(0.0, 1.0), st.integers(0, count))


def linear_with(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.weight.data[...] = weight
    return layer


# ----------------------------------------------------------------- plain references (loops, no cleverness)
def reference_unstructured(scores, mask, k):
    survivors = [i for i in range(mask.size) if mask.flat[i] == 1]
    ranked = sorted(survivors, key=lambda i: (scores.flat[i], i))
    out = mask.astype(np.float32).copy()
    for i in ranked[:k]:
        out.flat[i] = 0.0
    return out


def reference_rows(weight, mask, k, n):
    rows = weight.shape[0]
    alive = [r for r in range(rows) if mask[r].sum() > 0]
    def norm(r):
        values = [abs(float(v) * float(mk)) for v, mk in zip(weight[r].ravel(), mask[r].ravel(), strict=True)]
        return max(values) if n == np.inf else sum(v ** n for v in values) ** (1.0 / n)
    ranked = sorted(alive, key=lambda r: (norm(r), r))
    out = mask.astype(np.float32).copy()
    for r in ranked[:k]:
        out[r] = 0.0
    return out


def reference_nm(weight, mask, n, m):
    out = np.zeros_like(mask, dtype=np.float32)
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], m):
            candidates = [j for j in range(start, start + m) if mask[row, j] == 1]
            candidates.sort(key=lambda j: (-abs(float(weight[row, j])), j))
            for j in candidates[:n]:
                out[row, j] = 1.0
    return out


# ----------------------------------------------------------------- unstructured
@SETTINGS
@given(weights_with_ties(), st.data())
def test_l1_unstructured_prunes_exactly_round_amount_n_and_matches_the_reference(weight, data):
    amount = data.draw(amounts(weight.size))
    layer = prune.l1_unstructured(linear_with(weight), "weight", amount=amount)
    k = amount if isinstance(amount, int) else round(amount * weight.size)
    assert int((layer.weight_mask == 0).sum()) == k
    expected = reference_unstructured(np.abs(weight), np.ones(weight.shape), k)
    np.testing.assert_array_equal(layer.weight_mask, expected)
    np.testing.assert_array_equal(layer.weight.data, weight * expected)


@SETTINGS
@given(weights_with_ties(), st.floats(0, 1), st.floats(0, 1))
def test_a_second_call_prunes_among_the_survivors(weight, first, second):
    layer = prune.l1_unstructured(linear_with(weight), "weight", amount=first)
    k1 = round(first * weight.size)
    before = layer.weight_mask.copy()
    prune.l1_unstructured(layer, "weight", amount=second)
    k2 = round(second * (weight.size - k1))
    assert int((layer.weight_mask == 0).sum()) == k1 + k2
    assert np.all(layer.weight_mask <= before)                      # nothing revived
    np.testing.assert_array_equal(layer.weight_mask, reference_unstructured(np.abs(weight), before, k2))


@SETTINGS
@given(weights_with_ties(), st.integers(0, 2**31), st.floats(0, 1))
def test_random_unstructured_is_seeded_and_exact(weight, seed, amount):
    a = prune.random_unstructured(linear_with(weight), "weight", amount=amount, seed=seed)
    b = prune.random_unstructured(linear_with(weight), "weight", amount=amount, seed=seed)
    np.testing.assert_array_equal(a.weight_mask, b.weight_mask)
    assert int((a.weight_mask == 0).sum()) == round(amount * weight.size)


@SETTINGS
@given(st.lists(weights_with_ties(), min_size=1, max_size=3), st.floats(0, 1), st.floats(0, 1))
def test_global_unstructured_ranks_all_parameters_together(weights, first, amount):
    layers = [linear_with(w) for w in weights]
    prune.l1_unstructured(layers[0], "weight", amount=first)        # one layer arrives already pruned
    pairs = [(layer, "weight") for layer in layers]
    flat = np.concatenate([np.abs(w).ravel() for w in weights])
    old = np.concatenate([prune.masks.get_mask(layer, "weight").ravel() for layer in layers])
    prune.global_unstructured(pairs, amount=amount)
    k = round(amount * int(old.sum()))
    expected = reference_unstructured(flat, old, k)
    got = np.concatenate([layer.weight_mask.ravel() for layer in layers])
    np.testing.assert_array_equal(got, expected)


def test_global_unstructured_uses_importance_scores_and_random():
    a, b = nn.Linear(4, 3), nn.Linear(3, 2)
    scores = {(a, "weight"): np.arange(12.0).reshape(3, 4), (b, "weight"): np.full((2, 3), 100.0)}
    prune.global_unstructured([(a, "weight"), (b, "weight")], importance_scores=scores, amount=5)
    assert a.weight_mask.ravel().tolist() == [0.0] * 5 + [1.0] * 7 and b.weight_mask.all()
    c, d = nn.Linear(5, 5), nn.Linear(5, 5)
    prune.global_unstructured([(c, "weight"), (d, "weight")], "random", amount=0.5, seed=3)
    assert int((c.weight_mask == 0).sum() + (d.weight_mask == 0).sum()) == 25


# ----------------------------------------------------------------- structured and N:M
@SETTINGS
@given(weights_with_ties(), st.sampled_from([1, 2, np.inf]), st.floats(0, 1), st.floats(0, 1))
def test_ln_structured_matches_the_reference_and_composes(weight, n, first, second):
    layer = prune.ln_structured(linear_with(weight), "weight", amount=first, n=n, dim=0)
    rows = weight.shape[0]
    k1 = round(first * rows)
    expected = reference_rows(weight, np.ones(weight.shape), k1, n)
    np.testing.assert_array_equal(layer.weight_mask, expected)
    prune.ln_structured(layer, "weight", amount=second, n=n, dim=0)
    k2 = round(second * (rows - k1))
    np.testing.assert_array_equal(layer.weight_mask, reference_rows(weight, expected, k2, n))
    assert int((layer.weight_mask.sum(axis=1) == 0).sum()) == k1 + k2


def test_ln_structured_on_conv_filters_and_input_channels():
    conv = nn.Conv2d(3, 8, 3)
    prune.ln_structured(conv, "weight", amount=0.25, n=2, dim=0)
    norms = np.linalg.norm(conv.weight_orig.data.reshape(8, -1), axis=1)
    pruned = np.flatnonzero(conv.weight_mask.reshape(8, -1).sum(axis=1) == 0)
    assert sorted(pruned.tolist()) == sorted(np.argsort(norms, kind="stable")[:2].tolist())
    prune.ln_structured(conv, "weight", amount=1, n=1, dim=1)
    assert int((conv.weight_mask.sum(axis=(0, 2, 3)) == 0).sum()) == 1


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_nm_sparsity_keeps_n_of_every_m_and_matches_the_reference(rows, groups, data):
    m = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(1, m))
    values = data.draw(st.lists(st.sampled_from([-1.0, 0.5, 1.0, 2.0, -3.0]), min_size=rows * groups * m,
                                max_size=rows * groups * m))
    weight = np.array(values, dtype=np.float32).reshape(rows, groups * m)
    layer = linear_with(weight)
    prune.l1_unstructured(layer, "weight", amount=data.draw(st.floats(0, 0.5)))   # some entries already pruned
    old = layer.weight_mask.copy()
    prune.nm_sparsity(layer, "weight", n=n, m=m)
    np.testing.assert_array_equal(layer.weight_mask, reference_nm(weight, old, n, m))
    per_group = layer.weight_mask.reshape(rows, groups, m).sum(axis=-1)
    assert np.all(per_group <= n)
    assert np.all(per_group == np.minimum(n, old.reshape(rows, groups, m).sum(axis=-1)))


def test_nm_sparsity_on_conv_groups_input_channels():
    conv = nn.Conv2d(8, 2, 3)
    prune.nm_sparsity(conv, "weight", n=2, m=4)
    kept = conv.weight_mask.reshape(2, 2, 4, 3, 3).sum(axis=2)     # groups of 4 input channels per position
    assert np.all(kept == 2)


def test_custom_from_mask_and_identity():
    layer = prune.identity(nn.Linear(3, 2), "weight")
    assert layer.weight_mask.all()
    prune.custom_from_mask(layer, "bias", np.array([1, 0]))
    assert layer.bias.data[1] == 0 and sorted(layer.state_dict()) == ["bias_mask", "bias_orig", "weight_mask",
                                                                       "weight_orig"]


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("amount", [-0.1, 1.5, float("nan"), 7, -1])
def test_bad_amounts_raise_naming_the_module(amount):
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"l1_unstructured\(Linear\(in_features=3"):
        prune.l1_unstructured(layer, "weight", amount=amount)
    assert "weight" in layer._parameters                             # nothing changed


@pytest.mark.parametrize("amount", [True, "0.5", None])
def test_amounts_of_the_wrong_type_raise_type_error(amount):
    with pytest.raises(TypeError, match="amount"):
        prune.l1_unstructured(nn.Linear(3, 2), "weight", amount=amount)


def test_unknown_parameter_names_and_bad_masks_raise():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Linear\(.*has no parameter 'weights'.*\['weight', 'bias'\]"):
        prune.l1_unstructured(layer, "weights", amount=0.5)
    with pytest.raises(ValueError, match="shape"):
        prune.custom_from_mask(layer, "weight", np.ones((3, 2)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        prune.custom_from_mask(layer, "weight", np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="shape"):
        prune.l1_unstructured(layer, "weight", amount=0.5, importance_scores=np.ones(3))


@pytest.mark.parametrize("n, m, error", [(0, 4, ValueError), (5, 4, ValueError), (2, 3, ValueError),
                                         (2.0, 4, TypeError), (True, 4, TypeError)])
def test_nm_sparsity_rejects_invalid_n_m(n, m, error):
    with pytest.raises(error, match=r"nm_sparsity\(Linear"):
        prune.nm_sparsity(nn.Linear(8, 2), "weight", n=n, m=m)


def test_structured_rejects_bad_dim_and_norm():
    with pytest.raises(ValueError, match="dim"):
        prune.ln_structured(nn.Linear(3, 2), "weight", 0.5, n=2, dim=2)
    with pytest.raises(ValueError, match="norm"):
        prune.ln_structured(nn.Linear(3, 2), "weight", 0.5, n="nuc", dim=0)
    with pytest.raises(ValueError, match="twice"):
        layer = nn.Linear(2, 2)
        prune.global_unstructured([(layer, "weight"), (layer, "weight")], amount=0.5)


def test_count_to_prune_rounds_half_to_even_like_pytorch():
    assert methods.count_to_prune(0.5, 5, "x") == 2 and methods.count_to_prune(0.5, 7, "x") == 4
