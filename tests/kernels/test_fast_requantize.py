"""The branch-free int32 requantization of the Numba epilogue (``requantize_value`` with ``fast``) equals
the integer specification (``spec.requantize``) bit for bit on its whole domain: int32 accumulators, multipliers
``m0`` in ``[2^30, 2^31)`` and right shifts ``0..30`` (the range ``_layer_epilogue`` sends it), with the extremes
drawn on purpose -- INT32_MIN/MAX accumulators, m0 at both ends, exact half-way products, both clip bounds.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels.numba_epilogue import finish_products
from nanoopt.kernels.requant import requantize_value
from nanoopt.spec import INT32_MAX, INT32_MIN, QuantSpec, requantize

SPECS = [QuantSpec(), QuantSpec(bits=16), QuantSpec(bits=8, signed=False), QuantSpec(bits=4)]

values = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.sampled_from([INT32_MIN, INT32_MIN + 1, -1, 0, 1,
                                                                        INT32_MAX - 1, INT32_MAX]))
multipliers = st.one_of(st.integers(2**30, 2**31 - 1), st.sampled_from([2**30, 2**30 + 1, 2**31 - 2, 2**31 - 1]))


@settings(max_examples=400, deadline=None)
@given(value=values, m0=multipliers, shift=st.integers(0, 30), spec=st.sampled_from(SPECS), data=st.data())
def test_fast_requantize_equals_the_spec(value, m0, shift, spec, data):
    zero_point = data.draw(st.integers(spec.qmin, spec.qmax))
    relu = data.draw(st.booleans())
    low = max(spec.qmin, zero_point) if relu else spec.qmin
    expected = int(np.clip(requantize(np.array([value], np.int32), m0, shift, zero_point, spec).astype(np.int64),
                           low, spec.qmax)[0])
    fast = requantize_value(np.int64(value), np.int64(m0), np.int64(shift), np.int64(zero_point),
                                 np.int64(low), np.int64(spec.qmax), True)
    wide = requantize_value(np.int64(value), np.int64(m0), np.int64(shift), np.int64(zero_point),
                                 np.int64(low), np.int64(spec.qmax), False)
    assert int(fast) == expected == int(wide)


@settings(max_examples=200, deadline=None)
@given(m0=multipliers, shift=st.integers(0, 30), sign=st.sampled_from([-1, 1]), data=st.data())
def test_fast_requantize_at_exact_halves(m0, shift, sign, data):
    # accumulators whose product with m0 lands on (or next to) a rounding tie of the doubling high mul
    top = data.draw(st.integers(-(2**29), 2**29))
    target = sign * (2 * top + 1) * 2**30  # value * m0 = target +- m0 around a half of 2^31
    value = int(np.clip(target // m0 + data.draw(st.integers(-1, 1)), INT32_MIN, INT32_MAX))
    expected = int(requantize(np.array([value], np.int32), m0, shift, 0, QuantSpec(bits=16))[0])
    got = requantize_value(np.int64(value), np.int64(m0), np.int64(shift), np.int64(0), np.int64(-32768),
                                np.int64(32767), True)
    assert int(got) == expected


def test_the_vectorised_epilogue_equals_the_reference_on_extremes():
    rng = np.random.default_rng(0)
    rows, columns = 37, 29
    # the fast path's precondition: every sum products + offsets + row offset fits int32 (here up to its ends)
    products = rng.integers(-(2**30), 2**30, size=(rows, columns)).astype(np.int64)
    offsets = rng.integers(-(2**30) + 1, 2**30, size=columns).astype(np.int64)
    products[0] = INT32_MAX - offsets - 7
    products[1] = INT32_MIN - offsets + 7
    row_offsets = np.zeros(rows, np.int64)
    row_offsets[:2] = [7, -7]
    m0 = rng.integers(2**30, 2**31, size=columns).astype(np.int64)
    m0[:2] = [2**30, 2**31 - 1]
    shift = rng.integers(0, 31, size=columns).astype(np.int64)
    shift[:2] = [0, 30]
    out = np.empty((rows, columns), np.int8)
    epilogue = (offsets, row_offsets, m0, shift, np.int64(5), np.int64(-128), np.int64(127), False,
                True)
    finish_products(products, epilogue, out)
    total = products + offsets + row_offsets[:, None]
    assert total.min() == INT32_MIN and total.max() == INT32_MAX
    expected = requantize(total.astype(np.int32), m0, shift, 5, QuantSpec())
    np.testing.assert_array_equal(out, expected)
