"""The modules of a converted (integer) model: they pass integer codes to each other and run the kernels.

Inside a converted model every layer takes and returns NumPy integer arrays (int8, or int16 in the 16x8 mode)
on a grid fixed at conversion; :class:`QuantizedModel` is the boundary: it quantizes the float input, runs the
tree, and dequantizes the output (``forward``), or runs codes end to end (``forward_int``). The integer
parameters come from :func:`nanoopt.quant.lowering.integer_layer`, the same function the simulation uses, and
are executed by :mod:`nanoopt.kernels` (its dispatch picks AVX2, Numba or the NumPy reference), with the weights
packed once at the first call.

Storage: weights are int8 buffers (4-bit and narrower weights are stored two per byte, see
:mod:`nanoopt.quant.packing`), biases int32 (int64 in the 16x8 mode), plus one scale and multiplier per output
channel; ``state_dict`` holds exactly these arrays, so a saved model is about 4x smaller than the float one.

>>> import numpy as np
>>> from nanoopt.quant.lowering import QParams
>>> from nanoopt.spec import QuantSpec
>>> relu = QuantizedReLU(QParams(np.float32(0.1), np.int32(-5), QuantSpec()))
>>> relu(np.array([-9, -5, 3], np.int8))
array([-5, -5,  3], dtype=int8)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import kernels, nn
from nanoopt.nn.graph import hooks
from nanoopt.quant.boundary import quantize_per_tensor
from nanoopt.quant.checks import check_float_input
from nanoopt.quant.lowering import IntegerLayer, QParams
from nanoopt.quant.metadata import check_codes_fit, qparams_metadata, spec_metadata
from nanoopt.quant.packing import pack_int4, unpack_int4
from nanoopt.runtime import boundary
from nanoopt.spec import QuantSpec, check_scale, check_zero_point, dequantize
from nanoopt.tensor import Tensor

__all__ = [
    "FloatFallback",
    "tune_backends",
    "QuantizedAdd",
    "QuantizedAvgPool2d",
    "QuantizedConv2d",
    "QuantizedFlatten",
    "QuantizedLinear",
    "QuantizedMaxPool2d",
    "QuantizedModel",
    "QuantizedModule",
    "QuantizedReLU",
]


def _register_qparams(module: nn.Module, prefix: str, params: QParams) -> None:
    module.register_buffer(f"{prefix}_scale", np.asarray(params.scale, np.float32).copy())
    module.register_buffer(f"{prefix}_zero_point", np.asarray(params.zero_point, np.int32).copy())
    object.__setattr__(module, f"{prefix}_spec", params.spec)


def _qparams(module: nn.Module, prefix: str) -> QParams:
    return QParams(getattr(module, f"{prefix}_scale"), getattr(module, f"{prefix}_zero_point"),
                   getattr(module, f"{prefix}_spec"))


def _grid_prefixes(module: nn.Module) -> list[str]:
    """The prefixes ``p`` of the ``<p>_spec`` grids a converted layer registered (``input``, ``output``, ...)."""
    return [name[: -len("_spec")] for name, value in vars(module).items()
            if name.endswith("_spec") and isinstance(value, QuantSpec)]


def _check_zero_points(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    for prefix in _grid_prefixes(module):
        value = state.get(f"{prefix}_zero_point")
        if value is not None:
            spec = getattr(module, f"{prefix}_spec")
            check_codes_fit(value, spec.qmin, spec.qmax, f"{prefix}_zero_point ({spec.bits}-bit grid)")


class QuantizedModule(nn.Module):
    """Base of the converted layers: a name for messages, input checks, and a kernel cache."""

    converted_by = "quant.convert"  # nanoopt.nn.converted.MARKER

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.layer_name = name
        self._kernel: Any = None
        self.backend: str | None = None  # set by tune_backends: the fastest kernel backend for this layer

    def _run(self, kernel: Any, x_q: np.ndarray) -> np.ndarray:
        """``kernel(x_q)`` on this layer's tuned backend when the global choice is ``"auto"``."""
        if self.backend is None or kernels.get_backend() != "auto":
            return kernel(x_q)
        with kernels.use_backend(self.backend):
            return kernel(x_q)

    def reset_kernel(self) -> None:
        """Forget the packed kernel (after the buffers were changed in place, e.g. by ``load_state_dict``)."""
        self._kernel = None

    def after_load(self) -> None:
        self.reset_kernel()

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The spec of every grid the layer holds (``<grid>_scale``, ``<grid>_zero_point``)."""
        return qparams_metadata(self, _grid_prefixes(self))

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Loaded zero points must be codes of their grid."""
        _check_zero_points(self, state)

    def check_codes(self, x_q: Any, spec: QuantSpec, what: str = "input") -> np.ndarray:
        if not isinstance(x_q, np.ndarray) or x_q.dtype != spec.dtype:
            got = getattr(x_q, "dtype", type(x_q).__name__)
            raise TypeError(f"{type(self).__name__} {self.layer_name!r} takes {spec.dtype} codes as its {what}, got "
                            f"{got}; call the QuantizedModel (which quantizes float inputs), not an inner layer")
        return np.ascontiguousarray(x_q)


# ------------------------------------------------------------------------------------------- weighted layers
class _QuantizedWeighted(QuantizedModule):
    """Integer weights, bias and multipliers as buffers; 4-bit (and narrower) weights stored packed."""

    def __init__(self, layer: IntegerLayer, name: str, weight_spec: QuantSpec | None = None) -> None:
        super().__init__(name)
        self.weight_spec = weight_spec  # the grid of the weight codes, when known (convert passes it)
        self.weight_bits = int(np.max(np.abs(layer.weight), initial=0)).bit_length() + 1
        self.packed = layer.weight.dtype == np.int8 and self.weight_bits <= 4
        if self.packed:
            self.register_buffer("weight_packed", pack_int4(layer.weight))
            self.register_buffer("weight", layer.weight.copy(), persistent=False)
        else:
            self.register_buffer("weight", layer.weight.copy())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.copy())
        self.register_buffer("weight_scale", layer.weight_scale.copy())
        self.register_buffer("m0", layer.m0.copy())
        self.register_buffer("shift", layer.shift.astype(np.int8))  # |shift| <= 62
        _register_qparams(self, "input", layer.input)
        _register_qparams(self, "output", layer.output)
        self.relu = layer.relu

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The grids, and the weight codes: their spec (or, when not known, the bits they use) and whether they
        are packed two per byte."""
        spec = spec_metadata(self.weight_spec) if self.weight_spec is not None else {"bits": int(self.weight_bits)}
        weight = {**spec, "packed": bool(self.packed)}
        return {**super().describe_state(), "weight_packed" if self.packed else "weight": weight,
                "weight_scale": dict(weight)}

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Loaded weight codes must fit the layer's grid (its spec, else ``|w| <= 2^(bits-1) - 1``), shifts their
        range."""
        super().check_state(state)
        spec = self.weight_spec
        bits = self.weight_bits if spec is None else spec.bits
        low, high = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if spec is None else (spec.qmin, spec.qmax)
        if "weight" in state:
            check_codes_fit(state["weight"], low, high, f"weight ({bits}-bit)")
        if "weight_packed" in state:
            check_codes_fit(unpack_int4(state["weight_packed"], self.weight.size), low, high,
                            f"weight_packed ({bits}-bit)")
        if "shift" in state:
            check_codes_fit(state["shift"], -62, 62, "shift")

    def reset_kernel(self) -> None:
        if self.packed:  # the packed bytes are what state_dict loads: unpack them again
            self.weight[...] = unpack_int4(self.weight_packed, self.weight.size).reshape(self.weight.shape)
        super().reset_kernel()

    def integer_layer(self) -> IntegerLayer:
        """The integer parameters, as :func:`nanoopt.quant.lowering.integer_layer` made them."""
        return IntegerLayer(self.weight, self.weight_scale, self.bias, self.m0, self.shift.astype(np.int32),
                            _qparams(self, "input"), _qparams(self, "output"), self.relu)

    def dequantized_weight(self) -> np.ndarray:
        """``weight * weight_scale`` per output channel (float32)."""
        shape = (-1,) + (1,) * (self.weight.ndim - 1)
        return self.weight.astype(np.float32) * self.weight_scale.reshape(shape)

    def _arguments(self) -> tuple:
        return (self.weight, self.bias, int(self.input_zero_point), self.m0, self.shift.astype(np.int32),
                int(self.output_zero_point), self.output_spec)


class QuantizedLinear(_QuantizedWeighted):
    """Integer ``nn.Linear``: codes ``(..., K)`` in, codes ``(..., N)`` out (fused ReLU optional)."""

    def __init__(self, layer: IntegerLayer, name: str = "", weight_spec: QuantSpec | None = None) -> None:
        super().__init__(layer, name, weight_spec)
        self.out_features, self.in_features = layer.weight.shape

    def forward(self, x_q: np.ndarray) -> np.ndarray:
        x_q = self.check_codes(x_q, self.input_spec)
        if x_q.ndim < 1 or x_q.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear {self.layer_name!r}: expected input (N, {self.in_features}), "
                             f"got shape {x_q.shape}")
        if self._kernel is None:
            self._kernel = kernels.prepare_linear(*self._arguments(), relu=self.relu, x_dtype=self.input_spec.dtype)
        rows = x_q.reshape(-1, self.in_features)  # (M, K), C-contiguous
        return self._run(self._kernel, rows).reshape(x_q.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}, "
                f"{self.input_spec.dtype} -> {self.output_spec.dtype}")


class QuantizedConv2d(_QuantizedWeighted):
    """Integer ``nn.Conv2d`` on NCHW codes (padding holds the input zero point; fused ReLU optional)."""

    def __init__(self, layer: IntegerLayer, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, name: str = "", weight_spec: QuantSpec | None = None) -> None:
        super().__init__(layer, name, weight_spec)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.out_channels = layer.weight.shape[0]
        self.in_channels = layer.weight.shape[1] * groups

    def forward(self, x_q: np.ndarray) -> np.ndarray:
        x_q = self.check_codes(x_q, self.input_spec)
        if x_q.ndim != 4 or x_q.shape[1] != self.in_channels:
            raise ValueError(f"QuantizedConv2d {self.layer_name!r}: expected input (N, {self.in_channels}, H, W), "
                             f"got shape {x_q.shape}")
        if self._kernel is None:
            self._kernel = kernels.prepare_conv2d(*self._arguments(), stride=self.stride, padding=self.padding,
                                                  dilation=self.dilation, groups=self.groups, relu=self.relu,
                                                  x_dtype=self.input_spec.dtype)
        return self._run(self._kernel, x_q)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.weight.shape[2:]}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, relu={self.relu}")


# ------------------------------------------------------------------------------------------- other layers
class QuantizedAdd(QuantizedModule):
    """Requantized sum of two grids (TFLite's integer ADD) for residual connections; fused ReLU optional."""

    def __init__(self, first: QParams, second: QParams, output: QParams, relu: bool = False, name: str = "") -> None:
        super().__init__(name)
        if not first.spec.dtype == second.spec.dtype == output.spec.dtype:
            raise ValueError(f"QuantizedAdd {name!r}: both inputs and the output need the same integer type, got "
                             f"{first.spec.dtype}, {second.spec.dtype} -> {output.spec.dtype}")
        _register_qparams(self, "first", first)
        _register_qparams(self, "second", second)
        _register_qparams(self, "output", output)
        self.relu = relu

    def forward(self, a_q: np.ndarray, b_q: np.ndarray) -> np.ndarray:
        a_q, b_q = self.check_codes(a_q, self.first_spec, "first input"), self.check_codes(b_q, self.second_spec,
                                                                                           "second input")
        return kernels.quantized_add(a_q, self.first_scale, int(self.first_zero_point), b_q, self.second_scale,
                                     int(self.second_zero_point), self.output_scale, int(self.output_zero_point),
                                     self.output_spec, self.relu)


class QuantizedMaxPool2d(QuantizedModule):
    """Max pooling on codes (the grid is unchanged)."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 spec: QuantSpec, name: str = "") -> None:
        super().__init__(name)
        self.kernel_size, self.stride, self.padding, self.spec = kernel_size, stride, padding, spec

    def forward(self, x_q: np.ndarray) -> np.ndarray:
        return kernels.quantized_max_pool2d(self.check_codes(x_q, self.spec), self.kernel_size, self.stride,
                                            self.padding)


class QuantizedAvgPool2d(QuantizedModule):
    """Average pooling on codes, result on the input's grid; ``output_size`` set for adaptive (equal bins) pools."""

    def __init__(self, params: QParams, kernel_size: tuple[int, int] | None = None,
                 stride: tuple[int, int] | None = None, padding: tuple[int, int] = (0, 0),
                 output_size: tuple[int, int] | None = None, name: str = "") -> None:
        super().__init__(name)
        if (kernel_size is None) == (output_size is None):
            raise ValueError("QuantizedAvgPool2d takes either kernel_size or output_size")
        _register_qparams(self, "input", params)
        self.kernel_size, self.stride, self.padding, self.output_size = kernel_size, stride, padding, output_size

    def forward(self, x_q: np.ndarray) -> np.ndarray:
        x_q = self.check_codes(x_q, self.input_spec)
        kernel, stride, padding = self.kernel_size, self.stride, self.padding
        if self.output_size is not None:
            if x_q.ndim != 4 or x_q.shape[2] % self.output_size[0] or x_q.shape[3] % self.output_size[1]:
                raise ValueError(f"QuantizedAvgPool2d {self.layer_name!r}: input {x_q.shape} does not split into "
                                 f"{self.output_size} equal bins")
            kernel = (x_q.shape[2] // self.output_size[0], x_q.shape[3] // self.output_size[1])
            stride = kernel
        return kernels.quantized_avg_pool2d(x_q, int(self.input_zero_point), kernel, stride, padding)


class QuantizedReLU(QuantizedModule):
    """ReLU on codes: ``max(q, zero_point)``."""

    def __init__(self, params: QParams, name: str = "") -> None:
        super().__init__(name)
        _register_qparams(self, "input", params)

    def forward(self, x_q: np.ndarray) -> np.ndarray:
        return kernels.quantized_relu(self.check_codes(x_q, self.input_spec), int(self.input_zero_point))


class QuantizedFlatten(QuantizedModule):
    """``nn.Flatten`` on codes."""

    def __init__(self, start_dim: int, spec: QuantSpec, name: str = "") -> None:
        super().__init__(name)
        self.start_dim, self.spec = start_dim, spec

    def forward(self, x_q: np.ndarray) -> np.ndarray:
        x_q = self.check_codes(x_q, self.spec)
        if x_q.ndim <= self.start_dim:
            raise ValueError(f"QuantizedFlatten {self.layer_name!r}: expected at least {self.start_dim + 1} "
                             f"dimensions, got shape {x_q.shape}")
        return x_q.reshape(x_q.shape[:self.start_dim] + (math.prod(x_q.shape[self.start_dim:]),))  # N = 0 too


class FloatFallback(QuantizedModule):
    """A layer without an integer kernel: dequantize its inputs, run it in float, quantize its output."""

    def __init__(self, layer: nn.Module, inputs: Sequence[QParams], output: QParams, name: str = "") -> None:
        super().__init__(name)
        self.float_module = layer
        for index, params in enumerate(inputs):
            _register_qparams(self, f"input{index}", params)
        self.num_inputs = len(inputs)
        _register_qparams(self, "output", output)

    def forward(self, *codes: np.ndarray) -> np.ndarray:
        if len(codes) != self.num_inputs:
            raise ValueError(f"FloatFallback {self.layer_name!r} takes {self.num_inputs} inputs, got {len(codes)}")
        values = []
        for index, q in enumerate(codes):
            params = _qparams(self, f"input{index}")
            values.append(Tensor(params.dequantize(self.check_codes(q, params.spec))))
        out = self.float_module(*values)
        out = out.data if isinstance(out, Tensor) else np.asarray(out)
        return quantize_per_tensor(np.ascontiguousarray(out), self.output_scale, self.output_zero_point,
                                   self.output_spec)

    def extra_repr(self) -> str:
        return f"float: {type(self.float_module).__name__}"


# ------------------------------------------------------------------------------------------- the boundary
class QuantizedModel(nn.Module):
    """A converted model: float in -> quantize -> integer layers -> dequantize -> float out.

    ``forward_int(q)`` runs codes on the input grid (``input_scale``, ``input_zero_point``, ``input_spec``)
    to codes on the output grid (``output_*``); ``forward(x)`` wraps it in :meth:`quantize_input` and
    :meth:`dequantize_output`. The two grids are validated once (here and after a load, :meth:`after_load`), not per
    call; float32 inputs and the output go through the compiled boundary kernels of
    :mod:`nanoopt.runtime.boundary` (bit-identical to ``spec.quantize`` / ``spec.dequantize``).
    For deployment, :func:`nanoopt.runtime.compile` runs the same model as a flat plan.
    """

    converted_by = "quant.convert"  # nanoopt.nn.converted.MARKER

    def __init__(self, model: nn.Module, input_params: QParams, output_params: QParams,
                 input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.model = model
        _register_qparams(self, "input", input_params)
        _register_qparams(self, "output", output_params)
        self.input_shape = input_shape
        self._boundary: tuple | None = None
        self._check_grids()

    def _check_grids(self) -> tuple:
        """Validate the input and output grids once; returns the scalars the boundary kernels take."""
        if self._boundary is None:
            grids = []
            for prefix in ("input", "output"):
                spec = getattr(self, f"{prefix}_spec")
                scale = check_scale(getattr(self, f"{prefix}_scale"), f"{prefix}_scale")
                zero = check_zero_point(getattr(self, f"{prefix}_zero_point"), spec.qmin, spec.qmax,
                                        f"{prefix}_zero_point")
                per_tensor = scale.size == 1 and zero.size == 1 and not spec.per_channel
                grids.append((np.float32(scale.reshape(-1)[0]), np.int64(zero.reshape(-1)[0]), spec)
                             if per_tensor else None)
            self._boundary = tuple(grids)
        return self._boundary

    def quantize_input(self, x: Any) -> np.ndarray:
        """Float input (Tensor or ndarray) to input codes."""
        data = x.data if isinstance(x, Tensor) else np.asarray(x)
        if self.input_shape is not None and data.shape[1:] != tuple(self.input_shape[1:]):
            expected = ", ".join(map(str, self.input_shape[1:]))
            raise ValueError(f"QuantizedModel: expected inputs of shape (N, {expected}), got {data.shape}")
        grid = self._check_grids()[0]
        if grid is None or data.dtype != np.float32 or not data.flags.c_contiguous:
            check_float_input(data, "QuantizedModel: the input x")
            return quantize_per_tensor(data, self.input_scale, self.input_zero_point, self.input_spec)
        scale, zero, spec = grid
        out = np.empty(data.shape, spec.dtype)
        low, high = np.float32(spec.qmin - zero), np.float32(spec.qmax - zero)
        if not boundary.quantize_into(data.reshape(-1), scale, zero, low, high, out.reshape(-1)):
            check_float_input(data, "QuantizedModel: the input x")  # names what is not finite, and where
        return out

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        """Output codes to float32."""
        grid = self._check_grids()[1]
        if grid is None or not isinstance(q, np.ndarray) or q.dtype != grid[2].dtype or not q.flags.c_contiguous:
            return dequantize(q, self.output_scale, self.output_zero_point, self.output_spec)
        out = np.empty(q.shape, np.float32)
        boundary.dequantize_into(q.reshape(-1), grid[0], grid[1], out.reshape(-1))
        return out

    def forward_int(self, x_q: np.ndarray) -> np.ndarray:
        """Integer in, integer out: the whole model on codes."""
        if not isinstance(x_q, np.ndarray) or x_q.dtype != self.input_spec.dtype:
            raise TypeError(f"forward_int takes {self.input_spec.dtype} codes, got "
                            f"{getattr(x_q, 'dtype', type(x_q).__name__)}")
        return self.model(np.ascontiguousarray(x_q))

    def forward(self, x: Any) -> Tensor:
        return Tensor(self.dequantize_output(self.forward_int(self.quantize_input(x))))

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The specs of the input and output grids."""
        return qparams_metadata(self, ["input", "output"])

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        _check_zero_points(self, state)

    def after_load(self) -> None:
        """The grids were loaded: validate them again (once)."""
        self._boundary = None
        self._check_grids()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> tuple[list[str], list[str]]:
        """Load, then re-pack every layer's kernel from the new buffers."""
        result = super().load_state_dict(state_dict, strict)
        for module in self.modules():
            if isinstance(module, QuantizedModule):
                module.reset_kernel()
        return result


def tune_backends(model: QuantizedModel, example_input: Any, repeats: int = 3) -> dict[str, str]:
    """Time every integer Linear/Conv2d of ``model`` on ``example_input`` under each kernel backend that can run it
    (``"numba"``, and ``"avx2"`` where available) and keep the fastest for that layer; returns ``{name: backend}``.

    All backends give identical integers (tested), so this changes speed only. The choice applies while the
    global backend is ``"auto"`` (forcing one with :func:`nanoopt.kernels.use_backend` still wins).

    >>> import numpy as np
    >>> from nanoopt import models, quant
    >>> x = np.random.default_rng(0).uniform(size=(16, 1, 8, 8)).astype(np.float32)
    >>> qmodel = quant.quantize_static(models.tiny_mlp(), x, progress=False)
    >>> sorted(tune_backends(qmodel, x)) == ["1", "3"]
    True
    """
    if not isinstance(model, QuantizedModel):
        raise TypeError(f"tune_backends: model must be an integer model (quant.convert or quant.quantize_static "
                        f"returns one), got {type(model).__name__}; a float model has no integer kernels to tune")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"tune_backends: repeats must be an int >= 1 (timings per backend and layer), got {repeats!r}")
    layers = [(name, module) for name, module in model.model.named_modules()
              if isinstance(module, QuantizedLinear | QuantizedConv2d)]
    inputs: dict[str, np.ndarray] = {}
    with hooks(dict(layers), before=lambda name, module, args: inputs.__setitem__(name, args[0])):
        model.forward_int(model.quantize_input(example_input))
    candidates = ["numba"] + (["avx2"] if kernels.avx2_available() else [])
    chosen = {}
    for name, module in layers:
        module.backend = None
        timings = {}
        for backend in candidates:
            try:
                with kernels.use_backend(backend):
                    module(inputs[name])  # warm-up (and packing)
                    best = min(_seconds(module, inputs[name]) for _ in range(repeats))
            except RuntimeError:  # this backend cannot run this layer
                continue
            timings[backend] = best
        module.backend = chosen[name] = min(timings, key=timings.get)
    return chosen


def _seconds(module: nn.Module, x_q: np.ndarray) -> float:
    start = time.perf_counter()
    module(x_q)
    return time.perf_counter() - start
