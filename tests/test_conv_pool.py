"""conv2d, max_pool2d, avg_pool2d and adaptive_avg_pool2d forward against plain nested-loop NumPy references.

The references below are the definitions written out output by output (PyTorch's semantics: cross-correlation,
output size floor((H + 2p - d (k - 1) - 1) / s) + 1, max pooling pads with -inf, average pooling counts the zero
padding in the divisor, adaptive bins [floor(i H / out), ceil((i + 1) H / out))). Hypothesis draws batch, channels,
size, kernel, stride, padding, dilation and groups; in float64 the results must agree to ~1e-12.
"""

import math

import numpy as np
import pytest
from conv_strategies import conv_cases, pool_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt.nn import functional as F

EXAMPLES = settings(max_examples=40, deadline=None)
TIGHT = dict(rtol=1e-12, atol=1e-12)


# ===================================================================== references
def out_size(size, kernel, stride, padding, dilation=1):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_loops(x, weight, bias, stride, padding, dilation, groups):
    """Output by output: bias + the sum of the weights times their group's (dilated, zero-padded) input window."""
    n, c, h, w = x.shape
    oc, cg, kh, kw = weight.shape
    padded = np.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]))
    padded[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x
    oh = out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = out_size(w, kw, stride[1], padding[1], dilation[1])
    out = np.zeros((n, oc, oh, ow))
    for b, o, y, x_ in np.ndindex(n, oc, oh, ow):
        g = o // (oc // groups)
        top, left = y * stride[0], x_ * stride[1]
        window = padded[b, g * cg:(g + 1) * cg, top:top + dilation[0] * (kh - 1) + 1:dilation[0],
                        left:left + dilation[1] * (kw - 1) + 1:dilation[1]]  # (cg, kh, kw)
        out[b, o, y, x_] = (0.0 if bias is None else bias[o]) + float(np.sum(weight[o] * window))
    return out


def pool2d_loops(x, kernel, stride, padding, kind):
    n, c, h, w = x.shape
    oh, ow = out_size(h, kernel[0], stride[0], padding[0]), out_size(w, kernel[1], stride[1], padding[1])
    out = np.zeros((n, c, oh, ow))
    for b in range(n):
        for ch in range(c):
            for y in range(oh):
                for x_ in range(ow):
                    values = []
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            row, col = y * stride[0] + i - padding[0], x_ * stride[1] + j - padding[1]
                            inside = 0 <= row < h and 0 <= col < w
                            if inside:
                                values.append(x[b, ch, row, col])
                            elif kind == "avg":
                                values.append(0.0)  # count_include_pad: zero padding counts in the divisor
                    out[b, ch, y, x_] = max(values) if kind == "max" else sum(values) / len(values)
    return out


def adaptive_avg_pool2d_loops(x, output_size):
    n, c, h, w = x.shape
    out = np.zeros((n, c, *output_size))
    for i in range(output_size[0]):
        top, bottom = math.floor(i * h / output_size[0]), math.ceil((i + 1) * h / output_size[0])
        for j in range(output_size[1]):
            left, right = math.floor(j * w / output_size[1]), math.ceil((j + 1) * w / output_size[1])
            for b in range(n):
                for ch in range(c):
                    total = 0.0
                    for row in range(top, bottom):
                        for col in range(left, right):
                            total += x[b, ch, row, col]
                    out[b, ch, i, j] = total / ((bottom - top) * (right - left))
    return out


# ===================================================================== strategies
seeds = st.integers(0, 2**32 - 1)


# ===================================================================== forward against the loops
@EXAMPLES
@given(conv_cases(), seeds)
def test_conv2d_matches_the_loop_reference(case, seed):
    x_shape, weight_shape, with_bias, options = case
    rng = np.random.default_rng(seed)
    x, weight, bias = rng.standard_normal(x_shape), rng.standard_normal(weight_shape), rng.standard_normal(
        weight_shape[0])
    bias = bias if with_bias else None
    out = F.conv2d(no.Tensor(x), no.Tensor(weight), None if bias is None else no.Tensor(bias), **options)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.data, conv2d_loops(x, weight, bias, **options), **TIGHT)


@EXAMPLES
@given(conv_cases(), seeds)
def test_conv2d_float32_stays_float32_and_close(case, seed):
    x_shape, weight_shape, _, options = case
    rng = np.random.default_rng(seed)
    x, weight = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(weight_shape).astype(np.float32)
    out = F.conv2d(no.Tensor(x), no.Tensor(weight), None, **options)
    assert out.dtype == np.float32
    expected = conv2d_loops(x.astype(np.float64), weight.astype(np.float64), None, **options)
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, pool, tolerance", [("max", F.max_pool2d, dict(rtol=0, atol=0)),  # exact: a pick
                                                    ("avg", F.avg_pool2d, TIGHT)])
@EXAMPLES
@given(pool_cases(), seeds)
def test_pool2d_matches_the_loop_reference(kind, pool, tolerance, case, seed):
    shape, kernel, stride, padding = case
    x = np.random.default_rng(seed).standard_normal(shape)
    out = pool(no.Tensor(x), kernel, stride, padding)
    np.testing.assert_allclose(out.data, pool2d_loops(x, kernel, stride, padding, kind), **tolerance)


@EXAMPLES
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 6),
       st.integers(1, 6), seeds)
def test_adaptive_avg_pool2d_matches_the_loop_reference(n, c, h, w, out_h, out_w, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    out = F.adaptive_avg_pool2d(no.Tensor(x), (out_h, out_w))
    np.testing.assert_allclose(out.data, adaptive_avg_pool2d_loops(x, (out_h, out_w)), **TIGHT)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), seeds)
def test_adaptive_avg_pool2d_with_divisible_sizes_is_avg_pool2d(out_h, out_w, factor, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, out_h * factor, out_w * factor))
    adaptive = F.adaptive_avg_pool2d(no.Tensor(x), (out_h, out_w))
    np.testing.assert_allclose(adaptive.data, F.avg_pool2d(no.Tensor(x), factor).data, **TIGHT)


# ===================================================================== gradient conventions at ties
def test_max_pool2d_gradient_goes_to_the_first_maximum_of_a_tied_window():
    x = no.Tensor(np.ones((1, 1, 2, 2)), requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(x.grad[0, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_overlapping_max_pool2d_windows_add_their_gradients():
    x = no.Tensor(np.array([[[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]]), requires_grad=True)
    F.max_pool2d(x, 2, stride=1).sum().backward()  # the 5 wins both top windows; all-zero ones pick their first
    np.testing.assert_array_equal(x.grad[0, 0], [[0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


# ===================================================================== bad input
@pytest.mark.parametrize("call, message", [
    (lambda: F.conv2d(np.zeros((1, 3, 5, 5)), np.zeros((4, 2, 3, 3))), "input has 3 channels"),
    (lambda: F.conv2d(np.zeros((1, 4, 5, 5)), np.zeros((3, 2, 3, 3)), groups=2), "divisible by groups"),
    (lambda: F.conv2d(np.zeros((3, 5, 5)), np.zeros((4, 3, 3, 3))), r"expected a 4-D input"),
    (lambda: F.conv2d(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3))), "smaller than the dilated kernel"),
    (lambda: F.conv2d(np.zeros((1, 1, 5, 5)), np.zeros((1, 1, 3, 3)), stride=0), "stride"),
    (lambda: F.max_pool2d(np.zeros((1, 1, 4, 4)), 2, padding=2), "padding"),
    (lambda: F.avg_pool2d(np.zeros((1, 1, 2, 2)), 3), "smaller than the kernel"),
    (lambda: F.max_pool2d(np.zeros((4, 4)), 2), r"expected a 4-D input"),
    (lambda: F.adaptive_avg_pool2d(np.zeros((1, 1, 4, 4)), 0), "output_size"),
])
def test_bad_geometry_raises_value_error_saying_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
