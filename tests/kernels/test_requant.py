"""The compiled requantization of int64 accumulators equals the spec's NumPy requantize bit for bit."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels.requant import requantize_into, requantize_reference
from nanoopt.spec import QuantSpec, quantize_multiplier


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 64), log_scale=st.floats(-40.0, 20.0),
       magnitude=st.sampled_from([2**8, 2**20, 2**31, 2**45, 2**62]), zero=st.integers(-128, 127),
       narrow=st.booleans(), bits=st.sampled_from([8, 16]))
def test_requantize_into_equals_the_reference(seed, size, log_scale, magnitude, zero, narrow, bits):
    spec = QuantSpec(bits=bits, narrow_range=narrow)
    zero = max(zero, spec.qmin)
    rng = np.random.default_rng(seed)
    acc = rng.integers(-magnitude, magnitude, size=size, dtype=np.int64)
    m0, shift = quantize_multiplier(2.0**log_scale)
    out = np.empty(size, spec.dtype)
    requantize_into(acc, m0, shift, zero, spec.qmin, spec.qmax, out)
    np.testing.assert_array_equal(out, requantize_reference(acc, m0, shift, zero, spec))
