"""Round-to-nearest (RTN) weight-only quantization with group-wise scales: the grid GPTQ and AWQ round onto.

A weight matrix ``W (C, K)`` (C outputs, K inputs) is cut into groups of ``g`` consecutive inputs per output row
(``g = K``, one group per row, when ``group_size`` is None); each group gets its own grid from
:func:`nanoopt.spec.qparams` (the one scale formula of nanoopt) on the group's range ``[min w, max w]``:

* symmetric: nanoopt's narrow-range weight grid ``codes in [-(2^(b-1) - 1), 2^(b-1) - 1]``, ``w^ = s code``
  with ``s = max|w| / (2^(b-1) - 1)`` (3 levels at 2 bits, 7 at 3 bits: the same grid as
  :func:`~nanoopt.quant.quantize_weights`);
* asymmetric: all ``2^b`` codes ``[-2^(b-1), 2^(b-1) - 1]`` with a zero point, ``w^ = s (code - z)``,
  ``s = (max(w, 0) - min(w, 0)) / (2^b - 1)`` (the min-max grid of GPTQ's and AWQ's reference code).

Rounding is half to even; codes saturate. The result is stored by
:class:`~nanoopt.quant.dynamic.WeightOnlyLinear` (codes packed two per byte up to 4 bits, a float32 scale and,
asymmetric, an int8 zero point per group), which computes from the codes
(a few rows: the low-bit kernel :mod:`nanoopt.kernels.lowbit`; many: the dequantized weight and BLAS).

>>> import numpy as np
>>> w = np.array([[-1.0, 0.6, 0.2, 2.0]], np.float32)        # 2 bits asymmetric: s = 3 / 3, z = -1
>>> scale, zero_point = group_qparams(w, bits=2, group_size=None, symmetric=False)
>>> codes = quantize_groups(w, scale, zero_point, bits=2, symmetric=False)
>>> codes.tolist(), dequantize_groups(codes, scale, zero_point, 2, False).tolist()
([[-2, 0, -1, 1]], [[-1.0, 1.0, 0.0, 2.0]])
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence

import numpy as np

from nanoopt import nn
from nanoopt.layerwise import select_linears
from nanoopt.quant.config import weight_spec
from nanoopt.quant.dynamic import WeightOnlyLinear
from nanoopt.spec import QuantSpec, dequantize, qparams, quantize

__all__ = [
    "check_grid", "dequantize_groups", "group_qparams", "grid_spec", "quantize_groups", "rtn", "rtn_linear",
]


def grid_spec(bits: int, symmetric: bool) -> QuantSpec:
    """The per-channel spec of the grid (see the module docstring); channels along axis 0 (one per group row).

    >>> grid_spec(4, True).qmin, grid_spec(4, False).qmin
    (-7, -8)
    """
    if symmetric:
        return weight_spec(bits)
    return QuantSpec(bits=bits, signed=True, symmetric=False, per_channel=True, axis=0)


def check_grid(bits: int, group_size: int | None, symmetric: bool, what: str) -> None:
    """Refuse a bit width outside 2..8, a group size that is not a positive int, a non-bool ``symmetric``."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"{what}: bits must be an int in [2, 8] (weight-only codes), got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral)
                                   or group_size < 1):
        raise ValueError(f"{what}: group_size must be a positive int or None (one group per row), got "
                         f"{group_size!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"{what}: symmetric must be a bool, got {symmetric!r}")


def check_layer_groups(name: str, layer: nn.Linear, group_size: int | None, what: str) -> None:
    """Refuse a group size that does not divide the layer's ``in_features`` (naming the layer and its divisors)."""
    k = layer.in_features
    if group_size is not None and k % group_size:
        divisors = [d for d in range(1, k + 1) if k % d == 0]
        raise ValueError(f"{what}: group_size={group_size} does not divide in_features={k} of layer {name!r}; "
                         f"use a divisor of {k} ({divisors[-6:]} ...), group_size=None for one scale per row, "
                         "or leave the layer out with ignore=")


def group_qparams(weight: np.ndarray, bits: int, group_size: int | None, symmetric: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int32) of every group: both ``(C, K // group_size)``.

    >>> s, z = group_qparams(np.array([[0.0, 7.0, -7.0, 1.0]]), 4, 2, True)
    >>> s.tolist(), z.tolist()
    ([[1.0, 1.0]], [[0, 0]])
    """
    rows, depth = weight.shape
    size = depth if group_size is None else group_size
    grouped = np.asarray(weight).reshape(rows * (depth // size), size)  # (C * groups, g)
    scale, zero_point = qparams(grouped.min(axis=1), grouped.max(axis=1), grid_spec(bits, symmetric))
    return scale.reshape(rows, -1), zero_point.reshape(rows, -1)


def _expand(values: np.ndarray, depth: int) -> np.ndarray:
    """Per-group values ``(C, G)`` repeated to one per weight ``(C, depth)``."""
    return np.repeat(values, depth // values.shape[1], axis=1)


def quantize_groups(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, symmetric: bool
                    ) -> np.ndarray:
    """The int8 codes ``(C, K)`` of ``weight`` on the group grids (``rint(w / s) + z``, saturated)."""
    depth = weight.shape[1]
    spec = grid_spec(bits, symmetric)
    flat = quantize(np.asarray(weight, dtype=np.float32).reshape(-1), _expand(scale, depth).reshape(-1),
                    _expand(zero_point, depth).reshape(-1), spec)
    return flat.reshape(weight.shape).astype(np.int8)


def dequantize_groups(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, symmetric: bool
                      ) -> np.ndarray:
    """``s (code - z)`` of every weight (float32 ``(C, K)``), exactly as ``WeightOnlyLinear`` computes it."""
    depth = codes.shape[1]
    flat = dequantize(codes.reshape(-1), _expand(scale, depth).reshape(-1), _expand(zero_point, depth).reshape(-1),
                      grid_spec(bits, symmetric))
    return flat.reshape(codes.shape)


def weight_only_linear(layer: nn.Linear, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int,
                       group_size: int | None, symmetric: bool) -> WeightOnlyLinear:
    """A :class:`WeightOnlyLinear` storing the given codes (symmetric grids store no zero point)."""
    return WeightOnlyLinear(layer, bits, group_size, codes=codes, scale=scale,
                            zero_point=None if symmetric else zero_point)


def rtn_linear(layer: nn.Linear, bits: int, group_size: int | None, symmetric: bool) -> WeightOnlyLinear:
    """``layer`` rounded to nearest on its group grids, as a :class:`WeightOnlyLinear`.

    >>> from nanoopt import nn
    >>> rtn_linear(nn.Linear(8, 2), 3, 4, False).weight_scale.shape
    (2, 2)
    """
    weight = layer.weight.data.astype(np.float32)
    scale, zero_point = group_qparams(weight, bits, group_size, symmetric)
    codes = quantize_groups(weight, scale, zero_point, bits, symmetric)
    return weight_only_linear(layer, codes, scale, zero_point, bits, group_size, symmetric)


def rtn(model: nn.Module, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
        targets: Sequence[str] | None = None, ignore: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` whose Linear layers (``targets``, minus ``ignore``; names or ``fnmatch`` patterns) store
    ``bits``-bit weights rounded to nearest with a scale (and, asymmetric, a zero point) per group of
    ``group_size`` inputs. ``group_size`` must divide each layer's ``in_features`` (None: one group per row).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> small = rtn(models.mlp(64, (32,)), bits=3, group_size=32, ignore=["3"])
    >>> type(small[1]).__name__, type(small[3]).__name__
    ('WeightOnlyLinear', 'Linear')
    """
    check_grid(bits, group_size, symmetric, "rtn")
    converted = copy.deepcopy(model)
    layers = select_linears(converted, targets, ignore, "rtn")
    for name, layer in layers:
        check_layer_groups(name, layer, group_size, "rtn")
    for name, layer in layers:
        replacement = rtn_linear(layer, bits, group_size, symmetric)
        if name == "":
            return replacement
        converted.set_submodule(name, replacement)
    return converted
