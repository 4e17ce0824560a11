"""Losses and activations against NumPy transcriptions of their definitions, and their refusals of bad input.

cross_entropy(z, t) = -(1/N) sum_n sum_c q_nc log softmax(z_n)_c with q = (1 - eps) onehot(t) + eps / C (indices)
or q = (1 - eps) t + eps / C (probabilities); mse_loss = mean((a - b)^2) with equal shapes only;
kl_div(log q, p) = sum p (log p - log q) / N ("batchmean"), 0 log 0 = 0.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from scipy import special

import nanoopt as no
from nanoopt.nn import functional as F

FEW = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def log_softmax_reference(z):
    return z - special.logsumexp(z, axis=-1, keepdims=True)


def reduce(per_sample, reduction):
    return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]


# ===================================================================== cross-entropy
@FEW
@given(st.integers(1, 6), st.integers(2, 6), seeds, st.floats(0.0, 1.0), st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_with_indices_matches_the_definition(n, classes, seed, smoothing, reduction):
    rng = np.random.default_rng(seed)
    logits, labels = rng.standard_normal((n, classes)) * 3, rng.integers(0, classes, n)
    target = (1 - smoothing) * np.eye(classes)[labels] + smoothing / classes
    expected = reduce(-(target * log_softmax_reference(logits)).sum(axis=1), reduction)
    out = F.cross_entropy(no.Tensor(logits), labels, label_smoothing=smoothing, reduction=reduction)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-12)


@FEW
@given(st.integers(1, 6), st.integers(2, 6), seeds, st.floats(0.0, 1.0))
def test_cross_entropy_with_probabilities_matches_the_definition(n, classes, seed, smoothing):
    rng = np.random.default_rng(seed)
    logits, probabilities = rng.standard_normal((n, classes)), special.softmax(rng.standard_normal((n, classes)), 1)
    target = (1 - smoothing) * probabilities + smoothing / classes
    expected = -(target * log_softmax_reference(logits)).sum(axis=1).mean()
    out = F.cross_entropy(no.Tensor(logits), no.Tensor(probabilities), label_smoothing=smoothing)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12)
    one_hot = np.eye(classes)[rng.integers(0, classes, n)]  # one-hot probabilities == the indices
    np.testing.assert_allclose(F.cross_entropy(no.Tensor(logits), one_hot).data,
                               F.cross_entropy(no.Tensor(logits), one_hot.argmax(1)).data, rtol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = no.Tensor(np.array([[1000.0, 0.0, -1000.0]]), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([1]))
    loss.backward()
    assert np.isclose(loss.item(), 1000.0) and np.all(np.isfinite(logits.grad))


def test_cross_entropy_accepts_integral_floats_as_indices():
    logits = no.Tensor(np.zeros((2, 3)))
    assert F.cross_entropy(logits, np.array([0.0, 2.0])).item() == pytest.approx(np.log(3))


@pytest.mark.parametrize("target, error, message", [
    (np.array([0, 3]), ValueError, r"class indices must be in \[0, 2\], got range \[0, 3\]"),
    (np.array([-1, 0]), ValueError, r"class indices must be in \[0, 2\], got range \[-1, 0\]"),
    (np.array([0, 1, 2]), ValueError, r"expected 2 class indices for logits \(2, 3\), got shape \(3,\)"),
    (np.array([[0], [1]]), ValueError, r"probability targets must have the logits' shape \(2, 3\), got \(2, 1\)"),
    (no.Tensor(np.ones((3, 3)) / 3), ValueError, r"probability targets must have the logits' shape"),
    (np.array([0.5, 1.0]), TypeError, "class indices must be integers, got dtype float64"),
    (np.array([True, False]), TypeError, "class indices must be integers, got dtype bool"),
])
def test_cross_entropy_refuses_bad_targets(target, error, message):
    with pytest.raises(error, match=message):
        F.cross_entropy(no.Tensor(np.zeros((2, 3))), target)


@pytest.mark.parametrize("smoothing", [-0.1, 1.01, 2.0])
def test_cross_entropy_refuses_label_smoothing_outside_zero_one(smoothing):
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 1\], got {smoothing}"):
        F.cross_entropy(no.Tensor(np.zeros((2, 3))), np.array([0, 1]), label_smoothing=smoothing)


def test_cross_entropy_refuses_non_2d_logits_and_unknown_reductions():
    with pytest.raises(ValueError, match=r"expected a 2-D input of logits \(N, C\), got shape \(2, 3, 4\)"):
        F.cross_entropy(no.Tensor(np.zeros((2, 3, 4))), np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        F.cross_entropy(no.Tensor(np.zeros((2, 3))), np.array([0, 1]), reduction="avg")


@FEW
@given(st.integers(1, 6), st.integers(2, 6), seeds)
def test_nll_of_log_softmax_is_cross_entropy(n, classes, seed):
    rng = np.random.default_rng(seed)
    logits, labels = no.Tensor(rng.standard_normal((n, classes))), rng.integers(0, classes, n)
    np.testing.assert_allclose(F.nll_loss(F.log_softmax(logits), labels).data,
                               F.cross_entropy(logits, labels).data, rtol=1e-12)


# ===================================================================== mse and kl
@FEW
@given(array_shapes(min_dims=0, max_dims=3, max_side=4), seeds)
def test_mse_loss_matches_the_definition(shape, seed):
    a, b = np.random.default_rng(seed).standard_normal((2, *shape))
    np.testing.assert_allclose(F.mse_loss(no.Tensor(a), no.Tensor(b)).data, np.mean((a - b) ** 2), rtol=1e-12)
    np.testing.assert_allclose(F.mse_loss(no.Tensor(a), no.Tensor(b), reduction="none").data, (a - b) ** 2)


@pytest.mark.parametrize("prediction, target", [((4, 1), (4,)), ((3,), (1,)), ((2, 3), (3, 2)), ((1,), ())])
def test_mse_loss_refuses_shapes_that_would_broadcast(prediction, target):
    with pytest.raises(ValueError, match=rf"prediction shape \({prediction[0]},.*differs from target shape"):
        F.mse_loss(no.Tensor(np.zeros(prediction)), no.Tensor(np.zeros(target)))


@FEW
@given(st.integers(1, 5), st.integers(2, 5), seeds, st.sampled_from(["batchmean", "sum", "mean", "none"]))
def test_kl_div_matches_the_definition(n, classes, seed, reduction):
    rng = np.random.default_rng(seed)
    log_q = log_softmax_reference(rng.standard_normal((n, classes)))
    p = special.softmax(rng.standard_normal((n, classes)), axis=1)
    p[:, 0] = 0.0  # zero-probability entries contribute 0 (0 log 0 = 0)
    pointwise = special.xlogy(p, p) - p * log_q
    expected = {"batchmean": pointwise.sum() / n, "sum": pointwise.sum(), "mean": pointwise.mean(),
                "none": pointwise}[reduction]
    out = F.kl_div(no.Tensor(log_q), no.Tensor(p), reduction=reduction)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-15)
    positive = p[:, 1:]  # log_target: exp(log p) (log p - log q); log 0 = -inf would give 0 * inf, as in PyTorch
    as_log_target = F.kl_div(no.Tensor(log_q[:, 1:]), no.Tensor(np.log(positive)), reduction="none", log_target=True)
    np.testing.assert_allclose(as_log_target.data, pointwise[:, 1:], rtol=1e-12, atol=1e-15)


def test_kl_div_of_a_distribution_with_itself_is_zero_and_shapes_must_match():
    p = special.softmax(np.random.default_rng(0).standard_normal((3, 4)), axis=1)
    assert abs(F.kl_div(no.Tensor(np.log(p)), no.Tensor(p)).item()) < 1e-15
    with pytest.raises(ValueError, match=r"input shape \(3, 4\) differs from target shape \(4,\)"):
        F.kl_div(no.Tensor(np.log(p)), no.Tensor(p[0]))
    with pytest.raises(ValueError, match="reduction must be"):
        F.kl_div(no.Tensor(np.log(p)), no.Tensor(p), reduction="avg")


# ===================================================================== activations and dropout
@FEW
@given(array_shapes(min_dims=1, max_dims=3, max_side=5), seeds)
def test_softmax_and_log_softmax_are_stable_and_consistent(shape, seed):
    z = np.random.default_rng(seed).standard_normal(shape) * 500  # exp would overflow without the max shift
    probabilities = F.softmax(no.Tensor(z)).data
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(F.log_softmax(no.Tensor(z)).data, log_softmax_reference(z), rtol=1e-12, atol=1e-9)


def test_gelu_forms_match_their_formulas():
    x = np.linspace(-6, 6, 101)
    exact = x * 0.5 * (1 + special.erf(x / np.sqrt(2)))
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(F.gelu(no.Tensor(x)).data, exact, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(F.gelu(no.Tensor(x), "tanh").data, tanh_form, rtol=1e-12, atol=1e-15)
    assert np.abs(tanh_form - exact).max() < 1e-3
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        F.gelu(no.Tensor(x), "erf")


def test_dropout_edge_probabilities_and_refusals():
    x = no.Tensor(np.ones((3, 3)), requires_grad=True)
    assert F.dropout(x, 0.0) is x and F.dropout(x, 0.7, training=False) is x
    dropped = F.dropout(x, 1.0)
    assert not np.any(dropped.data)
    dropped.sum().backward()
    assert not np.any(x.grad)
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError, match=rf"dropout probability must be in \[0, 1\], got {p}"):
            F.dropout(x, p)


def test_dropout_mask_is_reproducible_under_manual_seed():
    x = no.Tensor(np.ones((10, 10)))
    no.manual_seed(3)
    first = F.dropout(x, 0.5).data
    no.manual_seed(3)
    np.testing.assert_array_equal(first, F.dropout(x, 0.5).data)


def test_functional_shape_refusals():
    with pytest.raises(ValueError, match=r"linear: expected input \(\.\.\., 3\), got shape \(2, 4\)"):
        F.linear(no.Tensor(np.zeros((2, 4))), no.Tensor(np.zeros((5, 3))))
    with pytest.raises(ValueError, match=r"layer_norm: expected input \(\.\.\., 2, 3\), got shape \(4, 3, 2\)"):
        F.layer_norm(no.Tensor(np.zeros((4, 3, 2))), (2, 3), np.ones((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"batch_norm: expected a 2-D, 3-D or 4-D input"):
        F.batch_norm(no.Tensor(np.zeros(3)), None, None, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"nll_loss: expected log-probs \(N, C\) and targets \(N,\)"):
        F.nll_loss(no.Tensor(np.zeros((2, 3))), np.array([0, 1, 2]))
