"""I-BERT's integer-only kernels (Kim et al. 2021) against the real functions, with bounds derived from the
polynomials' own errors and every rounding step; the integer square root is exact; ranges that would overflow
int64 are refused, and the GPT's ranges are accepted."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf

from nanoopt.kernels.ibert import (
    EXP_A,
    EXP_B,
    EXP_RELATIVE_ERROR,
    GELU_ABSOLUTE_ERROR,
    i_exp,
    i_gelu,
    i_layernorm,
    i_poly,
    i_softmax,
    i_sqrt,
)

SETTINGS = settings(max_examples=60, deadline=None)
# scales drawn as 2^-e for real e: every bound below is stated for the scale drawn
SCALES = st.floats(min_value=10.0, max_value=20.0).map(lambda e: 2.0 ** -e)


def test_polynomial_constants_have_the_stated_errors():
    """The constants the bounds use are what the polynomials give (dense grid, float64)."""
    p = np.linspace(-math.log(2), 0, 200_001)
    assert np.abs((EXP_A * (p + EXP_B) ** 2 + 0.344) / np.exp(p) - 1).max() <= EXP_RELATIVE_ERROR
    x = np.linspace(-12, 12, 400_001)
    u = x / math.sqrt(2)
    approx = np.sign(u) * (1 - 0.2888 * (np.minimum(np.abs(u), 1.769) - 1.769) ** 2)
    gelu = x / 2 * (1 + erf(x / math.sqrt(2)))
    assert np.abs(x / 2 * (1 + approx) - gelu).max() <= GELU_ABSOLUTE_ERROR


# --------------------------------------------------------------------------------------------- i-sqrt
def test_i_sqrt_is_floor_sqrt_for_every_n_below_2_to_the_20():
    n = np.arange(2**20, dtype=np.int64)
    root = i_sqrt(n)
    assert np.all(root * root <= n) and np.all((root + 1) * (root + 1) > n)


@SETTINGS
@given(values=st.lists(st.integers(0, 2**62 - 1), min_size=1, max_size=40))
def test_i_sqrt_is_floor_sqrt_up_to_2_to_the_62(values):
    got = i_sqrt(np.array(values, np.int64))
    assert got.tolist() == [math.isqrt(v) for v in values]


def test_i_sqrt_refuses_negative_or_too_large():
    with pytest.raises(ValueError, match="n must lie in"):
        i_sqrt(np.array([-1]))
    with pytest.raises(ValueError, match="n must lie in"):
        i_sqrt(np.array([2**62]))


# --------------------------------------------------------------------------------------------- i-exp
@SETTINGS
@given(scale=SCALES, seed=st.integers(0, 2**32 - 1))
def test_i_exp_relative_error(scale, seed):
    """exp(x) = 2^-z exp(p): the polynomial's relative error (3.1e-3), the floors of b / S and c / (a S^2) (at most
    2.1 S relative, as L(p) >= 0.5), ln 2 represented as S floor(ln 2 / S) (relative z S), and the final right shift
    (one output unit); below -30 ln 2 the clip (exp < 1e-9)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([-rng.exponential(3.0, 500), [0.0, -math.log(2), -25.0]])
    q = np.round(x / scale).astype(np.int64)
    out, out_scale = i_exp(q, scale)
    got, exact = out * out_scale, np.exp(q * scale)
    z = np.minimum(np.floor(-q / math.floor(math.log(2) / scale)), 30)
    relative = (1 + EXP_RELATIVE_ERROR) * (1 + 2.1 * scale) * np.exp(z * scale) - 1
    bound = relative * exact + out_scale + 2.0**-29
    assert np.all(np.abs(got - exact) <= bound)
    assert out.dtype == np.int64 and np.all(out >= 0)


def test_i_exp_refuses_positive_codes_and_coarse_scales():
    with pytest.raises(ValueError, match="must be <= 0"):
        i_exp(np.array([1]), 1e-3)
    with pytest.raises(ValueError, match="scale must lie in"):
        i_exp(np.array([-1]), 0.1)


# --------------------------------------------------------------------------------------------- softmax
@SETTINGS
@given(scale=SCALES, seed=st.integers(0, 2**32 - 1), t=st.integers(1, 64), causal=st.booleans())
def test_i_softmax_is_a_distribution_close_to_softmax(scale, seed, t, causal):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-8.0, 8.0, size=(3, t))  # score ranges up to 16: exponents down to e^-16
    q = np.round(x / scale).astype(np.int64)
    mask = np.triu(np.ones((3, t), bool), k=1) if causal else None
    p = i_softmax(q, scale, mask)
    assert p.dtype == np.int64 and p.min() >= 0 and p.max() <= 255
    if causal:
        assert np.all(p[mask] == 0)
    xs = np.where(mask, -np.inf, q * scale) if causal else q * scale
    e = np.exp(xs - xs.max(-1, keepdims=True))
    sigma = e / e.sum(-1, keepdims=True)
    # rows sum to 1 within the rounding of each entry (half a code each) and the reciprocal (2^-20)
    assert np.all(np.abs(p.sum(-1) / 255 - 1) <= t * 0.5 / 255 + 2.0**-20)
    # each entry: half a code, the reciprocal, i_exp's relative error twice (numerator and sum), and the floors
    # of the exponentials (a unit each; the row sum is at least 2^33 / 2^6 units, see i_softmax)
    z = min(16 / math.log(2) + 1, 30)
    rho = (1 + EXP_RELATIVE_ERROR) * (1 + 2.1 * scale) * math.exp(z * scale) - 1
    bound = 0.5 / 255 + 2.0**-20 + sigma * 2 * rho / (1 - rho) + 2 * (t + 1) / 2.0**27
    assert np.all(np.abs(p / 255 - sigma) <= bound)


def test_i_softmax_refuses_fully_masked_rows():
    with pytest.raises(ValueError, match="at least one unmasked"):
        i_softmax(np.zeros((1, 3), np.int64), 1e-3, np.ones((1, 3), bool))


# --------------------------------------------------------------------------------------------- i-GELU
@SETTINGS
@given(scale=st.floats(min_value=5.0, max_value=40.0).map(lambda e: 2.0 ** -e), seed=st.integers(0, 2**32 - 1))
def test_i_gelu_absolute_error(scale, seed):
    """The polynomial's error (0.0182) plus, times |x| / 2: the clip point and b as S' floor(1.769 / S')
    (2 |a| 1.769 S' + |a| S'^2), the floors of 1 / (|a| S'^2) and 1 / S_erf (two units of S_erf), and the
    right shift of 1 + erf to 20 bits (2^-19); S' = S / sqrt 2 (after coarsening below 2^-24)."""
    rng = np.random.default_rng(seed)
    limit = min(12.0, 2.0**31 * scale)
    x = rng.uniform(-limit, limit, 400)
    q = np.round(x / scale).astype(np.int64)
    out, out_scale = i_gelu(q, scale)
    got = out * out_scale
    coarse = max(scale, 2.0**-24)
    xq = q * scale
    exact = xq / 2 * (1 + erf(xq / math.sqrt(2)))
    s1 = coarse / math.sqrt(2)
    rounding = 2 * 0.2888 * 1.769 * s1 + 0.2888 * s1 * s1 + 2 * 0.2888 * s1 * s1 + 2.0**-19
    bound = GELU_ABSOLUTE_ERROR + np.abs(xq) / 2 * rounding + coarse + out_scale
    assert np.all(np.abs(got - exact) <= bound)


def test_i_gelu_per_channel_scales_equal_per_column_calls():
    rng = np.random.default_rng(0)
    q = rng.integers(-2**31, 2**31, size=(5, 4))
    scales = np.array([1e-4, 3e-6, 2.0**-30, 2.0**-40])
    out, out_scale = i_gelu(q, scales)
    for c in range(4):
        column, column_scale = i_gelu(q[:, c], scales[c])
        assert np.array_equal(out[:, c], column) and out_scale[c] == column_scale


def test_i_gelu_takes_the_whole_int32_range_at_any_float32_scale_and_refuses_more():
    """The GPT's c_fc accumulators are int32 with scales s_x s_w >= 2^-46: no overflow there."""
    q = np.array([-(2**31), -1, 0, 1, 2**31 - 1], np.int64)
    for scale in (2.0**-46, 2.0**-23, 1e-3, 0.1):
        out, _ = i_gelu(q, scale)
        assert np.abs(out).max() < 2**62
    with pytest.raises(OverflowError, match="i_gelu"):
        i_gelu(np.array([2**45]), 1e-4)  # 1 + erf in 2^21 units: 2^66


# --------------------------------------------------------------------------------------------- LayerNorm
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 256), spread=st.floats(1.0, 2.0**15 - 1),
       eps=st.sampled_from([0.0, 1e-5, 1e-2]), scale=SCALES)
def test_i_layernorm_is_close_to_float_layernorm(seed, n, spread, eps, scale):
    """Errors: the rounded mean moves every y by |d| <= 1/2 (d / std, and std by d^2 / (2 var)), the rounded eps
    (half a unit of v), the floor of the root with k extra bits (relative <= 2^-k / sqrt(v) <= 1 / sqrt(v)), the
    reciprocal (2^-30 relative) and the output floor (sqrt(N) 2^-30)."""
    rng = np.random.default_rng(seed)
    q = np.clip(np.round(rng.normal(0, spread, size=(4, n)) + rng.normal(0, spread, size=(4, 1))),
                -(2**15), 2**15 - 1).astype(np.int64)
    out, out_scale = i_layernorm(q, scale, eps)
    x = q * scale
    var = x.var(-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # constant rows without eps: 0 / 0, left out below
        ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(var + eps)
    v = np.maximum(n * (var + eps) / scale**2, 1.0)  # in units of S^2, as the kernel's v
    std_units = np.sqrt(np.maximum(var + eps, 1e-300)) / scale
    bound = (0.5 / std_units + np.abs(ref) * (0.125 / std_units**2 + 0.5 / v + 2 / np.sqrt(v) + 2.0**-29)
             + math.sqrt(n) * 2.0**-29)
    rows = (var[:, 0] > 0) | (eps > 0)
    assert np.all(np.abs(out * out_scale - ref)[rows] <= bound[rows] + 1e-12)
    assert np.all(np.abs(out) <= 2**30 + 1)


def test_i_layernorm_constant_rows_give_zero_and_huge_inputs_are_refused():
    out, _ = i_layernorm(np.full((2, 5), 7), 0.1)
    assert np.all(out == 0)
    with pytest.raises(OverflowError, match="i_layernorm"):
        i_layernorm(np.full((1, 4), 2**60), 0.1)


def test_i_poly_is_the_integer_polynomial():
    q = np.arange(-50, 51)
    out, s = i_poly(q, 0.125, 1.0, 2.0, 3.0)
    assert np.allclose(out * s, (q * 0.125 + 2.0) ** 2 + 3.0)  # S = 1/8: b / S and c / S^2 are integers


@SETTINGS
@given(scale=SCALES, seed=st.integers(0, 2**32 - 1), t=st.integers(1, 32))
def test_i_softmax_row_ignores_masked_entries_and_other_rows(scale, seed, t):
    """What the KV cache needs: a causal row gives the codes of the same row computed alone, unmasked."""
    q = np.round(np.random.default_rng(seed).uniform(-8, 8, (t, t)) / scale).astype(np.int64)
    full = i_softmax(q, scale, np.triu(np.ones((t, t), bool), k=1))
    for j in range(t):
        assert np.array_equal(full[j, :j + 1], i_softmax(q[j:j + 1, :j + 1], scale)[0])


def test_softmax_and_layernorm_take_the_gpt_ranges_without_overflow():
    """Scores are int32 (D 127^2 at most) at any scale the exponential accepts; LayerNorm inputs are int16 codes
    over rows of up to 4,096 channels: every intermediate stays below 2^62 (the kernels check it)."""
    scores = np.array([[-(2**31), 0, 2**31 - 1]], np.int64)
    for scale in (2.0**-40, 2.0**-24, 2.0**-16, 0.04):
        p = i_softmax(scores, scale)
        x = scores * scale
        exact = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        assert p.min() >= 0 and p.max() <= 255 and np.abs(p / 255 - exact).max() <= 2 / 255
    rows = np.array([[-(2**15)] * 2048 + [2**15 - 1] * 2048, [2**15 - 1] * 4095 + [-(2**15)]], np.int64)
    out, scale = i_layernorm(rows, 2.0**-23, 1e-5)
    assert np.abs(out).max() <= 2**30 + 1
    x = rows * 2.0**-23
    reference = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out * scale, reference, atol=1e-4)
