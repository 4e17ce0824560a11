"""From float weights and quantizer state to the integers a kernel runs -- written once, used twice.

This module is why a prepared model in eval mode and the converted integer model agree bit for bit. Both call

* :func:`integer_layer` -- float weight and bias + the qparams of the weight, input and output quantizers ->
  integer weights, integer bias and the fixed-point multipliers (Jacob et al. 2018, eq. 5-7 and 9, section 2.4);

the converted model then runs the result through the fast kernels (:mod:`nanoopt.kernels`), while the simulation
runs it through :func:`emulate_linear` / :func:`emulate_conv2d` here, which compute the same integers:

    ``acc[m, n] = sum_k (x_q[m, k] - x_zp) w_q[n, k] + bias_q[n]``
    ``out = clip(requantize(acc, m0[n], shift[n], out_zp) [max out_zp if ReLU])``

with ``requantize`` the one in :mod:`nanoopt.spec` (gemmlowp rounding, as the kernels). The sum is exact:
it is evaluated as a float64 matrix product of integers, exact whenever every partial sum stays below 2^53, which
is checked from the weights (``max |x - x_zp| * max_n sum_k |w_nk|``); otherwise it falls back to int64. (A float
simulation ``round(y / s_out)`` would differ from the kernels' fixed-point ``M0 * 2^-shift`` by one step now and
then; emulating the integers removes that.)

Pools and the residual add are emulated with the reference kernels of :mod:`nanoopt.kernels.reference`
themselves, the executable specification the fast kernels are tested against.

>>> import numpy as np
>>> from nanoopt.spec import QuantSpec
>>> int8, weights = QuantSpec(bits=8), QuantSpec(bits=8, symmetric=True, per_channel=True, narrow_range=True)
>>> layer = integer_layer(np.array([[0.5, -0.25]], np.float32), np.array([0.1], np.float32),
...                       QParams(np.array([0.5 / 127], np.float32), np.array([0], np.int32), weights),
...                       QParams(np.float32(0.02), np.int32(-3), int8), QParams(np.float32(0.05), np.int32(0), int8),
...                       relu=False)
>>> layer.weight, layer.bias
(array([[127, -64]], dtype=int8), array([1270], dtype=int32))
>>> emulate_linear(np.array([[47, 22]], np.int8), layer)   # x = [1.0, 0.5]: 0.5 - 0.125 + 0.1 = 0.475
array([[9]], dtype=int8)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from nanoopt.kernels import reference
from nanoopt.quant.config import bias_dtype
from nanoopt.spec import (
    QuantSpec,
    bias_fitting_weight_scale,
    dequantize,
    quantize,
    quantize_bias,
    requantization_multipliers,
    requantize,
)

EXACT_FLOAT64 = 2**53  # integers below this add exactly in float64

__all__ = ["IntegerLayer", "QParams", "emulate_conv2d", "emulate_linear", "integer_layer"]


@dataclass(frozen=True)
class QParams:
    """A scale, a zero point and the spec they belong to (per tensor: 0-d arrays; per channel: ``(C,)``)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int32
    spec: QuantSpec

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """``quantize(x, scale, zero_point, spec)``."""
        return quantize(x, self.scale, self.zero_point, self.spec)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``dequantize(q, scale, zero_point, spec)`` (float32)."""
        return dequantize(q, self.scale, self.zero_point, self.spec)

    @property
    def zero(self) -> int:
        """The zero point as a Python int (per-tensor qparams only)."""
        return int(self.zero_point)


@dataclass(frozen=True)
class IntegerLayer:
    """Everything the integer kernel of one linear or conv layer needs."""

    weight: np.ndarray  # integer codes, (C_out, C_in) or (C_out, C_in / groups, KH, KW), int8 (or int16)
    weight_scale: np.ndarray  # float32 (C_out,)
    bias: np.ndarray | None  # (C_out,) int32 for <= 8-bit inputs, int64 for 16-bit inputs; scale s_in * s_w
    m0: np.ndarray  # int32 (C_out,), in [2^30, 2^31)
    shift: np.ndarray  # int32 (C_out,): s_in * s_w / s_out ~= m0 * 2^-31 * 2^-shift
    input: QParams
    output: QParams
    relu: bool  # ReLU fused: outputs clamped at the output zero point

    @property
    def exact_in_float64(self) -> bool:
        """Whether every partial sum of ``sum_k (x - x_zp) w`` stays below 2^53 for any input code."""
        info = np.iinfo(self.input.spec.dtype)
        reach = max(abs(info.min - self.input.zero), abs(info.max - self.input.zero))
        row_sums = np.abs(self.weight.reshape(self.weight.shape[0], -1).astype(np.int64)).sum(axis=1)
        return reach * int(row_sums.max(initial=0)) < EXACT_FLOAT64


def integer_layer(weight: np.ndarray, bias: np.ndarray | None, weight_qparams: QParams, input_qparams: QParams,
                  output_qparams: QParams, relu: bool, name: str = "") -> IntegerLayer:
    """Quantize a layer for the integer kernels (the one function simulation and convert share).

    * ``w_q = quantize(weight, s_w, 0)`` (per channel along axis 0, or per tensor);
    * ``bias_q = rint(bias / (s_in * s_w))`` (int32, or int64 when the input is 16-bit);
    * ``(m0, shift) = quantize_multiplier(s_in * s_w / s_out)`` per output channel.

    Where ``bias_q`` would not fit (a tiny input scale: ``|b| / (s_in s_w) > 2^31 - 1``), the weight scale of
    that channel (of the tensor, for per-tensor weights) is first raised as ONNX Runtime's ``quantize_static``
    does (:func:`~nanoopt.spec.bias_fitting_weight_scale`: the smallest float32 ``>= 1.0001 |b| / (s_in L)``),
    and that channel's weights are quantized on the raised scale, with a ``UserWarning`` naming the layer
    (``name``). Its weights are then coarser, by at most ``K |b| 2^-25`` in the output (``K`` the fan-in), far
    below the bias; every other channel is unchanged.
    """
    if weight_qparams.spec.symmetric is False or np.any(weight_qparams.zero_point != 0):
        raise ValueError(f"weights must be quantized symmetrically (zero point 0), got {weight_qparams.spec}")
    if not (input_qparams.spec.signed and output_qparams.spec.signed):
        raise ValueError("the integer kernels take signed activations; got input "
                         f"{input_qparams.spec} and output {output_qparams.spec}")
    if input_qparams.spec.bits > 8 and input_qparams.zero != 0:
        raise ValueError(f"16-bit inputs must have zero point 0, got {input_qparams.zero}")
    if bias is not None:
        weight_qparams = _bias_fitting(weight_qparams, np.asarray(bias, np.float64), input_qparams, name)
    weight_codes = weight_qparams.quantize(np.asarray(weight, np.float32))
    channels = weight_codes.shape[0]
    weight_scale = np.ascontiguousarray(np.broadcast_to(weight_qparams.scale, (channels,)), dtype=np.float32)
    m0, shift = requantization_multipliers(input_qparams.scale, weight_scale, output_qparams.scale)
    bias_codes = None
    if bias is not None:
        bias_codes = quantize_bias(np.asarray(bias, np.float64), input_qparams.scale, weight_scale,
                                   dtype=bias_dtype(input_qparams.spec))
    return IntegerLayer(np.ascontiguousarray(weight_codes), weight_scale, bias_codes,
                        np.asarray(m0, np.int32), np.asarray(shift, np.int32), input_qparams, output_qparams, relu)


def _bias_fitting(weight_qparams: QParams, bias: np.ndarray, input_qparams: QParams, name: str) -> QParams:
    """``weight_qparams`` with the scales raised where the bias would not fit (:func:`integer_layer`)."""
    dtype = bias_dtype(input_qparams.spec)
    old = np.asarray(weight_qparams.scale, np.float32)
    scale, adjusted = bias_fitting_weight_scale(bias, input_qparams.scale, old, dtype=dtype)
    if not np.any(adjusted):
        return weight_qparams
    ratio = scale.astype(np.float64) / old.astype(np.float64)
    where = f"layer {name!r}" if name else "a layer"
    count = f"{int(adjusted.sum())} of {bias.size} output channels" if old.ndim else "its per-tensor weight scale"
    warnings.warn(f"quant: {where}: the bias does not fit {dtype} on the grid input_scale * weight_scale "
                  f"(input_scale {float(input_qparams.scale):.4g}); weight scale raised for {count} (ONNX Runtime's "
                  f"adjustment for int32 bias), by up to {ratio.max():.6g}x (from {float(old[adjusted].max()):.6g} "
                  f"to {float(scale[adjusted].max()):.6g}). A tiny input scale comes from tiny calibration "
                  "inputs: check the calibration data", UserWarning, stacklevel=3)
    return QParams(scale, weight_qparams.zero_point, weight_qparams.spec)


def _epilogue(acc: np.ndarray, layer: IntegerLayer, channel_axis: int) -> np.ndarray:
    """``acc + bias`` -> :func:`~nanoopt.spec.requantize` per channel -> optional ReLU clamp."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    if layer.bias is not None:
        acc = acc + layer.bias.astype(np.int64).reshape(shape)
    out_spec = layer.output.spec
    out = requantize(acc, layer.m0.reshape(shape), layer.shift.reshape(shape), layer.output.zero, out_spec)
    if layer.relu:
        out = np.maximum(out, out_spec.dtype.type(layer.output.zero))
    return out


def _integer_matmul(a: np.ndarray, b: np.ndarray, exact_in_float64: bool) -> np.ndarray:
    """``a @ b`` of integer-valued float64 (or int64) operands, returned as exact int64."""
    if exact_in_float64:
        return np.matmul(a, b).astype(np.int64)  # every partial sum is an integer < 2^53: no rounding
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def emulate_linear(x_q: np.ndarray, layer: IntegerLayer) -> np.ndarray:
    """The integer linear layer on codes ``x_q (..., K)``: ``(..., N)`` codes of ``layer.output.spec``."""
    if x_q.dtype != layer.input.spec.dtype:
        raise TypeError(f"x_q must have dtype {layer.input.spec.dtype}, got {x_q.dtype}")
    exact = layer.exact_in_float64
    kind = np.float64 if exact else np.int64
    centred = x_q.astype(kind) - layer.input.zero  # (..., K)
    acc = _integer_matmul(centred, layer.weight.astype(kind).T, exact)  # (..., N)
    return _epilogue(acc, layer, -1)


def emulate_conv2d(x_q: np.ndarray, layer: IntegerLayer, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], groups: int) -> np.ndarray:
    """The integer 2-D convolution on NCHW codes (padding holds the input zero point, i.e. real zero)."""
    if x_q.dtype != layer.input.spec.dtype:
        raise TypeError(f"x_q must have dtype {layer.input.spec.dtype}, got {x_q.dtype}")
    out_channels, group_channels, kh, kw = layer.weight.shape
    cols = reference.im2col(x_q, (kh, kw), stride, padding, dilation, layer.input.zero)  # (N, C, KH, KW, OH, OW)
    batch, out_h, out_w = x_q.shape[0], cols.shape[4], cols.shape[5]
    exact = layer.exact_in_float64
    kind = np.float64 if exact else np.int64
    cols = cols.reshape(batch, groups, group_channels * kh * kw, out_h * out_w).astype(kind) - layer.input.zero
    weights = layer.weight.reshape(groups, out_channels // groups, group_channels * kh * kw).astype(kind)
    acc = _integer_matmul(weights[None], cols, exact)  # (N, G, OC / G, OH * OW)
    return _epilogue(acc.reshape(batch, out_channels, out_h, out_w), layer, 1)
