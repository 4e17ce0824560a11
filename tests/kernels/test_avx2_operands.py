"""The activation passes of the AVX2 tiles (nanoopt.kernels.avx2_operands): 7-bit codes with their range check (and
the check alone), and the sign split, bit for bit their NumPy references, at every row length (vectors, the
overlapping last vector, rows shorter than one vector) and at the int8 extremes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import avx2, avx2_operands

EXTREMES = [-128, -127, -65, -64, -1, 0, 1, 63, 64, 127]


@pytest.fixture(scope="module")
def operands(require_avx2_kernel):
    require_avx2_kernel(avx2.available(), "the AVX2 GEMM")
    return avx2_operands


def codes(seed: int, m: int, k: int, low: int, high: int, extremes: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if extremes:
        return rng.choice(np.array([v for v in EXTREMES if low <= v <= high], np.int8), size=(m, k))
    return rng.integers(low, high + 1, size=(m, k)).astype(np.int8)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 6), k=st.integers(0, 130), seed=st.integers(0, 2**32 - 1), extremes=st.booleans())
def test_seven_bit_codes_equal_the_reference(operands, m, k, seed, extremes):
    a = codes(seed, m, k, -64, 63, extremes)
    padded_k = -(-k // 4) * 4
    shifted, fits = operands.seven_bit_codes(a, padded_k)
    expected, expected_fits = operands.seven_bit_codes_reference(a, padded_k)
    assert fits and expected_fits
    np.testing.assert_array_equal(shifted, expected)
    assert int(shifted.view(np.uint8).max(initial=0)) <= 127  # the unsigned operand stays 7-bit


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 130), seed=st.integers(0, 2**32 - 1),
       outside=st.sampled_from([-128, -65, 64, 127]), data=st.data())
def test_one_code_outside_anywhere_is_found(operands, m, k, seed, outside, data):
    """In a vector, in the overlapping last vector, in the scalar tail of a short row, in the last row."""
    a = codes(seed, m, k, -64, 63, False)
    assert operands.fits_seven_bit(a)
    a[data.draw(st.integers(0, m - 1)), data.draw(st.integers(0, k - 1))] = outside
    assert not operands.seven_bit_codes(a, -(-k // 4) * 4)[1]
    assert not operands.seven_bit_codes_reference(a, -(-k // 4) * 4)[1]
    assert not operands.fits_seven_bit(a)  # the read-only check: in a vector or in the scalar tail of the array


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 6), k=st.integers(0, 130), seed=st.integers(0, 2**32 - 1), extremes=st.booleans())
def test_sign_split_equals_the_reference(operands, m, k, seed, extremes):
    a = codes(seed, m, k, -128, 127, extremes)
    padded_k = -(-k // 4) * 4
    for got, expected in zip(operands.sign_split(a, padded_k), operands.sign_split_reference(a, padded_k),
                             strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, expected)


def test_sign_split_of_a_long_row_of_minus_128(operands):
    """The largest row correction, 128 K, over many 8-byte sums."""
    a = np.full((2, 4099), -128, np.int8)
    masks, magnitudes, starts = operands.sign_split(a, 4100)
    assert starts.tolist() == [128 * 4099] * 2
    assert (masks[:, :4099] == -1).all() and (magnitudes[:, :4099] == -128).all()
    assert (masks[:, 4099:] == 0).all() and (magnitudes[:, 4099:] == 0).all()
