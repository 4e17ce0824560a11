"""The portable backend: quantized linear and conv2d layers as Numba plans, bit-identical to the reference.

Same integer-only scheme (Jacob et al. 2018, eq. 7-9; gemmlowp rounding) and the same arguments as
:func:`nanoopt.kernels.reference.quantized_linear` / ``quantized_conv2d``, which are the specification these
plans are tested against. A plan validates and packs a layer's constants once; per call only the input is
checked. The work is done by modules with one job each:

* :mod:`nanoopt.kernels.numba_gemm` -- the register-tiled int8 GEMM (16-bit operands as byte parts);
* :mod:`nanoopt.kernels.numba_epilogue` -- offsets, requantization, ReLU and the store, per block;
* :mod:`nanoopt.kernels.numba_conv` -- im2col convolution on the GEMM, and the direct loop for depthwise layers;
* :mod:`nanoopt.kernels.thin_conv` -- the direct "thin" convolution for few taps;
* :mod:`nanoopt.kernels.numba_pointwise` -- pooling and the residual add.

:class:`Conv2dPlan` chooses among the conv algorithms. Nothing here names an x86 instruction: where the AVX2
GEMM runs, the dispatch (:mod:`nanoopt.kernels`) wraps the same im2col and epilogue around it
(:mod:`nanoopt.kernels.x86_glue`, :meth:`LinearPlan.finish`, :meth:`Conv2dPlan.external_arguments`). Reductions
longer than ``MAX_FUSED_K`` run the reference.

>>> plan = LinearPlan(np.array([[2, 1], [-1, 4]], np.int8), None, 0, 2**30, 0, 0, QuantSpec())
>>> plan(np.array([[10, -3]], np.int8))
array([[  9, -11]], dtype=int8)
"""

from __future__ import annotations

import numpy as np

from nanoopt.kernels import reference as ref
from nanoopt.kernels.numba_conv import (
    CONV_PIXELS,
    EXTERNAL_PIXELS,
    PackedConv2d,
    conv_direct,
    conv_parallel,
    conv_serial,
    pack_conv2d_weights,
    pad_nhwc,
)
from nanoopt.kernels.numba_epilogue import check_x_dtype, finish_products, kernel_dtype, layer_epilogue
from nanoopt.kernels.numba_gemm import (
    MAX_FUSED_K,
    TILE_COLUMNS,
    as_packed,
    byte_passes,
    channel_correction,
    linear_offsets,
    run_linear,
    use_threads,
)
from nanoopt.kernels.thin_conv import THIN_MAX_DEPTH, thin_conv_parallel, thin_conv_serial, thin_conv_taps
from nanoopt.spec import QuantSpec

__all__ = ["Conv2dPlan", "LinearPlan", "check_input"]


def check_input(x_q, dtype: np.dtype, ndim: int, depth: int, depth_axis: int) -> None:
    """Per-call check of a prepared layer's input (the fixed parameters were checked once)."""
    if not isinstance(x_q, np.ndarray) or x_q.dtype != dtype:
        raise TypeError(f"x_q must be a NumPy array of {dtype} (as prepared), got {getattr(x_q, 'dtype', type(x_q))}")
    if x_q.ndim != ndim:
        raise ValueError(f"x_q must have {ndim} dimensions, got shape {x_q.shape}")
    if not x_q.flags.c_contiguous:
        raise ValueError("x_q must be C-contiguous (call np.ascontiguousarray first)")
    if x_q.shape[depth_axis] != depth:
        raise ValueError(f"x_q must have {depth} {'features' if ndim == 2 else 'channels'}, got shape {x_q.shape}")



class LinearPlan:
    """A quantized linear layer with everything but its input fixed, validated and packed once.

    ``plan(x_q)`` equals :func:`nanoopt.kernels.reference.quantized_linear` with the same arguments; per
    call only ``x_q`` is checked (about a microsecond instead of tens).

    >>> plan = LinearPlan(np.array([[2, 1], [-1, 4]], np.int8), None, 0, 2**30, 0, 0, QuantSpec())
    >>> plan(np.array([[10, -3]], np.int8))
    array([[  9, -11]], dtype=int8)
    """

    def __init__(self, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec,
                 relu: bool = False, x_dtype=np.int8):  # fmt: skip
        self.packed = as_packed(w_q)
        self.x_dtype = check_x_dtype(x_dtype)
        self.out_dtype = out_spec.dtype
        self.arguments = (bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu)  # for the fallback
        self.x_zero_point, offsets, self.tail = layer_epilogue(
            self.packed, self.x_dtype, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec, relu, 2
        )
        self.base_offsets = offsets  # bias - x_zp * rowsum(w): what exact products need
        self.offsets = linear_offsets(offsets, self.x_dtype, self.packed)
        self.passes = byte_passes(2 if self.x_dtype == np.int16 else 1, self.packed.parts.shape[0])

    def check_input(self, x_q: np.ndarray) -> None:
        """The per-call check: ``x_q`` has the prepared dtype, two dimensions, K features, C order."""
        check_input(x_q, self.x_dtype, 2, self.packed.k, 1)

    def finish(self, products: np.ndarray) -> np.ndarray:
        """The layer's output from exact products ``x_q @ w.T`` (int32 or int64 ``(M, N)``, e.g. from the
        AVX2 GEMM): zero-point fold, bias, requantization, ReLU -- the epilogue of :meth:`__call__`."""
        out = np.empty(products.shape, dtype=kernel_dtype(self.out_dtype))
        finish_products(products, (self.base_offsets, np.zeros(products.shape[0], np.int64)) + self.tail, out)
        return out.astype(self.out_dtype, copy=False)

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        check_input(x_q, self.x_dtype, 2, self.packed.k, 1)
        if self.packed.k > MAX_FUSED_K:
            return ref.quantized_linear(x_q, self.packed.weight, *self.arguments)
        out = np.empty((x_q.shape[0], self.packed.n), dtype=kernel_dtype(self.out_dtype))
        run_linear(x_q, self.packed, self.offsets, self.tail, out, self.passes)
        return out.astype(self.out_dtype, copy=False)


class Conv2dPlan:
    """A quantized conv2d layer with everything but its input fixed (see :class:`LinearPlan`).

    >>> plan = Conv2dPlan(np.ones((1, 1, 3, 3), np.int8), None, 0, 2**30, 0, 0, QuantSpec(), padding=1)
    >>> plan(np.ones((1, 1, 3, 3), np.int8))[0, 0]
    array([[2, 3, 2],
           [3, 5, 3],
           [2, 3, 2]], dtype=int8)
    """

    def __init__(self, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec, stride=1,
                 padding=0, dilation=1, groups: int = 1, relu: bool = False, x_dtype=np.int8):  # fmt: skip
        self.packed = w_q if isinstance(w_q, PackedConv2d) else pack_conv2d_weights(w_q, groups)
        if self.packed.groups != ref.check_int(groups, "groups", 1, 2**31 - 1):
            raise ValueError(f"w_q was packed for groups={self.packed.groups}, got groups={groups}")
        self.x_dtype = check_x_dtype(x_dtype)
        self.out_dtype = out_spec.dtype
        self.stride, self.padding = ref.pair(stride, "stride", 1), ref.pair(padding, "padding", 0)
        self.dilation, self.groups = ref.pair(dilation, "dilation", 1), groups
        self.arguments = (bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, self.stride, self.padding,
                          self.dilation, groups, relu)  # fmt: skip
        self.x_zero_point, offsets, self.tail = layer_epilogue(
            self.packed, self.x_dtype, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec, relu, 4
        )
        out_channels, group_channels, kh, kw = self.packed.weight.shape
        self.depth = kh * kw * group_channels
        self.a_split, w_split = self.x_dtype == np.int16, self.packed.parts.shape[1] == 2
        self.offsets = offsets + channel_correction(self.a_split, w_split, self.packed.row_sums, self.depth)
        self.direct_offsets = offsets  # the direct kernel reads whole values: no byte-split terms
        self.passes = byte_passes(2 if self.a_split else 1, self.packed.parts.shape[1])
        # The direct thin loop (int8 activations and weights; int32 sums are exact as depth <= MAX_FUSED_K) runs
        # depthwise-like layers (too few channels per group for the 4x4 tiles) and unit-stride layers with few
        # taps, where im2col costs more than the products (timings: docs/kernels.md).
        per_group = out_channels // groups
        few_taps = self.depth <= THIN_MAX_DEPTH and self.stride == (1, 1)
        int8 = self.x_dtype == np.int8 and self.packed.weight.dtype == np.int8
        self.thin = int8 and (per_group < TILE_COLUMNS or few_taps)
        self._thin_taps: dict = {}

    def output_shape(self, x_q: np.ndarray) -> tuple[int, int, int, int]:
        """Check ``x_q`` (dtype, layout, channels, size) and return the output shape ``(N, OC, OH, OW)``."""
        out_channels, group_channels, kh, kw = self.packed.weight.shape
        check_input(x_q, self.x_dtype, 4, self.groups * group_channels, 1)
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        out_h = ref.conv_output_size(x_q.shape[2], kh, sh, ph, dh, "height")
        out_w = ref.conv_output_size(x_q.shape[3], kw, sw, pw, dw, "width")
        return x_q.shape[0], out_channels, out_h, out_w

    def pad(self, x_q: np.ndarray) -> np.ndarray:
        """``(parts, N, H + 2 ph, W + 2 pw, C)`` int8 NHWC copy of ``x_q`` with a zero-point border."""
        (ph, pw), (batch, channels, height, width) = self.padding, x_q.shape
        parts = 2 if self.a_split else 1
        padded = np.empty((parts, batch, height + 2 * ph, width + 2 * pw, channels), dtype=np.int8)
        pad_nhwc(x_q, self.x_zero_point, ph, pw, padded)
        return padded

    def conv_tuple(self, out_h: int, out_w: int) -> tuple:
        """The geometry tuple of the compiled conv kernels."""
        out_channels, group_channels, kh, kw = self.packed.weight.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return (self.groups, group_channels, out_channels // self.groups, kh, kw, sh, sw, dh, dw, out_w,
                out_h * out_w)  # fmt: skip

    def external_arguments(self, x_shape: tuple[int, ...]) -> tuple:
        """For a conv whose products come from another GEMM (the x86 ones, int8 activations) on an input of
        ``x_shape``: ``(padded, conv, epilogue)`` -- an NHWC buffer for the zero-point-padded input (the driver,
        :func:`nanoopt.kernels.x86_glue.external_s8_drivers`, fills it), the geometry tuple and the epilogue of
        exact products. Each 256-pixel item: :func:`im2col_rows`, the product, :func:`epilogue_block` with the
        ``CONV_PIXEL_MAJOR`` layout."""
        if self.x_dtype != np.int8:
            raise TypeError("external products need int8 activations")
        (ph, pw), (batch, channels, height, width) = self.padding, x_shape
        _, _, out_h, out_w = self.output_shape(np.empty((0, *x_shape[1:]), np.int8))
        padded = np.empty((1, batch, height + 2 * ph, width + 2 * pw, channels), dtype=np.int8)
        epilogue = (self.direct_offsets, np.zeros(EXTERNAL_PIXELS, np.int64)) + self.tail
        return padded, self.conv_tuple(out_h, out_w), epilogue

    def cast_output(self, out: np.ndarray) -> np.ndarray:
        """``out`` (written as :func:`kernel_dtype`) in the layer's output dtype."""
        return out.astype(self.out_dtype, copy=False)

    def thin_arguments(self, x_shape: tuple[int, ...], out_h: int, out_w: int, pool: tuple[int, int] = (1, 1)):
        """``(geometry, offsets, weights, epilogue)`` of :func:`thin_conv_serial` for an int8 input of ``x_shape``
        whose conv output is ``out_h x out_w`` (then max pooled ``pool_h x pool_w``, non-overlapping, when not 1x1)."""
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        padded_h, padded_w = x_shape[2] + 2 * ph, x_shape[3] + 2 * pw
        if (padded_h, padded_w) not in self._thin_taps:
            self._thin_taps[padded_h, padded_w] = thin_conv_taps(self.packed.weight, padded_h, padded_w, (dh, dw))
        offsets, weights = self._thin_taps[padded_h, padded_w]
        slack = (self.packed.weight.shape[3] - 1) * dw
        per_group = self.packed.weight.shape[0] // self.groups
        geometry = (ph, pw, sh, sw, per_group, slack, out_h, out_w, int(pool[0]), int(pool[1]))
        epilogue = (self.direct_offsets, np.zeros(1, np.int64)) + self.tail
        return geometry, offsets, weights, epilogue

    def run_thin(self, x_q: np.ndarray, out_shape: tuple[int, int, int, int]) -> np.ndarray:
        """The direct thin convolution (:func:`_thin_conv_image`) of a checked int8 ``x_q``."""
        out = np.empty(out_shape, dtype=kernel_dtype(self.out_dtype))
        geometry, offsets, weights, epilogue = self.thin_arguments(x_q.shape, out_shape[2], out_shape[3])
        arguments = (x_q, np.int64(self.x_zero_point), geometry, offsets, weights, epilogue, out)
        if use_threads(2 * out.size * self.depth):
            thin_conv_parallel(*arguments)
        else:
            thin_conv_serial(*arguments)
        return out.astype(self.out_dtype, copy=False)

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        weight = self.packed.weight
        batch, out_channels, out_h, out_w = self.output_shape(x_q)
        _, group_channels, kh, kw = weight.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        if self.depth > MAX_FUSED_K:
            return ref.quantized_conv2d(x_q, weight, *self.arguments)
        if self.thin:
            return self.run_thin(x_q, (batch, out_channels, out_h, out_w))
        padded = self.pad(x_q)  # (parts, N, Hp, Wp, C)
        out = np.empty((batch, out_channels, out_h, out_w), dtype=kernel_dtype(self.out_dtype))
        per_group = out_channels // self.groups
        if per_group < TILE_COLUMNS:  # weights as int16: one compiled variant for int8 and int16 weights
            epilogue = (self.direct_offsets, np.zeros(1, np.int64)) + self.tail
            conv_direct(padded, weight.astype(np.int16), per_group, sh, sw, dh, dw, epilogue, out)
            return out.astype(self.out_dtype, copy=False)
        pixels = out_h * out_w
        items = batch * self.groups * ((pixels + CONV_PIXELS - 1) // CONV_PIXELS)
        conv = self.conv_tuple(out_h, out_w)
        epilogue = (self.offsets, np.zeros(0, np.int64)) + self.tail
        out3 = out.reshape(batch, out_channels, pixels)
        arguments = (padded, self.packed.parts, self.passes, items, conv, epilogue, out3)
        if use_threads(2 * out.size * self.depth * self.passes.shape[0]):
            conv_parallel(*arguments)
        else:
            conv_serial(*arguments)
        return out.astype(self.out_dtype, copy=False)

