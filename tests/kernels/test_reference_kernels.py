"""The NumPy reference kernels against independent, naive oracles (Python loops, Fractions, floats).

The reference is the specification the Numba kernels are compared with, so here it is itself checked
against the textbook definitions: direct convolution loops, window loops for pools, the real-valued sum for
the requantized add, and explicit worst-case inputs for the accumulator bound.
"""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import reference as ref
from nanoopt.spec import INT32_MAX, QuantSpec, dequantize, multiply_by_quantized_multiplier, quantize_multiplier

SETTINGS = settings(max_examples=30, deadline=None)
INT8 = QuantSpec()


def int8_arrays(rng, shape, low=-128, high=127):
    return rng.integers(low, high + 1, size=shape).astype(np.int8)


# -------------------------------------------------------------------------------------- conv oracle
def naive_conv_acc(x, w, x_zp, stride, padding, dilation, groups):
    """Direct 7-loop definition of the accumulator of a grouped, strided, dilated, zero-point-padded conv."""
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((batch, out_channels, out_h, out_w), dtype=np.int64)
    per_group = out_channels // groups
    for n in range(batch):
        for o in range(out_channels):
            g = o // per_group
            for y in range(out_h):
                for xx in range(out_w):
                    total = 0
                    for c in range(group_channels):
                        for i in range(kh):
                            for j in range(kw):
                                row, col = y * sh + i * dh - ph, xx * sw + j * dw - pw
                                inside = 0 <= row < height and 0 <= col < width
                                value = int(x[n, g * group_channels + c, row, col]) if inside else x_zp
                                total += (value - x_zp) * int(w[o, c, i, j])
                    acc[n, o, y, xx] = total
    return acc


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    group_channels = draw(st.integers(1, 2))
    per_group = draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    height = draw(st.integers(dilation[0] * (kh - 1) + 1, 6))
    width = draw(st.integers(dilation[1] * (kw - 1) + 1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    return groups, group_channels, per_group, (kh, kw), stride, dilation, padding, (height, width), seed


@SETTINGS
@given(case=conv_cases(), x_zp=st.sampled_from([-128, -1, 0, 5, 127]))
def test_conv2d_matches_direct_loops(case, x_zp):
    groups, group_channels, per_group, kernel, stride, dilation, padding, size, seed = case
    rng = np.random.default_rng(seed)
    x = int8_arrays(rng, (2, groups * group_channels) + size)
    w = int8_arrays(rng, (groups * per_group, group_channels) + kernel)
    acc = naive_conv_acc(x, w, x_zp, stride, padding, dilation, groups)
    bias = rng.integers(-1000, 1000, size=w.shape[0]).astype(np.int32)
    m0, shift = quantize_multiplier(rng.uniform(0.001, 0.1, size=w.shape[0]))
    out = ref.quantized_conv2d(x, w, bias, x_zp, m0, shift, 3, INT8, stride, padding, dilation, groups, relu=True)
    expected_acc = acc + bias[None, :, None, None]
    expected = multiply_by_quantized_multiplier(expected_acc, m0[:, None, None].astype(np.int64), shift[:, None, None])
    expected = np.clip(expected + 3, 3, 127)
    np.testing.assert_array_equal(out, expected)


def test_depthwise_conv_is_per_channel():
    rng = np.random.default_rng(0)
    x, w = int8_arrays(rng, (1, 4, 5, 5)), int8_arrays(rng, (4, 1, 3, 3))
    out = ref.quantized_conv2d(x, w, None, 2, 2**30, 6, 0, INT8, padding=1, groups=4)
    for c in range(4):
        single = ref.quantized_conv2d(
            x[:, c : c + 1].copy(), w[c : c + 1].copy(), None, 2, 2**30, 6, 0, INT8, padding=1
        )
        np.testing.assert_array_equal(out[:, c : c + 1], single)


# ------------------------------------------------------------------------------------------ linear / GEMM
@SETTINGS
@given(
    m=st.integers(1, 5), k=st.integers(1, 40), n=st.integers(1, 5), zp=st.integers(-128, 127), seed=st.integers(0, 99)
)
def test_gemm_and_linear_match_python_ints(m, k, n, zp, seed):
    rng = np.random.default_rng(seed)
    a, w = int8_arrays(rng, (m, k)), int8_arrays(rng, (n, k))
    expected = [[sum((int(a[i, t]) - zp) * int(w[j, t]) for t in range(k)) for j in range(n)] for i in range(m)]
    got = ref.gemm_s8s8s32(a, w, zp)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    a16 = rng.integers(-32768, 32768, size=(m, k)).astype(np.int16)
    w16 = rng.integers(-32768, 32768, size=(n, k)).astype(np.int16)
    np.testing.assert_array_equal(
        ref.gemm_s16s8s64(a16, w),
        [[sum(int(a16[i, t]) * int(w[j, t]) for t in range(k)) for j in range(n)] for i in range(m)],
    )
    np.testing.assert_array_equal(
        ref.gemm_s16s16s64(a16, w16),
        [[sum(int(a16[i, t]) * int(w16[j, t]) for t in range(k)) for j in range(n)] for i in range(m)],
    )


def test_linear_relu_clamps_at_output_zero_point_and_16x8_mode():
    x = np.array([[100, -100]], np.int8)
    w = np.array([[1, 0], [0, 1]], np.int8)
    out = ref.quantized_linear(x, w, None, 0, 2**30, -1, -10, INT8, relu=True)  # multiplier 1
    np.testing.assert_array_equal(out, [[90, -10]])
    x16 = np.array([[30000, -30000]], np.int16)
    spec16 = QuantSpec(bits=16)
    out16 = ref.quantized_linear(x16, w, np.array([5, 5], np.int64), 0, 2**30, 0, 0, spec16)  # multiplier 1/2
    assert out16.dtype == np.int16
    np.testing.assert_array_equal(out16, [[15003, -14997]])  # gemmlowp: ties round up


# ------------------------------------------------------------------------------------------ overflow guard
def test_accumulator_bound_is_tight_and_exact():
    rng = np.random.default_rng(1)
    w = int8_arrays(rng, (3, 50))
    for zp in (-128, 0, 100):
        bound = ref.accumulator_bound(w, -128, 127, zp, np.array([7, -7, 0]))
        worst = 0
        for sign in (1, -1):  # the extreme input picks, per weight, the end that pushes acc in one direction
            x = np.where(sign * w >= 0, 127, -128).astype(np.int8)
            worst = np.maximum(worst, np.abs(ref.gemm_s8s8s32(x, w, zp).astype(np.int64).diagonal() + [7, -7, 0]))
        np.testing.assert_array_equal(bound, worst)
        random_x = int8_arrays(rng, (200, 50))
        assert np.all(np.abs(ref.gemm_s8s8s32(random_x, w, zp).astype(np.int64) + [7, -7, 0]) <= bound)


def test_overflowing_int8_gemm_raises_but_linear_widens():
    k = 66_000  # 66000 * 255 * 128 > 2^31 - 1
    w = np.full((1, k), -128, dtype=np.int8)
    x = np.full((1, k), -128, dtype=np.int8)
    assert int(ref.accumulator_bound(w, -128, 127, 127)[0]) > INT32_MAX
    assert not ref.int32_accumulation_is_safe(w, -128, 127, 127)
    with pytest.raises(ref.AccumulatorOverflowError, match="overflow int32"):
        ref.gemm_s8s8s32(x, w, 127)
    exact = k * (-128 - 127) * (-128)  # 2_154_240_000 > 2^31
    m0, shift = quantize_multiplier(5e-8)
    out = ref.quantized_linear(x, w, None, 127, m0, shift, 0, INT8)
    assert int(out[0, 0]) == round(exact * 5e-8) == 108


# ------------------------------------------------------------------------------------------------- pools
@SETTINGS
@given(
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 1),
    include_pad=st.booleans(),
    zp=st.integers(-128, 127),
    seed=st.integers(0, 99),
)
def test_pools_match_window_loops(kernel, stride, padding, include_pad, zp, seed):
    padding = min(padding, kernel // 2)
    rng = np.random.default_rng(seed)
    x = int8_arrays(rng, (2, 3, 5, 6))
    maxed = ref.quantized_max_pool2d(x, kernel, stride, padding)
    averaged = ref.quantized_avg_pool2d(x, zp, kernel, stride, padding, include_pad)
    for n, c, y, xx in np.ndindex(*maxed.shape):
        window = [
            int(x[n, c, r, q])
            for r in range(y * stride - padding, y * stride - padding + kernel)
            for q in range(xx * stride - padding, xx * stride - padding + kernel)
            if 0 <= r < 5 and 0 <= q < 6
        ]
        assert maxed[n, c, y, xx] == max(window)
        count = kernel * kernel if include_pad else len(window)
        mean = Fraction(sum(v - zp for v in window), count)
        rounded = int(abs(mean) + Fraction(1, 2)) * (1 if mean >= 0 else -1)  # half away from zero
        assert averaged[n, c, y, xx] == rounded + zp


# ---------------------------------------------------------------------------------------------- add, relu
@SETTINGS
@given(
    a_scale=st.floats(1e-3, 1.0),
    b_scale=st.floats(1e-3, 1.0),
    out_scale=st.floats(1e-3, 2.0),
    zps=st.tuples(*[st.integers(-128, 127)] * 3),
    bits=st.sampled_from([8, 16]),
    seed=st.integers(0, 99),
)
def test_add_within_one_of_real_sum(a_scale, b_scale, out_scale, zps, bits, seed):
    spec = QuantSpec(bits=bits)
    rng = np.random.default_rng(seed)
    a = rng.integers(spec.qmin, spec.qmax + 1, size=64).astype(spec.dtype)
    b = rng.integers(spec.qmin, spec.qmax + 1, size=64).astype(spec.dtype)
    a_scale, b_scale, out_scale = np.float32(a_scale), np.float32(b_scale), np.float32(out_scale)
    a_zp, b_zp, out_zp = zps
    out = ref.quantized_add(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, spec)
    real = dequantize(a, a_scale, a_zp, spec).astype(np.float64) + dequantize(b, b_scale, b_zp, spec)
    ideal = np.clip(np.rint(real / np.float64(out_scale)) + out_zp, spec.qmin, spec.qmax)
    assert out.dtype == spec.dtype
    assert np.all(np.abs(out.astype(np.int64) - ideal) <= 1)
    relu = ref.quantized_add(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, spec, relu=True)
    np.testing.assert_array_equal(relu, np.maximum(out, out_zp))


def test_relu():
    np.testing.assert_array_equal(ref.quantized_relu(np.array([-3, 0, 4], np.int16), -1), [-1, 0, 4])
