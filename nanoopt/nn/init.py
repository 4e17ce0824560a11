"""Weight initialisation, PyTorch's defaults (He et al. 2015; Glorot & Bengio 2010), drawn from the global RNG.

PyTorch's ``Linear`` and ``Conv2d`` use ``kaiming_uniform_(w, a=sqrt(5))``, i.e. U(-b, b) with
b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)), which works out to b = 1 / sqrt(fan_in); their bias is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Every function fills an array (or a Tensor's array) in place and returns it.

>>> import numpy as np, nanoopt as no
>>> w = np.empty((300, 784), dtype=np.float32)
>>> bool(np.abs(kaiming_uniform_(w, a=5 ** 0.5)).max() <= 1 / 784 ** 0.5)
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanoopt.random import get_rng
from nanoopt.tensor import Tensor


def _array(x: Any) -> np.ndarray:
    return x.data if isinstance(x, Tensor) else x


def fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive field (PyTorch's convention)."""
    if len(shape) < 2:
        raise ValueError(f"fan in/out needs an array with at least 2 dimensions, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def uniform_(x: Any, low: float = 0.0, high: float = 1.0) -> Any:
    array = _array(x)
    array[...] = get_rng().uniform(low, high, size=array.shape)
    return x


def normal_(x: Any, mean: float = 0.0, std: float = 1.0) -> Any:
    array = _array(x)
    array[...] = get_rng().normal(mean, std, size=array.shape)
    return x


def zeros_(x: Any) -> Any:
    _array(x)[...] = 0
    return x


def ones_(x: Any) -> Any:
    _array(x)[...] = 1
    return x


def kaiming_uniform_(x: Any, a: float = 0.0, nonlinearity: str = "leaky_relu") -> Any:
    """U(-b, b), b = gain * sqrt(3 / fan_in); gain = sqrt(2 / (1 + a^2)) for (leaky) ReLU, 1 for linear."""
    fan_in, _ = fan_in_and_fan_out(_array(x).shape)
    gain = math.sqrt(2.0 / (1 + a * a)) if nonlinearity in ("relu", "leaky_relu") else 1.0
    bound = gain * math.sqrt(3.0 / fan_in)
    return uniform_(x, -bound, bound)


def kaiming_normal_(x: Any, a: float = 0.0, nonlinearity: str = "leaky_relu") -> Any:
    """N(0, std^2), std = gain / sqrt(fan_in)."""
    fan_in, _ = fan_in_and_fan_out(_array(x).shape)
    gain = math.sqrt(2.0 / (1 + a * a)) if nonlinearity in ("relu", "leaky_relu") else 1.0
    return normal_(x, 0.0, gain / math.sqrt(fan_in))


def xavier_uniform_(x: Any, gain: float = 1.0) -> Any:
    """U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    fan_in, fan_out = fan_in_and_fan_out(_array(x).shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(x, -bound, bound)
