"""Observers: collect statistics of a tensor and choose the range ``[min_val_, max_val_]`` it is quantized over.

An observer only looks: ``observer(x)`` records ``x`` and returns it unchanged (PyTorch's observers work the
same way). The scale and zero point are never computed here: ``scale_`` and ``zero_point_`` are
``qparams(min_val_, max_val_, spec)`` from :mod:`nanoopt.spec`, the one place that formula lives.

Manners are scikit-learn's: hyper-parameters in ``__init__``, ``fit(x)`` forgets and learns, ``partial_fit(x)``
adds one more batch, both return ``self``; what was learned ends in ``_``. Reading a learned attribute before any
data raises :class:`NotFittedError` (an ``AttributeError``, so ``hasattr`` is False). NaN or Inf in the data, an
empty batch or a batch whose channel count changed raise ``ValueError``.

Range choices
-------------
* :class:`MinMaxObserver` -- ``min_val = min x``, ``max_val = max x`` over everything seen (per tensor, or per
  slice along ``spec.axis`` when ``spec.per_channel``).
* :class:`MovingAverageMinMaxObserver` -- ``min_val <- (1 - c) min_val + c min(batch)`` (same for max), with
  ``c = averaging_constant`` (0.01, PyTorch's default); the first batch sets the values.
* :class:`PerChannelMinMaxObserver`, :class:`MovingAveragePerChannelMinMaxObserver` -- the same, one range per
  output channel (default spec: symmetric int8 narrow range on axis 0, the weight default).
* :class:`PerChannelMSEObserver` -- for weights: per channel, the clipping ratio ``alpha`` in a grid that
  minimises ``||w - Q_alpha(w)||^2`` exactly (the L2 range search used to initialise AdaRound, Nagel et al.
  2020 section 5).
* Histogram observers keep a histogram with fixed-width bins aligned on multiples of the width (so real zero
  is a bin edge); when the data outgrow ``2 bins`` bins, neighbouring bins merge pairwise (exact). From it:

  - :class:`HistogramObserver` -- the range ``[a, b]`` (bin edges) minimising the expected squared error
    ``E(a, b) = step^2 / 12 * N_inside + sum_{c < a} n_c (c - a)^2 + sum_{c > b} n_c (c - b)^2`` with ``c`` the
    bin centres, ``n_c`` their counts and ``step`` the quantization step of ``[a, b]`` (uniform rounding noise
    inside the range plus clipping error outside; e.g. Banner et al. 2019 eq. 2-3); exact zeros are not counted
    in ``N_inside`` (zero is on every grid). Every pair of edges is tried (prefix sums make each O(1)).
  - :class:`PercentileObserver` -- ``[q_(1-p), q_p]`` (two-sided) or ``[-q, q]`` with ``q`` the ``p``-quantile
    of ``|x|`` for symmetric specs; quantiles interpolated linearly inside a bin.
  - :class:`EntropyObserver` -- TensorRT's calibration (Migacz 2017, "8-bit Inference with TensorRT"): on the
    histogram of ``|x|`` (of ``x`` when ``x >= 0``), the threshold ``T`` minimising ``KL(P || Q)`` where ``P`` is
    the histogram up to ``T`` with the tail folded into its last bin and ``Q`` is ``P`` merged into as many
    levels as the quantizer has (spread back over the non-empty bins); both smoothed with ``eps = 1e-4``.
    Exact zeros (half of a ReLU output) are left out: zero lies on every grid, and their spike in the first bin
    would otherwise pull the search towards small thresholds.

>>> import numpy as np
>>> from nanoopt.spec import QuantSpec
>>> observer = MinMaxObserver(QuantSpec(bits=8)).fit(np.array([-1.0, 0.5, 3.0]))
>>> observer.min_val_, observer.max_val_
(-1.0, 3.0)
>>> float(observer.scale_), int(observer.zero_point_)
(0.01568627543747425, -64)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanoopt.spec import QuantSpec, dequantize, qparams, quantize

__all__ = [
    "EntropyObserver",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "NotFittedError",
    "Observer",
    "PercentileObserver",
    "PerChannelMSEObserver",
    "PerChannelMinMaxObserver",
]

DEFAULT_ACTIVATION_SPEC = QuantSpec(bits=8, signed=True, symmetric=False)
DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, signed=True, symmetric=True, per_channel=True, axis=0, narrow_range=True)


class NotFittedError(ValueError, AttributeError):
    """A learned attribute was read before the observer saw any data."""


def _as_array(x: Any, owner: str) -> np.ndarray:
    """The data of ``x`` (ndarray or Tensor) as a float array, refusing what cannot be calibrated on."""
    data = getattr(x, "data", x) if not isinstance(x, np.ndarray) else x
    array = np.asarray(data)
    if array.dtype.kind != "f":
        raise TypeError(f"{owner}: calibration data must be floating point, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{owner}: calibration batch is empty (shape {array.shape})")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{owner}: calibration data contains NaN or Inf")
    return array


def _state_entry(state: dict[str, np.ndarray], name: str, dtype: type, shape: tuple[int, ...] | None,
                 ndim: int | None = None) -> np.ndarray:
    """``state[name]`` after checking its dtype (exactly: nothing is cast on load) and shape (or number of axes)."""
    value = np.asarray(state[name])
    if value.dtype != dtype or (shape is not None and value.shape != shape) or \
            (ndim is not None and value.ndim != ndim):
        want = f"shape {shape}" if shape is not None else f"{ndim} axes"
        raise ValueError(f"observer state {name!r}: expected {np.dtype(dtype)} with {want}, got {value.dtype} "
                         f"{value.shape}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise ValueError(f"observer state {name!r} contains NaN or Inf")
    return value


class Observer:
    """Base class: ``partial_fit`` updates statistics, ``min_val_``/``max_val_`` turn them into a range.

    Subclasses define ``_reset()``, ``_update(array)`` and ``_range() -> (min_val, max_val)``.
    """

    def __init__(self, spec: QuantSpec | None = None) -> None:
        self.spec = DEFAULT_ACTIVATION_SPEC if spec is None else spec
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"{type(self).__name__}: spec must be a QuantSpec, got {type(self.spec).__name__}")
        self._check_spec()
        self.reset()

    # ---------------------------------------------------------------------------- what subclasses define
    def _check_spec(self) -> None:
        """Refuse specs this observer cannot serve (e.g. per-channel for a histogram)."""

    def _reset(self) -> None:
        raise NotImplementedError

    def _update(self, array: np.ndarray) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[Any, Any]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------- the sklearn interface
    def reset(self) -> Observer:
        """Forget everything seen."""
        self.n_batches_seen_ = 0
        self._cached_range: tuple[Any, Any] | None = None
        self._reset()
        return self

    def partial_fit(self, x: Any) -> Observer:
        """Add one batch (ndarray or Tensor) to the statistics; returns ``self``."""
        array = _as_array(x, type(self).__name__)
        self._update(array)
        self.n_batches_seen_ += 1
        self._cached_range = None
        return self

    def fit(self, x: Any) -> Observer:
        """Forget, then learn from ``x``; returns ``self``."""
        return self.reset().partial_fit(x)

    def __call__(self, x: Any) -> Any:
        """Observe ``x`` and return it unchanged."""
        self.partial_fit(x)
        return x

    # ---------------------------------------------------------------------------- checkpoints
    def config(self) -> dict[str, Any]:
        """The observer's class and hyper-parameters (JSON-serialisable; the spec is described separately).

        >>> MovingAverageMinMaxObserver(averaging_constant=0.1).config()
        {'observer': 'MovingAverageMinMaxObserver', 'averaging_constant': 0.1}
        """
        hyper = {key: value for key, value in vars(self).items() if not key.startswith("_")
                 and not key.endswith("_") and key != "spec" and isinstance(value, bool | int | float | str)}
        return {"observer": type(self).__name__, **hyper}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything the observer learned, as named arrays (the same names whether it saw data or not), so that a
        checkpoint restores it exactly with :meth:`load_state_arrays`.

        >>> observer = MinMaxObserver().fit(np.array([-1.0, 2.0]))
        >>> restored = MinMaxObserver().load_state_arrays(observer.state_arrays())
        >>> restored.min_val_, restored.max_val_
        (-1.0, 2.0)
        """
        return {"n_batches_seen": np.array(self.n_batches_seen_, np.int64), **self._state()}

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> Observer:
        """Restore :meth:`state_arrays` (checked first: ``ValueError`` naming the entry); returns ``self``."""
        seen, install = self._validated(state)
        self.n_batches_seen_ = seen
        self._cached_range = None
        install()
        return self

    def check_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        """Raise ``ValueError`` (naming the entry) if :meth:`load_state_arrays` would refuse ``state``."""
        self._validated(state)

    def _validated(self, state: dict[str, np.ndarray]) -> tuple[int, Any]:
        expected = set(self.state_arrays())
        if set(state) != expected:
            raise ValueError(f"{type(self).__name__} state needs entries {sorted(expected)}, got {sorted(state)}")
        seen = int(_state_entry(state, "n_batches_seen", np.int64, ()))
        if seen < 0:
            raise ValueError(f"{type(self).__name__}: n_batches_seen must be >= 0, got {seen}")
        return seen, self._check_state(state, seen > 0)

    def _state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} does not define its checkpoint state")

    def _check_state(self, state: dict[str, np.ndarray], fitted: bool) -> Any:
        """Validate ``state`` and return a function that installs it."""
        raise NotImplementedError(f"{type(self).__name__} does not define its checkpoint state")

    # ---------------------------------------------------------------------------- learned attributes
    def _learned_range(self) -> tuple[Any, Any]:
        if self.n_batches_seen_ == 0:
            raise NotFittedError(f"{type(self).__name__} has seen no data; call fit/partial_fit with calibration "
                                 "batches first")
        if self._cached_range is None:
            self._cached_range = self._range()
        return self._cached_range

    @property
    def min_val_(self) -> Any:
        """Lower end of the chosen range (float, or float64 array per channel)."""
        return self._learned_range()[0]

    @property
    def max_val_(self) -> Any:
        """Upper end of the chosen range."""
        return self._learned_range()[1]

    @property
    def scale_(self) -> np.ndarray:
        """``qparams(min_val_, max_val_, spec)[0]`` (float32)."""
        return qparams(self.min_val_, self.max_val_, self.spec)[0]

    @property
    def zero_point_(self) -> np.ndarray:
        """``qparams(min_val_, max_val_, spec)[1]`` (int32)."""
        return qparams(self.min_val_, self.max_val_, self.spec)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec})"


# ------------------------------------------------------------------------------------------------ min / max
class MinMaxObserver(Observer):
    """Running minimum and maximum; per channel along ``spec.axis`` when ``spec.per_channel``.

    >>> from nanoopt.spec import QuantSpec
    >>> spec = QuantSpec(symmetric=True, per_channel=True, axis=0, narrow_range=True)
    >>> MinMaxObserver(spec).fit(np.array([[1.0, -2.0], [0.5, 0.25]])).max_val_.tolist()
    [1.0, 0.5]
    """

    def _reset(self) -> None:
        self._min: Any = None
        self._max: Any = None

    def _batch_extremes(self, array: np.ndarray) -> tuple[Any, Any]:
        if not self.spec.per_channel:
            return float(array.min()), float(array.max())
        axis = self.spec.axis if self.spec.axis >= 0 else self.spec.axis + array.ndim
        if not 0 <= axis < array.ndim:
            raise ValueError(f"{type(self).__name__}: channel axis {self.spec.axis} is out of range for data of "
                             f"shape {array.shape}")
        channels = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
        if self._min is not None and len(self._min) != channels.shape[0]:
            raise ValueError(f"{type(self).__name__}: saw {len(self._min)} channels before, now {channels.shape[0]} "
                             f"(shape {array.shape}, axis {self.spec.axis})")
        return channels.min(axis=1).astype(np.float64), channels.max(axis=1).astype(np.float64)

    def _update(self, array: np.ndarray) -> None:
        low, high = self._batch_extremes(array)
        if self._min is None:
            self._min, self._max = low, high
        else:
            self._min, self._max = np.minimum(self._min, low), np.maximum(self._max, high)
            if not self.spec.per_channel:
                self._min, self._max = float(self._min), float(self._max)

    def _range(self) -> tuple[Any, Any]:
        return self._min, self._max

    def _state(self) -> dict[str, np.ndarray]:
        # not seen any data: empty arrays; per tensor: 0-d; per channel: (C,)
        empty = np.zeros(0, np.float64)
        return {"min": empty if self._min is None else np.asarray(self._min, np.float64),
                "max": empty if self._max is None else np.asarray(self._max, np.float64)}

    def _check_state(self, state: dict[str, np.ndarray], fitted: bool) -> Any:
        if not fitted:
            _state_entry(state, "min", np.float64, (0,))
            _state_entry(state, "max", np.float64, (0,))
            return lambda: self._reset()
        low = _state_entry(state, "min", np.float64, None, ndim=1 if self.spec.per_channel else 0)
        high = _state_entry(state, "max", np.float64, low.shape)
        if np.any(low > high):
            raise ValueError(f"observer state: min {low} exceeds max {high}")

        def install() -> None:
            if self.spec.per_channel:
                self._min, self._max = low.copy(), high.copy()
            else:
                self._min, self._max = float(low), float(high)
        return install


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving averages of the per-batch minimum and maximum (Jacob et al. 2018, section 3.1).

    >>> observer = MovingAverageMinMaxObserver(averaging_constant=0.5)
    >>> observer.partial_fit(np.array([0.0, 2.0])).partial_fit(np.array([0.0, 4.0])).max_val_
    3.0
    """

    def __init__(self, spec: QuantSpec | None = None, averaging_constant: float = 0.01) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(spec)

    def _update(self, array: np.ndarray) -> None:
        low, high = self._batch_extremes(array)
        if self._min is None:
            self._min, self._max = low, high
            return
        c = self.averaging_constant
        self._min = (1.0 - c) * self._min + c * low
        self._max = (1.0 - c) * self._max + c * high


class _PerChannel:
    """Mixin: the spec must be per channel (default: the int8 weight spec)."""

    default_spec = DEFAULT_WEIGHT_SPEC

    def _check_spec(self) -> None:
        if not self.spec.per_channel:
            raise ValueError(f"{type(self).__name__} needs a per-channel spec (per_channel=True), got {self.spec}")


class PerChannelMinMaxObserver(_PerChannel, MinMaxObserver):
    """:class:`MinMaxObserver` with one range per channel (``spec.axis``; default: symmetric int8 weights).

    >>> PerChannelMinMaxObserver().fit(np.array([[1.0, -2.0], [0.5, 0.25]])).scale_
    array([0.01574803, 0.00393701], dtype=float32)
    """

    def __init__(self, spec: QuantSpec | None = None) -> None:
        super().__init__(self.default_spec if spec is None else spec)


class MovingAveragePerChannelMinMaxObserver(_PerChannel, MovingAverageMinMaxObserver):
    """:class:`MovingAverageMinMaxObserver` with one range per channel.

    >>> observer = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5)
    >>> observer.partial_fit(np.array([[2.0], [1.0]])).partial_fit(np.array([[4.0], [1.0]])).max_val_
    array([3., 1.])
    """

    def __init__(self, spec: QuantSpec | None = None, averaging_constant: float = 0.01) -> None:
        super().__init__(self.default_spec if spec is None else spec, averaging_constant)


class PerChannelMSEObserver(_PerChannel, Observer):
    """Per channel, the range ``alpha * [min, max]`` minimising ``||w - dequantize(quantize(w))||^2`` exactly.

    ``alpha`` runs over ``num_candidates`` values evenly spaced in ``[min_ratio, 1]``. Meant for weights: every
    value seen is kept (``partial_fit`` concatenates along the non-channel axes).

    >>> from nanoopt.spec import QuantSpec
    >>> spec = QuantSpec(bits=4, symmetric=True, per_channel=True, narrow_range=True)
    >>> w = np.random.default_rng(0).normal(size=(2, 256))
    >>> observer = PerChannelMSEObserver(spec).fit(w)
    >>> (observer.max_val_ < w.max(axis=1)).tolist()   # at 4 bits, clipping the tails pays
    [True, True]
    """

    def __init__(self, spec: QuantSpec | None = None, num_candidates: int = 100, min_ratio: float = 0.2) -> None:
        if num_candidates < 1 or not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"need num_candidates >= 1 and min_ratio in (0, 1], got {num_candidates}, {min_ratio}")
        self.num_candidates, self.min_ratio = num_candidates, min_ratio
        super().__init__(self.default_spec if spec is None else spec)

    def _reset(self) -> None:
        self._rows: np.ndarray | None = None  # (C, values) float32

    def _update(self, array: np.ndarray) -> None:
        axis = self.spec.axis if self.spec.axis >= 0 else self.spec.axis + array.ndim
        if not 0 <= axis < array.ndim:
            raise ValueError(f"{type(self).__name__}: channel axis {self.spec.axis} is out of range for data of "
                             f"shape {array.shape}")
        rows = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float32)
        if self._rows is not None and rows.shape[0] != self._rows.shape[0]:
            raise ValueError(f"{type(self).__name__}: saw {self._rows.shape[0]} channels before, now {rows.shape[0]}")
        self._rows = rows if self._rows is None else np.concatenate([self._rows, rows], axis=1)

    def _state(self) -> dict[str, np.ndarray]:
        return {"rows": np.zeros((0, 0), np.float32) if self._rows is None else self._rows}

    def _check_state(self, state: dict[str, np.ndarray], fitted: bool) -> Any:
        rows = _state_entry(state, "rows", np.float32, None, ndim=2)
        if fitted == (rows.size == 0):
            raise ValueError(f"observer state 'rows' has shape {rows.shape}, which does not fit n_batches_seen")
        return lambda: setattr(self, "_rows", rows.copy() if fitted else None)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows
        low, high = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        row_spec = QuantSpec(self.spec.bits, self.spec.signed, self.spec.symmetric, True, 0, self.spec.narrow_range)
        best_error = np.full(rows.shape[0], np.inf)
        best_low, best_high = low.copy(), high.copy()
        for alpha in np.linspace(1.0, self.min_ratio, self.num_candidates):
            scale, zero_point = qparams(alpha * low, alpha * high, row_spec)
            restored = dequantize(quantize(rows, scale, zero_point, row_spec), scale, zero_point, row_spec)
            error = ((rows.astype(np.float64) - restored) ** 2).sum(axis=1)
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_low = np.where(better, alpha * low, best_low)
            best_high = np.where(better, alpha * high, best_high)
        return best_low, best_high


# ------------------------------------------------------------------------------------------------ histograms
class _AlignedHistogram(Observer):
    """Histogram with bins ``[k w, (k + 1) w)`` for integer ``k`` (real zero is always an edge).

    The first batch sets ``w = span / bins``; when later data need more than ``2 bins`` bins, the width doubles
    as often as needed and old counts merge exactly (bin ``k`` goes to ``floor(k / 2^d)``).
    """

    def __init__(self, spec: QuantSpec | None = None, bins: int = 2048) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 8:
            raise ValueError(f"bins must be an int >= 8, got {bins!r}")
        self.bins = bins
        super().__init__(spec)

    def _check_spec(self) -> None:
        if self.spec.per_channel:
            raise ValueError(f"{type(self).__name__} observes whole tensors; got a per-channel spec {self.spec}")

    def _reset(self) -> None:
        self._width = 0.0
        self._first = 0  # index k of counts[0]
        self._counts = np.zeros(0, dtype=np.int64)
        self._min = math.inf
        self._max = -math.inf
        self._zeros = 0  # exact zeros seen (e.g. after a ReLU): represented exactly by every range

    def _update(self, array: np.ndarray) -> None:
        values = array.astype(np.float64).ravel()
        self._zeros += int(np.count_nonzero(values == 0.0))
        low, high = float(values.min()), float(values.max())
        self._min, self._max = min(self._min, low), max(self._max, high)
        if self._width == 0.0:
            span = max(self._max, 0.0) - min(self._min, 0.0)
            self._width = span / self.bins if span > 0 else 1e-8
        first = math.floor(min(low, 0.0) / self._width)
        last = math.floor(max(high, 0.0) / self._width)
        if self._counts.size:
            first, last = min(first, self._first), max(last, self._first + self._counts.size - 1)
        factor = 1
        while last // factor - first // factor + 1 > 2 * self.bins:
            factor *= 2
        if factor > 1:
            self._merge(factor)
            first, last = first // factor, last // factor
        counts = np.zeros(last - first + 1, dtype=np.int64)
        if self._counts.size:
            counts[self._first - first: self._first - first + self._counts.size] = self._counts
        index = np.floor(values / self._width).astype(np.int64) - first
        np.clip(index, 0, counts.size - 1, out=index)  # rounding at the top edge stays in the last bin
        counts += np.bincount(index, minlength=counts.size)
        self._counts, self._first = counts, first

    def _state(self) -> dict[str, np.ndarray]:
        fitted = self._counts.size > 0  # min/max are +-inf before any data: stored as 0
        return {"width": np.array(self._width, np.float64), "first": np.array(self._first, np.int64),
                "counts": self._counts.copy(), "zeros": np.array(self._zeros, np.int64),
                "min": np.array(self._min if fitted else 0.0, np.float64),
                "max": np.array(self._max if fitted else 0.0, np.float64)}

    def _check_state(self, state: dict[str, np.ndarray], fitted: bool) -> Any:
        width = float(_state_entry(state, "width", np.float64, ()))
        first = int(_state_entry(state, "first", np.int64, ()))
        counts = _state_entry(state, "counts", np.int64, None, ndim=1).copy()
        zeros = int(_state_entry(state, "zeros", np.int64, ()))
        low = float(_state_entry(state, "min", np.float64, ()))
        high = float(_state_entry(state, "max", np.float64, ()))
        if fitted and (width <= 0 or counts.size == 0 or counts.size > 2 * self.bins or counts.min() < 0
                       or zeros < 0 or low > high):
            raise ValueError(f"observer state: an inconsistent histogram (width {width}, {counts.size} bins for "
                             f"bins={self.bins}, range [{low}, {high}])")
        if not fitted and counts.size:
            raise ValueError("observer state: counts recorded but n_batches_seen is 0")

        def install() -> None:
            if not fitted:
                self._reset()
                return
            self._width, self._first, self._counts, self._zeros = width, first, counts, zeros
            self._min, self._max = low, high
        return install

    def _merge(self, factor: int) -> None:
        if self._counts.size:
            index = np.arange(self._first, self._first + self._counts.size) // factor
            merged_first = int(index[0])
            self._counts = np.bincount(index - merged_first, weights=self._counts).astype(np.int64)
            self._first = merged_first
        self._width *= factor

    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centres and counts (float64)."""
        k = np.arange(self._first, self._first + self._counts.size)
        return (k + 0.5) * self._width, self._counts.astype(np.float64)

    def _folded(self) -> np.ndarray:
        """Counts of ``|x|`` on bins ``[j w, (j + 1) w)``, ``j >= 0``."""
        k = np.arange(self._first, self._first + self._counts.size)
        folded_index = np.where(k >= 0, k, -k - 1)
        return np.bincount(folded_index, weights=self._counts.astype(np.float64))

    def _levels(self) -> int:
        return self.spec.qmax - self.spec.qmin

    def _clip_to_data(self, low: float, high: float) -> tuple[float, float]:
        return max(low, min(self._min, 0.0)), min(high, max(self._max, 0.0))


class HistogramObserver(_AlignedHistogram):
    """Range minimising the expected squared quantization error over the histogram (the L2 / MSE search).

    >>> data = np.random.default_rng(0).laplace(size=100000)      # heavy tails
    >>> observer = HistogramObserver().fit(data)
    >>> bool(observer.max_val_ < data.max()), bool(observer.min_val_ > data.min())
    (True, True)
    """

    def _range(self) -> tuple[float, float]:
        return self._clip_to_data(*self._best_edges())

    def _prefix_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums of ``n_c``, ``n_c c`` and ``n_c c^2`` over the bins (with a leading 0)."""
        centres, counts = self._edges()
        return tuple(np.concatenate([[0.0], np.cumsum(counts * centres**power)]) for power in range(3))

    def _best_edges(self) -> tuple[float, float]:
        """The pair of bin edges ``a <= 0 <= b`` (``a = -b`` when symmetric) with the smallest ``E(a, b)``."""
        prefix = self._prefix_sums()
        width, k_first, k_last = self._width, self._first, self._first + self._counts.size  # edges k_first..k_last
        lows = np.arange(min(k_first, 0), 1) * width  # candidate a: edges <= 0
        highs = np.arange(0, max(k_last, 0) + 1) * width  # candidate b: edges >= 0
        if self.spec.symmetric:
            thresholds = np.arange(0, max(-lows[0], highs[-1]) / width + 0.5) * width
            error = self._error(-thresholds, thresholds, prefix)
            best = float(thresholds[int(np.argmin(error))])
            return -best, best
        best_error, best_pair = np.inf, (0.0, 0.0)
        for start in range(0, lows.size, 256):
            a = lows[start:start + 256, None]  # (A, 1)
            error = self._error(a, highs[None, :], prefix)  # (A, B)
            index = np.unravel_index(int(np.argmin(error)), error.shape)
            if error[index] < best_error:
                best_error, best_pair = float(error[index]), (float(a[index[0], 0]), float(highs[index[1]]))
        return best_pair

    def _error(self, a, b, prefix) -> np.ndarray:
        """``E(a, b)`` for edge arrays ``a <= 0 <= b`` (broadcast), from :meth:`_prefix_sums`."""
        prefix0, prefix1, prefix2 = prefix
        totals = prefix0[-1], prefix1[-1], prefix2[-1]
        width, first = self._width, self._first
        size = prefix0.size - 1
        below = np.clip(np.rint(a / width).astype(np.int64) - first, 0, size)  # bins entirely below a
        above = np.clip(np.rint(b / width).astype(np.int64) - first, 0, size)  # bins from index `above` are > b
        n_low, s1_low, s2_low = prefix0[below], prefix1[below], prefix2[below]
        n_high = totals[0] - prefix0[above]
        s1_high, s2_high = totals[1] - prefix1[above], totals[2] - prefix2[above]
        clipped_low = s2_low - 2 * a * s1_low + a**2 * n_low
        clipped_high = s2_high - 2 * b * s1_high + b**2 * n_high
        if self.spec.symmetric:
            step = 2 * np.maximum(-a, b) / self._levels()
        else:
            step = (b - a) / self._levels()
        inside = totals[0] - n_low - n_high - self._zeros  # exact zeros are on every grid: no rounding noise
        return step**2 / 12.0 * inside + clipped_low + clipped_high


class PercentileObserver(_AlignedHistogram):
    """Range between the ``(100 - p)``-th and ``p``-th percentiles (of ``|x|`` for symmetric specs).

    >>> data = np.arange(1001, dtype=np.float64)   # 0 .. 1000
    >>> round(PercentileObserver(percentile=99.0).fit(data).max_val_)
    990
    """

    def __init__(self, spec: QuantSpec | None = None, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(spec, bins)

    @staticmethod
    def _quantile(counts: np.ndarray, edge0: float, width: float, fraction: float) -> float:
        cumulative = np.cumsum(counts)
        target = fraction * cumulative[-1]
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, counts.size - 1)
        before = cumulative[index - 1] if index else 0.0
        inside = (target - before) / counts[index] if counts[index] else 0.0
        return edge0 + (index + float(np.clip(inside, 0.0, 1.0))) * width

    def _range(self) -> tuple[float, float]:
        fraction = self.percentile / 100.0
        if self.spec.symmetric:
            threshold = self._quantile(self._folded(), 0.0, self._width, fraction)
            return self._clip_to_data(-threshold, threshold)
        counts = self._counts.astype(np.float64)
        edge0 = self._first * self._width
        low = self._quantile(counts, edge0, self._width, 1.0 - fraction)
        high = self._quantile(counts, edge0, self._width, fraction)
        low = max(low, self._min) if low < 0 else 0.0
        high = min(high, self._max) if high > 0 else 0.0
        return self._clip_to_data(low, high)


class EntropyObserver(_AlignedHistogram):
    """TensorRT's KL-divergence calibration: the threshold whose quantized histogram loses least information.

    >>> rng = np.random.default_rng(0)
    >>> data = np.abs(rng.laplace(size=20000))
    >>> observer = EntropyObserver().fit(data)
    >>> bool(0.0 < observer.max_val_ < data.max()), observer.min_val_
    (True, 0.0)
    """

    EPSILON = 1e-4

    def _range(self) -> tuple[float, float]:
        signed_data = self._min < 0.0 < self._max
        folded = self._folded()
        folded[0] -= self._zeros  # exact zeros cost nothing at any threshold: leave them out of P and Q
        levels = self._levels() + 1
        if signed_data or self.spec.symmetric:
            levels //= 2
        if folded.size <= levels:
            threshold = folded.size * self._width
        else:
            divergences = [self._divergence(folded, stop, levels) for stop in range(levels, folded.size + 1)]
            threshold = (levels + int(np.argmin(divergences))) * self._width
        if signed_data or self.spec.symmetric:
            return self._clip_to_data(-threshold, threshold)
        low = -threshold if self._max <= 0.0 else 0.0
        high = threshold if self._max > 0.0 else 0.0
        return self._clip_to_data(low, high)

    @classmethod
    def _smooth(cls, distribution: np.ndarray) -> np.ndarray:
        """Give empty bins ``eps`` mass, taken proportionally from the others (MXNet's ``_smooth_distribution``)."""
        zero = distribution == 0
        zeros, nonzeros = int(zero.sum()), int((~zero).sum())
        if nonzeros == 0:
            return distribution
        taken = cls.EPSILON * zeros / nonzeros
        return distribution + np.where(zero, cls.EPSILON, -taken)

    @classmethod
    def _divergence(cls, folded: np.ndarray, stop: int, levels: int) -> float:
        reference = folded[:stop].copy()
        reference[-1] += folded[stop:].sum()  # outliers clipped into the last bin
        source = folded[:stop]
        sizes = np.full(levels, stop // levels)
        sizes[: stop % levels] += 1  # np.array_split's chunks: the first ones one longer
        group = np.repeat(np.arange(levels), sizes)
        nonzero = source > 0
        sums = np.bincount(group, weights=source, minlength=levels)
        occupied = np.bincount(group, weights=nonzero, minlength=levels)
        candidate = np.where(nonzero, sums[group] / np.maximum(occupied[group], 1), 0.0)
        total = candidate.sum()
        if total == 0:
            return math.inf
        candidate = cls._smooth(candidate / total)
        reference = cls._smooth(reference / reference.sum())
        if np.any(candidate <= 0) or np.any(reference < 0):
            return math.inf
        mask = reference > 0
        return float(np.sum(reference[mask] * np.log(reference[mask] / candidate[mask])))
