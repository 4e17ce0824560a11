"""Properties of the integer specification (nanoopt.spec).

The rounding primitives are checked against independent arbitrary-precision oracles written with Python
ints and ``fractions.Fraction`` (round half away from zero from the mathematical definition), not against a
transcription of the same bit tricks.
"""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.spec import (
    INT32_MAX,
    INT32_MIN,
    QuantSpec,
    bias_fitting_weight_scale,
    dequantize,
    multiply_by_quantized_multiplier,
    qparams,
    quantize,
    quantize_bias,
    quantize_multiplier,
    requantization_multipliers,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

SETTINGS = settings(max_examples=50, deadline=None)

int32s = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.sampled_from([INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX]))
specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
    narrow_range=st.booleans(),
)


# ----------------------------------------------------------------------------------------------- oracles
def round_half_away(value: Fraction) -> int:
    magnitude = abs(value)
    rounded = int(magnitude + Fraction(1, 2))  # floor(|v| + 1/2)
    return rounded if value >= 0 else -rounded


def oracle_high_mul(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul with Python ints (no overflow)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    product = a * b
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    total = product + nudge
    quotient = abs(total) >> 31  # C++ division truncates toward zero
    return quotient if total >= 0 else -quotient


def oracle_divide_by_pot(x: int, exponent: int) -> int:
    return round_half_away(Fraction(x, 2**exponent))


def oracle_mbqm(acc: int, m0: int, shift: int, register_limit: tuple[int, int]) -> int:
    """TFLite MultiplyByQuantizedMultiplier with a saturating left shift into a register of given range."""
    left, right = max(-shift, 0), max(shift, 0)
    shifted = min(max(acc * 2**left, register_limit[0]), register_limit[1])
    return oracle_divide_by_pot(oracle_high_mul(shifted, m0), right)


# ------------------------------------------------------------------------------------------------ QuantSpec
@pytest.mark.parametrize("bits", range(2, 17))
def test_spec_ranges_and_container(bits):
    signed = QuantSpec(bits=bits)
    assert (signed.qmin, signed.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert QuantSpec(bits=bits, narrow_range=True).qmin == -(2 ** (bits - 1)) + 1
    unsigned = QuantSpec(bits=bits, signed=False)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)
    for spec in (signed, unsigned):
        info = np.iinfo(spec.dtype)
        assert info.min <= spec.qmin and spec.qmax <= info.max
        assert info.bits == (8 if bits <= 8 else 16)  # smallest container


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"bits": 1}, ValueError),
        ({"bits": 17}, ValueError),
        ({"bits": 8.0}, TypeError),
        ({"bits": True}, TypeError),
        ({"signed": 1}, TypeError),
        ({"axis": 0.5}, TypeError),
    ],
)
def test_spec_rejects_bad_fields(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        QuantSpec(**kwargs)


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        QuantSpec().bits = 4


# ------------------------------------------------------------------------------------------------- qparams
finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@SETTINGS
@given(spec=specs, a=finite, b=finite)
def test_qparams_zero_is_exact_and_range_is_covered(spec, a, b):
    low, high = min(a, b), max(a, b)
    scale, zero_point = qparams(low, high, spec)
    assert scale.dtype == np.float32 and zero_point.dtype == np.int32
    assert scale >= np.finfo(np.float32).eps
    assert spec.qmin <= zero_point <= spec.qmax
    q_zero = quantize(np.float32(0.0), scale, zero_point, spec)
    assert q_zero == zero_point and dequantize(q_zero, scale, zero_point, spec) == 0.0
    if spec.symmetric:
        assert zero_point == (0 if spec.signed else (spec.qmin + spec.qmax + 1) // 2)
    # every value of the (zero-extended) range is reproduced within half a step
    grid = np.linspace(min(low, 0.0), max(high, 0.0), 101).astype(np.float32)
    error = np.abs(dequantize(quantize(grid, scale, zero_point, spec), scale, zero_point, spec) - grid)
    assert np.all(error <= np.float32(scale) * 0.5 * (1 + 1e-5) + 1e-6 * np.abs(grid))


def test_qparams_zero_width_and_known_values():
    spec = QuantSpec(bits=8, signed=False)
    scale, zero_point = qparams(0.0, 0.0, spec)
    assert scale == np.finfo(np.float32).eps and zero_point == 0
    scale, zero_point = qparams(2.0, 2.0, QuantSpec())  # range extended to [0, 2]
    assert scale == np.float32(2.0 / 255) and zero_point == -128
    scale, zero_point = qparams(-1.0, 1.0, QuantSpec(symmetric=True, narrow_range=True))
    assert scale == np.float32(1.0 / 127) and zero_point == 0


@SETTINGS
@given(spec=specs, data=st.data())
def test_qparams_per_channel_equals_per_tensor_slices(spec, data):
    lows = np.array(data.draw(st.lists(finite, min_size=1, max_size=6)))
    highs = lows + np.array(data.draw(st.lists(st.floats(0, 1e3), min_size=len(lows), max_size=len(lows))))
    channel_spec = QuantSpec(spec.bits, spec.signed, spec.symmetric, True, 0, spec.narrow_range)
    scales, zero_points = qparams(lows, highs, channel_spec)
    for i in range(len(lows)):
        scale, zero_point = qparams(lows[i], highs[i], spec)
        assert scales[i] == scale and zero_points[i] == zero_point


@pytest.mark.parametrize(
    "low, high, match",
    [(1.0, -1.0, "min_val must be <="), (np.nan, 1.0, "min_val must be finite"), (0.0, np.inf, "max_val")],
)
def test_qparams_rejects_bad_ranges(low, high, match):
    with pytest.raises(ValueError, match=match):
        qparams(low, high, QuantSpec())


# ----------------------------------------------------------------------------------- quantize/dequantize
def _random_params(data, spec):
    scale = data.draw(st.floats(1e-4, 1e3).map(np.float32))
    zero_point = 0 if spec.symmetric and spec.signed else data.draw(st.integers(spec.qmin, spec.qmax))
    return np.float32(scale), zero_point


@SETTINGS
@given(spec=specs, data=st.data())
def test_quantize_error_idempotence_and_monotonicity(spec, data):
    scale, zero_point = _random_params(data, spec)
    low = np.float32(scale) * np.float32(spec.qmin - zero_point)
    high = np.float32(scale) * np.float32(spec.qmax - zero_point)
    x = np.sort(
        np.array(
            data.draw(st.lists(st.floats(float(low), float(high), width=32), min_size=1, max_size=40)), dtype=np.float32
        )
    )
    q = quantize(x, scale, zero_point, spec)
    assert q.dtype == spec.dtype
    assert np.all(np.diff(q.astype(np.int64)) >= 0)  # monotonic
    x_hat = dequantize(q, scale, zero_point, spec)
    assert x_hat.dtype == np.float32
    assert np.all(np.abs(x_hat - x) <= scale * 0.5 * (1 + 1e-6) + 1e-6 * np.abs(x))
    np.testing.assert_array_equal(quantize(x_hat, scale, zero_point, spec), q)  # idempotent
    codes = np.arange(spec.qmin, spec.qmax + 1).astype(spec.dtype)
    np.testing.assert_array_equal(quantize(dequantize(codes, scale, zero_point, spec), scale, zero_point, spec), codes)


def test_quantize_rounds_half_to_even_and_saturates():
    spec = QuantSpec()
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1e30, -1e30, np.inf, -np.inf], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, 1.0, 0, spec), [0, 2, 2, 0, -2, 127, -128, 127, -128])
    np.testing.assert_array_equal(quantize(np.float32([200.0, 300.0]), 1.0, -100, spec), [100, 127])


def test_quantize_uses_float32_arithmetic():
    # float64 x is rounded to float32 first (documented contract shared with fake-quant): here
    # x / scale is 17.49999... in float64 but float32(x) / scale is 17.5000... -> 18.
    x, scale = 14.309662878513334, np.float32(0.817695)
    assert np.rint(x / np.float64(scale)) == 17
    assert quantize(np.float64(x), scale, 0, QuantSpec()) == 18


def test_quantize_per_channel_axis():
    spec = QuantSpec(per_channel=True, axis=1)
    x = np.array([[1.0, 1.0, 1.0]], dtype=np.float32)
    scale = np.array([1.0, 0.5, 0.25], dtype=np.float32)
    q = quantize(x, scale, np.array([0, 1, -1]), spec)
    np.testing.assert_array_equal(q, [[1, 3, 3]])
    np.testing.assert_array_equal(dequantize(q, scale, np.array([0, 1, -1]), spec), x)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: quantize(np.array([np.nan], np.float32), 1.0, 0, QuantSpec()), ValueError, "NaN"),
        (lambda: quantize(np.array([1, 2]), 1.0, 0, QuantSpec()), TypeError, "floating"),
        (lambda: quantize(np.ones(2), 0.0, 0, QuantSpec()), ValueError, "scale"),
        (lambda: quantize(np.ones(2), -1.0, 0, QuantSpec()), ValueError, "scale"),
        (lambda: quantize(np.ones(2), np.nan, 0, QuantSpec()), ValueError, "scale"),
        (lambda: quantize(np.ones(2), 1.0, 128, QuantSpec()), ValueError, "zero_point"),
        (lambda: quantize(np.ones(2), 1.0, 0.0, QuantSpec()), TypeError, "zero_point"),
        (lambda: quantize(np.ones((2, 3)), np.ones(2), 0, QuantSpec(per_channel=True, axis=1)), ValueError, "scale"),
        (lambda: quantize(np.ones(2), np.ones(2), 0, QuantSpec()), ValueError, "per-tensor"),
        (lambda: dequantize(np.ones(2, np.int16), 1.0, 0, QuantSpec()), TypeError, "q must have dtype int8"),
        (lambda: quantize(np.ones(2), 1.0, 0, "int8"), TypeError, "spec"),
    ],
)
def test_quantize_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------- multipliers
reals = st.floats(2.0**-60, 2.0**30, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(real=reals)
def test_quantize_multiplier_range_and_accuracy(real):
    m0, shift = quantize_multiplier(real)
    assert isinstance(m0, int) and isinstance(shift, int)
    assert 2**30 <= m0 < 2**31
    approx = Fraction(m0, 2**31) * Fraction(2) ** -shift
    assert abs(approx - Fraction(real)) <= Fraction(1, 2**32) * Fraction(2) ** -shift  # half a unit of m0


@SETTINGS
@given(values=st.lists(reals, min_size=1, max_size=8))
def test_quantize_multiplier_vectorised_matches_scalar(values):
    m0, shift = quantize_multiplier(np.array(values))
    assert m0.dtype == np.int32 and shift.dtype == np.int32
    assert [(int(a), int(b)) for a, b in zip(m0, shift, strict=True)] == [quantize_multiplier(v) for v in values]


def test_quantize_multiplier_rounding_carry_and_errors():
    assert quantize_multiplier(1.0 - 2.0**-40) == (2**30, -1)  # m0 would round to 2^31: carried
    assert quantize_multiplier(1.0) == (2**30, -1)
    for bad in (0.0, -1.0, np.nan, np.inf, 2.0**31, 2.0**-70):
        with pytest.raises(ValueError, match="real_multiplier"):
            quantize_multiplier(bad)


def test_requantization_multipliers_and_bias():
    scales = np.array([0.01, 0.02], dtype=np.float32)
    m0, shift = requantization_multipliers(np.float32(0.5), scales, np.float32(0.1))
    expected = quantize_multiplier(0.5 * scales.astype(np.float64) / np.float64(np.float32(0.1)))
    np.testing.assert_array_equal(m0, expected[0])
    np.testing.assert_array_equal(shift, expected[1])
    bias = quantize_bias(np.array([1.0, -1.0]), np.float32(0.5), scales)
    np.testing.assert_array_equal(bias, np.rint(np.array([1.0, -1.0]) / (0.5 * scales.astype(np.float64))))
    with pytest.raises(ValueError, match="does not fit int32"):
        quantize_bias(np.array([1e9]), np.float32(1e-3), np.float32(1e-3))
    assert quantize_bias(np.array([1e9]), np.float32(1e-3), np.float32(1e-3), np.int64).dtype == np.int64


@SETTINGS
@given(bias=st.lists(st.floats(-1e6, 1e6, allow_subnormal=False, width=32), min_size=1, max_size=6),
       input_scale=st.floats(2.0**-23, 1.0, width=32), weight_scale=st.floats(2.0**-23, 1.0, width=32),
       per_tensor=st.booleans(), wide=st.booleans())
def test_bias_fitting_weight_scale_is_onnx_runtimes_smallest_raised_scale(bias, input_scale, weight_scale,
                                                                        per_tensor, wide):
    """Channels whose bias fits keep their scale bit for bit; the others get the smallest float32
    ``>= 1.0001 |b| / (s_in L)`` (checked with Fractions), and then :func:`quantize_bias` fits."""
    dtype, limit = (np.int64, 2**62) if wide else (np.int32, INT32_MAX)
    b = np.array(bias, np.float32)
    s_in = np.float32(input_scale)
    s_w = np.float32(weight_scale) if per_tensor else np.full(b.shape, weight_scale, np.float32)
    scale, adjusted = bias_fitting_weight_scale(b, s_in, s_w, dtype)
    assert scale.dtype == np.float32 and scale.shape == np.shape(s_w) and adjusted.shape == np.shape(s_w)
    steps = [abs(round(Fraction(float(value)) / (Fraction(float(s_in)) * Fraction(float(weight_scale)))))
             for value in b]
    fits = [step <= limit for step in steps]  # (the float64 quotient of quantize_bias is exact enough here)
    assert not np.any(scale[~adjusted] != np.asarray(s_w)[~adjusted])
    largest = [max(abs(Fraction(float(value))) for value in b)] if per_tensor else [abs(Fraction(float(v))) for v in b]
    for index in np.ndindex(scale.shape):
        if not adjusted[index]:
            assert all(fits) if per_tensor else fits[index[0]]
            continue
        needed = Fraction(10001, 10000) * largest[index[0] if index else 0] / (Fraction(float(s_in)) * limit)
        assert Fraction(float(scale[index])) >= needed > Fraction(float(np.nextafter(scale[index], np.float32(0))))
    assert np.all(np.abs(quantize_bias(b, s_in, scale, dtype).astype(np.float64)) <= limit)


# ---------------------------------------------------------------------------- gemmlowp primitives
@SETTINGS
@given(a=int32s, b=int32s)
def test_high_mul_matches_oracle(a, b):
    got = saturating_rounding_doubling_high_mul(np.int32(a), np.int32(b))
    assert int(got) == oracle_high_mul(a, b)


def test_high_mul_saturating_corner():
    got = saturating_rounding_doubling_high_mul(
        np.array([INT32_MIN, INT32_MIN], np.int32), np.array([INT32_MIN, INT32_MIN + 1], np.int32)
    )
    np.testing.assert_array_equal(got, [INT32_MAX, INT32_MAX])  # saturated; the second is exact


@SETTINGS
@given(x=st.integers(-(2**62), 2**62), exponent=st.integers(0, 62))
def test_divide_by_pot_matches_oracle(x, exponent):
    assert int(rounding_divide_by_pot(np.int64(x), exponent)) == oracle_divide_by_pot(x, exponent)
    if INT32_MIN <= x <= INT32_MAX:
        assert int(rounding_divide_by_pot(np.int32(x), exponent)) == oracle_divide_by_pot(x, exponent)


multipliers = st.tuples(st.integers(2**30, 2**31 - 1), st.integers(-31, 62))


@SETTINGS
@given(acc=st.lists(int32s, min_size=1, max_size=20), multiplier=multipliers)
def test_int32_requantization_matches_oracle_and_wide_path(acc, multiplier):
    m0, shift = multiplier
    acc32 = np.array(acc, dtype=np.int32)
    got = multiply_by_quantized_multiplier(acc32, m0, shift)
    assert got.dtype == np.int32
    assert [int(v) for v in got] == [oracle_mbqm(a, m0, shift, (INT32_MIN, INT32_MAX)) for a in acc]
    spec = QuantSpec(bits=16)
    np.testing.assert_array_equal(
        requantize(acc32, m0, shift, 7, spec), requantize(acc32.astype(np.int64), m0, shift, 7, spec)
    )


@SETTINGS
@given(acc=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=20), multiplier=multipliers)
def test_int64_requantization_matches_wide_oracle(acc, multiplier):
    m0, shift = multiplier
    got = multiply_by_quantized_multiplier(np.array(acc, dtype=np.int64), m0, shift)
    assert got.dtype == np.int64
    assert [int(v) for v in got] == [oracle_mbqm(a, m0, shift, (-(2**62), 2**62)) for a in acc]


@SETTINGS
@given(acc=st.lists(int32s, min_size=1, max_size=30), real=st.floats(2.0**-40, 2.0**10), spec=specs, data=st.data())
def test_requantize_within_one_of_rounded_product(acc, real, spec, data):
    zero_point = data.draw(st.integers(spec.qmin, spec.qmax))
    m0, shift = quantize_multiplier(real)
    got = requantize(np.array(acc, dtype=np.int32), m0, shift, zero_point, spec)
    assert got.dtype == spec.dtype
    ideal = [min(max(round(Fraction(a) * Fraction(real)) + zero_point, spec.qmin), spec.qmax) for a in acc]
    assert np.all(np.abs(got.astype(np.int64) - np.array(ideal)) <= 1)


def test_requantize_per_channel_and_errors():
    acc = np.array([[100, 100], [-100, -100]], dtype=np.int32)
    m0 = np.array([2**30, 2**30], dtype=np.int32)
    got = requantize(acc, m0, np.array([1, 2]), 0, QuantSpec())  # multipliers 1/4 and 1/8
    np.testing.assert_array_equal(got, [[25, 13], [-25, -13]])
    with pytest.raises(ValueError, match="m0 must lie"):
        requantize(acc, 2**31, 0, 0, QuantSpec())
    with pytest.raises(ValueError, match="shift must lie"):
        requantize(acc, 2**30, 63, 0, QuantSpec())
    with pytest.raises(TypeError, match="acc must be int32 or int64"):
        requantize(acc.astype(np.float32), 2**30, 0, 0, QuantSpec())
    with pytest.raises(ValueError, match="zero_point"):
        requantize(acc, 2**30, 0, 200, QuantSpec())
