"""Observers: statistics against plain NumPy, exact histogram merging, range searches against brute force."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NotFittedError,
    PercentileObserver,
    PerChannelMinMaxObserver,
    PerChannelMSEObserver,
)
from nanoopt.spec import QuantSpec, dequantize, qparams, quantize
from nanoopt.tensor import Tensor

SETTINGS = settings(max_examples=40, deadline=None)
ASYMMETRIC = QuantSpec(bits=8)
SYMMETRIC = QuantSpec(bits=8, symmetric=True)
PER_CHANNEL = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=1, narrow_range=True)


@st.composite
def batches(draw, channels=None, min_batches=1):
    count = draw(st.integers(min_batches, 4))
    channels = channels or draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    offset = draw(st.sampled_from([-2.0, 0.0, 3.0]))
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(draw(st.integers(1, 20)), channels)) * scale + offset).astype(np.float32)
            for _ in range(count)]


def quantization_mse(data, low, high, spec):
    scale, zero_point = qparams(low, high, spec)
    restored = dequantize(quantize(data, scale, zero_point, spec), scale, zero_point, spec)
    return float(np.mean((data.astype(np.float64) - restored) ** 2))


# ------------------------------------------------------------------------------------------------ min / max
@SETTINGS
@given(batches())
def test_minmax_partial_fit_equals_fit_on_everything(parts):
    everything = np.concatenate(parts)
    observer = MinMaxObserver(ASYMMETRIC)
    for part in parts:
        observer.partial_fit(part)
    assert observer.min_val_ == float(everything.min()) and observer.max_val_ == float(everything.max())
    scale, zero_point = qparams(everything.min(), everything.max(), ASYMMETRIC)
    assert observer.scale_ == scale and observer.zero_point_ == zero_point


@SETTINGS
@given(batches())
def test_per_channel_minmax_matches_numpy(parts):
    observer = PerChannelMinMaxObserver(PER_CHANNEL)
    for part in parts:
        observer.partial_fit(Tensor(part))
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(observer.min_val_, everything.min(axis=0))
    np.testing.assert_array_equal(observer.max_val_, everything.max(axis=0))
    assert observer.scale_.shape == (everything.shape[1],)


@SETTINGS
@given(batches(), st.floats(0.01, 1.0))
def test_moving_average_follows_its_recurrence(parts, constant):
    observer = MovingAverageMinMaxObserver(SYMMETRIC, averaging_constant=constant)
    low, high = None, None
    for part in parts:
        observer.partial_fit(part)
        if low is None:
            low, high = float(part.min()), float(part.max())
        else:
            low = (1 - constant) * low + constant * float(part.min())
            high = (1 - constant) * high + constant * float(part.max())
    assert math.isclose(observer.min_val_, low, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(observer.max_val_, high, rel_tol=1e-12, abs_tol=1e-12)
    per_channel = MovingAveragePerChannelMinMaxObserver(PER_CHANNEL, averaging_constant=constant)
    low, high = None, None                                   # the same recurrence for every channel (axis 1)
    for part in parts:
        per_channel.partial_fit(part)
        part_low, part_high = part.astype(np.float64).min(axis=0), part.astype(np.float64).max(axis=0)
        if low is None:
            low, high = part_low, part_high
        else:
            low = (1 - constant) * low + constant * part_low
            high = (1 - constant) * high + constant * part_high
    assert per_channel.max_val_.shape == (parts[0].shape[1],)
    np.testing.assert_allclose(per_channel.min_val_, low, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(per_channel.max_val_, high, rtol=1e-12, atol=1e-12)


def test_observer_returns_its_input_and_fit_forgets():
    x = np.array([1.0, -3.0], np.float32)
    observer = MinMaxObserver()
    assert observer(x) is x
    observer.fit(np.array([0.5], np.float32))
    assert observer.min_val_ == 0.5 and observer.n_batches_seen_ == 1


@pytest.mark.parametrize("make", [MinMaxObserver, HistogramObserver, EntropyObserver, PercentileObserver,
                                  PerChannelMinMaxObserver, PerChannelMSEObserver])
def test_bad_calibration_data_is_refused(make):
    observer = make()
    with pytest.raises(NotFittedError, match="seen no data"):
        _ = observer.scale_
    assert not hasattr(observer, "min_val_")
    with pytest.raises(ValueError, match="NaN or Inf"):
        observer.partial_fit(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        observer.partial_fit(np.array([[np.inf, 1.0]]))
    with pytest.raises(ValueError, match="empty"):
        observer.partial_fit(np.zeros((0, 3)))
    with pytest.raises(TypeError, match="floating point"):
        observer.partial_fit(np.array([[1, 2]]))


def test_channel_count_must_not_change():
    observer = PerChannelMinMaxObserver().partial_fit(np.ones((3, 4)))
    with pytest.raises(ValueError, match="3 channels before, now 2"):
        observer.partial_fit(np.ones((2, 4)))


def test_specs_an_observer_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="per-channel spec"):
        PerChannelMinMaxObserver(QuantSpec())
    with pytest.raises(ValueError, match="whole tensors"):
        HistogramObserver(PER_CHANNEL)
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=3)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=20.0)


# ------------------------------------------------------------------------------------------------ histograms
@SETTINGS
@given(batches(channels=1, min_batches=2), st.sampled_from([8, 16, 64]))
def test_histogram_merges_exactly(parts, bins):
    observer = HistogramObserver(bins=bins)
    for part in parts:
        observer.partial_fit(part)
    everything = np.concatenate(parts).astype(np.float64).ravel()
    assert observer._counts.sum() == everything.size
    assert observer._counts.size <= 2 * bins + 1
    # the same counts as binning all the data at once on the final aligned grid
    index = np.clip(np.floor(everything / observer._width).astype(np.int64) - observer._first, 0,
                    observer._counts.size - 1)
    direct = np.bincount(index, minlength=observer._counts.size)
    # values within one float rounding of an edge may fall either side when the grid changed; allow those only
    moved = np.abs(direct - observer._counts).sum()
    near_edge = np.sum(np.abs(everything / observer._width - np.rint(everything / observer._width)) < 1e-6)
    assert moved <= 2 * near_edge


def brute_force_mse_error(observer, a, b):
    """E(a, b) with explicit sums over the bins (no prefix sums)."""
    centres, counts = observer._edges()
    levels = observer.spec.qmax - observer.spec.qmin
    step = (2 * max(-a, b) if observer.spec.symmetric else b - a) / levels
    below, above = centres < a, centres > b
    inside = counts[~below & ~above].sum() - observer._zeros
    return (step**2 / 12 * inside + np.sum(counts[below] * (centres[below] - a) ** 2)
            + np.sum(counts[above] * (centres[above] - b) ** 2))


@SETTINGS
@given(batches(channels=1), st.sampled_from([ASYMMETRIC, SYMMETRIC, QuantSpec(bits=3)]))
def test_mse_search_finds_the_brute_force_minimum(parts, spec):
    observer = HistogramObserver(spec, bins=8)
    for part in parts:
        observer.partial_fit(part)
    width, first, last = observer._width, observer._first, observer._first + observer._counts.size
    candidates = [(i * width, j * width) for i in range(min(first, 0), 1) for j in range(0, max(last, 0) + 1)
                  if not spec.symmetric or i == -j]
    if spec.symmetric:
        reach = max(-min(first, 0), max(last, 0))
        candidates = [(-j * width, j * width) for j in range(reach + 1)]
    best = min(brute_force_mse_error(observer, a, b) for a, b in candidates)
    a, b = observer._best_edges()
    assert brute_force_mse_error(observer, a, b) <= best * (1 + 1e-9) + 1e-12
    low, high = observer.min_val_, observer.max_val_
    assert min(observer._min, 0) <= low <= 0 <= high <= max(observer._max, 0)


# MSE(searched range) / MSE(min-max range) may not exceed these (kind, bits) bounds. Measured over 200-300 seeds of
# 200k samples: 4 bits: half-normal ("relu") mean 0.49, sd 0.05, worst 0.60; Laplace and normal lower (<= 0.44 in
# 12 seeds). 8 bits: Laplace mean 0.78 sd 0.04 worst 0.87; normal mean 0.82 sd 0.035 worst 0.91; half-normal mean
# 0.92 sd 0.022 worst 0.98. Each bound is >= 4.5 sd from the mean. Half-normal at 8 bits is the one case where
# the histogram's estimate of the error can put the searched range slightly behind min-max (with 20k samples,
# ~1 seed in 400 was 3 % behind): there the bound is 1.02 and the test's name says so.
MSE_VERSUS_MIN_MAX = {("laplace", 4): 0.75, ("normal", 4): 0.75, ("relu", 4): 0.75,
                      ("laplace", 8): 1.0, ("normal", 8): 1.0, ("relu", 8): 1.02}


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["laplace", "normal", "relu"]))
def test_mse_range_beats_min_max_by_a_quarter_at_4_bits_and_is_no_worse_at_8_bits_but_half_normal_2_percent(
        seed, kind):
    rng = np.random.default_rng(seed)
    data = rng.laplace(size=200_000) if kind == "laplace" else rng.normal(size=200_000)
    if kind == "relu":
        data = np.maximum(data, 0)
    data = data.astype(np.float32)
    for spec in (QuantSpec(bits=4), QuantSpec(bits=8)):
        searched = HistogramObserver(spec).fit(data)
        plain = MinMaxObserver(spec).fit(data)
        mse_searched = quantization_mse(data, searched.min_val_, searched.max_val_, spec)
        mse_plain = quantization_mse(data, plain.min_val_, plain.max_val_, spec)
        assert mse_searched <= MSE_VERSUS_MIN_MAX[kind, spec.bits] * mse_plain, (kind, spec.bits)


def assert_is_quantile(data, value, fraction, width):
    """``value`` splits ``data`` at ``fraction``, up to the mass of the bin it falls in (and one sample)."""
    below = np.mean(data <= value)
    in_bin = np.mean(np.floor(data / width) == np.floor(value / width))
    assert abs(below - fraction) <= in_bin + 1.0 / data.size


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.floats(90.0, 99.9))
def test_percentile_observer_returns_histogram_quantiles(seed, percentile):
    data = np.random.default_rng(seed).normal(size=5000).astype(np.float32) + 0.5
    observer = PercentileObserver(percentile=percentile, bins=512).fit(data)
    assert_is_quantile(data, observer.max_val_, percentile / 100, observer._width)
    if observer.min_val_ < 0:
        assert_is_quantile(data, observer.min_val_, 1 - percentile / 100, observer._width)
    symmetric = PercentileObserver(SYMMETRIC, percentile=percentile, bins=512).fit(data)
    if symmetric.max_val_ < data.max():
        assert_is_quantile(np.abs(data), symmetric.max_val_, percentile / 100, symmetric._width)


def reference_entropy_threshold(folded, levels):
    """TensorRT's loop written plainly (np.array_split chunks, explicit smoothing)."""
    def smooth(p, eps=1e-4):
        zeros = (p == 0).sum()
        nonzeros = p.size - zeros
        return np.where(p == 0, eps, p - eps * zeros / nonzeros)

    best, best_stop = math.inf, None
    for stop in range(levels, folded.size + 1):
        p = folded[:stop].copy()
        p[-1] += folded[stop:].sum()
        q = np.zeros(stop)
        for chunk in np.array_split(np.arange(stop), levels):
            values = folded[chunk]
            used = values > 0
            if used.any():
                q[chunk[used]] = values.sum() / used.sum()
        if q.sum() == 0:
            continue
        p, q = smooth(p / p.sum()), smooth(q / q.sum())
        mask = p > 0
        divergence = np.sum(p[mask] * np.log(p[mask] / q[mask]))
        if divergence < best:
            best, best_stop = divergence, stop
    return best_stop


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([QuantSpec(bits=3), QuantSpec(bits=4, symmetric=True)]))
def test_entropy_threshold_matches_a_plain_loop(seed, spec):
    data = np.abs(np.random.default_rng(seed).laplace(size=3000)).astype(np.float32)
    observer = EntropyObserver(spec, bins=64).fit(data)
    levels = spec.qmax - spec.qmin + 1
    if spec.symmetric:
        levels //= 2
    stop = reference_entropy_threshold(observer._folded(), levels)
    assert math.isclose(observer.max_val_, min(stop * observer._width, data.max()), rel_tol=1e-12)


def test_entropy_keeps_a_tail_free_range_and_clips_heavy_tails():
    rng = np.random.default_rng(0)
    uniform = rng.uniform(0, 1, size=50000).astype(np.float32)
    assert EntropyObserver().fit(uniform).max_val_ >= 0.9
    heavy = np.abs(rng.laplace(size=50000)).astype(np.float32)
    assert EntropyObserver().fit(heavy).max_val_ < 0.7 * heavy.max()


def test_zero_only_data_then_real_data():
    observer = HistogramObserver().partial_fit(np.zeros(10, np.float32))
    assert observer.max_val_ == 0.0 and observer.scale_ > 0
    observer.partial_fit(np.linspace(-1, 5, 100).astype(np.float32))
    assert observer._counts.sum() == 110 and observer.max_val_ > 4.0


# ------------------------------------------------------------------------------------------------ weights (MSE)
@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 4, 8]))
def test_per_channel_mse_is_never_worse_than_min_max(seed, bits):
    spec = QuantSpec(bits=bits, symmetric=True, per_channel=True, narrow_range=True)
    weight = np.random.default_rng(seed).standard_t(3, size=(6, 40)).astype(np.float32)
    searched = PerChannelMSEObserver(spec).fit(weight)
    plain = PerChannelMinMaxObserver(spec).fit(weight)
    for observer_mse, observer_plain in [(searched, plain)]:
        errors = []
        for observer in (observer_mse, observer_plain):
            scale, zero_point = observer.scale_, observer.zero_point_
            restored = dequantize(quantize(weight, scale, zero_point, spec), scale, zero_point, spec)
            errors.append(((weight.astype(np.float64) - restored) ** 2).sum(axis=1))
        assert np.all(errors[0] <= errors[1] + 1e-12)
