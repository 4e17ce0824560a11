"""Export nanoopt models to ONNX (optional extra ``onnx``): float models, and integer models as QDQ ONNX.

The model runs once on ``example_input`` with hooks on its leaf modules (as quantization's tracer does), which
gives the data flow; each leaf call becomes one or a few ONNX nodes (https://onnx.ai/onnx/operators/):

* **float**: Linear -> Gemm (2-D input) or MatMul + Add; Conv2d -> Conv; BatchNorm -> BatchNormalization (running
  statistics, ONNX momentum ``1 - m``); LayerNorm -> LayerNormalization; ReLU/Sigmoid/Tanh/GELU; MaxPool2d,
  AvgPool2d (``count_include_pad=1``, as nanoopt counts padded zeros), AdaptiveAvgPool2d -> GlobalAveragePool or
  an equal-bin AveragePool; Flatten; Add; and the ONNX-import modules back to their operators. A pruned layer's
  effective weight ``weight_orig * weight_mask`` is exported, so its zeros are in the file.
* **integer** (:class:`~nanoopt.quant.QuantizedModel`) as QDQ, the form ONNX Runtime fuses into its integer
  kernels (QLinearConv, QLinearMatMul, ...): the input is ``QuantizeLinear``-ed on the model's input grid; every
  integer layer reads ``DequantizeLinear(x_q)``, its weight as ``DequantizeLinear(w_q, s_w, 0, axis=0)`` (one scale
  per output channel, the axis ONNX Conv/Gemm(transB) put output channels on), its int32 bias as
  ``DequantizeLinear(b_q, s_in * s_w, 0, axis=0)``, runs the float operator, a fused ReLU as ``Relu``, and
  ``QuantizeLinear``-s onto its output grid. Max pooling, ReLU (``Max(q, zero_point)``) and Flatten act on codes
  directly; int8 average pooling is written in exact integer operators (see below) in both forms, since a float
  ``AveragePool`` between Dequantize and Quantize rounds window means ending in .5 to even where nanoopt rounds
  them away from zero. Weights of 4 bits or fewer are stored as ONNX ``INT4`` (opset 21), so the file shrinks
  below int8.
* **weight-only** (``quant.quantize_weights``) layers: ``DequantizeLinear`` of the codes with ONNX block
  quantization (``block_size`` = the group size, opset 21; INT4 for 4 bits or fewer) feeding the float operator.

With ``quant_format="qoperator"`` (int8 activations) the integer layers are written as ONNX integer operators
that compute exactly what nanoopt's kernels compute, so ONNX Runtime reproduces the integer model bit for bit:
``ConvInteger`` / ``MatMulInteger`` accumulate ``(x - x_zp) w`` exactly, the int32 bias is added, and the fixed-point
requantization ``M0 2^-shift`` (SaturatingRoundingDoublingHighMul, RoundingDivideByPOT; Jacob et al. 2018) is
written out in int64 ``Mul``/``Mod``/``Div``/``Where`` nodes whose divisions are all exact; average pooling is a
depthwise ``ConvInteger`` with a kernel of ones and a rounded division; residual additions are TFLite's integer ADD.
Max pooling, ReLU and Flatten work on codes in both forms.

Where ONNX Runtime's integer arithmetic is not ours: it requantizes with a float multiplier ``s_in s_w / s_out``
where nanoopt uses the fixed-point ``M0 2^-shift`` (Jacob et al. 2018), and rounds some intermediate results
(average pooling, additions) in float; outputs can then differ by one quantization step. :func:`compare` counts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.interop import onnx_modules as om
from nanoopt.interop.onnx_import import require_onnx
from nanoopt.kernels.reference import add_multipliers
from nanoopt.nn.graph import hooks
from nanoopt.quant.dynamic import WeightOnlyConv2d, WeightOnlyLinear, _WeightOnly
from nanoopt.quant.qmodules import (
    FloatFallback,
    QuantizedAdd,
    QuantizedAvgPool2d,
    QuantizedConv2d,
    QuantizedFlatten,
    QuantizedLinear,
    QuantizedMaxPool2d,
    QuantizedModel,
    QuantizedModule,
    QuantizedReLU,
)
from nanoopt.tensor import Tensor, no_grad

__all__ = ["OnnxExportError", "compare", "export"]

DEFAULT_OPSET = 21


class OnnxExportError(ValueError):
    """The model holds something this exporter cannot write (the message names the layer)."""


def _is_leaf(module: nn.Module) -> bool:
    return isinstance(module, QuantizedModule | _WeightOnly) or not list(module.children())


def _trace(model: nn.Module, example: Any) -> tuple[list[tuple[str, nn.Module, list[int], Any]], Any]:
    """Leaf calls in order as (name, module, ids of the inputs, output); inputs may be Tensors or arrays."""
    calls: list[tuple[str, nn.Module, list[int], Any]] = []
    names: dict[int, str] = {}

    def collect(module: nn.Module, prefix: str) -> None:  # a leaf's own children (a float fallback's) are its own
        if _is_leaf(module):
            names.setdefault(id(module), prefix)
            return
        for child_name, child in module.named_children():
            collect(child, f"{prefix}.{child_name}" if prefix else child_name)

    collect(model, "")
    leaves = [m for _, m in model.named_modules() if id(m) in names]
    seen: set[int] = set()
    keep: list[Any] = [example]

    def before(name: str, module: nn.Module, inputs: tuple) -> None:
        if id(module) in seen:
            raise OnnxExportError(f"module {names[id(module)]!r} ({type(module).__name__}) is called more than once; "
                                  "export needs one module per call")
        seen.add(id(module))

    def after(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        keep.extend(inputs)
        keep.append(output)
        calls.append((name, module, [id(i) for i in inputs], output))

    with hooks({names[id(leaf)]: leaf for leaf in leaves}, before=before, after=after), no_grad():
        output = model(example)
    return calls, output


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, opset: int, quant_format: str = "qdq") -> None:
        self.onnx = require_onnx()
        self.quant_format = quant_format
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.used: set[str] = set()
        self.small_constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        base = hint.replace(".", "_") or "v"
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def const(self, array: Any, hint: str) -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self.small_constants:  # one initializer per small value (scalars, shifts)
            return self.small_constants[key]
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        if key is not None:
            self.small_constants[key] = name
        return name

    def int4_const(self, codes: np.ndarray, hint: str) -> str:
        """Signed 4-bit codes stored as ONNX INT4 (two per byte in the file)."""
        if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
            raise OnnxExportError(f"{hint}: codes outside [-8, 7] cannot be stored as INT4")
        name = self.fresh(hint)
        nibbles = codes.astype(np.int8).reshape(-1).view(np.uint8) & 0x0F
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)     # element 2i in the low nibble
        tensor = self.helper.make_tensor(name, self.onnx.TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)
        self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        output = self.fresh(hint)
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=self.fresh(f"{hint}_{op}"), **attributes))
        return output

    def require(self, opset: int, what: str) -> None:
        if self.opset < opset:
            raise OnnxExportError(f"{what} needs opset >= {opset}, export was asked for opset {self.opset}")


# ------------------------------------------------------------------------------------------------ float layers
def _array(value: Any) -> np.ndarray:
    return np.asarray(value.data if isinstance(value, Tensor) else value, dtype=np.float32)


def _linear(g: _Graph, x: str, weight: str, bias: str | None, rank: int, name: str) -> str:
    """``x W^T + b`` with W (N, K) given as an ONNX value."""
    if rank == 2:
        return g.node("Gemm", [x, weight] + ([bias] if bias else []), name, transB=1)
    out = g.node("MatMul", [x, g.node("Transpose", [weight], f"{name}_wt", perm=[1, 0])], name)
    return g.node("Add", [out, bias], f"{name}_bias") if bias else out


def _conv_attributes(stride, padding, dilation, groups) -> dict[str, Any]:
    return dict(strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
                dilations=list(dilation), group=int(groups))


def _emit_float(g: _Graph, module: nn.Module, inputs: list[str], shapes: list[tuple], name: str) -> str:
    """One float leaf module as ONNX nodes; returns the output value's name."""
    x = inputs[0] if inputs else ""
    if isinstance(module, nn.Linear):
        bias = g.const(_array(module.bias), f"{name}.bias") if module.bias is not None else None
        return _linear(g, x, g.const(_array(module.weight), f"{name}.weight"), bias, len(shapes[0]), name)
    if isinstance(module, nn.Conv2d):
        args = [x, g.const(_array(module.weight), f"{name}.weight")]
        if module.bias is not None:
            args.append(g.const(_array(module.bias), f"{name}.bias"))
        return g.node("Conv", args, name, **_conv_attributes(module.stride, module.padding, module.dilation,
                                                              module.groups))
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if not module.track_running_stats:
            raise OnnxExportError(f"layer {name!r}: BatchNorm without running statistics cannot be exported")
        c = module.num_features
        weight = _array(module.weight) if module.affine else np.ones(c, np.float32)
        bias = _array(module.bias) if module.affine else np.zeros(c, np.float32)
        args = [x, g.const(weight, f"{name}.weight"), g.const(bias, f"{name}.bias"),
                g.const(module.running_mean.astype(np.float32), f"{name}.running_mean"),
                g.const(module.running_var.astype(np.float32), f"{name}.running_var")]
        momentum = 0.9 if module.momentum is None else 1.0 - module.momentum
        return g.node("BatchNormalization", args, name, epsilon=float(module.eps), momentum=float(momentum))
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        weight = _array(module.weight) if module.elementwise_affine else np.ones(shape, np.float32)
        bias = _array(module.bias) if module.elementwise_affine else np.zeros(shape, np.float32)
        return g.node("LayerNormalization", [x, g.const(weight, f"{name}.weight"), g.const(bias, f"{name}.bias")],
                      name, axis=-len(shape), epsilon=float(module.eps))
    simple = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Identity: "Identity",
              nn.Dropout: "Identity"}
    for kind, op in simple.items():
        if type(module) is kind:
            return g.node(op, [x], name)
    if isinstance(module, nn.GELU):
        g.require(20, f"layer {name!r} (GELU)")
        return g.node("Gelu", [x], name, approximate=module.approximate)
    if type(module) is nn.AvgPool2d:  # before MaxPool2d: AvgPool2d may subclass it
        return g.node("AveragePool", [x], name, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                      pads=[*module.padding, *module.padding], count_include_pad=1)
    if type(module) is nn.MaxPool2d:
        return g.node("MaxPool", [x], name, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                      pads=[*module.padding, *module.padding])
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return _adaptive_pool(g, x, module.output_size, shapes[0], name)
    if isinstance(module, nn.Flatten):
        if module.start_dim == 1:
            return g.node("Flatten", [x], name, axis=1)
        return g.node("Reshape", [x, g.const(np.array([0] * module.start_dim + [-1], np.int64), f"{name}.shape")],
                      name)
    if isinstance(module, nn.Add):
        return g.node("Add", inputs[:2], name)
    return _emit_imported(g, module, inputs, shapes, name)


def _adaptive_pool(g: _Graph, x: str, output_size: tuple[int, int], shape: tuple, name: str) -> str:
    if tuple(output_size) == (1, 1):
        return g.node("GlobalAveragePool", [x], name)
    h, w = shape[2], shape[3]
    if h % output_size[0] or w % output_size[1]:
        raise OnnxExportError(f"layer {name!r}: adaptive pooling of {h}x{w} to {output_size} has unequal bins")
    kernel = [h // output_size[0], w // output_size[1]]
    return g.node("AveragePool", [x], name, kernel_shape=kernel, strides=kernel)


def _emit_imported(g: _Graph, module: nn.Module, inputs: list[str], shapes: list[tuple], name: str) -> str:
    """The modules of :mod:`nanoopt.interop.onnx_modules` back to their ONNX operators."""
    x = inputs[0] if inputs else ""
    ops = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
    if isinstance(module, om.Clip):
        bounds = [g.const(np.float32(v), f"{name}.{w}") if v is not None else ""
                  for v, w in ((module.low, "min"), (module.high, "max"))]
        return g.node("Clip", [x, *bounds], name)
    if isinstance(module, om.Softmax):
        if module.coerce_2d:
            flat = g.node("Flatten", [x], f"{name}_2d", axis=module.axis)
            soft = g.node("Softmax", [flat], f"{name}_softmax", axis=-1)
            return g.node("Reshape", [soft, g.node("Shape", [x], f"{name}_shape")], name)
        return g.node("Softmax", [x], name, axis=module.axis)
    if isinstance(module, om.Reshape):
        return g.node("Reshape", [x, g.const(np.array(module.shape, np.int64), f"{name}.shape")], name,
                      allowzero=int(module.allowzero))
    if isinstance(module, om.OnnxFlatten):
        return g.node("Flatten", [x], name, axis=module.axis)
    if isinstance(module, om.Transpose):
        return g.node("Transpose", [x], name, **({} if module.perm is None else {"perm": list(module.perm)}))
    if isinstance(module, om.Pad2d):
        top, bottom, left, right = module.padding
        rank = len(shapes[0])
        pads = [0] * (rank - 2) + [top, left] + [0] * (rank - 2) + [bottom, right]
        return g.node("Pad", [x, g.const(np.array(pads, np.int64), f"{name}.pads"),
                              g.const(np.float32(module.value), f"{name}.value")], name)
    if isinstance(module, om.Binary):
        return g.node(ops[module.op], inputs[:2], name)
    if isinstance(module, om.ConstantBinary):
        c = g.const(module.constant, f"{name}.constant")
        return g.node(ops[module.op], [c, x] if module.constant_first else [x, c], name)
    if isinstance(module, om.MatMul):
        return g.node("MatMul", inputs[:2], name)
    if isinstance(module, om.Concat):
        runtime = iter(inputs)
        parts = [g.const(getattr(module, f"constant_{i}"), f"{name}.constant_{i}") if i in module.constant_slots
                 else next(runtime) for i in range(max(module.slots, len(inputs) + len(module.constant_slots)))]
        return g.node("Concat", parts, name, axis=module.axis)
    if isinstance(module, WeightOnlyLinear | WeightOnlyConv2d):
        return _emit_weight_only(g, module, x, shapes[0], name)
    raise OnnxExportError(f"layer {name!r} ({type(module).__name__}) has no ONNX export")


# ------------------------------------------------------------------------------------------------ integer layers
_ONNX_INT = {np.dtype(np.int8): "INT8", np.dtype(np.uint8): "UINT8", np.dtype(np.int16): "INT16",
             np.dtype(np.uint16): "UINT16"}


def _zero_point(g: _Graph, zero_point: Any, dtype: np.dtype, hint: str) -> str:
    if np.dtype(dtype) in (np.dtype(np.int16), np.dtype(np.uint16)):
        g.require(21, f"{hint}: 16-bit quantized activations")
    return g.const(np.asarray(zero_point).astype(dtype), hint)


def _quantize(g: _Graph, x: str, scale: Any, zero_point: Any, dtype: np.dtype, name: str) -> str:
    return g.node("QuantizeLinear", [x, g.const(np.float32(np.asarray(scale).reshape(())), f"{name}.scale"),
                                     _zero_point(g, np.asarray(zero_point).reshape(()), dtype, f"{name}.zero_point")],
                  f"{name}_q")


def _dequantize(g: _Graph, x_q: str, scale: Any, zero_point: Any, dtype: np.dtype, name: str) -> str:
    return g.node("DequantizeLinear", [x_q, g.const(np.float32(np.asarray(scale).reshape(())), f"{name}.scale"),
                                       _zero_point(g, np.asarray(zero_point).reshape(()), dtype,
                                                   f"{name}.zero_point")], f"{name}_dq")


def _weight(g: _Graph, codes: np.ndarray, scale: np.ndarray, name: str) -> str:
    """``DequantizeLinear(w_q, s_w, 0, axis=0)``: int8, or INT4 when every code fits in 4 bits."""
    scale = np.asarray(scale, np.float32).reshape(-1)
    if int(np.abs(codes).max(initial=0)) <= 7:
        g.require(21, f"layer {name!r}: INT4 weights")
        stored = g.int4_const(codes, f"{name}.weight_q")
        zero_name = g.int4_const(np.zeros(scale.shape, np.int8), f"{name}.weight_zero_point")
    else:
        stored = g.const(codes.astype(np.int8), f"{name}.weight_q")
        zero_name = g.const(np.zeros(scale.shape, np.int8), f"{name}.weight_zero_point")
    return g.node("DequantizeLinear", [stored, g.const(scale, f"{name}.weight_scale"), zero_name],
                  f"{name}_weight", axis=0)


def _emit_integer(g: _Graph, module: nn.Module, inputs: list[str], shapes: list[tuple], name: str) -> str:
    """One module of a converted model: codes in, codes out."""
    x = inputs[0] if inputs else ""
    if g.quant_format == "qoperator" or isinstance(module, QuantizedAvgPool2d) and module.input_spec.dtype == np.int8:
        # average pooling is written exactly in both forms: DequantizeLinear -> AveragePool -> QuantizeLinear would
        # round a window mean ending in .5 to even, nanoopt (and TFLite) away from zero: a step off for a quarter
        # of the outputs of a 2x2 pool
        written = _emit_integer_operator(g, module, inputs, shapes, name)
        if written is not None:
            return written
    if isinstance(module, QuantizedLinear | QuantizedConv2d):
        ispec, ospec = module.input_spec, module.output_spec
        xf = _dequantize(g, x, module.input_scale, module.input_zero_point, ispec.dtype, f"{name}.input")
        weight = _weight(g, module.weight, module.weight_scale, name)
        bias = None
        if module.bias is not None:
            bias_scale = (np.float32(module.input_scale) * module.weight_scale.astype(np.float32)).astype(np.float32)
            if module.bias.dtype == np.int32:
                bias = g.node("DequantizeLinear", [g.const(module.bias, f"{name}.bias_q"),
                                                   g.const(bias_scale, f"{name}.bias_scale"),
                                                   g.const(np.zeros(bias_scale.shape, np.int32),
                                                           f"{name}.bias_zero_point")], f"{name}_bias", axis=0)
            else:  # 64-bit bias (16x8 mode): ONNX DequantizeLinear has no int64 input; store the real values
                bias = g.const((module.bias.astype(np.float64) * bias_scale).astype(np.float32), f"{name}.bias")
        if isinstance(module, QuantizedLinear):
            y = _linear(g, xf, weight, bias, len(shapes[0]), name)
        else:
            y = g.node("Conv", [xf, weight] + ([bias] if bias else []), name,
                       **_conv_attributes(module.stride, module.padding, module.dilation, module.groups))
        if module.relu:
            y = g.node("Relu", [y], f"{name}_relu")
        return _quantize(g, y, module.output_scale, module.output_zero_point, ospec.dtype, f"{name}.output")
    if isinstance(module, QuantizedAdd):
        a = _dequantize(g, inputs[0], module.first_scale, module.first_zero_point, module.first_spec.dtype,
                        f"{name}.first")
        b = _dequantize(g, inputs[1], module.second_scale, module.second_zero_point, module.second_spec.dtype,
                        f"{name}.second")
        y = g.node("Add", [a, b], name)
        if module.relu:
            y = g.node("Relu", [y], f"{name}_relu")
        return _quantize(g, y, module.output_scale, module.output_zero_point, module.output_spec.dtype,
                         f"{name}.output")
    if isinstance(module, QuantizedMaxPool2d):  # on codes: max commutes with a monotone dequantization
        return g.node("MaxPool", [x], name, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                      pads=[*module.padding, *module.padding])
    if isinstance(module, QuantizedAvgPool2d):
        xf = _dequantize(g, x, module.input_scale, module.input_zero_point, module.input_spec.dtype, f"{name}.input")
        if module.output_size is not None:
            y = _adaptive_pool(g, xf, module.output_size, shapes[0], name)
        else:
            y = g.node("AveragePool", [xf], name, kernel_shape=list(module.kernel_size),
                       strides=list(module.stride), pads=[*module.padding, *module.padding], count_include_pad=1)
        return _quantize(g, y, module.input_scale, module.input_zero_point, module.input_spec.dtype, f"{name}.output")
    if isinstance(module, QuantizedReLU):  # max(q, zero_point), on codes
        zero = g.const(np.asarray(module.input_zero_point).astype(module.input_spec.dtype).reshape(()),
                       f"{name}.zero_point")
        return g.node("Max", [x, zero], name)
    if isinstance(module, QuantizedFlatten):
        if module.start_dim == 1:
            return g.node("Flatten", [x], name, axis=1)
        return g.node("Reshape", [x, g.const(np.array([0] * module.start_dim + [-1], np.int64), f"{name}.shape")],
                      name)
    if isinstance(module, FloatFallback):
        floats = [_dequantize(g, value, getattr(module, f"input{i}_scale"), getattr(module, f"input{i}_zero_point"),
                              getattr(module, f"input{i}_spec").dtype, f"{name}.input{i}")
                  for i, value in enumerate(inputs)]
        if list(module.float_module.children()):
            raise OnnxExportError(f"layer {name!r}: float fallback of a composite module "
                                  f"({type(module.float_module).__name__}) cannot be exported")
        float_shapes = shapes
        y = _emit_float(g, module.float_module, floats, float_shapes, f"{name}.float")
        return _quantize(g, y, module.output_scale, module.output_zero_point, module.output_spec.dtype,
                         f"{name}.output")
    if isinstance(module, nn.Identity | nn.Dropout):
        return g.node("Identity", [x], name)
    raise OnnxExportError(f"layer {name!r} ({type(module).__name__}) of the integer model has no ONNX export")


def _i64(g: _Graph, value: Any, hint: str) -> str:
    return g.const(np.asarray(value, dtype=np.int64), hint)


def _multiply_by_quantized_multiplier(g: _Graph, x: str, m0: Any, shift: Any, shape: tuple, name: str) -> str:
    """TFLite's ``MultiplyByQuantizedMultiplier`` on int64 values that hold int32 numbers, in exact integer ONNX
    operators (the formula of :func:`nanoopt.spec.multiply_by_quantized_multiplier`):

    ``x' = clip(x * 2^left, int32)``; ``p = x' m0``; ``t = p + (2^30 if p >= 0 else 1 - 2^30)``;
    ``high = t / 2^31`` truncated toward zero (gemmlowp's SaturatingRoundingDoublingHighMul; ``m0 > 0`` so it never
    saturates); then RoundingDivideByPOT: ``r = high mod 2^right``, ``(high - r) / 2^right + (r > (2^right - 1) /
    2 + (high < 0))``. Every division is of an exact multiple, so no integer-division rounding convention matters.
    """
    m0 = np.asarray(m0, np.int64).reshape(shape)
    shift = np.asarray(shift, np.int64).reshape(shape)
    left, right = np.maximum(-shift, 0), np.maximum(shift, 0)
    info = np.iinfo(np.int32)
    bool_to_int = dict(to=g.onnx.TensorProto.INT64)
    scaled = g.node("Clip", [g.node("Mul", [x, _i64(g, np.left_shift(1, left), f"{name}.left")], f"{name}_left"),
                             _i64(g, info.min, f"{name}.int32_min"), _i64(g, info.max, f"{name}.int32_max")],
                    f"{name}_saturated")
    product = g.node("Mul", [scaled, _i64(g, m0, f"{name}.m0")], f"{name}_product")
    nudge = g.node("Where", [g.node("GreaterOrEqual", [product, _i64(g, 0, f"{name}.zero")], f"{name}_nonneg"),
                             _i64(g, 1 << 30, f"{name}.nudge_pos"), _i64(g, 1 - (1 << 30), f"{name}.nudge_neg")],
                   f"{name}_nudge")
    total = g.node("Add", [product, nudge], f"{name}_nudged")
    two31 = _i64(g, 1 << 31, f"{name}.two31")
    remainder = g.node("Mod", [total, two31], f"{name}_rem31")                       # in [0, 2^31)
    floor = g.node("Div", [g.node("Sub", [total, remainder], f"{name}_floor_multiple"), two31], f"{name}_floor")
    negative_inexact = g.node("And", [g.node("Less", [total, _i64(g, 0, f"{name}.zero_t")], f"{name}_neg"),
                                      g.node("Greater", [remainder, _i64(g, 0, f"{name}.zero_r")], f"{name}_inexact")],
                              f"{name}_toward_zero")
    high = g.node("Add", [floor, g.node("Cast", [negative_inexact], f"{name}_toward_zero_i64", **bool_to_int)],
                  f"{name}_high")
    power = _i64(g, np.left_shift(1, right), f"{name}.pow")
    rem = g.node("Mod", [high, power], f"{name}_rem")
    threshold = g.node("Add", [_i64(g, (np.left_shift(1, right) - 1) >> 1, f"{name}.half_mask"),
                               g.node("Cast", [g.node("Less", [high, _i64(g, 0, f"{name}.zero_h")], f"{name}_hneg")],
                                      f"{name}_hneg_i64", **bool_to_int)], f"{name}_threshold")
    quotient = g.node("Div", [g.node("Sub", [high, rem], f"{name}_pot_multiple"), power], f"{name}_quotient")
    round_up = g.node("Cast", [g.node("Greater", [rem, threshold], f"{name}_round_up")], f"{name}_round_up_i64",
                      **bool_to_int)
    return g.node("Add", [quotient, round_up], f"{name}_mbqm")


def _to_codes(g: _Graph, value: str, zero_point: int, relu: bool, name: str) -> str:
    """``clip(value + zp, -128, 127)`` as int8 (value: int64), then ``max(q, zp)`` for a fused ReLU."""
    info = np.iinfo(np.int8)
    shifted = g.node("Add", [value, _i64(g, zero_point, f"{name}.zero_point")], f"{name}_plus_zp")
    clipped = g.node("Clip", [shifted, _i64(g, info.min, f"{name}.qmin"), _i64(g, info.max, f"{name}.qmax")],
                     f"{name}_clipped")
    codes = g.node("Cast", [clipped], f"{name}_q", to=g.onnx.TensorProto.INT8)
    if relu:
        codes = g.node("Max", [codes, g.const(np.int8(zero_point), f"{name}.relu_floor")], f"{name}_relu")
    return codes


def _check_int8(specs: list, name: str) -> None:
    if any(np.dtype(spec.dtype) != np.int8 for spec in specs):
        raise OnnxExportError(f"layer {name!r}: the integer-operator form covers int8 activations; export "
                              f"{', '.join(str(np.dtype(s.dtype)) for s in specs)} activations with quant_format='qdq'")


def _emit_integer_operator(g: _Graph, module: nn.Module, inputs: list[str], shapes: list[tuple],
                           name: str) -> str | None:
    """The integer-operator form of one layer, bit-exact with nanoopt's kernels; None: use the QDQ form.

    Linear / Conv2d: ``MatMulInteger`` / ``ConvInteger`` give the exact int32 ``sum (x - x_zp) w``; the int32 bias
    is added; the fixed-point requantization is written out (:func:`_multiply_by_quantized_multiplier`).
    Average pooling: a depthwise ``ConvInteger`` with a kernel of ones sums ``q - zp`` per window (the padding
    holds ``zp``), divided by the window size rounding half away from zero. Add: TFLite's integer ADD.
    """
    x = inputs[0] if inputs else ""
    cast64 = dict(to=g.onnx.TensorProto.INT64)
    if isinstance(module, QuantizedLinear | QuantizedConv2d):
        _check_int8([module.input_spec, module.output_spec], name)
        zero_in = g.const(np.int8(int(module.input_zero_point)), f"{name}.input_zero_point")
        if isinstance(module, QuantizedConv2d):
            acc = g.node("ConvInteger", [x, g.const(module.weight.astype(np.int8), f"{name}.weight_q"), zero_in],
                         f"{name}_acc", **_conv_attributes(module.stride, module.padding, module.dilation,
                                                           module.groups))
            channel_shape: tuple = (1, -1, 1, 1)
        else:
            weight = g.const(np.ascontiguousarray(module.weight.T.astype(np.int8)), f"{name}.weight_q_t")  # (K, N)
            acc = g.node("MatMulInteger", [x, weight, zero_in], f"{name}_acc")
            channel_shape = (-1,)
        acc = g.node("Cast", [acc], f"{name}_acc64", **cast64)
        if module.bias is not None:
            acc = g.node("Add", [acc, _i64(g, module.bias.reshape(channel_shape), f"{name}.bias_q")], f"{name}_biased")
        scaled = _multiply_by_quantized_multiplier(g, acc, module.m0, module.shift, channel_shape, name)
        return _to_codes(g, scaled, int(module.output_zero_point), module.relu, f"{name}.output")
    if isinstance(module, QuantizedAvgPool2d):
        _check_int8([module.input_spec], name)
        channels = shapes[0][1]
        if module.output_size is not None:
            kernel = (shapes[0][2] // module.output_size[0], shapes[0][3] // module.output_size[1])
            stride, padding = kernel, (0, 0)
        else:
            kernel, stride, padding = module.kernel_size, module.stride, module.padding
        zp = int(module.input_zero_point)
        ones = g.const(np.ones((channels, 1, *kernel), np.int8), f"{name}.window")
        total = g.node("Cast", [g.node("ConvInteger", [x, ones, g.const(np.int8(zp), f"{name}.zero_point_in")],
                                       f"{name}_sum", **_conv_attributes(stride, padding, (1, 1), channels))],
                       f"{name}_sum64", **cast64)
        count = int(kernel[0] * kernel[1])
        half, divisor = _i64(g, count // 2, f"{name}.half"), _i64(g, count, f"{name}.count")
        positive = g.node("Div", [g.node("Add", [total, half], f"{name}_pos_num"), divisor], f"{name}_pos")
        negated = g.node("Neg", [total], f"{name}_negated")
        negative = g.node("Neg", [g.node("Div", [g.node("Add", [negated, half], f"{name}_neg_num"), divisor],
                                         f"{name}_neg_div")], f"{name}_neg")
        mean = g.node("Where", [g.node("GreaterOrEqual", [total, _i64(g, 0, f"{name}.zero")], f"{name}_nonneg"),
                                positive, negative], f"{name}_mean")
        return _to_codes(g, mean, zp, False, f"{name}.output")
    if isinstance(module, QuantizedAdd):
        _check_int8([module.first_spec, module.second_spec, module.output_spec], name)
        left, (m_a, s_a), (m_b, s_b), (m_out, s_out) = add_multipliers(
            module.first_scale, module.second_scale, module.output_scale, module.output_spec)
        parts = []
        for value, zp, m0, shift, which in ((inputs[0], module.first_zero_point, m_a, s_a, "first"),
                                            (inputs[1], module.second_zero_point, m_b, s_b, "second")):
            centred = g.node("Sub", [g.node("Cast", [value], f"{name}_{which}64", **cast64),
                                     _i64(g, int(zp), f"{name}.{which}_zero_point")], f"{name}_{which}_centred")
            shifted = g.node("Mul", [centred, _i64(g, 1 << left, f"{name}.{which}_left")], f"{name}_{which}_shifted")
            parts.append(_multiply_by_quantized_multiplier(g, shifted, m0, shift, (), f"{name}.{which}"))
        total = g.node("Add", parts, f"{name}_total")
        scaled = _multiply_by_quantized_multiplier(g, total, m_out, s_out, (), f"{name}.output_scale")
        return _to_codes(g, scaled, int(module.output_zero_point), module.relu, f"{name}.output")
    return None


def _emit_weight_only(g: _Graph, module: _WeightOnly, x: str, shape: tuple, name: str) -> str:
    """Weight-only layers: block-quantized ``DequantizeLinear`` (axis 1, ``block_size`` = the group size)."""
    g.require(21, f"layer {name!r}: block-quantized weights")
    codes = module.codes()                                     # (C_out, depth)
    scale = module.weight_scale.astype(np.float32)             # (C_out, groups)
    if module.bits <= 4:
        stored = g.int4_const(codes, f"{name}.weight_q")
    else:
        stored = g.const(codes.astype(np.int8), f"{name}.weight_q")
    weight = g.node("DequantizeLinear", [stored, g.const(scale, f"{name}.weight_scale")], f"{name}_weight2d",
                    axis=1, block_size=int(module.group_size))
    bias = g.const(module.bias, f"{name}.bias") if module.bias is not None else None
    if isinstance(module, WeightOnlyLinear):
        return _linear(g, x, weight, bias, len(shape), name)
    weight = g.node("Reshape", [weight, g.const(np.array(module.weight_shape, np.int64), f"{name}.weight_shape")],
                    f"{name}_weight")
    return g.node("Conv", [x, weight] + ([bias] if bias else []), name,
                  **_conv_attributes(module.stride, module.padding, module.dilation, module.groups))


# ------------------------------------------------------------------------------------------------ entry points
def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(np.shape(value.data if isinstance(value, Tensor) else value))


def _walk(g: _Graph, model: nn.Module, example: Any, emit: Callable, input_name: str) -> tuple[str, Any]:
    calls, output = _trace(model, example)
    value_names: dict[int, str] = {id(example): input_name}
    shapes: dict[int, tuple] = {id(example): _shape_of(example)}
    for name, module, input_ids, result in calls:
        missing = [i for i, value_id in enumerate(input_ids) if value_id not in value_names]
        if missing:
            raise OnnxExportError(f"input {missing[0]} of layer {name!r} ({type(module).__name__}) was computed "
                                  "outside any module (a functional operation in a forward?); export needs every "
                                  "operation to be a module (nn.Add, nn.ReLU, nn.Flatten, ...)")
        out = emit(g, module, [value_names[i] for i in input_ids], [shapes[i] for i in input_ids], name or "model")
        value_names[id(result)] = out
        shapes[id(result)] = _shape_of(result)
    if id(output) not in value_names:
        raise OnnxExportError("the model output was not produced by a module; export needs every operation to be "
                              "a module")
    return value_names[id(output)], output


def export(model: nn.Module, path: str | os.PathLike, example_input: Any, opset: int = DEFAULT_OPSET,
           input_name: str = "input", output_name: str = "output", quant_format: str = "qdq") -> Any:
    """Write ``model`` (float, or converted integer) to ``path`` as ONNX; returns the ``onnx.ModelProto``.

    ``example_input`` (a batch, ndarray or Tensor) is run once to find the data flow; the batch axis is exported
    as dynamic (``"N"``). The model is put in eval mode. An integer model is written as ``quant_format="qdq"``
    (QuantizeLinear/DequantizeLinear around float operators) or ``"qoperator"`` (ConvInteger/MatMulInteger with
    the requantization written out; int8 activations). See the module docstring for the operators written.

    >>> import os, tempfile, numpy as np, nanoopt as no
    >>> from nanoopt import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> [n.op_type for n in export(model, path, np.zeros((2, 4), np.float32)).graph.node]
    ['Gemm', 'Relu']
    """
    onnx = require_onnx()
    if quant_format not in ("qdq", "qoperator"):
        raise ValueError(f"export: quant_format must be 'qdq' or 'qoperator', got {quant_format!r}")
    g = _Graph(opset, quant_format)
    model.eval()
    x = np.asarray(example_input.data if isinstance(example_input, Tensor) else example_input, np.float32)
    if isinstance(model, QuantizedModel):
        codes = model.quantize_input(x)
        q_in = _quantize(g, input_name, model.input_scale, model.input_zero_point, model.input_spec.dtype, "input")
        last, output = _walk(g, model.model, codes, _emit_integer, q_in)
        if not isinstance(output, np.ndarray):
            raise OnnxExportError("the integer model's output is not an array of codes")
        result = g.node("DequantizeLinear", [last, g.const(np.float32(model.output_scale), "output.scale"),
                                             _zero_point(g, model.output_zero_point, model.output_spec.dtype,
                                                         "output.zero_point")], "output_dq")
        output = model.dequantize_output(output)
    else:
        if any(type(m).__name__.startswith("Simulated") or type(m).__name__ == "FakeQuantize" for m in model.modules()):
            raise OnnxExportError("a prepared (simulated-quantization) model cannot be exported: quant.convert it "
                                  "first, or export the float model")
        result, output = _walk(g, model, Tensor(x), _emit_float, input_name)
    producers = [n for n in g.nodes if result in n.output]
    if producers and not any(result in n.input for n in g.nodes):   # name the last node's output directly
        producers[0].output[list(producers[0].output).index(result)] = output_name
    else:
        g.nodes.append(g.helper.make_node("Identity", [result], [output_name], name="output_identity"))
    out_shape = ["N", *_shape_of(output)[1:]]
    graph = g.helper.make_graph(
        g.nodes, type(model).__name__,
        [g.helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["N", *x.shape[1:]])],
        [g.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, out_shape)], g.initializers)
    proto = g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", opset)],
                                producer_name="nanoopt")
    proto.ir_version = min(proto.ir_version, 10)   # readable by ONNX Runtime releases that predate the newest IR
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
    return proto


def compare(model: nn.Module, path: str | os.PathLike, inputs: np.ndarray, batch_size: int = 256) -> dict[str, Any]:
    """Run ``inputs`` through ``model`` and through ONNX Runtime on the file at ``path``, and say how they differ.

    Returns ``max_abs_diff``; ``argmax_agree`` (fraction of rows whose argmax agrees); for an integer model also
    ``max_steps`` (largest difference in output quantization steps) and ``differing`` (how many output elements
    differ at all) out of ``elements``.

    >>> import os, tempfile, numpy as np
    >>> from nanoopt import nn
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx"); _ = export(model, path, np.zeros((1, 4), np.float32))
    >>> compare(model, path, np.ones((5, 4), np.float32))["max_abs_diff"] < 1e-6
    True
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ours, theirs = [], []
    model.eval()
    for start in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[start:start + batch_size], np.float32)
        with no_grad():
            out = model(batch)
        ours.append(np.asarray(out.data if isinstance(out, Tensor) else out))
        theirs.append(session.run(None, {name: batch})[0])
    a, b = np.concatenate(ours), np.concatenate(theirs)
    report: dict[str, Any] = {
        "max_abs_diff": float(np.abs(a - b).max(initial=0.0)),
        "argmax_agree": float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean()),
        "elements": int(a.size),
    }
    if isinstance(model, QuantizedModel):
        steps = np.rint(np.abs(a.astype(np.float64) - b) / float(model.output_scale))
        report["max_steps"] = int(steps.max(initial=0))
        report["differing"] = int((steps > 0).sum())
    return report
