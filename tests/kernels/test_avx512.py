"""AVX-512 VNNI int8 GEMM and fused int8 linear layer: bit-exact against int64 NumPy and the reference layer.

Skipped with a reason where the CPU, Numba's target or ``NANOOPT_CPU_FEATURES`` leave no AVX-512 VNNI; the
choice itself (which kernel runs under which feature set) is tested in ``test_cpu_dispatch.py`` on other machines'
feature sets too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt.kernels as kernels
from nanoopt.kernels import avx2, avx512
from nanoopt.kernels import reference as ref
from nanoopt.spec import QuantSpec, quantize_multiplier


@pytest.fixture(scope="module")
def kernels512():
    """The module, or a skip where the 512-bit kernels cannot run; a failed self-test on a capable target fails."""
    if not avx512.available():
        if avx512.target_has_avx512_vnni() and avx2.available():
            pytest.fail("the target has AVX-512 VNNI but the 512-bit kernel failed its self-test")
        pytest.skip("AVX-512 VNNI kernels not available here (CPU, NUMBA_CPU_NAME/FEATURES or NANOOPT_CPU_FEATURES "
                    "without avx512f/avx512bw/avx512vnni, or the AVX2 kernels are disabled)")
    return avx512


def operands(seed, m, k, n, extremes):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)  # (M, K)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)  # (N, K)
    if extremes:
        a[0] = -128
        w[0] = 127
        w[-1] = -127
        if m > 1:
            a[-1] = 127
    return a, w


def exact(a, w):
    return a.astype(np.int64) @ w.T.astype(np.int64)  # (M, N)


# M up to 19: two 8-row tiles and single rows; N up to 70: odd and even panel counts, partial last panels
shapes = st.tuples(st.integers(1, 19), st.integers(1, 70), st.integers(1, 70))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), extremes=st.booleans())
def test_gemm_matches_int64_and_the_256_bit_kernel(kernels512, shape, seed, extremes):
    m, k, n = shape
    a, w = operands(seed, m, k, n, extremes)
    packed = avx2.pack_weights_s8(w)
    out = np.full((m, n), 7, np.int32)
    kernels512.gemm_s8s8s32_avx512_into(a, packed.panels, n, k, out)
    np.testing.assert_array_equal(out, exact(a, w))
    reference = np.empty((m, n), np.int32)
    avx2.gemm_s8s8s32_into_reference(a, packed.panels, n, k, reference)
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize("m, k, n", [(9, 4097, 33), (1, 8195, 17), (16, 4096, 32)])
def test_gemm_across_k_blocks(kernels512, m, k, n):
    a, w = operands(m + k + n, m, k, n, True)
    out = np.empty((m, n), np.int32)
    kernels512.gemm_s8s8s32_avx512_into(a, avx2.pack_weights_s8(w).panels, n, k, out)
    np.testing.assert_array_equal(out, exact(a, w))


def test_gemm_at_the_int32_limit(kernels512):
    """-128 against +-127 over K = MAX_K_S8 - 1: sums next to +-2^31, where any wrap would show."""
    k = avx2.MAX_K_S8 - 1
    a = np.full((2, k), -128, np.int8)
    w = np.stack([np.full(k, 127, np.int8), np.full(k, -127, np.int8)])
    out = np.empty((2, 2), np.int32)
    kernels512.gemm_s8s8s32_avx512_into(a, avx2.pack_weights_s8(w).panels, 2, k, out)
    np.testing.assert_array_equal(out, exact(a, w))
    assert abs(int(out[0, 0])) > 2**31 - 20000


@pytest.mark.parametrize("m, k, n", [(0, 5, 3), (3, 0, 5), (4, 6, 0)])
def test_gemm_empty_dimensions(kernels512, m, k, n):
    out = np.full((m, n), 9, np.int32)
    kernels512.gemm_s8s8s32_avx512_into(np.zeros((m, k), np.int8), avx2.pack_weights_s8(np.zeros((n, k), np.int8))
                                        .panels, n, k, out)
    np.testing.assert_array_equal(out, np.zeros((m, n), np.int32))


def test_gemm_checks_shapes(kernels512):
    packed = avx2.pack_weights_s8(np.ones((3, 8), np.int8))
    with pytest.raises(ValueError, match="out must have shape"):
        kernels512.gemm_s8s8s32_avx512_into(np.ones((2, 8), np.int8), packed.panels, 3, 8, np.empty((2, 4), np.int32))
    with pytest.raises(ValueError, match="a must have k columns"):
        kernels512.gemm_s8s8s32_avx512_into(np.ones((2, 7), np.int8), packed.panels, 3, 8, np.empty((2, 3), np.int32))


layers = st.tuples(st.integers(1, 19), st.integers(1, 90), st.integers(1, 50))  # (M, K, N)


@settings(max_examples=60, deadline=None)
@given(shape=layers, seed=st.integers(0, 2**32 - 1), relu=st.booleans(), extremes=st.booleans())
def test_fused_linear_equals_the_reference_layer(kernels512, shape, seed, relu, extremes):
    """``linear_s8_into`` (requantization in registers) = ``reference.quantized_linear``, bit for bit; through
    ``prepare_linear`` on ``auto`` too. Multipliers span [1e-5, 0.5] (shifts 0..16), zero points the int8 range."""
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x, w = operands(seed, m, k, n, extremes)
    bias = rng.integers(-(2**15), 2**15, n).astype(np.int32)
    m0, shift = quantize_multiplier(rng.uniform(1e-5, 0.5, n))
    x_zp, out_zp = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    expected = ref.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, QuantSpec(), relu)
    layer = kernels.prepare_linear(w, bias, x_zp, m0, shift, out_zp, QuantSpec(), relu)
    requant = layer.requant_s8()
    assert requant is not None  # these layers fit the fused epilogue
    out = np.full((m, n), 99, np.int8)
    kernels512.linear_s8_into(x, layer.weights.avx2_s8().panels, n, k, requant, np.empty((m, n), np.int32), out)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(kernels512.linear_s8_reference(x, w, requant), expected)
    np.testing.assert_array_equal(layer(x), expected)


def test_fused_linear_across_k_blocks_and_rounding_ties(kernels512):
    """K = 4100 (two K blocks: the product, then the same vector requantization) and a multiplier of exactly 1/2
    with shift 0..2, where every odd sum is a rounding tie."""
    m, k, n = 10, 4100, 19
    x, w = operands(5, m, k, n, True)
    for shift in (0, 1, 2):
        m0 = np.full(n, 2**30, np.int32)
        shifts = np.full(n, shift, np.int32)
        expected = ref.quantized_linear(x, w, None, 3, m0, shifts, -4, QuantSpec(), False)
        layer = kernels.prepare_linear(w, None, 3, m0, shifts, -4, QuantSpec())
        out = np.empty((m, n), np.int8)
        kernels512.linear_s8_into(x, layer.weights.avx2_s8().panels, n, k, layer.requant_s8(),
                                  np.empty((m, n), np.int32), out)
        np.testing.assert_array_equal(out, expected)
        x7, w7 = np.ascontiguousarray(x[:, :7]), np.ascontiguousarray(w[:, :7])
        small = kernels.prepare_linear(w7, None, 3, m0, shifts, -4, QuantSpec())
        np.testing.assert_array_equal(small(x7), ref.quantized_linear(x7, w7, None, 3, m0, shifts, -4, QuantSpec(),
                                                                      False))


@settings(max_examples=80, deadline=None)
@given(m=st.integers(0, 27), k=st.integers(0, 150), seed=st.integers(0, 2**32 - 1), spare=st.integers(0, 9))
def test_pack_rows_equals_its_reference(m, k, seed, spare):
    """The tile layout of the activations (portable code: runs on every machine): 8-row groups interleaved by
    4-byte groups (16 groups at a time in registers from 64 K values on, the last block overlapping), the rest row
    by row, every byte + 128, K padded to a multiple of 4; into a caller's buffer, whose spare tail stays."""
    a = np.random.default_rng(seed).integers(-128, 128, size=(m, k)).astype(np.int8)
    padded_k = -(-k // 4) * 4
    packed = avx512.pack_rows(a, padded_k)
    np.testing.assert_array_equal(packed, avx512.pack_rows_reference(a))
    if m >= 8 and k >= 4:  # row 1's first 4 bytes follow row 0's in the first tile
        np.testing.assert_array_equal(packed[4:8].view(np.uint8), a[1, :4].astype(np.int16) + 128)
    buffer = np.full(m * padded_k + spare, 7, np.int8)
    avx512.pack_rows_into(a, padded_k, buffer)
    np.testing.assert_array_equal(buffer[: m * padded_k], packed)
    assert (buffer[m * padded_k :] == 7).all()


def test_pack_rows_into_refuses_a_short_buffer():
    with pytest.raises(ValueError, match="M \\* padded_k bytes"):
        avx512.pack_rows_into(np.zeros((3, 8), np.int8), 8, np.zeros(23, np.int8))


def test_buffered_linear_equals_the_plain_one(kernels512):
    """The layer with a kept buffer for its packed rows (the runtime's form) = the one that allocates it; a
    buffer reused across calls with other inputs leaves nothing behind."""
    m, k, n = 21, 300, 100
    x, w = operands(3, m, k, n, True)
    layer = kernels.prepare_linear(w, None, 2, np.full(n, 2**30, np.int32), np.full(n, 9, np.int32), -1, QuantSpec(),
                                   True)
    panels, requant = layer.weights.avx2_s8().panels, layer.requant_s8()
    packed, products = np.empty(m * k, np.int8), np.empty((m, n), np.int32)
    for seed in (3, 4):
        x, _ = operands(seed, m, k, n, seed == 3)
        expected, out = np.empty((m, n), np.int8), np.empty((m, n), np.int8)
        kernels512.linear_s8_into(x, panels, n, k, requant, products, expected)
        kernels512.linear_s8_into(x, panels, n, k, requant, products, out, packed)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out, ref.quantized_linear(x, w, None, 2, np.full(n, 2**30), np.full(n, 9), -1,
                                                                QuantSpec(), True))


int32_sums = st.integers(-(2**31) + 1, 2**31 - 1)


@settings(max_examples=150, deadline=None)
@given(sums=st.lists(int32_sums, min_size=1, max_size=40), seed=st.integers(0, 2**32 - 1), relu=st.booleans())
def test_fused_epilogue_on_any_int32_sum(kernels512, sums, seed, relu):
    """The one-step rounding of the epilogue (``(P + add - [P < -2^30] negative) >> (31 + s)``) = the spec's
    ``multiply_by_quantized_multiplier`` then clamp, on sums anywhere in int32: zero activations make each output
    channel's sum its offset. Multipliers span [2^30, 2^31), shifts 0..30, zero points the int8 range."""
    rng = np.random.default_rng(seed)
    n = len(sums)
    m0 = rng.integers(2**30, 2**31, n)
    shift = rng.integers(0, 31, n)
    zero_point = int(rng.integers(-128, 128))
    requant = avx512.requant_s8(np.array(sums), m0, shift, zero_point, zero_point if relu else -128, 127)
    x, w = np.zeros((3, 5), np.int8), rng.integers(-127, 128, size=(n, 5)).astype(np.int8)
    out = np.full((3, n), 99, np.int8)
    kernels512.linear_s8_into(x, avx2.pack_weights_s8(w).panels, n, 5, requant, np.empty((3, n), np.int32), out)
    np.testing.assert_array_equal(out, avx512.linear_s8_reference(x, w, requant))


@pytest.mark.parametrize("shift", [0, 1, 2, 17, 30])
def test_fused_epilogue_at_the_rounding_edges(kernels512, shift):
    """Sums whose product with ``m0`` sits at ``-2^30`` (where the rounding changes side), at ties and at the ends
    of int32, against the reference."""
    sums = np.array([-(2**31) + 1, -(2**30), -3, -2, -1, 0, 1, 2, 3, 2**30, 2**31 - 1] * 3)
    m0 = np.repeat([2**30, 2**30 + 1, 2**31 - 1], 11)
    n = len(sums)
    requant = avx512.requant_s8(sums, m0, np.full(n, shift), 5, -128, 127)
    x, w = np.zeros((9, 4), np.int8), np.ones((n, 4), np.int8)
    out = np.empty((9, n), np.int8)
    kernels512.linear_s8_into(x, avx2.pack_weights_s8(w).panels, n, 4, requant, np.empty((9, n), np.int32), out)
    np.testing.assert_array_equal(out, avx512.linear_s8_reference(x, w, requant))


def test_fused_linear_with_no_inputs_requantizes_the_offsets(kernels512):
    """K = 0: every output is its channel's offset requantized (an N with a partial last panel)."""
    n = 21
    requant = avx512.requant_s8(np.arange(n) * 40 - 400, np.full(n, 2**30 + 12345), np.arange(n) % 2, 3, -128,
                                127)
    x, w = np.zeros((5, 0), np.int8), np.zeros((n, 0), np.int8)
    out = np.empty((5, n), np.int8)
    kernels512.linear_s8_into(x, avx2.pack_weights_s8(w).panels, n, 0, requant, np.empty((5, n), np.int32), out)
    np.testing.assert_array_equal(out, avx512.linear_s8_reference(x, w, requant))
    assert len(np.unique(out[0])) > 10  # the offsets differ, and so do the outputs


def test_requant_constants_refuse_what_the_vector_form_cannot_do():
    ones = np.ones(3, np.int64)
    assert avx512.requant_s8(ones, ones * 2**30, -ones, 0, -128, 127) is None  # a left shift
    assert avx512.requant_s8(ones, ones * 2**30, ones * 31, 0, -128, 127) is None  # shift past 30
    assert avx512.requant_s8(ones * 2**31, ones * 2**30, ones, 0, -128, 127) is None  # offset past int32
    constants = avx512.requant_s8(ones, ones * 2**30, ones, 0, -128, 127)
    assert [len(vector) for vector in constants[:3]] == [16, 16, 16]
    with pytest.raises(ValueError, match="one entry per channel"):
        avx512.requant_s8(ones, ones[:2], ones, 0, -128, 127)


def test_dispatch_runs_the_512_bit_kernel(kernels512):
    """Where it is available, ``auto`` int8 layers run it: the kernel name and the fused layer constants say so."""
    assert kernels.int8_gemm_kernel() == "avx512-vnni"
    layer = kernels.prepare_linear(np.ones((4, 8), np.int8), None, 0, 2**30, 0, 0, QuantSpec())
    assert layer.backend_for() == "avx2" and layer.requant_s8() is not None
    wide = kernels.prepare_linear(np.ones((4, 8), np.int8), None, 0, 2**30, 0, 0, QuantSpec(bits=16),
                                  x_dtype=np.int16)
    assert wide.requant_s8() is None  # 16x8 layers keep the int16 kernel
