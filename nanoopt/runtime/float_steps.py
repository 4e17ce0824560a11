"""The float operations of a plan: linear (dense, CSR, N:M), conv, BatchNorm affine, ReLU, add, average pools.

Dense products run BLAS (``np.dot`` inside the compiled kernels of :mod:`nanoopt.runtime.float_kernels`, bias and
ReLU fused); convolutions choose per layer between a direct loop and im2col + BLAS (measured below); sparse layers
run the CSR / N:M kernels of :mod:`nanoopt.kernels.sparse`, bit-identical to the ``SparseLinear`` modules.

>>> import numpy as np
>>> from nanoopt.runtime.description import Step
>>> op = Relu(Step("relu", (0,)))
>>> out, calls = op.bind([np.array([-1.0, 2.0], np.float32)])
>>> for function, arguments in calls: function(*arguments)
>>> out
array([0., 2.], dtype=float32)
"""

from __future__ import annotations

import numpy as np

from nanoopt.kernels import float_conv_avx2, nm_sparse, sparse, sparse_avx2
from nanoopt.kernels import reference as ref
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime.description import Step
from nanoopt.runtime.steps import (
    Call,
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

__all__ = ["Add", "AvgPool", "ChannelAffine", "Conv2d", "CsrLinear", "Linear", "NmLinear", "Relu"]


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


# Float conv strategy, per layer; the timings behind these thresholds: docs/kernels.md. Where the register-tiled
# AVX2 kernels are usable (float_conv_avx2.available()):
# * unit stride, a reduction depth Cg*KH*KW of at least ROW_TILES_MIN_DEPTH, at least ROW_TILES_MIN_GROUP_CHANNELS
#   output channels per group, and at least ROW_TILES_MIN_COLUMN_SHARE of the columns the row tiles compute are
#   output columns (OW / Wp; with a 2x2 pool, 2 OW' over the tiles' 8 columns per 4 pooled ones): row tiles, 16
#   positions x 6 output channels (float_kernels.direct_conv_row_tiles);
# * else more than TILED_MIN_GROUP_CHANNELS - 1 output channels per group: channel tiles, 6 pixels x 16 channels
#   (float_conv_avx2.conv_tiles_into), any stride, dilation and depth.
# Otherwise, and on CPUs without AVX2: unit stride and a depth up to DIRECT_MAX_DEPTH: the portable direct loop on
# padded-width rows (float_kernels.direct_conv_unit_stride); otherwise im2col + BLAS by blocks of images whose
# columns (at most IM2COL_BLOCK_BYTES) stay in cache (float_kernels.im2col_gemm_conv). Ungrouped layers take
# per-image columns (float_kernels.im2col_image_gemm_conv, no padded-width columns computed and dropped).
ROW_TILES_MIN_DEPTH = 16  # depth 9 (3x3 depthwise, or 2-4 channels per group) lost to the portable loop
ROW_TILES_MIN_GROUP_CHANNELS = 3  # 1 or 2 of a tile's 6 channels used: slower than the portable loop
ROW_TILES_MIN_COLUMN_SHARE = 0.75  # LeNet-5's second conv (10 of 16 columns) runs faster in channel tiles
TILED_MIN_GROUP_CHANNELS = 9  # 8 or fewer leave at least half of the channel tile's 16 lanes empty
DIRECT_MAX_DEPTH = 32
IM2COL_BLOCK_BYTES = 192 * 1024
IMAGE_BLOCK_BYTES = 512 * 1024


def _column_share(out_w: int, padded_w: int, pool: tuple[int, int]) -> float:
    """The share of output columns among the columns the row tiles compute: ``OW / Wp`` on padded-width rows; with
    a 2 x 2 pool, ``2 OW'`` used of 8 per 4 pooled columns ``OW' = OW // 2``.

    >>> _column_share(28, 32, (2, 2)), _column_share(10, 14, (2, 2)), _column_share(32, 34, (1, 1))
    (0.875, 0.625, 0.9411764705882353)
    """
    if pool == (2, 2):
        pooled = out_w // 2
        return 2 * pooled / (8 * -(-pooled // 4))
    return out_w / padded_w


class Conv2d(Op):
    """Float 2-D convolution: register tiles on AVX2 where they are faster (row tiles for unit-stride layers,
    channel tiles for wide groups), else im2col + BLAS (per image, or by blocks of images for grouped layers), or a
    portable direct loop for unit-stride thin layers."""

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self.weight = _array(step, "weight", (np.float32,), 4)
        out_channels, group_channels, kh, kw = self.weight.shape
        self.bias = _float_bias(step, out_channels)
        self.stride, self.padding = _pair(step, "stride", 1), _pair(step, "padding", 0)
        self.dilation, self.groups = _pair(step, "dilation", 1), _attr(step, "groups", int)
        self.relu = _attr(step, "relu", bool, False)
        self.pool = _pair(step, "pool", 1, (1, 1))  # a fused max pool: window = stride, no padding
        _finite(step, self.weight, self.bias)
        if self.groups < 1 or out_channels % self.groups:
            raise _fail(step, f"{out_channels} output channels do not split into groups={self.groups}")
        self.depth = group_channels * kh * kw
        self.unit_stride = self.stride == (1, 1) and self.depth <= DIRECT_MAX_DEPTH
        self.grouped = self.weight.reshape(self.groups, out_channels // self.groups, self.depth)  # (G, OCg, D)
        per_group, tiles = out_channels // self.groups, float_conv_avx2.available()
        self.row_tiles = (tiles and self.stride == (1, 1) and self.depth >= ROW_TILES_MIN_DEPTH
                          and per_group >= ROW_TILES_MIN_GROUP_CHANNELS)  # (and the column share, known at bind)
        self.channel_tiles = tiles and per_group >= TILED_MIN_GROUP_CHANNELS
        if self.row_tiles:  # (G, B, D, 6) blocks of 6 output channels for the row tiles
            self.row_packed = fk.pack_row_tile_weights(self.weight, self.groups)
        if self.channel_tiles:  # packed once: (G, B, D, 8) blocks of 8 output channels, the bias likewise
            self.packed = float_conv_avx2.pack_weights(self.weight, self.groups)
            self.packed_bias = float_conv_avx2.pack_bias(self.bias, self.groups, self.packed.shape[1])
        self.padded_inputs: dict[tuple[int, ...], np.ndarray] = {}  # input shape -> zero-padded buffer

    def _padded(self, shape: tuple[int, ...]) -> np.ndarray:
        """The zero-padded input buffer for an input of ``shape`` (one per shape; its border stays zero)."""
        if shape not in self.padded_inputs:
            ph, pw = self.padding
            self.padded_inputs[shape] = np.zeros((shape[0], shape[1], shape[2] + 2 * ph, shape[3] + 2 * pw),
                                                 np.float32)
        return self.padded_inputs[shape]

    def _interior(self, padded: np.ndarray) -> np.ndarray:
        ph, pw = self.padding
        return padded[:, :, ph:padded.shape[2] - ph, pw:padded.shape[3] - pw]

    def input_view(self, shape):
        """The interior of the padded input buffer (a padded layer reading the plan's input: the input is copied
        there directly, not into a buffer of its own and then into this one)."""
        if len(shape) != 4 or self.padding == (0, 0):
            return None
        return self._interior(self._padded(shape))

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
            padded = self._padded(x.shape)
            if x.base is not padded:  # (else x is its interior, written by the step before: nothing to copy)
                calls.append((np.copyto, (self._interior(padded), x)))
        else:
            padded = x
        pool_h, pool_w = self.pool
        if out_h < pool_h or out_w < pool_w:
            raise ValueError(f"conv step {self.step.name!r}: its {out_h}x{out_w} output is smaller than the fused "
                             f"{pool_h}x{pool_w} pool")
        out = np.empty((batch, out_channels, out_h // pool_h, out_w // pool_w), np.float32)
        if self.row_tiles and padded.flags.c_contiguous and _column_share(out_w, padded.shape[3], self.pool) >= \
                ROW_TILES_MIN_COLUMN_SHARE:  # (the plan's buffers are C-contiguous: the flat views stay live)
            taps = float_conv_avx2.offsets(padded.shape, (kh, kw), (1, 1), self.dilation, group_channels, (1, 1), 1)[0]
            step = float_conv_avx2.ROW_TILE_VECTORS * float_conv_avx2.LANES
            length = -(-((out_h - 1) * padded.shape[3] + out_w) // step) * step
            planes = np.empty((float_conv_avx2.ROW_TILE_CHANNELS, length), np.float32)
            last = np.empty(padded[0].size + step, np.float32)  # the last image, with room for its last tile
            calls.append((fk.direct_conv_row_tiles, (padded, self.row_packed, taps, self.bias, self.relu, pool_h,
                                                     pool_w, last, planes, out)))
            return out, calls
        if self.channel_tiles and padded.flags.c_contiguous:
            taps, pixels = float_conv_avx2.offsets(padded.shape, (kh, kw), self.stride, self.dilation, group_channels,
                                                   (out_h, out_w), float_conv_avx2.TILE_PIXELS)
            scratch = np.empty((pixels.size, float_conv_avx2.LANES * float_conv_avx2.TILE_VECTORS), np.float32)
            calls.append((float_conv_avx2.conv_tiles_into, (padded.reshape(-1), self.packed, taps, pixels,
                                                            self.packed_bias, padded.shape[1], out_h, out_w, self.relu,
                                                            pool_h, pool_w, scratch, out)))
            return out, calls
        if self.unit_stride:
            acc = np.empty((out_h - 1) * padded.shape[3] + out_w, np.float32)
            calls.append((fk.direct_conv_unit_stride, (padded, self.weight, self.bias, self.groups, dh, dw, self.relu,
                                                       pool_h, pool_w, acc, out)))
            return out, calls
        if self.groups == 1:  # per-image columns, one BLAS product each (see IMAGE_BLOCK_BYTES)
            pixels = out_h * out_w
            block = max(1, min(batch, IMAGE_BLOCK_BYTES // (4 * pixels * self.depth)))
            cols = np.empty((block, self.depth, pixels), np.float32)
            products = np.empty((block, out_channels, pixels), np.float32)
            calls.append((fk.im2col_image_gemm_conv, (padded, self.grouped[0], self.bias, kh, kw, sh, sw, dh, dw,
                                                      self.relu, pool_h, pool_w, cols, products, out)))
            return out, calls
        columns = fk.im2col_columns(out_h, out_w, padded.shape[3], self.stride)
        block = max(1, min(batch, IM2COL_BLOCK_BYTES // (4 * columns * self.depth)))
        cols = np.empty((self.depth, block * columns), np.float32)  # a block of images, one group: (D, B*L)
        products = np.empty((out_channels // self.groups, block * columns), np.float32)  # (OCg, B*L)
        calls.append((fk.im2col_gemm_conv, (padded, self.grouped, self.bias, kh, kw, sh, sw, dh, dw, self.relu,
                                            pool_h, pool_w, out_h, out_w, cols, products, out)))
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
    """Float linear layer with an N:M weight (stored as :class:`nanoopt.kernels.sparse.NMMatrix`, run by the
    slot-major kernel :func:`nanoopt.kernels.nm_sparse.nm_linear`, as ``SparseLinear`` runs it)."""

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
        self.weight = nm_sparse.prepare_nm(self.matrix)  # slot-major, laid out once
        self._finish(step, self.rows)

    def bind(self, inputs):
        x = inputs[0]
        out = self._check(x)
        calls: list[Call] = [(nm_sparse.nm_linear, (x, self.weight, None, None, False, out))]
        return out, calls + [(fk.bias_act_rows, (out, self.bias, self.relu))]
