import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt import ops
from nanoopt.float_kernels.layer_norm import layer_norm_reference, layer_norm_rows
from nanoopt.ops import Context


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 300), st.sampled_from([1e-3, 1.0, 1e4]), st.sampled_from([1e-5, 1e-12]),
       st.integers(0, 2**32 - 1))
def test_kernel_equals_the_reference_and_the_operator_bit_for_bit(rows, n, magnitude, eps, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * magnitude + rng.standard_normal() * magnitude).astype(np.float32)
    weight = rng.standard_normal(n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = layer_norm_rows(x, weight, bias, eps)
    np.testing.assert_array_equal(got.view(np.uint32), layer_norm_reference(x, weight, bias, eps).view(np.uint32))
    operator = ops.LayerNorm.forward(Context(ops.LayerNorm), x, weight, bias, ndim_normalised=1, eps=eps)
    np.testing.assert_array_equal(got.view(np.uint32), operator.view(np.uint32))
    # 3-D input and a preallocated output give the same bits
    out = np.empty((1, rows, n), np.float32)
    assert layer_norm_rows(x[None], weight, bias, eps, out=out) is out
    np.testing.assert_array_equal(out[0].view(np.uint32), got.view(np.uint32))


def test_normalises_to_zero_mean_and_unit_variance():
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32) * 3 + 7
    y = layer_norm_rows(x, np.ones(64, np.float32), np.zeros(64, np.float32), 1e-5)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-4)


def test_bad_input_names_the_argument():
    w = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="x must be a float32"):
        layer_norm_rows(np.ones((2, 4)), w, w, 1e-5)
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(4,\)"):
        layer_norm_rows(np.ones((2, 4), np.float32), w, np.ones(3, np.float32), 1e-5)
    with pytest.raises(ValueError, match="out must be"):
        layer_norm_rows(np.ones((2, 4), np.float32), w, w, 1e-5, out=np.empty((4, 2), np.float32))
