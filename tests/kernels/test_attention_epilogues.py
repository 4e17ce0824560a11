"""The fused epilogues of the GPT window recompute equal their NumPy references bit for bit, and refuse bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nanoopt.float_kernels.attention_heads import qkv_heads, qkv_heads_reference
from nanoopt.float_kernels.residual import bias_residual_, bias_residual_reference

floats = st.floats(width=32)  # every float32: signed zeros, subnormals, infinities and NaN; sums may overflow


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 4), st.integers(1, 7), st.data())
def test_qkv_heads_equals_adding_the_bias_then_splitting_the_heads(batch, length, heads, head_dim, data):
    width = 3 * heads * head_dim
    qkv = data.draw(arrays(np.float32, (batch, length, width), elements=floats))
    bias = data.draw(st.none() | arrays(np.float32, (width,), elements=floats))
    out = qkv_heads(qkv, bias, heads)
    assert out.shape == (3, batch, heads, length, head_dim) and out.flags.c_contiguous
    np.testing.assert_array_equal(_bits(out), _bits(qkv_heads_reference(qkv, bias, heads)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.data())
def test_bias_residual_equals_adding_the_bias_then_the_residual(shape, data):
    x = data.draw(arrays(np.float32, tuple(shape), elements=floats))
    product = data.draw(arrays(np.float32, tuple(shape), elements=floats))
    bias = data.draw(st.none() | arrays(np.float32, (shape[-1],), elements=floats))
    expected = bias_residual_reference(x, product, bias)
    target = x.copy()
    assert bias_residual_(target, product, bias) is target
    np.testing.assert_array_equal(_bits(target), _bits(expected))


def test_bad_operands_are_refused_by_name():
    with pytest.raises(ValueError, match=r"3 \* heads \* head_dim"):
        qkv_heads(np.zeros((1, 2, 10), np.float32), None, 2)
    with pytest.raises(TypeError, match="qkv must be a float32 array"):
        qkv_heads(np.zeros((1, 2, 6)), None, 1)
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(6,\)"):
        qkv_heads(np.zeros((1, 2, 6), np.float32), np.zeros(5, np.float32), 1)
    with pytest.raises(ValueError, match=r"product must have x's shape \(2, 3\)"):
        bias_residual_(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), None)
    with pytest.raises(TypeError, match="x must be a C-contiguous float32 array"):
        bias_residual_(np.zeros((3, 2), np.float32).T, np.zeros((2, 3), np.float32), None)
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(3,\)"):
        bias_residual_(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.zeros(3))
