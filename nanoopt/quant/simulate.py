"""Simulated quantization: the modules of a prepared model (``quant.prepare``), for calibration, QAT and checks.

Every quantization point is a :class:`~nanoopt.quant.fake_quant.FakeQuantize`: an observer plus
``x -> dequantize(quantize(x))`` with two switches, as PyTorch's ``FakeQuantize``: ``observer_enabled`` (collect
statistics) and ``fake_quant_enabled`` (round to the grid). Its ``scale`` / ``zero_point`` buffers come from the
observer (``qparams`` of :mod:`nanoopt.spec`, nowhere else) and stay fixed once the observer is disabled
("frozen").

Each layer of a prepared model runs one of two paths:

* **float path** (training, calibration, or any quantizer not frozen): the float layer with fake-quantized
  weights, then the output quantizer. Gradients pass the rounding straight through (Bengio et al. 2013; the
  convention of PyTorch's ``fake_quantize_per_tensor_affine``): ``d out / d x = 1`` where
  ``qmin <= rint(x / scale) + zero_point <= qmax``, else 0. This is what quantization-aware training trains.
* **integer path** (eval mode, own quantizers frozen and enabled): the layer re-quantizes its input on the grid
  of the quantizer that produced it (exact: the input already lies on that grid), computes the *integer* result
  with :mod:`nanoopt.quant.lowering` -- the same :func:`~nanoopt.quant.lowering.integer_layer` that ``convert``
  uses, the same requantization -- and dequantizes it. So a calibrated prepared model in eval mode returns
  exactly ``dequantize`` of what the converted integer model returns, on every input.

Layers name the quantizers of their inputs (``sources``: the output quantizer of the producing layer, found by
``prepare`` from the traced data flow); pass-through layers (max/avg pooling, unfused ReLU) keep their input's
grid. Layers without an integer kernel run in float between a dequantization and a :class:`FakeQuantize`
(:class:`SimulatedFloat`).

>>> import numpy as np
>>> from nanoopt.quant.observers import MinMaxObserver
>>> from nanoopt.tensor import Tensor
>>> quantizer = FakeQuantize(MinMaxObserver())
>>> _ = quantizer(Tensor(np.array([-1.0, 3.0], np.float32)))       # observes (and rounds: fake_quant_enabled)
>>> quantizer.freeze(); quantizer(Tensor(np.array([0.1, 5.0], np.float32))).data   # 5.0 saturates at the top
array([0.09411766, 2.9960785 ], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.kernels import reference
from nanoopt.nn import functional as F
from nanoopt.quant.fake_quant import FakeQuantize
from nanoopt.quant.lowering import IntegerLayer, QParams, emulate_conv2d, emulate_linear, integer_layer
from nanoopt.tensor import Tensor

__all__ = [
    "SimulatedAdd",
    "SimulatedAvgPool2d",
    "SimulatedConv2d",
    "SimulatedFloat",
    "SimulatedLinear",
    "SimulatedMaxPool2d",
    "SimulatedReLU",
]


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x))


class _Simulated(nn.Module):
    """Shared parts: the layer's name and the quantizers that produced its inputs (not registered children)."""

    converted_by = "quant.prepare"  # nanoopt.nn.converted.MARKER

    def __init__(self, name: str, sources: Sequence[FakeQuantize]) -> None:
        super().__init__()
        self.layer_name = name
        self.sources = list(sources)  # a plain list: the producers own these modules

    def source_qparams(self, index: int = 0) -> QParams:
        return self.sources[index].qparams()

    def own_quantizers(self) -> list[FakeQuantize]:
        """The quantizers this layer owns: its output quantizer (weighted layers add their weight quantizer; the
        pass-through layers, which stay on their input's grid, own none)."""
        return [self.output_quantizer]

    def integer_mode(self) -> bool:
        """Eval mode with every own quantizer frozen and rounding: run the integer path."""
        quantizers = self.own_quantizers()
        return (not self.training and all(q.frozen and q.fake_quant_enabled for q in quantizers)
                and all(source.is_calibrated for source in self.sources))


# ------------------------------------------------------------------------------------------- weighted layers
class _SimulatedWeighted(_Simulated):
    """A Linear or Conv2d with a weight quantizer, an output quantizer and an optionally fused ReLU."""

    def __init__(self, layer: nn.Module, weight_quantizer: FakeQuantize, output_quantizer: FakeQuantize,
                 relu: bool, name: str, sources: Sequence[FakeQuantize]) -> None:
        super().__init__(name, sources)
        self.weight = layer.weight
        if layer.bias is None or isinstance(layer.bias, nn.Parameter):
            self.register_parameter("bias", layer.bias)
        else:  # a pruned bias: its effective value bias_orig * bias_mask (QAT adopts the reparametrisation)
            self.bias = layer.bias
        self.weight_quantizer = weight_quantizer
        self.output_quantizer = output_quantizer
        self.relu = relu

    def own_quantizers(self) -> list[FakeQuantize]:
        return [self.weight_quantizer, self.output_quantizer]

    def integer_layer(self) -> IntegerLayer:
        """The integer parameters :func:`convert` would give this layer now."""
        bias = None if self.bias is None else self.bias.data
        return integer_layer(self.weight.data, bias, self.weight_quantizer.qparams(), self.source_qparams(),
                             self.output_quantizer.qparams(), self.relu, name=self.layer_name)

    def float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The float layer with the given weight and bias (``x W^T + b`` or the convolution)."""
        raise NotImplementedError

    def integer_op(self, x_q: np.ndarray, layer: IntegerLayer) -> np.ndarray:
        raise NotImplementedError

    def forward(self, x: Any) -> Tensor:
        x = _as_tensor(x)
        if self.integer_mode():
            layer = self.integer_layer()
            codes = self.integer_op(layer.input.quantize(x.data), layer)
            return Tensor(layer.output.dequantize(codes))
        y = self.float_op(x, self.weight_quantizer(self.weight), self.bias)
        if self.relu:
            y = y.relu()
        return self.output_quantizer(y)


class SimulatedLinear(_SimulatedWeighted):
    """Simulated ``nn.Linear`` (optionally with a fused ReLU)."""

    def __init__(self, layer: nn.Linear, weight_quantizer: FakeQuantize, output_quantizer: FakeQuantize,
                 relu: bool = False, name: str = "", sources: Sequence[FakeQuantize] = ()) -> None:
        super().__init__(layer, weight_quantizer, output_quantizer, relu, name, sources)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name!r}: expected input (N, {self.in_features}), got shape {x.shape}")
        return F.linear(x, weight, bias)

    def integer_op(self, x_q: np.ndarray, layer: IntegerLayer) -> np.ndarray:
        if x_q.ndim < 1 or x_q.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name!r}: expected input (N, {self.in_features}), got shape {x_q.shape}")
        return emulate_linear(x_q, layer)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}"


class SimulatedConv2d(_SimulatedWeighted):
    """Simulated ``nn.Conv2d`` (optionally with a fused ReLU)."""

    def __init__(self, layer: nn.Conv2d, weight_quantizer: FakeQuantize, output_quantizer: FakeQuantize,
                 relu: bool = False, name: str = "", sources: Sequence[FakeQuantize] = ()) -> None:
        super().__init__(layer, weight_quantizer, output_quantizer, relu, name, sources)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def _check(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"{self.layer_name!r}: expected input (N, {self.in_channels}, H, W), got shape {shape}")

    def float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        self._check(x.shape)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def integer_op(self, x_q: np.ndarray, layer: IntegerLayer) -> np.ndarray:
        self._check(x_q.shape)
        return emulate_conv2d(x_q, layer, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, relu={self.relu}")


# ------------------------------------------------------------------------------------------- residual add
class SimulatedAdd(_Simulated):
    """Simulated ``nn.Add``: integer path = TFLite's requantized add of two grids (reference kernel)."""

    def __init__(self, output_quantizer: FakeQuantize, relu: bool = False, name: str = "",
                 sources: Sequence[FakeQuantize] = ()) -> None:
        super().__init__(name, sources)
        self.output_quantizer = output_quantizer
        self.relu = relu

    def forward(self, a: Any, b: Any) -> Tensor:
        a, b = _as_tensor(a), _as_tensor(b)
        if a.shape != b.shape:
            raise ValueError(f"{self.layer_name!r}: both inputs must have the same shape, got {a.shape} and {b.shape}")
        if self.integer_mode():
            first, second, out = self.source_qparams(0), self.source_qparams(1), self.output_quantizer.qparams()
            codes = reference.quantized_add(
                np.ascontiguousarray(first.quantize(a.data)), first.scale, first.zero,
                np.ascontiguousarray(second.quantize(b.data)), second.scale, second.zero,
                out.scale, out.zero, out.spec, self.relu,
            )
            return Tensor(out.dequantize(codes))
        y = a + b
        if self.relu:
            y = y.relu()
        return self.output_quantizer(y)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


# ------------------------------------------------------------------------------------------- pass-through
class _SimulatedSameGrid(_Simulated):
    """A layer whose output stays on its input's grid (pools, ReLU): integer path on the source's codes.

    A subclass defines ``float_op(x: Tensor) -> Tensor`` and ``integer_op(x_q, params: QParams) -> ndarray``
    (codes in, codes on the same grid out)."""

    def own_quantizers(self) -> list[FakeQuantize]:
        return []

    def integer_mode(self) -> bool:
        source = self.sources[0]
        return not self.training and source.frozen and source.fake_quant_enabled and source.is_calibrated

    def forward(self, x: Any) -> Tensor:
        x = _as_tensor(x)
        if self.integer_mode():
            params = self.source_qparams()
            codes = self.integer_op(np.ascontiguousarray(params.quantize(x.data)), params)
            return Tensor(params.dequantize(codes))
        return self.float_op(x)


class SimulatedMaxPool2d(_SimulatedSameGrid):
    """Max pooling: exact on codes (dequantization is monotonic)."""

    def __init__(self, layer: nn.MaxPool2d, name: str = "", sources: Sequence[FakeQuantize] = ()) -> None:
        super().__init__(name, sources)
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding

    def float_op(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def integer_op(self, x_q: np.ndarray, params: QParams) -> np.ndarray:
        return reference.quantized_max_pool2d(x_q, self.kernel_size, self.stride, self.padding)


class SimulatedAvgPool2d(_SimulatedSameGrid):
    """Average pooling on the input's grid (``nn.AvgPool2d``, or ``nn.AdaptiveAvgPool2d`` with bins of equal size).

    Integer path: the window sum divided with rounding half away from zero (reference kernel). Float path:
    the float average, fake-quantized on the input's grid when that quantizer rounds.
    """

    def __init__(self, layer: nn.Module, name: str = "", sources: Sequence[FakeQuantize] = ()) -> None:
        super().__init__(name, sources)
        self.adaptive_size = getattr(layer, "output_size", None) if isinstance(layer, nn.AdaptiveAvgPool2d) else None
        if self.adaptive_size is None:
            self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding

    def window(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(kernel, stride, padding)`` for an input of ``shape`` (adaptive pools: equal bins only)."""
        if self.adaptive_size is None:
            return self.kernel_size, self.stride, self.padding
        kernel = []
        for size, out in zip(shape[2:], self.adaptive_size, strict=True):
            if size % out:
                raise ValueError(f"{self.layer_name!r}: adaptive average pooling from {size} to {out} has unequal "
                                 "bins; the integer kernel pools equal windows only")
            kernel.append(size // out)
        return tuple(kernel), tuple(kernel), (0, 0)

    def float_op(self, x: Tensor) -> Tensor:
        if self.adaptive_size is not None:  # the float model's own op (fake quant off gives it back bit for bit)
            y = F.adaptive_avg_pool2d(x, self.adaptive_size)
        else:
            y = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
        source = self.sources[0] if self.sources else None
        if source is not None and source.fake_quant_enabled and source.is_calibrated:
            y = source.fake_quantize(y)
        return y

    def integer_op(self, x_q: np.ndarray, params: QParams) -> np.ndarray:
        kernel, stride, padding = self.window(x_q.shape)
        return reference.quantized_avg_pool2d(x_q, params.zero, kernel, stride, padding)


class SimulatedReLU(_SimulatedSameGrid):
    """A ReLU not fused into the layer before it: ``max(q, zero_point)`` on codes."""

    def float_op(self, x: Tensor) -> Tensor:
        return x.relu()

    def integer_op(self, x_q: np.ndarray, params: QParams) -> np.ndarray:
        return reference.quantized_relu(x_q, params.zero)


# ------------------------------------------------------------------------------------------- float islands
class SimulatedFloat(_Simulated):
    """A layer with no integer kernel (or kept in float by the config): float in, float out, then quantized."""

    def __init__(self, layer: nn.Module, output_quantizer: FakeQuantize, name: str = "",
                 sources: Sequence[FakeQuantize] = ()) -> None:
        super().__init__(name, sources)
        self.float_module = layer
        self.output_quantizer = output_quantizer

    def forward(self, *inputs: Any) -> Tensor:
        return self.output_quantizer(self.float_module(*inputs))
