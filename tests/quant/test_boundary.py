"""The compiled boundary quantize equals spec.quantize exactly (ties, infinities, extremes, int8 and int16)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoopt.quant.boundary import quantize_per_tensor, quantize_per_tensor_reference
from nanoopt.spec import QuantSpec

SETTINGS = settings(max_examples=60, deadline=None)
SPECS = [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=True), QuantSpec(bits=4), QuantSpec(bits=16, symmetric=True),
         QuantSpec(bits=12, symmetric=True, narrow_range=True)]

floats = st.floats(width=32, allow_nan=False, allow_infinity=True)


@SETTINGS
@given(st.data(), st.sampled_from(SPECS), st.floats(2.0**-20, 1024.0, width=32))
def test_kernel_equals_the_reference(data, spec, scale):
    zero_point = data.draw(st.integers(spec.qmin, spec.qmax)) if not spec.symmetric else 0
    shape = data.draw(hnp.array_shapes(max_dims=3, max_side=9))
    x = data.draw(hnp.arrays(np.float32, shape, elements=floats))
    ties = data.draw(st.booleans())
    if ties:  # exact halves of the step: round half to even must agree
        finite = np.isfinite(x)
        halves = (np.round(np.where(finite, x, 0).astype(np.float64) % 50) + 0.5) * np.float32(scale)
        x = np.where(finite, halves, x).astype(np.float32)
    scale32, zero = np.float32(scale), np.int32(zero_point)
    expected = quantize_per_tensor_reference(x, scale32, zero, spec)
    got = quantize_per_tensor(x, scale32, zero, spec)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_other_inputs_go_to_the_reference_and_nan_is_refused():
    spec = QuantSpec()
    x64 = np.array([0.1, 0.26], np.float64)
    np.testing.assert_array_equal(quantize_per_tensor(x64, np.float32(0.1), np.int32(0), spec),
                                  quantize_per_tensor_reference(x64, np.float32(0.1), np.int32(0), spec))
    strided = np.arange(10, dtype=np.float32)[::2]
    np.testing.assert_array_equal(quantize_per_tensor(strided, np.float32(0.5), np.int32(3), spec),
                                  quantize_per_tensor_reference(strided, np.float32(0.5), np.int32(3), spec))
    with pytest.raises(ValueError, match="NaN"):
        quantize_per_tensor(np.array([1.0, np.nan], np.float32), np.float32(1.0), np.int32(0), spec)
    with pytest.raises(ValueError, match="lie in"):
        quantize_per_tensor(np.ones(2, np.float32), np.float32(1.0), np.int32(300), spec)
    with pytest.raises(ValueError, match="> 0"):
        quantize_per_tensor(np.ones(2, np.float32), np.float32(0.0), np.int32(0), spec)
