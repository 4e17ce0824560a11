"""QuantConfig: which precision and which observer each layer of a model gets.

A :class:`QuantConfig` holds the defaults (activation spec, weight spec and their observers), per-layer
overrides keyed by dotted module name or by module type, and the layers to keep in float. ``for_layer(name,
module)`` resolves them into the :class:`LayerQuantConfig` of one layer: defaults, then the type overrides that
match (``isinstance``), then the name override (a name wins over a type).

The defaults follow the integer scheme of Jacob et al. 2018 (and TFLite): asymmetric int8 activations, symmetric
per-channel narrow-range int8 weights (``[-127, 127]``), and a bias with ``scale = input_scale * weight_scale``,
zero point 0, stored as int32. The bias width is not configured: it follows the layer's *input* activations,
int32 for <= 8-bit inputs and int64 for 16-bit ones (the "16x8" mode), which is what the kernels accept.

What the integer kernels can run (checked here, so that a bad config fails before calibration):

* activations: signed; 2..8 bits (int8 containers, any zero point) or 9..16 bits symmetric (int16, zero point
  0);
* weights: signed, symmetric (zero point 0), per tensor or per channel on axis 0 (the output channel), 2..8
  bits (int8 containers); 16-bit weights only with 16-bit activations (the int16 x int16 kernels).

>>> config = QuantConfig(overrides={"fc": {"weight": QuantSpec(bits=4, symmetric=True, per_channel=True,
...                                                             narrow_range=True)}})
>>> from nanoopt import nn
>>> config.for_layer("fc", nn.Linear(2, 2)).weight.bits, config.for_layer("conv", nn.Linear(2, 2)).weight.bits
(4, 8)
>>> QuantConfig.int16_activations().activation.bits
16
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt.nn import Module
from nanoopt.quant.observers import HistogramObserver, MinMaxObserver, Observer, PerChannelMSEObserver
from nanoopt.spec import QuantSpec

__all__ = [
    "INT7_ACTIVATION", "INT8_ACTIVATION", "INT8_WEIGHT", "INT16_ACTIVATION", "LayerQuantConfig", "QuantConfig",
    "bias_dtype", "config_or_default", "weight_spec",
]

INT8_ACTIVATION = QuantSpec(bits=8, signed=True, symmetric=False)
# 7-bit activations in int8 codes [-64, 63]: PyTorch's ``reduce_range=True`` (its x86/fbgemm default qconfig keeps
# activations on quint8 [0, 127]); on AVX2 without VNNI the int8 GEMM then runs 3 instructions per 32 products
# instead of 4 (nanoopt.kernels.avx2.gemm_s8s8s32_avx2_7bit_into), for one bit of activation precision.
INT7_ACTIVATION = QuantSpec(bits=7, signed=True, symmetric=False)
INT16_ACTIVATION = QuantSpec(bits=16, signed=True, symmetric=True)
INT8_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, per_channel=True, axis=0, narrow_range=True)

ObserverFactory = Callable[[QuantSpec], Observer]


def weight_spec(bits: int = 8, per_channel: bool = True) -> QuantSpec:
    """The symmetric narrow-range weight spec for ``bits`` (``[-(2^(b-1) - 1), 2^(b-1) - 1]``).

    >>> weight_spec(4).qmin, weight_spec(4).qmax
    (-7, 7)
    """
    return QuantSpec(bits=bits, signed=True, symmetric=True, per_channel=per_channel, axis=0, narrow_range=True)


def _check_activation(spec: QuantSpec, where: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: activation must be a QuantSpec, got {type(spec).__name__}")
    if not spec.signed:
        raise ValueError(f"{where}: the integer kernels use signed activations (int8/int16), got {spec}")
    if spec.per_channel:
        raise ValueError(f"{where}: activations are quantized per tensor (the kernels take one input zero point), "
                         f"got {spec}")
    if spec.bits > 8 and not spec.symmetric:
        raise ValueError(f"{where}: activations wider than 8 bits must be symmetric (int16 kernels need zero "
                         f"point 0), got {spec}")


def _check_weight(spec: QuantSpec, activation: QuantSpec, where: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: weight must be a QuantSpec, got {type(spec).__name__}")
    if not (spec.signed and spec.symmetric):
        raise ValueError(f"{where}: weights must be signed and symmetric (zero point 0), got {spec}")
    if spec.per_channel and spec.axis != 0:
        raise ValueError(f"{where}: per-channel weights are quantized along axis 0 (output channels), got {spec}")
    if spec.bits > 8 and activation.bits <= 8:
        raise ValueError(f"{where}: weights wider than 8 bits need 16-bit activations (int16 x int16 kernels), "
                         f"got weight {spec} with activation {activation}")


@dataclass(frozen=True)
class LayerQuantConfig:
    """The resolved configuration of one layer."""

    activation: QuantSpec  # spec of the layer's output activations
    weight: QuantSpec  # spec of its weights (unused by layers without weights)
    activation_observer: ObserverFactory  # called with `activation` to make the output observer
    weight_observer: ObserverFactory  # called with `weight` to make the weight observer

    def make_activation_observer(self) -> Observer:
        return self.activation_observer(self.activation)

    def make_weight_observer(self) -> Observer:
        return self.weight_observer(self.weight)


_OVERRIDABLE = ("activation", "weight", "activation_observer", "weight_observer")


@dataclass
class QuantConfig:
    """Defaults, per-layer overrides and float-kept layers of a quantization (see the module docstring)."""

    activation: QuantSpec = INT8_ACTIVATION  # asymmetric int8 activations (Jacob et al. 2018)
    weight: QuantSpec = INT8_WEIGHT  # symmetric per-channel narrow-range int8 weights
    activation_observer: ObserverFactory = HistogramObserver  # range by the L2 (MSE) histogram search
    weight_observer: ObserverFactory = MinMaxObserver  # weights: their exact min/max per channel
    # {"dotted.name" or ModuleType: {"activation"|"weight"|"activation_observer"|"weight_observer": value}};
    # the name "input" configures the quantizer of the model input.
    overrides: Mapping[str | type, Mapping[str, Any]] = field(default_factory=dict)
    keep_float: Sequence[str | type] = ()  # names or types of layers to leave in float (dequantize around them)

    def __post_init__(self) -> None:
        _check_activation(self.activation, "QuantConfig")
        _check_weight(self.weight, self.activation, "QuantConfig")
        for name in ("activation_observer", "weight_observer"):
            if not callable(getattr(self, name)):
                raise TypeError(f"QuantConfig.{name} must be a callable QuantSpec -> Observer (an observer class such "
                                f"as MinMaxObserver), got {getattr(self, name)!r}")
        for key, values in self.overrides.items():
            if not isinstance(key, str | type):
                raise TypeError(f"QuantConfig.overrides keys are module names or types, got {key!r}")
            if not isinstance(values, Mapping):
                raise TypeError(f"QuantConfig.overrides[{key!r}] must be a dict of fields, got {type(values).__name__}")
            unknown = set(values) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(f"QuantConfig.overrides[{key!r}] has unknown fields {sorted(unknown)}; "
                                 f"allowed: {list(_OVERRIDABLE)}")
        for item in self.keep_float:
            if not isinstance(item, str | type):
                raise TypeError(f"QuantConfig.keep_float holds module names or types, got {item!r}")

    def for_layer(self, name: str, module: Module | None = None) -> LayerQuantConfig:
        """The configuration of layer ``name`` (``module`` is used to match type overrides)."""
        fields = {key: getattr(self, key) for key in _OVERRIDABLE}
        for key, values in self.overrides.items():
            if isinstance(key, type) and module is not None and isinstance(module, key):
                fields.update(values)
        fields.update(self.overrides.get(name, {}))
        layer = LayerQuantConfig(**fields)
        where = f"QuantConfig for layer {name!r}"
        _check_activation(layer.activation, where)
        _check_weight(layer.weight, layer.activation, where)
        return layer

    def keeps_float(self, name: str, module: Module) -> bool:
        """Whether ``keep_float`` names this layer or its type."""
        return any(item == name if isinstance(item, str) else isinstance(module, item) for item in self.keep_float)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------- presets
    @classmethod
    def int8(cls, **changes: Any) -> QuantConfig:
        """The default: int8 activations (asymmetric, MSE histogram), int8 per-channel weights, int32 bias."""
        return cls(**changes)

    @classmethod
    def x86_reduce_range(cls, **changes: Any) -> QuantConfig:
        """PyTorch's ``reduce_range=True``, as in its x86/fbgemm default qconfig: 7-bit asymmetric activations
        (:data:`INT7_ACTIVATION`, codes [-64, 63], the model input included), int8 per-channel weights, int32 bias.
        One bit less activation precision (the grid step doubles for the same range); in exchange the AVX2 int8
        GEMM of a CPU without VNNI takes its 3-instruction tile (``docs/kernels.md``). Results stay exact integer
        arithmetic on every CPU; only the speed differs.

        >>> QuantConfig.x86_reduce_range().activation.qmin, QuantConfig.x86_reduce_range().activation.qmax
        (-64, 63)
        """
        return cls(**{"activation": INT7_ACTIVATION, **changes})

    @classmethod
    def int16_activations(cls, **changes: Any) -> QuantConfig:
        """TFLite's "16x8": int16 symmetric activations (min/max range), int8 per-channel weights, int64 bias."""
        return cls(**{"activation": INT16_ACTIVATION, "activation_observer": MinMaxObserver, **changes})

    @classmethod
    def weights4(cls, per_channel: bool = True, **changes: Any) -> QuantConfig:
        """4-bit weights (``[-7, 7]``, range by the per-channel L2 search) with int8 activations ("W4A8")."""
        observer = PerChannelMSEObserver if per_channel else MinMaxObserver
        return cls(**{"weight": weight_spec(4, per_channel), "weight_observer": observer, **changes})


def config_or_default(config: Any, default: Callable[[], QuantConfig]) -> QuantConfig:
    """``config``, or ``default()`` where it is None; a ``TypeError`` where it is not a :class:`QuantConfig`.

    >>> config_or_default(None, QuantConfig.int16_activations).activation.bits
    16
    """
    config = default() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    return config


def bias_dtype(input_spec: QuantSpec) -> np.dtype:
    """int32 bias for <= 8-bit inputs, int64 for 16-bit inputs (what the kernels accept).

    >>> bias_dtype(INT16_ACTIVATION)
    dtype('int64')
    """
    return np.dtype(np.int32 if input_spec.bits <= 8 else np.int64)
