"""The activation operands of the AVX2 int8 register tiles, prepared 32 bytes at a time.

The tiles of :mod:`nanoopt.kernels.avx2` read the int8 activations ``A`` (M, K) in one of two prepared forms, each
made in one pass over ``A`` before the product:

* **7-bit codes** (:func:`seven_bit_codes`): ``A + 64`` as bytes, read unsigned by ``vpmaddubsw`` (in [0, 127] where
  every code of ``A`` lies in [-64, 63]), and whether they all do: a code outside wraps to a byte >= 128, so the
  OR of the shifted bytes of a row has its top bit set exactly when the row has a code outside.
* **The sign split** (:func:`sign_split`): the sign masks ``A >> 7`` (0 or -1 per byte), the magnitudes ``|A|``
  (``|-128|`` wraps to the byte 0x80, 128 read unsigned) and per row ``-sum_k min(A[i, k], 0)``, the start of the
  row's accumulators in the sign-mask trick.

Written with intrinsics on 32-byte vectors (``vpaddb``, ``vpor``, ``vpcmpgtb``, ``vpabsb``, ``vpsadbw``: an
explicit vector per step, where the plain Numba loops were typed in 64-bit integers and ran several times slower:
17 against about 3 us for the 7-bit codes of a 256 x 784 block, ``docs/kernels.md``). A row's last partial vector is
the 32 bytes ending at its end, overlapping the previous vector (the stores are the same values again; the row
correction adds the bytes not yet counted with scalar code). Rows shorter than 32 bytes use scalar code. The padding
columns ``[K, padded_k)`` are zero. The portable LLVM IR names no x86 instruction except ``vpsadbw``
(``llvm.x86.avx2.psad.bw``), so this module compiles only where AVX2 does (the callers check
:func:`nanoopt.kernels.avx2.available`).

The NumPy references (:func:`seven_bit_codes_reference`, :func:`sign_split_reference`) are the specification; the
kernels equal them bit for bit (``tests/kernels/test_avx2_operands.py``).

>>> seven_bit_codes_reference(np.array([[-64, 63, 0]], np.int8), 4)
(array([[  0, 127,  64,   0]], dtype=int8), True)
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanoopt.kernels.llvm_intrinsics import I8X32, I32X8, declare, element_pointer, int32x8, is_c_array, load_at

__all__ = ["VECTOR_BYTES", "fits_seven_bit", "seven_bit_codes", "seven_bit_codes_reference", "sign_split",
           "sign_split_reference"]

VECTOR_BYTES = 32  # int8 values per 256-bit register

_I64X4 = ir.VectorType(ir.IntType(64), 4)


def _store(context, builder, array_type, array, offset, value):
    pointer = element_pointer(context, builder, array_type, array, types.intp, offset)
    builder.store(value, builder.bitcast(pointer, I8X32.as_pointer()), align=1)


@intrinsic
def _shift_bytes(typingctx, a, source, shifted, target, spill):
    """``shifted[target : target + 32] = a[source : source + 32] + 64`` (flat offsets into int8 C arrays, bytes
    wrapping) and ``spill | those bytes`` (an int32x8 read as 32 bytes)."""
    if not (is_c_array(a, types.int8) and is_c_array(shifted, types.int8) and spill == int32x8):
        return None
    if not (isinstance(source, types.Integer) and isinstance(target, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        a_v, source_v, shifted_v, target_v, spill_v = args
        source_v = context.cast(builder, source_v, signature.args[1], types.intp)
        target_v = context.cast(builder, target_v, signature.args[3], types.intp)
        x = load_at(context, builder, signature.args[0], a_v, source_v, I8X32)
        moved = builder.add(x, ir.Constant(I8X32, [64] * VECTOR_BYTES))
        _store(context, builder, signature.args[2], shifted_v, target_v, moved)
        return builder.or_(spill_v, builder.bitcast(moved, I32X8))

    return int32x8(a, source, shifted, target, spill), codegen


@intrinsic
def _or_shifted(typingctx, a, source, spill):
    """``spill | (a[source : source + 32] + 64)`` (bytes wrapping; a flat offset into an int8 C array)."""
    if not (is_c_array(a, types.int8) and isinstance(source, types.Integer) and spill == int32x8):
        return None

    def codegen(context, builder, signature, args):
        source_v = context.cast(builder, args[1], signature.args[1], types.intp)
        x = load_at(context, builder, signature.args[0], args[0], source_v, I8X32)
        moved = builder.add(x, ir.Constant(I8X32, [64] * VECTOR_BYTES))
        return builder.or_(args[2], builder.bitcast(moved, I32X8))

    return int32x8(a, source, spill), codegen


@intrinsic
def _any_high_byte(typingctx, spill):
    """Whether any of the 32 bytes of ``spill`` is >= 128 read unsigned (``vpmovmskb`` != 0)."""
    if spill != int32x8:
        return None

    def codegen(context, builder, signature, args):
        negative = builder.icmp_signed("<", builder.bitcast(args[0], I8X32), ir.Constant(I8X32, [0] * VECTOR_BYTES))
        bits = builder.bitcast(negative, ir.IntType(VECTOR_BYTES))
        return builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(VECTOR_BYTES), 0))

    return types.boolean(spill), codegen


@intrinsic
def _split_bytes(typingctx, a, source, masks, magnitudes, target, total):
    """For the 32 bytes ``x = a[source : source + 32]``: ``masks[target:] = x >> 7``, ``magnitudes[target:] = |x|``
    (flat offsets into int8 C arrays), and ``total`` (four int64 lanes in an int32x8) plus the sums of ``-min(x,
    0)`` over groups of 8 bytes (``vpsadbw`` of ``|x| AND mask`` with zero)."""
    if not (is_c_array(a, types.int8) and is_c_array(masks, types.int8) and is_c_array(magnitudes, types.int8)):
        return None
    if not (isinstance(source, types.Integer) and isinstance(target, types.Integer) and total == int32x8):
        return None

    def codegen(context, builder, signature, args):
        a_v, source_v, masks_v, magnitudes_v, target_v, total_v = args
        source_v = context.cast(builder, source_v, signature.args[1], types.intp)
        target_v = context.cast(builder, target_v, signature.args[4], types.intp)
        x = load_at(context, builder, signature.args[0], a_v, source_v, I8X32)
        mask = builder.sext(builder.icmp_signed("<", x, ir.Constant(I8X32, [0] * VECTOR_BYTES)), I8X32)
        absolute = declare(builder, "llvm.abs.v32i8", I8X32, [I8X32, ir.IntType(1)])
        magnitude = builder.call(absolute, [x, ir.Constant(ir.IntType(1), 0)])  # |-128| = 0x80
        _store(context, builder, signature.args[2], masks_v, target_v, mask)
        _store(context, builder, signature.args[3], magnitudes_v, target_v, magnitude)
        sad = declare(builder, "llvm.x86.avx2.psad.bw", _I64X4, [I8X32, I8X32])
        sums = builder.call(sad, [builder.and_(magnitude, mask), ir.Constant(I8X32, [0] * VECTOR_BYTES)])
        return builder.bitcast(builder.add(builder.bitcast(total_v, _I64X4), sums), I32X8)

    return int32x8(a, source, masks, magnitudes, target, total), codegen


@intrinsic
def _total(typingctx, total):
    """The sum of the four int64 lanes of ``total`` (an int32x8 holding them)."""
    if total != int32x8:
        return None

    def codegen(context, builder, signature, args):
        lanes = builder.bitcast(args[0], _I64X4)
        result = builder.extract_element(lanes, ir.Constant(ir.IntType(32), 0))
        for lane in range(1, 4):
            result = builder.add(result, builder.extract_element(lanes, ir.Constant(ir.IntType(32), lane)))
        return result

    return types.int64(total), codegen


@intrinsic
def _zero(typingctx):
    """An int32x8 of zeros."""

    def codegen(context, builder, signature, args):
        return ir.Constant(I32X8, [0] * 8)

    return int32x8(), codegen


@numba.njit(cache=True)
def seven_bit_codes(a: np.ndarray, padded_k: int) -> tuple:
    """``(shifted, fits)``: ``a + 64`` as bytes (int8 (M, ``padded_k``), zero-padded) and whether every code of the int8
    C array ``a`` (M, K) lies in [-64, 63]. Stops after the first row with a code outside (``shifted`` is then
    incomplete and must not be used). Equals :func:`seven_bit_codes_reference` where ``fits``."""
    m, k = a.shape
    shifted = np.empty((m, padded_k), np.int8)  # (M, K padded)
    for i in range(m):
        source, target = i * k, i * padded_k
        if k >= VECTOR_BYTES:
            spill = _zero()
            for j in range(0, k - VECTOR_BYTES + 1, VECTOR_BYTES):
                spill = _shift_bytes(a, source + j, shifted, target + j, spill)
            if k % VECTOR_BYTES:  # the last 32 bytes of the row, overlapping
                spill = _shift_bytes(a, source + k - VECTOR_BYTES, shifted, target + k - VECTOR_BYTES, spill)
            high = _any_high_byte(spill)
        else:
            high = False
            for j in range(k):
                value = a[i, j] + 64
                shifted[i, j] = value
                high = high or value < 0 or value > 127
        for j in range(k, padded_k):
            shifted[i, j] = 0  # meets zero weights: any value would do
        if high:
            return shifted, False
    return shifted, True


@numba.njit(cache=True)
def fits_seven_bit(a: np.ndarray) -> bool:
    """Whether every code of the int8 C array ``a`` lies in [-64, 63]: one read-only pass (the OR of ``a + 64`` as
    bytes, 32 at a time), for a caller that chooses the 7-bit tile before the product. Equals the second item of
    :func:`seven_bit_codes_reference`."""
    flat = a.reshape(a.size)
    whole = a.size - a.size % VECTOR_BYTES
    spill = _zero()
    for j in range(0, whole, VECTOR_BYTES):
        spill = _or_shifted(flat, j, spill)
    high = _any_high_byte(spill)
    for j in range(whole, a.size):
        value = flat[j]
        high = high or value < -64 or value > 63
    return not high


@numba.njit(cache=True)
def sign_split(a: np.ndarray, padded_k: int) -> tuple:
    """``(masks, magnitudes, starts)`` of the int8 C array ``a`` (M, K): ``a >> 7`` and ``|a|`` as int8 (M,
    ``padded_k``), zero-padded, and ``starts[i] = -sum_k min(a[i, k], 0)`` (int32, at most ``128 K``). Equals
    :func:`sign_split_reference`."""
    m, k = a.shape
    masks = np.empty((m, padded_k), np.int8)  # (M, K padded)
    magnitudes = np.empty((m, padded_k), np.int8)  # (M, K padded)
    starts = np.empty(m, np.int32)  # (M,)
    whole = k - k % VECTOR_BYTES if k >= VECTOR_BYTES else 0  # bytes counted by whole vectors from a row's start
    for i in range(m):
        source, target = i * k, i * padded_k
        total = np.int64(0)
        if k >= VECTOR_BYTES:
            sums = _zero()
            for j in range(0, whole, VECTOR_BYTES):
                sums = _split_bytes(a, source + j, masks, magnitudes, target + j, sums)
            if whole < k:  # the last 32 bytes again for the stores; their new bytes counted below
                _split_bytes(a, source + k - VECTOR_BYTES, masks, magnitudes, target + k - VECTOR_BYTES, sums)
            total = _total(sums)
        else:
            for j in range(k):
                value = a[i, j]
                masks[i, j] = -1 if value < 0 else 0
                magnitudes[i, j] = -value if value < 0 else value
        for j in range(whole, k):
            value = np.int64(a[i, j])
            total += -value if value < 0 else 0
        for j in range(k, padded_k):
            masks[i, j] = 0
            magnitudes[i, j] = 0
        starts[i] = total
    return masks, magnitudes, starts


def seven_bit_codes_reference(a: np.ndarray, padded_k: int) -> tuple[np.ndarray, bool]:
    """NumPy reference of :func:`seven_bit_codes` (the whole ``shifted`` array, also when a code is outside).

    >>> seven_bit_codes_reference(np.array([[-65, 0]], np.int8), 4)[1]
    False
    """
    m, k = a.shape
    shifted = np.zeros((m, padded_k), np.int8)  # (M, K padded)
    shifted[:, :k] = (a.astype(np.int16) + 64).astype(np.uint8).view(np.int8)
    return shifted, bool(a.size == 0 or (a.min() >= -64 and a.max() <= 63))


def sign_split_reference(a: np.ndarray, padded_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of :func:`sign_split`.

    >>> [x.tolist() for x in sign_split_reference(np.array([[-128, 5, -3]], np.int8), 4)]
    [[[-1, 0, -1, 0]], [[-128, 5, 3, 0]], [131]]
    """
    m, k = a.shape
    masks = np.zeros((m, padded_k), np.int8)  # (M, K padded)
    magnitudes = np.zeros((m, padded_k), np.int8)  # (M, K padded)
    masks[:, :k] = np.where(a < 0, -1, 0)
    magnitudes[:, :k] = np.abs(a.astype(np.int16)).astype(np.uint8).view(np.int8)
    starts = -np.minimum(a.astype(np.int64), 0).sum(axis=1)  # (M,)
    return masks, magnitudes, starts.astype(np.int32)
