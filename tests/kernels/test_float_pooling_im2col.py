"""The float im2col/col2im and max-pooling Numba kernels equal their NumPy references bit for bit."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.float_kernels import im2col, pooling


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cg = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(dh * (kh - 1) + 1, dh * (kh - 1) + 9))
    w = draw(st.integers(dw * (kw - 1) + 1, dw * (kw - 1) + 9))
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).standard_normal((n, groups * cg, h, w)).astype(dtype)
    return x, groups, (kh, kw, sh, sw, dh, dw)


@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_im2col_and_col2im_match_the_reference_exactly(case):
    x, groups, geometry = case
    cols = im2col.im2col(x, groups, *geometry)
    expected = im2col.im2col_reference(x, groups, *geometry)
    assert cols.dtype == expected.dtype
    np.testing.assert_array_equal(cols, expected)
    grad_cols = np.random.default_rng(1).standard_normal(cols.shape).astype(x.dtype)
    back = im2col.col2im(grad_cols, x.shape, *geometry)
    np.testing.assert_array_equal(back, im2col.col2im_reference(grad_cols, x.shape, *geometry))


@settings(max_examples=30, deadline=None)
@given(conv_cases())
def test_col2im_is_the_adjoint_of_im2col(case):
    # <im2col(x), c> == <x, col2im(c)> for every x, c: col2im is the transpose of the linear map im2col
    x, groups, geometry = case
    x = x.astype(np.float64)
    cols = im2col.im2col(x, groups, *geometry)
    c = np.random.default_rng(2).standard_normal(cols.shape)
    lhs = float((cols * c).sum())
    rhs = float((x * im2col.col2im(c, x.shape, *geometry)).sum())
    assert abs(lhs - rhs) <= 1e-9 * (1 + abs(lhs))


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = draw(st.integers(kh, kh + 8)), draw(st.integers(kw, kw + 8))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # few distinct values, so that ties (the first maximum wins) are common
    x = rng.integers(-3, 4, size=(n, c, h, w)).astype(np.float32) * draw(st.sampled_from([1.0, 0.37]))
    return x, (kh, kw, sh, sw)


@settings(max_examples=60, deadline=None)
@given(pool_cases())
def test_max_pool_matches_the_reference_exactly_including_ties(case):
    x, geometry = case
    out, argmax = pooling.max_pool2d_forward(x, *geometry)
    ref_out, ref_argmax = pooling.max_pool2d_forward_reference(x, *geometry)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)
    grad = np.random.default_rng(3).standard_normal(out.shape).astype(np.float32)
    np.testing.assert_array_equal(pooling.max_pool2d_backward(grad, argmax, x.shape, *geometry),
                                  pooling.max_pool2d_backward_reference(grad, ref_argmax, x.shape, *geometry))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 11), st.integers(2, 11), st.integers(0, 2**32 - 1),
       st.sampled_from([np.float32, np.float64]))
def test_the_2x2_stride_2_max_pool_path_matches_the_reference_exactly(n, c, h, w, seed, dtype):
    # LeNet's pool has its own branch-free kernel; odd sizes leave a last row/column outside every window
    x = np.random.default_rng(seed).integers(-2, 3, size=(n, c, h, w)).astype(dtype)  # many ties
    out, argmax = pooling.max_pool2d_forward(x, 2, 2, 2, 2)
    ref_out, ref_argmax = pooling.max_pool2d_forward_reference(x, 2, 2, 2, 2)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)
    grad = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
    np.testing.assert_array_equal(pooling.max_pool2d_backward(grad, argmax, x.shape, 2, 2, 2, 2),
                                  pooling.max_pool2d_backward_reference(grad, ref_argmax, x.shape, 2, 2, 2, 2))
