"""The compiled kernels of nanoopt.runtime against their NumPy references (hypothesis).

Boundary kernels and the fused int8 linear step must be bit-identical; the float kernels that only move or
compare values (epilogues, affine, max) too; the float kernels that sum (pools, direct conv) to float tolerance.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoopt import kernels
from nanoopt.kernels import avx512, cpu_features, float_conv_avx2, reference, x86_glue
from nanoopt.runtime import boundary
from nanoopt.runtime import float_kernels as fk
from nanoopt.spec import QuantSpec

SETTINGS = settings(max_examples=60, deadline=None)
floats32 = st.floats(width=32, allow_nan=False)


@SETTINGS
@given(hnp.arrays(np.float32, st.integers(0, 40), elements=floats32 | st.sampled_from([0.5, 1.5, -2.5, 2.5])),
       st.floats(0.0009765625, 1024.0, width=32), st.integers(-128, 127), st.sampled_from([8, 16]))
def test_quantize_into_equals_spec_quantize(x, scale, zero_point, bits):
    spec = QuantSpec(bits=bits, symmetric=bits == 16)
    zero_point = 0 if bits == 16 else zero_point
    out = np.empty(x.shape, spec.dtype)
    finite = boundary.quantize_into(x, np.float32(scale), np.int64(zero_point), np.float32(spec.qmin - zero_point),
                                    np.float32(spec.qmax - zero_point), out)
    assert finite == bool(np.isfinite(x).all())
    np.testing.assert_array_equal(out, boundary.quantize_reference(x, scale, zero_point, spec))  # inf saturates


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_quantize_into_reports_values_that_are_not_finite(value):
    out = np.empty(3, np.int8)
    x = np.array([1.0, value, 2.0], np.float32)
    assert not boundary.quantize_into(x, np.float32(1), np.int64(0), np.float32(-128), np.float32(127), out)


@SETTINGS
@given(hnp.arrays(np.int16, st.integers(0, 40)), st.floats(0.0009765625, 1024.0, width=32), st.integers(-128, 127))
def test_dequantize_into_equals_spec_dequantize(codes, scale, zero_point):
    spec = QuantSpec(bits=16)
    out = np.empty(codes.shape, np.float32)
    boundary.dequantize_into(codes, np.float32(scale), np.int64(zero_point), out)
    expected = boundary.dequantize_reference(codes, scale, zero_point, spec)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


def runnable_s8_kernels() -> list[str]:
    """The int8 x86 GEMMs this process may run (features of the CPU, Numba's target and NANOOPT_CPU_FEATURES)."""
    if not kernels.avx2_available():
        return []
    names = ["avx2"] + (["avx-vnni"] if cpu_features.target_has_avx_vnni() else [])
    return names + (["avx512-vnni"] if avx512.available() else [])


@pytest.mark.parametrize("kernel", ["avx2", "avx-vnni", "avx512-vnni"])
@SETTINGS
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**16), st.booleans(),
       st.booleans())
def test_int8_linear_driver_equals_reference(kernel, m, k, n, seed, relu, with_bias):
    if kernel not in runnable_s8_kernels():
        pytest.skip(f"the {kernel} int8 kernel does not run on this CPU/target")
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, n).astype(np.int32) if with_bias else None
    m0 = rng.integers(2**30, 2**31, n).astype(np.int32)
    shift = rng.integers(0, 12, n).astype(np.int32)
    x_zp, out_zp = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    layer = kernels.prepare_linear(w, bias, x_zp, m0, shift, out_zp, QuantSpec(), relu)
    plan = layer.plan
    out = np.empty((m, n), np.int8)
    epilogue = (plan.base_offsets, np.zeros(m, np.int64)) + plan.tail
    linear = x86_glue.linear_s8_driver(kernel)  # the runtime's int8 linear step (product + Numba epilogue)
    linear(x, layer.weights.avx2_s8().panels, n, k, np.empty((m, n), np.int32), epilogue, out)
    np.testing.assert_array_equal(out, reference.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, QuantSpec(),
                                                                  relu))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(3, 9), st.integers(3, 9),
       st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.integers(0, 2**16))
def test_avg_pools_match_their_references(batch, channels, size_out, height, width, kernel, stride, padding, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, channels, height, width)).astype(np.float32)
    padding = min(padding, kernel // 2)
    out_h, out_w = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
    out = np.empty((batch, channels, out_h, out_w), np.float32)
    fk.avg_pool(x, kernel, kernel, stride, stride, padding, padding, out)
    np.testing.assert_allclose(out, fk.avg_pool_reference(x, (kernel,) * 2, (stride,) * 2, (padding,) * 2),
                               rtol=1e-5, atol=1e-6)
    size = (min(size_out, height), min(size_out + 1, width))
    adaptive = np.empty((batch, channels) + size, np.float32)
    fk.adaptive_avg_pool(x, adaptive)
    np.testing.assert_allclose(adaptive, fk.adaptive_avg_pool_reference(x, size), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)), elements=floats32),
       st.booleans())
def test_epilogues_and_affine_are_exact(products, relu):
    channels, batch, pixels = products.shape
    bias = np.linspace(-1, 1, channels, dtype=np.float32)
    rows = products.reshape(-1, pixels).copy()
    row_bias = np.linspace(-2, 2, pixels, dtype=np.float32)
    expected_rows = rows + row_bias
    fk.bias_act_rows(rows, row_bias, relu)
    np.testing.assert_array_equal(rows, np.maximum(expected_rows, 0) if relu else expected_rows)
    x = products.transpose(1, 0, 2).copy()
    scale, shift = np.linspace(0.5, 2, channels, dtype=np.float32), bias
    affine = np.empty_like(x)
    fk.channel_affine(x, scale, shift, affine)
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(affine, x * scale[None, :, None] + shift[None, :, None])


@SETTINGS
@given(st.integers(1, 5), st.lists(st.integers(2, 24), min_size=3, max_size=5), st.integers(0, 2**16))
def test_linear_chain_equals_its_layers_one_by_one(batch, widths, seed):
    """One call over consecutive linear layers gives the bits of the separate calls, close to NumPy's products.
    (Widths from 2: a weight with one row or column is both C- and F-contiguous, another Numba type, which
    ``steps.chain_calls`` leaves out of a chain.)"""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(n, k)).astype(np.float32) for k, n in zip(widths, widths[1:], strict=False)]
    biases = [rng.normal(size=w.shape[0]).astype(np.float32) for w in weights]
    relus = [bool(r) for r in rng.integers(0, 2, len(weights))]
    x = rng.normal(size=(batch, widths[0])).astype(np.float32)
    chained, alone = ([np.empty((batch, w.shape[0]), np.float32) for w in weights] for _ in range(2))
    fk.linear_chain(tuple((x if i == 0 else chained[i - 1], w.T, b, r, chained[i])
                          for i, (w, b, r) in enumerate(zip(weights, biases, relus, strict=True))))
    for i, (w, b, r) in enumerate(zip(weights, biases, relus, strict=True)):
        fk.linear_bias_act(x if i == 0 else alone[i - 1], w.T, b, r, alone[i])
    for a, b in zip(chained, alone, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(chained[-1], fk.linear_chain_reference(x, weights, biases, relus), rtol=1e-4,
                               atol=1e-4 * max(1.0, float(np.abs(chained[-1]).max())))


def expected_conv(padded, weight, bias, groups, stride, dilation, relu, pool):
    out = fk.direct_conv_reference(padded, weight, bias, groups, (stride,) * 2, (dilation,) * 2, relu)
    return fk.max_pool_reference(out, pool, pool, (0, 0)) if pool != (1, 1) else out


@SETTINGS
@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 3)]), st.integers(1, 5), st.integers(1, 2),
       st.integers(4, 9), st.booleans(), st.sampled_from([(1, 1), (2, 2), (1, 3)]), st.integers(0, 2**16))
def test_unit_stride_direct_conv_matches_the_reference(batch, channels_groups, kernel, dilation, size, relu, pool,
                                                       seed):
    in_channels, groups = channels_groups
    rng = np.random.default_rng(seed)
    span = dilation * (kernel - 1)  # the output is size x (size + 1) for every kernel size (3 and 5 sweep rows)
    padded = rng.normal(size=(batch, in_channels, size + span, size + span + 1)).astype(np.float32)
    weight = rng.normal(size=(2 * groups, in_channels // groups, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=2 * groups).astype(np.float32)
    expected = expected_conv(padded, weight, bias, groups, 1, dilation, relu, pool)
    conv_h, conv_w = padded.shape[2] - dilation * (kernel - 1), padded.shape[3] - dilation * (kernel - 1)
    out = np.empty(expected.shape, np.float32)
    acc = np.empty((conv_h - 1) * padded.shape[3] + conv_w, np.float32)
    fk.direct_conv_unit_stride(padded, weight, bias, groups, dilation, dilation, relu, *pool, acc, out)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def run_row_tiles(padded, weight, bias, groups, dilation, relu, pool, expected_shape):
    kernel = weight.shape[2:]
    conv_h, conv_w = (padded.shape[2 + a] - dilation * (kernel[a] - 1) for a in range(2))
    taps = float_conv_avx2.offsets(padded.shape, kernel, (1, 1), (dilation,) * 2, weight.shape[1], (1, 1), 1)[0]
    step = float_conv_avx2.ROW_TILE_VECTORS * float_conv_avx2.LANES
    planes = np.empty((float_conv_avx2.ROW_TILE_CHANNELS, -(-((conv_h - 1) * padded.shape[3] + conv_w) // step) * step),
                      np.float32)
    out = np.full(expected_shape, np.nan, np.float32)
    fk.direct_conv_row_tiles(padded, fk.pack_row_tile_weights(weight, groups), taps, bias, relu, *pool,
                             np.empty(padded[0].size + step, np.float32), planes, out)
    return out


@SETTINGS
@given(st.integers(1, 3), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 3)]), st.integers(1, 7), st.integers(1, 5),
       st.integers(1, 2), st.integers(4, 9), st.booleans(), st.sampled_from([(1, 1), (2, 2), (1, 3)]), st.booleans(),
       st.integers(0, 2**16))
def test_row_tiled_direct_conv_matches_the_reference(batch, channels_groups, per_group, kernel, dilation, size, relu,
                                                     pool, integers, seed):
    """The register row tiles (AVX2) give the portable direct loop's output: to float tolerance on real values,
    bit for bit on small integers (every sum exact); 1 to 7 output channels per group (one or two blocks of 6)."""
    if not float_conv_avx2.available():
        pytest.skip("the register-tiled float convolutions need AVX2 (CPU, Numba's target, NANOOPT_CPU_FEATURES)")
    in_channels, groups = channels_groups
    rng = np.random.default_rng(seed)
    draw = (lambda s: rng.integers(-8, 9, size=s).astype(np.float32)) if integers else \
        (lambda s: rng.normal(size=s).astype(np.float32))
    span = dilation * (kernel - 1)
    padded = draw((batch, in_channels, size + span, size + span + 2))
    weight = draw((per_group * groups, in_channels // groups, kernel, kernel))
    bias = draw(per_group * groups)
    expected = expected_conv(padded, weight, bias, groups, 1, dilation, relu, pool)
    out = run_row_tiles(padded, weight, bias, groups, dilation, relu, pool, expected.shape)
    if integers:
        np.testing.assert_array_equal(out, expected)
    else:
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(st.integers(1, 5), st.sampled_from([(1, 1), (4, 2), (3, 3)]), st.integers(1, 3), st.integers(1, 2),
       st.integers(1, 2), st.integers(4, 8), st.integers(1, 3), st.booleans(), st.sampled_from([(1, 1), (2, 2)]),
       st.integers(0, 2**16))
def test_im2col_gemm_conv_matches_the_reference(batch, channels_groups, kernel, stride, dilation, size, block, relu,
                                                pool, seed):
    in_channels, groups = channels_groups
    rng = np.random.default_rng(seed)
    padded = rng.normal(size=(batch, in_channels, size + 4, size + 4)).astype(np.float32)
    weight = rng.normal(size=(2 * groups, in_channels // groups, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=2 * groups).astype(np.float32)
    conv = fk.direct_conv_reference(padded, weight, bias, groups, (stride,) * 2, (dilation,) * 2, relu)
    conv_h, conv_w = conv.shape[2:]
    expected = expected_conv(padded, weight, bias, groups, stride, dilation, relu, pool)
    out = np.empty(expected.shape, np.float32)
    columns, depth = fk.im2col_columns(conv_h, conv_w, padded.shape[3], (stride,) * 2), weight[0].size
    cols, products = np.empty((depth, block * columns), np.float32), np.empty((2, block * columns), np.float32)
    fk.im2col_gemm_conv(padded, weight.reshape(groups, 2, depth), bias, kernel, kernel, stride, stride, dilation,
                        dilation, relu, *pool, conv_h, conv_w, cols, products, out)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(hnp.arrays(st.sampled_from([np.float32, np.int8, np.int16]), st.tuples(st.integers(1, 2), st.integers(1, 3),
                                                                             st.integers(2, 7), st.integers(2, 7))),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 1))
def test_max_pool_is_exact(x, kernel, stride, padding):
    if x.dtype == np.float32:
        x = np.nan_to_num(x)
    kernel = min(kernel, x.shape[2], x.shape[3])
    padding = min(padding, kernel // 2)
    out_h, out_w = (x.shape[2] + 2 * padding - kernel) // stride + 1, (x.shape[3] + 2 * padding - kernel) // stride + 1
    out = np.empty(x.shape[:2] + (out_h, out_w), x.dtype)
    fk.max_pool(x, kernel, kernel, stride, stride, padding, padding, out)
    np.testing.assert_array_equal(out, fk.max_pool_reference(x, (kernel,) * 2, (stride,) * 2, (padding,) * 2))


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 5), st.integers(1, 2), st.integers(1, 2),
       st.integers(4, 8), st.integers(1, 3), st.booleans(), st.sampled_from([(1, 1), (2, 2)]), st.integers(0, 2**16))
def test_im2col_image_gemm_conv_matches_the_reference(batch, in_channels, kernel, stride, dilation, size, block, relu,
                                                      pool, seed):
    rng = np.random.default_rng(seed)
    span = dilation * (kernel - 1)
    padded = rng.normal(size=(batch, in_channels, size + span, size + span + 1)).astype(np.float32)
    weight = rng.normal(size=(3, in_channels, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    conv = fk.direct_conv_reference(padded, weight, bias, 1, (stride,) * 2, (dilation,) * 2, relu)
    conv_h, conv_w = conv.shape[2:]
    expected = expected_conv(padded, weight, bias, 1, stride, dilation, relu, pool)
    out = np.empty(expected.shape, np.float32)
    depth = weight[0].size
    cols = np.empty((block, depth, conv_h * conv_w), np.float32)
    products = np.empty((block, 3, conv_h * conv_w), np.float32)
    fk.im2col_image_gemm_conv(padded, weight.reshape(3, depth), bias, kernel, kernel, stride, stride, dilation,
                              dilation, relu, *pool, cols, products, out)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
