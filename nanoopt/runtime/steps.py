"""The operations a plan executes: each validates its constants once and binds prepared kernel calls to buffers.

An operation is built from a :class:`~nanoopt.runtime.description.Step` (``Op(step)``: every check that does not
depend on the input -- dtypes, shapes, zero points against the grid, fixed-point multipliers, the accumulator
bound -- runs here, and the weights are packed). ``op.bind(inputs)`` then takes the buffers of its inputs for one
input shape, allocates its output buffer and returns it with the list of calls ``(function, arguments)`` that
fill it; the plan runs those calls, nothing else, on every call with that shape.

Integer operations run the kernels of :mod:`nanoopt.kernels` (the same ones the converted modules run, so the
results are bit-identical to the integer model; the choice of AVX2 / AVX-VNNI / portable Numba is made once here,
as ``kernels``' ``"auto"`` makes it). Float operations run BLAS (``np.matmul`` into a buffer) or the kernels of
:mod:`nanoopt.runtime.float_kernels`.

>>> import numpy as np
>>> from nanoopt.runtime.description import Step
>>> op = OPS["relu"](Step("relu", (0,)))
>>> x = np.array([-1.0, 2.0], np.float32)
>>> out, calls = op.bind([x])
>>> for function, arguments in calls: function(*arguments)
>>> out
array([0., 2.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from nanoopt import kernels
from nanoopt.kernels import avx2, numba_cpu, sparse, sparse_avx2
from nanoopt.kernels import reference as ref
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime.description import PlanFormatError, Step, spec_from_json

Call = tuple[Callable[..., Any], tuple]

__all__ = ["OPS", "Op"]


def _fail(step: Step, message: str) -> PlanFormatError:
    return PlanFormatError(f"step {step.op!r} ({step.name or 'unnamed'}): {message}")


def _array(step: Step, key: str, dtypes: tuple, ndim: int, optional: bool = False) -> np.ndarray | None:
    value = step.arrays.get(key)
    if value is None:
        if optional:
            return None
        raise _fail(step, f"needs the array {key!r}")
    if value.dtype not in [np.dtype(d) for d in dtypes] or value.ndim != ndim:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise _fail(step, f"array {key!r} must be {ndim}-D {names}, got {value.ndim}-D {value.dtype}")
    return np.ascontiguousarray(value)


def _attr(step: Step, key: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in step.attrs:
        if default is ...:
            raise _fail(step, f"needs the attribute {key!r}")
        return default
    value = step.attrs[key]
    if kind is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
            raise _fail(step, f"attribute {key!r} must be a list of ints, got {value!r}")
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(step, f"attribute {key!r} must be {kind}, got {value!r}")
    return value


def _pair(step: Step, key: str, minimum: int, default: Any = ...) -> tuple[int, int]:
    value = _attr(step, key, tuple, default)
    if len(value) != 2 or min(value) < minimum:
        raise _fail(step, f"attribute {key!r} must be two ints >= {minimum}, got {value!r}")
    return value


def _expect(step: Step, x: np.ndarray, dtype: np.dtype, ndim: int | None = None) -> None:
    """Bind-time check of an input buffer (shape errors surface before any kernel runs)."""
    if x.dtype != dtype or (ndim is not None and x.ndim != ndim):
        dims = f"{ndim}-D " if ndim is not None else ""
        raise ValueError(f"step {step.op!r} ({step.name or 'unnamed'}) expects a {dims}{dtype} input, got shape "
                         f"{x.shape} {x.dtype}")


class Op:
    """Base of the operations: ``Op(step)`` validates once; :meth:`bind` returns ``(output, calls)``."""

    arity = 1

    def __init__(self, step: Step) -> None:
        self.step = step
        if len(step.inputs) != self.arity:
            raise _fail(step, f"takes {self.arity} input(s), got {len(step.inputs)}")

    def bind(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[Call]]:
        raise NotImplementedError

    def kernel_calls(self, calls: list[Call]) -> list[Call]:
        """The calls that are this layer's kernels (all of them; views and copies are not counted apart)."""
        return calls


def _copy_result(out: np.ndarray, compute: Callable[[], np.ndarray]) -> Call:
    """A call that writes ``compute()`` into ``out`` (for the rarer paths that allocate their result)."""

    def run() -> None:
        np.copyto(out, compute(), casting="unsafe")

    return run, ()


# ============================================================================================ integer steps
def _out_spec(step: Step):
    return spec_from_json(_attr(step, "out_spec", dict), f"step {step.op!r} attribute 'out_spec'")


def _x_dtype(step: Step) -> np.dtype:
    name = _attr(step, "x_dtype", str)
    if name not in ("int8", "int16"):
        raise _fail(step, f"x_dtype must be 'int8' or 'int16', got {name!r}")
    return np.dtype(name)


class _WeightedQ(Op):
    """What integer linear and conv steps share: the arrays and scalars of the layer, validated by the kernels."""

    def _arguments(self, ndim: int) -> tuple:
        step = self.step
        weight = _array(step, "weight", (np.int8, np.int16), ndim)
        self.x_dtype = _x_dtype(step)
        wide = self.x_dtype == np.int16
        bias = _array(step, "bias", (np.int64,) if wide else (np.int32,), 1, optional=True)
        m0 = _array(step, "m0", (np.int32,), 1)
        shift = _array(step, "shift", (np.int32,), 1)
        self.out_spec = _out_spec(step)
        return (weight, bias, _attr(step, "x_zero_point", int), m0, shift, _attr(step, "out_zero_point", int),
                self.out_spec)


@numba.njit(cache=True, nogil=True)
def linear_s8_avx2(x, panels, n, k, products, epilogue, out3):  # pragma: no cover - compiled
    """One int8 linear layer: the AVX2 (or AVX-VNNI) product into ``products`` (M, N) int32, then the Numba
    epilogue (zero-point fold, bias, requantization, ReLU) into ``out3`` (M, N, 1); as :class:`kernels.PreparedLinear`
    on ``"avx2"`` (:meth:`numba_cpu.LinearPlan.finish`), in one call."""
    avx2.gemm_s8s8s32_into(x, panels, n, k, products)
    numba_cpu._epilogue_block(products.reshape(-1), x.shape[0], n, 0, 0, epilogue, (0, 0, n, 0, numba_cpu.LINEAR),
                              out3)


class LinearQ(_WeightedQ):
    """Integer linear layer (``reference.quantized_linear``), codes ``(..., K)`` -> ``(..., N)``."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        weight, bias, x_zp, m0, shift, out_zp, out_spec = self._arguments(2)
        relu = _attr(step, "relu", bool)
        try:
            self.prepared = kernels.prepare_linear(weight, bias, x_zp, m0, shift, out_zp, out_spec, relu,
                                                   self.x_dtype)  # validates every constant, packs the weights
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error
        self.plan = self.prepared.plan
        self.n, self.k = weight.shape
        with kernels.use_backend("auto"):
            backend = self.prepared.backend_for()
        self.avx2 = backend == "avx2" and self.x_dtype == np.int8 and out_spec.dtype == np.int8
        if self.avx2:
            self.panels = self.prepared.weights.avx2_s8().panels

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, self.x_dtype)
        if x.ndim < 1 or x.shape[-1] != self.k:
            raise ValueError(f"linear step {self.step.name!r}: expected input (..., {self.k}), got {x.shape}")
        rows = x.reshape(-1, self.k)  # (M, K), a view of the buffer
        out = np.empty(x.shape[:-1] + (self.n,), self.out_spec.dtype)
        out2 = out.reshape(-1, self.n)
        m = rows.shape[0]
        plan = self.plan
        if self.avx2 and not numba_cpu._use_threads(2 * m * self.n * self.k):
            epilogue = (plan.base_offsets, np.zeros(m, np.int64)) + plan.tail
            products = np.empty((m, self.n), np.int32)
            return out, [(linear_s8_avx2, (rows, self.panels, self.n, self.k, products, epilogue,
                                           out2.reshape(m, self.n, 1)))]
        if (self.x_dtype == np.int8 and plan.packed.parts.shape[0] == 1 and out.dtype == np.int8
                and self.k <= numba_cpu.MAX_FUSED_K and not self.avx2):
            operands = (rows[None], plan.packed.parts, plan.passes)
            epilogue = (plan.offsets, np.zeros(m, np.int64)) + plan.tail
            parallel = numba_cpu._use_threads(2 * m * plan.packed.parts.shape[1] * self.k)
            gemm = numba_cpu._gemm_parallel if parallel else numba_cpu._gemm_serial
            return out, [(gemm, (operands, epilogue, (0, 0, self.n, 0, numba_cpu.LINEAR), out2.reshape(m, self.n, 1)))]
        prepared = self.prepared
        return out, [_copy_result(out2, lambda: _with_auto(prepared, rows))]


def _maximum(x: np.ndarray, floor: Any, out: np.ndarray) -> Call:
    """A call writing ``max(x, floor)`` into ``out`` (one NumPy pass)."""

    def run() -> None:
        np.maximum(x, floor, out=out)

    return run, ()


def _with_auto(prepared, x):
    with kernels.use_backend("auto"):
        return prepared(x)


class Conv2dQ(_WeightedQ):
    """Integer 2-D convolution (``reference.quantized_conv2d``) on NCHW codes."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        weight, bias, x_zp, m0, shift, out_zp, out_spec = self._arguments(4)
        self.stride, self.padding = _pair(step, "stride", 1), _pair(step, "padding", 0)
        self.dilation, self.groups = _pair(step, "dilation", 1), _attr(step, "groups", int)
        relu = _attr(step, "relu", bool)
        try:
            self.prepared = kernels.prepare_conv2d(weight, bias, x_zp, m0, shift, out_zp, out_spec, self.stride,
                                                   self.padding, self.dilation, self.groups, relu, self.x_dtype)
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error
        self.plan = self.prepared.plan
        with kernels.use_backend("auto"):
            self.backend = self.prepared.backend_for()
        self.in_channels = weight.shape[1] * self.groups
        if self.backend == "avx2":
            self.panels = self.prepared.avx2_panels()

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, self.x_dtype, 4)
        plan = self.plan
        try:
            shape = plan.output_shape(x)
        except ValueError as error:
            raise ValueError(f"conv step {self.step.name!r}: {error}") from error
        batch, out_channels, out_h, out_w = shape
        fast = (self.x_dtype == np.int8 and self.out_spec.dtype == np.int8 and plan.depth <= numba_cpu.MAX_FUSED_K)
        out = np.empty(shape, self.out_spec.dtype)
        ops = 2 * out.size * plan.depth
        (ph, pw), (sh, sw), (dh, dw) = plan.padding, plan.stride, plan.dilation
        if fast and self.backend == "numba" and plan.thin:
            padded_h, padded_w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
            offsets, weights = numba_cpu.thin_conv_taps(plan.packed.weight, padded_h, padded_w, (dh, dw))
            slack = (plan.packed.weight.shape[3] - 1) * dw
            geometry = (ph, pw, sh, sw, out_channels // self.groups, slack)
            epilogue = (plan.direct_offsets, np.zeros(1, np.int64)) + plan.tail
            run = numba_cpu._thin_conv_parallel if numba_cpu._use_threads(ops) else numba_cpu._thin_conv_serial
            return out, [(run, (x, np.int64(plan.x_zero_point), geometry, offsets, weights, epilogue, out))]
        pixels = out_h * out_w
        out3 = out.reshape(batch, out_channels, pixels)
        if fast and self.backend == "avx2":
            padded = np.empty((1, batch, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw, x.shape[1]), np.int8)
            per_block = numba_cpu.EXTERNAL_PIXELS
            items = batch * self.groups * ((pixels + per_block - 1) // per_block)
            epilogue = (plan.direct_offsets, np.zeros(per_block, np.int64)) + plan.tail
            run = numba_cpu.avx2_conv_parallel if numba_cpu._use_threads(ops) else numba_cpu.avx2_conv_serial
            return out, [(numba_cpu._pad_nhwc, (x, plan.x_zero_point, ph, pw, padded)),
                         (run, (padded, self.panels, items, plan.conv_tuple(out_h, out_w), epilogue, out3))]
        if fast and self.backend == "numba" and out_channels // self.groups >= numba_cpu.TILE_COLUMNS:
            padded = np.empty((1, batch, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw, x.shape[1]), np.int8)
            items = batch * self.groups * ((pixels + numba_cpu.CONV_PIXELS - 1) // numba_cpu.CONV_PIXELS)
            epilogue = (plan.offsets, np.zeros(0, np.int64)) + plan.tail
            ops *= plan.passes.shape[0]
            run = numba_cpu._conv_parallel if numba_cpu._use_threads(ops) else numba_cpu._conv_serial
            return out, [(numba_cpu._pad_nhwc, (x, plan.x_zero_point, ph, pw, padded)),
                         (run, (padded, plan.packed.parts, plan.passes, items, plan.conv_tuple(out_h, out_w),
                                epilogue, out3))]
        prepared = self.prepared
        return out, [_copy_result(out, lambda: _with_auto(prepared, x))]


class AddQ(Op):
    """Integer residual add (TFLite's ADD, ``reference.quantized_add``) of two codes on their grids."""

    arity = 2

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.spec = _out_spec(step)
        scales = [np.float32(_attr(step, key, float)) for key in ("a_scale", "b_scale", "out_scale")]
        zero_points = [_attr(step, key, int) for key in ("a_zero_point", "b_zero_point", "out_zero_point")]
        relu = _attr(step, "relu", bool)
        try:
            probe = np.zeros(1, self.spec.dtype)
            ref.check_add_args(probe, zero_points[0], probe, zero_points[1], zero_points[2], self.spec)
            left_shift, (m_a, s_a), (m_b, s_b), (m_out, s_out) = ref.add_multipliers(*scales, self.spec)
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error
        low = max(self.spec.qmin, zero_points[2]) if relu else self.spec.qmin
        self.arguments = (np.int64(left_shift), (np.int64(zero_points[0]), np.int64(m_a), np.int64(s_a)),
                          (np.int64(zero_points[1]), np.int64(m_b), np.int64(s_b)),
                          (np.int64(zero_points[2]), np.int64(m_out), np.int64(s_out), np.int64(low),
                           np.int64(self.spec.qmax)))

    def bind(self, inputs):
        a, b = inputs
        _expect(self.step, a, self.spec.dtype)
        if b.shape != a.shape or b.dtype != a.dtype:
            raise ValueError(f"add step {self.step.name!r}: both inputs need the same shape and dtype, got "
                             f"{a.shape} {a.dtype} and {b.shape} {b.dtype}")
        out = np.empty(a.shape, self.spec.dtype)
        return out, [(numba_cpu._add, (a.reshape(-1), b.reshape(-1), *self.arguments, out.reshape(-1)))]


def _pool_geometry(step: Step, x: np.ndarray, kernel, stride, padding) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"pool step {step.name!r}: expected an NCHW input, got shape {x.shape}")
    try:
        out_h = ref.conv_output_size(x.shape[2], kernel[0], stride[0], padding[0], 1, "height")
        out_w = ref.conv_output_size(x.shape[3], kernel[1], stride[1], padding[1], 1, "width")
    except ValueError as error:
        raise ValueError(f"pool step {step.name!r}: {error}") from error
    return out_h, out_w


class _Pool(Op):
    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.output_size = _pair(step, "output_size", 1, None) if "output_size" in step.attrs else None
        if self.output_size is None:
            self.kernel = _pair(step, "kernel", 1)
            self.stride = _pair(step, "stride", 1)
            self.padding = _pair(step, "padding", 0, (0, 0))
            if self.padding[0] > self.kernel[0] // 2 or self.padding[1] > self.kernel[1] // 2:
                raise _fail(step, f"padding must be at most half the kernel, got {self.padding}, kernel {self.kernel}")


class MaxPool(_Pool):
    """Max pooling (codes or float32; padded cells never win)."""

    def bind(self, inputs):
        x = inputs[0]
        out_h, out_w = _pool_geometry(self.step, x, self.kernel, self.stride, self.padding)
        out = np.empty(x.shape[:2] + (out_h, out_w), x.dtype)
        return out, [(fk.max_pool, (x, *self.kernel, *self.stride, *self.padding, out))]


class AvgPoolQ(_Pool):
    """Integer average pooling on the input grid (``reference.quantized_avg_pool2d``); adaptive with equal bins."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.zero_point = _attr(step, "zero_point", int)

    def bind(self, inputs):
        x = inputs[0]
        if x.dtype.kind != "i":
            raise ValueError(f"avg_pool_q step {self.step.name!r}: expected integer codes, got {x.dtype}")
        kernel, stride, padding = self._geometry(x)
        ref.check_int(self.zero_point, "zero_point", *ref.activation_range(x.dtype))
        out_h, out_w = _pool_geometry(self.step, x, kernel, stride, padding)
        out = np.empty(x.shape[:2] + (out_h, out_w), x.dtype)
        return out, [(numba_cpu._avg_pool, (x, np.int64(self.zero_point), kernel, stride, padding, True, out))]

    def _geometry(self, x):
        if self.output_size is None:
            return self.kernel, self.stride, self.padding
        if x.ndim != 4 or x.shape[2] % self.output_size[0] or x.shape[3] % self.output_size[1]:
            raise ValueError(f"avg_pool_q step {self.step.name!r}: input {x.shape} does not split into "
                             f"{self.output_size} equal bins")
        kernel = (x.shape[2] // self.output_size[0], x.shape[3] // self.output_size[1])
        return kernel, kernel, (0, 0)


class ReluQ(Op):
    """ReLU on codes: ``max(q, zero_point)``."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.zero_point = _attr(step, "zero_point", int)

    def bind(self, inputs):
        x = inputs[0]
        ref.check_int(self.zero_point, "zero_point", *ref.activation_range(x.dtype))
        out = np.empty_like(x)
        return out, [_maximum(x, x.dtype.type(self.zero_point), out)]


class Flatten(Op):
    """Merge the axes from ``start_dim`` on: a view of the input buffer, no call."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.start_dim = _attr(step, "start_dim", int)
        if self.start_dim < 1:
            raise _fail(step, f"start_dim must be >= 1 (the batch axis stays), got {self.start_dim}")

    def bind(self, inputs):
        x = inputs[0]
        if x.ndim <= self.start_dim:
            raise ValueError(f"flatten step {self.step.name!r}: expected at least {self.start_dim + 1} dimensions, "
                             f"got shape {x.shape}")
        return x.reshape(x.shape[:self.start_dim] + (-1,)), []


class Identity(Op):
    """The input itself (Dropout and Identity in eval mode)."""

    def bind(self, inputs):
        return inputs[0], []


# ============================================================================================== float steps
def _float_bias(step: Step, channels: int) -> np.ndarray:
    bias = _array(step, "bias", (np.float32,), 1, optional=True)
    if bias is None:
        return np.zeros(channels, np.float32)
    if bias.shape != (channels,):
        raise _fail(step, f"bias must have shape ({channels},), got {bias.shape}")
    return bias


def _finite(step: Step, *arrays: np.ndarray) -> None:
    for array in arrays:
        if not np.all(np.isfinite(array)):
            raise _fail(step, "weights and biases must be finite")


class Linear(Op):
    """Float linear layer ``y = max?(x W^T + b, 0)``: BLAS into the output buffer, then one fused epilogue."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.weight = _array(step, "weight", (np.float32,), 2)
        self.n, self.k = self.weight.shape
        self.bias = _float_bias(step, self.n)
        self.relu = _attr(step, "relu", bool, False)
        _finite(step, self.weight, self.bias)
        self.weight_t = self.weight.T  # (K, N) view: BLAS reads it transposed

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, np.dtype(np.float32))
        if x.ndim < 1 or x.shape[-1] != self.k:
            raise ValueError(f"linear step {self.step.name!r}: expected input (..., {self.k}), got {x.shape}")
        rows = x.reshape(-1, self.k)
        out = np.empty(x.shape[:-1] + (self.n,), np.float32)
        out2 = out.reshape(-1, self.n)
        return out, [(fk.linear_bias_act, (rows, self.weight_t, self.bias, self.relu, out2))]


# Float conv strategy, per layer. Unit stride and a reduction depth Cg*KH*KW up to DIRECT_MAX_DEPTH: the direct
# loop on padded-width rows (float_kernels.direct_conv_unit_stride); otherwise im2col + BLAS by blocks of images
# whose columns (at most IM2COL_BLOCK_BYTES) stay in cache (float_kernels.im2col_gemm_conv). Measured on Zen 4,
# 1 thread, batch 256, CPU time (best of 10, loaded machine): LeNet-5's 1->6 5x5 on 28x28, direct 2.8 ms, im2col
# + BLAS 2.7 ms; 6->16 5x5 on 14x14 (depth 150), im2col + BLAS 3.5 ms (blocks of 2 images) vs direct 5.7 ms.
DIRECT_MAX_DEPTH = 32
IM2COL_BLOCK_BYTES = 192 * 1024


class Conv2d(Op):
    """Float 2-D convolution: im2col + BLAS by blocks of images, or a direct loop for unit-stride thin layers."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.weight = _array(step, "weight", (np.float32,), 4)
        out_channels, group_channels, kh, kw = self.weight.shape
        self.bias = _float_bias(step, out_channels)
        self.stride, self.padding = _pair(step, "stride", 1), _pair(step, "padding", 0)
        self.dilation, self.groups = _pair(step, "dilation", 1), _attr(step, "groups", int)
        self.relu = _attr(step, "relu", bool, False)
        _finite(step, self.weight, self.bias)
        if self.groups < 1 or out_channels % self.groups:
            raise _fail(step, f"{out_channels} output channels do not split into groups={self.groups}")
        self.depth = group_channels * kh * kw
        self.unit_stride = self.stride == (1, 1) and self.depth <= DIRECT_MAX_DEPTH
        self.grouped = self.weight.reshape(self.groups, out_channels // self.groups, self.depth)  # (G, OCg, D)

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, np.dtype(np.float32), 4)
        out_channels, group_channels, kh, kw = self.weight.shape
        if x.shape[1] != group_channels * self.groups:
            raise ValueError(f"conv step {self.step.name!r}: expected {group_channels * self.groups} input "
                             f"channels, got shape {x.shape}")
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        try:
            out_h = ref.conv_output_size(x.shape[2], kh, sh, ph, dh, "height")
            out_w = ref.conv_output_size(x.shape[3], kw, sw, pw, dw, "width")
        except ValueError as error:
            raise ValueError(f"conv step {self.step.name!r}: {error}") from error
        batch = x.shape[0]
        calls: list[Call] = []
        if ph or pw:
            padded = np.zeros((batch, x.shape[1], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), np.float32)
            interior = padded[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]]
            calls.append((np.copyto, (interior, x)))
        else:
            padded = x
        out = np.empty((batch, out_channels, out_h, out_w), np.float32)
        if self.unit_stride:
            acc = np.empty((out_h - 1) * padded.shape[3] + out_w, np.float32)
            calls.append((fk.direct_conv_unit_stride, (padded, self.weight, self.bias, self.groups, dh, dw, self.relu,
                                                       acc, out)))
            return out, calls
        columns = fk.im2col_columns(out_h, out_w, padded.shape[3], self.stride)
        block = max(1, min(batch, IM2COL_BLOCK_BYTES // (4 * columns * self.depth)))
        cols = np.empty((self.depth, block * columns), np.float32)  # a block of images, one group: (D, B*L)
        products = np.empty((out_channels // self.groups, block * columns), np.float32)  # (OCg, B*L)
        calls.append((fk.im2col_gemm_conv, (padded, self.grouped, self.bias, kh, kw, sh, sw, dh, dw, self.relu, cols,
                                            products, out)))
        return out, calls


class ChannelAffine(Op):
    """``x * scale[c] + shift[c]`` over axis 1 (a BatchNorm in eval mode that could not be folded)."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.scale = _array(step, "scale", (np.float32,), 1)
        self.shift = _array(step, "shift", (np.float32,), 1)
        if self.scale.shape != self.shift.shape:
            raise _fail(step, f"scale {self.scale.shape} and shift {self.shift.shape} must have the same shape")
        _finite(step, self.scale, self.shift)

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, np.dtype(np.float32))
        if x.ndim < 2 or x.shape[1] != self.scale.size:
            raise ValueError(f"affine step {self.step.name!r}: expected {self.scale.size} channels in axis 1, got "
                             f"shape {x.shape}")
        out = np.empty_like(x)
        shape3 = (x.shape[0], x.shape[1], -1)
        return out, [(fk.channel_affine, (x.reshape(shape3), self.scale, self.shift, out.reshape(shape3)))]


class Relu(Op):
    """``max(x, 0)``."""

    def bind(self, inputs):
        x = inputs[0]
        out = np.empty_like(x)
        return out, [_maximum(x, x.dtype.type(0), out)]


class Add(Op):
    """``a + b`` (same shapes); ``relu`` fused optionally."""

    arity = 2

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.relu = _attr(step, "relu", bool, False)

    def bind(self, inputs):
        a, b = inputs
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"add step {self.step.name!r}: both inputs need the same shape and dtype, got "
                             f"{a.shape} {a.dtype} and {b.shape} {b.dtype}")
        out = np.empty_like(a)
        calls: list[Call] = [(np.add, (a, b, out))]
        if self.relu:
            calls.append(_maximum(out, out.dtype.type(0), out))
        return out, calls


class AvgPool(_Pool):
    """Float average pooling (zeros padded and counted) or adaptive average pooling (PyTorch's bins)."""

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, np.dtype(np.float32), 4)
        if self.output_size is not None:
            out = np.empty(x.shape[:2] + self.output_size, np.float32)
            return out, [(fk.adaptive_avg_pool, (x, out))]
        out_h, out_w = _pool_geometry(self.step, x, self.kernel, self.stride, self.padding)
        out = np.empty(x.shape[:2] + (out_h, out_w), np.float32)
        return out, [(fk.avg_pool, (x, *self.kernel, *self.stride, *self.padding, out))]


class _SparseLinear(Op):
    def _finish(self, step: Step, rows: int) -> None:
        self.bias = _float_bias(step, rows)
        self.relu = _attr(step, "relu", bool, False)
        _finite(step, self.bias)

    def _check(self, x: np.ndarray) -> np.ndarray:
        _expect(self.step, x, np.dtype(np.float32), 2)
        if x.shape[1] != self.cols:
            raise ValueError(f"sparse step {self.step.name!r}: expected input (N, {self.cols}), got {x.shape}")
        return np.empty((x.shape[0], self.rows), np.float32)


class CsrLinear(_SparseLinear):
    """Float linear layer with a CSR weight (:mod:`nanoopt.kernels.sparse`; AVX2 one row at a time at batch 1)."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        shape = _pair(step, "shape", 1)
        try:
            self.matrix = sparse.CSRMatrix(_array(step, "data", (np.float32,), 1),
                                           _array(step, "indices", (np.int32,), 1),
                                           _array(step, "indptr", (np.int64,), 1), shape)
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error
        _finite(step, self.matrix.data)
        self.rows, self.cols = shape
        self._finish(step, self.rows)

    def bind(self, inputs):
        x = inputs[0]
        out = self._check(x)
        m = self.matrix
        if x.shape[0] == 1 and sparse_avx2.available():
            calls: list[Call] = [(sparse_avx2.csr_matvec_into, (x[0], m.data, m.indices, m.indptr, out[0]))]
        elif x.shape[0] == 1:
            calls = [(sparse._csr_matvec, (x[0], m.data, m.indices.view(np.uint32), m.indptr.view(np.uint64),
                                           self.rows, out[0]))]
        else:
            calls = [_copy_result(out, lambda: sparse.csr_matmul(x, m))]
        return out, calls + [(fk.bias_act_rows, (out, self.bias, self.relu))]


class NmLinear(_SparseLinear):
    """Float linear layer with an N:M weight (:mod:`nanoopt.kernels.sparse`)."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        shape = _pair(step, "shape", 1)
        n, m = _attr(step, "n", int), _attr(step, "m", int)
        try:
            self.matrix = sparse.NMMatrix(_array(step, "values", (np.float32,), 2),
                                          _array(step, "offsets", (np.uint8,), 2), n, m, shape)
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error
        _finite(step, self.matrix.values)
        self.rows, self.cols = shape
        self.group_start = (np.arange(self.matrix.values.shape[1], dtype=np.uint32) // n) * np.uint32(m)
        self._finish(step, self.rows)

    def bind(self, inputs):
        x = inputs[0]
        out = self._check(x)
        m = self.matrix
        if x.shape[0] == 1:
            calls: list[Call] = [(sparse._nm_matvec, (x[0], m.values, m.offsets, self.group_start, out[0]))]
        else:
            calls = [_copy_result(out, lambda: sparse.nm_matmul(x, m))]
        return out, calls + [(fk.bias_act_rows, (out, self.bias, self.relu))]


OPS: dict[str, type[Op]] = {
    "linear_q": LinearQ, "conv2d_q": Conv2dQ, "add_q": AddQ, "avg_pool_q": AvgPoolQ, "relu_q": ReluQ,
    "max_pool": MaxPool, "flatten": Flatten, "identity": Identity,
    "linear": Linear, "conv2d": Conv2d, "affine": ChannelAffine, "relu": Relu, "add": Add, "avg_pool": AvgPool,
    "csr_linear": CsrLinear, "nm_linear": NmLinear,
}
INT_OPS = frozenset({"linear_q", "conv2d_q", "add_q", "avg_pool_q", "relu_q", "max_pool", "flatten", "identity"})
FLOAT_OPS = frozenset(OPS) - {"linear_q", "conv2d_q", "add_q", "avg_pool_q", "relu_q"}
