"""Weight-only low-bit kernel: the Numba kernel equals the NumPy reference bit for bit (the summation order is the
specification) for every width, group size, odd K and N, row slice and number of rows; both equal the dequantized
product to float tolerance; bad arguments are refused by name."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels.lowbit import lowbit_linear, lowbit_linear_reference, prepare_lowbit

SETTINGS = settings(max_examples=80, deadline=None)


def assert_same_bits(got, expected):
    assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@st.composite
def problems(draw):
    bits = draw(st.integers(2, 8))
    n, k, m = draw(st.integers(1, 21)), draw(st.integers(1, 45)), draw(st.sampled_from([0, 1, 1, 2, 3, 7, 16]))
    group_size = draw(st.integers(1, k + 3))
    groups = -(-k // group_size)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = rng.integers(low, high + 1, (n, k)).astype(np.int8)
    scale = (rng.random((n, groups)) * draw(st.sampled_from([1e-3, 0.1, 10.0]))).astype(np.float32)
    zero_point = rng.integers(low, high + 1, (n, groups)).astype(np.int8) if draw(st.booleans()) else None
    x = (rng.standard_normal((m, k)) * draw(st.sampled_from([1e-2, 1.0, 1e3]))).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None
    start = draw(st.integers(0, n))
    stop = draw(st.integers(start, n))
    return bits, codes, scale, zero_point, group_size, x, bias, (start, stop)


@SETTINGS
@given(problems())
def test_kernel_equals_reference_bit_for_bit(problem):
    bits, codes, scale, zero_point, group_size, x, bias, rows = problem
    weight = prepare_lowbit(codes, scale, zero_point, group_size, bits)
    for r in (rows, None):
        assert_same_bits(lowbit_linear(x, weight, bias, r), lowbit_linear_reference(x, weight, bias, r))


@SETTINGS
@given(problems())
def test_reference_is_the_dequantized_product(problem):
    bits, codes, scale, zero_point, group_size, x, bias, (start, stop) = problem
    weight = prepare_lowbit(codes, scale, zero_point, group_size, bits)
    groups = np.arange(codes.shape[1]) // group_size
    zeros = 0 if zero_point is None else zero_point[:, groups].astype(np.float64)
    dense = (codes - zeros) * scale[:, groups].astype(np.float64)  # (N, K) exact-ish in float64
    expected = x.astype(np.float64) @ dense.T + (0 if bias is None else bias)
    got = lowbit_linear_reference(x, weight, bias, (start, stop))
    # float32 rounding of every product and sum: |error| <= (K + groups + 2) eps sum |x| |W| (+ |b|)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(dense).T + (0 if bias is None else np.abs(bias))
    bound = (codes.shape[1] + len(set(groups)) + 2) * np.finfo(np.float32).eps * magnitude
    assert np.all(np.abs(got - expected[:, start:stop]) <= bound[:, start:stop] + 1e-30)



@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 200), st.integers(1, 300), st.sampled_from([1, 7, 32, 128, 1000]),
       st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_one_row_variant_equals_reference_and_the_batched_kernel(bits, n, k, group_size, with_zero, with_bias,
                                                                 seed):
    """One row (token-by-token generation) runs the GEMV variant of the packed kernel: GPT-sized shapes, many
    groups and a short last group; its bits equal the reference and the same row computed in a batch of three
    (the multi-row kernel), for every row slice tried."""
    rng = np.random.default_rng(seed)
    groups = -(-k // group_size)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = rng.integers(low, high + 1, (n, k)).astype(np.int8)
    zero_point = rng.integers(low, high + 1, (n, groups)).astype(np.int8) if with_zero else None
    weight = prepare_lowbit(codes, rng.random((n, groups)).astype(np.float32), zero_point, group_size, bits)
    x = rng.standard_normal((3, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    start = int(rng.integers(0, n + 1))
    for rows in (None, (start, int(rng.integers(start, n + 1)))):
        one = lowbit_linear(x[1:2], weight, bias, rows)
        assert_same_bits(one, lowbit_linear_reference(x[1:2], weight, bias, rows))
        assert_same_bits(one, lowbit_linear(x, weight, bias, rows)[1:2])


def test_packed_layout_is_pack_int4_of_the_transposed_codes():
    from nanoopt.quant.packing import pack_int4

    codes = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    weight = prepare_lowbit(codes, np.ones((4, 1), np.float32), None, 4, 4)
    np.testing.assert_array_equal(weight.codes.ravel(), pack_int4(np.ascontiguousarray(codes.T)))


def test_bad_arguments_are_named():
    codes = np.zeros((3, 5), np.int8)
    scale = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="scale must have shape"):
        prepare_lowbit(codes, np.ones((3, 1), np.float32), None, 3, 4)
    with pytest.raises(ValueError, match="bits"):
        prepare_lowbit(codes, scale, None, 3, 9)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        prepare_lowbit(np.full((3, 5), 9, np.int8), scale, None, 3, 4)
    weight = prepare_lowbit(codes, scale, None, 3, 4)
    with pytest.raises(ValueError, match=r"x must be a float32 array \(M, 5\)"):
        lowbit_linear(np.zeros((1, 4), np.float32), weight, None)
    with pytest.raises(ValueError, match="x must be a float32"):
        lowbit_linear(np.zeros((1, 5), np.float64), weight, None)
    with pytest.raises(ValueError, match="bias"):
        lowbit_linear(np.zeros((1, 5), np.float32), weight, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="rows"):
        lowbit_linear(np.zeros((1, 5), np.float32), weight, None, (2, 4))
