"""Quantization without calibration: dynamic (activations quantized per batch) and weight-only.

* :func:`quantize_dynamic` -- each ``nn.Linear`` becomes a :class:`DynamicQuantizedLinear`: int8 weights
  (symmetric, per output channel, narrow range), and at run time the input batch is quantized with the range of
  that batch (asymmetric int8, ``qparams(min x, max x)``), multiplied in integers by the kernel GEMM
  (:func:`nanoopt.kernels.gemm_s8s8s32`, exact int32 ``sum_k (x_q - x_zp) w_q``), and rescaled in float:
  ``y = float32(acc) * (s_x * s_w) + bias`` (PyTorch's ``quantize_dynamic`` scheme). Nothing to calibrate; float in,
  float out.
* :func:`quantize_weights` -- each ``nn.Linear`` / ``nn.Conv2d`` keeps float activations but stores its weight in
  ``bits`` (2..8) with one symmetric scale per output channel, or per group of ``group_size`` consecutive input
  weights (as in GPTQ / AWQ's group-wise formats); 4-bit and narrower codes are packed two per byte. A Linear
  computes from the stored codes (a few rows: the low-bit kernel :mod:`nanoopt.kernels.lowbit`; many rows: the
  dequantized weight and BLAS), a Conv2d dequantizes its weight at each call, so the stored size really shrinks
  (``state_dict`` holds only the codes, the scales and the bias).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models
>>> no.manual_seed(0)
>>> model = models.lenet_300_100()
>>> small = quantize_weights(model, bits=4, group_size=32)
>>> no.report.stored_bytes(model) / no.report.stored_bytes(small) > 6
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from nanoopt import kernels, nn
from nanoopt.kernels.lowbit import LowBitWeight, lowbit_linear, prepare_lowbit
from nanoopt.nn import functional as F
from nanoopt.nn.converted import require_float_model
from nanoopt.ops import Function
from nanoopt.quant.boundary import quantize_per_tensor
from nanoopt.quant.checks import check_finite_parameters
from nanoopt.quant.config import INT8_ACTIVATION, weight_spec
from nanoopt.quant.metadata import check_codes_fit, spec_metadata
from nanoopt.quant.packing import pack_int4, unpack_int4
from nanoopt.spec import QuantSpec, dequantize, qparams, quantize
from nanoopt.tensor import Tensor

__all__ = ["DynamicQuantizedLinear", "WeightOnlyConv2d", "WeightOnlyLinear", "quantize_dynamic", "quantize_weights"]


def _per_channel_codes(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range codes of ``weight (C, ...)`` with one scale per row (axis 0)."""
    spec = weight_spec(bits)
    rows = weight.reshape(weight.shape[0], -1)
    scale, zero_point = qparams(rows.min(axis=1), rows.max(axis=1), spec)
    return quantize(weight, scale, zero_point, spec), scale


class DynamicQuantizedLinear(nn.Module):
    """``nn.Linear`` with int8 weights and activations quantized per batch at run time (see module docstring)."""

    converted_by = "quant.quantize_dynamic / quantize_weights"  # nanoopt.nn.converted.MARKER

    def __init__(self, layer: nn.Linear, bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits = bits
        codes, scale = _per_channel_codes(layer.weight.data.astype(np.float32), bits)
        self.register_buffer("weight", np.ascontiguousarray(codes))  # (N, K) int8
        self.register_buffer("weight_scale", scale.astype(np.float32))  # (N,)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.data.astype(np.float32).copy())
        self.activation_spec = INT8_ACTIVATION
        self._packed: Any = None

    def forward(self, x: Any) -> Tensor:
        data = np.asarray(x.data if isinstance(x, Tensor) else x, dtype=np.float32)
        if data.ndim < 1 or data.shape[-1] != self.in_features:
            raise ValueError(f"DynamicQuantizedLinear: expected input (N, {self.in_features}), got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise ValueError("DynamicQuantizedLinear: the input contains NaN or Inf")
        rows = np.ascontiguousarray(data.reshape(-1, self.in_features))  # (M, K)
        # initial=0: an empty batch has no range (the range always contains 0, so nothing else changes)
        scale, zero_point = qparams(rows.min(initial=0.0), rows.max(initial=0.0), self.activation_spec)
        codes = quantize_per_tensor(rows, scale, zero_point, self.activation_spec)
        if self._packed is None:
            self._packed = kernels.prepare_weights(self.weight)
        acc = kernels.gemm_s8s8s32(codes, self._packed, int(zero_point))  # (M, N) exact int32
        out = acc.astype(np.float32) * (scale * self.weight_scale)
        if self.bias is not None:
            out += self.bias
        return Tensor(out.reshape(data.shape[:-1] + (self.out_features,)))

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The weight codes and their scales: ``bits``-bit symmetric per-channel codes, activations per batch."""
        description = {**spec_metadata(weight_spec(self.bits)), "activations": "dynamic int8"}
        return {"weight": description, "weight_scale": dict(description)}

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Loaded codes must fit the layer's bit width; a new weight is packed again at the next call."""
        spec = weight_spec(self.bits)
        if "weight" in state:
            check_codes_fit(state["weight"], spec.qmin, spec.qmax, f"weight ({self.bits}-bit)")

    def after_load(self) -> None:
        self._packed = None

    def stored_parameters(self) -> int:
        """Weights and bias (for ``nanoopt.report``)."""
        return int(self.weight.size + (0 if self.bias is None else self.bias.size))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic, "
                f"{self.bits}-bit weights")


def quantize_dynamic(model: nn.Module, bits: int = 8) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers run int8 products with per-batch activation ranges.

    ``bits`` (2..8) is the weight width (codes in int8 containers); activations are always int8.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"quantize_dynamic: bits must be an int in [2, 8], got {bits!r}")
    require_float_model(model, "quantize_dynamic")
    check_finite_parameters(model, "quant.quantize_dynamic")
    return _converted_copy(model, lambda module: DynamicQuantizedLinear(module, bits)
                           if isinstance(module, nn.Linear) else None)


def _converted_copy(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """A copy of ``model`` with every module for which ``replacement(module)`` gives a module replaced by it (the
    replacement itself where that module is the model)."""
    converted = copy.deepcopy(model)
    for name, module in list(converted.named_modules()):
        new = replacement(module)
        if new is None:
            continue
        if name == "":
            return new
        converted.set_submodule(name, new)
    return converted


# ------------------------------------------------------------------------------------------- weight-only
class _WeightOnly(nn.Module):
    """Stores ``bits``-bit codes of the weight with a scale per (output channel, group of inputs)."""

    converted_by = "quant.quantize_weights / rtn / gptq / awq"  # nanoopt.nn.converted.MARKER

    def __init__(self, layer: nn.Module, bits: int, group_size: int | None, codes: np.ndarray | None = None,
                 scale: np.ndarray | None = None, zero_point: np.ndarray | None = None) -> None:
        """Round ``layer.weight`` to nearest (symmetric), or store given ``codes (C, depth)`` with ``scale`` and
        optional ``zero_point`` ``(C, groups)`` (GPTQ / AWQ choose the codes; ``real = scale * (code - zp)``)."""
        super().__init__()
        weight = layer.weight.data.astype(np.float32)
        self.weight_shape = weight.shape
        self.bits = bits
        depth = int(np.prod(weight.shape[1:]))
        self.group_size = depth if group_size is None else group_size
        groups = -(-depth // self.group_size)
        if codes is None:
            rows = np.zeros((weight.shape[0], groups * self.group_size), np.float32)
            rows[:, :depth] = weight.reshape(weight.shape[0], depth)  # zero padding: no effect on the ranges
            grouped = rows.reshape(-1, self.group_size)  # (C * groups, group_size)
            spec = weight_spec(bits)
            scale, zero_point = qparams(grouped.min(axis=1), grouped.max(axis=1), spec)
            codes = quantize(grouped, scale, zero_point, spec).reshape(weight.shape[0], -1)[:, :depth]
            zero_point = None
        elif codes.shape != (weight.shape[0], depth) or np.shape(scale) != (weight.shape[0], groups):
            raise ValueError(f"{type(self).__name__}: codes {codes.shape} / scale {np.shape(scale)} do not match "
                             f"weight {weight.shape} with group_size={self.group_size}")
        codes = np.ascontiguousarray(codes, dtype=np.int8)
        if bits <= 4:
            self.register_buffer("weight_packed", pack_int4(codes))
        else:
            self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", np.reshape(scale, (weight.shape[0], groups)).astype(np.float32))
        if zero_point is not None:  # asymmetric grid: one zero point per group
            self.register_buffer("weight_zero_point", np.reshape(zero_point, (weight.shape[0], groups)).astype(np.int8))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.data.astype(np.float32).copy())

    def grid(self) -> QuantSpec:
        """The codes' grid: symmetric narrow range (no zero point), or asymmetric with a zero point per group."""
        if getattr(self, "weight_zero_point", None) is None:
            return weight_spec(self.bits)
        return QuantSpec(bits=self.bits, signed=True, symmetric=False, per_channel=True)

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The codes (``bits``, grid, packing, group size, weight shape), their scales and zero points."""
        description = {**spec_metadata(self.grid()), "group_size": int(self.group_size),
                       "packed": self.bits <= 4, "weight_shape": [int(size) for size in self.weight_shape]}
        codes = "weight_packed" if self.bits <= 4 else "weight_codes"
        described = {codes: description, "weight_scale": dict(description)}
        if getattr(self, "weight_zero_point", None) is not None:
            described["weight_zero_point"] = dict(description)
        return described

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Loaded codes (and zero points) must fit the layer's grid (e.g. 4-bit codes do not load into a 3-bit
        layer)."""
        spec = self.grid()
        count = int(np.prod(self.weight_shape))
        if "weight_packed" in state:
            check_codes_fit(unpack_int4(state["weight_packed"], count), spec.qmin, spec.qmax,
                            f"weight_packed ({self.bits}-bit)")
        if "weight_codes" in state:
            check_codes_fit(state["weight_codes"], spec.qmin, spec.qmax, f"weight_codes ({self.bits}-bit)")
        if "weight_zero_point" in state:
            check_codes_fit(state["weight_zero_point"], spec.qmin, spec.qmax, f"weight_zero_point ({self.bits}-bit)")

    def stored_parameters(self) -> int:
        """Weights (packed or not, counted one per weight) and bias (for ``nanoopt.report``)."""
        return int(np.prod(self.weight_shape)) + (0 if self.bias is None else int(self.bias.size))

    def codes(self) -> np.ndarray:
        """The integer weight codes ``(C_out, depth)`` (unpacked)."""
        depth = int(np.prod(self.weight_shape[1:]))
        if self.bits <= 4:
            return unpack_int4(self.weight_packed, self.weight_shape[0] * depth).reshape(self.weight_shape[0], depth)
        return self.weight_codes

    def dequantized_weight(self) -> np.ndarray:
        """``codes * scale`` of each group, in the layer's weight shape (float32)."""
        codes = self.codes()
        channels, depth = codes.shape
        scales = np.repeat(self.weight_scale, self.group_size, axis=1)[:, :depth]  # (C, depth)
        zero_point = getattr(self, "weight_zero_point", None)
        spec = self.grid()
        if zero_point is None:
            zeros = np.zeros(codes.size, np.int32)
        else:
            zeros = np.repeat(zero_point, self.group_size, axis=1)[:, :depth].reshape(-1)
        flat = dequantize(codes.reshape(-1), scales.reshape(-1), zeros, spec)
        return flat.reshape(self.weight_shape)

    def extra_repr(self) -> str:
        grid = "asymmetric" if getattr(self, "weight_zero_point", None) is not None else "symmetric"
        return f"weight {self.weight_shape}, {self.bits}-bit {grid}, group_size={self.group_size}"


#: inputs of at most this many rows (all leading axes flattened) run the low-bit kernel; more rows dequantize the
#: weight and call BLAS (where the two cross over: docs/measurements.md)
KERNEL_MAX_ROWS = 256
_ALL_ROWS = slice(None)


class _LowBitLinear(Function):
    """``y = x W^T + b`` from a :class:`WeightOnlyLinear`'s stored codes (forward: the layer's
    :meth:`~WeightOnlyLinear.forward_array`); backward ``dx = G W`` with the dequantized weight (no gradient for
    the frozen codes)."""

    @staticmethod
    def forward(ctx, x, layer=None):
        ctx.save_for_backward(x.shape, layer)
        return layer.forward_array(x)

    @staticmethod
    def backward(ctx, grad):
        shape, layer = ctx.saved
        weight = layer.dequantized_weight().astype(grad.dtype, copy=False)
        return (grad.reshape(-1, weight.shape[0]) @ weight).reshape(shape)


class WeightOnlyLinear(_WeightOnly):
    """``nn.Linear`` with a low-bit stored weight (float activations), computed from the stored codes.

    Inputs of at most :data:`KERNEL_MAX_ROWS` float32 rows (token-by-token generation, a sliding window) run
    :func:`nanoopt.kernels.lowbit.lowbit_linear`, which streams the packed codes once per call (laid out once for
    the kernel at the first call, and again after ``load_state_dict``) and whose result is bit-identical to
    :func:`nanoopt.kernels.lowbit.lowbit_linear_reference`: ``y = (sum over groups of s (sum over the group's inputs
    of x (q - z)))) + b`` in float32, in a fixed order. More rows (or other dtypes) dequantize the weight
    (:meth:`dequantized_weight`) and multiply with BLAS: the same value up to float32 rounding.
    """

    def forward_array(self, x: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """``x (..., in) W[rows]^T + b[rows]`` on arrays (no graph): outputs ``rows`` (a slice with step 1, e.g. the
        query rows of a fused QKV projection) only."""
        n, depth = self.weight_shape
        if x.ndim < 1 or x.shape[-1] != depth:
            raise ValueError(f"WeightOnlyLinear: expected input (N, {depth}), got shape {x.shape}")
        start, stop, step = (0, n, 1) if rows == _ALL_ROWS else rows.indices(n)
        if step != 1:
            raise ValueError(f"WeightOnlyLinear.forward_array: rows must be a slice with step 1, got {rows}")
        stop = max(start, stop)
        bias = self._buffers["bias"]  # (not through Module.__getattr__: this runs once per layer and token)
        flat = x.reshape(-1, depth)  # (M, K)
        if x.dtype == np.float32 and flat.shape[0] <= KERNEL_MAX_ROWS:  # (x, bias and rows are checked here)
            lowbit = self.__dict__.get("_lowbit")
            out = lowbit_linear(flat, self.lowbit_weight() if lowbit is None else lowbit, bias, (start, stop),
                                validate=False)
        else:
            out = flat @ self.dequantized_weight()[start:stop].T
            if bias is not None:
                out += bias[start:stop]
        return out if x.ndim == 2 else out.reshape(x.shape[:-1] + (stop - start,))

    def lowbit_weight(self) -> LowBitWeight:
        """The stored codes, scales and zero points laid out for the kernel (made once, kept until a new state is
        loaded)."""
        if getattr(self, "_lowbit", None) is None:
            self._lowbit = prepare_lowbit(np.ascontiguousarray(self.codes()), self.weight_scale,
                                          getattr(self, "weight_zero_point", None), self.group_size, self.bits)
        return self._lowbit

    def after_load(self) -> None:
        self._lowbit = None

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        if x.ndim < 1 or x.shape[-1] != self.weight_shape[1]:
            raise ValueError(f"WeightOnlyLinear: expected input (N, {self.weight_shape[1]}), got shape {x.shape}")
        return _LowBitLinear.apply(x, layer=self)


class WeightOnlyConv2d(_WeightOnly):
    """``nn.Conv2d`` with a low-bit stored weight, dequantized at each call (float activations)."""

    def __init__(self, layer: nn.Conv2d, bits: int, group_size: int | None) -> None:
        super().__init__(layer, bits, group_size)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        bias = None if self.bias is None else Tensor(self.bias)
        return F.conv2d(x, Tensor(self.dequantized_weight()), bias, self.stride, self.padding, self.dilation,
                        self.groups)


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv2d weights are stored in ``bits`` bits (see module docstring).

    ``group_size`` None: one scale per output channel; else one per ``group_size`` consecutive weights of a
    row (the last group of a row may be shorter).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"quantize_weights: bits must be an int in [2, 8], got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"quantize_weights: group_size must be a positive int or None, got {group_size!r}")
    require_float_model(model, "quantize_weights")
    check_finite_parameters(model, "quant.quantize_weights")

    def weight_only(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return WeightOnlyLinear(module, bits, group_size)
        if isinstance(module, nn.Conv2d):
            return WeightOnlyConv2d(module, bits, group_size)
        return None

    return _converted_copy(model, weight_only)
