"""Input checks of the quantization flows: each bad input is refused with the argument, what was expected and what
came.

Quantization turns ranges into scales; a NaN or an Inf anywhere in calibration data or weights turns a scale into
NaN or Inf, and an integer model fed NaN/Inf or integers would silently compute on saturated or reinterpreted
codes. These functions are called where the data enters (:func:`~nanoopt.quant.ptq.prepare`,
:func:`~nanoopt.quant.ptq.calibrate`, :func:`~nanoopt.quant.ptq.convert`, ``prepare_qat``, ``quantize_dynamic``,
``quantize_weights`` and the integer model's input), so the message names the batch, the layer or the parameter:

>>> import numpy as np
>>> check_finite_array(np.array([[1.0, np.inf]]), "calibration batch 0")
Traceback (most recent call last):
...
ValueError: calibration batch 0 (shape (1, 2), float64) contains 1 Inf (first at index (0, 1)); expected finite numbers
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanoopt.nn import Module

__all__ = ["check_calibration_batch", "check_finite_array", "check_finite_parameters", "check_float_input"]


def _non_finite(array: np.ndarray) -> str | None:
    """``"2 NaN and 1 Inf (first at index (0, 3))"`` for an array with non-finite entries, else None."""
    finite = np.isfinite(array)
    if finite.all():
        return None
    nan = int(np.isnan(array).sum())
    inf = int(array.size - finite.sum()) - nan
    counts = " and ".join(f"{count} {label}" for count, label in ((nan, "NaN"), (inf, "Inf")) if count)
    first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite.reshape(-1))), array.shape))
    return f"{counts} (first at index {first})"


def check_finite_array(array: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if a floating-point ``array`` holds NaN or Inf.

    >>> check_finite_array(np.ones(3, np.float32), "x")
    """
    if array.dtype.kind in "fc":
        problem = _non_finite(array)
        if problem is not None:
            raise ValueError(f"{what} (shape {array.shape}, {array.dtype}) contains {problem}; expected finite "
                             f"numbers")


def check_float_input(data: np.ndarray, what: str) -> None:
    """``data`` must be a floating-point array (float16/32/64) of finite numbers; it may have no rows.

    Integers would be taken as real values on the wrong scale (an image of 0..255 for a model of [0, 1] inputs),
    booleans and complex numbers have no place on a quantization grid.

    >>> check_float_input(np.zeros((2, 3), np.int8), "x")
    Traceback (most recent call last):
    ...
    TypeError: x must be a floating-point array (float16, float32 or float64), got dtype int8 with shape (2, 3)
    """
    if data.dtype.kind != "f":
        raise TypeError(f"{what} must be a floating-point array (float16, float32 or float64), got dtype "
                        f"{data.dtype} with shape {data.shape}")
    check_finite_array(data, what)


def check_calibration_batch(batch: Any, index: int, where: str) -> np.ndarray:
    """One calibration batch: a floating-point array with at least one example and finite values. Returns it.

    >>> check_calibration_batch(np.zeros((0, 4), np.float32), 2, "calibrate")
    Traceback (most recent call last):
    ...
    ValueError: calibrate: calibration batch 2 is empty (shape (0, 4)); expected at least one example
    """
    batch = np.asarray(batch)
    if batch.ndim == 0 or batch.shape[0] == 0:
        raise ValueError(f"{where}: calibration batch {index} is empty (shape {batch.shape}); expected at least one "
                         f"example")
    check_float_input(batch, f"{where}: calibration batch {index}")
    return batch


def check_finite_parameters(model: Module, where: str) -> None:
    """Every floating-point parameter and buffer of ``model`` is finite; else ``ValueError`` naming the first bad one.

    >>> from nanoopt import nn
    >>> layer = nn.Sequential(nn.Linear(2, 2)); layer[0].weight.data[1, 0] = np.nan
    >>> check_finite_parameters(layer, "quant.prepare")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: quant.prepare: parameter '0.weight' of layer '0' (Linear) (shape (2, 2), ...) contains 1 NaN (first ...
    """
    modules = dict(model.named_modules())
    named = [(name, "parameter", p.data) for name, p in model.named_parameters()]
    named += [(name, "buffer", np.asarray(b)) for name, b in model.named_buffers() if b is not None]
    for name, kind, value in named:
        layer = name.rpartition(".")[0]
        label = f"layer '{layer}' ({type(modules[layer]).__name__})" if layer in modules and layer else "the model"
        check_finite_array(value, f"{where}: {kind} '{name}' of {label}")
