"""The AVX2 int8 linear layer requantized in its register tiles (nanoopt.kernels.avx2_linear): bit for bit the
reference layer, for every tile (sign mask, 7-bit, chosen per call), every row count left over below a tile, partial
panels, sums at the ends of int32, a row block boundary; K past one block refused (the driver takes the product)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt import kernels
from nanoopt.kernels import avx2, avx2_linear, avx512, x86_glue
from nanoopt.kernels import reference as ref
from nanoopt.spec import INT32_MAX, QuantSpec

LAYERS = {"sign-mask": "linear_s8_avx2_into", "7bit": "linear_s8_avx2_7bit_into", "auto": "linear_s8_avx2_auto_into"}


@pytest.fixture(scope="module")
def linear(require_avx2_kernel):
    require_avx2_kernel(avx2.available(), "the AVX2 GEMM")
    return avx2_linear


def run(layer, x, w, requant):
    m, n = x.shape[0], w.shape[0]
    out = np.full((m, n), 99, np.int8)  # (M, N), overwritten
    layer(x, avx2.pack_weights_s8(w).panels, n, x.shape[1], requant, np.empty((m, n), np.int32), out)
    return out


def random_layer(rng, m, k, n, low, extremes):
    """Codes (M, K) from ``[low, -low)``, weights (N, K) and the layer's constants: uniform, or only the extremes."""
    if extremes:
        x = rng.choice(np.array([low, low + 1, -1, 0, 1, -low - 1], np.int8), size=(m, k))
        w = rng.choice(np.array([-127, -1, 0, 1, 127], np.int8), size=(n, k))
    else:
        x, w = rng.integers(low, -low, size=(m, k)).astype(np.int8), rng.integers(-127, 128, (n, k)).astype(np.int8)
    layer = {"bias": rng.integers(-(2**20), 2**20, size=n).astype(np.int32), "x_zp": int(rng.integers(low, -low)),
             "m0": rng.integers(2**30, 2**31, size=n).astype(np.int32), "out_zp": int(rng.integers(-128, 128)),
             "shift": rng.integers(0, 31, size=n).astype(np.int32)}
    return x, w, layer


def reference_layer(x, w, bias, x_zp, m0, shift, out_zp, relu):
    """The specification's layer and the constants of the fused epilogue for it."""
    spec = QuantSpec()
    expected = ref.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, spec, relu)
    offsets = bias.astype(np.int64) - x_zp * w.sum(axis=1, dtype=np.int64)
    low = max(spec.qmin, out_zp) if relu else spec.qmin
    return expected, avx512.requant_s8(offsets, m0, shift, out_zp, low, spec.qmax)


@pytest.mark.parametrize("name", list(LAYERS))
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 11), k=st.integers(1, 90), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       relu=st.booleans(), extremes=st.booleans())
def test_fused_layer_equals_the_reference_layer(linear, name, m, k, n, seed, relu, extremes):
    """m up to 11: whole 4-row tiles and every remainder (2 + 1 rows); n across partial panels."""
    x, w, layer = random_layer(np.random.default_rng(seed), m, k, n, -64 if name == "7bit" else -128, extremes)
    expected, requant = reference_layer(x, w, relu=relu, **layer)
    np.testing.assert_array_equal(run(getattr(linear, LAYERS[name]), x, w, requant), expected)


@pytest.mark.parametrize("name", list(LAYERS))
def test_sums_at_the_ends_of_int32(linear, name):
    """Offsets that take ``product + offset`` to INT32_MAX and INT32_MIN exactly (the contract's limits), with
    the smallest and the largest multipliers and shifts: the epilogue sees the extreme sums."""
    k, n = 64, 16
    low = -64 if name == "7bit" else -128
    x = np.array([[low] * k, [-low - 1] * k, [0] * k, [1] * k], np.int8)  # (4, K): one full tile
    w = np.array([[127] * k if c % 2 else [-127] * k for c in range(n)], np.int8)  # (N, K)
    products = x.astype(np.int64) @ w.T.astype(np.int64)  # (4, N)
    bias = np.where(np.arange(n) % 4 < 2, INT32_MAX - products.max(axis=0), -INT32_MAX - 1 - products.min(axis=0))
    m0 = np.array([2**30, 2**31 - 1] * (n // 2), np.int32)
    shift = np.array([0, 30, 1, 29] * (n // 4), np.int32)
    expected, requant = reference_layer(x, w, bias.astype(np.int32), 0, m0, shift, 5, False)
    sums = products + bias
    assert sums.max() == INT32_MAX and sums.min() == -INT32_MAX - 1
    np.testing.assert_array_equal(run(getattr(linear, LAYERS[name]), x, w, requant), expected)


@pytest.mark.parametrize("name", ["sign-mask", "auto"])
def test_rows_across_the_row_block(linear, name):
    """ROW_BLOCK + 7 rows: a second row block, with a remainder below a whole tile."""
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, size=(avx2.ROW_BLOCK + 7, 40)).astype(np.int8)
    w = rng.integers(-127, 128, size=(21, 40)).astype(np.int8)
    bias = rng.integers(-1000, 1000, size=21).astype(np.int32)
    m0 = rng.integers(2**30, 2**31, size=21).astype(np.int32)
    expected, requant = reference_layer(x, w, bias, 3, m0, np.full(21, 12, np.int32), -2, True)
    np.testing.assert_array_equal(run(getattr(linear, LAYERS[name]), x, w, requant), expected)


@pytest.mark.parametrize("kernel", ["avx2", "avx2-auto"])
def test_k_past_one_block_is_refused_and_the_driver_takes_the_product(linear, kernel):
    """K = S8_BLOCK_K + 3 does not fit the tiles' one K block: the fused layer refuses it, and the runtime's driver
    chosen for that K runs the product, then the requantization (the same codes)."""
    rng = np.random.default_rng(8)
    k = avx2.S8_BLOCK_K + 3
    x = rng.integers(-128, 128, size=(6, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(21, k)).astype(np.int8)
    m0 = rng.integers(2**30, 2**31, size=21).astype(np.int32)
    expected, requant = reference_layer(x, w, np.zeros(21, np.int32), 3, m0, np.full(21, 12, np.int32), -2, False)
    with pytest.raises(ValueError, match="S8_BLOCK_K"):
        run(linear.linear_s8_avx2_into, x, w, requant)
    out = np.empty((6, 21), np.int8)
    driver = x86_glue.linear_s8_requant_driver(kernel, k)
    driver(x, avx2.pack_weights_s8(w).panels, 21, k, np.empty((6, 21), np.int32), requant, out)
    np.testing.assert_array_equal(out, expected)


def test_empty_reduction_gives_the_offsets_codes(linear):
    x, w = np.zeros((3, 0), np.int8), np.zeros((5, 0), np.int8)
    expected, requant = reference_layer(x, w, np.arange(-2, 3, dtype=np.int32) * 1000, 0, np.full(5, 2**30, np.int32),
                                        np.full(5, 3, np.int32), 1, False)  # fmt: skip
    for name in LAYERS:
        np.testing.assert_array_equal(run(getattr(linear, LAYERS[name]), x, w, requant), expected)


def test_seven_bit_layer_refuses_a_code_outside(linear):
    x = np.zeros((5, 40), np.int8)
    x[4, 39] = 64
    w = np.ones((3, 40), np.int8)
    _, requant = reference_layer(x, w, np.zeros(3, np.int32), 0, np.full(3, 2**30, np.int32), np.zeros(3, np.int32),
                                 0, False)  # fmt: skip
    with pytest.raises(ValueError, match=r"outside \[-64, 63\]"):
        run(linear.linear_s8_avx2_7bit_into, x, w, requant)


def test_shapes_are_checked(linear):
    x, w = np.zeros((2, 8), np.int8), np.ones((20, 8), np.int8)
    _, requant = reference_layer(x, w, np.zeros(20, np.int32), 0, np.full(20, 2**30, np.int32), np.zeros(20, np.int32),
                                 0, False)  # fmt: skip
    panels = avx2.pack_weights_s8(w).panels
    with pytest.raises(ValueError, match="out must have shape"):
        linear.linear_s8_avx2_into(x, panels, 20, 8, requant, np.empty((2, 20), np.int32), np.empty((2, 19), np.int8))
    short = tuple(v[:16] if isinstance(v, np.ndarray) and v.dtype == np.int32 else v for v in requant)
    with pytest.raises(ValueError, match="ceil\\(n/16\\)\\*16"):
        linear.linear_s8_avx2_into(x, panels, 20, 8, short, np.empty((2, 20), np.int32), np.empty((2, 20), np.int8))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 9), k=st.sampled_from([1, 31, 64, 100, avx2.S8_BLOCK_K + 1]), n=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1), seven_bit=st.booleans(), relu=st.booleans())
def test_prepared_layer_on_avx2_equals_the_reference_layer(linear, m, k, n, seed, seven_bit, relu):
    """``prepare_linear`` on the AVX2 backend: codes in [-64, 63] take the 7-bit layer, others the sign mask (a
    read-only pass decides), K past one block the product then the 32-bit lanes: the reference's codes each time."""
    x, w, layer = random_layer(np.random.default_rng(seed), m, k, n, -64 if seven_bit else -128, False)
    expected, _ = reference_layer(x, w, relu=relu, **layer)
    prepared = kernels.prepare_linear(w, layer["bias"], layer["x_zp"], layer["m0"], layer["shift"], layer["out_zp"],
                                      QuantSpec(), relu)  # fmt: skip
    with kernels.use_backend("avx2"):
        np.testing.assert_array_equal(prepared(x), expected)
