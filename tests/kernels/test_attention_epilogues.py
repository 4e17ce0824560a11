"""The fused epilogues of the GPT window recompute equal their NumPy references bit for bit, and refuse bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nanoopt.float_kernels.attention_heads import (
    qkv_heads,
    qkv_heads_panels_into,
    qkv_heads_panels_reference,
    qkv_heads_reference,
)
from nanoopt.float_kernels.residual import bias_residual_, bias_residual_reference

floats = st.floats(width=32)  # every float32: signed zeros, subnormals, infinities and NaN; sums may overflow


def _bits(x: np.ndarray) -> np.ndarray:
    """The float32 bits, every NaN as one canonical quiet NaN: which NaN operand's payload a sum of two NaNs carries
    is not specified by IEEE 754 (x86 returns the first source operand's, and LLVM may swap the operands of a
    commutative addition), so only NaN-ness is compared there; every other value bit for bit."""
    bits = np.ascontiguousarray(x).view(np.uint32).copy()
    bits[np.isnan(x)] = 0x7FC00000
    return bits


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 20), st.data())
def test_qkv_heads_panels_equal_their_reference(length, heads, head_dim, data):
    """Queries as rows, keys transposed and values cut into 16-wide panels, the padding zero (written, not left
    over: the buffers start as NaN), the bias added first or not at all."""
    width = 3 * heads * head_dim
    qkv = data.draw(arrays(np.float32, (length, width), elements=floats))
    bias = data.draw(st.none() | arrays(np.float32, (width,), elements=floats))
    queries = np.full((heads, length, head_dim), np.nan, np.float32)
    keys = np.full((heads, -(-length // 16), head_dim, 16), np.nan, np.float32)
    values = np.full((heads, -(-head_dim // 16), length, 16), np.nan, np.float32)
    qkv_heads_panels_into(qkv.reshape(length, 3, heads, head_dim),
                          (np.zeros(width, np.float32) if bias is None else bias).reshape(3, heads, head_dim),
                          bias is not None, queries, keys, values)
    for got, expected in zip((queries, keys, values), qkv_heads_panels_reference(qkv, bias, heads, 16), strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(expected))


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
