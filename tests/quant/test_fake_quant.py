"""Properties of the differentiable quantizers (nanoopt.quant.fake_quant).

* fake_quantize: the forward is bit-identical to spec.dequantize(spec.quantize(x)); the gradient is the
  straight-through mask written out element by element from its definition.
* LSQ and PACT: reverse-mode gradients against central finite differences of the straight-through surrogate
  (rounding replaced by a constant offset taken at the evaluation point -- which is what "straight through"
  means), at points away from the clipping and rounding boundaries; and against finite differences of the real
  forward where it is differentiable (saturated entries).
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoopt.quant.fake_quant import (
    fake_quantize,
    lsq_grad_scale,
    lsq_initial_scale,
    lsq_quantize,
    pact_qparams,
    pact_quantize,
    straight_through_mask,
)
from nanoopt.spec import QuantSpec, dequantize, quantize
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=50, deadline=None)


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def grids(draw, per_channel=None):
    """(x float32, scale, zero_point, spec), per tensor or per channel, with points on and between grid steps."""
    spec_kwargs = dict(bits=draw(st.integers(2, 16)), signed=draw(st.booleans()), narrow_range=draw(st.booleans()))
    per_channel = draw(st.booleans()) if per_channel is None else per_channel
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    spec = QuantSpec(**spec_kwargs, per_channel=per_channel, axis=axis)
    count = shape[axis] if per_channel else 1
    scale = np.asarray(draw(st.lists(st.floats(2.0**-10, 10.0, width=32), min_size=count, max_size=count)), np.float32)
    zero = np.asarray(draw(st.lists(st.integers(spec.qmin, spec.qmax), min_size=count, max_size=count)), np.int32)
    if not per_channel:
        scale, zero = scale.reshape(()), zero.reshape(())
    # values as (steps + offset) * scale with offsets hitting exact halves and the saturation edges
    steps = draw(hnp.arrays(np.float32, shape, elements=st.one_of(
        st.floats(-2.0**spec.bits, 2.0**spec.bits, width=32),
        st.integers(spec.qmin - 2, spec.qmax + 2).map(float),
        st.integers(spec.qmin - 2, spec.qmax + 2).map(lambda k: k + 0.5),
    )))
    channel_shape = [1] * len(shape)
    if per_channel:
        channel_shape[axis] = -1
    x = (steps - zero.reshape(channel_shape)).astype(np.float32) * scale.reshape(channel_shape)
    return x.astype(np.float32), scale, zero, spec


def mask_by_definition(x, scale, zero, spec):
    """qmin <= rint(float32(x) / float32(scale)) + zero_point <= qmax, one element at a time."""
    shape = [1] * x.ndim
    if spec.per_channel:
        shape[spec.axis % x.ndim] = -1
    scale_b = np.broadcast_to(scale.reshape(shape), x.shape)
    zero_b = np.broadcast_to(zero.reshape(shape), x.shape)
    mask = np.zeros(x.shape, bool)
    for index in np.ndindex(x.shape):
        code = int(np.rint(np.float32(x[index]) / np.float32(scale_b[index]))) + int(zero_b[index])
        mask[index] = spec.qmin <= code <= spec.qmax
    return mask


# ------------------------------------------------------------------------------------------------ fake_quantize
@SETTINGS
@given(grids())
def test_fake_quantize_forward_is_bit_identical_to_quantize_dequantize(grid):
    x, scale, zero, spec = grid
    y = fake_quantize(Tensor(x), scale, zero, spec)
    expected = dequantize(quantize(x, scale, zero, spec), scale, zero, spec)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(y.data.view(np.uint32), expected.view(np.uint32))


@SETTINGS
@given(grids(), st.integers(0, 2**31 - 1))
def test_fake_quantize_gradient_is_the_straight_through_mask(grid, seed):
    x, scale, zero, spec = grid
    cotangent = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    leaf = Tensor(x, requires_grad=True)
    (fake_quantize(leaf, scale, zero, spec) * Tensor(cotangent)).sum().backward()
    mask = mask_by_definition(x, scale, zero, spec)
    assert np.array_equal(leaf.grad, cotangent * mask)
    assert np.array_equal(straight_through_mask(x, scale, zero, spec), mask)


def test_straight_through_mask_edges_follow_pytorch():
    """rint(x / s) + z at exactly qmin/qmax is inside; half a step beyond rounds away (half to even) or not."""
    spec = QuantSpec(bits=4)  # -8..7
    x = np.array([-8.5, -8.49, -8.51, 7.5, 7.49, 6.5, 8.5], np.float32)
    # rint: -8 (even), -8, -9, 8 (even), 7, 6 (even), 8
    assert straight_through_mask(x, 1.0, 0, spec).tolist() == [True, True, False, False, True, True, False]


def test_fake_quantize_float64_input_rounds_through_float32():
    x = np.array([0.1, 0.2, 1e-9, 0.3], np.float64)
    spec = QuantSpec(bits=8, symmetric=True)
    y = fake_quantize(Tensor(x, requires_grad=True), 0.01, 0, spec)
    assert y.dtype == np.float64
    assert np.array_equal(y.data, dequantize(quantize(x, 0.01, 0, spec), 0.01, 0, spec).astype(np.float64))


def test_fake_quantize_accepts_ndarrays_and_records_no_graph_without_grad():
    y = fake_quantize(np.array([0.26], np.float32), 0.5, 0, QuantSpec())
    assert y.data.tolist() == [0.5] and not y.requires_grad


@pytest.mark.parametrize("call, error, message", [
    (lambda: fake_quantize([1.0], 0.5, 0, QuantSpec()), TypeError, "Tensor or an ndarray"),
    (lambda: fake_quantize(np.ones(2, np.float32), 0.5, 0, "int8"), TypeError, "QuantSpec"),
    (lambda: fake_quantize(np.ones(2, np.float32), -0.5, 0, QuantSpec()), ValueError, "scale"),
    (lambda: fake_quantize(np.ones(2, np.float32), 0.5, 0.0, QuantSpec()), TypeError, "zero_point"),
    (lambda: fake_quantize(np.ones(2, np.float32), 0.5, 300, QuantSpec()), ValueError, "zero_point"),
    (lambda: fake_quantize(np.array([np.nan], np.float32), 0.5, 0, QuantSpec()), ValueError, "NaN"),
    (lambda: fake_quantize(np.ones((2, 3), np.float32), np.ones(3, np.float32), np.zeros(3, np.int32),
                           QuantSpec(per_channel=True, axis=0)), ValueError, "shape"),
])
def test_fake_quantize_refuses_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------------ LSQ
def lsq_surrogate(x, scale, zero, spec, offset):
    """x_hat = s * (clip(x / s, -Q_N, Q_P) + offset): LSQ's forward with rounding frozen at the base point."""
    shape = [1] * x.ndim
    if spec.per_channel:
        shape[spec.axis % x.ndim] = -1
    s = np.asarray(scale, np.float64).reshape(shape)
    z = np.asarray(zero, np.float64).reshape(shape)
    return s * (np.clip(x / s, spec.qmin - z, spec.qmax - z) + offset)


@st.composite
def lsq_points(draw):
    """A grid and an x whose steps v = x / s keep >= 0.05 from every clipping edge and rounding half-point."""
    x, scale, zero, spec = draw(grids())
    assume(spec.bits <= 12)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    shape = [1] * x.ndim
    if spec.per_channel:
        shape[spec.axis % x.ndim] = -1
    low = (spec.qmin - zero.astype(np.float64)).reshape(shape)
    high = (spec.qmax - zero.astype(np.float64)).reshape(shape)
    span = high - low
    v = np.floor(low - 3 + (span + 6) * rng.random(x.shape))  # a little beyond both edges, too
    v = v + rng.uniform(0.1, 0.4, x.shape) + 0.5 * (rng.random(x.shape) < 0.5)  # >= 0.1 from k and k + 1/2
    x64 = v * scale.astype(np.float64).reshape(shape)
    return x64.astype(np.float32).astype(np.float64), scale, zero, spec


@SETTINGS
@given(lsq_points(), st.integers(0, 2**31 - 1))
def test_lsq_gradients_match_finite_differences_of_the_straight_through_surrogate(point, seed):
    x, scale, zero, spec = point
    rng = np.random.default_rng(seed)
    cotangent = rng.standard_normal(x.shape)
    x_leaf = Tensor(x.astype(np.float32), requires_grad=True)
    step = Tensor(scale.copy(), requires_grad=True)
    (lsq_quantize(x_leaf, step, zero, spec) * Tensor(cotangent.astype(np.float32))).sum().backward()

    s64 = scale.astype(np.float64)
    shape = [1] * x.ndim
    if spec.per_channel:
        shape[spec.axis % x.ndim] = -1
    clipped = np.clip(x / s64.reshape(shape), spec.qmin - zero.reshape(shape), spec.qmax - zero.reshape(shape))
    offset = np.rint(clipped) - clipped  # frozen rounding (0 where clipped to an integer edge)

    def objective(x_value, scale_value):
        return float((lsq_surrogate(x_value, scale_value, zero, spec, offset) * cotangent).sum())

    # the surrogate is linear on each side of the clipping edges, and the steps below move v by < 0.02
    eps = 1e-6
    direction_x = rng.uniform(-1, 1, x.shape) * s64.reshape(shape)
    numeric_x = (objective(x + eps * direction_x, s64) - objective(x - eps * direction_x, s64)) / (2 * eps)
    analytic_x = float((x_leaf.grad * direction_x).sum())
    size_x = float(np.abs(cotangent * direction_x).sum())
    assert math.isclose(analytic_x, numeric_x, rel_tol=1e-4, abs_tol=1e-5 * size_x)

    direction_s = rng.uniform(-1, 1, s64.shape) * s64
    numeric_s = (objective(x, s64 + eps * direction_s) - objective(x, s64 - eps * direction_s)) / (2 * eps)
    analytic_s = float((step.grad * direction_s).sum())
    size_s = float((np.abs(cotangent) * (np.abs(x / s64.reshape(shape)) + 1)).sum() * np.abs(direction_s).max())
    assert math.isclose(analytic_s, numeric_s, rel_tol=1e-4, abs_tol=1e-5 * size_s)


def test_lsq_gradient_formulas_of_the_paper_and_the_grad_scale():
    spec = QuantSpec(bits=3, symmetric=True)  # -Q_N = -4, Q_P = 3
    x = Tensor(np.array([-9.0, -0.7, 0.4, 1.3, 2.0, 9.0], np.float32), requires_grad=True)
    step = Tensor(np.float32(0.5), requires_grad=True)
    lsq_quantize(x, step, 0, spec, grad_scale=0.25).sum().backward()
    v = np.array([-18.0, -1.4, 0.8, 2.6, 4.0, 18.0])
    per_element = np.where(v <= -4, -4, np.where(v >= 3, 3, np.rint(v) - v))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert float(step.grad) == pytest.approx(0.25 * per_element.sum(), rel=1e-6)


def test_lsq_step_gradient_on_saturated_entries_is_the_real_derivative():
    """Where every entry saturates, x_hat = Q_P s or -Q_N s exactly: the finite difference of the real forward."""
    spec = QuantSpec(bits=4, symmetric=True, narrow_range=True)  # [-7, 7]
    x = np.array([-50.0, 40.0, 33.0], np.float32)
    step = Tensor(np.float32(1.0), requires_grad=True)
    lsq_quantize(Tensor(x), step, 0, spec).sum().backward()
    eps = 1e-3
    real = [dequantize(quantize(x, s, 0, spec), s, 0, spec).astype(np.float64).sum() for s in (1 + eps, 1 - eps)]
    assert float(step.grad) == pytest.approx((real[0] - real[1]) / (2 * eps), rel=1e-4)


def test_lsq_per_channel_sums_the_step_gradient_per_channel():
    spec = QuantSpec(bits=4, symmetric=True, per_channel=True, axis=1)
    x = np.array([[0.3, 100.0], [0.3, -100.0]], np.float32)
    step = Tensor(np.array([0.25, 1.0], np.float32), requires_grad=True)
    lsq_quantize(Tensor(x), step, np.zeros(2, np.int32), spec).sum().backward()
    assert step.grad.shape == (2,)
    assert step.grad[0] == pytest.approx(2 * (1 - 1.2), rel=1e-5)  # rint(1.2) - 1.2, twice
    assert step.grad[1] == pytest.approx(7 - 8)  # Q_P + (-Q_N)


def test_lsq_grad_scale_and_initial_scale():
    spec = QuantSpec(bits=2, symmetric=True, narrow_range=True)  # Q_P = 1
    assert lsq_grad_scale(400, spec) == pytest.approx(1 / 20)
    assert lsq_grad_scale(100, QuantSpec(bits=8), zero_point=-128) == pytest.approx(1 / math.sqrt(100 * 255))
    w = np.array([[1.0, -1.0], [0.1, 0.3]])
    per_channel = QuantSpec(bits=2, symmetric=True, narrow_range=True, per_channel=True)
    assert lsq_initial_scale(w, per_channel).tolist() == pytest.approx([2.0, 0.4])
    assert float(lsq_initial_scale(np.zeros(3), spec)) == pytest.approx(2.0**-23)
    with pytest.raises(ValueError, match="positive int"):
        lsq_grad_scale(0, spec)
    with pytest.raises(ValueError, match="finite"):
        lsq_initial_scale(np.array([np.inf]), spec)


def test_lsq_refuses_a_constant_step():
    with pytest.raises(TypeError, match="scale must be a Tensor"):
        lsq_quantize(Tensor(np.ones(2, np.float32)), 0.5, 0, QuantSpec())
    with pytest.raises(ValueError, match="LSQ step size"):
        lsq_quantize(Tensor(np.ones(2, np.float32)), Tensor(np.float32(-0.1)), 0, QuantSpec())


# ------------------------------------------------------------------------------------------------ PACT
@st.composite
def pact_points(draw):
    bits = draw(st.integers(2, 8))
    alpha = draw(st.floats(0.5, 20.0, width=32))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    size = draw(st.integers(1, 40))
    x = rng.uniform(-0.5 * alpha, 1.5 * alpha, size)
    x = np.where((np.abs(x) < 0.01 * alpha) | (np.abs(x - alpha) < 0.01 * alpha), 0.5 * alpha, x)
    return x.astype(np.float32).astype(np.float64), np.float32(alpha), QuantSpec(bits=bits)


@SETTINGS
@given(pact_points(), st.integers(0, 2**31 - 1))
def test_pact_gradients_match_finite_differences_of_the_straight_through_surrogate(point, seed):
    x, alpha, spec = point
    rng = np.random.default_rng(seed)
    cotangent = rng.standard_normal(x.shape)
    x_leaf, alpha_leaf = Tensor(x.astype(np.float32), requires_grad=True), Tensor(alpha, requires_grad=True)
    y = pact_quantize(x_leaf, alpha_leaf, spec)
    scale, zero = pact_qparams(alpha, spec)
    assert np.array_equal(y.data, dequantize(quantize(x.astype(np.float32), scale, zero, spec), scale, zero, spec))
    (y * Tensor(cotangent.astype(np.float32))).sum().backward()

    offset = y.data.astype(np.float64) - np.clip(x, 0.0, float(alpha))  # frozen rounding

    def objective(x_value, alpha_value):
        return float(((np.clip(x_value, 0.0, alpha_value) + offset) * cotangent).sum())

    eps, top = 1e-3 * float(alpha), float(alpha)
    direction = rng.standard_normal(x.shape)
    numeric_x = (objective(x + eps * direction, top) - objective(x - eps * direction, top)) / (2 * eps)
    assert float((x_leaf.grad * direction).sum()) == pytest.approx(numeric_x, rel=1e-4, abs=1e-4)
    numeric_alpha = (objective(x, float(alpha) + eps) - objective(x, float(alpha) - eps)) / (2 * eps)
    assert float(alpha_leaf.grad) == pytest.approx(numeric_alpha, rel=1e-4, abs=1e-4)


def test_pact_alpha_gradient_on_clipped_entries_is_the_real_derivative():
    spec = QuantSpec(bits=4)
    x = np.array([5.0, 9.0], np.float32)
    alpha = Tensor(np.float32(2.0), requires_grad=True)
    pact_quantize(Tensor(x), alpha, spec).sum().backward()
    eps = 1e-3

    def real(a):
        scale, zero = pact_qparams(a, spec)
        return dequantize(quantize(x, scale, zero, spec), scale, zero, spec).astype(np.float64).sum()

    assert float(alpha.grad) == 2.0
    assert (real(2.0 + eps) - real(2.0 - eps)) / (2 * eps) == pytest.approx(2.0, rel=1e-3)


def test_pact_refuses_bad_input():
    with pytest.raises(ValueError, match="asymmetric"):
        pact_quantize(Tensor(np.ones(2, np.float32)), Tensor(np.float32(1.0)), QuantSpec(symmetric=True))
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        pact_quantize(Tensor(np.ones(2, np.float32)), Tensor(np.float32(0.0)), QuantSpec())
    with pytest.raises(TypeError, match="one-element Tensor"):
        pact_quantize(Tensor(np.ones(2, np.float32)), 1.0, QuantSpec())
