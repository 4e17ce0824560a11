"""The float32 softmax kernel equals its NumPy reference bit for bit; its exp is within half an ulp (plus 3e-14
relative) of the true exponential; its pairwise sum is NumPy's own ``np.sum``."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from nanoopt.float_kernels import softmax

finite32 = st.floats(-1e4, 1e4, width=32, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(arrays(np.float32, array_shapes(min_dims=1, max_dims=4, max_side=7), elements=finite32),
       st.integers(0, 2**16))
def test_kernel_equals_reference_exactly(x, seed):
    rng = np.random.default_rng(seed)
    if x.shape[-1] > 1 and rng.random() < 0.5:  # causal masks: -inf after the first column
        x[..., rng.integers(1, x.shape[-1]):] = -np.inf
    out = softmax.softmax(x)
    np.testing.assert_array_equal(out, softmax.softmax_reference(x))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=2e-6 * x.shape[-1])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 1500), st.integers(1, 4), st.sampled_from([0.01, 1.0, 30.0]))
def test_long_rows_and_numpy_pairwise_order(seed, length, rows, spread):
    x = (np.random.default_rng(seed).standard_normal((rows, length)) * spread).astype(np.float32)
    np.testing.assert_array_equal(softmax.softmax(x), softmax.softmax_reference(x))
    for row in x:  # the compiled pairwise sum is np.sum's order, including blocks above 128 values
        assert softmax.pairwise_sum(row, 0, length) == row.sum()


def test_exp_is_within_half_an_ulp_and_saturates():
    z = np.linspace(-103, 88, 400001).astype(np.float32)
    exact = np.exp(z.astype(np.float64))
    got = softmax.exp_reference(z).astype(np.float64)
    normal = exact > 1.2e-38
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - exact) / ulp)[normal].max() < 0.5 + 1e-6
    special = np.array([-np.inf, -200, 0.0, 89.0, np.inf, np.nan], np.float32)
    expected = [0.0, 0.0, 1.0, np.inf, np.inf, np.nan]
    np.testing.assert_array_equal(softmax.exp_reference(special), np.array(expected, np.float32))
    np.testing.assert_array_equal(np.array([softmax.exp32(v) for v in special], np.float32), expected)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="expected a float32 array with a non-empty last axis, got float64"):
        softmax.softmax(np.zeros(3))
    with pytest.raises(TypeError, match=r"got float32 \(2, 0\)"):
        softmax.softmax(np.zeros((2, 0), np.float32))
