"""Direct int8 convolution in x86 register tiles: the int32 sums of 6 output pixels x 16 output channels stay in
registers over all the taps (no im2col columns), then the fused max pool, requantization, ReLU and zero point in
32-bit lanes.

The convolution of int8 codes (Jacob et al. 2018, eq. 7-8; the specification is
:func:`nanoopt.kernels.reference.quantized_conv2d`, followed by ``quantized_max_pool2d`` for a fused pool)

    acc[n, o, p] = sum_{c, i, j} w[o, c, i, j] xp[n, g Cg + c, y_p s_h + i d_h, x_p s_w + j d_w]

runs over the raw codes of the input padded with its zero point ``xp``; the epilogue adds ``bias - x_zp rowsum(w)``
(the offsets of every int8 conv kernel here). It is computed as the float channel tiles of
:mod:`nanoopt.kernels.float_conv_avx2` compute theirs -- the same loop nest and the same intrinsics
(``tile_step``: per tap 2 weight vectors of 8 channels, per pixel one broadcast input, 12 accumulators) -- except
that one 32-bit lane holds ``G`` consecutive taps of a kernel row:

* **pairs** (``G = 2``, every AVX2 CPU): the input as int16 pairs ``(xp[q], xp[q + d_w])``, the weights as int16
  pairs; ``vpmaddwd`` multiplies and adds each pair into an int32 lane and ``vpaddd`` accumulates. Exact for every
  code the specification allows (``|x w| <= 128 * 128``, a pair sum at most ``2^15``): no saturation, where
  ``vpmaddubsw`` (u8 x s8 into s16) saturates for full-range codes (``docs/kernels.md``). 2 instructions per 16
  products, the same count per product as the sign-mask GEMM's 4 per 32, without its sign split and row
  corrections.
* **quads** (``G = 4``, AVX-VNNI, or AVX512-VNNI with AVX512-VL): the input as unsigned bytes ``xp + 128``, four
  taps per lane, the weights as int8 quads; ``vpdpbusd`` adds the four products to the lane (no saturation, int32
  wrapping): 1 instruction per 32 products. The offset trick's ``128 rowsum(w)`` is taken off in the epilogue.

A kernel row of ``KW`` taps takes ``ceil(KW / G)`` lanes (the last one padded with zero weights), so a layer does
``Cg KH ceil(KW / G)`` steps. The input of tap group ``(c, i, k)`` under output pixel ``p`` is ``lanes[plane(n, g)
+ c Hp Wp + i d_h Wp + k G d_w + pixel[p]]`` (the float kernels' :func:`~nanoopt.kernels.float_conv_avx2.offsets`
with ``ceil(KW / G)`` columns of dilation ``G d_w``), where ``lanes[q] = pack(xp[q], xp[q + d_w], ...)`` is written
once per image from the padded planes (:func:`pack_lanes_reference` is its NumPy form). Any stride, dilation,
padding and grouping.

Epilogue (exact, the reference's arithmetic): per 8 channels the sums plus offsets (int32 wrapping: the true value
fits int32, the layer's "fast" epilogue, see :func:`prepare`), the maximum over each ``pool_h x pool_w`` window
(stride = window), then the requantization of :func:`nanoopt.kernels.avx2_requant.emit_requantize` (gemmlowp's
multiply and rounding shift, the zero point, the clamp that is also the ReLU) in 32-bit lanes. Pooling before
requantizing gives the reference's codes: the requantization is non-decreasing in the accumulator (``m0 > 0``, a
rounding shift, an addition, a clamp), so the maximum of the codes is the code of the maximum.

Availability: the instructions compile only where the CPU, Numba's target and ``NANOOPT_CPU_FEATURES`` have them
(:mod:`nanoopt.kernels.cpu_features`), and :func:`taps_per_lane` names the form that runs here after a small exact
self-test (4 with 256-bit VNNI, 2 with AVX2, 0: neither, use the portable kernels). Speed: ``docs/kernels.md``.

>>> x = np.arange(16, dtype=np.int8).reshape(1, 1, 4, 4)
>>> w = np.ones((1, 1, 3, 3), np.int8)
>>> conv2d_s8_reference(x, w, None, 0, 2**30, 0, 0, QuantSpec(), pool=(2, 2))[0, 0].tolist()
[[45]]
>>> conv2d_s8(x, w, None, 0, 2**30, 0, 0, QuantSpec(), pool=(2, 2))[0, 0].tolist() if taps_per_lane() else [[45]]
[[45]]
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanoopt.kernels import float_conv_avx2 as fc
from nanoopt.kernels import llvm_intrinsics
from nanoopt.kernels import reference as ref
from nanoopt.kernels.avx2_requant import emit_requantize
from nanoopt.kernels.cpu_features import avx2_kernel_works, target_has_avx_vnni
from nanoopt.kernels.float_conv_avx2 import ROW_TILE_CHANNELS, TILE_PIXELS, TILE_VECTORS
from nanoopt.kernels.llvm_intrinsics import I32X8, LANES, element_pointer, int32x8, is_c_array, lanewise, splat
from nanoopt.kernels.numba_conv import pack_conv2d_weights
from nanoopt.kernels.numba_epilogue import layer_epilogue
from nanoopt.spec import QuantSpec

__all__ = ["PAIRS", "QUADS", "along_channels", "conv2d_s8", "conv2d_s8_reference", "conv_rows_s8_into",
           "conv_s8_into", "geometry", "pack_epilogue", "pack_lanes_reference", "pack_weights", "prepare",
           "taps_per_lane"]

PAIRS = 2  # taps per 32-bit lane of the AVX2 form: int16 pairs, vpmaddwd
QUADS = 4  # taps per 32-bit lane of the VNNI form: unsigned byte quads, vpdpbusd
ACCUMULATORS = TILE_PIXELS * TILE_VECTORS  # int32x8 registers of a tile: 12


def along_channels(weight_shape: tuple[int, ...], per_lane: int) -> bool:
    """Whether a lane holds ``per_lane`` input channels of one tap (True) or ``per_lane`` taps of one kernel row:
    whichever leaves fewer empty slots (``Cg`` or ``KW`` rounded up to a multiple of ``per_lane``); rows on a tie.

    >>> along_channels((16, 6, 5, 5), PAIRS), along_channels((6, 1, 5, 5), PAIRS), along_channels((8, 3, 3, 3), 4)
    (True, False, False)
    """
    channels, kw = weight_shape[1], weight_shape[3]
    return -(-channels // per_lane) * per_lane * kw < channels * -(-kw // per_lane) * per_lane


def pack_weights(weight: np.ndarray, groups: int, per_lane: int, rows: bool = False) -> np.ndarray:
    """The int8 weight ``(OC, Cg, KH, KW)`` as ``(G, B, D, C per_lane)`` blocks of ``C`` output channels per tap
    group: int16 pairs (``per_lane = 2``) or int8 quads (4) of taps along a kernel row (``D = Cg KH ceil(KW /
    per_lane)``) or along the input channels (``D = ceil(Cg / per_lane) KH KW``; :func:`along_channels`), zeros past
    ``KW`` or ``Cg`` and past a group's output channels. Channel tiles: ``C = 8`` (a vector), ``B`` a multiple of
    the tiles' 2 vectors; row tiles (``rows``): ``C = 6``, one block per tile.

    >>> pack_weights(np.arange(1, 7, dtype=np.int8).reshape(2, 1, 1, 3), 1, PAIRS)[0, 0, :, :4].tolist()
    [[1, 2, 4, 5], [3, 0, 6, 0]]
    """
    out_channels, group_channels, kh, kw = weight.shape
    per_group = out_channels // groups
    dtype = np.int16 if per_lane == PAIRS else np.int8
    if along_channels(weight.shape, per_lane):  # lane k: input channel G c' + k of the same tap (i, j)
        widened = np.zeros((out_channels, -(-group_channels // per_lane) * per_lane, kh, kw), dtype)
        widened[:, :group_channels] = weight
        widened = widened.reshape(out_channels, -1, per_lane, kh, kw).transpose(0, 1, 3, 4, 2)
    else:  # lane k: tap (i, G j' + k) of the same channel
        widened = np.zeros((out_channels, group_channels, kh, -(-kw // per_lane) * per_lane), dtype)
        widened[..., :kw] = weight
    depth = widened[0].size // per_lane
    widened = np.ascontiguousarray(widened)
    width, multiple = (ROW_TILE_CHANNELS, 1) if rows else (LANES, TILE_VECTORS)
    blocks = -(-per_group // (width * multiple)) * multiple
    packed = np.zeros((groups, blocks * width, depth, per_lane), dtype)
    packed[:, :per_group] = widened.reshape(groups, per_group, depth, per_lane)
    packed = packed.reshape(groups, blocks, width, depth, per_lane).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(packed).reshape(groups, blocks, depth, width * per_lane)


def pack_epilogue(offsets_: np.ndarray, m0: np.ndarray, shift: np.ndarray, zero_point: int, low: int, high: int,
                  groups: int, blocks: int) -> tuple:
    """``(offsets, m0, shift, zero_point, low - zero_point, high - zero_point)``: the per-channel int64 ``offsets``
    (wrapped to int32), ``m0`` and ``shift`` as int32 vectors of ``(G B 8,)``, block ``b`` of group ``g`` at ``(g B +
    b) 8`` (``m0 = 2^30``, shift 0 and offset 0 past a group's channels), then int64 scalars.

    >>> pack_epilogue(np.array([5, -7]), np.array([2**30] * 2), np.array([1, 2]), 3, -128, 127, 2, 1)[0][[0, 8]]
    array([ 5, -7], dtype=int32)
    """
    per_group = offsets_.shape[0] // groups
    vectors = []
    for values, fill in ((offsets_, 0), (m0, 2**30), (shift, 0)):
        vector = np.full((groups, blocks * LANES), fill, np.int64)
        vector[:, :per_group] = np.asarray(values, np.int64).reshape(groups, per_group)
        vectors.append(vector.reshape(-1).astype(np.uint32).view(np.int32))  # int32, wrapping
    return (*vectors, np.int64(zero_point), np.int64(low - zero_point), np.int64(high - zero_point))


def pack_lanes_reference(padded: np.ndarray, spacing: int, per_lane: int) -> np.ndarray:
    """NumPy form of the packed input: ``lanes[q] = (xp[q] & 0xFFFF) | (xp[q + spacing] << 16)`` (pairs) or ``sum_k
    ((xp[q + k spacing] + 128) & 255) << 8 k`` (quads) over the flat padded codes ``xp``, as int32; past the end
    the zero point's code is the first element's... any value: only zero weights read it (here ``xp[-1]``).

    >>> pack_lanes_reference(np.array([-1, 2, 3], np.int8), 1, PAIRS).view(np.int16).tolist()
    [-1, 2, 2, 3, 3, 3]
    """
    flat = padded.reshape(-1).astype(np.int64)
    tail = np.concatenate([flat, np.full((per_lane - 1) * spacing, flat[-1])])
    parts = [tail[k * spacing: k * spacing + flat.size] for k in range(per_lane)]
    if per_lane == PAIRS:
        words = (parts[0] & 0xFFFF) | ((parts[1] & 0xFFFF) << 16)
    else:
        words = sum(((part + 128) & 255) << (8 * k) for k, part in enumerate(parts))
    return words.astype(np.uint32).view(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Intrinsics on int32x8 registers (the multiply-adds are float_conv_avx2.tile_step's, chosen by the weights' dtype).

_load = llvm_intrinsics.load_vector("_load", int32x8, I32X8, (types.int32,), 4, "``array[offset : offset + 8]``.")
I8X8 = ir.VectorType(ir.IntType(8), LANES)  # eight int8 codes
_add = lanewise("_add", int32x8, ir.IRBuilder.add, "Lane-wise ``a + b`` modulo 2^32.")
_max = lanewise("_max", int32x8, lambda builder, a, b: builder.select(builder.icmp_signed(">", b, a), b, a),
                "Lane-wise ``max(a, b)`` (signed).")


@intrinsic
def _zero_tile(typingctx, count):
    """A tuple of ``count`` (a compile-time constant) int32x8 zeros."""
    if not isinstance(count, types.IntegerLiteral):
        return None
    size = count.literal_value

    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, signature.return_type, [ir.Constant(I32X8, [0] * LANES)] * size)

    return types.UniTuple(int32x8, size)(count), codegen


@intrinsic
def _requantize_into(typingctx, codes, at, value, m0, shift, zero_point, below, above):
    """``codes[at : at + 8]`` (int8) = the codes of the exact sums ``value`` (int32x8):
    :func:`~nanoopt.kernels.avx2_requant.emit_requantize` with per-lane ``m0``/``shift`` and the clamp ``[below,
    above]`` relative to ``zero_point``, narrowed to bytes (the codes lie in [-128, 127])."""
    vectors = (value, m0, shift)
    if not (all(vector == int32x8 for vector in vectors) and is_c_array(codes, types.int8)):
        return None
    if not all(isinstance(scalar, types.Integer) for scalar in (at, zero_point, below, above)):
        return None

    def codegen(context, builder, signature, args):
        zero, low, high = (splat(builder, context.cast(builder, args[i], signature.args[i], types.int32), I32X8)
                           for i in (5, 6, 7))
        result = builder.trunc(emit_requantize(builder, args[2], args[3], args[4], low, high, zero), I8X8)
        target = element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        builder.store(result, builder.bitcast(target, I8X8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(codes, at, value, m0, shift, zero_point, below, above), codegen


# ---------------------------------------------------------------------------------------------------------
# The kernel.


@numba.njit(cache=True, nogil=True, inline="always")
def _pack_lanes(source, geometry, channels, per_lane, lanes):  # pragma: no cover - compiled
    """The packed lanes of one image: plane ``L = g C' + c'`` of ``lanes`` holds ``pack(source[b + q], source[b + q
    + step], ...)`` with ``b = (g Cg + c' cstep) plane``: int16 pairs, or the bytes of ``source`` (already ``x + 128``
    as bytes) four at a time (unsigned arithmetic and offsets, so that LLVM vectorises it). ``cstep, step``: ``1,
    d_w`` for taps along a kernel row, ``G, plane`` along the input channels (:func:`along_channels`)."""
    cstep, step, lane_channels, plane, groups = geometry[3], geometry[4], geometry[5], geometry[9], geometry[10]
    words = lanes.view(np.uint32)
    step = np.uint64(step)
    for g in range(groups):
        for c in range(lane_channels):
            target = np.uint64((g * lane_channels + c) * plane)
            base = np.uint64((g * (channels // groups) + c * cstep) * plane)
            if per_lane == PAIRS:
                halves = source.view(np.uint16)
                for q in range(np.uint64(plane)):
                    words[target + q] = np.uint32(halves[base + q]) | (np.uint32(halves[base + q + step])
                                                                      << np.uint32(16))
            else:
                data = source.view(np.uint8)
                for q in range(np.uint64(plane)):
                    at = base + q
                    words[target + q] = (np.uint32(data[at]) | (np.uint32(data[at + step]) << np.uint32(8))
                                         | (np.uint32(data[at + 2 * step]) << np.uint32(16))
                                         | (np.uint32(data[at + 3 * step]) << np.uint32(24)))


@intrinsic
def _interleave(typingctx, a, b):
    """Lanes ``(a0, b0, a2, b2, a4, b4, a6, b6)``: the pooled lanes (even) of two channels side by side."""
    if not (a == int32x8 and b == int32x8):
        return None

    def codegen(context, builder, signature, args):
        order = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0, 8, 2, 10, 4, 12, 6, 14])
        return builder.shuffle_vector(args[0], args[1], order)

    return int32x8(a, b), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _finish_vector(scratch, row, out_w, constants, at, pool_h, pool_w, codes):  # pragma: no cover - compiled
    """Column block ``scratch[:, row : row + 8]`` of the pixel-major sums to ``codes[:, row : row + 8]`` (pooled
    pixels x 16 int8): plus the offsets, the maximum over each pool window, the requantization (the constants of
    :func:`pack_epilogue` at ``at``)."""
    offsets_, m0, shift, zero_point, below, above = constants
    width = scratch.shape[1]
    flat, flat_codes = scratch.reshape(-1), codes.reshape(-1)
    offset, multiplier, exponent = _load(offsets_, at), _load(m0, at), _load(shift, at)
    pooled_w = out_w // pool_w
    for p in range(codes.shape[0]):
        top = ((p // pooled_w) * pool_h * out_w + (p % pooled_w) * pool_w) * width + row
        best = _add(_load(flat, top), offset)
        for i in range(pool_h):
            for j in range(pool_w):
                best = _max(best, _add(_load(flat, top + (i * out_w + j) * width), offset))
        _requantize_into(flat_codes, p * width + row, best, multiplier, exponent, zero_point, below, above)


@numba.njit(cache=True, nogil=True, inline="always")
def _image(lanes, at, packed, taps, pixels, constants, n, out_w, pool_h, pool_w, scratch, codes,
           out):  # pragma: no cover - compiled
    """Every tile of image ``n`` from its ``lanes`` (the padded image's 32-bit tap groups from element ``at``), then
    the epilogue of each block pair of 16 channels into ``out[n]`` (NCHW, through the pixel-major ``codes``)."""
    groups, blocks, depth, vector = packed.shape
    per_group = out.shape[1] // groups
    flat_weights = packed.reshape(-1)
    flat_scratch = scratch.reshape(-1)
    pooled = out.shape[2] * out.shape[3]
    for g in range(groups):
        for b0 in range(0, blocks, TILE_VECTORS):
            w_base = (g * blocks + b0) * depth * vector
            for p0 in range(0, pixels.shape[0], TILE_PIXELS):
                where = fc.pixel_offsets(pixels, p0, TILE_PIXELS)
                tile = _zero_tile(ACCUMULATORS)
                for d in range(depth):
                    tile = fc.tile_step(tile, lanes, at[g] + taps[d], where, flat_weights, w_base + d * vector,
                                     depth * vector)
                fc.store_tile(flat_scratch, tile, p0 * TILE_VECTORS * LANES, TILE_PIXELS)
            first = g * per_group + b0 * LANES
            channels = min(TILE_VECTORS * LANES, per_group - b0 * LANES)
            for v in range(TILE_VECTORS):
                if v * LANES < channels:
                    _finish_vector(scratch, v * LANES, out_w, constants, (g * blocks + b0 + v) * LANES, pool_h,
                                   pool_w, codes)
            for c in range(channels):  # pixel-major codes -> NCHW planes
                target = out[n, first + c].reshape(-1)
                for p in range(pooled):
                    target[p] = codes[p, c]


@numba.njit(cache=True, nogil=True, inline="always")
def _fill_source(x, n, flip, pad_h, pad_w, source):  # pragma: no cover - compiled
    """The interior of image ``n``'s padded planes in ``source`` (flat, ``x XOR flip``; the border was filled once
    with the zero point's code); unsigned offsets: no negative-index fix-up, so LLVM vectorises the copy."""
    batch, channels, height, width = x.shape
    padded_w = width + 2 * pad_w
    plane = (height + 2 * pad_h) * padded_w
    flat_x = x.reshape(-1)
    for c in range(channels):
        for y in range(height):
            row = np.uint64(c * plane + (y + pad_h) * padded_w + pad_w)
            line = np.uint64(((n * channels + c) * height + y) * width)
            for xx in range(np.uint64(width)):
                source[row + xx] = flat_x[line + xx] ^ flip


@numba.njit(cache=True, nogil=True)
def conv_s8_into(x, geometry, packed, taps, pixels, constants, out):  # pragma: no cover - compiled
    """The convolution (module docstring) of int8 NCHW ``x`` into int8 ``out (N, OC, OH // pool_h, OW // pool_w)``:
    ``geometry``, ``taps`` and ``pixels`` from :func:`geometry`, ``packed`` from :func:`pack_weights` (int16: pairs,
    int8: quads; each dtype compiles its own kernel), ``constants`` from :func:`pack_epilogue`. No checks: call
    through :func:`conv2d_s8` or with the arguments of :func:`prepare`, where :func:`taps_per_lane` is that ``G``."""
    zero_point, pad_h, pad_w, cstep, step, lane_channels, out_w, pool_h, pool_w, plane, groups = geometry
    channels = x.shape[1]
    per_lane = packed.shape[3] // LANES
    flip = 0 if per_lane == PAIRS else -128  # quads read x + 128 as unsigned bytes: x XOR 0x80
    # the padded codes (int16 pairs or flipped int8 bytes, the dtype of the weights), plus a tail for the last lanes
    source = np.full((channels + per_lane) * plane, zero_point ^ flip, packed.dtype)
    neighbours = cstep == 1 and step == 1  # a lane's taps are neighbours in ``source``: it is read as it is
    lanes = np.empty(0 if neighbours else groups * lane_channels * plane, np.int32)
    scratch = np.empty((pixels.shape[0], TILE_VECTORS * LANES), np.int32)  # (P', 16) sums, pixel-major
    codes = np.empty((out.shape[2] * out.shape[3], TILE_VECTORS * LANES), np.int8)  # (pooled pixels, 16)
    at = np.arange(groups) * lane_channels * plane  # each group's first lane plane
    for n in range(x.shape[0]):
        _fill_source(x, n, flip, pad_h, pad_w, source)
        if neighbours:
            _image(source, at, packed, taps, pixels, constants, n, out_w, pool_h, pool_w, scratch, codes, out)
        else:
            _pack_lanes(source, geometry, channels, per_lane, lanes)
            _image(lanes, at, packed, taps, pixels, constants, n, out_w, pool_h, pool_w, scratch, codes, out)


@numba.njit(cache=True, nogil=True)
def conv_rows_s8_into(x, geometry, packed, taps, constants, out):  # pragma: no cover - compiled
    """The unit-stride convolution with a fused 2 x 2 max pool in row tiles, for thin layers (at most 6 output
    channels per block): 16 sums of one output channel per tile row pair -- 8 columns of two consecutive output rows
    -- x 6 channels in 12 int32 registers over every tap group, pooled in registers
    (:func:`~nanoopt.kernels.float_conv_avx2.pool_row_tile`), then offset, requantized and written 4 pooled codes
    per channel. ``geometry`` as :func:`conv_s8_into`'s; ``packed`` from :func:`pack_weights` (``rows``), ``taps`` the
    tap groups' offsets on the padded plane (:func:`geometry`), ``constants`` from :func:`prepare` (``rows``)."""
    zero_point, pad_h, pad_w, cstep, step, lane_channels, out_w, pool_h, pool_w, plane, groups = geometry
    channels, padded_w = x.shape[1], x.shape[3] + 2 * pad_w
    blocks, depth, vector = packed.shape[1], packed.shape[2], packed.shape[3]
    per_lane = vector // ROW_TILE_CHANNELS
    per_group = out.shape[1] // groups
    offsets_, m0, shift, zero, below, above = constants
    flip = 0 if per_lane == PAIRS else -128  # quads read x + 128 as unsigned bytes: x XOR 0x80
    slack = 2 * LANES  # the last tile of a row reads up to 8 lanes past its row (columns no window uses)
    source = np.full((channels + per_lane) * plane, zero_point ^ flip, packed.dtype)
    lanes = np.zeros(groups * lane_channels * plane + slack, np.int32)
    codes = np.empty(LANES, np.int8)
    flat_weights = packed.reshape(-1)
    flat_out = out.reshape(-1)
    half = LANES // 2  # pooled columns of a tile
    for n in range(x.shape[0]):
        _fill_source(x, n, flip, pad_h, pad_w, source)
        _pack_lanes(source, geometry, channels, per_lane, lanes)
        for g in range(groups):
            at = g * lane_channels * plane
            for b in range(blocks):
                w_base = (g * blocks + b) * depth * vector
                first = g * per_group + b * ROW_TILE_CHANNELS
                valid = min(ROW_TILE_CHANNELS, per_group - b * ROW_TILE_CHANNELS)
                for y in range(out.shape[2]):
                    for x0 in range(0, out.shape[3], half):
                        corner = at + 2 * y * padded_w + 2 * x0
                        tile = _zero_tile(ACCUMULATORS)
                        for d in range(depth):
                            tile = fc.row_tile_step(tile, lanes, corner + taps[d], padded_w, flat_weights,
                                                 w_base + d * vector)
                        pooled = fc.pool_row_tile(tile)
                        count = min(half, out.shape[3] - x0)
                        for j in range(0, valid, 2):  # two channels per vector: lanes (k, k + 1) per column
                            at_j = ((g * blocks + b) * ROW_TILE_CHANNELS + j) * half
                            best = _add(_interleave(pooled[j], pooled[j + 1]), _load(offsets_, at_j))
                            _requantize_into(codes, 0, best, _load(m0, at_j), _load(shift, at_j), zero, below,
                                             above)
                            for k in range(min(2, valid - j)):
                                target = np.uint64((((n * out.shape[1] + first + j + k) * out.shape[2] + y)
                                                    * out.shape[3]) + x0)
                                for i in range(count):
                                    flat_out[target + np.uint64(i)] = codes[2 * i + k]


def prepare(weight: np.ndarray, groups: int, offsets_: np.ndarray, tail: tuple, per_lane: int,
            rows: bool = False) -> tuple | None:
    """``(packed, constants)`` of a layer for :func:`conv_s8_into` (or, with ``rows``, :func:`conv_rows_s8_into`:
    the constants of channel pairs ``(k, k + 1)`` of a block interleaved in 8 lanes) in the form ``per_lane``
    (:data:`PAIRS` or :data:`QUADS`), from its validated int8 weight, the offsets ``bias - x_zp rowsum(w)`` and the
    epilogue tail of :func:`nanoopt.kernels.numba_epilogue.layer_epilogue` (``m0, shift, out_zp, low, high, raw,
    fast``); ``None``
    where the kernel does not apply: int16 weights, or an epilogue that is not "fast" (accumulator bound above
    2^31, or a left shift or a right shift above 30), where the sums plus offsets might not fit int32.

    >>> packed, constants = prepare(np.ones((2, 1, 3, 3), np.int8), 1, np.zeros(2, np.int64),
    ...                             (np.full(2, 2**30), np.zeros(2), 0, -128, 127, False, True), QUADS)
    >>> packed.shape, constants[0][:2].tolist()  # -128 rowsum(w) for the quads' offset trick
    ((1, 2, 3, 32), [-1152, -1152])
    """
    m0, shift, out_zp, low, high, raw, fast = tail
    if weight.dtype != np.int8 or raw or not fast:
        return None
    packed = pack_weights(weight, groups, per_lane, rows)
    if per_lane == QUADS:  # sum (x + 128) w = sum x w + 128 rowsum(w)
        offsets_ = offsets_ - 128 * weight.reshape(weight.shape[0], -1).sum(axis=1, dtype=np.int64)
    if rows:  # per block of 6 channels, pairs (k, k + 1) interleaved in 8 lanes, as the row tiles pool them
        per_group = weight.shape[0] // groups
        blocks = packed.shape[1]
        index = np.arange(groups * blocks * ROW_TILE_CHANNELS).reshape(groups, blocks * ROW_TILE_CHANNELS)
        index = np.minimum(index % (blocks * ROW_TILE_CHANNELS), per_group - 1) + np.arange(groups)[:, None] * per_group
        lanes = np.repeat(index.reshape(-1, 1, 2), LANES // 2, axis=1).reshape(-1)  # (k, k + 1) four times
        constants = pack_epilogue(*(np.asarray(v, np.int64)[lanes] for v in (offsets_, m0, shift)), int(out_zp),
                                  int(low), int(high), 1, lanes.size)
    else:
        constants = pack_epilogue(offsets_, m0, shift, int(out_zp), int(low), int(high), groups, packed.shape[1])
    return packed, constants


def geometry(x_shape: tuple[int, ...], kernel: tuple[int, int], stride, padding, dilation, group_channels: int,
             per_lane: int, x_zero_point: int, pool: tuple[int, int]) -> tuple:
    """``(geometry, taps, pixels, out_h, out_w)`` of :func:`conv_s8_into` for an input of ``x_shape``: ``geometry =
    (x_zero_point, pad_h, pad_w, cstep, step, C', out_w, pool_h, pool_w, Hp Wp, groups)`` (the packed lanes, see
    ``_pack_lanes``: ``C'`` lane planes per group), the tap groups' offsets into a group's lane planes and the output
    pixels' offsets (:func:`~nanoopt.kernels.float_conv_avx2.offsets`).

    >>> geometry((1, 1, 4, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1, PAIRS, 0, (1, 1))[1].tolist()
    [0, 2, 6, 8, 12, 14]
    """
    stride, padding = ref.pair(stride, "stride", 1), ref.pair(padding, "padding", 0)
    dilation = ref.pair(dilation, "dilation", 1)
    (kh, kw), (ph, pw) = kernel, padding
    padded = (x_shape[0], x_shape[1], x_shape[2] + 2 * ph, x_shape[3] + 2 * pw)
    out_h = ref.conv_output_size(x_shape[2], kh, stride[0], ph, dilation[0], "height")
    out_w = ref.conv_output_size(x_shape[3], kw, stride[1], pw, dilation[1], "width")
    plane = padded[2] * padded[3]
    if along_channels((0, group_channels, kh, kw), per_lane):  # lanes of G input channels, one plane per G
        lane_channels, cstep, step = -(-group_channels // per_lane), per_lane, plane
        taps, pixels = fc.offsets(padded, (kh, kw), stride, dilation, lane_channels, (out_h, out_w), TILE_PIXELS)
    else:  # lanes of G taps of a kernel row, one plane per input channel
        lane_channels, cstep, step = group_channels, 1, dilation[1]
        taps, pixels = fc.offsets(padded, (kh, -(-kw // per_lane)), stride, (dilation[0], per_lane * dilation[1]),
                               group_channels, (out_h, out_w), TILE_PIXELS)
    groups = x_shape[1] // group_channels
    shape = (np.int64(x_zero_point), ph, pw, cstep, step, lane_channels, out_w, int(pool[0]), int(pool[1]), plane,
             groups)
    return shape, taps, pixels, out_h, out_w


def conv2d_s8(x_q: np.ndarray, w_q: np.ndarray, bias_q, x_zero_point: int, m0, shift, out_zero_point: int,
              out_spec: QuantSpec, stride=1, padding=0, dilation=1, groups: int = 1, relu: bool = False,
              pool=(1, 1)) -> np.ndarray:  # fmt: skip
    """:func:`conv2d_s8_reference` with the register tiles (arguments checked as the reference checks them; a
    ``pool_h x pool_w`` max pool, stride = window, fused). Packs the weights on each call (a runtime plan packs them
    once). Raises ``RuntimeError`` where :func:`taps_per_lane` is 0 and ``ValueError`` where the layer's
    accumulators might not fit int32 (the reference handles those).

    >>> x = np.full((1, 1, 2, 2), -128, np.int8)
    >>> out = conv2d_s8(x, np.full((1, 1, 2, 2), 127, np.int8), None, 0, 2**30, 0, 0, QuantSpec()) \\
    ...     if taps_per_lane() else np.array([[[[-128]]]], np.int8)
    >>> out.tolist()
    [[[[-128]]]]
    """
    from_layer = _checked_layer(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding,
                                dilation, groups, relu)
    per_lane = taps_per_lane()
    if not per_lane:
        raise RuntimeError("conv2d_s8 needs AVX2 (or VNNI), which is not usable here (see "
                           "nanoopt.kernels.cpu_features); use nanoopt.kernels.quantized_conv2d")
    prepared = prepare(w_q, groups, *from_layer, per_lane)
    if prepared is None:
        raise ValueError("conv2d_s8: this layer's accumulators plus offsets might not fit int32 (or its shifts are "
                         "not right shifts of at most 30); use nanoopt.kernels.quantized_conv2d")
    pool = ref.pair(pool, "pool", 1)
    shape, taps, pixels, out_h, out_w = geometry(x_q.shape, w_q.shape[2:], stride, padding, dilation, w_q.shape[1],
                                                 per_lane, x_zero_point, pool)
    if out_h < pool[0] or out_w < pool[1]:
        raise ValueError(f"conv2d_s8: the {out_h}x{out_w} output is smaller than the {pool[0]}x{pool[1]} pool")
    out = np.empty((x_q.shape[0], w_q.shape[0], out_h // pool[0], out_w // pool[1]), np.int8)
    conv_s8_into(np.ascontiguousarray(x_q), shape, prepared[0], taps, pixels, prepared[1], out)
    return out


def _checked_layer(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding, dilation,
                   groups, relu) -> tuple:
    """``(offsets, tail)`` of an int8 layer, checked as :func:`nanoopt.kernels.reference.quantized_conv2d` checks."""
    ref.check_array(x_q, "x_q", (np.int8,), 4)
    ref.check_array(w_q, "w_q", (np.int8,), 4)
    if out_spec.dtype != np.int8:
        raise TypeError(f"conv2d_s8: out_spec must give int8 codes, got {out_spec.dtype}")
    ref.check_conv_geometry(x_q, w_q, stride, padding, dilation, groups)
    packed = pack_conv2d_weights(w_q, groups)
    _, offsets_, tail = layer_epilogue(packed, np.int8, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec,
                                       relu, 4)
    return offsets_, tail


def conv2d_s8_reference(x_q: np.ndarray, w_q: np.ndarray, bias_q, x_zero_point: int, m0, shift,
                        out_zero_point: int, out_spec: QuantSpec, stride=1, padding=0, dilation=1, groups: int = 1,
                        relu: bool = False, pool=(1, 1)) -> np.ndarray:  # fmt: skip
    """NumPy reference of :func:`conv2d_s8`: :func:`nanoopt.kernels.reference.quantized_conv2d`, then
    ``quantized_max_pool2d`` with window = stride = ``pool`` (none for ``(1, 1)``).

    >>> conv2d_s8_reference(np.ones((1, 1, 2, 2), np.int8), np.ones((1, 1, 1, 1), np.int8), None, 0, 2**30, 0, 0,
    ...                     QuantSpec()).shape
    (1, 1, 2, 2)
    """
    out = ref.quantized_conv2d(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding,
                               dilation, groups, relu)
    pool = ref.pair(pool, "pool", 1)
    return out if pool == (1, 1) else ref.quantized_max_pool2d(out, pool)


def _self_test(per_lane: int) -> bool:
    """Compile the channel tiles of ``per_lane`` and the row tiles (pairs), the kernels a runtime plan binds where
    ``per_lane`` runs, and compare small convolutions with extreme codes (2 groups of 11 output channels, a 2 x 2
    pool, ReLU; the channel tiles at stride 2 in width) with the reference."""
    rng = np.random.default_rng(20251205)
    x = rng.integers(-128, 128, size=(2, 6, 7, 9)).astype(np.int8)
    x[0, 0] = -128
    w = rng.integers(-127, 128, size=(22, 3, 3, 2)).astype(np.int8)
    w[0] = 127
    bias = rng.integers(-1000, 1000, size=22).astype(np.int32)
    arguments = (x, w, bias, -5, np.full(22, 1 << 30), np.full(22, 8), 3, QuantSpec(), (1, 2), (1, 0), 1, 2, True)
    expected = conv2d_s8_reference(*arguments, pool=(2, 2))
    offsets_, tail = _checked_layer(*arguments)
    packed, constants = prepare(w, 2, offsets_, tail, per_lane)
    shape, taps, pixels, out_h, out_w = geometry(x.shape, (3, 2), (1, 2), (1, 0), (1, 1), 3, per_lane, -5, (2, 2))
    out = np.empty(expected.shape, np.int8)
    conv_s8_into(x, shape, packed, taps, pixels, constants, out)
    if not np.array_equal(out, expected):
        return False
    # the row tiles run int16 pairs on every CPU (quads gain nothing there: docs/kernels.md)
    arguments = (x, w, bias, -5, np.full(22, 1 << 30), np.full(22, 8), 3, QuantSpec(), 1, (1, 0), 1, 2, True)
    packed, constants = prepare(w, 2, *_checked_layer(*arguments), PAIRS, rows=True)
    shape, taps, _, out_h, out_w = geometry(x.shape, (3, 2), 1, (1, 0), 1, 3, PAIRS, -5, (2, 2))
    out = np.empty((2, 22, out_h // 2, out_w // 2), np.int8)
    conv_rows_s8_into(x, shape, packed, taps, constants, out)
    return bool(np.array_equal(out, conv2d_s8_reference(*arguments, pool=(2, 2))))


@functools.cache
def taps_per_lane() -> int:
    """The form of the channel tiles that runs here: :data:`QUADS` (4) where 256-bit ``vpdpbusd`` is usable
    (:func:`~nanoopt.kernels.cpu_features.target_has_avx_vnni`) and its self-test exact, else :data:`PAIRS` (2) where
    AVX2 is usable (:func:`~nanoopt.kernels.cpu_features.avx2_kernel_works`) and its self-test exact, else 0 (the
    portable kernels). Where it is not 0 the row tiles (:func:`conv_rows_s8_into`, pairs) passed theirs too; the
    channel tiles in pairs are then exact where AVX2 is usable, but compiled only if called (not by a plan on VNNI).
    Checked once per process; ``taps_per_lane.cache_clear()`` forgets the answer.

    >>> taps_per_lane() in (0, PAIRS, QUADS)
    True
    """
    if avx2_kernel_works(lambda: target_has_avx_vnni() and _self_test(QUADS)):
        return QUADS
    return PAIRS if avx2_kernel_works(lambda: _self_test(PAIRS)) else 0
