"""Integer-kernel edges the other strategies do not reach, every backend against the NumPy reference bit for bit.

* empty inputs (M = 0 / N = 0) through every kernel;
* GEMM and conv shapes that cross every cache block, register tile and thread split: Numba's 4x4 / 1x8 tiles,
  8-row weight panels, 64 x 64 blocks and 64-pixel conv blocks; the AVX2 kernels' 16-channel panels, 4- and
  6-row tiles, 252-row blocks, 4096-value K blocks (int8) and 510-value int32 partial sums (int16), 256-pixel
  conv items; the row split over threads (blocks of >= 64 rows) and Numba's parallel blocks -- with K not a
  multiple of 4, 8, 16 or 32, one and two threads, and the thresholds lowered so that small products split too;
* the exact wide requantization of int8 convolutions (multipliers >= 1, shifts > 30, accumulators past int32),
  on every conv path (thin loop, tiles, AVX2 im2col);
* accumulator bounds at the int32 limit (the fast path up to INT32_MAX, the wide path from INT32_MAX + 1), the
  raw GEMM's refusal exactly past it, and the K fallbacks past the AVX2 limit (``MAX_K_S8``) and Numba's
  fused limit (``MAX_FUSED_K``);
* int16 activations at both ends of their range, in the kernels and in a converted 16x8 model.
"""

from __future__ import annotations

import contextlib
import warnings

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanoopt as no
import nanoopt.kernels as kernels
from nanoopt import models, quant
from nanoopt.kernels import avx2, numba_gemm, x86_glue
from nanoopt.kernels import reference as ref
from nanoopt.spec import INT32_MAX, QuantSpec, quantize_multiplier

INT8 = QuantSpec()
INT16 = QuantSpec(bits=16)
HAS_AVX2 = kernels.avx2_available()
BACKENDS = ["numba", pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 kernels here")),
            "auto"]
FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the backend fixture is constant over a test's examples
BIG = settings(max_examples=6, deadline=None, suppress_health_check=FIXTURE_OK)  # large shapes: a few examples
SMALL = settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
MAX_THREADS = numba.config.NUMBA_NUM_THREADS

# Sizes on both sides of every block/tile boundary (odd K: never a multiple of 4, 8, 16 or 32).
ROWS = [1, 2, 3, 5, 6, 7, 63, 64, 65, 127, 128, 129, 251, 252, 253, 255, 256, 257, 259, 300, 505, 509]
CHANNELS = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 70, 129]
DEPTHS = [1, 3, 5, 7, 31, 33, 63, 65, 127, 129, 255, 257, 301, 509, 511, 1021]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with kernels.use_backend(request.param):
        yield request.param


@contextlib.contextmanager
def threads_and_split(threads: int, force_split: bool):
    """Run with ``threads`` Numba threads; with ``force_split`` every product goes to the parallel drivers and
    the AVX2 row split takes blocks of 3 rows (so small products cross the split as well)."""
    threads = min(threads, MAX_THREADS)
    previous = (numba.get_num_threads(), numba_gemm.PARALLEL_MIN_OPS, x86_glue.AVX2_PARALLEL_MIN_ROWS)
    numba.set_num_threads(threads)
    if force_split:
        numba_gemm.PARALLEL_MIN_OPS, x86_glue.AVX2_PARALLEL_MIN_ROWS = 0, 3
    try:
        yield
    finally:
        numba.set_num_threads(previous[0])
        numba_gemm.PARALLEL_MIN_OPS, x86_glue.AVX2_PARALLEL_MIN_ROWS = previous[1:]


def values(rng, shape, low, high, dtype, style="random"):
    """Random codes; ``"extremes"``: only ``low`` and ``high``; ``"low"``/``"high"``: half the rows pinned."""
    out = rng.integers(low, high + 1, size=shape)
    if style == "extremes":
        out = np.where(rng.random(shape) < 0.5, low, high)
    elif style == "low":
        out[: max(1, shape[0] // 2)] = low
    elif style == "high":
        out[: max(1, shape[0] // 2)] = high
    return out.astype(dtype)


def weight_low(backend: str) -> int:
    return -127 if backend == "avx2" else -128  # the AVX2 int8 kernel takes narrow-range weights only


def assert_same(actual, expected, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    np.testing.assert_array_equal(actual, expected, err_msg=what)


# ------------------------------------------------------------------------------------------ empty inputs
def test_empty_inputs_through_every_kernel(backend):
    rng = np.random.default_rng(0)
    w8 = values(rng, (9, 33), -127, 127, np.int8)
    w16 = values(rng, (9, 33), -32768, 32767, np.int16)
    m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-2, 9))
    x8, x16 = np.zeros((0, 33), np.int8), np.zeros((0, 33), np.int16)
    assert_same(kernels.gemm_s8s8s32(x8, w8, 3), ref.gemm_s8s8s32(x8, w8, 3))
    assert_same(kernels.gemm_s16s8s64(x16, w8), ref.gemm_s16s8s64(x16, w8))
    if backend != "avx2":
        assert_same(kernels.gemm_s16s16s64(x16, w16), ref.gemm_s16s16s64(x16, w16))
    assert_same(kernels.prepare_linear(w8, None, 3, m0, shift, 1, INT8)(x8),
                ref.quantized_linear(x8, w8, None, 3, m0, shift, 1, INT8))
    assert_same(kernels.prepare_linear(w8, None, 0, m0, shift, 1, INT16, x_dtype=np.int16)(x16),
                ref.quantized_linear(x16, w8, None, 0, m0, shift, 1, INT16))
    for spec in (INT8, INT16):
        x = np.zeros((0, 3, 6, 5), spec.dtype)
        assert_same(kernels.quantized_max_pool2d(x, 2), ref.quantized_max_pool2d(x, 2))
        assert_same(kernels.quantized_avg_pool2d(x, 1, 3, 2, 1), ref.quantized_avg_pool2d(x, 1, 3, 2, 1))
        assert_same(kernels.quantized_add(x, 0.5, 0, x, 0.25, 0, 0.1, 0, spec),
                    ref.quantized_add(x, 0.5, 0, x, 0.25, 0, 0.1, 0, spec))
        assert_same(kernels.quantized_relu(x, 0), ref.quantized_relu(x, 0))


# ------------------------------------------------------------------------------------------ GEMM shapes
@BIG
@given(data=st.data())
def test_linear_shapes_cross_every_block_tile_and_thread_split(backend, data):
    m, n, k = data.draw(st.sampled_from(ROWS)), data.draw(st.sampled_from(CHANNELS)), data.draw(st.sampled_from(DEPTHS))
    threads, force_split = data.draw(st.sampled_from([1, 2])), data.draw(st.booleans())
    mode = data.draw(st.sampled_from(["int8", "16x8", "16x16"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    style = data.draw(st.sampled_from(["random", "extremes", "low", "high"]))
    if mode == "int8":
        x, spec, bias_dtype = values(rng, (m, k), -128, 127, np.int8, style), INT8, np.int32
        w = values(rng, (n, k), weight_low(backend), 127, np.int8, style)
        x_zp = data.draw(st.sampled_from([-128, 0, 127, int(rng.integers(-128, 128))]))
        real = (1e-5, 1e-2)
    else:
        x, spec, bias_dtype, x_zp = values(rng, (m, k), -32768, 32767, np.int16, style), INT16, np.int64, 0
        w = values(rng, (n, k), -128, 127, np.int8, style) if mode == "16x8" else values(
            rng, (n, k), -32768, 32767, np.int16, style)
        real = (1e-9, 1e-5) if mode == "16x8" else (1e-13, 1e-9)
    if backend == "avx2" and mode == "16x16":
        return  # the AVX2 kernels multiply int8 weights (forcing them on int16 weights is tested elsewhere)
    bias = rng.integers(-(2**20), 2**20, size=n).astype(bias_dtype)
    m0, shift = quantize_multiplier(rng.uniform(*real, size=n))
    expected = ref.quantized_linear(x, w, bias, x_zp, m0, shift, 5, spec, relu=False)
    with threads_and_split(threads, force_split):
        layer = kernels.prepare_linear(w, bias, x_zp, m0, shift, 5, spec, x_dtype=x.dtype)
        assert_same(layer(x), expected, f"{mode} {m}x{k}x{n}")
        if mode == "int8":
            assert_same(kernels.gemm_s8s8s32(x, w, x_zp), ref.gemm_s8s8s32(x, w, x_zp))
        elif mode == "16x8":
            assert_same(kernels.gemm_s16s8s64(x, w), ref.gemm_s16s8s64(x, w))
        else:
            assert_same(kernels.gemm_s16s16s64(x, w), ref.gemm_s16s16s64(x, w))


@BIG
@given(data=st.data())
def test_long_k_crosses_the_k_blocks(backend, data):
    """K past the AVX2 int8 K block (4096) and int16 partial sums (510), with M past the 252-row block."""
    m, n = data.draw(st.sampled_from([251, 253, 257, 300])), data.draw(st.sampled_from([1, 9, 17]))
    int16 = data.draw(st.booleans())
    k = data.draw(st.sampled_from([509, 511, 1021, 1531, 4097]) if int16 else st.sampled_from([4095, 4097,
                                                                                              4099, 8197]))
    threads = data.draw(st.sampled_from([1, 2]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    style = data.draw(st.sampled_from(["random", "extremes"]))
    if int16:
        x, spec, x_zp, real = values(rng, (m, k), -32768, 32767, np.int16, style), INT16, 0, (1e-10, 1e-7)
        w = values(rng, (n, k), -128, 127, np.int8, style)
    else:
        x, spec, x_zp, real = values(rng, (m, k), -128, 127, np.int8, style), INT8, -7, (1e-6, 1e-4)
        w = values(rng, (n, k), weight_low(backend), 127, np.int8, style)
    m0, shift = quantize_multiplier(rng.uniform(*real, size=n))
    expected = ref.quantized_linear(x, w, None, x_zp, m0, shift, -1, spec)
    with threads_and_split(threads, False):
        assert_same(kernels.prepare_linear(w, None, x_zp, m0, shift, -1, spec, x_dtype=x.dtype)(x), expected)
        if int16:
            assert_same(kernels.gemm_s16s8s64(x, w), ref.gemm_s16s8s64(x, w))
        else:
            assert_same(kernels.gemm_s8s8s32(x, w, 0), ref.gemm_s8s8s32(x, w, 0))


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 kernels here")
@pytest.mark.parametrize("kernel_name", ["avx2", "avx-vnni"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_raw_int8_kernels_and_their_thread_drivers_cross_row_blocks(kernel_name, data):
    """Both int8 kernels (not only the one this CPU selects) and their parallel drivers, rows past 252/6/4."""
    if kernel_name == "avx-vnni" and not avx2.target_has_avx_vnni():
        pytest.skip("the target has no AVX-VNNI")
    m, n = data.draw(st.sampled_from(ROWS)), data.draw(st.sampled_from(CHANNELS))
    k = data.draw(st.sampled_from(DEPTHS + [4097]))
    rows_per_item = data.draw(st.sampled_from([1, 5, 6, 64, 252, 253]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    style = data.draw(st.sampled_from(["random", "extremes"]))
    a, w = values(rng, (m, k), -128, 127, np.int8, style), values(rng, (n, k), -127, 127, np.int8, style)
    exact = a.astype(np.int64) @ w.T.astype(np.int64)
    panels = avx2.pack_weights_s8(w).panels
    kernel = avx2.gemm_s8s8s32_vnni_into if kernel_name == "avx-vnni" else avx2.gemm_s8s8s32_avx2_into
    out = np.full((m, n), -1, np.int32)
    kernel(a, panels, n, k, out)
    np.testing.assert_array_equal(out, exact)
    driver = x86_glue.external_s8_drivers(kernel_name)[0]
    out = np.full((m, n), -1, np.int32)
    with threads_and_split(2, False):
        driver(a, panels, n, k, out, rows_per_item)
    np.testing.assert_array_equal(out, exact)


# ------------------------------------------------------------------------------------------ conv shapes
def draw_conv(data, rng, backend, x_dtype=np.int8):
    """A conv whose pixels per image cross 64 and 256, channels per group cross 4/8/16 and depth is odd."""
    groups = data.draw(st.sampled_from([1, 1, 2, 3]))
    per_group = data.draw(st.sampled_from([1, 3, 4, 5, 8, 9, 16, 17]))
    group_channels = data.draw(st.sampled_from([1, 3, 5, 11, 13]))
    kh, kw = data.draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 3)]))
    stride = data.draw(st.sampled_from([1, 1, 2]))
    height, width = data.draw(st.sampled_from([(8, 8), (8, 9), (16, 16), (17, 16), (16, 17), (23, 12)]))
    batch = data.draw(st.sampled_from([1, 2, 3]))
    x_range = (-128, 127) if x_dtype == np.int8 else (-32768, 32767)
    style = data.draw(st.sampled_from(["random", "extremes", "low"]))
    x = values(rng, (batch, groups * group_channels, height, width), *x_range, x_dtype, style)
    low = weight_low(backend) if per_group >= 4 else -128
    w = values(rng, (groups * per_group, group_channels, kh, kw), low, 127, np.int8, style)
    return x, w, groups, stride


def check_conv(backend, x, w, args, what):
    """Every path the backend has for this layer equals the reference (Numba: the thin loop and the tiles)."""
    expected = ref.quantized_conv2d(x, w, *args)
    layer = kernels.prepare_conv2d(w, *args[:-2], groups=args[-2], relu=args[-1], x_dtype=x.dtype)
    try:
        actual = layer(x)
    except RuntimeError as error:  # forced AVX2 on int16 / depthwise layers (refused, tested in test_int_kernels)
        assert backend == "avx2" and "was forced but cannot run" in str(error)
        return
    assert_same(actual, expected, what)
    if backend == "numba" and x.dtype == np.int8 and w.dtype == np.int8:
        for thin in (True, False):
            layer.plan.thin = thin
            assert_same(layer(x), expected, f"{what} thin={thin}")


@BIG
@given(data=st.data())
def test_conv_shapes_cross_every_block_tile_and_thread_split(backend, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x_dtype = data.draw(st.sampled_from([np.int8, np.int8, np.int16]))
    x, w, groups, stride = draw_conv(data, rng, backend, x_dtype)
    spec = INT8 if x_dtype == np.int8 else INT16
    m0, shift = quantize_multiplier(rng.uniform(*((1e-4, 1e-2) if x_dtype == np.int8 else (1e-8, 1e-6)),
                                                size=w.shape[0]))
    x_zp = int(rng.integers(-128, 128)) if x_dtype == np.int8 else 0
    args = (None, x_zp, m0, shift, 3, spec, stride, 1, 1, groups, data.draw(st.booleans()))
    threads, force_split = data.draw(st.sampled_from([1, 2])), data.draw(st.booleans())
    with threads_and_split(threads, force_split):
        check_conv(backend, x, w, args, f"x {x.shape} w {w.shape} groups {groups} stride {stride}")


# ----------------------------------------------------------------------------- wide requantization (conv)
@SMALL
@given(data=st.data())
def test_conv_wide_requantization(backend, data):
    """int8 convs with multipliers >= 1 (left shifts), shifts > 30, and biases that push the accumulator bound
    past int32: the exact int64 requantization on every conv path, as drawn for linear layers."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x, w, groups, stride = draw_conv(data, rng, backend)
    low, high = data.draw(st.sampled_from([(1e-5, 0.05), (1e-13, 1e-9), (0.5, 3.0)]))  # right, long, left shifts
    per_channel = data.draw(st.booleans())
    real = rng.uniform(low, high, size=w.shape[0]) if per_channel else data.draw(st.floats(low, high))
    m0, shift = quantize_multiplier(real)
    bias_size = data.draw(st.sampled_from([2**8, 2**20, INT32_MAX]))
    bias = rng.integers(-bias_size, bias_size, size=w.shape[0], endpoint=True).astype(np.int32)
    if low >= 0.5:  # left shifts: keep the accumulators small so that the outputs are not all saturated
        x = values(rng, x.shape, -3, 3, np.int8)
        bias = rng.integers(-20, 21, size=w.shape[0]).astype(np.int32)
    x_zp = data.draw(st.sampled_from([-128, 127, 0]))
    if low >= 0.5:
        x_zp = 0
    args = (bias, x_zp, m0, shift, data.draw(st.sampled_from([-128, 0, 127])), INT8, stride, 1, 1, groups,
            data.draw(st.booleans()))
    check_conv(backend, x, w, args, f"multiplier in [{low}, {high}], bias {bias_size}")


@pytest.mark.parametrize("real", [1.0, 2.0, 2.7, 2.0**-32, 1.5 * 2.0**-32, 1.9 * 2.0**-32])
def test_conv_wide_path_is_taken_and_exact(backend, real):
    """The cases above do reach the wide path: the plan says so, and the outputs are not all saturated."""
    rng = np.random.default_rng(3)
    big = real < 1
    x = values(rng, (2, 16, 17, 16), -128 if big else -4, 127 if big else 4, np.int8)
    w = values(rng, (20, 16, 3, 3), weight_low(backend) if big else -3, 127 if big else 3, np.int8)
    bias = np.full(20, INT32_MAX if big else 7, np.int32)  # with long shifts, the bound passes int32
    bias[::2] = -INT32_MAX if big else -7
    m0, shift = quantize_multiplier(real)
    args = (bias, 0, m0, shift, 0, INT8, 1, 1, 1, 1, False)
    layer = kernels.prepare_conv2d(w, *args[:-2])
    assert layer.plan.tail[-1] is False  # "fast" is off: the exact wide requantization runs
    assert (int(shift) < 0) if real >= 1 else (int(shift) > 30)
    expected = ref.quantized_conv2d(x, w, *args)
    assert len(np.unique(expected)) >= (3 if real >= 1 else 2)  # a spread of outputs (int8 accumulators stay
    # below 2^32, so a multiplier under 2^-31 can only give -1, 0 or 1)
    check_conv(backend, x, w, args, f"multiplier {real}")


# ------------------------------------------------------------------------------- the int32 limit and K limits
@pytest.mark.parametrize("excess", [0, 1])
@pytest.mark.parametrize("sign", [1, -1])
def test_accumulator_bound_at_the_int32_limit(backend, excess, sign):
    """A bias that puts the worst-case accumulator exactly at INT32_MAX (the branch-free int32 requantization)
    or one past it (the wide path), with an input that reaches that worst case."""
    k, n = 1000, 9
    w = np.full((n, k), 127 * sign, np.int8)
    raw = 255 * 127 * k  # |sum_k (x - zp) w| with x = 127, zp = -128
    bias = np.full(n, sign * (INT32_MAX - raw + excess), np.int32)  # accumulator up to sign * (INT32_MAX + excess)
    x = np.full((5, k), 127, np.int8)
    x[1] = -128  # the other end: accumulator = bias
    x[2] = values(np.random.default_rng(0), (k,), -128, 127, np.int8)
    m0, shift = quantize_multiplier(2.0**-26)
    bound = ref.accumulator_bound(w, -128, 127, -128, bias)
    assert int(bound.max()) == INT32_MAX + excess
    layer = kernels.prepare_linear(w, bias, -128, m0, shift, 0, INT8)
    assert layer.plan.tail[-1] is (excess == 0)  # fast path up to INT32_MAX, wide past it
    expected = ref.quantized_linear(x, w, bias, -128, m0, shift, 0, INT8)
    assert int(expected[0, 0]) == 32 * sign  # (2^31 - 1 + excess) / 2^26, rounded: the limit reached, not saturated
    assert_same(layer(x), expected)


@pytest.mark.parametrize(
    "k, x_zp, weight, safe",
    [
        (avx2.MAX_K_S8, 0, 127, True),  # raw sums up to 128 * 127 * K = 2147478528
        (avx2.MAX_K_S8 + 1, 0, 127, False),
        (66311, 127, -127, True),  # |x - zp| up to 255: 255 * 127 * 66311 = 2147481635
        (66312, 127, -127, False),
    ],
)
def test_raw_gemm_refuses_exactly_past_the_int32_limit(backend, k, x_zp, weight, safe):
    w = np.full((3, k), weight, np.int8)
    x = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8)])
    assert ref.int32_accumulation_is_safe(w, -128, 127, x_zp) is safe
    if safe:
        expected = ref.gemm_s8s8s32(x, w, x_zp)
        assert int(np.abs(expected.astype(np.int64)).max()) > 2**31 - 2**14  # the limit itself is reached
        assert_same(kernels.gemm_s8s8s32(x, w, x_zp), expected)
        return
    with pytest.raises(ref.AccumulatorOverflowError, match="overflow int32"):
        ref.gemm_s8s8s32(x, w, x_zp)
    if backend == "avx2" and k > avx2.MAX_K_S8:
        with pytest.raises(RuntimeError, match=f"K = {k} exceeds the AVX2 int32 limit {avx2.MAX_K_S8}"):
            kernels.gemm_s8s8s32(x, w, x_zp)
    else:
        with pytest.raises(ref.AccumulatorOverflowError, match="overflow int32"):
            kernels.gemm_s8s8s32(x, w, x_zp)


@pytest.mark.parametrize("k", [numba_gemm.MAX_FUSED_K, numba_gemm.MAX_FUSED_K + 1, avx2.MAX_K_S8, avx2.MAX_K_S8 + 1])
def test_k_fallbacks_past_the_avx2_and_numba_limits(backend, k):
    """int8 layers: AVX2 up to MAX_K_S8 (auto falls back to Numba past it, forced AVX2 refuses naming K), Numba's
    fused tiles up to MAX_FUSED_K (the int64 reference past it); 16x8 layers: exact for any K everywhere."""
    rng = np.random.default_rng(k)
    x = values(rng, (3, k), -128, 127, np.int8, "extremes")
    x[0] = -128
    w = values(rng, (17, k), -127, 127, np.int8, "extremes")  # 17: one full 16-channel panel and one more
    w[0], w[1] = 127, -127
    m0, shift = quantize_multiplier(1e-9)
    expected = ref.quantized_linear(x, w, None, 3, m0, shift, 0, INT8)
    layer = kernels.prepare_linear(w, None, 3, m0, shift, 0, INT8)
    if backend == "auto":
        assert layer.backend_for() == ("avx2" if HAS_AVX2 and k <= avx2.MAX_K_S8 else "numba")
    if backend == "avx2" and k > avx2.MAX_K_S8:
        with pytest.raises(RuntimeError, match=f"K = {k} exceeds the AVX2 int32 limit"):
            layer(x)
    else:
        assert_same(layer(x), expected)
    x16 = values(rng, (2, k), -32768, 32767, np.int16, "extremes")
    x16[0] = -32768
    w8 = values(rng, (17, k), -128, 127, np.int8, "extremes")
    w8[0] = -128
    m0, shift = quantize_multiplier(2e-9)
    expected16 = ref.quantized_linear(x16, w8, None, 0, m0, shift, 0, INT16)
    assert_same(kernels.prepare_linear(w8, None, 0, m0, shift, 0, INT16, x_dtype=np.int16)(x16), expected16)
    assert_same(kernels.gemm_s16s8s64(x16, w8), ref.gemm_s16s8s64(x16, w8))


def test_conv_depth_past_the_fused_limit(backend):
    channels = -(-(numba_gemm.MAX_FUSED_K + 1) // 9)  # 3x3 taps: depth 9 * channels > MAX_FUSED_K
    rng = np.random.default_rng(1)
    x = values(rng, (1, channels, 3, 4), -128, 127, np.int8, "extremes")
    w = values(rng, (5, channels, 3, 3), -127, 127, np.int8, "extremes")
    m0, shift = quantize_multiplier(1e-8)
    args = (None, -1, m0, shift, 0, INT8, 1, 0, 1, 1, False)
    layer = kernels.prepare_conv2d(w, *args[:-2])
    if backend == "avx2":
        with pytest.raises(RuntimeError, match=f"reduction depth {9 * channels} exceeds {numba_gemm.MAX_FUSED_K}"):
            layer(x)
        return
    assert layer.backend_for() == "numba"
    assert_same(layer(x), ref.quantized_conv2d(x, w, *args))


# ---------------------------------------------------------------------------------- int16 at both ends
@SMALL
@given(data=st.data())
def test_int16_activations_at_both_ends(backend, data):
    """Inputs only -32768 and 32767 (and outputs saturating at both ends): linear (K past 510), conv, add, pools."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    m, n = data.draw(st.sampled_from([1, 4, 5, 130])), data.draw(st.sampled_from([1, 16, 17]))
    k = data.draw(st.sampled_from([1, 3, 509, 511, 1021]))
    x = values(rng, (m, k), -32768, 32767, np.int16, "extremes")
    w_dtype = data.draw(st.sampled_from([np.int8, np.int16]))
    info = np.iinfo(w_dtype)
    w = values(rng, (n, k), info.min, info.max, w_dtype, data.draw(st.sampled_from(["extremes", "random"])))
    bias = rng.integers(-(2**40), 2**40, size=n).astype(np.int64)
    real = data.draw(st.sampled_from([(1e-9, 1e-6), (1e-4, 1e-2), (1e-14, 1e-12)]))  # saturating, or not
    m0, shift = quantize_multiplier(rng.uniform(*real, size=n))
    out_zp = data.draw(st.sampled_from([-32768, 0, 32767]))
    relu = data.draw(st.booleans())
    expected = ref.quantized_linear(x, w, bias, 0, m0, shift, out_zp, INT16, relu)
    layer = kernels.prepare_linear(w, bias, 0, m0, shift, out_zp, INT16, relu, x_dtype=np.int16)
    if backend == "avx2" and w_dtype == np.int16:
        with pytest.raises(RuntimeError, match="int16 weights"):
            layer(x)
    else:
        assert_same(layer(x), expected)
    image = values(rng, (2, 4, 7, 6), -32768, 32767, np.int16, "extremes")
    w_conv = values(rng, (data.draw(st.sampled_from([2, 8])), 4, 3, 3), info.min, info.max, w_dtype, "extremes")
    m0, shift = quantize_multiplier(rng.uniform(1e-9, 1e-5, size=w_conv.shape[0]))
    args = (rng.integers(-(2**40), 2**40, size=w_conv.shape[0]).astype(np.int64), 0, m0, shift, out_zp, INT16, 1,
            1, 1, 1, relu)
    check_conv(backend, image, w_conv, args, "int16 conv at both ends")
    other = values(rng, image.shape, -32768, 32767, np.int16, "extremes")
    scales = [np.float32(data.draw(st.floats(1e-3, 10.0))) for _ in range(3)]
    add_args = (image, scales[0], 0, other, scales[1], 0, scales[2], out_zp, INT16, relu)
    assert_same(kernels.quantized_add(*add_args), ref.quantized_add(*add_args))
    assert_same(kernels.quantized_max_pool2d(image, 3, 2, 1), ref.quantized_max_pool2d(image, 3, 2, 1))
    assert_same(kernels.quantized_avg_pool2d(image, 0, 2, 1, 1, False),
                ref.quantized_avg_pool2d(image, 0, 2, 1, 1, False))


@pytest.mark.parametrize("model_name", ["lenet5", "small_resnet"])
def test_16x8_model_at_both_ends_of_int16(model_name):
    """A converted 16x8 model fed inputs far outside its calibrated range (input codes -32768 and 32767): every
    backend gives the reference's integers, and the prepared model's simulation equals them bit for bit."""
    no.manual_seed(0)
    model = models.lenet5(input_size=8) if model_name == "lenet5" else models.small_resnet(widths=(4, 8))
    model.eval()
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 1, size=(32, 1, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prepared = quant.calibrate(quant.prepare(model, quant.QuantConfig.int16_activations(), calibration[:1]),
                                   calibration, progress=False)
    integer = quant.convert(prepared)
    x = np.where(rng.random((6, 1, 8, 8)) < 0.5, -1e4, 1e4).astype(np.float32)  # far past the calibrated [0, 1]
    codes = integer.quantize_input(x)
    assert codes.min() == -32768 and codes.max() == 32767
    with kernels.use_backend("reference"):
        expected = integer.forward_int(codes)
    assert len(np.unique(expected)) > 3  # the outputs are not one saturated constant
    for backend in ["numba", "auto"]:  # (forcing "avx2" refuses the int16 convs; "auto" runs it on the linears)
        with kernels.use_backend(backend):
            assert_same(integer.forward_int(codes), expected, backend)
    np.testing.assert_array_equal(prepared(no.Tensor(x)).data, integer(x).data)
