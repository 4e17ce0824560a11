"""The 7-bit AVX2 int8 tile (codes in [-64, 63], PyTorch's ``reduce_range``): exact against int64 NumPy, chosen only
for codes that fit, and the same results as the sign-mask kernel either way; its drivers (threads, linear, conv)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import avx2, x86_glue
from nanoopt.kernels import reference as ref
from nanoopt.kernels.numba_cpu import LinearPlan
from nanoopt.spec import QuantSpec

LOW, HIGH = avx2.SEVEN_BIT_RANGE
A7_EXTREMES = [-64, -63, -1, 0, 1, 62, 63]  # a + 64 at 0 and 127, the ends of the unsigned operand
W_EXTREMES = [-127, -1, 0, 1, 127]  # 127 * 127 * 2 = 32258: the largest pair sum, next to the s16 limit
SEVEN_BIT_KERNELS = ["7bit", "auto"]


@pytest.fixture(scope="module")
def kernels(require_avx2_kernel):
    """The module, or a skip when this machine (or Numba's target) cannot run the AVX2 kernels."""
    require_avx2_kernel(avx2.available(), "the AVX2 GEMM")
    return avx2


def seven_bit_kernel(name):
    return {"7bit": avx2.gemm_s8s8s32_avx2_7bit_into, "auto": avx2.gemm_s8s8s32_avx2_auto_into}[name]


def exact_product(a, w):
    return a.astype(np.int64) @ w.T.astype(np.int64)  # (M, N)


def run(kernel, a, w):
    out = np.full((a.shape[0], w.shape[0]), 7, np.int32)  # (M, N), overwritten
    kernel(a, avx2.pack_weights_s8(w).panels, w.shape[0], a.shape[1], out)
    return out


@pytest.mark.parametrize("kernel_name", SEVEN_BIT_KERNELS)
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 13), k=st.integers(1, 70), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       extremes=st.booleans())
def test_seven_bit_matches_int64_reference(kernels, kernel_name, m, k, n, seed, extremes):
    rng = np.random.default_rng(seed)
    a = rng.integers(LOW, HIGH + 1, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    if extremes:
        a[0], a[-1], w[0], w[-1] = LOW, HIGH, 127, -127
    result = run(seven_bit_kernel(kernel_name), a, w)
    np.testing.assert_array_equal(result, exact_product(a, w))
    reference = np.empty_like(result)
    kernels.gemm_s8s8s32_into_reference(a, kernels.pack_weights_s8(w).panels, n, k, reference)
    np.testing.assert_array_equal(result, reference)


@pytest.mark.parametrize("kernel_name", SEVEN_BIT_KERNELS)
@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([1, 2, 3, 4, 5, 7, 9]),  # the 4-, 2- and 1-row tiles and their leftovers
    k=st.sampled_from([1, 2, 3, 5, 63, 65, 4097, 8195]),  # odd K, partial groups of 4, two and three K blocks
    n=st.sampled_from([1, 7, 9, 15, 17, 33]),  # partial vectors and panels
    data=st.data(),
)
def test_seven_bit_extreme_values_everywhere(kernels, kernel_name, m, k, n, data):
    """Every entry of A and W from the extremes (one value everywhere, or a mixture): pair sums of (63 + 64) * 127
    twice, all-negative rows (the -64 * row-sum start at its largest), K blocks that start from the output."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    a_values = data.draw(st.lists(st.sampled_from(A7_EXTREMES), min_size=1, max_size=3, unique=True), label="a")
    w_values = data.draw(st.lists(st.sampled_from(W_EXTREMES), min_size=1, max_size=3, unique=True), label="w")
    a = rng.choice(np.array(a_values, np.int8), size=(m, k))
    w = rng.choice(np.array(w_values, np.int8), size=(n, k))
    np.testing.assert_array_equal(run(seven_bit_kernel(kernel_name), a, w), exact_product(a, w))


def test_seven_bit_at_the_int32_limit(kernels):
    k = kernels.MAX_K_S8
    a = np.full((5, k), LOW, np.int8)
    a[-1] = HIGH
    w = np.stack([np.full(k, -127, np.int8), np.full(k, 127, np.int8)])
    result = run(kernels.gemm_s8s8s32_avx2_7bit_into, a, w)
    assert result[0].tolist() == [64 * 127 * k, -64 * 127 * k]
    np.testing.assert_array_equal(result, exact_product(a, w))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 20), outside=st.sampled_from([-128, -65, 64, 127]),
       seed=st.integers(0, 2**32 - 1))
def test_a_full_range_input_never_takes_the_seven_bit_tile(kernels, m, k, n, outside, seed):
    """One code outside [-64, 63], anywhere (the last row and column included): the range check says no, the 7-bit
    kernel refuses, the automatic one takes the sign mask -- and its result is the exact one, as the sign mask's."""
    rng = np.random.default_rng(seed)
    a = rng.integers(LOW, HIGH + 1, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    padded_k = -(-k // 4) * 4
    assert kernels.seven_bit_codes(a, padded_k)[1]
    a[rng.integers(m), rng.integers(k)] = outside
    assert not kernels.seven_bit_codes(a, padded_k)[1]
    with pytest.raises(ValueError, match=r"outside \[-64, 63\]"):
        run(kernels.gemm_s8s8s32_avx2_7bit_into, a, w)
    exact = exact_product(a, w)
    np.testing.assert_array_equal(run(kernels.gemm_s8s8s32_avx2_auto_into, a, w), exact)
    np.testing.assert_array_equal(run(kernels.gemm_s8s8s32_avx2_into, a, w), exact)


def test_the_range_check_is_what_keeps_the_tile_exact(kernels):
    """Without the check, the 7-bit tile on full-range codes is wrong (a + 64 wraps, pair sums saturate): the
    check is load-bearing, not decoration."""
    a = np.full((1, 8), -128, np.int8)
    w = np.full((1, 8), 127, np.int8)
    packed = kernels.pack_weights_s8(w)
    shifted = ((a.astype(np.int16) + 64) % 256).astype(np.uint8).view(np.int8)  # what the tile would read
    out = np.empty((1, 1), np.int32)
    kernels._blocked_product(kernels.SEVEN_BIT, kernels.AVX2_ROWS, shifted, shifted, packed.panels, 1, 2, 8, -64,
                             np.empty(0, np.int32), out)
    assert out[0, 0] != exact_product(a, w)[0, 0]
    assert run(kernels.gemm_s8s8s32_avx2_auto_into, a, w)[0, 0] == exact_product(a, w)[0, 0]


def test_seven_bit_empty_dimensions_and_shape_checks(kernels):
    for m, k, n in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        a, w = np.zeros((m, k), np.int8), np.ones((n, k), np.int8)
        for name in SEVEN_BIT_KERNELS:
            np.testing.assert_array_equal(run(seven_bit_kernel(name), a, w), np.zeros((m, n), np.int32))
    a, w = np.zeros((2, 5), np.int8), np.ones((3, 5), np.int8)
    with pytest.raises(ValueError, match="out must have shape"):
        kernels.gemm_s8s8s32_avx2_7bit_into(a, kernels.pack_weights_s8(w).panels, 3, 5, np.empty((2, 4), np.int32))


def test_the_packed_entry_takes_the_tile_the_codes_allow(kernels):
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, size=(21, 77)).astype(np.int8)
    for low, high in [(LOW, HIGH), (-128, 127)]:
        a = rng.integers(low, high + 1, size=(9, 77)).astype(np.int8)
        np.testing.assert_array_equal(kernels.gemm_s8s8s32_packed(a, kernels.pack_weights_s8(w)), exact_product(a, w))


def test_kernel_choice_for_a_code_range():
    choose = x86_glue.s8_kernel_for_codes
    assert choose("avx2", LOW, HIGH) == "avx2-7bit"
    assert choose("avx2", -10, 10) == "avx2-7bit"
    for low, high in [(-65, 63), (-64, 64), (-128, 127)]:
        assert choose("avx2", low, high) == "avx2"  # a full-range grid keeps the exact 4-instruction kernel
    assert choose("avx2", None, None) == "avx2-auto"
    for other in ("avx-vnni", "avx512-vnni", "none"):
        assert choose(other, LOW, HIGH) == other  # VNNI and AVX-512 paths unchanged


@pytest.mark.parametrize("kernel_name", ["avx2-7bit", "avx2-auto"])
@settings(max_examples=8, deadline=None)
@given(m=st.sampled_from([1, 5, 64, 129, 253]), k=st.sampled_from([1, 33, 301, 4097]), n=st.sampled_from([1, 17, 65]),
       rows_per_item=st.sampled_from([1, 6, 64, 252]), seed=st.integers(0, 2**32 - 1))
def test_seven_bit_thread_driver(kernels, kernel_name, m, k, n, rows_per_item, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(LOW, HIGH + 1, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    out = np.full((m, n), -1, np.int32)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        x86_glue.external_s8_drivers(kernel_name)[0](a, kernels.pack_weights_s8(w).panels, n, k, out, rows_per_item)
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_array_equal(out, exact_product(a, w))


@pytest.mark.parametrize("kernel_name", ["avx2-7bit", "avx2-auto", "avx2"])
@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       relu=st.booleans())
def test_seven_bit_linear_driver_equals_the_reference_layer(kernels, kernel_name, m, k, n, seed, relu):
    """The layer driver of each AVX2 variant (product, then the epilogue) on 7-bit input codes with a zero point
    inside [-64, 63]: the reference layer's codes, bit for bit."""
    rng = np.random.default_rng(seed)
    x = rng.integers(LOW, HIGH + 1, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, size=n).astype(np.int32)
    x_zp, out_zp = int(rng.integers(LOW, HIGH + 1)), int(rng.integers(-128, 128))
    m0, shift = np.full(n, 1 << 30, np.int32), np.full(n, 8, np.int32)
    spec = QuantSpec()
    expected = ref.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, spec, relu)
    plan = LinearPlan(w, bias, x_zp, m0, shift, out_zp, spec, relu, np.int8)
    out = np.empty((m, n), np.int8)
    epilogue = (plan.base_offsets, np.zeros(m, np.int64)) + plan.tail
    linear = x86_glue.linear_s8_driver(kernel_name)
    linear(x, kernels.pack_weights_s8(w).panels, n, k, np.empty((m, n), np.int32), epilogue, out)
    np.testing.assert_array_equal(out, expected)
