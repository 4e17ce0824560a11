"""int32 accumulators -> int8 codes eight lanes at a time in 32-bit lanes: the requantization of the AVX2 layers.

For each output channel ``n`` with offset ``o_n`` (``bias - x_zp * rowsum(W)``, Jacob et al. 2018 eq. 8), multiplier
``m0_n`` in [2^30, 2^31) and right shift ``s_n`` in [0, 30] (``M = m0 * 2^-31 * 2^-s``, eq. 6):

    ``code = clip(RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc + o_n, m0_n), s_n) + zp, low, high)``

exactly as :func:`nanoopt.kernels.requant.multiply_fast` computes it (gemmlowp's rounding; the high half of the
product is ``(p + 2^30) >>> 31``, its low 32 bits), for accumulators whose sum with the offset fits int32 (the
layer's "fast" epilogue: its accumulator bound is below 2^31). The Numba form of that function is typed in 64-bit
lanes (Numba widens every int32 operation), so LLVM runs its shifts and masks four lanes per register; here an
intrinsic writes the LLVM IR in ``<8 x i32>`` lanes: the one 32x32->64 product (two ``vpmuldq``), then 32-bit
shifts by lane (``vpsravd``, ``vpsllvd``), compares, clamps and a narrowing store of 8 bytes. The constants are
those of the AVX-512 kernel's fused epilogue (:func:`nanoopt.kernels.avx512.requant_s8`: int32 vectors padded to
whole panels). Nothing here names an x86 instruction (plain LLVM vector IR), so it compiles for any target; it is
fast where the target has AVX2.

The same arithmetic is available to jitted code on a register (:func:`requantize_lanes`, with
:func:`store_codes` for the eight bytes), for the register tiles that requantize their accumulators where they are
(:mod:`nanoopt.kernels.avx2_linear`).

The NumPy reference is :func:`requantize_rows_s8_reference` (the specification's
:func:`nanoopt.spec.multiply_by_quantized_multiplier`); the kernel equals it bit for bit (tested with hypothesis).

>>> products = np.array([[1000, -70000, 12345]], np.int32)
>>> offsets, m0, shift = np.zeros(8, np.int32), np.full(8, 1374389535, np.int32), np.full(8, 6, np.int32)
>>> out = np.empty((1, 3), np.int8)
>>> requantize_rows_s8(products, offsets, m0, shift, -3, -128, 127, out); out
array([[   7, -128,  120]], dtype=int8)
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanoopt.kernels.llvm_intrinsics import (
    I32X8,
    I64X8,
    LANES,
    element_pointer,
    int32x8,
    is_c_array,
    load_at,
    splat,
)
from nanoopt.kernels.requant import requantize_value
from nanoopt.spec import multiply_by_quantized_multiplier

__all__ = ["emit_requantize", "requantize_lanes", "requantize_row_s8", "requantize_rows_s8",
           "requantize_rows_s8_reference", "store_codes"]

_I8X8 = ir.VectorType(ir.IntType(8), LANES)


def _splat32(value: int) -> ir.Constant:
    return ir.Constant(I32X8, [value] * LANES)


def emit_requantize(builder, value, m0, shift, low, high, zero_point):
    """The eight codes (``<8 x i32>``, in [low, high]) of the ``<8 x i32>`` sums ``value`` (see the module
    docstring); ``low``/``high`` are the clamp bounds minus the zero point."""
    product = builder.mul(builder.sext(value, I64X8), builder.sext(m0, I64X8))  # exact, |p| < 2^62
    rounded = builder.add(product, ir.Constant(I64X8, [1 << 30] * LANES))
    top = builder.trunc(builder.lshr(rounded, ir.Constant(I64X8, [31] * LANES)), I32X8)  # the high half
    mask = builder.sub(builder.shl(_splat32(1), shift), _splat32(1))
    remainder = builder.and_(top, mask)
    threshold = builder.add(builder.ashr(mask, _splat32(1)), builder.lshr(top, _splat32(31)))  # + (top < 0)
    up = builder.zext(builder.icmp_signed(">", remainder, threshold), I32X8)
    scaled = builder.add(builder.ashr(top, shift), up)
    scaled = builder.select(builder.icmp_signed("<", scaled, low), low, scaled)
    scaled = builder.select(builder.icmp_signed(">", scaled, high), high, scaled)
    return builder.add(scaled, zero_point)


@intrinsic
def _requantize8(typingctx, values, offsets, m0, shift, index, zero_point, low, high, out):
    """``out[index : index + 8] = codes(values[index:] + offsets[index:])`` (int32 C arrays, int8 ``out``); the
    scalars are the zero point and the clamp bounds minus it (int32 range)."""
    if not (is_c_array(values, types.int32) and is_c_array(offsets, types.int32) and is_c_array(m0, types.int32)
            and is_c_array(shift, types.int32) and is_c_array(out, types.int8)):
        return None
    if not all(isinstance(value, types.Integer) for value in (index, zero_point, low, high)):
        return None

    def codegen(context, builder, signature, args):
        values_v, offsets_v, m0_v, shift_v, index_v, zp_v, low_v, high_v, out_v = args
        values_t, offsets_t, m0_t, shift_t, index_t, zp_t, low_t, high_t, out_t = signature.args
        where = context.cast(builder, index_v, index_t, types.intp)
        sums = builder.add(load_at(context, builder, values_t, values_v, where, I32X8),
                           load_at(context, builder, offsets_t, offsets_v, where, I32X8))
        scalars = [splat(builder, context.cast(builder, value, value_type, types.int32), I32X8)
                   for value, value_type in ((zp_v, zp_t), (low_v, low_t), (high_v, high_t))]
        codes = emit_requantize(builder, sums, load_at(context, builder, m0_t, m0_v, where, I32X8),
                                 load_at(context, builder, shift_t, shift_v, where, I32X8), scalars[1], scalars[2],
                                 scalars[0])  # fmt: skip
        pointer = element_pointer(context, builder, out_t, out_v, types.intp, where)
        builder.store(builder.trunc(codes, _I8X8), builder.bitcast(pointer, _I8X8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(values, offsets, m0, shift, index, zero_point, low, high, out), codegen


@intrinsic
def requantize_lanes(typingctx, sums, m0, shift, index, zero_point, below, above):
    """Jitted code only: the eight codes, as int32 lanes, of the int32x8 ``sums`` (offsets included) of channels
    ``index .. index + 7``, whose multipliers and shifts are ``m0[index:]`` and ``shift[index:]`` (int32 C arrays
    with at least ``index + 8`` entries); ``below``/``above`` are the clamp bounds minus ``zero_point``. For a
    register tile whose accumulators are requantized where they are (:mod:`nanoopt.kernels.avx2_linear`)."""
    if not (sums == int32x8 and is_c_array(m0, types.int32) and is_c_array(shift, types.int32)):
        return None
    if not all(isinstance(value, types.Integer) for value in (index, zero_point, below, above)):
        return None

    def codegen(context, builder, signature, args):
        sums_v, m0_v, shift_v, index_v = args[:4]
        where = context.cast(builder, index_v, signature.args[3], types.intp)
        zero, low, high = (splat(builder, context.cast(builder, value, value_type, types.int32), I32X8)
                           for value, value_type in zip(args[4:], signature.args[4:], strict=True))
        return emit_requantize(builder, sums_v, load_at(context, builder, signature.args[1], m0_v, where, I32X8),
                                load_at(context, builder, signature.args[2], shift_v, where, I32X8), low, high, zero)

    return int32x8(sums, m0, shift, index, zero_point, below, above), codegen


@intrinsic
def store_codes(typingctx, out, offset, codes):
    """Jitted code only: ``out[offset : offset + 8]`` (flat, an int8 C array) = the eight int32 lanes of ``codes``
    narrowed to bytes (codes of :func:`requantize_lanes`, which fit int8)."""
    if not (is_c_array(out, types.int8) and isinstance(offset, types.Integer) and codes == int32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        builder.store(builder.trunc(args[2], _I8X8), builder.bitcast(pointer, _I8X8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(out, offset, codes), codegen


@numba.njit(cache=True, inline="always")
def requantize_row_s8(values, offsets, m0, shift, zero_point, low, high, target):
    """One row: ``target[t] = clip(multiply(values[t] + offsets[t], m0[t], shift[t]) + zero_point, low, high)`` for
    the int32 ``values`` (N,) and the int32 constants (at least N); eight lanes at a time, the last ``N % 8`` by the
    scalar form of the same arithmetic."""
    n = values.shape[0]
    zero = np.int32(zero_point)
    below, above = np.int32(low) - zero, np.int32(high) - zero
    t = 0
    while t + LANES <= n:
        _requantize8(values, offsets, m0, shift, t, zero, below, above, target)
        t += LANES
    for u in range(t, n):
        target[u] = requantize_value(values[u] + offsets[u], m0[u], shift[u], zero_point, low, high, True)


@numba.njit(cache=True, nogil=True)
def requantize_rows_s8(products, offsets, m0, shift, zero_point, low, high, out):
    """:func:`requantize_row_s8` on every row of the C-contiguous int32 ``products`` (M, N) into int8 ``out`` (M, N).

    ``offsets``, ``m0``, ``shift``: int32, at least N entries (``avx512.requant_s8(...)[:3]``), ``m0`` in [2^30,
    2^31), ``shift`` in [0, 30]; every ``products + offsets`` must fit int32 (the layer's accumulator bound)."""
    if out.shape[0] != products.shape[0] or out.shape[1] != products.shape[1]:
        raise ValueError("requantize_rows_s8: out must have the shape of products")
    if offsets.shape[0] < products.shape[1] or m0.shape[0] < products.shape[1] or shift.shape[0] < products.shape[1]:
        raise ValueError("requantize_rows_s8: offsets, m0 and shift need an entry per column of products")
    for r in range(products.shape[0]):
        requantize_row_s8(products[r], offsets, m0, shift, zero_point, low, high, out[r])


def requantize_rows_s8_reference(products: np.ndarray, offsets: np.ndarray, m0: np.ndarray, shift: np.ndarray,
                                 zero_point: int, low: int, high: int) -> np.ndarray:  # fmt: skip
    """NumPy reference of :func:`requantize_rows_s8` (returns the int8 codes).

    >>> requantize_rows_s8_reference(np.array([[1000]], np.int32), np.zeros(1, np.int32), np.array([1374389535]),
    ...                              np.array([6]), -3, -128, 127)
    array([[7]], dtype=int8)
    """
    n = products.shape[1]
    sums = products.astype(np.int64) + offsets[:n].astype(np.int64)  # (M, N), fits int32 by the contract
    scaled = multiply_by_quantized_multiplier(sums.astype(np.int32), m0[:n].astype(np.int64),
                                              shift[:n].astype(np.int64))  # fmt: skip
    return np.clip(scaled.astype(np.int64) + zero_point, low, high).astype(np.int8)
