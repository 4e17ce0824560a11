"""Requantization in 32-bit lanes (nanoopt.kernels.avx2_requant): bit for bit the specification's fixed-point
arithmetic (nanoopt.spec), at the ends of every range, and inside the AVX2 int8 linear driver."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import avx2, avx512, x86_glue
from nanoopt.kernels import reference as ref
from nanoopt.kernels.avx2_requant import requantize_rows_s8, requantize_rows_s8_reference
from nanoopt.spec import INT32_MAX, INT32_MIN, QuantSpec, requantize

M0_EDGES = [2**30, 2**30 + 1, 2**31 - 2, 2**31 - 1]
SHIFT_EDGES = [0, 1, 2, 29, 30]


@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 4), n=st.sampled_from([1, 3, 7, 8, 9, 15, 16, 17, 33]), seed=st.integers(0, 2**32 - 1),
       style=st.sampled_from(["random", "edges"]), relu=st.booleans(), zero_point=st.integers(-128, 127))
def test_lanes_equal_the_specification(m, n, seed, style, relu, zero_point):
    rng = np.random.default_rng(seed)
    if style == "edges":  # sums at the int32 limits, the multipliers and shifts at theirs, halves to round
        sums = rng.choice(np.array([INT32_MIN, INT32_MIN + 1, -(2**30), -1, 0, 1, 2**29, INT32_MAX - 1, INT32_MAX],
                                   np.int64), size=(m, n))
        m0 = rng.choice(np.array(M0_EDGES), size=n)
        shift = rng.choice(np.array(SHIFT_EDGES), size=n)
    else:
        sums = rng.integers(INT32_MIN, INT32_MAX, size=(m, n), endpoint=True)
        m0 = rng.integers(2**30, 2**31, size=n)
        shift = rng.integers(0, 31, size=n)
    offsets = rng.integers(-(2**20), 2**20, size=n)
    # clipped, products + offsets still fits int32 (the contract), and the sums at the limits stay reachable
    products = np.clip(sums - offsets, INT32_MIN, INT32_MAX).astype(np.int32)  # (M, N)
    low = zero_point if relu else -128
    constants = avx512.requant_s8(offsets, m0, shift, zero_point, low, 127)
    assert constants is not None
    out = np.full((m, n), 99, np.int8)
    requantize_rows_s8(products, *constants[:3], zero_point, low, 127, out)
    expected = requantize_rows_s8_reference(products, *constants[:3], zero_point, low, 127)
    np.testing.assert_array_equal(out, expected)
    # and the specification's wide (int64) formula, the other path of nanoopt.spec
    wide = requantize(products.astype(np.int64) + offsets, m0, shift, zero_point, QuantSpec())
    np.testing.assert_array_equal(out, np.maximum(wide, low))


def test_lanes_refuse_mismatched_shapes():
    constants = avx512.requant_s8(np.zeros(4), np.full(4, 2**30), np.zeros(4), 0, -128, 127)
    with pytest.raises(ValueError, match="shape of products"):
        requantize_rows_s8(np.zeros((2, 4), np.int32), *constants[:3], 0, -128, 127, np.empty((2, 3), np.int8))
    with pytest.raises(ValueError, match="an entry per column"):
        requantize_rows_s8(np.zeros((2, 17), np.int32), *constants[:3], 0, -128, 127, np.empty((2, 17), np.int8))


@pytest.mark.parametrize("kernel_name", ["avx2", "avx2-7bit", "avx2-auto"])
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 80), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       relu=st.booleans())
def test_requantizing_linear_driver_equals_the_reference_layer(require_avx2_kernel, kernel_name, m, k, n, seed,
                                                                relu):
    require_avx2_kernel(avx2.available(), "the AVX2 GEMM")
    rng = np.random.default_rng(seed)
    low_code = -64 if kernel_name == "avx2-7bit" else -128
    x = rng.integers(low_code, -low_code, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    bias = rng.integers(-(2**16), 2**16, size=n).astype(np.int32)
    x_zp, out_zp = int(rng.integers(low_code, -low_code)), int(rng.integers(-128, 128))
    m0 = rng.integers(2**30, 2**31, size=n).astype(np.int32)
    shift = rng.integers(0, 31, size=n).astype(np.int32)
    spec = QuantSpec()
    expected = ref.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, spec, relu)
    offsets = bias.astype(np.int64) - x_zp * w.sum(axis=1, dtype=np.int64)
    low = max(spec.qmin, out_zp) if relu else spec.qmin
    constants = avx512.requant_s8(offsets, m0, shift, out_zp, low, spec.qmax)
    for driver_k in (None, k):  # the product, then 32-bit lanes; and (on plain AVX2) requantized in the tiles
        out = np.empty((m, n), np.int8)
        linear = x86_glue.linear_s8_requant_driver(kernel_name, driver_k)
        linear(x, avx2.pack_weights_s8(w).panels, n, k, np.empty((m, n), np.int32), constants, out)
        np.testing.assert_array_equal(out, expected)
