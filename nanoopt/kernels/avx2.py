"""Exact int8 GEMM on AVX2 (and AVX-VNNI) from Numba: packed weight panels, register tiles, x86 multiply-adds.

Computes ``C = A @ W.T`` with int8 activations ``A`` (M, K), int8 weights ``W`` (N, K) in PyTorch's
``(out_features, in_features)`` layout and int32 results, bit-exact against int64 arithmetic. This is the
integer matrix product at the heart of integer-only inference (Jacob et al. 2018, eq. 7: the
``sum_j q_a q_w`` term; zero points and requantization are applied around it by the caller). A second
entry point does the TFLite "16x8" product: int16 activations x int8 weights -> int64.

How it is fast (all in this file, top to bottom):

* **Instructions.** Intrinsics (:mod:`nanoopt.kernels.llvm_intrinsics`) emit LLVM IR. We call ``vpmaddubsw``
  (``llvm.x86.avx2.pmadd.ub.sw``: u8 x s8, adjacent pairs summed to s16 with saturation), ``vpmaddwd``
  (``llvm.x86.avx2.pmadd.wd``: s16 x s16, adjacent pairs summed to s32), ``vpxor`` and, where the CPU has
  AVX-VNNI, ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.256``: u8 x s8, groups of 4 summed into an s32
  accumulator, wrapping, no saturation), on 256-bit registers typed
  :data:`~nanoopt.kernels.llvm_intrinsics.int32x8`.
* **AVX2: the sign-mask trick.** ``vpmaddubsw`` wants an unsigned operand. For int8 ``a`` let ``m = a >> 7``
  (0, or -1 = all ones when ``a < 0``) and ``|a|`` in [0, 128] read as u8 (``|-128|`` wraps to the byte
  0x80 = 128 unsigned). ``w XOR m`` is ``w`` for ``a >= 0`` and ``~w = -w - 1`` for ``a < 0``, so
  ``|a| * (w XOR m) = a * w + min(a, 0)``: summed over K, ``sum_k a_k w_k + sum_k min(a_k, 0)``, and the second
  sum depends on the row of A only. The accumulators of row ``i`` start at ``-sum_k min(a_ik, 0)`` (computed
  once per call with ``|a|`` and ``m``). Each product lies in [-16384, 16256] (``|a| <= 128``,
  ``w XOR m`` in [-128, 127]), so a pair sum lies in [-32768, 32512]: the saturation of ``vpmaddubsw`` never
  happens and every s16 is exact. ``vpmaddwd`` with a vector of ones adds the pairs into s32 (4 products per
  lane). Per 32 products: ``vpxor``, ``vpmaddubsw``, ``vpmaddwd``, ``vpaddd`` -- only two of them on the
  multiply ports of Intel cores (ports 0 and 1), where the ``vpsignb`` of the classic sign trick
  ``|a| * (sign(a) * w)`` made it three (``python -m benchmarks.avx2_mca`` models both).
* **AVX2, 7-bit activations: three instructions.** When every code of ``a`` lies in [-64, 63] (7-bit activations,
  PyTorch's ``reduce_range``), ``a + 64`` lies in [0, 127] and ``vpmaddubsw(a + 64, w)`` cannot saturate (a pair sum
  is at most ``2 * 127 * 127 = 32258`` in magnitude): ``vpmaddubsw``, ``vpmaddwd(., 1)``, ``vpaddd`` per 32
  products, the accumulators starting at ``-64 sum_k W[n, k]`` (the row sums below). Chosen by the caller from
  the activation grid (:func:`gemm_s8s8s32_avx2_7bit_into`, which still refuses a code outside) or per call
  (:func:`gemm_s8s8s32_avx2_auto_into`: the range check is fused into the pass that adds 64).
* **AVX-VNNI: the offset trick.** ``vpdpbusd`` does not saturate, so no sign juggling is needed: with
  ``a + 128`` in [0, 255] as the unsigned operand, ``sum_k (a_k + 128) w_k = sum_k a_k w_k + 128 sum_k w_k``.
  The row sums ``sum_k W[n, k]`` are stored with the packed weights; the kernel starts its accumulators at
  ``-128 * sum_k W[n, k]``. All int32 additions wrap modulo 2**32 and the true result fits int32, so the
  wrapped result is the exact one. One instruction per 32 products instead of three (speed:
  ``docs/kernels.md``).
* **Packing** (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication"). Weights
  are constant, so they are reordered once into column panels of ``PANEL_COLUMNS = 8 * VECTORS_PER_TILE``
  output channels (layout in :class:`PackedWeightsS8`). One 32-byte load then holds 4 consecutive K values
  for 8 output channels, the exact operand layout of ``vpmaddubsw`` and ``vpdpbusd``; one broadcast of 4
  bytes of a row of A feeds every lane.
* **Register tiles.** AVX2: 4 rows of A times 2 weight vectors, 8 int32x8 accumulators (4 x 16 outputs)
  that stay in registers during a K block. AVX-VNNI: 6 rows x 2 vectors. Rows left over at the bottom of
  A use tiles of 4, 2 and 1 rows; the 1-row tile keeps even and odd K steps in two sets of accumulators (4
  independent chains, so that one row of A is not bound by the latency of the accumulating instruction).
* **Blocking.** K is cut into blocks of ``S8_BLOCK_K`` values and rows into blocks of ``ROW_BLOCK``
  (one panel block and one A block fit L2); the int32 tile is added to ``out`` after each K block.

Exactness bounds. ``|a * w| <= 128 * 127 = 16256``, so an int32 result cannot overflow while
``K <= MAX_K_S8 = (2**31 - 1) // 16256 = 132104``; longer K is refused with a ``ValueError`` (the exact
result might not fit the int32 output; use the int64 reference). The int16 path accumulates int32 partial
sums over blocks of at most ``S16_BLOCK_K = 510`` values (``510 * 32768 * 128 < 2**31``) and widens them
to int64 between blocks, so it is exact for any K.

Safety. The intrinsics read and write raw memory with no bounds checks. Every jitted entry point
validates the shapes of its arguments before the first load, inputs are zero-padded to whole vectors,
output columns past N are written lane by lane, and the intrinsics accept only C-contiguous arrays of
the expected dtype (anything else is a typing error at compile time).

Availability. The x86 intrinsics compile only when LLVM targets a CPU that has them (else LLVM aborts the
process), so :mod:`nanoopt.kernels.cpu_features` is asked first, without compiling anything; :func:`available`
then compiles and checks one small product. ``gemm_s8s8s32_into`` is bound at import to
:func:`gemm_s8s8s32_vnni_into` when the target has AVX-VNNI, else to :func:`gemm_s8s8s32_avx2_into`
(:data:`KERNEL_S8` says which; ``NANOOPT_DISABLE_AVX_VNNI=1`` keeps the plain AVX2 kernel, ``NANOOPT_DISABLE_AVX2=1``
makes :func:`available` False, ``NANOOPT_CPU_FEATURES`` narrows the features). Callers of the jitted ``*_into``
functions must check :func:`available` first.

Register tiles are generated, not written out: :func:`_tile` takes the multiply-add (sign mask, VNNI, int16) and
the number of rows as compile-time constants and Numba compiles one specialization per pair (6, 4, 2 and 1 rows
for VNNI; 4, 2 and 1 for the others), all driven by one blocked loop nest, :func:`_blocked_product`. Every
kernel is module-level code with ``cache=True``: the first call compiles (a few seconds), later processes load
the machine code from Numba's cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from nanoopt.kernels.avx2_operands import seven_bit_codes, sign_split

# The feature checks live in cpu_features; their names stay importable from here.
from nanoopt.kernels.cpu_features import (
    CPU_FEATURES,
    DISABLE_ENV,
    DISABLE_VNNI_ENV,
    FEATURES_ENV,
    allowed_features,
    avx2_kernel_works,
    kernel_s8_for,
    select_features,
    switched_on,
    target_has_avx2,
    target_has_avx_vnni,
    usable_features,
)
from nanoopt.kernels.llvm_intrinsics import (
    I8X32,
    I16X16,
    I32X8,
    I64X8,
    LANES,
    declare,
    element_pointer,
    int32x8,
    is_c_array,
    load_vector,
    splat,
    splat_constant,
)

__all__ = [
    "CPU_FEATURES",
    "DISABLE_ENV",
    "DISABLE_VNNI_ENV",
    "FEATURES_ENV",
    "KERNEL_S8",
    "MAX_K_S8",
    "PackedWeightsS8",
    "PackedWeightsS16",
    "available",
    "SEVEN_BIT_RANGE",
    "gemm_s8s8s32_avx2_7bit_into",
    "gemm_s8s8s32_avx2_auto_into",
    "gemm_s8s8s32_avx2_into",
    "gemm_s8s8s32_into",
    "gemm_s8s8s32_into_reference",
    "gemm_s8s8s32_packed",
    "gemm_s8s8s32_vnni_into",
    "gemm_s16s8s64_into",
    "gemm_s16s8s64_into_reference",
    "gemm_s16s8s64_packed",
    "pack_weights_s8",
    "pack_weights_s16",
    "seven_bit_fits",
    "allowed_features",
    "kernel_s8_for",
    "select_features",
    "target_has_avx2",
    "target_has_avx_vnni",
    "usable_features",
    "unpack_weights",
]

# ---------------------------------------------------------------------------------------------------------
# Tiling constants (the packed layout depends on VECTORS_PER_TILE; the rest only on speed).

VECTORS_PER_TILE = 2  # weight vectors per register tile (NR)
PANEL_COLUMNS = LANES * VECTORS_PER_TILE  # output channels per packed panel (NC = 16)
S8_GROUP = 4  # K values per int8 vector step (4 bytes per int32 lane)
S16_GROUP = 2  # K values per int16 vector step (2 int16 per int32 lane)
S8_STEP = 32 * VECTORS_PER_TILE  # int8 elements of one panel step (two 32-byte vectors)
S16_STEP = 16 * VECTORS_PER_TILE  # int16 elements of one panel step
AVX2_ROWS = 4  # rows of A per register tile, AVX2 kernels (8 accumulators)
VNNI_ROWS = 6  # rows of A per register tile, AVX-VNNI kernel (12 accumulators)
S8_BLOCK_K = 4096  # K values per cache block of the int8 kernels (64 KiB of one panel: L2; docs/kernels.md)
S16_BLOCK_K = 510  # K values per int32 partial sum of the int16 kernel: 510 * 32768 * 128 < 2**31
ROW_BLOCK = 252  # rows of A per cache block (a multiple of 4 and 6; 252 x 4096 bytes fit L2)
MAX_K_S8 = (2**31 - 1) // (128 * 127)  # 132104: longest K whose int8 x narrow-int8 sum fits int32

# Which multiply-add a register tile runs (the first argument of _tile / _tile_step), and its name. (3 is the kind of
# the 512-bit kernel in nanoopt.kernels.x86_glue.)
SIGN_MASK, VNNI, S16, SEVEN_BIT = 0, 1, 2, 4
TILE_KINDS = {SIGN_MASK: "avx2", VNNI: "vnni", S16: "s16", SEVEN_BIT: "avx2-7bit"}
SEVEN_BIT_RANGE = (-64, 63)  # int8 activation codes the 7-bit tile multiplies exactly (a + 64 in [0, 127])

# ---------------------------------------------------------------------------------------------------------
# Intrinsics: each emits a few LLVM instructions inline. Offsets count elements of the array's dtype.

_zero = splat_constant("_zero", int32x8, I32X8, 0, "An int32x8 of zeros.")
_load = load_vector("_load", int32x8, I32X8, (types.int8, types.int16, types.int32), 1,
                    "The 32 bytes starting at element ``offset`` of an int8/int16/int32 C array (unaligned load).")


def _emit_broadcast4(context, builder, array_type, array, offset):
    """The 4 bytes at element ``offset`` (an intp) of an int8/int16 C array, in all 8 lanes (vpbroadcastd)."""
    pointer = element_pointer(context, builder, array_type, array, types.intp, offset)
    return splat(builder, builder.load(builder.bitcast(pointer, ir.IntType(32).as_pointer()), align=1), I32X8)


def _emit_madd_s8(builder, accumulator, a_mask, a_abs, w_bytes):
    """``accumulator + sum_t |a[t]| * (w[j, t] XOR m[t])`` per int32 lane j, over its 4 bytes t: the sign-mask
    trick (``m = a >> 7``, 0 or -1 per byte; see the module docstring).

    ``vpxor`` gives ``w XOR m`` (``w`` or ``-w - 1``), ``vpmaddubsw(|a|, .)`` the exact s16 pair sums (in
    [-32768, 32512]), ``vpmaddwd(., 1)`` the s32 sum of the two pairs. Summed over K this is
    ``sum_k a_k w_k + sum_k min(a_k, 0)``; the caller starts the accumulators at ``-sum_k min(a_k, 0)``.
    """
    madd_bytes = declare(builder, "llvm.x86.avx2.pmadd.ub.sw", I16X16, [I8X32, I8X32])
    madd_words = declare(builder, "llvm.x86.avx2.pmadd.wd", I32X8, [I16X16, I16X16])
    flipped_w = builder.xor(builder.bitcast(w_bytes, I8X32), builder.bitcast(a_mask, I8X32))
    pairs = builder.call(madd_bytes, [builder.bitcast(a_abs, I8X32), flipped_w])
    quads = builder.call(madd_words, [pairs, ir.Constant(I16X16, [1] * 16)])
    return builder.add(accumulator, quads)


def _emit_madd_u7s8(builder, accumulator, a_unsigned, a_abs, w_bytes):
    """``accumulator + sum_t a[t] * w[j, t]`` per int32 lane j for ``a`` bytes in [0, 127] read as u8 (7-bit codes
    plus 64): ``vpmaddubsw`` (each s16 pair sum ``|.| <= 2 * 127 * 128 = 32512``: never saturated), ``vpmaddwd(.,
    1)``, ``vpaddd``. Three instructions per 32 products, where the sign mask needs four. ``a_abs`` is unused."""
    madd_bytes = declare(builder, "llvm.x86.avx2.pmadd.ub.sw", I16X16, [I8X32, I8X32])
    madd_words = declare(builder, "llvm.x86.avx2.pmadd.wd", I32X8, [I16X16, I16X16])
    pairs = builder.call(madd_bytes, [builder.bitcast(a_unsigned, I8X32), builder.bitcast(w_bytes, I8X32)])
    quads = builder.call(madd_words, [pairs, ir.Constant(I16X16, [1] * 16)])
    return builder.add(accumulator, quads)


def _emit_dot_u8s8(builder, accumulator, a_unsigned, a_abs, w_bytes):
    """``accumulator + sum_t a[t] * w[j, t]`` per lane j, ``a`` bytes read as u8, ``w`` as s8 (vpdpbusd; needs
    AVX-VNNI). No saturation: the 4 products and the accumulator are summed modulo 2**32. ``a_abs`` is unused."""
    dot = declare(builder, "llvm.x86.avx512.vpdpbusd.256", I32X8, [I32X8, I8X32, I8X32])
    return builder.call(dot, [accumulator, builder.bitcast(a_unsigned, I8X32), builder.bitcast(w_bytes, I8X32)])


def _emit_madd_s16(builder, accumulator, a_words, a_abs, w_words):
    """``accumulator + a[2j] * w[2j] + a[2j+1] * w[2j+1]`` per int32 lane j (vpmaddwd, s16 x s16; ``a_abs``
    unused)."""
    madd_words = declare(builder, "llvm.x86.avx2.pmadd.wd", I32X8, [I16X16, I16X16])
    pairs = builder.call(madd_words, [builder.bitcast(a_words, I16X16), builder.bitcast(w_words, I16X16)])
    return builder.add(accumulator, pairs)


# kind -> (multiply-add, elements between the two weight vectors of a panel step, the activations' dtype)
_PRODUCTS = {
    SIGN_MASK: (_emit_madd_s8, 32, types.int8),
    VNNI: (_emit_dot_u8s8, 32, types.int8),
    S16: (_emit_madd_s16, 16, types.int16),
    SEVEN_BIT: (_emit_madd_u7s8, 32, types.int8),
}


def _literal(value):
    return value.literal_value if isinstance(value, types.IntegerLiteral) else None


@intrinsic
def _tile_start(typingctx, rows, start0, start1):
    """A register tile of ``rows`` (a compile-time constant) x 16 channels: ``(start0, start1)`` per row."""
    if _literal(rows) is None or not (start0 == int32x8 and start1 == int32x8):
        return None
    count = _literal(rows)

    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, signature.return_type, [args[1], args[2]] * count)

    return types.UniTuple(int32x8, 2 * count)(rows, start0, start1), codegen


@intrinsic
def _tile_step(typingctx, kind, tile, a, a_abs, a_offset, a_stride, panels, w_offset):
    """One K step of a register tile: two weight vectors from ``panels[w_offset:]``, and per row ``r`` a 4-byte
    broadcast of ``a[a_offset + r a_stride]`` (and of ``a_abs`` for the sign mask) multiplied into accumulators
    ``2 r`` (channels 0-7) and ``2 r + 1`` (channels 8-15). ``kind``: SIGN_MASK, VNNI or S16 (a constant)."""
    if _literal(kind) not in _PRODUCTS or not (isinstance(tile, types.UniTuple) and tile.dtype == int32x8):
        return None
    product, second_vector, dtype = _PRODUCTS[_literal(kind)]
    if not (is_c_array(a, dtype) and is_c_array(a_abs, dtype) and is_c_array(panels, dtype)):
        return None
    if not all(isinstance(value, types.Integer) for value in (a_offset, a_stride, w_offset)):
        return None

    def codegen(context, builder, signature, args):
        _, tile_value, a_value, abs_value, offset, stride, panels_value, w_start = args
        _, tile_type, a_type, abs_type, offset_type, stride_type, panels_type, w_type = signature.args
        offset = context.cast(builder, offset, offset_type, types.intp)
        stride = context.cast(builder, stride, stride_type, types.intp)
        w_start = context.cast(builder, w_start, w_type, types.intp)
        vectors = []
        for shift in (0, second_vector):
            where = builder.add(w_start, ir.Constant(w_start.type, shift))
            pointer = element_pointer(context, builder, panels_type, panels_value, types.intp, where)
            vectors.append(builder.load(builder.bitcast(pointer, I32X8.as_pointer()), align=1))
        values = [builder.extract_value(tile_value, index) for index in range(tile_type.count)]
        for row in range(tile_type.count // VECTORS_PER_TILE):
            row_offset = builder.add(offset, builder.mul(stride, ir.Constant(stride.type, row)))
            x = _emit_broadcast4(context, builder, a_type, a_value, row_offset)
            x_abs = x
            if product is _emit_madd_s8:
                x_abs = _emit_broadcast4(context, builder, abs_type, abs_value, row_offset)
            for column, w in enumerate(vectors):
                index = VECTORS_PER_TILE * row + column
                values[index] = product(builder, values[index], x, x_abs, w)
        return context.make_tuple(builder, tile_type, values)

    return tile(kind, tile, a, a_abs, a_offset, a_stride, panels, w_offset), codegen


@intrinsic
def _tile_sum(typingctx, first, second):
    """Lane-wise ``first + second`` of two register tiles (int32 sums modulo 2**32)."""
    if not (isinstance(first, types.UniTuple) and first.dtype == int32x8 and first == second):
        return None

    def codegen(context, builder, signature, args):
        count = signature.args[0].count
        values = [builder.add(builder.extract_value(args[0], i), builder.extract_value(args[1], i))
                  for i in range(count)]
        return context.make_tuple(builder, signature.return_type, values)

    return first(first, second), codegen


@intrinsic
def _tile_add_rows(typingctx, tile, values, row):
    """``tile`` with ``values[row + r]`` (int32, all lanes) added to both vectors of its row ``r`` (modulo 2**32)."""
    if not (isinstance(tile, types.UniTuple) and tile.dtype == int32x8 and is_c_array(values, types.int32)
            and isinstance(row, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        tile_type, values_type, row_type = signature.args
        first = context.cast(builder, args[2], row_type, types.intp)
        result = []
        for index in range(tile_type.count):
            where = builder.add(first, ir.Constant(first.type, index // VECTORS_PER_TILE))
            value = builder.load(element_pointer(context, builder, values_type, args[1], types.intp, where))
            result.append(builder.add(builder.extract_value(args[0], index), splat(builder, value, I32X8)))
        return context.make_tuple(builder, tile_type, result)

    return tile(tile, values, row), codegen


@intrinsic
def _times(typingctx, x, factor):
    """Lane-wise ``factor * x`` for an integer ``factor``, modulo 2**32."""
    if not (x == int32x8 and isinstance(factor, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        scalar = context.cast(builder, args[1], signature.args[1], types.int32)
        return builder.mul(args[0], splat(builder, scalar, I32X8))

    return int32x8(x, factor), codegen


@intrinsic
def _store_lanes(typingctx, array, offset, vector, accumulate):
    """``array[offset : offset + 8] (+)= vector`` for an int32 C array (sums modulo 2**32) or an int64 one (the
    lanes sign-extended first); ``accumulate`` False overwrites."""
    if not (isinstance(array, types.Array) and array.layout == "C" and array.dtype in (types.int32, types.int64)):
        return None
    if not (isinstance(offset, types.Integer) and vector == int32x8 and isinstance(accumulate, types.Boolean)):
        return None
    wide = array.dtype == types.int64

    def codegen(context, builder, signature, args):
        vector_type = I64X8 if wide else I32X8
        pointer = element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        pointer = builder.bitcast(pointer, vector_type.as_pointer())
        value = builder.sext(args[2], I64X8) if wide else args[2]
        old = builder.load(pointer, align=1)
        flag = context.cast(builder, args[3], signature.args[3], types.boolean)
        kept = builder.select(flag, old, ir.Constant(vector_type, [0] * LANES))
        builder.store(builder.add(value, kept), pointer, align=1)
        return context.get_dummy_value()

    return types.none(array, offset, vector, accumulate), codegen


@intrinsic
def _lane(typingctx, vector, index):
    """Lane ``index`` (0..7) of the vector as an int32."""
    if not (vector == int32x8 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        index = context.cast(builder, args[1], signature.args[1], types.int32)
        return builder.extract_element(args[0], index)

    return types.int32(vector, index), codegen


# ---------------------------------------------------------------------------------------------------------
# Register tiles: the innermost loops, one compiled specialization per (kind, rows). Each returns its int32x8
# accumulators for one K block, row-major: (row 0 channels 0-7, row 0 channels 8-15, row 1 channels 0-7, ...).
# Row r of A starts at flat element ``a_offset + r * a_stride``; the panel block at ``w_offset``.


@numba.njit(cache=True, _nrt=False)
def _tile(kind, rows, a, a_abs, a_offset, a_stride, panels, w_offset, steps, start0, start1, row_starts, row,
          add_rows):
    """``rows`` x 16 channels of ``kind`` products over ``steps`` K steps, accumulators starting at ``start0/1``
    (plus ``row_starts[row + r]`` in row ``r`` if ``add_rows``).

    SIGN_MASK: ``a`` the sign masks ``a >> 7`` of int8 A and ``a_abs = |A|`` laid out like it (4 K values per
    step); VNNI: ``A + 128`` as bytes, SEVEN_BIT: ``A + 64`` (``a_abs`` unused, pass ``a``); S16: int16 ``a`` and
    int16 panels (2 K values per step).
    """
    numba.literally(kind)
    numba.literally(rows)
    group = S16_GROUP if kind == S16 else S8_GROUP
    step_elements = S16_STEP if kind == S16 else S8_STEP
    accumulators = _tile_start(rows, start0, start1)
    if add_rows:
        accumulators = _tile_add_rows(accumulators, row_starts, row)
    if rows == 1:  # even and odd K steps in separate accumulators: 4 chains, not bound by the add's latency
        zero = _zero()
        odd = _tile_start(rows, zero, zero)
        step = 0
        while step + 1 < steps:
            accumulators = _tile_step(kind, accumulators, a, a_abs, a_offset + step * group, a_stride, panels,
                                      w_offset + step * step_elements)  # fmt: skip
            odd = _tile_step(kind, odd, a, a_abs, a_offset + (step + 1) * group, a_stride, panels,
                             w_offset + (step + 1) * step_elements)  # fmt: skip
            step += 2
        if step < steps:
            accumulators = _tile_step(kind, accumulators, a, a_abs, a_offset + step * group, a_stride, panels,
                                      w_offset + step * step_elements)  # fmt: skip
        return _tile_sum(accumulators, odd)
    for step in range(steps):
        accumulators = _tile_step(kind, accumulators, a, a_abs, a_offset + step * group, a_stride, panels,
                                  w_offset + step * step_elements)  # fmt: skip
    return accumulators


# ---------------------------------------------------------------------------------------------------------
# Writing tiles to the output: whole vectors where 8 columns remain, lane by lane at the right edge.


@numba.njit(cache=True, _nrt=False)
def _write_vector(out, row, col, n, vector, accumulate):
    """``out[row, col:col+8] (+)= vector``, clipped at column ``n`` (``out`` int32, sums wrapping as the vector
    path does, or int64; C order, n columns)."""
    if col + LANES <= n:
        _store_lanes(out, row * n + col, vector, accumulate)
    else:
        for lane in range(max(n - col, 0)):
            value = _lane(vector, lane)
            if accumulate:
                out[row, col + lane] += value
            else:
                out[row, col + lane] = value


@numba.njit(cache=True, _nrt=False)
def _write_tile(out, row, col, n, tile, accumulate):
    """Write a tile of ``len(tile) // 2`` rows x 16 channels at ``out[row:, col:]``."""
    for r in range(len(tile) // VECTORS_PER_TILE):
        _write_vector(out, row + r, col, n, tile[2 * r], accumulate)
        _write_vector(out, row + r, col + LANES, n, tile[2 * r + 1], accumulate)


@numba.njit(cache=True, _nrt=False)
def _blocked_product(kind, rows, a, a_abs, panels, n, groups, padded_k, footer_scale, row_starts, out):
    """``out = a @ W.T`` by cache blocks (K blocks x row blocks x panels) of ``kind`` register tiles: ``rows``-row
    tiles, then 4, 2 and 1 rows for what is left. ``a`` (and ``a_abs``, see :func:`_tile`) are padded to
    ``padded_k = groups * group`` columns. The first K block's accumulators start at ``footer_scale`` times the
    panel's row-sum footer (VNNI: -128; SEVEN_BIT: -64; 0: from zero), plus ``row_starts[i]`` in row ``i`` unless
    ``row_starts`` is empty (SIGN_MASK: the rows' corrections)."""
    numba.literally(kind)
    numba.literally(rows)
    group = S16_GROUP if kind == S16 else S8_GROUP
    step_elements = S16_STEP if kind == S16 else S8_STEP
    block_groups = (S16_BLOCK_K if kind == S16 else S8_BLOCK_K) // group
    panel_size = (groups + (0 if kind == S16 else 1)) * step_elements  # int8 panels end with the row-sum footer
    zero = _zero()
    for g0 in range(0, groups, block_groups):
        steps = min(block_groups, groups - g0)
        accumulate = g0 > 0
        add_rows = row_starts.shape[0] > 0 and not accumulate
        for i0 in range(0, a.shape[0], ROW_BLOCK):
            i1 = min(a.shape[0], i0 + ROW_BLOCK)
            for p in range(panels.shape[0]):
                col = p * PANEL_COLUMNS
                w_offset = p * panel_size + g0 * step_elements
                start0 = start1 = zero
                if footer_scale != 0 and not accumulate:
                    footer = p * panel_size + groups * step_elements
                    start0 = _times(_load(panels, footer), footer_scale)
                    start1 = _times(_load(panels, footer + 32), footer_scale)
                i = i0
                while i + rows <= i1:
                    tile = _tile(kind, rows, a, a_abs, i * padded_k + g0 * group, padded_k, panels, w_offset, steps,
                                 start0, start1, row_starts, i, add_rows)  # fmt: skip
                    _write_tile(out, i, col, n, tile, accumulate)
                    i += rows
                if i + 4 <= i1:  # the rows left: 4 + 1, 4, 2 + 1, 2, 1
                    tile4 = _tile(kind, 4, a, a_abs, i * padded_k + g0 * group, padded_k, panels, w_offset, steps,
                                  start0, start1, row_starts, i, add_rows)  # fmt: skip
                    _write_tile(out, i, col, n, tile4, accumulate)
                    i += 4
                if i + 2 <= i1:
                    tile2 = _tile(kind, 2, a, a_abs, i * padded_k + g0 * group, padded_k, panels, w_offset, steps,
                                  start0, start1, row_starts, i, add_rows)  # fmt: skip
                    _write_tile(out, i, col, n, tile2, accumulate)
                    i += 2
                if i < i1:
                    tile1 = _tile(kind, 1, a, a_abs, i * padded_k + g0 * group, padded_k, panels, w_offset, steps,
                                  start0, start1, row_starts, i, add_rows)  # fmt: skip
                    _write_tile(out, i, col, n, tile1, accumulate)


# ---------------------------------------------------------------------------------------------------------
# Jitted GEMM drivers: validate shapes, prepare A, loop over K blocks, row blocks, panels and tiles.


def _require_types(a, a_dtype, panels, panel_dtype, out, out_dtype):
    """Jitted code only (see the overload below): a compile-time check of the arrays' dtypes and layouts."""
    raise NotImplementedError("_require_types is only callable from Numba-compiled code")


@overload(_require_types)
def _require_types_typing(a, a_dtype, panels, panel_dtype, out, out_dtype):
    """A TypingError naming the expected and the given types, so a wrong dtype can never reach a raw load."""
    expected = [(a, a_dtype, 2, "a"), (panels, panel_dtype, 5, "panels"), (out, out_dtype, 2, "out")]
    for given, dtype, ndim, label in expected:
        wanted = dtype.dtype  # a NumberClass such as types.NumberClass(int8)
        if not (is_c_array(given, wanted) and given.ndim == ndim):
            raise TypingError(
                f"AVX2 GEMM kernel: {label} must be a C-contiguous {ndim}-d {wanted} array, got {given}"
            )
    return lambda a, a_dtype, panels, panel_dtype, out, out_dtype: None


@numba.njit(cache=True)
def _check_s8_arguments(a, panels, n, k, out):
    """Raise ValueError unless the shapes fit ``out (M, n) = a (M, k) @ W.T`` with W packed in ``panels``; return
    the number of 4-value groups of K (for K = 0, ``out`` is zeroed)."""
    _require_types(a, np.int8, panels, np.int8, out, np.int32)
    if n < 0 or k < 0:
        raise ValueError("gemm_s8s8s32_into: n and k must be >= 0")
    if k > MAX_K_S8:
        raise ValueError("gemm_s8s8s32_into: k > MAX_K_S8 = 132104, the int32 result could overflow")
    if a.shape[1] != k:
        raise ValueError("gemm_s8s8s32_into: a must have k columns")
    if out.shape[0] != a.shape[0] or out.shape[1] != n:
        raise ValueError("gemm_s8s8s32_into: out must have shape (a.shape[0], n)")
    n_panels = (n + PANEL_COLUMNS - 1) // PANEL_COLUMNS
    groups = (k + S8_GROUP - 1) // S8_GROUP
    if (panels.shape[0] != n_panels or panels.shape[1] != groups + 1 or panels.shape[2] != VECTORS_PER_TILE
            or panels.shape[3] != LANES or panels.shape[4] != S8_GROUP):
        raise ValueError("gemm_s8s8s32_into: panels must have shape (ceil(n/16), ceil(k/4) + 1, 2, 8, 4)")
    if groups == 0:
        _fill_zero(out)  # the empty product
    return groups


@numba.njit(cache=True)
def _fill_zero(out):
    """``out[:, :] = 0`` for the empty product (K = 0)."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = 0


@numba.njit(cache=True)
def _pad_columns(a, padded_k):
    """``a`` itself if it already has ``padded_k`` columns, else a zero-padded copy (same dtype)."""
    m, k = a.shape
    if k == padded_k:
        return a
    padded = np.zeros((m, padded_k), a.dtype)  # (M, K padded)
    for i in range(m):  # plain loops: slice assignment would compile Numba's broadcasting (seconds)
        for j in range(k):
            padded[i, j] = a[i, j]
    return padded


@numba.njit(cache=True)
def gemm_s8s8s32_avx2_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly with the AVX2 sign-mask trick, for Numba code that fuses work after it.

    ``a``: int8 (M, K), C-contiguous. ``panels``: ``pack_weights_s8(W).panels`` for int8 ``W`` (N, K) in
    [-127, 127]. ``n``, ``k``: N and K. ``out``: int32 (M, N), C-contiguous, overwritten. Shapes are checked
    (ValueError), dtypes and layouts at compile time (TypingError). Call only where :func:`available` is
    True: compiling for a target without AVX2 aborts the process. ``gemm_s8s8s32_into`` is this kernel or
    :func:`gemm_s8s8s32_vnni_into` (same arguments, same result).

    >>> w = np.array([[1, -2, 3]], dtype=np.int8)
    >>> a = np.array([[4, 5, -128]], dtype=np.int8)
    >>> out = np.empty((1, 1), np.int32)
    >>> if available(): gemm_s8s8s32_avx2_into(a, pack_weights_s8(w).panels, 1, 3, out)
    ... else: out[:] = 4 - 10 - 384
    >>> out.tolist()
    [[-390]]
    """
    groups = _check_s8_arguments(a, panels, n, k, out)
    if groups:
        masks, magnitudes, starts = sign_split(a, groups * S8_GROUP)  # (M, K padded) x 2, (M,)
        _blocked_product(SIGN_MASK, AVX2_ROWS, masks, magnitudes, panels, n, groups, groups * S8_GROUP, 0, starts,
                         out)  # fmt: skip


@numba.njit(cache=True)
def _offset_binary(a, padded_k):
    """``a + 128`` as bytes (``a XOR 0x80``, read unsigned by vpdpbusd), zero-padded to ``padded_k`` columns."""
    m, k = a.shape
    shifted = np.empty((m, padded_k), np.int8)  # (M, K padded)
    for i in range(m):
        for j in range(k):
            shifted[i, j] = a[i, j] ^ np.int8(-128)
        for j in range(k, padded_k):
            shifted[i, j] = 0  # meets zero weights: any value would do
    return shifted


@numba.njit(cache=True)
def gemm_s8s8s32_vnni_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly with AVX-VNNI ``vpdpbusd``; arguments as :func:`gemm_s8s8s32_avx2_into`.

    Call only where :func:`available` and :func:`target_has_avx_vnni` are True: compiling for a target
    without AVX-VNNI aborts the process.

    >>> w = np.array([[1, -2, 3]], dtype=np.int8)
    >>> a = np.array([[4, 5, -128]], dtype=np.int8)
    >>> out = np.empty((1, 1), np.int32)
    >>> if available() and target_has_avx_vnni(): gemm_s8s8s32_vnni_into(a, pack_weights_s8(w).panels, 1, 3, out)
    ... else: out[:] = 4 - 10 - 384
    >>> out.tolist()
    [[-390]]
    """
    groups = _check_s8_arguments(a, panels, n, k, out)
    if groups:
        shifted = _offset_binary(a, groups * S8_GROUP)  # (M, K padded), a + 128 as unsigned bytes
        _blocked_product(VNNI, VNNI_ROWS, shifted, shifted, panels, n, groups, groups * S8_GROUP, -128,
                         np.empty(0, np.int32), out)  # fmt: skip


@numba.njit(cache=True)
def gemm_s16s8s64_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly, for int16 ``a`` (M, K) and the int16 panels of int8 ``W`` (N, K).

    ``panels`` is ``PackedWeightsS16.panels`` (shape ``(ceil(N/16), ceil(K/2), 2, 8, 2)``, int16),
    ``out`` an int64 (M, N) C-contiguous array that is overwritten. int32 partial sums over at most
    ``S16_BLOCK_K`` K values (``|partial| <= 510 * 32768 * 128 < 2**31``) are widened to int64 and added.
    Call only where :func:`available` is True (AVX2).

    >>> w = np.array([[-128, 127]], dtype=np.int8)
    >>> a = np.array([[-32768, 32767]], dtype=np.int16)
    >>> out = np.empty((1, 1), np.int64)
    >>> if available(): gemm_s16s8s64_into(a, pack_weights_s16(w).panels, 1, 2, out)
    ... else: out[:] = 32768 * 128 + 32767 * 127
    >>> out.tolist()
    [[8355713]]
    """
    _require_types(a, np.int16, panels, np.int16, out, np.int64)
    m = a.shape[0]
    pairs = (k + S16_GROUP - 1) // S16_GROUP
    n_panels = (n + PANEL_COLUMNS - 1) // PANEL_COLUMNS
    if n < 0 or k < 0:
        raise ValueError("gemm_s16s8s64_into: n and k must be >= 0")
    if a.shape[1] != k:
        raise ValueError("gemm_s16s8s64_into: a must have k columns")
    if out.shape[0] != m or out.shape[1] != n:
        raise ValueError("gemm_s16s8s64_into: out must have shape (a.shape[0], n)")
    if (panels.shape[0] != n_panels or panels.shape[1] != pairs or panels.shape[2] != VECTORS_PER_TILE
            or panels.shape[3] != LANES or panels.shape[4] != S16_GROUP):
        raise ValueError("gemm_s16s8s64_into: panels must have shape (ceil(n/16), ceil(k/2), 2, 8, 2)")
    if pairs == 0:
        _fill_zero(out)
        return
    a_padded = _pad_columns(a, pairs * S16_GROUP)  # (M, K rounded up to 2)
    _blocked_product(S16, AVX2_ROWS, a_padded, a_padded, panels, n, pairs, pairs * S16_GROUP, 0, np.empty(0, np.int32),
                     out)  # fmt: skip


@numba.njit(cache=True)
def gemm_s8s8s32_avx2_7bit_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly for int8 codes ``a`` in [-64, 63] (7-bit activations, PyTorch's
    ``reduce_range``), three AVX2 instructions per 32 products; arguments as :func:`gemm_s8s8s32_avx2_into`.

    ``vpmaddubsw(a + 64, w)``: ``a + 64`` in [0, 127] read as u8, ``w`` in [-127, 127], so each s16 pair sum is at
    most ``2 * 127 * 127 = 32258`` in magnitude and never saturates; ``vpmaddwd(., 1)`` and ``vpaddd`` add the pairs
    into int32. Summed over K this is ``sum_k a_k w_k + 64 sum_k w_k``; the accumulators start at ``-64`` times the
    packed row sums (the panels' footer, as the VNNI kernel's ``-128``). int32 sums wrap and the true result fits
    int32 (:data:`MAX_K_S8`), so the result is exact. A code outside [-64, 63] is refused (``ValueError``), found in
    the same pass that adds 64. Call only where :func:`available` is True.

    >>> codes = np.array([[4, 63, -64], [0, -1, 1]], dtype=np.int8)  # 7-bit codes
    >>> weights = pack_weights_s8(np.array([[1, -2, 3]], dtype=np.int8))
    >>> result = np.zeros((2, 1), np.int32)
    >>> _ = available() and gemm_s8s8s32_avx2_7bit_into(codes, weights.panels, 1, 3, result)
    >>> result.ravel().tolist() if available() else [4 - 126 - 192, 2 + 3]
    [-314, 5]
    """
    groups = _check_s8_arguments(a, panels, n, k, out)
    if groups:
        shifted, fits = seven_bit_codes(a, groups * S8_GROUP)  # (M, K padded), a + 64 as unsigned bytes
        if not fits:
            raise ValueError("gemm_s8s8s32_avx2_7bit_into: a has codes outside [-64, 63]; use gemm_s8s8s32_avx2_into "
                             "(any int8 codes) or gemm_s8s8s32_avx2_auto_into")
        _blocked_product(SEVEN_BIT, AVX2_ROWS, shifted, shifted, panels, n, groups, groups * S8_GROUP, -64,
                         np.empty(0, np.int32), out)  # fmt: skip


@numba.njit(cache=True)
def gemm_s8s8s32_avx2_auto_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly on AVX2, the tile chosen by the codes of ``a``: the 7-bit tile
    (:func:`gemm_s8s8s32_avx2_7bit_into`, 3 instructions per 32 products) when every code lies in [-64, 63], else the
    sign mask (:func:`gemm_s8s8s32_avx2_into`, 4). The range is checked in the pass that prepares the 7-bit operand,
    which stops at the first row with a code outside; a full-range ``a`` then pays that pass (at most M*K bytes) on
    top of the sign split. Same arguments and result as :func:`gemm_s8s8s32_avx2_into`.

    >>> weights = pack_weights_s8(np.array([[1, -2, 3]], dtype=np.int8))
    >>> result = np.zeros((1, 1), np.int32)
    >>> for row in ([4, 5, -64], [4, 5, -128]):  # the 7-bit tile, then the sign mask
    ...     _ = available() and gemm_s8s8s32_avx2_auto_into(np.array([row], np.int8), weights.panels, 1, 3, result)
    ...     print(int(result[0, 0]) if available() else 4 - 10 + 3 * row[2])
    -198
    -390
    """
    groups = _check_s8_arguments(a, panels, n, k, out)
    if groups:
        padded_k = groups * S8_GROUP
        shifted, fits = seven_bit_codes(a, padded_k)  # (M, K padded)
        if fits:
            _blocked_product(SEVEN_BIT, AVX2_ROWS, shifted, shifted, panels, n, groups, padded_k, -64,
                             np.empty(0, np.int32), out)  # fmt: skip
        else:
            masks, magnitudes, starts = sign_split(a, padded_k)  # (M, K padded) x 2, (M,)
            _blocked_product(SIGN_MASK, AVX2_ROWS, masks, magnitudes, panels, n, groups, padded_k, 0, starts, out)


def seven_bit_fits(low: int, high: int) -> bool:
    """Whether int8 codes known to lie in ``[low, high]`` (e.g. ``QuantSpec.qmin``/``qmax`` of a layer's input grid)
    fit the 7-bit tile, ``[-64, 63]``.

    >>> seven_bit_fits(-64, 63), seven_bit_fits(-128, 127), seven_bit_fits(-64, 64)
    (True, False, False)
    """
    return SEVEN_BIT_RANGE[0] <= low and high <= SEVEN_BIT_RANGE[1]


# ---------------------------------------------------------------------------------------------------------
# Packing weights (NumPy, once per layer) and the NumPy references of the jitted kernels.


@dataclass(frozen=True, eq=False)
class PackedWeightsS8:
    """Int8 weights ``W`` (N, K) reordered for :func:`gemm_s8s8s32_into`.

    ``panels`` is int8, C-contiguous, read-only, of shape ``(P, G + 1, 2, 8, 4)`` with ``P = ceil(N/16)``
    panels and ``G = ceil(K/4)`` groups of K values:

    * ``panels[p, g, r, j, t] = W[16 p + 8 r + j, 4 g + t]`` for ``g < G``, zero where the index falls
      past ``W``. ``panels[p, g]`` is 64 contiguous bytes: two 256-bit vectors, each holding 4 consecutive
      K values of 8 output channels.
    * the footer ``panels[p, G, r, j, :]`` holds the 4 little-endian bytes of the int32 row sum
      ``sum_k W[16 p + 8 r + j, k]`` (read them with ``panels[:, -1].view("<i4")[..., 0]``, shape (P, 2, 8));
      the AVX-VNNI kernel starts its accumulators at ``-128`` times these sums.
    """

    n: int  # output channels (rows of W)
    k: int  # input features (columns of W)
    panels: np.ndarray  # (ceil(n/16), ceil(k/4) + 1, 2, 8, 4) int8, the last group is the row-sum footer


@dataclass(frozen=True, eq=False)
class PackedWeightsS16:
    """Int8 weights ``W`` (N, K) widened to int16 and reordered for :func:`gemm_s16s8s64_into`.

    ``panels[p, g, r, j, t] = W[16 p + 8 r + j, 2 g + t]``: shape ``(ceil(N/16), ceil(K/2), 2, 8, 2)``,
    int16, C-contiguous, read-only, zero-padded. One 256-bit vector holds 2 K values of 8 output channels.
    """

    n: int  # output channels (rows of W)
    k: int  # input features (columns of W)
    panels: np.ndarray  # (ceil(n/16), ceil(k/2), 2, 8, 2) int16


def _check_int8_weights(w: object, name: str) -> np.ndarray:
    if not isinstance(w, np.ndarray):
        raise TypeError(f"{name} expects weights as a numpy array, got {type(w).__name__}")
    if w.dtype != np.int8:
        raise TypeError(f"{name} expects int8 weights, got dtype {w.dtype} (quantize them first)")
    if w.ndim != 2:
        raise ValueError(f"{name} expects weights of shape (out_features, in_features), got shape {w.shape}")
    return w


def _pack(w: np.ndarray, group: int, dtype: type, row_sum_footer: bool) -> np.ndarray:
    """Zero-pad ``w`` to whole panels and groups, reorder to ``(N/16, K/group, 2, 8, group)``, freeze.

    With ``row_sum_footer`` (int8 panels, group 4) one more group holds the int32 row sums of ``w``.
    """
    n, k = w.shape
    n_panels = -(-n // PANEL_COLUMNS)
    groups = -(-k // group)
    stored_groups = groups + int(row_sum_footer)
    padded = np.zeros((n_panels * PANEL_COLUMNS, stored_groups * group), dtype)  # (N padded, K padded [+ 4])
    padded[:n, :k] = w
    if row_sum_footer:  # |row sum| <= 127 K < 2**31 for K <= MAX_K_S8
        row_sums = w.sum(axis=1, dtype=np.int64).astype("<i4")  # (N,)
        padded[:n, groups * group :] = row_sums.view(np.int8).reshape(n, group)
    panels = padded.reshape(n_panels, VECTORS_PER_TILE, LANES, stored_groups, group)  # (P, r, j, g, t)
    panels = np.ascontiguousarray(panels.transpose(0, 3, 1, 2, 4))  # (P, g, r, j, t)
    panels.setflags(write=False)
    return panels


def pack_weights_s8(w: np.ndarray) -> PackedWeightsS8:
    """Pack int8 weights ``w`` (out_features N, in_features K) for :func:`gemm_s8s8s32_packed`.

    The weights must be narrow range, ``-127 <= w <= 127`` (the symmetric int8 weights of the integer
    specification): :data:`MAX_K_S8`, the longest K whose exact int32 result is guaranteed, rests on
    ``|a * w| <= 128 * 127``.

    >>> packed = pack_weights_s8(np.array([[1, -2, 3], [127, -127, 0]], dtype=np.int8))
    >>> packed.n, packed.k, packed.panels.shape
    (2, 3, (1, 2, 2, 8, 4))
    >>> packed.panels[0, 0, 0, 1].tolist()  # channel 1, K values 0..3 (the last one is padding)
    [127, -127, 0, 0]
    >>> packed.panels[:, -1].view("<i4")[0, 0, :3, 0].tolist()  # footer: row sums of channels 0, 1, 2
    [2, 0, 0]
    """
    w = _check_int8_weights(w, "pack_weights_s8")
    if w.size and w.min() < -127:
        row, col = np.unravel_index(int(np.argmin(w)), w.shape)
        raise ValueError(
            "pack_weights_s8 expects narrow-range int8 weights in [-127, 127] (the integer specification's "
            f"symmetric weights; the int32 bound MAX_K_S8 assumes them), got w[{row}, {col}] = {int(w[row, col])}"
        )
    if w.shape[1] > MAX_K_S8:
        raise ValueError(f"pack_weights_s8 supports K <= {MAX_K_S8} (int32 results), got K = {w.shape[1]}")
    return PackedWeightsS8(n=w.shape[0], k=w.shape[1], panels=_pack(w, S8_GROUP, np.int8, row_sum_footer=True))


def pack_weights_s16(w: np.ndarray) -> PackedWeightsS16:
    """Pack int8 weights ``w`` (N, K), any value in [-128, 127], as int16 for :func:`gemm_s16s8s64_packed`.

    >>> packed = pack_weights_s16(np.array([[-128, 127, 5]], dtype=np.int8))
    >>> packed.n, packed.k, packed.panels.shape, packed.panels.dtype
    (1, 3, (1, 2, 2, 8, 2), dtype('int16'))
    >>> packed.panels[:, :, 0, 0].tolist()  # channel 0: K values (0, 1) and (2, padding)
    [[[-128, 127], [5, 0]]]
    """
    w = _check_int8_weights(w, "pack_weights_s16")
    return PackedWeightsS16(n=w.shape[0], k=w.shape[1], panels=_pack(w, S16_GROUP, np.int16, row_sum_footer=False))


def unpack_weights(packed: PackedWeightsS8 | PackedWeightsS16) -> np.ndarray:
    """The int8 weights ``W`` (N, K) that ``packed`` was made from (inverse of the two pack functions).

    >>> w = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    >>> bool(np.array_equal(unpack_weights(pack_weights_s8(w)), w))
    True
    """
    if not isinstance(packed, (PackedWeightsS8, PackedWeightsS16)):
        raise TypeError(f"unpack_weights expects PackedWeightsS8 or PackedWeightsS16, got {type(packed).__name__}")
    return _unpack(packed.panels, packed.n, packed.k)


def _unpack(panels: np.ndarray, n: int, k: int) -> np.ndarray:
    n_panels, _, vectors, lanes, group = panels.shape
    groups = -(-k // group)  # the int8 panels' row-sum footer comes after these groups
    padded = panels[:, :groups].transpose(0, 2, 3, 1, 4).reshape(n_panels * vectors * lanes, groups * group)
    return padded[:n, :k].astype(np.int8)


def gemm_s8s8s32_into_reference(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """NumPy reference of :func:`gemm_s8s8s32_into` (same arguments): ``out[:] = a @ W.T`` in int64.

    >>> w = np.array([[-127, 127], [3, 4]], dtype=np.int8)
    >>> a = np.array([[-128, -128]], dtype=np.int8)
    >>> out = np.empty((1, 2), np.int32)
    >>> gemm_s8s8s32_into_reference(a, pack_weights_s8(w).panels, 2, 2, out)
    >>> out.tolist()
    [[0, -896]]
    """
    product = a.astype(np.int64) @ _unpack(panels, n, k).T.astype(np.int64)  # (M, N)
    if product.size and np.abs(product).max() > np.iinfo(np.int32).max:
        raise ValueError("gemm_s8s8s32_into_reference: the exact product does not fit int32")
    out[...] = product


def gemm_s16s8s64_into_reference(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """NumPy reference of :func:`gemm_s16s8s64_into` (same arguments): ``out[:] = a @ W.T`` in int64.

    >>> w = np.array([[-128, 127]], dtype=np.int8)
    >>> a = np.array([[-32768, 32767]], dtype=np.int16)
    >>> out = np.empty((1, 1), np.int64)
    >>> gemm_s16s8s64_into_reference(a, pack_weights_s16(w).panels, 1, 2, out)
    >>> out.tolist()
    [[8355713]]
    """
    out[...] = a.astype(np.int64) @ _unpack(panels, n, k).T.astype(np.int64)



# ---------------------------------------------------------------------------------------------------------
# Availability and the Python entry points.


# The int8 kernel of the Python entry points, fixed at import: ``gemm_s8s8s32_into(a, panels, n, k, out)``
# overwrites the int32 (M, N) C-contiguous ``out`` with ``a @ W.T`` for int8 ``a`` (M, K) C-contiguous and
# ``panels = pack_weights_s8(W).panels``. Both kernels give the same, exact result; check available() first.
# Jitted code must call one of the two kernels by its own name, never this alias: Numba's cache does not
# record which function a global named at compile time, so a cached caller would keep the kernel of the
# process that compiled it (nanoopt.kernels.x86_glue has one driver per kernel for that reason).
KERNEL_S8 = "avx-vnni" if target_has_avx_vnni() and not switched_on(DISABLE_VNNI_ENV) else "avx2"
gemm_s8s8s32_into = gemm_s8s8s32_vnni_into if KERNEL_S8 == "avx-vnni" else gemm_s8s8s32_avx2_into


def _self_test() -> bool:
    """Compile the int8 kernel and compare it with int64 NumPy on a small product with edge cases."""
    rng = np.random.default_rng(12345)
    m, k, n = 7, 4099, 21  # a 4- or 6-row tile plus single rows, 2 K blocks with K % 4 = 3, a partial panel
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    a[0] = -128
    w[0] = 127
    w[1] = -127
    out = np.empty((m, n), np.int32)
    gemm_s8s8s32_into(a, pack_weights_s8(w).panels, n, k, out)
    return bool(np.array_equal(out, a.astype(np.int64) @ w.T.astype(np.int64)))


@functools.cache
def available() -> bool:
    """True if the int8 and int16 GEMMs can run here (:func:`~nanoopt.kernels.cpu_features.avx2_kernel_works`:
    AVX2 usable, ``NANOOPT_DISABLE_AVX2`` off, the self-test exact). Checked once per process;
    ``available.cache_clear()`` forgets the answer.

    >>> isinstance(available(), bool)
    True
    """
    return avx2_kernel_works(_self_test)


def _require_available(name: str) -> None:
    if not available():
        raise RuntimeError(
            f"{name} needs the AVX2 kernels, which are not available here (no AVX2 in the CPU or in Numba's "
            f"target, or {DISABLE_ENV} is set); use the portable kernels instead"
        )


def _check_activations(a: object, dtype: type, k: int, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} expects a as a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} expects a of dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"{name} expects a of shape (M, {k}) to match the packed weights, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} expects a C-contiguous array a (use np.ascontiguousarray), got strides "
                         f"{a.strides}")
    return a


def gemm_s8s8s32_packed(a: np.ndarray, packed: PackedWeightsS8) -> np.ndarray:
    """``a @ W.T`` exactly as int32 (M, N), for int8 ``a`` (M, K) and ``packed = pack_weights_s8(W)``.

    Needs :func:`available` and ``K <= MAX_K_S8`` (132104): beyond it ``|a @ W.T|`` may exceed int32.
    Runs the AVX-VNNI kernel where the CPU has it, else the AVX2 one (:data:`KERNEL_S8`), there
    :func:`gemm_s8s8s32_avx2_auto_into`: the 7-bit tile when every code of ``a`` lies in [-64, 63].

    >>> w = np.array([[1, 2, 3], [-127, 0, 127]], dtype=np.int8)
    >>> a = np.array([[-128, 1, 1]], dtype=np.int8)
    >>> gemm_s8s8s32_packed(a, pack_weights_s8(w)).tolist() if available() else [[-123, 16383]]
    [[-123, 16383]]
    """
    if not isinstance(packed, PackedWeightsS8):
        raise TypeError(f"gemm_s8s8s32_packed expects PackedWeightsS8 (pack_weights_s8), got "
                        f"{type(packed).__name__}")
    if packed.k > MAX_K_S8:
        raise ValueError(f"gemm_s8s8s32_packed supports K <= {MAX_K_S8} (int32 results), got K = {packed.k}")
    a = _check_activations(a, np.int8, packed.k, "gemm_s8s8s32_packed")
    _require_available("gemm_s8s8s32_packed")
    out = np.empty((a.shape[0], packed.n), np.int32)  # (M, N)
    kernel = gemm_s8s8s32_avx2_auto_into if KERNEL_S8 == "avx2" else gemm_s8s8s32_into
    kernel(a, packed.panels, packed.n, packed.k, out)
    return out


def gemm_s16s8s64_packed(a: np.ndarray, packed: PackedWeightsS16) -> np.ndarray:
    """``a @ W.T`` exactly as int64 (M, N), for int16 ``a`` (M, K) and ``packed = pack_weights_s16(W)``.

    >>> w = np.array([[-128, 127]], dtype=np.int8)
    >>> a = np.array([[-32768, -32768]], dtype=np.int16)
    >>> gemm_s16s8s64_packed(a, pack_weights_s16(w)).tolist() if available() else [[32768]]
    [[32768]]
    """
    if not isinstance(packed, PackedWeightsS16):
        raise TypeError(f"gemm_s16s8s64_packed expects PackedWeightsS16 (pack_weights_s16), got "
                        f"{type(packed).__name__}")
    a = _check_activations(a, np.int16, packed.k, "gemm_s16s8s64_packed")
    _require_available("gemm_s16s8s64_packed")
    out = np.empty((a.shape[0], packed.n), np.int64)  # (M, N)
    gemm_s16s8s64_into(a, packed.panels, packed.n, packed.k, out)
    return out
