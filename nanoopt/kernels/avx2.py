"""Exact int8 GEMM on AVX2 (and AVX-VNNI) from Numba: packed weight panels, register tiles, x86 multiply-adds.

Computes ``C = A @ W.T`` with int8 activations ``A`` (M, K), int8 weights ``W`` (N, K) in PyTorch's
``(out_features, in_features)`` layout and int32 results, bit-exact against int64 arithmetic. This is the
integer matrix product at the heart of integer-only inference (Jacob et al. 2018, eq. 7: the
``sum_j q_a q_w`` term; zero points and requantization are applied around it by the caller). A second
entry point does the TFLite "16x8" product: int16 activations x int8 weights -> int64.

How it is fast (all in this file, top to bottom):

* **Instructions.** ``numba.extending.intrinsic`` lets jitted code emit LLVM IR. We call ``vpmaddubsw``
  (``llvm.x86.avx2.pmadd.ub.sw``: u8 x s8, adjacent pairs summed to s16 with saturation), ``vpmaddwd``
  (``llvm.x86.avx2.pmadd.wd``: s16 x s16, adjacent pairs summed to s32), ``vpsignb``
  (``llvm.x86.avx2.psign.b``) and, where the CPU has AVX-VNNI, ``vpdpbusd``
  (``llvm.x86.avx512.vpdpbusd.256``: u8 x s8, groups of 4 summed into an s32 accumulator, wrapping,
  no saturation). A 256-bit register is a small Numba type, :data:`int32x8`, whose data model is the LLVM
  vector ``<8 x i32>``, so values of that type stay in registers across calls and loop iterations.
* **AVX2: the sign trick.** ``vpmaddubsw`` wants an unsigned operand. For int8 ``a`` and ``w``,
  ``a * w = |a| * (sign(a) * w)`` where ``|a|`` in [0, 128] is read as u8 (``|-128|`` wraps to the byte
  0x80 = 128 unsigned) and ``sign(a) * w`` stays in int8 because weights are narrow range [-127, 127].
  A pair sum is then at most ``2 * 128 * 127 = 32512 < 32767``: the saturation never happens and every
  s16 is exact. ``vpmaddwd`` with a vector of ones adds the pairs into s32 (4 products per lane).
  ``|a|`` is computed once per call, not in the inner loop.
* **AVX-VNNI: the offset trick.** ``vpdpbusd`` does not saturate, so no sign juggling is needed: with
  ``a + 128`` in [0, 255] as the unsigned operand, ``sum_k (a_k + 128) w_k = sum_k a_k w_k + 128 sum_k w_k``.
  The row sums ``sum_k W[n, k]`` are stored with the packed weights; the kernel starts its accumulators at
  ``-128 * sum_k W[n, k]``. All int32 additions wrap modulo 2**32 and the true result fits int32, so the
  wrapped result is the exact one. One instruction per 32 products instead of three: about twice as fast.
* **Packing** (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication"). Weights
  are constant, so they are reordered once into column panels of ``PANEL_COLUMNS = 8 * VECTORS_PER_TILE``
  output channels (layout in :class:`PackedWeightsS8`). One 32-byte load then holds 4 consecutive K values
  for 8 output channels, the exact operand layout of ``vpmaddubsw`` and ``vpdpbusd``; one broadcast of 4
  bytes of a row of A feeds every lane.
* **Register tiles.** AVX2: 4 rows of A times 2 weight vectors, 8 int32x8 accumulators (4 x 16 outputs)
  that stay in registers during a K block. AVX-VNNI: 6 rows x 2 vectors. Rows left over at the bottom of
  A use a one-row tile.
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

Availability. The x86 intrinsics compile only when LLVM targets a CPU that has them; for any other
target LLVM aborts the whole process, which no ``try`` can catch. So the CPU features Numba compiles for
are checked *before* anything is compiled. :func:`available` then compiles and checks one small product.
``gemm_s8s8s32_into`` is bound at import to :func:`gemm_s8s8s32_vnni_into` when the target has AVX-VNNI,
else to :func:`gemm_s8s8s32_avx2_into` (:data:`KERNEL_S8` says which). Environment switches, read at
import: ``NANOOPT_DISABLE_AVX2=1`` makes :func:`available` False (to exercise the portable fallback);
``NANOOPT_DISABLE_AVX_VNNI=1`` keeps the plain AVX2 kernel; ``NANOOPT_CPU_FEATURES`` lists the features the
kernels may use, as if the CPU had no others (``avx2``: the AVX2 kernel, never VNNI; ``none``: the portable
kernels; see :func:`allowed_features`). A feature the CPU lacks is never used, whatever the variable says;
a kernel needing a feature that is not usable is never compiled. Callers of the jitted ``*_into`` functions
must check :func:`available` first.

Every kernel is module-level code with ``cache=True``: the first call compiles (a few seconds), later
processes load the machine code from Numba's cache.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, overload, register_model

__all__ = [
    "CPU_FEATURES",
    "FEATURES_ENV",
    "KERNEL_S8",
    "MAX_K_S8",
    "PackedWeightsS8",
    "PackedWeightsS16",
    "available",
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

LANES = 8  # int32 lanes in one 256-bit register
VECTORS_PER_TILE = 2  # weight vectors per register tile (NR)
PANEL_COLUMNS = LANES * VECTORS_PER_TILE  # output channels per packed panel (NC = 16)
S8_GROUP = 4  # K values per int8 vector step (4 bytes per int32 lane)
S16_GROUP = 2  # K values per int16 vector step (2 int16 per int32 lane)
S8_STEP = 32 * VECTORS_PER_TILE  # int8 elements of one panel step (two 32-byte vectors)
S16_STEP = 16 * VECTORS_PER_TILE  # int16 elements of one panel step
AVX2_ROWS = 4  # rows of A per register tile, AVX2 kernels (8 accumulators)
VNNI_ROWS = 6  # rows of A per register tile, AVX-VNNI kernel (12 accumulators)
S8_BLOCK_K = 4096  # K values per cache block of the int8 kernels (64 KiB of one panel: L2; measured best)
S16_BLOCK_K = 510  # K values per int32 partial sum of the int16 kernel: 510 * 32768 * 128 < 2**31
ROW_BLOCK = 252  # rows of A per cache block (a multiple of 4 and 6; 252 x 4096 bytes fit L2)
MAX_K_S8 = (2**31 - 1) // (128 * 127)  # 132104: longest K whose int8 x narrow-int8 sum fits int32

DISABLE_ENV = "NANOOPT_DISABLE_AVX2"  # set to 1: available() returns False
DISABLE_VNNI_ENV = "NANOOPT_DISABLE_AVX_VNNI"  # set to 1: gemm_s8s8s32_into is the plain AVX2 kernel
FEATURES_ENV = "NANOOPT_CPU_FEATURES"  # e.g. "avx2" or "none": the CPU features the kernels may use (unset: all)
CPU_FEATURES = ("avx2", "avxvnni", "avx512vnni", "avx512vl", "avx512f", "avx512bw")  # the x86 features the
# kernels can use (the last two, with avx512vnni, by the 512-bit kernels of nanoopt.kernels.avx512)

# ---------------------------------------------------------------------------------------------------------
# A 256-bit register as a Numba type.

_I8X32 = ir.VectorType(ir.IntType(8), 32)
_I16X16 = ir.VectorType(ir.IntType(16), 16)
_I32X8 = ir.VectorType(ir.IntType(32), 8)
_I64X8 = ir.VectorType(ir.IntType(64), 8)


class Int32x8Type(types.Type):
    """Numba type of one AVX2 register, viewed as eight int32 lanes (``<8 x i32>`` in LLVM)."""

    def __init__(self) -> None:
        super().__init__(name="int32x8")


int32x8 = Int32x8Type()


@register_model(Int32x8Type)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _I32X8)


def _is_c_array(array_type, dtype) -> bool:
    return isinstance(array_type, types.Array) and array_type.dtype == dtype and array_type.layout == "C"


def _element_pointer(context, builder, array_type, array_value, offset_type, offset_value):
    """Pointer to element ``offset`` (in elements, counted in C order) of a C-contiguous array."""
    array = context.make_array(array_type)(context, builder, array_value)
    offset = context.cast(builder, offset_value, offset_type, types.intp)
    return builder.gep(array.data, [offset])


def _declare(builder, name: str, return_type, argument_types):
    function_type = ir.FunctionType(return_type, argument_types)
    return cgutils.get_or_insert_function(builder.module, function_type, name)


# ---------------------------------------------------------------------------------------------------------
# Intrinsics: each emits a few LLVM instructions inline. Offsets count elements of the array's dtype.


@intrinsic
def _zero(typingctx):
    """An int32x8 of zeros."""

    def codegen(context, builder, signature, args):
        return ir.Constant(_I32X8, [0] * LANES)

    return int32x8(), codegen


@intrinsic
def _load(typingctx, array, offset):
    """The 32 bytes starting at element ``offset`` of an int8/int16/int32 C array (unaligned load)."""
    if not (isinstance(offset, types.Integer) and isinstance(array, types.Array) and array.layout == "C"):
        return None
    if array.dtype not in (types.int8, types.int16, types.int32):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.load(builder.bitcast(pointer, _I32X8.as_pointer()), align=1)

    return int32x8(array, offset), codegen


@intrinsic
def _broadcast4(typingctx, array, offset):
    """The 4 bytes at element ``offset`` of an int8/int16 C array, repeated in all 8 lanes (vpbroadcastd)."""
    if not (isinstance(offset, types.Integer) and isinstance(array, types.Array) and array.layout == "C"):
        return None
    if array.dtype not in (types.int8, types.int16):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        word = builder.load(builder.bitcast(pointer, ir.IntType(32).as_pointer()), align=1)
        vector = builder.insert_element(ir.Constant(_I32X8, ir.Undefined), word, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(vector, ir.Constant(_I32X8, ir.Undefined), ir.Constant(_I32X8, [0] * LANES))

    return int32x8(array, offset), codegen


@intrinsic
def _madd_s8(typingctx, accumulator, a_bytes, a_abs, w_bytes):
    """``accumulator + sum_t a[t] * w[j, t]`` per int32 lane j, over its 4 bytes t, via the sign trick.

    ``vpsignb(w, a)`` gives ``sign(a) * w`` (exact for |w| <= 127), ``vpmaddubsw(|a|, sign(a) * w)`` the
    exact s16 pair sums (<= 32512), ``vpmaddwd(., 1)`` the s32 sum of the two pairs.
    """
    if not (accumulator == int32x8 and a_bytes == int32x8 and a_abs == int32x8 and w_bytes == int32x8):
        return None

    def codegen(context, builder, signature, args):
        accumulator, a_bytes, a_abs, w_bytes = args
        sign = _declare(builder, "llvm.x86.avx2.psign.b", _I8X32, [_I8X32, _I8X32])
        madd_bytes = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16X16, [_I8X32, _I8X32])
        madd_words = _declare(builder, "llvm.x86.avx2.pmadd.wd", _I32X8, [_I16X16, _I16X16])
        signed_w = builder.call(sign, [builder.bitcast(w_bytes, _I8X32), builder.bitcast(a_bytes, _I8X32)])
        pairs = builder.call(madd_bytes, [builder.bitcast(a_abs, _I8X32), signed_w])
        quads = builder.call(madd_words, [pairs, ir.Constant(_I16X16, [1] * 16)])
        return builder.add(accumulator, quads)

    return int32x8(accumulator, a_bytes, a_abs, w_bytes), codegen


@intrinsic
def _dot_u8s8(typingctx, accumulator, a_unsigned, w_bytes):
    """``accumulator + sum_t a[t] * w[j, t]`` per lane j, ``a`` bytes read as u8, ``w`` as s8 (vpdpbusd).

    No saturation: the 4 products and the accumulator are summed modulo 2**32. Needs AVX-VNNI.
    """
    if not (accumulator == int32x8 and a_unsigned == int32x8 and w_bytes == int32x8):
        return None

    def codegen(context, builder, signature, args):
        accumulator, a_unsigned, w_bytes = args
        dot = _declare(builder, "llvm.x86.avx512.vpdpbusd.256", _I32X8, [_I32X8, _I8X32, _I8X32])
        return builder.call(dot, [accumulator, builder.bitcast(a_unsigned, _I8X32), builder.bitcast(w_bytes, _I8X32)])

    return int32x8(accumulator, a_unsigned, w_bytes), codegen


@intrinsic
def _madd_s16(typingctx, accumulator, a_words, w_words):
    """``accumulator + a[2j] * w[2j] + a[2j+1] * w[2j+1]`` per int32 lane j (vpmaddwd, s16 x s16)."""
    if not (accumulator == int32x8 and a_words == int32x8 and w_words == int32x8):
        return None

    def codegen(context, builder, signature, args):
        accumulator, a_words, w_words = args
        madd_words = _declare(builder, "llvm.x86.avx2.pmadd.wd", _I32X8, [_I16X16, _I16X16])
        pairs = builder.call(madd_words, [builder.bitcast(a_words, _I16X16), builder.bitcast(w_words, _I16X16)])
        return builder.add(accumulator, pairs)

    return int32x8(accumulator, a_words, w_words), codegen


@intrinsic
def _add(typingctx, x, y):
    """Lane-wise int32 sum, modulo 2**32."""
    if not (x == int32x8 and y == int32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return int32x8(x, y), codegen


@intrinsic
def _times_minus_128(typingctx, x):
    """Lane-wise ``-128 * x``, modulo 2**32."""
    if x != int32x8:
        return None

    def codegen(context, builder, signature, args):
        return builder.mul(args[0], ir.Constant(_I32X8, [-128] * LANES))

    return int32x8(x), codegen


@intrinsic
def _store_i32(typingctx, array, offset, vector):
    """Write the 8 lanes to elements ``offset .. offset + 7`` of an int32 C array."""
    if not (_is_c_array(array, types.int32) and isinstance(offset, types.Integer) and vector == int32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        builder.store(args[2], builder.bitcast(pointer, _I32X8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(array, offset, vector), codegen


@intrinsic
def _add_widened_i64(typingctx, array, offset, vector, accumulate):
    """Sign-extend the 8 lanes to int64 and write (or add, if ``accumulate``) them to an int64 C array."""
    if not (_is_c_array(array, types.int64) and isinstance(offset, types.Integer) and vector == int32x8):
        return None
    if not isinstance(accumulate, types.Boolean):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        pointer = builder.bitcast(pointer, _I64X8.as_pointer())
        wide = builder.sext(args[2], _I64X8)
        old = builder.load(pointer, align=1)
        flag = context.cast(builder, args[3], signature.args[3], types.boolean)
        kept = builder.select(flag, old, ir.Constant(_I64X8, [0] * LANES))
        builder.store(builder.add(wide, kept), pointer, align=1)
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
# Register tiles: the innermost loops. Each returns its int32x8 accumulators for one K block, row-major:
# (row 0 channels 0-7, row 0 channels 8-15, row 1 channels 0-7, ...). Row r of A starts at flat element
# ``a_offset + r * a_stride``; the panel block at ``w_offset``.


@numba.njit(cache=True)
def _tile_avx2_4x2(a, a_abs, a_offset, a_stride, panels, w_offset, groups):
    """4 rows x 16 channels with the sign trick; ``a_abs`` is ``|a|`` laid out like ``a``.

    Each step consumes 4 K values: two 32-byte weight vectors and two 4-byte broadcasts per row.
    """
    c00 = _zero()
    c01 = _zero()
    c10 = _zero()
    c11 = _zero()
    c20 = _zero()
    c21 = _zero()
    c30 = _zero()
    c31 = _zero()
    row1 = a_offset + a_stride
    row2 = a_offset + 2 * a_stride
    row3 = a_offset + 3 * a_stride
    for step in range(groups):
        w0 = _load(panels, w_offset + step * S8_STEP)
        w1 = _load(panels, w_offset + step * S8_STEP + 32)
        k = step * S8_GROUP
        x = _broadcast4(a, a_offset + k)
        x_abs = _broadcast4(a_abs, a_offset + k)
        c00 = _madd_s8(c00, x, x_abs, w0)
        c01 = _madd_s8(c01, x, x_abs, w1)
        x = _broadcast4(a, row1 + k)
        x_abs = _broadcast4(a_abs, row1 + k)
        c10 = _madd_s8(c10, x, x_abs, w0)
        c11 = _madd_s8(c11, x, x_abs, w1)
        x = _broadcast4(a, row2 + k)
        x_abs = _broadcast4(a_abs, row2 + k)
        c20 = _madd_s8(c20, x, x_abs, w0)
        c21 = _madd_s8(c21, x, x_abs, w1)
        x = _broadcast4(a, row3 + k)
        x_abs = _broadcast4(a_abs, row3 + k)
        c30 = _madd_s8(c30, x, x_abs, w0)
        c31 = _madd_s8(c31, x, x_abs, w1)
    return c00, c01, c10, c11, c20, c21, c30, c31


@numba.njit(cache=True)
def _tile_avx2_1x2(a, a_abs, a_offset, panels, w_offset, groups):
    """One row x 16 channels with the sign trick."""
    c0 = _zero()
    c1 = _zero()
    for step in range(groups):
        k = step * S8_GROUP
        x = _broadcast4(a, a_offset + k)
        x_abs = _broadcast4(a_abs, a_offset + k)
        c0 = _madd_s8(c0, x, x_abs, _load(panels, w_offset + step * S8_STEP))
        c1 = _madd_s8(c1, x, x_abs, _load(panels, w_offset + step * S8_STEP + 32))
    return c0, c1


@numba.njit(cache=True)
def _tile_vnni_6x2(a_offset_binary, a_offset, a_stride, panels, w_offset, groups, start0, start1):
    """6 rows x 16 channels of ``sum (a + 128) w`` with vpdpbusd, accumulators starting at ``start0/1``."""
    a = a_offset_binary
    c00 = start0
    c01 = start1
    c10 = start0
    c11 = start1
    c20 = start0
    c21 = start1
    c30 = start0
    c31 = start1
    c40 = start0
    c41 = start1
    c50 = start0
    c51 = start1
    row1 = a_offset + a_stride
    row2 = a_offset + 2 * a_stride
    row3 = a_offset + 3 * a_stride
    row4 = a_offset + 4 * a_stride
    row5 = a_offset + 5 * a_stride
    for step in range(groups):
        w0 = _load(panels, w_offset + step * S8_STEP)
        w1 = _load(panels, w_offset + step * S8_STEP + 32)
        k = step * S8_GROUP
        x = _broadcast4(a, a_offset + k)
        c00 = _dot_u8s8(c00, x, w0)
        c01 = _dot_u8s8(c01, x, w1)
        x = _broadcast4(a, row1 + k)
        c10 = _dot_u8s8(c10, x, w0)
        c11 = _dot_u8s8(c11, x, w1)
        x = _broadcast4(a, row2 + k)
        c20 = _dot_u8s8(c20, x, w0)
        c21 = _dot_u8s8(c21, x, w1)
        x = _broadcast4(a, row3 + k)
        c30 = _dot_u8s8(c30, x, w0)
        c31 = _dot_u8s8(c31, x, w1)
        x = _broadcast4(a, row4 + k)
        c40 = _dot_u8s8(c40, x, w0)
        c41 = _dot_u8s8(c41, x, w1)
        x = _broadcast4(a, row5 + k)
        c50 = _dot_u8s8(c50, x, w0)
        c51 = _dot_u8s8(c51, x, w1)
    return c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51


@numba.njit(cache=True)
def _tile_vnni_4x2(a_offset_binary, a_offset, a_stride, panels, w_offset, groups, start0, start1):
    """4 rows x 16 channels of ``sum (a + 128) w`` with vpdpbusd (rows left over by the 6-row tiles)."""
    a = a_offset_binary
    c00 = start0
    c01 = start1
    c10 = start0
    c11 = start1
    c20 = start0
    c21 = start1
    c30 = start0
    c31 = start1
    row1 = a_offset + a_stride
    row2 = a_offset + 2 * a_stride
    row3 = a_offset + 3 * a_stride
    for step in range(groups):
        w0 = _load(panels, w_offset + step * S8_STEP)
        w1 = _load(panels, w_offset + step * S8_STEP + 32)
        k = step * S8_GROUP
        x = _broadcast4(a, a_offset + k)
        c00 = _dot_u8s8(c00, x, w0)
        c01 = _dot_u8s8(c01, x, w1)
        x = _broadcast4(a, row1 + k)
        c10 = _dot_u8s8(c10, x, w0)
        c11 = _dot_u8s8(c11, x, w1)
        x = _broadcast4(a, row2 + k)
        c20 = _dot_u8s8(c20, x, w0)
        c21 = _dot_u8s8(c21, x, w1)
        x = _broadcast4(a, row3 + k)
        c30 = _dot_u8s8(c30, x, w0)
        c31 = _dot_u8s8(c31, x, w1)
    return c00, c01, c10, c11, c20, c21, c30, c31


@numba.njit(cache=True)
def _tile_vnni_2x2(a_offset_binary, a_offset, a_stride, panels, w_offset, groups, start0, start1):
    """2 rows x 16 channels of ``sum (a + 128) w`` with vpdpbusd."""
    a = a_offset_binary
    c00 = start0
    c01 = start1
    c10 = start0
    c11 = start1
    row1 = a_offset + a_stride
    for step in range(groups):
        w0 = _load(panels, w_offset + step * S8_STEP)
        w1 = _load(panels, w_offset + step * S8_STEP + 32)
        k = step * S8_GROUP
        x = _broadcast4(a, a_offset + k)
        c00 = _dot_u8s8(c00, x, w0)
        c01 = _dot_u8s8(c01, x, w1)
        x = _broadcast4(a, row1 + k)
        c10 = _dot_u8s8(c10, x, w0)
        c11 = _dot_u8s8(c11, x, w1)
    return c00, c01, c10, c11


@numba.njit(cache=True)
def _tile_vnni_1x2(a_offset_binary, a_offset, panels, w_offset, groups, start0, start1):
    """One row x 16 channels of ``sum (a + 128) w`` with vpdpbusd."""
    c0 = start0
    c1 = start1
    for step in range(groups):
        x = _broadcast4(a_offset_binary, a_offset + step * S8_GROUP)
        c0 = _dot_u8s8(c0, x, _load(panels, w_offset + step * S8_STEP))
        c1 = _dot_u8s8(c1, x, _load(panels, w_offset + step * S8_STEP + 32))
    return c0, c1


@numba.njit(cache=True)
def _tile_s16_4x2(a, a_offset, a_stride, panels, w_offset, pairs):
    """4 int16 rows x 16 channels from int16 panels: 2 K values per step, one vpmaddwd each."""
    c00 = _zero()
    c01 = _zero()
    c10 = _zero()
    c11 = _zero()
    c20 = _zero()
    c21 = _zero()
    c30 = _zero()
    c31 = _zero()
    row1 = a_offset + a_stride
    row2 = a_offset + 2 * a_stride
    row3 = a_offset + 3 * a_stride
    for step in range(pairs):
        w0 = _load(panels, w_offset + step * S16_STEP)
        w1 = _load(panels, w_offset + step * S16_STEP + 16)
        k = step * S16_GROUP
        x = _broadcast4(a, a_offset + k)
        c00 = _madd_s16(c00, x, w0)
        c01 = _madd_s16(c01, x, w1)
        x = _broadcast4(a, row1 + k)
        c10 = _madd_s16(c10, x, w0)
        c11 = _madd_s16(c11, x, w1)
        x = _broadcast4(a, row2 + k)
        c20 = _madd_s16(c20, x, w0)
        c21 = _madd_s16(c21, x, w1)
        x = _broadcast4(a, row3 + k)
        c30 = _madd_s16(c30, x, w0)
        c31 = _madd_s16(c31, x, w1)
    return c00, c01, c10, c11, c20, c21, c30, c31


@numba.njit(cache=True)
def _tile_s16_1x2(a, a_offset, panels, w_offset, pairs):
    """One int16 row x 16 channels from int16 panels."""
    c0 = _zero()
    c1 = _zero()
    for step in range(pairs):
        x = _broadcast4(a, a_offset + step * S16_GROUP)
        c0 = _madd_s16(c0, x, _load(panels, w_offset + step * S16_STEP))
        c1 = _madd_s16(c1, x, _load(panels, w_offset + step * S16_STEP + 16))
    return c0, c1


# ---------------------------------------------------------------------------------------------------------
# Writing tiles to the output: whole vectors where 8 columns remain, lane by lane at the right edge.


@numba.njit(cache=True)
def _write_s32(out, row, col, n, vector, accumulate):
    """``out[row, col:col+8] (+)= vector``, clipped at column ``n`` (``out`` is int32, C order, n columns)."""
    if col + LANES <= n:
        offset = row * n + col
        if accumulate:
            vector = _add(vector, _load(out, offset))
        _store_i32(out, offset, vector)
    else:
        for lane in range(max(n - col, 0)):
            value = _lane(vector, lane)
            if accumulate:
                out[row, col + lane] += value  # int32 wrap-around, as the vector path
            else:
                out[row, col + lane] = value


@numba.njit(cache=True)
def _write_s64(out, row, col, n, vector, accumulate):
    """``out[row, col:col+8] (+)= int64(vector)``, clipped at column ``n`` (``out`` is int64, C order)."""
    if col + LANES <= n:
        _add_widened_i64(out, row * n + col, vector, accumulate)
    else:
        for lane in range(max(n - col, 0)):
            value = np.int64(_lane(vector, lane))
            if accumulate:
                out[row, col + lane] += value
            else:
                out[row, col + lane] = value


@numba.njit(cache=True)
def _write_tile_s32(out, row, col, n, tile, accumulate):
    """Write a tile of ``len(tile) // 2`` rows x 16 channels at ``out[row:, col:]`` (int32)."""
    for r in range(len(tile) // VECTORS_PER_TILE):
        _write_s32(out, row + r, col, n, tile[2 * r], accumulate)
        _write_s32(out, row + r, col + LANES, n, tile[2 * r + 1], accumulate)


@numba.njit(cache=True)
def _write_tile_s64(out, row, col, n, tile, accumulate):
    """Write a tile of ``len(tile) // 2`` rows x 16 channels at ``out[row:, col:]`` (int64)."""
    for r in range(len(tile) // VECTORS_PER_TILE):
        _write_s64(out, row + r, col, n, tile[2 * r], accumulate)
        _write_s64(out, row + r, col + LANES, n, tile[2 * r + 1], accumulate)


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
        if not (_is_c_array(given, wanted) and given.ndim == ndim):
            raise TypingError(
                f"AVX2 GEMM kernel: {label} must be a C-contiguous {ndim}-d {wanted} array, got {given}"
            )
    return lambda a, a_dtype, panels, panel_dtype, out, out_dtype: None


@numba.njit(cache=True)
def _check_s8_arguments(a, panels, n, k, out):
    """Raise ValueError unless the shapes fit ``out (M, n) = a (M, k) @ W.T`` with W packed in ``panels``."""
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
    """``out[:, :] = a @ W.T`` exactly with the AVX2 sign trick, for Numba code that fuses work after it.

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
    _check_s8_arguments(a, panels, n, k, out)
    m = a.shape[0]
    groups = (k + S8_GROUP - 1) // S8_GROUP
    if groups == 0:
        _fill_zero(out)
        return
    padded_k = groups * S8_GROUP
    a_padded = _pad_columns(a, padded_k)  # (M, K rounded up to 4)
    a_abs = np.abs(a_padded)  # (M, K padded); |-128| wraps to -128, the byte 0x80 = 128 read unsigned
    panel_size = (groups + 1) * S8_STEP  # int8 elements per panel, the row-sum footer included
    block_groups = S8_BLOCK_K // S8_GROUP
    for g0 in range(0, groups, block_groups):
        steps = min(block_groups, groups - g0)
        accumulate = g0 > 0
        for i0 in range(0, m, ROW_BLOCK):
            i1 = min(m, i0 + ROW_BLOCK)
            for p in range(panels.shape[0]):
                col = p * PANEL_COLUMNS
                w_offset = p * panel_size + g0 * S8_STEP
                i = i0
                while i + AVX2_ROWS <= i1:
                    a_offset = i * padded_k + g0 * S8_GROUP
                    tile = _tile_avx2_4x2(a_padded, a_abs, a_offset, padded_k, panels, w_offset, steps)
                    _write_tile_s32(out, i, col, n, tile, accumulate)
                    i += AVX2_ROWS
                while i < i1:
                    tile = _tile_avx2_1x2(a_padded, a_abs, i * padded_k + g0 * S8_GROUP, panels, w_offset, steps)
                    _write_tile_s32(out, i, col, n, tile, accumulate)
                    i += 1


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
    _check_s8_arguments(a, panels, n, k, out)
    m = a.shape[0]
    groups = (k + S8_GROUP - 1) // S8_GROUP
    if groups == 0:
        _fill_zero(out)
        return
    padded_k = groups * S8_GROUP
    a_unsigned = _offset_binary(a, padded_k)  # (M, K padded), a + 128
    panel_size = (groups + 1) * S8_STEP
    block_groups = S8_BLOCK_K // S8_GROUP
    for g0 in range(0, groups, block_groups):
        steps = min(block_groups, groups - g0)
        accumulate = g0 > 0
        for i0 in range(0, m, ROW_BLOCK):
            i1 = min(m, i0 + ROW_BLOCK)
            for p in range(panels.shape[0]):
                col = p * PANEL_COLUMNS
                w_offset = p * panel_size + g0 * S8_STEP
                if accumulate:
                    start0 = _zero()
                    start1 = _zero()
                else:  # the first K block starts at -128 * sum_k W[n, k], read from the panel's footer
                    footer = p * panel_size + groups * S8_STEP
                    start0 = _times_minus_128(_load(panels, footer))
                    start1 = _times_minus_128(_load(panels, footer + 32))
                i = i0
                while i + VNNI_ROWS <= i1:
                    a_offset = i * padded_k + g0 * S8_GROUP
                    tile = _tile_vnni_6x2(a_unsigned, a_offset, padded_k, panels, w_offset, steps, start0, start1)
                    _write_tile_s32(out, i, col, n, tile, accumulate)
                    i += VNNI_ROWS
                a_offset = i * padded_k + g0 * S8_GROUP
                if i + 4 <= i1:  # the 0-5 rows left: 4 + 1, 4, 2 + 1, 2, 1
                    tile4 = _tile_vnni_4x2(a_unsigned, a_offset, padded_k, panels, w_offset, steps, start0, start1)
                    _write_tile_s32(out, i, col, n, tile4, accumulate)
                    i += 4
                    a_offset += 4 * padded_k
                if i + 2 <= i1:
                    tile2 = _tile_vnni_2x2(a_unsigned, a_offset, padded_k, panels, w_offset, steps, start0, start1)
                    _write_tile_s32(out, i, col, n, tile2, accumulate)
                    i += 2
                    a_offset += 2 * padded_k
                if i < i1:
                    tile1 = _tile_vnni_1x2(a_unsigned, a_offset, panels, w_offset, steps, start0, start1)
                    _write_tile_s32(out, i, col, n, tile1, accumulate)


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
    padded_k = pairs * S16_GROUP
    a_padded = _pad_columns(a, padded_k)  # (M, K rounded up to 2)
    block_pairs = S16_BLOCK_K // S16_GROUP
    for g0 in range(0, pairs, block_pairs):
        steps = min(block_pairs, pairs - g0)
        accumulate = g0 > 0
        for i0 in range(0, m, ROW_BLOCK):
            i1 = min(m, i0 + ROW_BLOCK)
            for p in range(n_panels):
                col = p * PANEL_COLUMNS
                w_offset = (p * pairs + g0) * S16_STEP
                i = i0
                while i + AVX2_ROWS <= i1:
                    tile = _tile_s16_4x2(a_padded, i * padded_k + g0 * S16_GROUP, padded_k, panels, w_offset, steps)
                    _write_tile_s64(out, i, col, n, tile, accumulate)
                    i += AVX2_ROWS
                while i < i1:
                    tile = _tile_s16_1x2(a_padded, i * padded_k + g0 * S16_GROUP, panels, w_offset, steps)
                    _write_tile_s64(out, i, col, n, tile, accumulate)
                    i += 1


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
    specification): the sign trick ``a * w = |a| * (sign(a) * w)`` needs ``-w`` to be an int8.

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
            "pack_weights_s8 expects narrow-range int8 weights in [-127, 127] (the AVX2 sign trick negates "
            f"them), got w[{row}, {col}] = {int(w[row, col])}"
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


def _switched_on(variable: str) -> bool:
    """True if the environment variable is set to anything but ``""`` or ``"0"``."""
    return os.environ.get(variable, "").strip() not in ("", "0")


def allowed_features(value: str | None = None) -> frozenset[str] | None:
    """The CPU features that ``NANOOPT_CPU_FEATURES`` (or ``value``) lets the kernels use; ``None``: no limit.

    The variable is a comma-separated list of names from :data:`CPU_FEATURES` (LLVM's spelling, any case), or
    ``none`` for none of them (the portable kernels); unset or empty means every feature the CPU and Numba's
    target have. It can only take features away: a feature it names that the CPU lacks is still not used.
    Anything else is a ``ValueError`` naming the variable, the word it did not know and the names it takes.

    >>> sorted(allowed_features("avx2, AVX512VNNI"))
    ['avx2', 'avx512vnni']
    >>> allowed_features("none"), allowed_features("") is None
    (frozenset(), True)
    """
    value = os.environ.get(FEATURES_ENV, "") if value is None else value
    if not value.strip():
        return None
    names = [name.strip().lower() for name in value.split(",")]
    if names == ["none"]:
        return frozenset()
    for name in names:
        if name not in CPU_FEATURES:
            raise ValueError(f"{FEATURES_ENV} must be a comma-separated list of {', '.join(CPU_FEATURES)} (or "
                             f"'none'), got {value!r} (unknown: {name!r})")
    return frozenset(names)


def select_features(host: dict[str, bool], target: str, allowed: frozenset[str] | None) -> frozenset[str]:
    """The features of :data:`CPU_FEATURES` the kernels may use: those the CPU executes (``host``, as
    ``llvmlite.binding.get_host_cpu_features()``), LLVM compiles for (``target``, Numba's feature string
    ``"+avx2,-avx512f,..."``; empty for the generic target) and ``allowed`` permits (:func:`allowed_features`).

    >>> sorted(select_features({"avx2": True, "avxvnni": True}, "+avx2,+avxvnni,-avx512vnni", None))
    ['avx2', 'avxvnni']
    >>> sorted(select_features({"avx2": True, "avxvnni": False}, "+avx2,+avxvnni", frozenset({"avx2", "avxvnni"})))
    ['avx2']
    """
    enabled = {item[1:] for item in target.split(",") if item.startswith("+")}
    return frozenset(feature for feature in CPU_FEATURES if host.get(feature, False) and feature in enabled
                     and (allowed is None or feature in allowed))


def kernel_s8_for(features: frozenset[str]) -> str:
    """The int8 GEMM that runs with these usable features: ``"avx-vnni"`` (256-bit ``vpdpbusd``: AVX-VNNI, or
    AVX512-VNNI with AVX512-VL, and AVX2), ``"avx2"``, or ``"portable"`` (the Numba kernels, no intrinsics).

    >>> kernel_s8_for(frozenset({"avx2", "avx512vnni"})), kernel_s8_for(frozenset({"avxvnni"}))
    ('avx2', 'portable')
    """
    if "avx2" not in features:
        return "portable"
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        return "avx-vnni"
    return "avx2"


def usable_features() -> frozenset[str]:
    """:func:`select_features` for this process, checked without compiling anything.

    Numba's JIT target is the host CPU unless ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` say otherwise
    (``generic`` means no features); ``NUMBA_ENABLE_AVX=0`` removes the AVX features from the host's list;
    ``NANOOPT_CPU_FEATURES`` narrows the result (a malformed value raises ``ValueError``). Off x86-64, or if
    llvmlite cannot say, the answer is no feature.

    >>> usable_features() <= set(CPU_FEATURES)
    True
    """
    allowed = allowed_features()  # outside the try: a malformed variable is an error, not "no features"
    try:
        import llvmlite.binding
        from numba.core import codegen, config

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return frozenset()
        host = dict(llvmlite.binding.get_host_cpu_features())
        if str(config.CPU_NAME).lower() == "generic":
            target = ""
        else:
            target = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
        return select_features(host, target, allowed)
    except Exception:  # an unusual llvmlite/Numba: no AVX2 kernels rather than a crash
        return frozenset()


def target_has_avx2() -> bool:
    """True if this CPU executes AVX2, Numba compiles for a target with AVX2 and ``NANOOPT_CPU_FEATURES`` allows
    it (checked without compiling).

    The first half of :func:`available`; the second half compiles and tests the kernel.

    >>> isinstance(target_has_avx2(), bool)
    True
    """
    return "avx2" in usable_features()


def target_has_avx_vnni() -> bool:
    """True if AVX2 and 256-bit ``vpdpbusd`` are usable: AVX-VNNI, or AVX512-VNNI with AVX512-VL.

    >>> isinstance(target_has_avx_vnni(), bool)
    True
    """
    return kernel_s8_for(usable_features()) == "avx-vnni"


# The int8 kernel of the Python entry points, fixed at import: ``gemm_s8s8s32_into(a, panels, n, k, out)``
# overwrites the int32 (M, N) C-contiguous ``out`` with ``a @ W.T`` for int8 ``a`` (M, K) C-contiguous and
# ``panels = pack_weights_s8(W).panels``. Both kernels give the same, exact result; check available() first.
# Jitted code must call one of the two kernels by its own name, never this alias: Numba's cache does not
# record which function a global named at compile time, so a cached caller would keep the kernel of the
# process that compiled it (nanoopt.kernels.numba_cpu has one driver per kernel for that reason).
KERNEL_S8 = "avx-vnni" if target_has_avx_vnni() and not _switched_on(DISABLE_VNNI_ENV) else "avx2"
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
    """True if the AVX2 kernels can run here: the CPU and Numba's target have AVX2 and a test product is exact.

    False (never an exception) on other CPUs, under ``NUMBA_CPU_NAME=generic``, with ``NUMBA_ENABLE_AVX=0``,
    or when the environment variable ``NANOOPT_DISABLE_AVX2`` is set to anything but ``""`` or ``"0"``.
    The answer is computed once per process (``available.cache_clear()`` forgets it); the first True
    answer compiles the int8 kernel (a few seconds, or a cache load).

    >>> isinstance(available(), bool)
    True
    """
    if _switched_on(DISABLE_ENV):
        return False
    try:
        return target_has_avx2() and _self_test()
    except Exception:  # any failure to type or compile the kernels means: use the portable path
        return False


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
    Runs ``gemm_s8s8s32_into``: the AVX-VNNI kernel where the CPU has it, else the AVX2 one (:data:`KERNEL_S8`).

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
    gemm_s8s8s32_into(a, packed.panels, packed.n, packed.k, out)
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
