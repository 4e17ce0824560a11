"""Degenerate calibration ranges: say so before a quantized model turns out constant.

Calibration picks each activation grid from the data it sees. Some data make the grid useless, and the integer
model then returns (nearly) the same output for every input: all-zero calibration images, a layer whose ReLU
sees only negative values, or one huge value (1e30) among normal data. :class:`RangeMonitor` watches the
activation quantizers of a prepared model while it calibrates, and :meth:`RangeMonitor.warn` then issues one
``UserWarning`` naming each affected quantizer (``"layer '1' output"``, ``"the model input"``) and its observed
range ``[lo, hi]``, for three conditions:

* **zero range**: every calibration value was the same (``lo == hi``); every input then lands on one code;
* **the same output for every example**: every calibration example gave this tensor the same values (a layer
  fed only zeros outputs its bias);
* **one value dominates**: ``max(|lo|, |hi|) >= DOMINANCE * median``, with ``median`` the median of the nonzero
  ``|x|`` (from a strided sample of each batch): outliers stretch the range by orders of magnitude. On an 8-bit
  min/max grid, ``scale = (hi - lo) / 255``, half of the data then lie within a quarter of one step of zero
  (``DOMINANCE = 1000 ~ 4 * 255``): they all land on the zero point;
* **collapse to one code**: with the frozen grid, the observed ``lo`` and ``hi`` and every sampled value
  quantize to the same integer: the layer's quantized output is a constant.

The statistics are exact for ``lo`` and ``hi`` and sampled for the percentile (at most :data:`SAMPLE_PER_BATCH`
values of each batch, :data:`MAX_SAMPLE` in all, evenly strided), so watching costs one pass over each tensor.

>>> import numpy as np, warnings
>>> from nanoopt import nn, quant
>>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
>>> prepared = quant.prepare(model, example_input=np.zeros((1, 2), np.float32))
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     _ = quant.calibrate(prepared, np.zeros((8, 2), np.float32), progress=False)
>>> print(str(caught[0].message).splitlines()[1])
  the model input: zero range, every calibration value was 0 (range [0, 0])
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from nanoopt.quant.fake_quant import FakeQuantize
from nanoopt.spec import quantize

__all__ = ["DOMINANCE", "MAX_SAMPLE", "SAMPLE_PER_BATCH", "RangeMonitor"]

DOMINANCE = 1000.0  # extreme / median of the nonzero |x| at which outliers "dominate" the range (~ 4 * 255)
SAMPLE_PER_BATCH = 4096  # values sampled (evenly strided) from each batch a quantizer sees
MAX_SAMPLE = 65536  # values kept per quantizer in all
MAX_LISTED = 8  # quantizers listed in one warning (the rest are counted)


class _Statistics:
    """Exact extremes and a strided sample of everything one quantizer saw."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.samples: list[np.ndarray] = []
        self.kept = 0
        self.examples = 0
        self.first: np.ndarray | None = None  # the first example's values
        self.varies = False  # some example differs from the first

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        flat = x.reshape(-1)
        if flat.size == 0 or x.ndim == 0 or not np.isfinite(flat).all():
            return  # the observers refuse non-finite data themselves
        self.low = min(self.low, float(flat.min()) + 0.0)  # + 0.0: no "-0" in messages
        self.high = max(self.high, float(flat.max()) + 0.0)
        rows = x.reshape(x.shape[0], -1)
        if self.first is None:
            self.first = rows[0].copy()
        self.varies = self.varies or self.first.shape != rows.shape[1:] or not bool((rows == self.first).all())
        self.examples += x.shape[0]
        if self.kept < MAX_SAMPLE:
            sample = flat[::max(1, flat.size // SAMPLE_PER_BATCH)][:MAX_SAMPLE - self.kept]
            self.samples.append(sample.astype(np.float64))
            self.kept += sample.size


def _problem(quantizer: FakeQuantize, stats: _Statistics) -> str | None:
    """What is degenerate about this quantizer's range (``None``: nothing)."""
    if stats.low > stats.high:  # saw no data
        return None
    observed = f"range [{stats.low:.6g}, {stats.high:.6g}]"
    if stats.low == stats.high:
        return f"zero range, every calibration value was {stats.low:.6g} ({observed})"
    if stats.examples > 1 and not stats.varies:
        return f"the same output for every calibration example ({stats.examples} examples, {observed})"
    sampled = np.concatenate(stats.samples)
    magnitudes = np.abs(sampled[sampled != 0])
    extreme = max(abs(stats.low), abs(stats.high))
    bulk = float(np.median(magnitudes)) if magnitudes.size else 0.0
    if bulk > 0 and extreme >= DOMINANCE * bulk:
        return (f"one value dominates the {observed}: half of the nonzero values have |x| <= {bulk:.3g}, "
                f"{extreme / bulk:.1e} times smaller")
    sample = np.concatenate([sampled, [stats.low, stats.high]])
    try:
        params = quantizer.qparams()
    except ValueError:
        return None
    if np.ndim(params.scale) != 0:
        return None
    codes = quantize(sample, params.scale, params.zero_point, quantizer.spec)
    if codes.min() == codes.max():
        return (f"the output collapses to one code ({int(codes.min())}): {observed}, "
                f"grid step {float(params.scale):.3g}")
    return None


class RangeMonitor:
    """Forward hooks on the activation quantizers of a prepared model that record what each sees (module
    docstring); a context manager that removes them on exit."""

    def __init__(self, quantizers: list[FakeQuantize]) -> None:
        self.statistics: dict[int, tuple[FakeQuantize, _Statistics]] = {}
        self.handles = []
        for quantizer in quantizers:
            if id(quantizer) in self.statistics:
                continue
            stats = _Statistics()
            self.statistics[id(quantizer)] = (quantizer, stats)
            self.handles.append(quantizer.register_forward_hook(self._recorder(stats)))

    @staticmethod
    def _recorder(stats: _Statistics):
        def record(module: Any, inputs: tuple, output: Any) -> None:
            if module.observer_enabled:
                stats.update(getattr(inputs[0], "data", inputs[0]))
        return record

    def __enter__(self) -> RangeMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def problems(self) -> list[str]:
        """``"<owner>: <what>"`` for every quantizer whose calibration range is degenerate."""
        found = []
        for quantizer, stats in self.statistics.values():
            problem = _problem(quantizer, stats)
            if problem is not None:
                found.append(f"{quantizer.owner or type(quantizer).__name__}: {problem}")
        return found

    def warn(self, where: str = "quant.calibrate", stacklevel: int = 3) -> list[str]:
        """One ``UserWarning`` listing :meth:`problems` (none if there are none); returns them."""
        found = self.problems()
        if found:
            listed = found[:MAX_LISTED] + ([f"... and {len(found) - MAX_LISTED} more"] if len(found) > MAX_LISTED
                                           else [])
            warnings.warn(f"{where}: degenerate calibration ranges; the quantized model may give (nearly) the same "
                          "output for every input. Check the calibration data (all zero? a layer that only sees "
                          "negative values before its ReLU? an outlier?):\n  " + "\n  ".join(listed),
                          UserWarning, stacklevel=stacklevel)
        return found
