"""Every differentiable primitive: reverse mode against central finite differences in float64 (check_grads).

One test case per op (the ops of one family share a parametrized test), each one line of checking. Hypothesis
draws the shapes (broadcasting included) and a seed for the values; values are kept away from the points where an
op is not differentiable (|x| near 0 for abs and relu, ties for max and maximum, the bounds of clip), since a finite
difference straddling a kink measures neither side.
"""

import numpy as np
import pytest
from conv_strategies import conv_cases, pool_cases
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, basic_indices, mutually_broadcastable_shapes

import nanoopt as no
from nanoopt import ops
from nanoopt.gradcheck import check_grads
from nanoopt.nn import functional as F

FEW = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
shapes = array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)
pairs = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, min_side=1, max_side=4)
triples = mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, min_side=1, max_side=4)
# a finite difference costs a forward per input element: smaller geometries than test_conv_pool.py's
small_convolutions = conv_cases(max_kernel=3, max_stride=2, max_dilation=2, max_in_per_group=2, max_extra=4,
                                max_batch=2)
small_pools = pool_cases(max_kernel=3, max_stride=3, max_size=6, max_batch=2)


def normal(seed, *shape_list):
    """Standard-normal float64 arrays, one per shape, from one seed."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in shape_list]


def away_from_zero(x, margin=0.1):
    """Push every value at least ``margin`` away from 0, keeping its sign."""
    return np.where(x >= 0, 1.0, -1.0) * (np.abs(x) + margin)


def distinct(seed, shape):
    """Values in random order, pairwise at least 0.1 apart (no ties for max)."""
    size = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    return (rng.permutation(size) * 0.1 - 0.05 * size + rng.uniform(0, 0.01, size)).reshape(shape)


@st.composite
def axes_for(draw, shape):
    """None, one axis (maybe negative) or a tuple of distinct axes of ``shape``."""
    ndim = len(shape)
    if ndim == 0:
        return None
    kind = draw(st.sampled_from(["none", "one", "many"]))
    if kind == "none":
        return None
    if kind == "one":
        return draw(st.integers(-ndim, ndim - 1))
    return tuple(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)))


# ===================================================================== elementwise arithmetic (broadcasting)
@pytest.mark.parametrize("op, divisor", [(ops.add, False), (ops.sub, False), (ops.mul, False), (ops.div, True)],
                         ids=["add", "sub", "mul", "div"])
@FEW
@given(pairs, seeds)
def test_add_sub_mul_div(op, divisor, s, seed):
    a, b = normal(seed, *s.input_shapes)
    check_grads(op, [a, away_from_zero(b, 0.5) if divisor else b])


@FEW
@given(pairs, seeds)
def test_pow_tensor_exponent(s, seed):
    base, exponent = normal(seed, *s.input_shapes)
    check_grads(ops.pow, [np.abs(base) + 0.5, exponent])


@FEW
@given(shapes, seeds, st.sampled_from([2, 3, 0.5, 2.5, -1.5]))
def test_pow_scalar_exponent(shape, seed, exponent):
    (x,) = normal(seed, shape)
    x = x if isinstance(exponent, int) else np.abs(x) + 0.5
    check_grads(lambda a: a**exponent, [x])


@FEW
@given(shapes, seeds)
def test_pow_scalar_base(shape, seed):
    check_grads(lambda a: 2.0**a, normal(seed, shape))


@FEW
@given(pairs, seeds)
def test_maximum(s, seed):
    a, b = normal(seed, *s.input_shapes)
    assume(np.all(np.abs(a - b) > 1e-3))
    check_grads(ops.maximum, [a, b])


@FEW
@given(triples, seeds)
def test_where(s, seed):
    condition_shape, a_shape, b_shape = s.input_shapes
    condition = np.random.default_rng(seed + 1).random(condition_shape) < 0.5
    check_grads(lambda a, b: ops.where(condition, a, b), normal(seed, a_shape, b_shape))


def test_ties_share_the_gradient_equally_and_kinks_take_subgradient_zero():
    a, b = no.Tensor([1.0, 2.0], requires_grad=True), no.Tensor([1.0, 3.0], requires_grad=True)
    ops.maximum(a, b).sum().backward()
    assert a.grad.tolist() == [0.5, 0.0] and b.grad.tolist() == [0.5, 1.0]
    z = no.Tensor([[2.0, 2.0, 1.0], [0.0, 4.0, 4.0]], requires_grad=True)
    z.max(axis=1).sum().backward()
    assert z.grad.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
    x = no.Tensor([0.0, 0.0], requires_grad=True)
    (ops.relu(x) + ops.abs(x)).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0]


# ===================================================================== elementwise functions
# each op with how its standard-normal inputs are moved off its poles and kinks (and out of sigmoid's flat tails)
ELEMENTWISE = {
    "neg": (ops.neg, lambda x: x),
    "exp": (ops.exp, lambda x: x),
    "log": (ops.log, lambda x: np.abs(x) + 0.1),
    "sqrt": (ops.sqrt, lambda x: np.abs(x) + 0.1),
    "abs": (ops.abs, away_from_zero),
    "tanh": (ops.tanh, lambda x: x),
    "sigmoid": (ops.sigmoid, lambda x: 3 * x),
    "relu": (ops.relu, away_from_zero),
}


@pytest.mark.parametrize("name", ELEMENTWISE)
@FEW
@given(shapes, seeds)
def test_elementwise(name, shape, seed):
    op, inputs = ELEMENTWISE[name]
    check_grads(op, [inputs(x) for x in normal(seed, shape)])


@FEW
@given(shapes, seeds, st.sampled_from([(-0.5, 0.5), (None, 0.3), (-0.2, None)]))
def test_clip(shape, seed, bounds):
    (x,) = normal(seed, shape)
    for bound in bounds:  # keep every value at least 0.05 from either bound
        if bound is not None:
            x = np.where(np.abs(x - bound) < 0.05, bound + 0.1 * np.sign(x - bound + 1e-12), x)
    check_grads(lambda a: ops.clip(a, *bounds), [x])


@FEW
@given(shapes, seeds, st.sampled_from(["none", "tanh"]))
def test_gelu(shape, seed, approximate):
    check_grads(lambda a: ops.gelu(a, approximate), [2 * x for x in normal(seed, shape)])


# ===================================================================== reductions
@pytest.mark.parametrize("op, values", [(ops.sum, normal), (ops.mean, normal),
                                        (ops.max, lambda seed, shape: [distinct(seed, shape)])],  # max: no ties
                         ids=["sum", "mean", "max"])
@FEW
@given(st.data(), shapes, seeds, st.booleans())
def test_sum_mean_max(op, values, data, shape, seed, keepdims):
    axis = data.draw(axes_for(shape))
    check_grads(lambda a: op(a, axis=axis, keepdims=keepdims), values(seed, shape))


@FEW
@given(st.data(), shapes, seeds, st.booleans(), st.booleans())
def test_var(data, shape, seed, keepdims, unbiased):
    axis = data.draw(axes_for(shape))
    count = int(np.prod(shape)) if axis is None else int(np.prod([shape[a] for a in np.atleast_1d(axis)]))
    assume(not unbiased or count > 1)
    check_grads(lambda a: a.var(axis=axis, keepdims=keepdims, unbiased=unbiased), normal(seed, shape))


# ===================================================================== shape and indexing
@FEW
@given(st.data(), shapes, seeds)
def test_reshape(data, shape, seed):
    target = list(data.draw(st.permutations(shape)))
    if target and data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    check_grads(lambda a: a.reshape(target), normal(seed, shape))


@FEW
@given(st.data(), shapes, seeds)
def test_transpose_and_permute(data, shape, seed):
    axes = data.draw(st.permutations(range(len(shape))))
    check_grads(lambda a: a.permute(*axes), normal(seed, shape))
    check_grads(lambda a: a.T, normal(seed, shape))


@FEW
@given(st.data(), array_shapes(min_dims=1, max_dims=4, max_side=5), seeds)
def test_getitem_basic(data, shape, seed):
    index = data.draw(basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    check_grads(lambda a: a[index], normal(seed, shape))


@FEW
@given(st.data(), array_shapes(min_dims=1, max_dims=3, max_side=4), seeds)
def test_getitem_advanced_with_repeated_indices(data, shape, seed):
    rows = data.draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=1, max_size=8))
    index = np.array(rows)
    if len(shape) > 1 and data.draw(st.booleans()):  # two broadcast integer arrays, or an array and a slice
        columns = np.array(data.draw(st.lists(st.integers(0, shape[1] - 1), min_size=len(rows), max_size=len(rows))))
        index = (index, columns) if data.draw(st.booleans()) else (slice(None), columns)
    check_grads(lambda a: a[index], normal(seed, shape))


def test_getitem_repeated_index_accumulates():
    x = no.Tensor(np.arange(3.0), requires_grad=True)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0])


@FEW
@given(array_shapes(min_dims=1, max_dims=3, max_side=4), seeds)
def test_getitem_boolean_mask(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    check_grads(lambda a: a[mask], normal(seed, shape))


@FEW
@given(st.data(), array_shapes(min_dims=1, max_dims=3, max_side=4), seeds)
def test_concatenate(data, shape, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    parts = [shape[:axis % len(shape)] + (n,) + shape[axis % len(shape) + 1:] for n in sizes]
    check_grads(lambda *xs: ops.concatenate(xs, axis=axis), normal(seed, *parts))


@FEW
@given(st.data(), array_shapes(min_dims=0, max_dims=3, max_side=4), seeds, st.integers(1, 4))
def test_stack(data, shape, seed, count):
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    check_grads(lambda *xs: ops.stack(xs, axis=axis), normal(seed, *[shape] * count))


@FEW
@given(array_shapes(min_dims=2, max_dims=4, max_side=4), st.lists(st.integers(0, 2), min_size=4, max_size=4), seeds)
def test_pad2d(shape, padding, seed):
    check_grads(lambda a: ops.pad2d(a, padding, value=1.5), normal(seed, shape))


# ===================================================================== linear algebra
@st.composite
def matmul_shapes(draw):
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    batch_a, batch_b = draw(mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3)).input_shapes
    kind = draw(st.sampled_from(["batched", "vector @ matrix", "matrix @ vector", "vector @ vector"]))
    if kind == "batched":
        return batch_a + (m, k), batch_b + (k, n)
    if kind == "vector @ matrix":
        return (k,), batch_b + (k, n)
    if kind == "matrix @ vector":
        return batch_a + (m, k), (k,)
    return (k,), (k,)


@FEW
@given(matmul_shapes(), seeds)
def test_matmul(shapes_ab, seed):
    check_grads(ops.matmul, normal(seed, *shapes_ab))


@FEW
@given(array_shapes(min_dims=1, max_dims=3, max_side=4), st.integers(1, 4), st.booleans(), seeds)
def test_linear(shape, out_features, bias, seed):
    x, w, b = normal(seed, shape, (out_features, shape[-1]), (out_features,))
    if bias:
        check_grads(F.linear, [x, w, b])
    else:
        check_grads(F.linear, [x, w])


# ===================================================================== softmax family and losses
@FEW
@given(st.data(), array_shapes(min_dims=1, max_dims=3, max_side=5), seeds)
def test_softmax(data, shape, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_grads(lambda a: ops.softmax(a, axis=axis), [3 * x for x in normal(seed, shape)])


@FEW
@given(st.data(), array_shapes(min_dims=1, max_dims=3, max_side=5), seeds)
def test_log_softmax(data, shape, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_grads(lambda a: ops.log_softmax(a, axis=axis), [3 * x for x in normal(seed, shape)])


@FEW
@given(st.integers(1, 5), st.integers(2, 5), seeds, st.sampled_from([0.0, 0.1, 0.5]),
       st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_with_indices(n, classes, seed, smoothing, reduction):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    check_grads(lambda z: F.cross_entropy(z, labels, label_smoothing=smoothing, reduction=reduction),
                normal(seed, (n, classes)))


@FEW
@given(st.integers(1, 5), st.integers(2, 5), seeds, st.sampled_from([0.0, 0.2]),
       st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_with_probabilities(n, classes, seed, smoothing, reduction):
    logits, raw = normal(seed, (n, classes), (n, classes))
    probabilities = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    check_grads(lambda z, p: F.cross_entropy(z, p, label_smoothing=smoothing, reduction=reduction),
                [logits, probabilities])


@FEW
@given(st.integers(1, 5), st.integers(2, 5), seeds)
def test_nll_loss(n, classes, seed):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    check_grads(lambda z: F.nll_loss(z, labels), normal(seed, (n, classes)))


@FEW
@given(shapes, seeds, st.sampled_from(["mean", "sum", "none"]))
def test_mse_loss(shape, seed, reduction):
    check_grads(lambda a, b: F.mse_loss(a, b, reduction=reduction), normal(seed, shape, shape))


@FEW
@given(array_shapes(min_dims=2, max_dims=3, max_side=4), seeds, st.sampled_from(["batchmean", "sum", "mean", "none"]),
       st.booleans())
def test_kl_div(shape, seed, reduction, log_target):
    raw_q, raw_p = normal(seed, shape, shape)
    log_q = raw_q - np.log(np.exp(raw_q).sum(axis=-1, keepdims=True))
    log_p = raw_p - np.log(np.exp(raw_p).sum(axis=-1, keepdims=True))
    target = log_p if log_target else np.exp(log_p)
    check_grads(lambda q, p: F.kl_div(q, p, reduction=reduction, log_target=log_target), [log_q, target])


@FEW
@given(shapes, seeds, st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_dropout_with_a_fixed_mask(shape, seed, p):
    def dropped(a):
        no.manual_seed(seed)
        return F.dropout(a, p, training=True)

    check_grads(dropped, normal(seed, shape))


# ===================================================================== normalisation
@FEW
@given(st.integers(2, 4), st.integers(1, 3), st.sampled_from([(), (3,), (2, 3)]), seeds)
def test_batch_norm_train(n, channels, spatial, seed):
    x, weight, bias = normal(seed, (n, channels, *spatial), (channels,), (channels,))
    check_grads(lambda a, w, b: F.batch_norm(a, None, None, w, b, training=True), [x, weight, bias])


@FEW
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([(), (3,), (2, 3)]), seeds)
def test_batch_norm_eval(n, channels, spatial, seed):
    x, weight, bias, running_mean, raw_var = normal(seed, (n, channels, *spatial), (channels,), (channels,),
                                                    (channels,), (channels,))
    running_var = np.abs(raw_var) + 0.5
    check_grads(lambda a, w, b: F.batch_norm(a, running_mean, running_var, w, b, training=False),
                [x, weight, bias])


@FEW
@given(array_shapes(min_dims=1, max_dims=2, max_side=3), array_shapes(min_dims=0, max_dims=2, max_side=3), seeds)
def test_layer_norm(normalized, batch, seed):
    assume(int(np.prod(normalized)) > 1)
    x, weight, bias = normal(seed, batch + normalized, normalized, normalized)
    check_grads(lambda a, w, b: F.layer_norm(a, normalized, w, b), [x, weight, bias])


# ===================================================================== convolution and pooling
@FEW
@given(small_convolutions, seeds)
def test_conv2d(case, seed):
    x_shape, weight_shape, bias, options = case
    x, weight, b = normal(seed, x_shape, weight_shape, weight_shape[:1])
    if bias:
        check_grads(lambda a, w, c: F.conv2d(a, w, c, **options), [x, weight, b])
    else:
        check_grads(lambda a, w: F.conv2d(a, w, None, **options), [x, weight])


@FEW
@given(small_pools, seeds)
def test_max_pool2d(case, seed):
    shape, kernel, stride, padding = case
    check_grads(lambda a: F.max_pool2d(a, kernel, stride, padding), [distinct(seed, shape)])


@FEW
@given(small_pools, seeds)
def test_avg_pool2d(case, seed):
    shape, kernel, stride, padding = case
    check_grads(lambda a: F.avg_pool2d(a, kernel, stride, padding), normal(seed, shape))


@FEW
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), seeds)
def test_adaptive_avg_pool2d_divisible(out_h, out_w, factor_h, factor_w, seed):
    shape = (2, 2, out_h * factor_h, out_w * factor_w)
    check_grads(lambda a: F.adaptive_avg_pool2d(a, (out_h, out_w)), normal(seed, shape))


@FEW
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 5), st.integers(1, 5), seeds)
def test_adaptive_avg_pool2d_any_size(h, w, out_h, out_w, seed):
    check_grads(lambda a: F.adaptive_avg_pool2d(a, (out_h, out_w)), normal(seed, (1, 2, h, w)))


# ===================================================================== the checker itself can fail
def test_check_grads_catches_a_wrong_backward():
    with pytest.raises(AssertionError, match="input 0"):
        check_grads(lambda a: a * a.detach(), normal(0, (3, 2)))


def test_check_grads_names_the_wrong_input():
    with pytest.raises(AssertionError, match=r"input 1 \(shape \(2,\)\)"):
        check_grads(lambda a, b: a * b + b.detach() * b, normal(0, (2,), (2,)))
