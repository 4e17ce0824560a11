"""Exact int8 GEMM and fused int8 linear layer on AVX-512 VNNI from Numba (512-bit ``vpdpbusd``).

Computes ``C = A @ W.T`` for int8 activations ``A`` (M, K) and narrow-range int8 weights ``W`` (N, K), exactly
as :func:`nanoopt.kernels.avx2.gemm_s8s8s32_vnni_into` does and with the same arguments -- the same packed panels
(:func:`nanoopt.kernels.avx2.pack_weights_s8`), the same arithmetic -- on 512-bit registers, and the whole
quantized linear layer (Jacob et al. 2018, eq. 7) with the requantization done on the accumulators while they are
still in registers.

* **Instruction.** ``vpdpbusd`` on zmm (``llvm.x86.avx512.vpdpbusd.512``): u8 x s8, groups of 4 products summed
  into 16 int32 lanes, wrapping, no saturation; 64 products per instruction, twice the 256-bit form.
* **The offset trick, as the AVX-VNNI kernel.** ``sum_k (a_k + 128) w_k = sum_k a_k w_k + 128 sum_k w_k``: the
  unsigned operand is ``a XOR 0x80`` and the accumulators start at ``-128 * sum_k W[n, k]``, read from the
  row-sum footer of the packed panels. Every int32 addition wraps modulo 2**32 and the true result fits int32
  (``K <= avx2.MAX_K_S8``), so the wrapped result is the exact one: bit-identical to int64 arithmetic.
* **Layout.** The packed panel ``panels[p, g]`` is 64 contiguous bytes, 4 K values of the 16 output channels
  ``16 p .. 16 p + 15`` (``panels[p, g, r, j, t] = W[16 p + 8 r + j, 4 g + t]``): exactly one zmm operand, lane
  ``8 r + j`` = channel ``16 p + 8 r + j``. So the weights are packed once for every x86 kernel.
* **Register tile.** 8 rows of A x 2 panels (32 channels): 16 zmm accumulators, per step of 4 K values two
  64-byte weight loads and 8 four-byte broadcasts for 16 ``vpdpbusd``. An odd last panel uses an 8 x 1 tile;
  rows left over below a multiple of 8 use one-row tiles whose accumulators are split over even and odd K steps
  (4 and 2 independent chains, so that a single row is not bound by the instruction's latency).
* **Blocking.** K blocks of ``avx2.S8_BLOCK_K`` values, row blocks of ``ROW_BLOCK`` rows; the int32 tile is added
  to ``out`` after each K block.
* **Fused requantization** (:func:`linear_s8_into`). When the layer's accumulator bound fits int32 and every
  shift is a right shift of at most 30 (``numba_cpu`` calls this the "fast" epilogue) and K fits one K block, the
  tile's accumulators get the per-channel offset ``bias - x_zp * rowsum(W)`` added and are requantized in
  registers -- ``floor((v m0 + 2^30) / 2^31)`` from a 32 x 32 -> 64-bit product and a logical shift, then
  gemmlowp's rounding divide by ``2^shift``, clamp (ReLU = clamp at the zero point), zero point -- and stored as
  int8; no int32 product matrix is written or read back. This is :func:`nanoopt.kernels.requant.multiply_fast`
  lane for lane, and equal bit for bit to :func:`nanoopt.kernels.reference.quantized_linear` (tested).

Availability: the 512-bit kernels compile only for a target with AVX-512F, AVX-512BW and AVX-512 VNNI (and
AVX2, for the rest of the x86 path); LLVM aborts the process on any other, so :func:`target_has_avx512_vnni`
checks the CPU, Numba's target and ``NANOOPT_CPU_FEATURES`` (:func:`nanoopt.kernels.cpu_features.usable_features`: e.g.
``NANOOPT_CPU_FEATURES=avx2`` or ``avx2,avx512vnni,avx512vl`` keep the 256-bit kernels, ``none`` the portable ones)
*before* anything is compiled, and :func:`available` then compiles and checks a small product. Callers of the
jitted functions must check :func:`available` first. On CPUs that split 512-bit instructions in two 256-bit
halves (AMD Zen 4) the instruction throughput in products per cycle is the 256-bit one; the gain there comes
from half the instructions, loads and broadcasts per product and from the fused epilogue.

>>> w = np.array([[1, -2, 3], [-127, 0, 127]], dtype=np.int8)
>>> a = np.array([[4, 5, -128]], dtype=np.int8)
>>> out = np.empty((1, 2), np.int32)
>>> if available(): gemm_s8s8s32_avx512_into(a, avx2.pack_weights_s8(w).panels, 2, 3, out)
... else: out[:] = [[-390, -16764]]
>>> out.tolist()
[[-390, -16764]]
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, models, register_model

from nanoopt.kernels import avx2
from nanoopt.kernels.cpu_features import DISABLE_VNNI_ENV, avx2_kernel_works, switched_on, usable_features
from nanoopt.kernels.llvm_intrinsics import declare, element_pointer
from nanoopt.spec import multiply_by_quantized_multiplier

__all__ = [
    "FEATURES",
    "ROW_BLOCK",
    "available",
    "gemm_s8s8s32_avx512_into",
    "linear_s8_into",
    "linear_s8_reference",
    "linear_s8_rows_parallel",
    "requant_s8",
    "target_has_avx512_vnni",
]

FEATURES = frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni"})  # what the 512-bit kernels need
LANES = 16  # int32 lanes in one 512-bit register (= output channels of one packed panel)
TILE_ROWS = 8  # rows of A per register tile
STEP = avx2.S8_STEP  # int8 elements of one panel step: 64 bytes, one zmm
GROUP = avx2.S8_GROUP  # K values per step
ROW_BLOCK = 256  # rows of A per cache block (a multiple of TILE_ROWS)

_I8X16, _I8X64, _I32X16, _I64X16 = (ir.VectorType(ir.IntType(bits), lanes) for bits, lanes in
                                     ((8, 16), (8, 64), (32, 16), (64, 16)))


class Int32x16Type(types.Type):
    """Numba type of one AVX-512 register, viewed as sixteen int32 lanes (``<16 x i32>`` in LLVM): values of it stay
    in registers across calls and loop iterations."""

    def __init__(self) -> None:
        super().__init__(name="int32x16")


int32x16 = Int32x16Type()
register_model(Int32x16Type)(functools.partial(models.PrimitiveModel, be_type=_I32X16))


def _pointer(context, builder, signature, args, vector_type):
    """``args[0]`` (a C array) advanced by ``args[1]`` elements, cast to a pointer to ``vector_type``."""
    address = element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
    return builder.bitcast(address, vector_type.as_pointer())


def _c_array(array, dtypes) -> bool:
    return isinstance(array, types.Array) and array.layout == "C" and array.dtype in dtypes


def _splat(builder, value, vector_type):
    """A scalar (already of the lane type) repeated in every lane."""
    lanes = vector_type.count
    vector = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    indices = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(vector, ir.Constant(vector_type, ir.Undefined), indices)


# ---------------------------------------------------------------------------------------------------------
# Intrinsics. Offsets count elements of the array's dtype; no bounds checks (the drivers check shapes).


def _named(definition, name: str, doc: str):
    definition.__name__ = definition.__qualname__ = name
    definition.__doc__ = doc
    return intrinsic(definition)


def _vector_signature(operands: tuple, emit):
    """The typing answer of a lane-wise intrinsic: int32x16 ``emit(builder, *operands)``, or None if an operand is
    not an int32x16."""
    if any(operand != int32x16 for operand in operands):
        return None

    def codegen(context, builder, signature, args):
        return emit(builder, *args)

    return int32x16(*operands), codegen


def _lanewise(name: str, arity: int, emit, doc: str):
    """An intrinsic of ``arity`` (0 to 3) int32x16 operands returning the int32x16 ``emit(builder, *operands)``
    (Numba's intrinsics take no ``*args``, hence one definition per arity)."""
    definitions = (lambda typingctx: _vector_signature((), emit),
                   lambda typingctx, x: _vector_signature((x,), emit),
                   lambda typingctx, x, y: _vector_signature((x, y), emit),
                   lambda typingctx, x, y, z: _vector_signature((x, y, z), emit))
    return _named(definitions[arity], name, doc)


def _memory_signature(array, offset, vector: tuple, dtypes: tuple, emit):
    """The typing answer of a load (``vector == ()``) or a store (``vector == (int32x16,)``)."""
    if not (_c_array(array, dtypes) and isinstance(offset, types.Integer)):
        return None
    if vector and vector[0] != int32x16:
        return None

    def codegen(context, builder, signature, args):
        value = emit(context, builder, signature, args)
        return context.get_dummy_value() if vector else value

    return (types.none(array, offset, *vector) if vector else int32x16(array, offset)), codegen


def _memory(name: str, dtypes: tuple, emit, doc: str, stores: bool = False):
    """An intrinsic ``(array, offset)`` -> int32x16 (a load), or ``(array, offset, vector)`` -> None (a store), on a
    C array of one of ``dtypes``; ``emit(context, builder, signature, args)`` makes the LLVM value."""
    if stores:
        return _named(lambda typingctx, array, offset, vector: _memory_signature(array, offset, (vector,), dtypes,
                                                                                 emit), name, doc)
    return _named(lambda typingctx, array, offset: _memory_signature(array, offset, (), dtypes, emit), name, doc)


def _vpdpbusd(builder, accumulator, a_unsigned, w_bytes):
    dot = declare(builder, "llvm.x86.avx512.vpdpbusd.512", _I32X16, [_I32X16, _I8X64, _I8X64])
    return builder.call(dot, [accumulator, builder.bitcast(a_unsigned, _I8X64), builder.bitcast(w_bytes, _I8X64)])


_zero = _lanewise("_zero", 0, lambda builder: ir.Constant(_I32X16, [0] * LANES), "An int32x16 of zeros.")
_add = _lanewise("_add", 2, lambda builder, x, y: builder.add(x, y), "Lane-wise int32 sum, modulo 2**32.")
_times_minus_128 = _lanewise("_times_minus_128", 1,
                             lambda builder, x: builder.mul(x, ir.Constant(_I32X16, [-128] * LANES)),
                             "Lane-wise ``-128 * x``, modulo 2**32.")
_dot = _lanewise("_dot", 3, _vpdpbusd, "``accumulator + sum_t a[t] * w[j, t]`` per lane j over its 4 bytes, ``a`` as "
                 "u8, ``w`` as s8 (vpdpbusd zmm); no saturation, the sum wraps modulo 2**32.")
_load = _memory("_load", (types.int8, types.int32),
                lambda context, builder, signature, args: builder.load(
                    _pointer(context, builder, signature, args, _I32X16), align=1),
                "The 64 bytes at element ``offset`` of an int8/int32 C array (unaligned).")
_broadcast4 = _memory("_broadcast4", (types.int8,),
                      lambda context, builder, signature, args: _splat(builder, builder.load(
                          _pointer(context, builder, signature, args, ir.IntType(32)), align=1), _I32X16),
                      "The 4 bytes at element ``offset`` of an int8 C array, repeated in all 16 lanes (vpbroadcastd).")
_store = _memory("_store", (types.int32,),
                 lambda context, builder, signature, args: builder.store(
                     args[2], _pointer(context, builder, signature, args, _I32X16), align=1),
                 "Write the 16 lanes to elements ``offset .. offset + 15`` of an int32 C array.", stores=True)
_store_s8 = _memory("_store_s8", (types.int8,),
                    lambda context, builder, signature, args: builder.store(
                        builder.trunc(args[2], _I8X16), _pointer(context, builder, signature, args, _I8X16), align=1),
                    "Write the 16 lanes, truncated to int8 (values already in [-128, 127]), to an int8 C array.",
                    stores=True)


@intrinsic
def _lane(typingctx, vector, index):
    """Lane ``index`` (0..15) of the vector as an int32."""
    if not (vector == int32x16 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], signature.args[1], types.int32))

    return types.int32(vector, index), codegen


@intrinsic
def _requantize(typingctx, value, offset, m0, shift, zero_point, low, high):
    """Lane-wise ``clip(rdivpot(floor(((value + offset) m0 + 2^30) / 2^31), shift), low - zp, high - zp) + zp``.

    ``value``, ``offset``, ``m0``, ``shift``: int32x16 (``m0`` in [2^30, 2^31), ``shift`` in [0, 30]);
    ``zero_point``, ``low``, ``high``: integer scalars. The form of
    :func:`nanoopt.kernels.requant.multiply_fast` and :func:`nanoopt.kernels.requant.requantize_value` (fast),
    written on vectors: one sign-extended 32 x 32 -> 64-bit product per lane, a 64-bit add and logical shift,
    then 32-bit lanes.
    """
    vectors = (value, offset, m0, shift)
    if not (all(v == int32x16 for v in vectors) and all(isinstance(s, types.Integer) for s in (zero_point, low, high))):
        return None

    def codegen(context, builder, signature, args):
        value, offset, m0, shift = args[:4]
        zero, low, high = (_splat(builder, context.cast(builder, arg, typ, types.int32), _I32X16)
                           for arg, typ in zip(args[4:], signature.args[4:], strict=True))
        total = builder.add(value, offset)  # wraps; the true sum fits int32 (the layer's bound)
        product = builder.mul(builder.sext(total, _I64X16), builder.sext(m0, _I64X16))
        nudged = builder.add(product, ir.Constant(_I64X16, [1 << 30] * LANES))
        top = builder.trunc(builder.lshr(nudged, ir.Constant(_I64X16, [31] * LANES)), _I32X16)
        ones = ir.Constant(_I32X16, [1] * LANES)
        mask = builder.sub(builder.shl(ones, shift), ones)
        negative = builder.zext(builder.icmp_signed("<", top, ir.Constant(_I32X16, [0] * LANES)), _I32X16)
        threshold = builder.add(builder.ashr(mask, ones), negative)
        up = builder.zext(builder.icmp_signed(">", builder.and_(top, mask), threshold), _I32X16)
        scaled = builder.add(builder.ashr(top, shift), up)
        floor, ceiling = builder.sub(low, zero), builder.sub(high, zero)
        scaled = builder.select(builder.icmp_signed("<", scaled, floor), floor, scaled)
        scaled = builder.select(builder.icmp_signed(">", scaled, ceiling), ceiling, scaled)
        return builder.add(scaled, zero)

    return int32x16(value, offset, m0, shift, zero_point, low, high), codegen


# ---------------------------------------------------------------------------------------------------------
# Register tiles. Each returns its accumulators for one K block, row-major (row 0 panel 0, row 0 panel 1, row 1
# panel 0, ...). Row r of A starts at ``a_offset + r * a_stride`` in the offset-binary copy; panels at ``w0``/``w1``.


@numba.njit(cache=True, inline="always")
def _dot2(c0, c1, x, v0, v1):
    """One broadcast row step against two panels: ``(c0 + x . v0, c1 + x . v1)``."""
    return _dot(c0, x, v0), _dot(c1, x, v1)


@numba.njit(cache=True)
def _tile_8x2(a, a_offset, a_stride, panels, w0, w1, steps, s0, s1):
    """8 rows x 32 channels (two panels) of ``sum (a + 128) w``, accumulators starting at ``s0``/``s1``."""
    c00, c01, c10, c11, c20, c21, c30, c31 = s0, s1, s0, s1, s0, s1, s0, s1
    c40, c41, c50, c51, c60, c61, c70, c71 = s0, s1, s0, s1, s0, s1, s0, s1
    for step in range(steps):
        v0, v1 = _load(panels, w0 + step * STEP), _load(panels, w1 + step * STEP)
        k = a_offset + step * GROUP  # row r of this step's A values starts at k + r * a_stride
        c00, c01 = _dot2(c00, c01, _broadcast4(a, k), v0, v1)
        c10, c11 = _dot2(c10, c11, _broadcast4(a, k + a_stride), v0, v1)
        c20, c21 = _dot2(c20, c21, _broadcast4(a, k + 2 * a_stride), v0, v1)
        c30, c31 = _dot2(c30, c31, _broadcast4(a, k + 3 * a_stride), v0, v1)
        c40, c41 = _dot2(c40, c41, _broadcast4(a, k + 4 * a_stride), v0, v1)
        c50, c51 = _dot2(c50, c51, _broadcast4(a, k + 5 * a_stride), v0, v1)
        c60, c61 = _dot2(c60, c61, _broadcast4(a, k + 6 * a_stride), v0, v1)
        c70, c71 = _dot2(c70, c71, _broadcast4(a, k + 7 * a_stride), v0, v1)
    return c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, c60, c61, c70, c71


@numba.njit(cache=True)
def _tile_8x1(a, a_offset, a_stride, panels, w0, steps, s0):
    """8 rows x 16 channels (one panel)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = s0, s0, s0, s0, s0, s0, s0, s0
    for step in range(steps):
        v0 = _load(panels, w0 + step * STEP)
        k = a_offset + step * GROUP
        c0, c1 = _dot(c0, _broadcast4(a, k), v0), _dot(c1, _broadcast4(a, k + a_stride), v0)
        c2, c3 = _dot(c2, _broadcast4(a, k + 2 * a_stride), v0), _dot(c3, _broadcast4(a, k + 3 * a_stride), v0)
        c4, c5 = _dot(c4, _broadcast4(a, k + 4 * a_stride), v0), _dot(c5, _broadcast4(a, k + 5 * a_stride), v0)
        c6, c7 = _dot(c6, _broadcast4(a, k + 6 * a_stride), v0), _dot(c7, _broadcast4(a, k + 7 * a_stride), v0)
    return c0, c1, c2, c3, c4, c5, c6, c7


@numba.njit(cache=True)
def _tile_1x2(a, a_offset, panels, w0, w1, steps, s0, s1):
    """One row x 32 channels; even and odd K steps in separate accumulators (4 chains), summed at the end."""
    c0 = s0
    c1 = s1
    d0 = _zero()
    d1 = _zero()
    step = 0
    while step + 1 < steps:
        x = _broadcast4(a, a_offset + step * GROUP)
        c0 = _dot(c0, x, _load(panels, w0 + step * STEP))
        c1 = _dot(c1, x, _load(panels, w1 + step * STEP))
        x = _broadcast4(a, a_offset + (step + 1) * GROUP)
        d0 = _dot(d0, x, _load(panels, w0 + (step + 1) * STEP))
        d1 = _dot(d1, x, _load(panels, w1 + (step + 1) * STEP))
        step += 2
    if step < steps:
        x = _broadcast4(a, a_offset + step * GROUP)
        c0 = _dot(c0, x, _load(panels, w0 + step * STEP))
        c1 = _dot(c1, x, _load(panels, w1 + step * STEP))
    return _add(c0, d0), _add(c1, d1)


@numba.njit(cache=True)
def _tile_1x1(a, a_offset, panels, w0, steps, s0):
    """One row x 16 channels, even and odd K steps in separate accumulators."""
    c0 = s0
    d0 = _zero()
    step = 0
    while step + 1 < steps:
        c0 = _dot(c0, _broadcast4(a, a_offset + step * GROUP), _load(panels, w0 + step * STEP))
        d0 = _dot(d0, _broadcast4(a, a_offset + (step + 1) * GROUP), _load(panels, w0 + (step + 1) * STEP))
        step += 2
    if step < steps:
        c0 = _dot(c0, _broadcast4(a, a_offset + step * GROUP), _load(panels, w0 + step * STEP))
    return (_add(c0, d0),)


# ---------------------------------------------------------------------------------------------------------
# Writing a tile: raw int32 products, or requantized int8; whole vectors where 16 columns remain, lanes at the edge.


@numba.njit(cache=True)
def _write_tile(out, out_s8, row, col, n, tile, panels_per_row, accumulate, requant, fused):
    """Write a tile of ``len(tile) // panels_per_row`` rows x ``16 panels_per_row`` channels at ``[row, col]``: as
    int32 into ``out`` (added to what is there when ``accumulate``, wrapping as the vector sums do), or, when
    ``fused``, requantized with ``requant`` (:func:`requant_s8`) into the int8 ``out_s8``; columns past ``n`` are
    not written. Both outputs are C-contiguous with ``n`` columns."""
    offsets, m0, shift, zero_point, low, high = requant
    for t in range(len(tile)):
        r, c = row + t // panels_per_row, col + (t % panels_per_row) * LANES
        vector = tile[t]
        if fused:
            vector = _requantize(vector, _load(offsets, c), _load(m0, c), _load(shift, c), zero_point, low, high)
        if c + LANES <= n:
            if fused:
                _store_s8(out_s8, r * n + c, vector)
            else:
                _store(out, r * n + c, _add(vector, _load(out, r * n + c)) if accumulate else vector)
        else:
            for lane in range(max(n - c, 0)):
                value = _lane(vector, lane)
                if fused:
                    out_s8[r, c + lane] = value
                elif accumulate:
                    out[r, c + lane] += value
                else:
                    out[r, c + lane] = value


# ---------------------------------------------------------------------------------------------------------
# Drivers.


@numba.njit(cache=True)
def _starts(panels, p, panel_size, groups, first_block):
    """The accumulators' start for panel ``p``: ``-128 * rowsum`` in the first K block, else zero."""
    if first_block:
        return _times_minus_128(_load(panels, p * panel_size + groups * STEP))
    return _zero()


@numba.njit(cache=True)
def _gemm_block(a_unsigned, padded_k, panels, n, groups, g0, steps, i0, i1, out, out_s8, requant, fused):
    """Rows ``[i0, i1)`` x every panel for K steps ``[g0, g0 + steps)``: raw int32 into ``out`` (accumulated after
    the first K block), or, when ``fused`` (one K block), requantized int8 into ``out_s8``."""
    n_panels = (n + LANES - 1) // LANES
    panel_size = (groups + 1) * STEP
    first = g0 == 0
    accumulate = not first
    for p in range(0, n_panels, 2):
        col = p * LANES
        w0 = p * panel_size + g0 * STEP
        s0 = _starts(panels, p, panel_size, groups, first)
        pair = p + 1 < n_panels
        w1 = w0 + panel_size if pair else w0
        s1 = _starts(panels, p + 1, panel_size, groups, first) if pair else s0
        i = i0
        while i + TILE_ROWS <= i1:
            a_offset = i * padded_k + g0 * GROUP
            if pair:
                tile = _tile_8x2(a_unsigned, a_offset, padded_k, panels, w0, w1, steps, s0, s1)
                _write_tile(out, out_s8, i, col, n, tile, 2, accumulate, requant, fused)
            else:
                tile1 = _tile_8x1(a_unsigned, a_offset, padded_k, panels, w0, steps, s0)
                _write_tile(out, out_s8, i, col, n, tile1, 1, accumulate, requant, fused)
            i += TILE_ROWS
        while i < i1:
            a_offset = i * padded_k + g0 * GROUP
            if pair:
                row = _tile_1x2(a_unsigned, a_offset, panels, w0, w1, steps, s0, s1)
                _write_tile(out, out_s8, i, col, n, row, 2, accumulate, requant, fused)
            else:
                row1 = _tile_1x1(a_unsigned, a_offset, panels, w0, steps, s0)
                _write_tile(out, out_s8, i, col, n, row1, 1, accumulate, requant, fused)
            i += 1


@numba.njit(cache=True)
def _no_requant():
    """A placeholder for the raw GEMM (never read: ``fused`` is False)."""
    empty = np.zeros(LANES, np.int32)
    return empty, empty, empty, np.int64(0), np.int64(0), np.int64(0)


@numba.njit(cache=True)
def gemm_s8s8s32_avx512_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly with 512-bit ``vpdpbusd``; arguments and result as
    :func:`nanoopt.kernels.avx2.gemm_s8s8s32_vnni_into` (int8 ``a`` (M, K), ``panels = pack_weights_s8(W).panels``,
    int32 ``out`` (M, N) overwritten; shapes checked, dtypes at compile time). Call only where :func:`available`.

    >>> w = np.array([[1, -2, 3]], dtype=np.int8)
    >>> a = np.array([[4, 5, -128]], dtype=np.int8)
    >>> out = np.empty((1, 1), np.int32)
    >>> if available(): gemm_s8s8s32_avx512_into(a, avx2.pack_weights_s8(w).panels, 1, 3, out)
    ... else: out[:] = 4 - 10 - 384
    >>> out.tolist()
    [[-390]]
    """
    avx2._check_s8_arguments(a, panels, n, k, out)
    m = a.shape[0]
    groups = (k + GROUP - 1) // GROUP
    if groups == 0:
        avx2._fill_zero(out)
        return
    padded_k = groups * GROUP
    a_unsigned = avx2._offset_binary(a, padded_k)  # (M, K padded), a + 128
    block = avx2.S8_BLOCK_K // GROUP
    requant = _no_requant()
    unused = np.empty((0, 0), np.int8)
    for g0 in range(0, groups, block):
        steps = min(block, groups - g0)
        for i0 in range(0, m, ROW_BLOCK):
            _gemm_block(a_unsigned, padded_k, panels, n, groups, g0, steps, i0, min(m, i0 + ROW_BLOCK), out, unused,
                        requant, False)


@numba.njit(cache=True)
def linear_s8_into(x, panels, n, k, requant, products, out):
    """One int8 linear layer: ``out = requantize(x @ W.T + offsets)`` as int8 (M, N), exact.

    ``requant = (offsets, m0, shift, zero_point, low, high)`` from :func:`requant_s8`; ``products``: an int32
    (M, N) scratch array, used only when K spans more than one K block (the product is then made by
    :func:`gemm_s8s8s32_avx512_into` and requantized by the same vector code). ``out``: int8 (M, N), C order.
    Equals :func:`linear_s8_reference` (and :func:`nanoopt.kernels.reference.quantized_linear`). Call only where
    :func:`available`.

    >>> w, x = np.array([[2, 1], [-1, 4]], np.int8), np.array([[10, -3]], np.int8)
    >>> requant = requant_s8(np.array([1, 0]), np.array([2**30, 2**30]), np.array([0, 0]), 0, -128, 127)
    >>> out, scratch = np.empty((1, 2), np.int8), np.empty((1, 2), np.int32)
    >>> if available(): linear_s8_into(x, avx2.pack_weights_s8(w).panels, 2, 2, requant, scratch, out)
    ... else: out[:] = linear_s8_reference(x, w, requant)
    >>> out
    array([[  9, -11]], dtype=int8)
    """
    avx2._check_s8_arguments(x, panels, n, k, products)
    offsets, m0, shift = requant[0], requant[1], requant[2]
    padded_n = (n + LANES - 1) // LANES * LANES
    if offsets.shape[0] < padded_n or m0.shape[0] < padded_n or shift.shape[0] < padded_n:
        raise ValueError("linear_s8_into: the requantization vectors need ceil(n/16)*16 entries")
    if out.shape[0] != x.shape[0] or out.shape[1] != n:
        raise ValueError("linear_s8_into: out must have shape (x.shape[0], n)")
    m = x.shape[0]
    groups = (k + GROUP - 1) // GROUP
    block = avx2.S8_BLOCK_K // GROUP
    if 0 < groups <= block:
        padded_k = groups * GROUP
        a_unsigned = avx2._offset_binary(x, padded_k)  # (M, K padded), x + 128
        for i0 in range(0, m, ROW_BLOCK):
            _gemm_block(a_unsigned, padded_k, panels, n, groups, 0, groups, i0, min(m, i0 + ROW_BLOCK), products,
                        out, requant, True)
        return
    gemm_s8s8s32_avx512_into(x, panels, n, k, products)
    for i in range(m):
        for col in range(0, n, LANES):
            if col + LANES <= n:
                vector = _load(products, i * n + col)
            else:
                vector = _zero()
                for lane in range(n - col):  # build the partial vector lane by lane (never read past the row)
                    vector = _with_lane(vector, lane, products[i, col + lane])
            _write_tile(products, out, i, col, n, (vector,), 1, False, requant, True)


@intrinsic
def _with_lane(typingctx, vector, index, value):
    """The vector with lane ``index`` set to ``value`` (int32)."""
    if not (vector == int32x16 and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        lane = context.cast(builder, args[1], signature.args[1], types.int32)
        return builder.insert_element(args[0], context.cast(builder, args[2], signature.args[2], types.int32), lane)

    return int32x16(vector, index, value), codegen


@numba.njit(cache=True, parallel=True)
def linear_s8_rows_parallel(x, panels, n, k, requant, products, out, rows_per_item):
    """:func:`linear_s8_into` on row blocks of ``x`` in parallel (each block is C-contiguous)."""
    for item in prange((x.shape[0] + rows_per_item - 1) // rows_per_item):
        lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, x.shape[0])
        linear_s8_into(x[lo:hi], panels, n, k, requant, products[lo:hi], out[lo:hi])


# ---------------------------------------------------------------------------------------------------------
# The requantization constants, the NumPy reference and availability.


def requant_s8(offsets: np.ndarray, m0: np.ndarray, shift: np.ndarray, zero_point: int, low: int,
               high: int) -> tuple | None:  # fmt: skip
    """The constants of the fused int8 epilogue, ``(offsets, m0, shift, zero_point, low, high)`` (int32 vectors
    padded to whole panels, int64 scalars), or ``None`` where it does not apply.

    ``offsets`` = ``bias - x_zp * rowsum(W)`` (N,), ``m0``/``shift`` per channel (N,), the output zero point and
    the clamp ``[low, high]`` (``low`` is the zero point under a fused ReLU). It applies when every offset fits
    int32, ``m0`` is in [2^30, 2^31) and every shift is a right shift in [0, 30]; the caller also guarantees that
    the layer's accumulator bound fits int32 (``numba_cpu`` "fast" epilogue), so ``product + offset`` does too.

    >>> constants = requant_s8(np.array([5, -7]), np.array([2**30, 2**30]), np.array([0, 1]), 3, -128, 127)
    >>> constants[0][:3].tolist(), constants[2][:3].tolist(), len(constants[0])
    ([5, -7, 0], [0, 1, 0], 16)
    """
    offsets, m0, shift = (np.asarray(v, np.int64).reshape(-1) for v in (offsets, m0, shift))
    if not (offsets.shape == m0.shape == shift.shape):
        raise ValueError(f"requant_s8: offsets, m0 and shift need one entry per channel, got {offsets.shape}, "
                         f"{m0.shape}, {shift.shape}")
    n = offsets.shape[0]
    if n and (np.abs(offsets).max() > 2**31 - 1 or m0.min() < 2**30 or m0.max() >= 2**31 or shift.min() < 0
              or shift.max() > 30):
        return None
    padded = -(-max(n, 1) // LANES) * LANES
    vectors = []
    for values, fill in ((offsets, 0), (m0, 2**30), (shift, 0)):
        vector = np.full(padded, fill, np.int32)
        vector[:n] = values
        vectors.append(vector)
    return (*vectors, np.int64(zero_point), np.int64(low), np.int64(high))


def linear_s8_reference(x: np.ndarray, w: np.ndarray, requant: tuple) -> np.ndarray:
    """NumPy reference of :func:`linear_s8_into`: ``spec.requantize(x @ w.T + offsets)`` clamped, in int64.

    >>> requant = requant_s8(np.array([1, 0]), np.array([2**30, 2**30]), np.array([0, 0]), 0, -128, 127)
    >>> linear_s8_reference(np.array([[10, -3]], np.int8), np.array([[2, 1], [-1, 4]], np.int8), requant)
    array([[  9, -11]], dtype=int8)
    """
    offsets, m0, shift, zero_point, low, high = requant
    n = w.shape[0]
    acc = x.astype(np.int64) @ w.T.astype(np.int64) + offsets[:n].astype(np.int64)  # (M, N)
    scaled = multiply_by_quantized_multiplier(acc, m0[:n].astype(np.int64), shift[:n].astype(np.int64))
    return np.clip(scaled + int(zero_point), int(low), int(high)).astype(np.int8)


def target_has_avx512_vnni() -> bool:
    """True if AVX-512F, -BW, -VNNI and AVX2 are usable (CPU, Numba's target, ``NANOOPT_CPU_FEATURES``), checked
    without compiling anything.

    >>> isinstance(target_has_avx512_vnni(), bool)
    True
    """
    return FEATURES <= usable_features()


def _self_test() -> bool:
    """Compile the 512-bit GEMM and the fused layer, compare them with int64 NumPy on a product with edge cases."""
    rng = np.random.default_rng(2027)
    m, k, n = 11, 4099, 37  # an 8-row tile plus single rows, 2 K blocks with K % 4 = 3, an odd last panel
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    a[0] = -128
    w[0], w[1] = 127, -127
    packed = avx2.pack_weights_s8(w)
    out = np.empty((m, n), np.int32)
    gemm_s8s8s32_avx512_into(a, packed.panels, n, k, out)
    exact = bool(np.array_equal(out, a.astype(np.int64) @ w.T.astype(np.int64)))
    requant = requant_s8(rng.integers(-1000, 1000, n), rng.integers(2**30, 2**31, n), rng.integers(0, 31, n), -3,
                         -128, 127)
    small = a[:, :100].copy()
    fused = np.empty((m, n), np.int8)
    linear_s8_into(small, avx2.pack_weights_s8(w[:, :100].copy()).panels, n, 100, requant, out, fused)
    return exact and bool(np.array_equal(fused, linear_s8_reference(small, w[:, :100], requant)))


@functools.cache
def available() -> bool:
    """True if the 512-bit kernels run here: :func:`target_has_avx512_vnni`, neither ``NANOOPT_DISABLE_AVX2`` nor
    ``NANOOPT_DISABLE_AVX_VNNI`` is set, and this module's self-test is exact (it compiles the GEMM and the fused
    layer at the signatures the runtime calls them with -- read-only packed panels, C-contiguous int8 rows -- so
    on an empty cache nothing is compiled twice; the 256-bit kernels of :mod:`nanoopt.kernels.avx2`, which do not
    run where these do, are not compiled for it). Computed once per process; never an exception.

    >>> isinstance(available(), bool)
    True
    """
    if switched_on(DISABLE_VNNI_ENV) or not target_has_avx512_vnni():  # checked without compiling anything
        return False
    return avx2_kernel_works(_self_test)  # NANOOPT_DISABLE_AVX2, then the self-test; any failure: the 256-bit path
