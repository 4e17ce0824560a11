"""Direct float32 convolution in register tiles (AVX2 + FMA): outputs never leave registers until their whole sum
is done. Channel tiles (8 output channels per vector) for any stride; the intrinsics of row tiles (8 consecutive
output positions per vector) for unit-stride layers, driven by ``nanoopt.runtime.float_kernels.direct_conv_row_tiles``.

The convolution (NCHW, already padded input ``x``, weight ``w (OC, Cg, KH, KW)``, ``G`` groups of ``Cg`` input and
``OCg`` output channels)

    y[n, o, p] = b[o] + sum_{d = (c, i, j)} w[o, c, i, j] x[n, g Cg + c, y_p s_h + i d_h, x_p s_w + j d_w]

is a product of the weight matrix ``(OCg, D)``, ``D = Cg KH KW``, with columns of input values that im2col would
copy out first. Here no column is copied: every input value is loaded where it lies, broadcast to the 8 lanes of a
register and multiplied into accumulators that hold 8 output channels of one output pixel, as the NCHWc kernels
of ONNX Runtime's MLAS do (Intel's oneDNN calls the layout ``nChw8c``; Georganas et al. 2018, "Anatomy of
high-performance deep learning convolutions on SIMD architectures", SC'18, section 3). A register tile is ``T = 6``
output pixels x ``V = 2`` vectors of 8 channels (12 accumulators, 2 weight vectors and a broadcast: 15 of the 16
ymm registers), and each tap ``d`` costs 2 weight loads, 6 broadcasts and 12 fused multiply-adds: the two FMA
units of an AVX2 core stay busy while the loads need at most two load ports per cycle. A group of at most 8 output
channels would leave half the lanes empty: the runtime chooses this kernel for wider groups.

Row tiles (:func:`row_tile`, :func:`pooled_row_tile`) turn the roles around for thin layers at unit stride: a
vector holds 8 consecutive output positions of one channel on the padded-width rows (position ``q = y Wp + x``
reads ``q + tap[d]``, so 8 neighbours are one unaligned load), and a tile is 2 such vectors x 6 output channels:
per tap 2 input loads, 6 broadcast weights (packed ``(G, B, D, 6)``) and 12 FMAs. The two vectors are 16
consecutive positions, or, for a fused 2x2 pool, the same 8 columns of two consecutive rows, pooled in registers.

Layout. The weights are packed once (:func:`pack_weights`) as ``(G, B, D, 8)``: block ``b`` of a group holds its
output channels ``8 b .. 8 b + 7`` (zeros past ``OCg``; ``B`` even), tap by tap. The address of input value
``(c, i, j)`` under output pixel ``p`` is ``plane(n, g) + tap[d] + pixel[p]`` with ``tap[d] = c Hp Wp + i d_h Wp
+ j d_w`` and ``pixel[p] = y_p s_h Wp + x_p s_w`` (:func:`offsets`): any stride, dilation and padding (the caller
pads), one compiled kernel. The pixel list is padded to a multiple of ``T`` with copies of the last pixel, so
every tile is whole. A tile's sums go, one vector store each, to a per-image scratch of pixel-major rows of 16
channels, from which the maximum over a fused ``pool_h x pool_w`` max pool window (stride = window; 1 x 1 without
a pool), the bias and ReLU are taken 8 channels at a time and written to the NCHW output.

Summation order: each output's taps in ``(c, i, j)`` order, from 0, one rounding per fused multiply-add, the bias
last (after the pool's maximum: adding the bias and ``max(., 0)`` are monotonic). It differs from im2col + BLAS and
from :func:`direct_conv_float_reference` (float64 sums), so the kernel equals the reference to float tolerance.

Shared with the int8 tiles. :func:`tile_step`, :func:`row_tile_step`, :func:`pool_row_tile`, :func:`store_tile` and
:func:`pixel_offsets` also take int32 tiles: each 32-bit input is then a group of int8 taps and the multiply-add
``vpmaddwd`` (int16 weights) or ``vpdpbusd`` (int8 weights), as :mod:`nanoopt.kernels.int8_conv_avx2` uses them;
those instructions are emitted only for int32 tiles, which that module compiles only where the CPU has them.

Availability. The code of the float tiles is plain LLVM vector IR (``<8 x float>``, ``llvm.fmuladd``), which compiles
for any target; it is fast where the target has AVX2 and FMA, and chosen only there (:func:`available`, which asks
:mod:`nanoopt.kernels.cpu_features` first and then checks a small exact convolution). Elsewhere the runtime keeps
its portable kernels (im2col + BLAS, or its direct loop).

>>> import numpy as np
>>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
>>> w = np.ones((1, 1, 3, 3), np.float32)
>>> out = np.empty((1, 1, 2, 2), np.float32)
>>> if available(): conv2d_into(x, w, np.zeros(1, np.float32), 1, (1, 1), (1, 1), False, (1, 1), out)
>>> out[0, 0].tolist() if available() else [[45.0, 54.0], [81.0, 90.0]]
[[45.0, 54.0], [81.0, 90.0]]
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanoopt.kernels.cpu_features import avx2_kernel_works
from nanoopt.kernels.llvm_intrinsics import (
    F32X8,
    I8X32,
    I16X16,
    I32X8,
    LANES,
    declare,
    element_pointer,
    float32x8,
    int32x8,
    is_c_array,
    lanewise,
    load_at,
    load_vector,
    splat,
)

__all__ = ["LANES", "TILE_PIXELS", "TILE_VECTORS", "available", "conv2d_into", "conv_tiles_into",
           "direct_conv_float_reference", "offsets", "pack_bias", "pack_weights", "pixel_offsets", "pool_row_tile",
           "row_tile_step", "store_tile", "tile_step"]

TILE_PIXELS = 6  # output pixels of a register tile
TILE_VECTORS = 2  # 8-channel vectors of a register tile: 6 x 2 = 12 accumulators, 2 weights, 1 broadcast (of 16)
ROW_TILE_CHANNELS = 6  # output channels of a row tile (thin layers)
ROW_TILE_VECTORS = 2  # 8-position vectors of a row tile: 6 x 2 = 12 accumulators, 2 input vectors, 1 broadcast


def pack_weights(weight: np.ndarray, groups: int) -> np.ndarray:
    """The weight ``(OC, Cg, KH, KW)`` as ``(G, B, D, 8)`` float32 blocks of 8 output channels per tap (zeros past
    a group's ``OCg`` channels; ``B`` rounded up to a multiple of :data:`TILE_VECTORS`).

    >>> pack_weights(np.arange(4, dtype=np.float32).reshape(2, 2, 1, 1), 1)[0, 0]
    array([[0., 2., 0., 0., 0., 0., 0., 0.],
           [1., 3., 0., 0., 0., 0., 0., 0.]], dtype=float32)
    """
    out_channels = weight.shape[0]
    per_group, depth = out_channels // groups, int(np.prod(weight.shape[1:]))
    blocks = -(-per_group // (LANES * TILE_VECTORS)) * TILE_VECTORS
    packed = np.zeros((groups, blocks * LANES, depth), np.float32)
    packed[:, :per_group] = weight.reshape(groups, per_group, depth)
    return np.ascontiguousarray(packed.reshape(groups, blocks, LANES, depth).transpose(0, 1, 3, 2))


def pack_bias(bias: np.ndarray, groups: int, blocks: int) -> np.ndarray:
    """The bias ``(OC,)`` as ``(G B 8,)``: block ``b`` of group ``g`` at ``(g B + b) 8``, zeros past ``OCg``.

    >>> pack_bias(np.arange(4, dtype=np.float32), 2, 1).reshape(2, 8)[:, :3]
    array([[0., 1., 0.],
           [2., 3., 0.]], dtype=float32)
    """
    per_group = bias.shape[0] // groups
    packed = np.zeros((groups, blocks * LANES), np.float32)
    packed[:, :per_group] = bias.reshape(groups, per_group)
    return packed.reshape(-1)


def offsets(padded_shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
            dilation: tuple[int, int], group_channels: int, out_size: tuple[int, int],
            tile_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(taps (D,), pixels (P',))`` int64 element offsets into a padded NCHW image (see the module docstring);
    ``P'`` is ``OH OW`` rounded up to a multiple of ``tile_pixels``, the extra entries repeating the last pixel.

    >>> taps, pixels = offsets((1, 1, 4, 4), (2, 2), (1, 1), (1, 1), 1, (3, 3), 4)
    >>> taps.tolist(), pixels.tolist()
    ([0, 1, 4, 5], [0, 1, 2, 4, 5, 6, 8, 9, 10, 10, 10, 10])
    """
    height, width = padded_shape[2], padded_shape[3]
    c, i, j = np.meshgrid(np.arange(group_channels), np.arange(kernel[0]), np.arange(kernel[1]), indexing="ij")
    taps = (c * height * width + i * dilation[0] * width + j * dilation[1]).reshape(-1)
    y, x = np.meshgrid(np.arange(out_size[0]), np.arange(out_size[1]), indexing="ij")
    pixels = (y * stride[0] * width + x * stride[1]).reshape(-1)
    padded = -(-pixels.size // tile_pixels) * tile_pixels
    pixels = np.concatenate([pixels, np.full(padded - pixels.size, pixels[-1])])
    return taps.astype(np.int64), pixels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Intrinsics. A tile is a UniTuple of T V float32x8 accumulators, pixel-major: (pixel 0 vector 0, pixel 0
# vector 1, ..., pixel 1 vector 0, ...).


def _literal(value):
    return value.literal_value if isinstance(value, types.IntegerLiteral) else None


def _tile_type(vector):
    """``(lane dtype of the source and scratch arrays, LLVM vector type)`` of a tile of ``vector`` registers:
    float32 tiles (FMA) here, int32 tiles (:mod:`nanoopt.kernels.int8_conv_avx2`) there; else ``None``."""
    return {float32x8: (types.float32, F32X8), int32x8: (types.int32, I32X8)}.get(vector)


@intrinsic
def _tile_zero(typingctx, pixels, vectors):
    """A tile of ``pixels x vectors`` (compile-time constants) float32 accumulators of +0.0."""
    if _literal(pixels) is None or _literal(vectors) is None:
        return None
    size = _literal(pixels) * _literal(vectors)

    def codegen(context, builder, signature, args):
        zero = ir.Constant(F32X8, [0.0] * LANES)
        return context.make_tuple(builder, signature.return_type, [zero] * size)

    return types.UniTuple(float32x8, size)(pixels, vectors), codegen


@intrinsic
def pixel_offsets(typingctx, pixels, first, count):
    """``pixels[first : first + count]`` as a tuple of ``count`` (a compile-time constant) intp offsets."""
    if _literal(count) is None or not (is_c_array(pixels, types.int64) and isinstance(first, types.Integer)):
        return None
    size = _literal(count)

    def codegen(context, builder, signature, args):
        start = context.cast(builder, args[1], signature.args[1], types.intp)
        values = []
        for t in range(size):
            where = builder.add(start, ir.Constant(start.type, t))
            values.append(builder.load(element_pointer(context, builder, signature.args[0], args[0], types.intp,
                                                       where)))
        return context.make_tuple(builder, signature.return_type, values)

    return types.UniTuple(types.intp, size)(pixels, first, count), codegen


def _emit_fma(builder, x, w, accumulator):
    """``accumulator + x w`` lane-wise, one rounding (``llvm.fmuladd``; an FMA where the target has one)."""
    return builder.call(declare(builder, "llvm.fmuladd.v8f32", F32X8, [F32X8, F32X8, F32X8]), [x, w, accumulator])


def _emit_pairs(builder, x, w, accumulator):
    """``accumulator + x[2l] w[2l] + x[2l+1] w[2l+1]`` per int32 lane ``l`` of int16 pairs (``vpmaddwd``, exact:
    ``|x w| <= 2^14``), then ``vpaddd`` (modulo 2^32)."""
    madd = declare(builder, "llvm.x86.avx2.pmadd.wd", I32X8, [I16X16, I16X16])
    return builder.add(accumulator, builder.call(madd, [builder.bitcast(x, I16X16), builder.bitcast(w, I16X16)]))


def _emit_quads(builder, x, w, accumulator):
    """``accumulator + sum_k x[4l+k] w[4l+k]`` per int32 lane ``l``, ``x`` bytes unsigned, ``w`` signed
    (``vpdpbusd``: AVX-VNNI or AVX512-VNNI with VL; modulo 2^32, no saturation)."""
    dot = declare(builder, "llvm.x86.avx512.vpdpbusd.256", I32X8, [I32X8, I8X32, I8X32])
    return builder.call(dot, [accumulator, builder.bitcast(x, I8X32), builder.bitcast(w, I8X32)])


# the product of a tile step by the dtype of its packed weights: float32 FMA, int16 pairs, int8 quads
_PRODUCTS = {types.float32: _emit_fma, types.int16: _emit_pairs, types.int8: _emit_quads}


@intrinsic
def tile_step(typingctx, tile, source, at, pixels, weights, w_offset, w_stride):
    """One tap: ``V`` weight vectors ``weights[w_offset + v w_stride :]`` (32 bytes each; offsets in elements of
    ``weights``), and per pixel ``t`` the 32 bits at element ``at + pixels[t]`` of ``source`` broadcast and
    multiplied into accumulators ``t V .. t V + V - 1``. Float tiles (float32 source and weights): a fused
    multiply-add per accumulator. int32 tiles (an int8, int16 or int32 source: the 32 bits are a group of taps):
    int16 weights, ``vpmaddwd`` of int16 pairs; int8 weights, ``vpdpbusd`` of unsigned byte quads
    (:mod:`nanoopt.kernels.int8_conv_avx2`)."""
    if not (isinstance(tile, types.UniTuple) and _tile_type(tile.dtype) and isinstance(pixels, types.UniTuple)):
        return None
    lane_dtype, vector_type = _tile_type(tile.dtype)
    sources = (lane_dtype,) if lane_dtype == types.float32 else (types.int8, types.int16, types.int32)
    if not (isinstance(source, types.Array) and source.layout == "C" and source.dtype in sources):
        return None
    if not (isinstance(weights, types.Array) and weights.layout == "C" and weights.dtype in _PRODUCTS):
        return None
    if (lane_dtype == types.float32) != (weights.dtype == types.float32):
        return None
    product = _PRODUCTS[weights.dtype]
    if not all(isinstance(value, types.Integer) for value in (at, w_offset, w_stride)):
        return None
    count, size = tile.count, pixels.count
    if count % size:
        return None
    vectors = count // size

    def codegen(context, builder, signature, args):
        tile_value, source_value, at_value, pixel_values, weights_value, w_start, w_step = args
        tile_type, source_type, at_type, _, weights_type, w_type, step_type = signature.args
        at_value = context.cast(builder, at_value, at_type, types.intp)
        w_start = context.cast(builder, w_start, w_type, types.intp)
        w_step = context.cast(builder, w_step, step_type, types.intp)
        w = []
        for v in range(vectors):
            where = builder.add(w_start, builder.mul(w_step, ir.Constant(w_step.type, v)))
            w.append(load_at(context, builder, weights_type, weights_value, where, vector_type, align=4))
        values = [builder.extract_value(tile_value, index) for index in range(count)]
        for t in range(size):
            where = builder.add(at_value, builder.extract_value(pixel_values, t))
            pointer = element_pointer(context, builder, source_type, source_value, types.intp, where)
            lane = builder.load(builder.bitcast(pointer, vector_type.element.as_pointer()), align=1)
            x = splat(builder, lane, vector_type)  # a float, or 32 bits of packed taps from element ``where`` on
            for v in range(vectors):
                index = t * vectors + v
                values[index] = product(builder, x, w[v], values[index])
        return context.make_tuple(builder, tile_type, values)

    return tile(tile, source, at, pixels, weights, w_offset, w_stride), codegen


@intrinsic
def store_tile(typingctx, scratch, tile, at, count):
    """Vector ``v`` of pixel ``t`` to ``scratch[at + t 8 V + 8 v :][:8]`` (pixel-major rows of ``8 V`` channels;
    ``count`` the tile's pixels, a compile-time constant; a float32 tile to a float32 scratch, an int32 one to an
    int32 scratch)."""
    if _literal(count) is None or not (isinstance(tile, types.UniTuple) and _tile_type(tile.dtype)):
        return None
    lane_dtype, vector_type = _tile_type(tile.dtype)
    if not (is_c_array(scratch, lane_dtype) and isinstance(at, types.Integer)):
        return None
    size = _literal(count)
    if tile.count % size:
        return None

    def codegen(context, builder, signature, args):
        scratch_type, tile_type, at_type, _ = signature.args
        start = context.cast(builder, args[2], at_type, types.intp)
        for index in range(tile_type.count):
            where = builder.add(start, ir.Constant(start.type, index * LANES))
            pointer = element_pointer(context, builder, scratch_type, args[0], types.intp, where)
            builder.store(builder.extract_value(args[1], index), builder.bitcast(pointer, vector_type.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return types.none(scratch, tile, at, count), codegen


_load = load_vector("_load", float32x8, F32X8, (types.float32,), 4, "``array[offset : offset + 8]`` (float32).")
_add = lanewise("_add", float32x8, ir.IRBuilder.fadd, "Lane-wise ``fl(a + b)``.")


def _emit_max(builder, a, b):
    """``b if b > a else a``, lane-wise (code generation)."""
    return builder.select(builder.fcmp_ordered(">", b, a), b, a)


_max = lanewise("_max", float32x8, _emit_max, "Lane-wise ``b if b > a else a``.")


def _emit_max_signed(builder, a, b):
    """``b if b > a else a``, lane-wise on signed integers (code generation)."""
    return builder.select(builder.icmp_signed(">", b, a), b, a)


@intrinsic
def _lane(typingctx, vector, index):
    """Lane ``index`` (0..7) of the vector as a float32."""
    if not (vector == float32x8 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], signature.args[1], types.int32))

    return types.float32(vector, index), codegen


# Row tiles for thin layers (at most ROW_TILE_CHANNELS output channels per block): the accumulators hold 8
# consecutive positions of the flat padded-width output of one channel each, channel-major: (channel 0 positions
# 0-7, channel 0 positions 8-15, channel 1 positions 0-7, ...).


@intrinsic
def row_tile_step(typingctx, tile, source, at, spacing, weights, w_offset):
    """One tap of a row tile: per vector ``r`` of positions the 8 inputs ``source[at + r spacing :][:8]`` (one
    unaligned load), per channel ``k`` the weight ``weights[w_offset + k]`` broadcast, multiply-added into
    accumulator ``k R + r``. An int32 tile reads an int32 ``source`` of packed tap groups and broadcasts the 32 bits
    of channel ``k`` from element ``w_offset + k G`` of int16 (pairs, ``G = 2``) or int8 (quads, ``G = 4``) weights,
    multiplied as in :func:`tile_step`."""
    if not (isinstance(tile, types.UniTuple) and _tile_type(tile.dtype) and tile.count % ROW_TILE_CHANNELS == 0):
        return None
    lane_dtype, vector_type = _tile_type(tile.dtype)
    if not (is_c_array(source, lane_dtype) and isinstance(weights, types.Array) and weights.layout == "C"):
        return None
    if weights.dtype not in _PRODUCTS or (lane_dtype == types.float32) != (weights.dtype == types.float32):
        return None
    if not all(isinstance(value, types.Integer) for value in (at, spacing, w_offset)):
        return None
    rows = tile.count // ROW_TILE_CHANNELS
    product, per_lane = _PRODUCTS[weights.dtype], 32 // weights.dtype.bitwidth

    def codegen(context, builder, signature, args):
        tile_value, source_value, at_value, spacing_value, weights_value, w_start = args
        tile_type, source_type, at_type, spacing_type, weights_type, w_type = signature.args
        at_value = context.cast(builder, at_value, at_type, types.intp)
        spacing_value = context.cast(builder, spacing_value, spacing_type, types.intp)
        w_start = context.cast(builder, w_start, w_type, types.intp)
        x = [load_at(context, builder, source_type, source_value,
                     builder.add(at_value, builder.mul(spacing_value, ir.Constant(at_value.type, r))), vector_type,
                     align=4)
             for r in range(rows)]
        values = [builder.extract_value(tile_value, index) for index in range(tile_type.count)]
        for k in range(ROW_TILE_CHANNELS):
            where = builder.add(w_start, ir.Constant(w_start.type, k * per_lane))
            pointer = element_pointer(context, builder, weights_type, weights_value, types.intp, where)
            lane = builder.load(builder.bitcast(pointer, vector_type.element.as_pointer()), align=1)
            w = splat(builder, lane, vector_type)
            for r in range(rows):
                values[k * rows + r] = product(builder, x[r], w, values[k * rows + r])
        return context.make_tuple(builder, tile_type, values)

    return tile(tile, source, at, spacing, weights, w_offset), codegen


@intrinsic
def pool_row_tile(typingctx, tile):
    """Per channel ``k`` of a row tile of two vectors (two rows of 8 positions, one under the other): the maximum of
    each 2 x 2 window, ``max(max(a_j, b_j), max(a_j', b_j'))`` for the pair ``j, j' = 2 i, 2 i + 1``, in lane ``2 i``
    (lanes ``2 i + 1`` hold the same maximum); a tuple of 6 vectors (float32, or int32 compared signed)."""
    if not (isinstance(tile, types.UniTuple) and _tile_type(tile.dtype) and tile.count == 2 * ROW_TILE_CHANNELS):
        return None
    emit = _emit_max if tile.dtype == float32x8 else _emit_max_signed

    def codegen(context, builder, signature, args):
        swap = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [1, 0, 3, 2, 5, 4, 7, 6])
        pooled = []
        for k in range(ROW_TILE_CHANNELS):
            rows = emit(builder, builder.extract_value(args[0], 2 * k), builder.extract_value(args[0], 2 * k + 1))
            pooled.append(emit(builder, rows, builder.shuffle_vector(rows, rows, swap)))
        return context.make_tuple(builder, signature.return_type, pooled)

    return types.UniTuple(tile.dtype, ROW_TILE_CHANNELS)(tile), codegen


@intrinsic
def _store_row_tile(typingctx, planes, tile, at):
    """Accumulator ``k R + r`` to ``planes[k, at + 8 r :][:8]`` (a 2-D float32 C array of channel planes)."""
    if not (isinstance(tile, types.UniTuple) and tile.dtype == float32x8 and tile.count % ROW_TILE_CHANNELS == 0):
        return None
    if not (is_c_array(planes, types.float32) and planes.ndim == 2 and isinstance(at, types.Integer)):
        return None
    rows = tile.count // ROW_TILE_CHANNELS

    def codegen(context, builder, signature, args):
        planes_type, tile_type, at_type = signature.args
        array = context.make_array(planes_type)(context, builder, args[0])
        width = builder.extract_value(array.shape, 1)
        start = context.cast(builder, args[2], at_type, types.intp)
        for k in range(ROW_TILE_CHANNELS):
            for r in range(rows):
                where = builder.add(builder.mul(width, ir.Constant(width.type, k)),
                                    builder.add(start, ir.Constant(start.type, r * LANES)))
                pointer = builder.bitcast(builder.gep(array.data, [where]), F32X8.as_pointer())
                builder.store(builder.extract_value(args[1], k * rows + r), pointer, align=4)
        return context.get_dummy_value()

    return types.none(planes, tile, at), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _row_tile_sums(source, at, spacing, taps, weights, w_base):  # pragma: no cover - compiled
    """The 12 accumulators ``sum_d weights[w_base + 6 d + k] source[at + r spacing + t + taps[d]]`` (channel ``k <
    6``, vector ``r < 2``, lane ``t < 8``; taps in order, FMA from 0)."""
    tile = _tile_zero(ROW_TILE_CHANNELS, ROW_TILE_VECTORS)
    for d in range(taps.shape[0]):
        tile = row_tile_step(tile, source, at + taps[d], spacing, weights, w_base + d * ROW_TILE_CHANNELS)
    return tile


@numba.njit(cache=True, nogil=True, inline="always")
def row_tile(source, at, taps, weights, w_base, planes, q0):  # pragma: no cover - compiled
    """One row tile of 16 consecutive positions: ``planes[k, q0 + t] = sum_d weights[w_base + 6 d + k] source[at +
    q0 + t + taps[d]]`` for ``k < 6`` and ``t < 16`` (taps in order, FMA from 0)."""
    _store_row_tile(planes, _row_tile_sums(source, at + q0, LANES, taps, weights, w_base), q0)


@numba.njit(cache=True, nogil=True, inline="always")
def pooled_row_tile(source, at, row_step, taps, weights, w_base, bias, relu, channels, count, out, first, y, x):
    """One row tile over two rows (8 positions at ``at`` and 8 at ``at + row_step``) with its 2 x 2 max pool, plus
    ``bias``, then ``max(., 0)`` if ``relu``: ``out[first + k, y, x + i]`` for ``k < channels`` and ``i <
    count`` (at most 4 pooled columns)."""
    pooled = pool_row_tile(_row_tile_sums(source, at, row_step, taps, weights, w_base))
    for k in range(channels):
        vector = pooled[k]
        line = out[first + k, y]
        shift = bias[first + k]
        for i in range(count):
            value = _lane(vector, 2 * i) + shift
            line[x + i] = max(value, np.float32(0.0)) if relu else value


# ---------------------------------------------------------------------------------------------------------
# The kernel.


@numba.njit(cache=True, nogil=True, inline="always")
def _write_block(scratch, row, out_w, shift, first, valid, relu, pool_h, pool_w, out, n):  # pragma: no cover
    """Output channels ``first .. first + valid - 1`` of image ``n`` from lanes ``0 .. valid - 1`` of column block
    ``scratch[:, row : row + 8]`` (pixel-major rows of ``width`` floats): the maximum over each pool window, plus
    the bias vector ``shift``, then ``max(., 0)`` if ``relu``."""
    width = scratch.shape[1]
    flat = scratch.reshape(-1)
    for y in range(out.shape[2]):
        for xx in range(out.shape[3]):
            top = (y * pool_h * out_w + xx * pool_w) * width + row
            best = _load(flat, top)
            for i in range(pool_h):
                for j in range(pool_w):
                    best = _max(best, _load(flat, top + (i * out_w + j) * width))
            best = _add(best, shift)
            for lane in range(valid):
                value = _lane(best, lane)
                out[n, first + lane, y, xx] = max(value, np.float32(0.0)) if relu else value


@numba.njit(cache=True, nogil=True)
def _convolve(pixels_per_tile, vectors, source, packed, taps, pixels, bias, channels, out_h, out_w, relu, pool_h,
              pool_w, scratch, out):  # pragma: no cover - compiled
    numba.literally(pixels_per_tile)
    numba.literally(vectors)
    batch, out_channels = out.shape[0], out.shape[1]
    if batch == 0:
        return
    groups, blocks, depth = packed.shape[0], packed.shape[1], packed.shape[2]
    per_group = out_channels // groups
    group_channels = channels // groups
    plane = source.shape[0] // (batch * channels)
    flat_weights = packed.reshape(-1)
    flat_scratch = scratch.reshape(-1)
    count = pixels.shape[0]
    for n in range(batch):
        for g in range(groups):
            at = (n * channels + g * group_channels) * plane
            for b0 in range(0, blocks, vectors):
                w_base = (g * blocks + b0) * depth * LANES
                for p0 in range(0, count, pixels_per_tile):
                    where = pixel_offsets(pixels, p0, pixels_per_tile)
                    tile = _tile_zero(pixels_per_tile, vectors)
                    for d in range(depth):
                        tile = tile_step(tile, source, at + taps[d], where, flat_weights, w_base + d * LANES,
                                          depth * LANES)
                    store_tile(flat_scratch, tile, p0 * vectors * LANES, pixels_per_tile)
                for v in range(vectors):
                    valid = min(LANES, per_group - LANES * (b0 + v))
                    if valid > 0:
                        shift = _load(bias, (g * blocks + b0 + v) * LANES)
                        _write_block(scratch, v * LANES, out_w, shift, g * per_group + (b0 + v) * LANES, valid, relu,
                                     pool_h, pool_w, out, n)


@numba.njit(cache=True, nogil=True)
def conv_tiles_into(source, packed, taps, pixels, bias, channels, out_h, out_w, relu, pool_h, pool_w, scratch,
                    out):  # pragma: no cover - compiled
    """The convolution (see the module docstring) of the flat padded NCHW input ``source`` (C order, ``channels``
    channels per image) into ``out (N, OC, OH // pool_h, OW // pool_w)``, with the packed weights and bias
    (:func:`pack_weights`, :func:`pack_bias`), the offsets of :func:`offsets` and a float32 ``scratch`` of
    ``(len(pixels), 8 TILE_VECTORS)``. No checks: call through :func:`conv2d_into` or as a plan does, with
    arguments it has checked, where :func:`available` is True."""
    _convolve(TILE_PIXELS, TILE_VECTORS, source, packed, taps, pixels, bias, channels, out_h, out_w, relu, pool_h,
              pool_w, scratch, out)


def _check_arguments(padded, weight, bias, groups, pool, out) -> tuple[int, int]:
    for name, array, ndim in (("padded", padded, 4), ("weight", weight, 4), ("bias", bias, 1), ("out", out, 4)):
        if not (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == ndim):
            got = (f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray)
                   else type(array).__name__)
            raise TypeError(f"conv2d_into: {name} must be a {ndim}-D float32 array, got {got}")
    out_channels, group_channels = weight.shape[:2]
    if groups < 1 or out_channels % groups or padded.shape[1] != groups * group_channels:
        raise ValueError(f"conv2d_into: weight {weight.shape} with groups={groups} does not fit an input of "
                         f"{padded.shape[1]} channels")
    if bias.shape != (out_channels,):
        raise ValueError(f"conv2d_into: bias must have shape ({out_channels},), got {bias.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("conv2d_into: out must be C-contiguous")
    return out_channels, group_channels


def conv2d_into(padded: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int, stride: tuple[int, int],
                dilation: tuple[int, int], relu: bool, pool: tuple[int, int], out: np.ndarray) -> None:
    """``out = pool?(max?(conv(padded, weight) + bias, 0))`` with the register-tiled kernel, for an already padded
    NCHW float32 input (a ``pool_h x pool_w`` max pool with stride = window; ``(1, 1)``: none). Packs the weights
    and offsets on each call (a runtime plan packs them once and calls :func:`conv_tiles_into`). Raises
    ``TypeError``/``ValueError`` naming the argument for arrays of the wrong dtype or shape, ``RuntimeError`` where
    :func:`available` is False.

    >>> out = np.empty((1, 1, 1, 1), np.float32)
    >>> if available(): conv2d_into(np.ones((1, 2, 2, 2), np.float32), np.ones((1, 2, 2, 2), np.float32),
    ...                             np.ones(1, np.float32), 1, (1, 1), (1, 1), False, (1, 1), out)
    >>> float(out[0, 0, 0, 0]) if available() else 9.0
    9.0
    """
    out_channels, group_channels = _check_arguments(padded, weight, bias, groups, pool, out)
    kernel = weight.shape[2:]
    out_h = (padded.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (padded.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    expected = (padded.shape[0], out_channels, out_h // pool[0], out_w // pool[1])
    if min(out_h, out_w, *stride, *dilation, *pool) < 1 or out.shape != expected:
        raise ValueError(f"conv2d_into: out must have shape {expected} for this input, kernel, stride "
                         f"{stride}, dilation {dilation} and pool {pool}, got {out.shape}")
    if not available():
        raise RuntimeError("conv2d_into needs AVX2 and FMA, which are not usable here (see "
                           "nanoopt.kernels.cpu_features); use the runtime's portable float convolutions")
    packed = pack_weights(weight, groups)
    taps, pixels = offsets(padded.shape, kernel, stride, dilation, group_channels, (out_h, out_w), TILE_PIXELS)
    scratch = np.empty((pixels.size, LANES * TILE_VECTORS), np.float32)  # (P', 16)
    conv_tiles_into(np.ascontiguousarray(padded).reshape(-1), packed, taps, pixels,
                    pack_bias(bias, groups, packed.shape[1]), padded.shape[1], out_h, out_w, relu, *pool, scratch, out)


def direct_conv_float_reference(padded: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int,
                                stride: tuple[int, int], dilation: tuple[int, int], relu: bool,
                                pool: tuple[int, int]) -> np.ndarray:
    """NumPy reference of :func:`conv2d_into` (float64 sums, then the pool, the bias and ReLU, rounded to float32
    once).

    >>> direct_conv_float_reference(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4),
    ...                             np.ones((1, 1, 3, 3), np.float32), np.ones(1, np.float32), 1, (1, 1), (1, 1),
    ...                             False, (2, 2))[0, 0].tolist()
    [[91.0]]
    """
    batch, channels, height, width = padded.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    out_h = (height - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    sums = np.zeros((batch, out_channels, out_h, out_w), np.float64)
    per_group = out_channels // groups
    for o in range(out_channels):
        g = o // per_group
        for c in range(group_channels):
            for i in range(kernel_h):
                for j in range(kernel_w):
                    top, left = i * dilation[0], j * dilation[1]
                    window = padded[:, g * group_channels + c, top:top + stride[0] * (out_h - 1) + 1:stride[0],
                                    left:left + stride[1] * (out_w - 1) + 1:stride[1]]
                    sums[:, o] += float(weight[o, c, i, j]) * window
    ph, pw = pool
    sums = sums[:, :, :out_h // ph * ph, :out_w // pw * pw]
    pooled = sums.reshape(batch, out_channels, out_h // ph, ph, out_w // pw, pw).max(axis=(3, 5))
    pooled = pooled + bias.reshape(1, -1, 1, 1)
    return (np.maximum(pooled, 0) if relu else pooled).astype(np.float32)


def _self_test() -> bool:
    """Compile the kernels and check small products whose sums are exact (small integers): a convolution of 2 groups
    of 11 output channels (a full and a partial block), stride 2 in width, a 2 x 2 pool; and one row tile."""
    rng = np.random.default_rng(20251205)
    x = rng.integers(-4, 5, size=(2, 6, 7, 9)).astype(np.float32)
    w = rng.integers(-4, 5, size=(22, 3, 3, 2)).astype(np.float32)
    b = rng.integers(-4, 5, size=22).astype(np.float32)
    packed = pack_weights(w, 2)
    taps, pixels = offsets(x.shape, (3, 2), (1, 2), (1, 1), 3, (5, 4), TILE_PIXELS)
    out = np.empty((2, 22, 2, 2), np.float32)
    conv_tiles_into(x.reshape(-1), packed, taps, pixels, pack_bias(b, 2, packed.shape[1]), 6, 5, 4, True, 2, 2,
                    np.empty((pixels.size, LANES * TILE_VECTORS), np.float32), out)
    if not np.array_equal(out, direct_conv_float_reference(x, w, b, 2, (1, 2), (1, 1), True, (2, 2))):
        return False
    source = rng.integers(-4, 5, size=64).astype(np.float32)  # a row tile: 3 taps, 16 positions, 6 channels
    weights = rng.integers(-4, 5, size=(3, ROW_TILE_CHANNELS)).astype(np.float32)
    taps = np.array([0, 5, 17], np.int64)
    planes = np.zeros((ROW_TILE_CHANNELS, 32), np.float32)
    row_tile(source, 2, taps, weights.reshape(-1), 0, planes, 16)
    expected = sum(np.outer(weights[d], source[18 + taps[d]:34 + taps[d]]) for d in range(3))
    return bool(np.array_equal(planes[:, 16:], expected) and not planes[:, :16].any())


@functools.cache
def available() -> bool:
    """True if the register-tiled kernel is chosen here: AVX2 usable (:func:`~nanoopt.kernels.cpu_features.
    avx2_kernel_works`; FMA comes with it on every AVX2 CPU, and ``llvm.fmuladd`` fuses only where the target has
    it) and the self-test exact. Checked once per process; ``available.cache_clear()`` forgets the answer.

    >>> isinstance(available(), bool)
    True
    """
    return avx2_kernel_works(_self_test)
