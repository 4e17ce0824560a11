"""AVX2 int8/int16 GEMM: exact against int64 NumPy on random and extreme inputs; packing; availability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import avx2

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernels(require_avx2_kernel):
    """The module, or a skip when this machine (or Numba's target) cannot run the AVX2 kernels.

    A failed self-test on an AVX2 target is a failure, not a skip: a wrong kernel must not hide.
    """
    require_avx2_kernel(avx2.available(), "the AVX2 GEMM")
    return avx2


def s8_kernel(name):
    """The jitted int8 kernel called ``name``, or a skip if this target cannot compile it."""
    if name == "avx-vnni" and not avx2.target_has_avx_vnni():
        pytest.skip("the target has no AVX-VNNI (vpdpbusd)")
    return {"avx2": avx2.gemm_s8s8s32_avx2_into, "avx-vnni": avx2.gemm_s8s8s32_vnni_into}[name]


S8_KERNELS = ["avx2", "avx-vnni"]


def random_operands(seed, m, k, n, extremes, a_range, w_range, a_dtype):
    """Random A (M, K) and int8 W (N, K); with ``extremes``, row 0 of A and columns 0, 1 of W at the limits."""
    rng = np.random.default_rng(seed)
    a = rng.integers(a_range[0], a_range[1] + 1, size=(m, k)).astype(a_dtype)
    w = rng.integers(w_range[0], w_range[1] + 1, size=(n, k)).astype(np.int8)
    if extremes:
        a[0] = a_range[0]
        w[0] = w_range[1]
        w[-1] = w_range[0]
        if m > 1:
            a[-1] = a_range[1]
    return a, w


def exact_product(a, w):
    return a.astype(np.int64) @ w.T.astype(np.int64)  # (M, N)


shapes = st.tuples(st.integers(1, 13), st.integers(1, 70), st.integers(1, 40))  # (M, K, N)


@pytest.mark.parametrize("kernel_name", S8_KERNELS)
@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), extremes=st.booleans())
def test_s8_matches_int64_reference(kernels, kernel_name, shape, seed, extremes):
    kernel = s8_kernel(kernel_name)
    m, k, n = shape
    a, w = random_operands(seed, m, k, n, extremes, (-128, 127), (-127, 127), np.int8)
    packed = kernels.pack_weights_s8(w)
    result = np.full((m, n), 7, np.int32)
    kernel(a, packed.panels, n, k, result)
    np.testing.assert_array_equal(result, exact_product(a, w))
    reference = np.empty((m, n), np.int32)
    kernels.gemm_s8s8s32_into_reference(a, packed.panels, n, k, reference)
    np.testing.assert_array_equal(result, reference)


@pytest.mark.parametrize("kernel_name", S8_KERNELS)
@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 14),
    k=st.sampled_from([1023, 1025, 4096, 4097, 8195]),  # one and several K blocks (S8_BLOCK_K = 4096)
    n=st.integers(1, 35),
    seed=st.integers(0, 2**32 - 1),
)
def test_s8_long_k(kernels, kernel_name, m, k, n, seed):
    kernel = s8_kernel(kernel_name)
    a, w = random_operands(seed, m, k, n, True, (-128, 127), (-127, 127), np.int8)
    result = np.empty((m, n), np.int32)
    kernel(a, kernels.pack_weights_s8(w).panels, n, k, result)
    np.testing.assert_array_equal(result, exact_product(a, w))


A_EXTREMES = [-128, -127, -1, 0, 1, 126, 127]  # |a| = 128 wraps to the byte 0x80; a < 0 flips w to ~w
W_EXTREMES = [-127, -1, 0, 1, 127]  # ~127 = -128: the pair sum -32768 of the sign mask sits at the s16 limit


@pytest.mark.parametrize("kernel_name", S8_KERNELS)
@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([1, 2, 3, 4, 5, 7, 9]),  # every tile (4, 2, 1 rows; VNNI 6) and their leftovers
    k=st.sampled_from([1, 2, 3, 5, 63, 65, 4097]),  # odd K, partial groups of 4, two K blocks
    n=st.sampled_from([1, 7, 9, 15, 17, 33]),  # partial vectors and panels
    data=st.data(),
)
def test_s8_extreme_values_everywhere(kernels, kernel_name, m, k, n, data):
    """Every entry of A and W drawn from the extremes (one value everywhere, or a mixture), so that pair sums at
    the saturation limit of vpmaddubsw (-128 * -128 twice in the sign mask) and all-negative rows (the largest
    row corrections) occur."""
    kernel = s8_kernel(kernel_name)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    a_values = data.draw(st.lists(st.sampled_from(A_EXTREMES), min_size=1, max_size=3, unique=True), label="a")
    w_values = data.draw(st.lists(st.sampled_from(W_EXTREMES), min_size=1, max_size=3, unique=True), label="w")
    a = rng.choice(np.array(a_values, np.int8), size=(m, k))
    w = rng.choice(np.array(w_values, np.int8), size=(n, k))
    result = np.full((m, n), 7, np.int32)
    kernel(a, kernels.pack_weights_s8(w).panels, n, k, result)
    np.testing.assert_array_equal(result, exact_product(a, w))


@pytest.mark.parametrize("kernel_name", S8_KERNELS)
def test_s8_extremes_at_the_int32_limit(kernels, kernel_name):
    kernel = s8_kernel(kernel_name)
    k = kernels.MAX_K_S8
    a = np.full((7, k), -128, np.int8)
    a[-1] = 127
    w = np.stack([np.full(k, -127, np.int8), np.full(k, 127, np.int8)])
    result = np.empty((7, 2), np.int32)
    kernel(a, kernels.pack_weights_s8(w).panels, 2, k, result)
    assert result[0].tolist() == [128 * 127 * k, -128 * 127 * k]
    np.testing.assert_array_equal(result, exact_product(a, w))


def test_packed_entry_point_uses_the_selected_kernel(kernels):
    assert kernels.KERNEL_S8 in S8_KERNELS
    assert kernels.gemm_s8s8s32_into is s8_kernel(kernels.KERNEL_S8)
    a, w = random_operands(1, 9, 77, 35, True, (-128, 127), (-127, 127), np.int8)
    result = kernels.gemm_s8s8s32_packed(a, kernels.pack_weights_s8(w))
    assert result.dtype == np.int32 and result.flags.c_contiguous
    np.testing.assert_array_equal(result, exact_product(a, w))
    packed = kernels.pack_weights_s8(np.ones((3, 5), np.int8))
    assert kernels.gemm_s8s8s32_packed(np.zeros((0, 5), np.int8), packed).shape == (0, 3)


@pytest.mark.parametrize("kernel_name", S8_KERNELS)
@pytest.mark.parametrize(("m", "k", "n"), [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_s8_empty_dimensions(kernels, kernel_name, m, k, n):
    kernel = s8_kernel(kernel_name)
    out = np.full((m, n), 99, np.int32)
    kernel(np.zeros((m, k), np.int8), kernels.pack_weights_s8(np.ones((n, k), np.int8)).panels, n, k, out)
    assert not out.any()  # the empty sum is 0


def test_jitted_kernels_refuse_wrong_dtypes_at_compile_time(kernels):
    """A wrong dtype or layout is a typing error naming the argument, never a raw load of the wrong width."""
    from numba.core.errors import TypingError

    panels = kernels.pack_weights_s8(np.ones((3, 5), np.int8)).panels
    a, out = np.ones((2, 5), np.int8), np.empty((2, 3), np.int32)
    kernel = kernels.gemm_s8s8s32_into
    with pytest.raises(TypingError, match="a must be a C-contiguous 2-d int8 array, got array\\(int16"):
        kernel(a.astype(np.int16), panels, 3, 5, out)
    with pytest.raises(TypingError, match="out must be a C-contiguous 2-d int32 array"):
        kernel(a, panels, 3, 5, out.astype(np.int64))
    with pytest.raises(TypingError, match="a must be a C-contiguous"):
        kernel(np.ones((2, 10), np.int8)[:, ::2], panels, 3, 5, out)
    with pytest.raises(TypingError, match="panels must be a C-contiguous 5-d int16 array"):
        kernels.gemm_s16s8s64_into(a.astype(np.int16), panels, 3, 5, out.astype(np.int64))


def test_s16_empty_dimensions(kernels):
    out = np.full((4, 3), 99, np.int64)
    kernels.gemm_s16s8s64_into(np.zeros((4, 0), np.int16), kernels.pack_weights_s16(np.ones((3, 0), np.int8)).panels,
                               3, 0, out)
    assert not out.any()


@pytest.mark.parametrize("kernel_name", S8_KERNELS)
def test_s8_into_overwrites_and_checks_shapes(kernels, kernel_name):
    kernel = s8_kernel(kernel_name)
    a, w = random_operands(0, 6, 9, 20, True, (-128, 127), (-127, 127), np.int8)
    packed = kernels.pack_weights_s8(w)
    out = np.full((6, 20), 12345, np.int32)
    kernel(a, packed.panels, 20, 9, out)
    np.testing.assert_array_equal(out, exact_product(a, w))
    with pytest.raises(ValueError, match="out must have shape"):
        kernel(a, packed.panels, 20, 9, np.empty((6, 19), np.int32))
    with pytest.raises(ValueError, match="a must have k columns"):
        kernel(a[:, :8].copy(), packed.panels, 20, 9, out)
    with pytest.raises(ValueError, match="panels must have shape"):
        kernel(a, packed.panels, 33, 9, np.empty((6, 33), np.int32))
    k = kernels.MAX_K_S8 + 1  # refused before any memory is touched: the int32 result could overflow
    panels = np.zeros((1, -(-k // 4) + 1, 2, 8, 4), np.int8)
    with pytest.raises(ValueError, match="MAX_K_S8"):
        kernel(np.zeros((1, k), np.int8), panels, 1, k, np.empty((1, 1), np.int32))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 11), st.sampled_from([1, 2, 3, 7, 64, 509, 510, 511, 1021, 1600]),
                    st.integers(1, 40)),
    seed=st.integers(0, 2**32 - 1),
    extremes=st.booleans(),
)
def test_s16_matches_int64_reference(kernels, shape, seed, extremes):
    m, k, n = shape
    a, w = random_operands(seed, m, k, n, extremes, (-32768, 32767), (-128, 127), np.int16)
    packed = kernels.pack_weights_s16(w)
    result = kernels.gemm_s16s8s64_packed(a, packed)
    assert result.dtype == np.int64 and result.shape == (m, n)
    np.testing.assert_array_equal(result, exact_product(a, w))
    reference = np.empty((m, n), np.int64)
    kernels.gemm_s16s8s64_into_reference(a, packed.panels, n, k, reference)
    np.testing.assert_array_equal(result, reference)


def test_s16_worst_case_needs_more_than_int32(kernels):
    k = 4099  # 4099 * 32768 * 128 > 2**31: only exact if the int32 partial sums are widened per block
    a = np.full((6, k), -32768, np.int16)
    w = np.stack([np.full(k, -128, np.int8), np.full(k, 127, np.int8)])
    result = kernels.gemm_s16s8s64_packed(a, kernels.pack_weights_s16(w))
    assert result[0].tolist() == [32768 * 128 * k, -32768 * 127 * k]
    np.testing.assert_array_equal(result, exact_product(a, w))


# --- packing (pure NumPy, runs everywhere) ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), k=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_pack_layout_and_round_trip(n, k, seed):
    w = np.random.default_rng(seed).integers(-127, 128, size=(n, k)).astype(np.int8)
    for pack, group, footer in ((avx2.pack_weights_s8, 4, 1), (avx2.pack_weights_s16, 2, 0)):
        packed = pack(w)
        groups = -(-k // group)
        assert (packed.n, packed.k) == (n, k)
        assert packed.panels.shape == (-(-n // 16), groups + footer, 2, 8, group)
        assert packed.panels.flags.c_contiguous and not packed.panels.flags.writeable
        np.testing.assert_array_equal(avx2.unpack_weights(packed), w)
        if n and k:
            row, col = n - 1, k - 1
            assert packed.panels[row // 16, col // group, (row % 16) // 8, row % 8, col % group] == w[row, col]
        padding = packed.panels[:, :groups].sum(dtype=np.int64) - w.sum(dtype=np.int64)
        assert padding == 0  # every padded entry is zero
        if footer:  # int32 row sums of W, channel c at [c // 16, (c % 16) // 8, c % 8]
            row_sums = packed.panels[:, -1].view("<i4")[..., 0].reshape(-1)  # (N padded,)
            np.testing.assert_array_equal(row_sums[:n], w.sum(axis=1, dtype=np.int64))
            assert not row_sums[n:].any()


def test_pack_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"\[-127, 127\].*w\[1, 2\] = -128"):
        avx2.pack_weights_s8(np.array([[0, 0, 0], [5, 0, -128]], np.int8))
    assert avx2.pack_weights_s16(np.array([[-128]], np.int8)).panels[0, 0, 0, 0, 0] == -128
    with pytest.raises(ValueError, match="K <= 132104"):
        avx2.pack_weights_s8(np.zeros((1, avx2.MAX_K_S8 + 1), np.int8))
    for pack in (avx2.pack_weights_s8, avx2.pack_weights_s16):
        with pytest.raises(TypeError, match="int8 weights, got dtype float32"):
            pack(np.zeros((2, 2), np.float32))
        with pytest.raises(TypeError, match="numpy array"):
            pack([[1, 2]])
        with pytest.raises(ValueError, match="shape"):
            pack(np.zeros(4, np.int8))


def test_gemm_rejects_bad_activations():
    packed = avx2.pack_weights_s8(np.ones((3, 4), np.int8))
    with pytest.raises(TypeError, match="dtype int8, got int16"):
        avx2.gemm_s8s8s32_packed(np.zeros((2, 4), np.int16), packed)
    with pytest.raises(ValueError, match=r"shape \(M, 4\)"):
        avx2.gemm_s8s8s32_packed(np.zeros((2, 5), np.int8), packed)
    with pytest.raises(ValueError, match="C-contiguous"):
        avx2.gemm_s8s8s32_packed(np.zeros((4, 2), np.int8).T, packed)
    with pytest.raises(TypeError, match="PackedWeightsS8"):
        avx2.gemm_s8s8s32_packed(np.zeros((2, 4), np.int8), avx2.pack_weights_s16(np.ones((3, 4), np.int8)))
    with pytest.raises(TypeError, match="dtype int16, got int8"):
        avx2.gemm_s16s8s64_packed(np.zeros((2, 4), np.int8), avx2.pack_weights_s16(np.ones((3, 4), np.int8)))


# --- availability ----------------------------------------------------------------------------------------


def test_disable_switch_makes_it_unavailable(avx2_switched_off):
    assert avx2.available() is False
    packed = avx2.pack_weights_s8(np.ones((3, 4), np.int8))
    with pytest.raises(RuntimeError, match="not available"):
        avx2.gemm_s8s8s32_packed(np.zeros((2, 4), np.int8), packed)


def test_generic_numba_target_reports_unavailable_without_crashing(on_generic_target):
    """Under NUMBA_CPU_NAME=generic LLVM would abort on the x86 intrinsics: available() must say False first."""
    assert on_generic_target("from nanoopt.kernels import avx2; print(avx2.available())", 120).strip() == "False"
