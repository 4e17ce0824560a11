"""Import a float ONNX graph as a nanoopt Module (optional extra ``onnx``: the ``onnx`` package parses the file).

Every operator becomes one leaf module with PyTorch-style parameters, so the imported model trains, prunes,
distils and quantizes like a model written in nanoopt: Conv -> :class:`~nanoopt.nn.Conv2d`, Gemm and MatMul with
a constant right operand -> :class:`~nanoopt.nn.Linear` (``y = alpha A B' + beta C`` folded into weight and bias),
BatchNormalization -> ``BatchNorm1d/2d`` (ONNX momentum ``m`` is PyTorch's ``1 - m``), LayerNormalization ->
:class:`~nanoopt.nn.LayerNorm`, Relu/Sigmoid/Tanh/Gelu, Clip, MaxPool/AveragePool/GlobalAveragePool,
Flatten/Reshape, Add/Sub/Mul/Div, Concat, Softmax, Transpose, Identity/Dropout. Operator semantics: the ONNX
specification (https://onnx.ai/onnx/operators/).

How the graph is read:

1. initializers and ``Constant`` nodes are constants; a node whose inputs are all constants is evaluated once at
   import (``onnx.reference``) and becomes a constant too;
2. a Reshape whose target shape is computed at run time (``x.view(x.size(0), -1)`` exports as
   Shape/Gather/Unsqueeze/Concat/Reshape) is resolved symbolically from the input shape when only the batch axis
   is dynamic;
3. nodes that no output depends on are dropped; a graph that is one chain becomes an
   :class:`~nanoopt.nn.Sequential`, anything else a :class:`~nanoopt.interop.onnx_modules.GraphModule`.

An operator outside this list, an attribute value we do not implement (e.g. ``ceil_mode`` that changes the output
size, asymmetric pooling pads), a shape we cannot resolve statically, or an opset outside
:data:`SUPPORTED_OPSETS` raises :class:`OnnxImportError` naming the node and its op type; nothing is built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.interop.onnx_modules import (
    Binary,
    Clip,
    Concat,
    ConstantBinary,
    GraphModule,
    MatMul,
    OnnxFlatten,
    Pad2d,
    Reshape,
    Softmax,
    Transpose,
)

__all__ = ["SUPPORTED_OPSETS", "OnnxImportError", "load", "require_onnx"]

SUPPORTED_OPSETS = range(7, 23)   # default-domain opsets whose semantics of the operators above we implement


class OnnxImportError(ValueError):
    """The ONNX graph uses something this importer does not implement (the message names the node and op)."""


def require_onnx() -> Any:
    """The ``onnx`` package, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("ONNX support needs the optional extra: pip install 'nanoopt[onnx]' "
                          "(the onnx and onnxruntime packages)") from None
    return onnx


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class _Importer:
    """One pass over a graph: constants, liveness, then one module per live runtime node."""

    def __init__(self, model: Any) -> None:
        onnx = require_onnx()
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        self.opset = self._default_opset(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - shape inference is a help, not a requirement
            inferred = model
        self.graph = model.graph
        self.shapes: dict[str, list[int | str | None]] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape"):
                self.shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                          for d in tensor_type.shape.dim]
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.inputs = [i.name for i in self.graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in self.graph.output]
        self.producers = {out: node for node in self.graph.node for out in node.output}

    def _default_opset(self, model: Any) -> int:
        versions = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        version = versions.get("ai.onnx")
        if version is None or version not in SUPPORTED_OPSETS:
            raise OnnxImportError(f"ONNX opset {version} of the default domain is not supported (supported: "
                                  f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})")
        return version

    # --------------------------------------------------------------------------------- helpers
    def where(self, node: Any) -> str:
        return f"node {node.name or '(unnamed)'!r} ({node.op_type})"

    def fail(self, node: Any, why: str) -> OnnxImportError:
        return OnnxImportError(f"{self.where(node)}: {why}")

    def const(self, node: Any, index: int, what: str, optional: bool = False) -> np.ndarray | None:
        if index >= len(node.input) or node.input[index] == "":
            if optional:
                return None
            raise self.fail(node, f"needs input {index} ({what})")
        name = node.input[index]
        if name not in self.constants:
            if optional and what.startswith("optional"):
                return None
            raise self.fail(node, f"input {index} ({what}, {name!r}) must be a constant (an initializer), "
                                  "not computed at run time")
        return self.constants[name]

    def shape_of(self, name: str) -> list[int | str | None] | None:
        return self.shapes.get(name)

    def symbolic(self, name: str, depth: int = 0) -> list[int | str] | None:
        """The value of a small integer tensor computed from shapes (Shape, Gather, Unsqueeze, Concat, ...), with
        symbolic dimensions as their names; None when it cannot be derived statically."""
        if name in self.constants:
            value = self.constants[name]
            return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" and value.ndim <= 1 else None
        node = self.producers.get(name)
        if node is None or depth > 20:
            return None
        a = _attributes(node)
        args = [self.symbolic(i, depth + 1) if node.op_type != "Shape" else None for i in node.input]
        if node.op_type == "Shape":
            shape = self.shape_of(node.input[0])
            if shape is None or any(d is None for d in shape):
                return None
            return list(shape)[a.get("start", 0):a.get("end", len(shape))]
        if any(v is None for v in args[:1]):
            return None
        if node.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze"):
            return args[0]
        if node.op_type == "Concat" and all(v is not None for v in args):
            return [d for v in args for d in v]
        if node.op_type == "Gather" and len(args) == 2 and args[1] is not None and int(a.get("axis", 0)) == 0:
            return [args[0][int(i)] for i in args[1]]
        if node.op_type == "Slice" and len(args) >= 3 and args[1] is not None and args[2] is not None:
            return args[0][args[1][0]:args[2][0]]
        return None

    # --------------------------------------------------------------------------------- graph walk
    def foldable(self, node: Any, constant_names: set[str]) -> bool:
        inputs = [i for i in node.input if i]
        return node.op_type == "Constant" or (bool(inputs) and all(i in constant_names for i in inputs))

    def run(self) -> nn.Module:
        nodes = list(self.graph.node)
        for node in nodes:
            if node.domain not in ("", "ai.onnx"):
                raise self.fail(node, f"operator domain {node.domain!r} is not supported")
        constant_names = set(self.constants)
        for node in nodes:
            if self.foldable(node, constant_names):
                constant_names.update(node.output)
        # liveness: walk back from the outputs; a Reshape's non-constant target is resolved by shape inference
        producer = {out: node for node in nodes for out in node.output}
        live: set[int] = set()
        stack = list(self.outputs)
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if node is None or id(node) in live:
                continue
            live.add(id(node))
            needed = list(node.input)
            if node.op_type == "Reshape" and len(needed) > 1 and needed[1] not in constant_names \
                    and node.input[0] not in constant_names:
                needed = needed[:1]
            stack.extend(i for i in needed if i)
        if len(self.inputs) != 1:
            raise OnnxImportError(f"the graph has {len(self.inputs)} runtime inputs {self.inputs}; a nanoopt Module "
                                  "takes exactly one")
        modules: dict[str, nn.Module] = {}
        steps: list[tuple[str, list[str], str]] = []
        alias: dict[str, str] = {}
        used_names: set[str] = set()
        for index, node in enumerate(nodes):
            if id(node) not in live:
                continue
            if self.foldable(node, constant_names):
                self.fold(node)
                continue
            sources = [alias.get(i, i) for i in node.input]
            if node.op_type in ("Identity", "Dropout"):
                if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
                    if _producer_needed(node.output[1], nodes, live):
                        raise self.fail(node, "the dropout mask output is used; only inference Dropout is supported")
                alias[node.output[0]] = sources[0]
                continue
            module, runtime_inputs = self.convert(node, [i for i in node.input])
            runtime_inputs = [alias.get(i, i) for i in runtime_inputs]
            outputs = [o for o in node.output if o]
            if len(outputs) != 1:
                raise self.fail(node, f"has {len(outputs)} outputs; only single-output operators are supported")
            name = _module_name(node, index, used_names)
            modules[name] = module
            steps.append((name, runtime_inputs, outputs[0]))
        outputs = [alias.get(o, o) for o in self.outputs]
        for output in outputs:
            if output in self.constants:
                raise OnnxImportError(f"graph output {output!r} is a constant; nothing to import")
        return _assemble(modules, steps, self.inputs, outputs)

    def fold(self, node: Any) -> None:
        """Evaluate a node whose inputs are all constants (``onnx.reference``), once, at import."""
        if node.op_type == "Constant":
            attributes = _attributes(node)
            if "value" not in attributes:
                raise self.fail(node, f"only tensor constants are supported, got attributes {sorted(attributes)}")
            self.constants[node.output[0]] = self.numpy_helper.to_array(attributes["value"])
            return
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(node, opsets={"": self.opset})
            results = evaluator.run(None, {i: self.constants[i] for i in node.input if i})
        except Exception as error:  # noqa: BLE001 - any failure of the reference is an import error
            raise self.fail(node, f"could not evaluate this constant expression ({error})") from None
        for name, value in zip(node.output, results, strict=False):
            if name:
                self.constants[name] = np.asarray(value)

    # --------------------------------------------------------------------------------- operators
    def convert(self, node: Any, inputs: list[str]) -> tuple[nn.Module, list[str]]:
        op = node.op_type
        attributes = _attributes(node)
        converter = getattr(self, f"op_{op}", None)
        if converter is None:
            raise self.fail(node, f"operator {op} is not supported by nanoopt's ONNX import (supported: "
                                  f"{', '.join(sorted(n[3:] for n in dir(self) if n.startswith('op_')))})")
        if inputs and inputs[0] in self.constants and op not in ("Add", "Sub", "Mul", "Div", "Concat", "MatMul"):
            raise self.fail(node, "its data input is a constant; only runtime data inputs are supported")
        return converter(node, attributes, inputs)

    def op_Conv(self, node, a, inputs):
        weight = self.const(node, 1, "weight")
        bias = self.const(node, 2, "bias", optional=True)
        if weight.ndim != 4:
            raise self.fail(node, f"only 2-D convolutions are supported, got a weight of shape {weight.shape}")
        groups = int(a.get("group", 1))
        kernel = tuple(a.get("kernel_shape", weight.shape[2:]))
        if tuple(kernel) != tuple(weight.shape[2:]):
            raise self.fail(node, f"kernel_shape {kernel} differs from the weight's {weight.shape[2:]}")
        stride = tuple(a.get("strides", (1, 1)))
        dilation = tuple(a.get("dilations", (1, 1)))
        pads = self.pads(node, a, kernel, stride, dilation, inputs[0])
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], kernel, stride=stride, padding=pads[0],
                          dilation=dilation, groups=groups, bias=bias is not None)
        layer.weight.data[...] = weight
        if bias is not None:
            layer.bias.data[...] = bias
        if pads[1] is not None:
            return nn.Sequential(Pad2d(pads[1]), layer), inputs[:1]
        return layer, inputs[:1]

    def pads(self, node, a, kernel, stride, dilation, source) -> tuple[tuple[int, int], tuple[int, ...] | None]:
        """Symmetric padding for the layer, or (0, explicit (top, bottom, left, right)) when asymmetric."""
        auto = _decode(a.get("auto_pad", "NOTSET"))
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            shape = self.shape_of(source)
            if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
                raise self.fail(node, f"auto_pad={auto} needs a static input height and width, got {shape}")
            pads = []
            for size, k, s, d in zip(shape[2:], kernel, stride, dilation, strict=True):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small, large = total // 2, total - total // 2
                pads.append((large, small) if auto == "SAME_LOWER" else (small, large))
            begin, end = (pads[0][0], pads[1][0]), (pads[0][1], pads[1][1])
        elif auto == "VALID":
            begin, end = (0, 0), (0, 0)
        elif auto == "NOTSET":
            values = tuple(int(p) for p in a.get("pads", (0, 0, 0, 0)))
            if len(values) != 4:
                raise self.fail(node, f"pads must have 4 values for a 2-D operator, got {values}")
            begin, end = values[:2], values[2:]
        else:
            raise self.fail(node, f"unknown auto_pad {auto!r}")
        if begin == end:
            return begin, None
        return (0, 0), (begin[0], end[0], begin[1], end[1])

    def op_Gemm(self, node, a, inputs):
        if int(a.get("transA", 0)):
            raise self.fail(node, "transA=1 is not supported")
        b = self.const(node, 1, "B")
        c = self.const(node, 2, "C", optional=True)
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        weight = b if int(a.get("transB", 0)) else b.T            # (N, K)
        if weight.ndim != 2:
            raise self.fail(node, f"B must be 2-D, got shape {b.shape}")
        out_features, in_features = weight.shape
        layer = nn.Linear(in_features, out_features, bias=c is not None)
        layer.weight.data[...] = alpha * weight if alpha != 1.0 else weight
        if c is not None:
            try:
                bias = np.broadcast_to(np.asarray(c, np.float32), (1, out_features)).reshape(out_features)
            except ValueError:
                raise self.fail(node, f"C of shape {c.shape} does not broadcast to one bias per output "
                                      f"({out_features})") from None
            layer.bias.data[...] = beta * bias if beta != 1.0 else bias
        return layer, inputs[:1]

    def op_MatMul(self, node, a, inputs):
        left, right = (i in self.constants for i in inputs[:2])
        if left:
            raise self.fail(node, "a constant left operand is not supported (only x @ W and x @ y)")
        if not right:
            return MatMul(), inputs[:2]
        weight = self.constants[inputs[1]]
        if weight.ndim != 2:
            raise self.fail(node, f"a constant right operand must be 2-D, got shape {weight.shape}")
        layer = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        layer.weight.data[...] = weight.T
        return layer, inputs[:1]

    def op_Relu(self, node, a, inputs):
        return nn.ReLU(), inputs[:1]

    def op_Sigmoid(self, node, a, inputs):
        return nn.Sigmoid(), inputs[:1]

    def op_Tanh(self, node, a, inputs):
        return nn.Tanh(), inputs[:1]

    def op_Gelu(self, node, a, inputs):
        approximate = _decode(a.get("approximate", "none"))
        if approximate not in ("none", "tanh"):
            raise self.fail(node, f"approximate={approximate!r} is not supported")
        return nn.GELU(approximate), inputs[:1]

    def op_Clip(self, node, a, inputs):
        if self.opset < 11:
            low, high = a.get("min"), a.get("max")
        else:
            low_array = self.const(node, 1, "optional min", optional=True)
            high_array = self.const(node, 2, "optional max", optional=True)
            if len(inputs) > 1 and inputs[1] and low_array is None or len(inputs) > 2 and inputs[2] \
                    and high_array is None:
                raise self.fail(node, "min and max must be constants")
            low = None if low_array is None else float(low_array)
            high = None if high_array is None else float(high_array)
        if low == 0.0 and (high is None or np.isinf(high)):
            return nn.ReLU(), inputs[:1]
        return Clip(low, high), inputs[:1]

    def pool_args(self, node, a, inputs, allow_dilation=False):
        kernel = tuple(int(k) for k in a["kernel_shape"])
        if len(kernel) != 2:
            raise self.fail(node, f"only 2-D pooling is supported, got kernel_shape {kernel}")
        stride = tuple(int(s) for s in a.get("strides", (1, 1)))
        if tuple(a.get("dilations", (1, 1))) != (1, 1):
            raise self.fail(node, f"dilations {tuple(a['dilations'])} are not supported")
        padding, explicit = self.pads(node, a, kernel, stride, (1, 1), inputs[0])
        if explicit is not None:
            raise self.fail(node, f"asymmetric pads {explicit} are not supported for pooling")
        if int(a.get("ceil_mode", 0)):
            shape = self.shape_of(inputs[0])
            if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
                raise self.fail(node, "ceil_mode=1 needs a static input height and width")
            for size, k, s, p in zip(shape[2:], kernel, stride, padding, strict=True):
                if (size + 2 * p - k) % s:
                    raise self.fail(node, "ceil_mode=1 changes the output size here; only floor mode is supported")
        if len(node.output) > 1 and node.output[1]:
            raise self.fail(node, "the Indices output is not supported")
        return kernel, stride, padding

    def op_MaxPool(self, node, a, inputs):
        kernel, stride, padding = self.pool_args(node, a, inputs)
        return nn.MaxPool2d(kernel, stride, padding), inputs[:1]

    def op_AveragePool(self, node, a, inputs):
        kernel, stride, padding = self.pool_args(node, a, inputs)
        if padding != (0, 0) and not int(a.get("count_include_pad", 0)):
            raise self.fail(node, "count_include_pad=0 with padding is not supported (nanoopt counts the padded "
                                  "zeros, as count_include_pad=1)")
        return nn.AvgPool2d(kernel, stride, padding), inputs[:1]

    def op_GlobalAveragePool(self, node, a, inputs):
        shape = self.shape_of(inputs[0])
        if shape is not None and len(shape) != 4:
            raise self.fail(node, f"only 4-D inputs are supported, got shape {shape}")
        return nn.AdaptiveAvgPool2d(1), inputs[:1]

    def op_Flatten(self, node, a, inputs):
        axis = int(a.get("axis", 1))
        return (nn.Flatten(1) if axis == 1 else OnnxFlatten(axis)), inputs[:1]

    def op_Reshape(self, node, a, inputs):
        allowzero = bool(a.get("allowzero", 0))
        if len(inputs) > 1 and inputs[1] in self.constants:
            target = [int(d) for d in self.constants[inputs[1]]]
        else:
            target = self.symbolic(inputs[1]) if len(inputs) > 1 else None
            source = self.shape_of(inputs[0])
            if target is None or not source or any(isinstance(d, str) and (i != 0 or d != source[0])
                                                   for i, d in enumerate(target)):
                raise self.fail(node, f"the target shape is computed at run time ({target}, input shape "
                                      f"{source}); only a dynamic batch axis can be resolved")
            target = [0 if isinstance(d, str) else d for d in target]
        source = self.shape_of(inputs[0])
        if target == [0, -1] or (len(target) == 2 and target[0] in (0, -1) and source and len(source) >= 2
                                 and all(isinstance(d, int) and d > 0 for d in source[1:])
                                 and target[1] == int(np.prod(source[1:])) and target[0] == 0):
            return nn.Flatten(1), inputs[:1]
        return Reshape(target, allowzero), inputs[:1]

    def op_BatchNormalization(self, node, a, inputs):
        if int(a.get("training_mode", 0)) or len([o for o in node.output if o]) > 1:
            raise self.fail(node, "training-mode BatchNormalization is not supported (export in eval mode)")
        scale, bias = self.const(node, 1, "scale"), self.const(node, 2, "B")
        mean, var = self.const(node, 3, "input_mean"), self.const(node, 4, "input_var")
        shape = self.shape_of(inputs[0])
        rank = len(shape) if shape is not None else None
        if rank == 4:
            layer_type = nn.BatchNorm2d
        elif rank in (2, 3):
            layer_type = nn.BatchNorm1d
        else:
            raise self.fail(node, f"input rank must be 2, 3 or 4 (known from shape inference), got shape {shape}")
        momentum = 1.0 - float(a.get("momentum", 0.9))
        layer = layer_type(scale.shape[0], eps=float(a.get("epsilon", 1e-5)), momentum=momentum)
        layer.weight.data[...], layer.bias.data[...] = scale, bias
        layer.running_mean[...], layer.running_var[...] = mean, var
        return layer.eval(), inputs[:1]

    def op_LayerNormalization(self, node, a, inputs):
        scale = self.const(node, 1, "Scale")
        bias = self.const(node, 2, "B", optional=True)
        if int(a.get("stash_type", 1)) != 1 or len([o for o in node.output if o]) > 1:
            raise self.fail(node, "only stash_type=1 and a single output are supported")
        axis = int(a.get("axis", -1))
        shape = self.shape_of(inputs[0])
        if axis < 0:
            normalized = scale.shape[axis:] if len(scale.shape) >= -axis else None
        elif shape is not None:
            normalized = tuple(shape[axis:])
        else:
            raise self.fail(node, f"axis={axis} needs the input rank from shape inference")
        if normalized is None or len(normalized) != -axis and axis < 0 or tuple(scale.shape[-len(normalized):]) \
                != tuple(normalized) or scale.ndim != len(normalized):
            raise self.fail(node, f"Scale of shape {scale.shape} must match the normalised axes (axis={axis})")
        layer = nn.LayerNorm(tuple(int(d) for d in normalized), eps=float(a.get("epsilon", 1e-5)))
        layer.weight.data[...] = scale
        layer.bias.data[...] = 0.0 if bias is None else bias
        return layer, inputs[:1]

    def binary(self, node, inputs, op):
        first, second = (i in self.constants for i in inputs[:2])
        if first and second:  # pragma: no cover - folded earlier
            raise self.fail(node, "both inputs are constants")
        if first or second:
            constant = self.constants[inputs[0] if first else inputs[1]]
            return ConstantBinary(op, constant, constant_first=first), [inputs[1] if first else inputs[0]]
        a, b = self.shape_of(inputs[0]), self.shape_of(inputs[1])
        if op == "add" and a is not None and a == b and all(isinstance(d, int) for d in a[1:]):
            return nn.Add(), inputs[:2]
        return Binary(op), inputs[:2]

    def op_Add(self, node, a, inputs):
        return self.binary(node, inputs, "add")

    def op_Sub(self, node, a, inputs):
        return self.binary(node, inputs, "sub")

    def op_Mul(self, node, a, inputs):
        return self.binary(node, inputs, "mul")

    def op_Div(self, node, a, inputs):
        return self.binary(node, inputs, "div")

    def op_Concat(self, node, a, inputs):
        constants = {i: self.constants[name] for i, name in enumerate(inputs) if name in self.constants}
        return Concat(int(a["axis"]), len(inputs), constants), [i for i in inputs if i not in self.constants]

    def op_Softmax(self, node, a, inputs):
        default = -1 if self.opset >= 13 else 1
        axis = int(a.get("axis", default))
        if self.opset >= 13:
            return Softmax(axis), inputs[:1]
        shape = self.shape_of(inputs[0])
        if shape is not None and axis % len(shape) == len(shape) - 1:
            return Softmax(-1), inputs[:1]
        return Softmax(axis, coerce_2d=True), inputs[:1]

    def op_Transpose(self, node, a, inputs):
        return Transpose(a.get("perm")), inputs[:1]


def _producer_needed(name: str, nodes: Sequence[Any], live: set[int]) -> bool:
    return any(name in node.input for node in nodes if id(node) in live)


def _module_name(node: Any, index: int, used: set[str]) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", node.name).strip("_") or f"{node.op_type.lower()}_{index}"
    name, suffix = base, 1
    while name in used:
        suffix += 1
        name = f"{base}_{suffix}"
    used.add(name)
    return name


def _assemble(modules: dict[str, nn.Module], steps: list[tuple[str, list[str], str]], inputs: list[str],
              outputs: list[str]) -> nn.Module:
    """A Sequential when every step consumes only the previous step's output (and nothing else reads it)."""
    chain = len(outputs) == 1 and bool(steps)
    previous = inputs[0]
    uses: dict[str, int] = {}
    for _, sources, _ in steps:
        for source in sources:
            uses[source] = uses.get(source, 0) + 1
    for _, sources, output in steps:
        if sources != [previous] or uses.get(previous, 0) != 1:
            chain = False
            break
        previous = output
    if chain and previous == outputs[0]:
        return nn.Sequential(*[modules[name] for name, _, _ in steps])
    return GraphModule(modules, steps, inputs, outputs)


def load(source: str | os.PathLike | Any) -> nn.Module:
    """Import a float ONNX model (a path, or an ``onnx.ModelProto``) as a nanoopt Module in eval mode.

    >>> import numpy as np, nanoopt as no
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.eye(3, 2, dtype=np.float32), "w")
    >>> nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    >>> graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    >>> model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    >>> model
    Sequential(
      (0): Linear(in_features=3, out_features=2, bias=False)
      (1): ReLU()
    )
    >>> model(no.Tensor([[1.0, 2.0, 5.0]])).data.tolist()
    [[1.0, 2.0]]
    """
    onnx = require_onnx()
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        try:
            proto = onnx.load(path)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError & co.
            raise OnnxImportError(f"{path}: not a readable ONNX model ({type(error).__name__}: {error})") from None
    else:
        proto = source
    try:  # strict: shapes that contradict each other (a weight that does not fit its input) are refused here
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        raise OnnxImportError(f"the ONNX graph's shapes do not fit together: {error}") from None
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise OnnxImportError(f"the ONNX model is invalid: {str(error).splitlines()[0]}") from None
    return _Importer(proto).run().eval()
