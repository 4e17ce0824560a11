"""The float32 GELU kernel equals its NumPy reference bit for bit and the exact erf formula to 5e-7."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from scipy import special

import nanoopt as no
from nanoopt.float_kernels import gelu

float32s = st.floats(-1e6, 1e6, width=32, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, array_shapes(min_dims=0, max_dims=3, max_side=9), elements=float32s))
def test_kernel_equals_reference_exactly(x):
    out, cdf = gelu.gelu_forward(x)
    ref_out, ref_cdf = gelu.gelu_forward_reference(x)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(cdf, ref_cdf)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.1, 1.0, 3.0, 30.0]))
def test_kernel_is_within_5e_7_of_the_exact_gelu(seed, spread):
    x = (np.random.default_rng(seed).standard_normal(4000) * spread).astype(np.float32)
    exact = x.astype(np.float64) * 0.5 * (1 + special.erf(x.astype(np.float64) / np.sqrt(2)))
    out, cdf = gelu.gelu_forward(x)
    assert np.abs(out - exact).max() < 5e-7
    assert cdf.min() >= 0 and cdf.max() <= 1


def _every_nth_float32(low: float, high: float, stride: int) -> np.ndarray:
    """Every ``stride``-th float32 x with low <= x < high (by bit pattern), both signs."""
    first, last = (int(np.float32(v).view(np.int32)) for v in (low, high))
    positive = np.arange(first, last, stride, dtype=np.int32).view(np.float32)
    return np.concatenate([positive, -positive])


def test_a_dense_sweep_of_float32_is_within_5e_7_of_the_exact_gelu_and_equals_the_reference():
    # every 29th float32 with 2^-12 <= |x| < 8 (8.7 million values, all the exponents GELU is not x, 0 or x / 2
    # to float32 precision) and a sparser sweep of the rest, plus the edges of the clamp at |x| = 6 and infinities;
    # docs/gelu_fit.py --check runs the same check on every float32 with 2^-12 <= |x| < 8
    six = np.float32(6)
    edges = np.float32([0.0, six, np.nextafter(six, np.float32(0)), np.nextafter(six, np.float32(7)), 8.0, 1e30,
                        np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal])
    x = np.concatenate([_every_nth_float32(2.0**-12, 8.0, 29), _every_nth_float32(0.0, 2.0**-12, 9973),
                        _every_nth_float32(8.0, 3e38, 9973), edges, -edges])
    out, cdf = gelu.gelu_forward(x)
    ref_out, ref_cdf = gelu.gelu_forward_reference(x)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(cdf, ref_cdf)
    a = x.astype(np.float64)
    exact_cdf = 0.5 * special.erfc(-a / np.sqrt(2))
    assert np.abs(out - a * exact_cdf).max() < 5e-7
    assert np.abs(cdf - exact_cdf).max() < 2e-7
    assert cdf.min() >= 0 and cdf.max() <= 1
    inf = np.float32([np.inf, -np.inf])
    assert gelu.gelu_forward(inf)[0].tolist() == [np.inf, 0.0] and gelu.gelu_forward(inf)[1].tolist() == [1.0, 0.0]


def test_float32_gelu_gradient_matches_the_exact_derivative():
    x = np.linspace(-8, 8, 2001).astype(np.float32)
    t = no.Tensor(x, requires_grad=True)
    no.ops.gelu(t).sum().backward()
    a = x.astype(np.float64)
    exact = 0.5 * (1 + special.erf(a / np.sqrt(2))) + a * np.exp(-a * a / 2) / np.sqrt(2 * np.pi)
    assert np.abs(t.grad - exact).max() < 2e-6


def test_kernel_refuses_other_dtypes():
    with pytest.raises(TypeError, match="expected a float32 array, got dtype float64"):
        gelu.gelu_forward(np.zeros(3))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, array_shapes(min_dims=1, max_dims=3, max_side=9), elements=float32s), st.data())
def test_fused_bias_gelu_equals_the_reference_of_x_plus_bias_exactly(x, data):
    bias = data.draw(arrays(np.float32, x.shape[-1:], elements=float32s))
    expected = gelu.gelu_forward_reference(x + bias)[0]
    out = gelu.bias_gelu_(x.copy(), bias)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(gelu.bias_gelu_(x.copy(), None), gelu.gelu_forward_reference(x)[0])


def test_fused_bias_gelu_refuses_bad_operands_by_name():
    with pytest.raises(TypeError, match="expected a C-contiguous float32 array, got float64"):
        gelu.bias_gelu_(np.zeros((2, 3)), None)
    with pytest.raises(TypeError, match="C-contiguous"):
        gelu.bias_gelu_(np.zeros((3, 2), np.float32).T, None)
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(3,\), got float32 \(2,\)"):
        gelu.bias_gelu_(np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
