"""The integer operations of a plan: linear, conv, residual add, average pool and ReLU on codes.

Each runs the kernels of :mod:`nanoopt.kernels` -- the ones the converted modules run, so the plan is bit-identical
to the integer model -- with every constant validated and the weights packed when the step is built; the backend
(AVX-512 VNNI / AVX-VNNI / AVX2 / portable Numba / the NumPy reference) is chosen then, on the CPU the plan runs on:
the thread's choice (:func:`nanoopt.kernels.use_backend`), by default ``"auto"``.
The common int8 paths bind the compiled kernels directly to the buffers; rarer ones (16-bit activations, very long
reductions) call the prepared layer and copy its result.

>>> import numpy as np
>>> from nanoopt.runtime.description import Step
>>> op = ReluQ(Step("relu_q", (0,), {"zero_point": -3}))
>>> out, calls = op.bind([np.array([-9, 4], np.int8)])
>>> for function, arguments in calls: function(*arguments)
>>> out
array([-3,  4], dtype=int8)
"""

from __future__ import annotations

import numpy as np

from nanoopt import kernels
from nanoopt.kernels import avx512, int8_conv_avx2, numba_pointwise, x86_glue
from nanoopt.kernels import reference as ref
from nanoopt.kernels.numba_conv import CONV_PIXELS, conv_parallel, conv_serial, pad_nhwc
from nanoopt.kernels.numba_epilogue import LINEAR
from nanoopt.kernels.numba_gemm import MAX_FUSED_K, TILE_COLUMNS, gemm_parallel, gemm_serial, use_threads
from nanoopt.kernels.thin_conv import thin_conv_parallel, thin_conv_serial
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime.description import Step, spec_from_json
from nanoopt.runtime.steps import (
    Op,
    _array,
    _attr,
    _copy_result,
    _expect,
    _fail,
    _maximum,
    _pair,
    _Pool,
    _pool_geometry,
)

__all__ = ["AddQ", "AvgPoolQ", "Conv2dQ", "LinearQ", "ReluQ"]

# The int8 register tiles (kernels.int8_conv_avx2: 16 output channels per tile) run layers with at least this many
# output channels per group: LeNet-5's first conv (6) runs them faster than the thin loop (docs/kernels.md).
TILES_MIN_GROUP_CHANNELS = 4
# Unit-stride layers with a fused 2 x 2 pool and at most this many output channels per group run the row tiles
# (16 positions x 6 channels; LeNet-5's first conv: 0.88 against 1.40 ms in channel tiles, host, batch 256).
ROW_TILES_MAX_GROUP_CHANNELS = 8


def _out_spec(step: Step):
    return spec_from_json(_attr(step, "out_spec", dict), f"step {step.op!r} attribute 'out_spec'")


def _x_dtype(step: Step) -> np.dtype:
    name = _attr(step, "x_dtype", str)
    if name not in ("int8", "int16"):
        raise _fail(step, f"x_dtype must be 'int8' or 'int16', got {name!r}")
    return np.dtype(name)


class _WeightedQ(Op):
    """What integer linear and conv steps share: the arrays and scalars of the layer, validated by the kernels, and
    the range of the input codes (:meth:`know_input_codes`), which chooses the AVX2 tile."""

    x_codes: tuple = (None, None)  # [low, high] of the input codes where the plan knows it

    def know_input_codes(self, ranges: list[tuple[int, int] | None]) -> None:
        self.x_codes = ranges[0] or (None, None)

    def _s8_kernel(self) -> str:
        """The x86 int8 GEMM of this layer: on plain AVX2, the 7-bit tile where the input grid's codes fit [-64, 63]
        (:func:`nanoopt.kernels.x86_glue.s8_kernel_for_codes`)."""
        return x86_glue.s8_kernel_for_codes(kernels.int8_gemm_kernel(), *self.x_codes)

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
        self.backend = self.prepared.backend_for()  # the thread's choice (kernels.use_backend), "auto" by default
        self.avx2 = self.backend == "avx2" and self.x_dtype == np.int8 and out_spec.dtype == np.int8
        if self.avx2:
            self.panels = self.prepared.weights.avx2_s8().panels
        # AVX-512 VNNI: the 512-bit kernel that requantizes in registers (None where it does not run this layer)
        self.requant_s8 = self.prepared.requant_s8() if self.avx2 else None
        # elsewhere (AVX2, AVX-VNNI): the product, then the requantization in 32-bit lanes where the epilogue fits
        self.requant_lanes = self.prepared.requant_lanes() if self.avx2 and self.requant_s8 is None else None

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
        if self.requant_s8 is not None and not use_threads(2 * m * self.n * self.k):
            products = np.empty((m, self.n), np.int32)  # scratch, used only when K spans several K blocks
            packed = np.empty(m * (-(-self.k // 4) * 4), np.int8)  # the rows as the tiles read them, kept
            arguments = (rows, self.panels, self.n, self.k, self.requant_s8, products, out2, packed)
            return out, [(avx512.linear_s8_into, arguments)]
        if self.requant_lanes is not None and not use_threads(2 * m * self.n * self.k):
            products = np.empty((m, self.n), np.int32)
            linear = x86_glue.linear_s8_requant_driver(self._s8_kernel(), self.k)  # requantized in 32-bit lanes
            return out, [(linear, (rows, self.panels, self.n, self.k, products, self.requant_lanes, out2))]
        if self.avx2 and not use_threads(2 * m * self.n * self.k):
            epilogue = (plan.base_offsets, np.zeros(m, np.int64)) + plan.tail
            products = np.empty((m, self.n), np.int32)
            linear = x86_glue.linear_s8_driver(self._s8_kernel())  # the x86 product, then the epilogue
            return out, [(linear, (rows, self.panels, self.n, self.k, products, epilogue, out2))]
        if (self.backend == "numba" and self.x_dtype == np.int8 and plan.packed.parts.shape[0] == 1
                and out.dtype == np.int8 and self.k <= MAX_FUSED_K):
            operands = (rows[None], plan.packed.parts, plan.passes)
            epilogue = (plan.offsets, np.zeros(m, np.int64)) + plan.tail
            parallel = use_threads(2 * m * plan.packed.parts.shape[1] * self.k)
            gemm = gemm_parallel if parallel else gemm_serial
            return out, [(gemm, (operands, epilogue, (0, 0, self.n, 0, LINEAR), out2.reshape(m, self.n, 1)))]
        prepared, backend = self.prepared, self.backend
        return out, [_copy_result(out2, lambda: _with_backend(prepared, rows, backend))]


def _with_backend(prepared, x: np.ndarray, backend: str) -> np.ndarray:
    """``prepared(x)`` on the backend chosen when the plan was built."""
    with kernels.use_backend(backend):
        return prepared(x)


class Conv2dQ(_WeightedQ):
    """Integer 2-D convolution (``reference.quantized_conv2d``) on NCHW codes."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        weight, bias, x_zp, m0, shift, out_zp, out_spec = self._arguments(4)
        self.stride, self.padding = _pair(step, "stride", 1), _pair(step, "padding", 0)
        self.dilation, self.groups = _pair(step, "dilation", 1), _attr(step, "groups", int)
        relu = _attr(step, "relu", bool)
        self.pool = _pair(step, "pool", 1, (1, 1))  # a fused max pool: window = stride, no padding
        try:
            self.prepared = kernels.prepare_conv2d(weight, bias, x_zp, m0, shift, out_zp, out_spec, self.stride,
                                                   self.padding, self.dilation, self.groups, relu, self.x_dtype)
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error
        self.plan = self.prepared.plan
        self.backend = self.prepared.backend_for()  # the thread's choice (kernels.use_backend), "auto" by default
        self.in_channels = weight.shape[1] * self.groups
        self.rows = False  # row tiles (else channel tiles) where self.tiles is not None
        self.tiles = self._tiles(weight, out_spec)  # the int8 register tiles' (packed, constants), where they run
        self.requant_s8 = None  # the constants of the AVX-512 conv that requantizes in registers, where it runs
        if self.backend == "avx2":
            self.panels = self.prepared.avx2_panels()
            m0, shift, out_zp, low, high, _, fast_epilogue = self.plan.tail
            if (kernels.int8_gemm_kernel() == "avx512-vnni" and fast_epilogue and self.groups == 1
                    and self.x_dtype == np.int8 and out_spec.dtype == np.int8):
                self.requant_s8 = avx512.requant_s8(self.plan.direct_offsets, m0, shift, out_zp, low, high)

    def _tiles(self, weight: np.ndarray, out_spec) -> tuple | None:
        """``(packed, constants)`` of :mod:`nanoopt.kernels.int8_conv_avx2` for this layer where its register tiles
        run (the thread's backend ``"auto"`` or ``"avx2"``, the CPU's :func:`~nanoopt.kernels.int8_conv_avx2.
        taps_per_lane`, int8 codes in and out, an epilogue that fits int32) and fit it: at least
        ``TILES_MIN_GROUP_CHANNELS`` output channels per group and kernel rows of at least 2 taps (a lane holds 2 or
        4 taps of a row); else ``None``."""
        self.per_lane = int8_conv_avx2.taps_per_lane() if kernels.get_backend() in ("auto", "avx2") else 0
        per_group = weight.shape[0] // self.groups
        fits = (per_group >= TILES_MIN_GROUP_CHANNELS and weight.shape[3] >= 2 and self.x_dtype == np.int8
                and out_spec.dtype == np.int8 and self.plan.depth <= MAX_FUSED_K)
        if not (self.per_lane and fits):
            return None
        # thin layers with a 2 x 2 pool at unit stride: row tiles (int16 pairs on every CPU), else channel tiles
        self.rows = self.stride == (1, 1) and self.pool == (2, 2) and per_group <= ROW_TILES_MAX_GROUP_CHANNELS
        if self.rows:
            self.per_lane = int8_conv_avx2.PAIRS
        return int8_conv_avx2.prepare(weight, self.groups, self.plan.direct_offsets, self.plan.tail, self.per_lane,
                                      self.rows)

    def bind(self, inputs):
        x = inputs[0]
        _expect(self.step, x, self.x_dtype, 4)
        plan = self.plan
        try:
            shape = plan.output_shape(x)
        except ValueError as error:
            raise ValueError(f"conv step {self.step.name!r}: {error}") from error
        batch, out_channels, out_h, out_w = shape
        pool_h, pool_w = self.pool
        if out_h < pool_h or out_w < pool_w:
            raise ValueError(f"conv step {self.step.name!r}: its {out_h}x{out_w} output is smaller than the fused "
                             f"{pool_h}x{pool_w} pool")
        pooled = pool_h > 1 or pool_w > 1
        fast = (self.x_dtype == np.int8 and self.out_spec.dtype == np.int8 and plan.depth <= MAX_FUSED_K)
        final = np.empty((batch, out_channels, out_h // pool_h, out_w // pool_w), self.out_spec.dtype)
        ops = 2 * batch * out_channels * out_h * out_w * plan.depth
        zero_point = np.int64(plan.x_zero_point)
        if self.tiles is not None and not use_threads(ops):  # register tiles, the pool fused
            weight = plan.packed.weight
            shape, taps, pixels, _, _ = int8_conv_avx2.geometry(x.shape, weight.shape[2:], self.stride, self.padding,
                                                                self.dilation, weight.shape[1], self.per_lane,
                                                                plan.x_zero_point, self.pool)
            if self.rows:
                return final, [(int8_conv_avx2.conv_rows_s8_into, (x, shape, self.tiles[0], taps, self.tiles[1],
                                                                   final))]
            arguments = (x, shape, self.tiles[0], taps, pixels, self.tiles[1], final)
            return final, [(int8_conv_avx2.conv_s8_into, arguments)]
        if fast and self.backend == "numba" and plan.thin:  # the pool, if any, fused into the plane's write
            geometry, offsets, weights, epilogue = plan.thin_arguments(x.shape, out_h, out_w, self.pool)
            run = thin_conv_parallel if use_threads(ops) else thin_conv_serial
            return final, [(run, (x, zero_point, geometry, offsets, weights, epilogue, final))]
        out = np.empty(shape, self.out_spec.dtype) if pooled else final
        out3 = out.reshape(batch, out_channels, out_h * out_w)
        if fast and self.backend == "avx2" and self.requant_s8 is not None and not use_threads(ops):
            padded, conv, _ = plan.external_arguments(x.shape)  # AVX-512: requantized in registers, then NCHW
            scratch = x86_glue.conv_requant_scratch(plan.depth, out_channels)
            arguments = (x, zero_point, padded, self.panels[0], conv, self.requant_s8, scratch, out3, self.pool, final)
            return final, [(x86_glue.conv_requant_avx512, arguments)]
        if fast and self.backend == "avx2":  # padding and the pool, if any, inside the driver's call
            padded, conv, epilogue = plan.external_arguments(x.shape)
            _, serial, parallel = x86_glue.external_s8_drivers(self._s8_kernel())
            run = parallel if use_threads(ops) else serial
            return final, [(run, (x, zero_point, padded, self.panels, conv, epilogue, out3, self.pool, final))]
        calls = self._other_calls(x, out, out3, fast, ops)
        if pooled:
            calls.append((fk.max_pool, (out, pool_h, pool_w, pool_h, pool_w, 0, 0, final)))
        return final, calls

    def _other_calls(self, x, out, out3, fast, ops):
        """The calls of the portable paths, into the unpooled ``out``."""
        plan = self.plan
        (ph, pw) = plan.padding
        if fast and self.backend == "numba" and out.shape[1] // self.groups >= TILE_COLUMNS:
            padded = np.empty((1, x.shape[0], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw, x.shape[1]), np.int8)
            pixels = out.shape[2] * out.shape[3]
            items = x.shape[0] * self.groups * ((pixels + CONV_PIXELS - 1) // CONV_PIXELS)
            epilogue = (plan.offsets, np.zeros(0, np.int64)) + plan.tail
            ops *= plan.passes.shape[0]
            run = conv_parallel if use_threads(ops) else conv_serial
            return [(pad_nhwc, (x, plan.x_zero_point, ph, pw, padded)),
                    (run, (padded, plan.packed.parts, plan.passes, items, plan.conv_tuple(out.shape[2], out.shape[3]),
                           epilogue, out3))]
        prepared, backend = self.prepared, self.backend
        return [_copy_result(out, lambda: _with_backend(prepared, x, backend))]


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
            self.arguments = numba_pointwise.add_arguments(*scales, *zero_points, self.spec, relu)
        except (TypeError, ValueError) as error:
            raise _fail(step, str(error)) from error

    def bind(self, inputs):
        a, b = inputs
        _expect(self.step, a, self.spec.dtype)
        if b.shape != a.shape or b.dtype != a.dtype:
            raise ValueError(f"add step {self.step.name!r}: both inputs need the same shape and dtype, got "
                             f"{a.shape} {a.dtype} and {b.shape} {b.dtype}")
        out = np.empty(a.shape, self.spec.dtype)
        return out, [(numba_pointwise.add_into, (a.reshape(-1), b.reshape(-1), *self.arguments, out.reshape(-1)))]


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
        arguments = (x, np.int64(self.zero_point), kernel, stride, padding, True, out)
        return out, [(numba_pointwise.avg_pool_into, arguments)]

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
