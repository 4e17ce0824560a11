"""Numba integer kernels: the same functions as ``reference.py``, bit-identical results, compiled.

Same integer-only scheme (Jacob et al. 2018, eq. 7-9; gemmlowp rounding) and the same public signatures
as :mod:`nanoopt.kernels.reference`, which is the specification these kernels are tested against. What
makes them fast, in the order the code runs:

* **Dot-product register tiles.** Weights stay in PyTorch layout ``(N, K)`` (already "B transposed": each
  output channel's K values are contiguous), padded once to a multiple of 8 rows (:func:`pack_weights`).
  A 4x4 tile keeps 16 int32 accumulators ``c_rc += int32(a[i+r, k]) * int32(w[j+c, k])``; every
  accumulate is wrapped in ``np.int32(...)`` so LLVM vectorises the K loop in 32-bit lanes. Leftover rows
  use a 1x8 tile. Each tile runs over the whole K: ``|a * w| <= 2^14`` and ``K <= MAX_FUSED_K = 131071``
  keep every int32 sum exact. (Measured: a tile inside a further loop that accumulates K blocks is no
  longer vectorised by LLVM, about 8x slower; so there is no K blocking.)
* **Only int8 x int8 tiles.** An int16 operand is split into two int8 "bytes",
  ``v = 256 * high + low + 128`` with ``high = v >> 8`` and ``low = (v & 255) - 128`` (:func:`split_bytes`);
  16x8 runs two passes (``256 T(a_hi, w) + T(a_lo, w)``), 16x16 four. The ``+ 128`` terms are sums of
  whole rows, added in the epilogue: ``128 rowsum(w)`` per channel and ``128 rowsum(a)`` per row. Passes
  accumulate into an int64 block buffer.
* **Zero point folded.** ``sum_k (x - x_zp) w = x @ w.T - x_zp * rowsum(w)``: row sums are computed once
  per weight, and ``bias - x_zp * rowsum(w)`` (plus the byte-split terms) is one per-channel offset
  (Jacob et al. 2018, eq. 8).
* **Epilogue per 64x64 block.** After the tiles of a block, one loop over the block adds the offsets and
  requantizes: a branch-free form of gemmlowp's rounding (vectorisable) when the accumulator bound fits
  int32 and every shift is a right shift of at most 30, else the exact wide (int64) formulas of
  :func:`nanoopt.spec.multiply_by_quantized_multiplier`; then zero point, clamp (ReLU = clamp at
  the output zero point), store. int8 outputs are stored directly; int16 outputs and the raw int32/int64
  sums of the GEMM entry points are stored as int64 and cast (:func:`kernel_dtype`).
* **Blocking and threads.** Output blocks of 64 rows x 64 channels (an A block and a weight block stay in
  L2, one 8-row weight panel in L1) are the work items of a ``prange`` when the product is large enough
  (``PARALLEL_MIN_OPS``) and ``numba.get_num_threads() > 1``.
* **Convolution** = zero-point-padded NHWC copy of the input, im2col of 64-pixel blocks in K order
  ``(kh, kw, c)`` (contiguous channel runs, copied with unsigned offsets so that LLVM vectorises them), and
  the same tiles writing NCHW output directly. Convolutions with fewer than 4 output channels per group
  (depthwise) run a direct int64 loop instead.
* **AVX2 glue.** The dispatch point (:mod:`nanoopt.kernels`) can take the products from the AVX2 GEMM of
  :mod:`nanoopt.kernels.avx2` instead: :class:`LinearPlan.finish` and the ``avx2_*`` / ``vnni_*`` drivers at the
  end of this file wrap the same im2col and epilogue around it. They compile only where that GEMM runs.

Every kernel compiles for one set of argument types whatever the precision mode (all operands are int8
parts), for int8 and for int64 outputs, with ``cache=True``. Argument checks are the reference's (shared
code), so both backends raise the same errors; reductions longer than ``MAX_FUSED_K`` run the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from nanoopt.kernels import avx2
from nanoopt.kernels import reference as ref
from nanoopt.spec import INT32_MAX, INT32_MIN, WIDE_LIMIT, QuantSpec

TILE_ROWS = 4  # rows of A per register tile
TILE_COLUMNS = 4  # weight rows (output channels) per register tile
PANEL = 8  # weights are padded to a multiple of this many rows (two 4x4 tiles or one 1x8 tile)
BLOCK_ROWS = 64  # rows of A per cache block / parallel work item
BLOCK_COLUMNS = 64  # output channels per cache block / parallel work item
CONV_PIXELS = 64  # output pixels per im2col block in conv2d
EXTERNAL_PIXELS = 256  # output pixels per block when the product comes from another GEMM (the AVX2 one)
MAX_FUSED_K = 131071  # longest reduction of the compiled tiles: 131071 * 128 * 128 < 2^31
PARALLEL_MIN_OPS = 2**23  # 2*M*N*K below this runs single-threaded (a parallel launch costs ~20-50 us)
BYTE_OFFSET = 128  # low bytes are stored minus 128 so that they fit int8


def split_bytes(values: np.ndarray) -> np.ndarray:
    """int16 ``values`` as two int8 parts ``(high, low)`` with ``values = 256 high + low + 128``.

    >>> split_bytes(np.array([-32768, -1, 300], np.int16))
    array([[-128,   -1,    1],
           [-128,  127,  -84]], dtype=int8)
    """
    high = (values >> 8).astype(np.int8)
    low = ((values & 255) - BYTE_OFFSET).astype(np.int8)
    return np.stack([high, low])


def _parts(values: np.ndarray) -> np.ndarray:
    """int8 values as a single part (a view), int16 values as their two byte parts."""
    return values[None] if values.dtype == np.int8 else split_bytes(values)


# -------------------------------------------------------------------------------- prepared weights
@dataclass(frozen=True)
class PackedWeights:
    """Weights ``(N, K)`` prepared once for the GEMM kernels.

    ``parts``: ``(1 or 2, N_pad, K)`` int8 -- the weights (int8) or their byte parts (int16,
    :func:`split_bytes`), with zero rows appended up to a multiple of 8 rows; ``row_sums = sum_k w[n, k]``
    (zero-point fold and byte-split terms); ``positive_sums`` / ``negative_sums`` (overflow bound,
    :func:`nanoopt.kernels.reference.bound_from_sign_sums`).
    """

    weight: np.ndarray  # (N, K) int8 or int16, the original
    parts: np.ndarray  # (1 or 2, N_pad, K) int8
    row_sums: np.ndarray  # (N,) int64
    positive_sums: np.ndarray  # (N,) int64
    negative_sums: np.ndarray  # (N,) int64

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]


def _pad_rows(parts: np.ndarray, rows: int) -> np.ndarray:
    """``parts (P, R, ...)`` with zero rows appended along axis 1 up to ``rows`` (itself if already there)."""
    if parts.shape[1] == rows:
        return parts
    padded = np.zeros(parts.shape[:1] + (rows,) + parts.shape[2:], dtype=parts.dtype)
    padded[:, : parts.shape[1]] = parts
    return padded


def pack_weights(w_q: np.ndarray) -> PackedWeights:
    """Prepare ``w_q (N, K)`` (int8 or int16, C-contiguous) for :func:`quantized_linear` and the GEMMs.

    >>> packed = pack_weights(np.ones((3, 5), np.int8))
    >>> packed.parts.shape, packed.row_sums
    ((1, 8, 5), array([5, 5, 5]))
    """
    ref.check_array(w_q, "w_q", (np.int8, np.int16), 2)
    rows = -(-w_q.shape[0] // PANEL) * PANEL
    positive, negative = ref.weight_sign_sums(w_q)
    parts = _pad_rows(_parts(w_q), rows)
    return PackedWeights(w_q, parts, w_q.sum(axis=1, dtype=np.int64), positive, negative)


def _as_packed(w_q) -> PackedWeights:
    return w_q if isinstance(w_q, PackedWeights) else pack_weights(w_q)


# ------------------------------------------------------------------------------- scalar arithmetic
@njit(cache=True, inline="always")
def _rounding_divide_by_pot(x, exponent):
    """gemmlowp RoundingDivideByPOT on an int64 (see nanoopt.spec.rounding_divide_by_pot)."""
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


@njit(cache=True)
def _multiply_wide(acc, m0, shift):
    """``spec.multiply_by_quantized_multiplier`` for an int64 accumulator (the exact wide path)."""
    left = -shift if shift < 0 else 0
    right = shift if shift > 0 else 0
    limit = np.int64(WIDE_LIMIT) >> left
    if acc > limit:
        x = np.int64(WIDE_LIMIT)
    elif acc < -limit:
        x = np.int64(-WIDE_LIMIT)
    else:
        x = acc << left
    high = x >> 31
    low = x & np.int64(0x7FFFFFFF)
    nudge = np.int64(1 << 30) if x >= 0 else np.int64(1 - (1 << 30))
    carry = low * m0 + nudge
    result = high * m0 + (carry >> 31)
    if x < 0 and (carry & np.int64(0x7FFFFFFF)) != 0:
        result += 1  # C++ division truncates toward zero
    return _rounding_divide_by_pot(result, right)


@njit(cache=True, inline="always")
def _multiply_int32(value, m0, shift):
    """``spec.multiply_by_quantized_multiplier`` for an int32 value (gemmlowp exactly; int64 registers)."""
    left = -shift if shift < 0 else 0
    right = shift if shift > 0 else 0
    x = min(max(np.int64(value) << left, INT32_MIN), INT32_MAX)
    if x == INT32_MIN and m0 == INT32_MIN:
        high = np.int64(INT32_MAX)
    else:
        product = x * m0
        total = product + (np.int64(1 << 30) if product >= 0 else np.int64(1 - (1 << 30)))
        high = total >> 31 if total >= 0 else -((-total) >> 31)
    return _rounding_divide_by_pot(high, right)


@njit(cache=True, inline="always")
def _multiply_fast(value, m0, shift):
    """:func:`_multiply_wide` for an int32-range ``value`` and a right shift ``0 <= shift <= 30``, branch-free
    (vectorisable) and on 32-bit lanes except for one product: ``value * m0`` fits int64 and the rounded high
    half fits int32.

    gemmlowp's high half ``trunc((p + nudge) / 2^31)`` (``nudge = 2^30`` for ``p >= 0``, ``1 - 2^30`` below) is
    ``floor((p + 2^30) / 2^31)`` for every ``p``: for ``p < 0``, ``trunc(t / 2^31) = ceil(t / 2^31) = floor((t +
    2^31 - 1) / 2^31)`` with ``t = p + 1 - 2^30``. That floor fits int32, so it is the low 32 bits of the *logical*
    shift ``(p + 2^30) >>> 31`` (bits 31..62 of ``p + 2^30``, the same under either shift): one 32x32->64 product
    (``vpmuldq``), one 64-bit add and a logical shift, where the literal formula needs a select, an arithmetic
    64-bit shift (none in AVX2) and a correction."""
    product = np.int64(np.int32(value)) * np.int64(np.int32(m0))
    top = np.int32(np.uint64(product + np.int64(1 << 30)) >> np.uint64(31))
    exponent = np.int32(shift)
    mask = (np.int32(1) << exponent) - np.int32(1)
    return (top >> exponent) + np.int32((top & mask) > ((mask >> 1) + np.int32(top < 0)))


@njit(cache=True, inline="always")
def _requantize(value, m0, shift, out_zero_point, low, high, fast):
    """One exact accumulator -> output code (fast: the branch-free int32 form, else the wide form)."""
    if fast:  # clip(s + zp, low, high) = clip(s, low - zp, high - zp) + zp, all in int32 (no overflow)
        scaled = _multiply_fast(value, m0, shift)
        zero = np.int32(out_zero_point)
        return min(max(scaled, np.int32(low) - zero), np.int32(high) - zero) + zero
    return min(max(_multiply_wide(value, m0, shift) + out_zero_point, low), high)


@njit(cache=True, inline="always")
def _finish(value, channel, epilogue):
    """Requantize one exact accumulator of output channel ``channel`` (or return it when raw)."""
    m0, shift, out_zero_point, low, high, raw, fast = epilogue[2:]
    if raw:
        return value
    return _requantize(value, m0[channel], shift[channel], out_zero_point, low, high, fast)


# ------------------------------------------------------------------------------------ GEMM tiles
@njit(cache=True, inline="always")
def _tile_4x4(a, w, i, j):
    """int32 sums ``sum_k a[i+r, k] * w[j+c, k]`` for r, c < 4, as a flat 16-tuple (row-major)."""
    c00 = c01 = c02 = c03 = np.int32(0)
    c10 = c11 = c12 = c13 = np.int32(0)
    c20 = c21 = c22 = c23 = np.int32(0)
    c30 = c31 = c32 = c33 = np.int32(0)
    for k in range(a.shape[1]):
        a0, a1, a2, a3 = np.int32(a[i, k]), np.int32(a[i + 1, k]), np.int32(a[i + 2, k]), np.int32(a[i + 3, k])
        w0, w1, w2, w3 = np.int32(w[j, k]), np.int32(w[j + 1, k]), np.int32(w[j + 2, k]), np.int32(w[j + 3, k])
        c00, c01 = np.int32(c00 + a0 * w0), np.int32(c01 + a0 * w1)
        c02, c03 = np.int32(c02 + a0 * w2), np.int32(c03 + a0 * w3)
        c10, c11 = np.int32(c10 + a1 * w0), np.int32(c11 + a1 * w1)
        c12, c13 = np.int32(c12 + a1 * w2), np.int32(c13 + a1 * w3)
        c20, c21 = np.int32(c20 + a2 * w0), np.int32(c21 + a2 * w1)
        c22, c23 = np.int32(c22 + a2 * w2), np.int32(c23 + a2 * w3)
        c30, c31 = np.int32(c30 + a3 * w0), np.int32(c31 + a3 * w1)
        c32, c33 = np.int32(c32 + a3 * w2), np.int32(c33 + a3 * w3)
    return (c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33)


@njit(cache=True, inline="always")
def _tile_1x8(a, w, i, j):
    """int32 sums ``sum_k a[i, k] * w[j+c, k]`` for c < 8, as an 8-tuple."""
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = np.int32(0)
    for k in range(a.shape[1]):
        x = np.int32(a[i, k])
        c0, c1 = np.int32(c0 + x * np.int32(w[j, k])), np.int32(c1 + x * np.int32(w[j + 1, k]))
        c2, c3 = np.int32(c2 + x * np.int32(w[j + 2, k])), np.int32(c3 + x * np.int32(w[j + 3, k]))
        c4, c5 = np.int32(c4 + x * np.int32(w[j + 4, k])), np.int32(c5 + x * np.int32(w[j + 5, k]))
        c6, c7 = np.int32(c6 + x * np.int32(w[j + 6, k])), np.int32(c7 + x * np.int32(w[j + 7, k]))
    return (c0, c1, c2, c3, c4, c5, c6, c7)


@njit(cache=True, inline="always")
def _put_4x4(buffer, row_stride, column_stride, row, column, s, scale, first):
    """``buffer[(row + r) row_stride + (column + c) column_stride] (=|+=) scale * s[4 r + c]`` (4x4 tile)."""
    for r in range(TILE_ROWS):
        for c in range(TILE_COLUMNS):
            index = (row + r) * row_stride + (column + c) * column_stride
            value = scale * np.int64(s[r * TILE_COLUMNS + c])
            buffer[index] = value if first else buffer[index] + value


@njit(cache=True, inline="always")
def _put_1x8(buffer, row_stride, column_stride, row, column, s, scale, first):
    """The same for a 1x8 tile."""
    for c in range(PANEL):
        index = row * row_stride + (column + c) * column_stride
        value = scale * np.int64(s[c])
        buffer[index] = value if first else buffer[index] + value


@njit(cache=True, inline="always")
def _finish_run(values, offsets, row_offset, m0, shift, epilogue, target):
    """``target[t] = finish(values[t] + offsets[t] + row_offset)`` with per-element ``m0``/``shift``; the mode
    tests sit outside the loops so that these vectorise (all operands are slices: no index arithmetic)."""
    out_zero_point, low, high, raw, fast = epilogue[4:]
    if raw:
        for t in range(values.shape[0]):
            target[t] = values[t] + offsets[t] + row_offset
    elif fast:
        for t in range(values.shape[0]):
            value = values[t] + offsets[t] + row_offset
            target[t] = _requantize(value, m0[t], shift[t], out_zero_point, low, high, True)
    else:
        for t in range(values.shape[0]):
            value = values[t] + offsets[t] + row_offset
            target[t] = _requantize(value, m0[t], shift[t], out_zero_point, low, high, False)


@njit(cache=True, inline="always")
def _finish_pixels(values, offset, row_offsets, m0, shift, epilogue, target):
    """``target[t] = finish(values[t] + offset + row_offsets[t])`` for one channel (scalar ``m0``/``shift``)."""
    out_zero_point, low, high, raw, fast = epilogue[4:]
    if raw:
        for t in range(values.shape[0]):
            target[t] = values[t] + offset + row_offsets[t]
    elif fast:
        for t in range(values.shape[0]):
            value = values[t] + offset + row_offsets[t]
            target[t] = _requantize(value, m0, shift, out_zero_point, low, high, True)
    else:
        for t in range(values.shape[0]):
            value = values[t] + offset + row_offsets[t]
            target[t] = _requantize(value, m0, shift, out_zero_point, low, high, False)


LINEAR, CONV_CHANNEL_MAJOR, CONV_PIXEL_MAJOR = 0, 1, 2  # layouts of a block buffer (geometry[4])


@njit(cache=True)
def _epilogue_block(buffer, rows, columns, i_lo, j_lo, epilogue, geometry, out3):
    """Add the offsets to the block sums, requantize (or not, when raw) and store.

    ``geometry = (batch_offset, channel_offset, valid_columns, row_offset, layout)``:

    * ``LINEAR``: ``buffer`` is ``(rows, columns)`` row-major, ``out3 (M, N, 1)``; one output row at a time
      (channels contiguous);
    * ``CONV_CHANNEL_MAJOR``: ``buffer`` is ``(columns, rows)``, ``out3 (batch, channels, pixels)``, rows are
      pixels ``row_offset + i`` of image ``batch_offset``; one channel at a time (pixels contiguous in NCHW);
    * ``CONV_PIXEL_MAJOR``: ``buffer`` is ``(rows, columns)`` (a product from another GEMM), same ``out3``:
      a pixel's channels are finished together, then scattered to their planes.
    """
    offsets, row_offsets, m0, shift = epilogue[0], epilogue[1], epilogue[2], epilogue[3]
    batch_offset, channel_offset, valid_columns, row_offset, layout = geometry
    used = min(columns, valid_columns - j_lo)
    first = channel_offset + j_lo
    channel_offsets, channel_m0, channel_shift = (
        offsets[first : first + used],
        m0[first : first + used],
        shift[first : first + used],
    )
    block_row_offsets = row_offsets[i_lo : i_lo + rows]
    if layout == CONV_CHANNEL_MAJOR:
        for c in range(used):
            target = out3[batch_offset, first + c, row_offset + i_lo : row_offset + i_lo + rows]
            values = buffer[c * rows : (c + 1) * rows]
            _finish_pixels(values, channel_offsets[c], block_row_offsets, channel_m0[c], channel_shift[c], epilogue,
                           target)  # fmt: skip
    elif layout == CONV_PIXEL_MAJOR:
        finished = np.empty(used, dtype=out3.dtype)
        for r in range(rows):
            values = buffer[r * columns : r * columns + used]
            _finish_run(values, channel_offsets, block_row_offsets[r], channel_m0, channel_shift, epilogue, finished)
            planes = out3[batch_offset, first : first + used, row_offset + i_lo + r]
            for c in range(used):
                planes[c] = finished[c]
    else:
        out2 = out3.reshape(out3.shape[0], out3.shape[1])  # rows of channels, typed contiguous (vectorises)
        for r in range(rows):
            values = buffer[r * columns : r * columns + used]
            target = out2[row_offset + i_lo + r, first : first + used]
            _finish_run(values, channel_offsets, block_row_offsets[r], channel_m0, channel_shift, epilogue, target)


@njit(cache=True)
def _gemm_block(operands, epilogue, geometry, out3, i_lo, i_hi, j_lo, j_hi):
    """Block rows ``[i_lo, i_hi)`` x weight rows ``[j_lo, j_hi)`` (a multiple of 8): every pass of tiles
    into an int64 buffer (row-major for linear, channel-major for conv), then :func:`_epilogue_block`."""
    a_parts, w_parts, passes = operands
    rows, columns = i_hi - i_lo, j_hi - j_lo
    buffer = np.empty(rows * columns, dtype=np.int64)
    row_stride, column_stride = (1, rows) if geometry[4] == CONV_CHANNEL_MAJOR else (columns, 1)
    for p in range(passes.shape[0]):
        a, w, scale, first = a_parts[passes[p, 0]], w_parts[passes[p, 1]], passes[p, 2], p == 0
        for j in range(j_lo, j_hi, PANEL):
            i = i_lo
            while i + TILE_ROWS <= i_hi:
                for jj in range(j, j + PANEL, TILE_COLUMNS):
                    tile = _tile_4x4(a, w, i, jj)
                    _put_4x4(buffer, row_stride, column_stride, i - i_lo, jj - j_lo, tile, scale, first)
                i += TILE_ROWS
            while i < i_hi:
                tile = _tile_1x8(a, w, i, j)
                _put_1x8(buffer, row_stride, column_stride, i - i_lo, j - j_lo, tile, scale, first)
                i += 1
    _epilogue_block(buffer, rows, columns, i_lo, j_lo, epilogue, geometry, out3)


@njit(cache=True)
def _gemm_serial(operands, epilogue, geometry, out3):
    rows, padded_columns = operands[0].shape[1], operands[1].shape[1]
    for i_lo in range(0, rows, BLOCK_ROWS):
        for j_lo in range(0, padded_columns, BLOCK_COLUMNS):
            i_hi, j_hi = min(i_lo + BLOCK_ROWS, rows), min(j_lo + BLOCK_COLUMNS, padded_columns)
            _gemm_block(operands, epilogue, geometry, out3, i_lo, i_hi, j_lo, j_hi)


@njit(cache=True, parallel=True)
def _gemm_parallel(operands, epilogue, geometry, out3):
    rows, padded_columns = operands[0].shape[1], operands[1].shape[1]
    row_blocks = (rows + BLOCK_ROWS - 1) // BLOCK_ROWS
    column_blocks = (padded_columns + BLOCK_COLUMNS - 1) // BLOCK_COLUMNS
    for item in prange(row_blocks * column_blocks):
        i_lo = (item // column_blocks) * BLOCK_ROWS
        j_lo = (item % column_blocks) * BLOCK_COLUMNS
        i_hi, j_hi = min(i_lo + BLOCK_ROWS, rows), min(j_lo + BLOCK_COLUMNS, padded_columns)
        _gemm_block(operands, epilogue, geometry, out3, i_lo, i_hi, j_lo, j_hi)


def _use_threads(ops: int) -> bool:
    return numba.get_num_threads() > 1 and ops >= PARALLEL_MIN_OPS


# ------------------------------------------------------------------- epilogue of products made elsewhere
def finish_products(products: np.ndarray, epilogue, out: np.ndarray) -> None:
    """``out[m, n] = finish(products[m, n] + offsets[n] + row_offsets[m])`` for exact int32/int64 sums
    ``products (M, N)`` computed by another GEMM (the AVX2 one); ``epilogue`` as in :func:`_gemm_block`."""
    rows, columns = products.shape
    geometry = (0, 0, columns, 0, LINEAR)
    _epilogue_block(products.reshape(-1), rows, columns, 0, 0, epilogue, geometry, out.reshape(out.shape + (1,)))


# ------------------------------------------------------------------------------ argument preparation
def _passes(a_parts: int, w_parts: int) -> np.ndarray:
    """``(a part, w part, scale)`` per pass: ``sum A'W' = sum_passes scale * T(a part, w part)``."""
    rows = [
        (pa, pw, 256 ** ((a_parts - 1 - pa) + (w_parts - 1 - pw))) for pa in range(a_parts) for pw in range(w_parts)
    ]
    return np.array(rows, dtype=np.int64)


def _channel_correction(a_split: bool, w_split: bool, w_row_sums: np.ndarray, depth: int) -> np.ndarray:
    """Per-channel ``+ 128`` terms of the byte split (the per-row one, ``128 [w split] rowsum(a)``, depends
    on the input and is added by the kernels).

    With ``a = a' + 128 [a split]`` and ``w = w' + 128 [w split]``: ``sum_k a w = sum_k a' w'
    + 128 [w split] rowsum(a) + 128 [a split] rowsum(w) - 128^2 K [a split][w split]``.
    """
    return BYTE_OFFSET * w_row_sums * a_split - BYTE_OFFSET**2 * depth * (a_split and w_split)


def _check_x_dtype(x_dtype) -> np.dtype:
    dtype = np.dtype(x_dtype)
    if dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
        raise TypeError(f"x_dtype must be int8 or int16, got {dtype}")
    return dtype


def _layer_epilogue(packed, x_dtype, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec, relu, w_ndim):
    """Validate a layer's fixed parameters; return ``(x_zp, offsets, tail)`` where ``tail`` is the epilogue
    tuple after the offsets (``m0, shift, out_zp, low, high, raw, fast``)."""
    x_dtype = _check_x_dtype(x_dtype)
    x_zp, bias, m0_array, shift_array, out_zp = ref.check_layer_params(
        x_dtype, packed.weight, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, w_ndim,
        sign_sums=(packed.positive_sums, packed.negative_sums),
    )  # fmt: skip
    bound = ref.bound_from_sign_sums(
        packed.positive_sums, packed.negative_sums, *ref.activation_range(x_dtype), x_zp, bias
    )
    # The branch-free int32 path needs int32 accumulators and a right shift an int32 can take (<= 30).
    fast = int(bound.max(initial=0)) <= INT32_MAX and 0 <= int(shift_array.min()) and int(shift_array.max()) <= 30
    low = max(out_spec.qmin, out_zp) if relu else out_spec.qmin
    tail = (m0_array, shift_array, np.int64(out_zp), np.int64(low), np.int64(out_spec.qmax), False, fast)
    return x_zp, bias - x_zp * packed.row_sums, tail


def _raw_tail(channels: int):
    """Epilogue tail of the raw GEMMs: the sums plus offsets, stored as they are."""
    unused = np.zeros(channels, dtype=np.int64)
    return (unused, unused, np.int64(0), np.int64(0), np.int64(0), True, False)


def _run_linear(x_q: np.ndarray, packed: PackedWeights, offsets: np.ndarray, tail, out: np.ndarray, passes=None):
    """All passes of ``x_q (M, K) @ packed.T`` with the epilogue into ``out (M, N)`` (K <= MAX_FUSED_K).

    ``offsets`` must already hold the per-channel byte-split terms (:func:`_linear_offsets`); ``passes``
    may be given when cached."""
    a_parts = _parts(x_q)
    if passes is None:
        passes = _passes(a_parts.shape[0], packed.parts.shape[0])
    if packed.parts.shape[0] == 2:  # int16 weights: the per-row byte-split term
        row_offsets = x_q.sum(axis=1, dtype=np.int64) * BYTE_OFFSET
    else:
        row_offsets = np.zeros(x_q.shape[0], np.int64)
    operands = (a_parts, packed.parts, passes)
    epilogue = (offsets, row_offsets) + tail
    geometry = (0, 0, packed.n, 0, LINEAR)
    out3 = out.reshape(out.shape + (1,))
    if _use_threads(2 * x_q.shape[0] * packed.parts.shape[1] * x_q.shape[1] * passes.shape[0]):
        _gemm_parallel(operands, epilogue, geometry, out3)
    else:
        _gemm_serial(operands, epilogue, geometry, out3)


def _linear_offsets(offsets: np.ndarray, x_dtype, packed: PackedWeights) -> np.ndarray:
    """``offsets`` plus the per-channel byte-split terms for activations of ``x_dtype``."""
    return offsets + _channel_correction(x_dtype == np.int16, packed.parts.shape[0] == 2, packed.row_sums, packed.k)


def kernel_dtype(out_dtype) -> np.dtype:
    """The dtype the compiled kernels write: int8 directly; int16/int32/int64 results are written as int64
    and cast (exactly: they are clamped or bounded already). One compiled variant fewer per kernel."""
    return np.dtype(np.int8) if np.dtype(out_dtype) == np.int8 else np.dtype(np.int64)


def _raw_gemm(a: np.ndarray, packed: PackedWeights, a_zp: int, out_dtype) -> np.ndarray:
    out = np.empty((a.shape[0], packed.n), dtype=np.int64)
    _run_linear(a, packed, _linear_offsets(-a_zp * packed.row_sums, a.dtype, packed), _raw_tail(packed.n), out)
    return out.astype(out_dtype, copy=False)


def _check_input(x_q, dtype: np.dtype, ndim: int, depth: int, depth_axis: int) -> None:
    """Per-call check of a prepared layer's input (the fixed parameters were checked once)."""
    if not isinstance(x_q, np.ndarray) or x_q.dtype != dtype:
        raise TypeError(f"x_q must be a NumPy array of {dtype} (as prepared), got {getattr(x_q, 'dtype', type(x_q))}")
    if x_q.ndim != ndim:
        raise ValueError(f"x_q must have {ndim} dimensions, got shape {x_q.shape}")
    if not x_q.flags.c_contiguous:
        raise ValueError("x_q must be C-contiguous (call np.ascontiguousarray first)")
    if x_q.shape[depth_axis] != depth:
        raise ValueError(f"x_q must have {depth} {'features' if ndim == 2 else 'channels'}, got shape {x_q.shape}")


# ------------------------------------------------------------------------------------------------ GEMMs
def gemm_s8s8s32(a: np.ndarray, w, a_zero_point: int) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.gemm_s8s8s32` (``w`` may be pre-packed).

    >>> a = np.array([[1, 2]], dtype=np.int8); w = np.array([[3, 4], [-1, 0]], dtype=np.int8)
    >>> gemm_s8s8s32(a, w, 1)
    array([[4, 0]], dtype=int32)
    """
    packed = _as_packed(w)
    ref.check_gemm_args(a, packed.weight, (np.int8,), (np.int8,))
    zero_point = ref.check_int(a_zero_point, "a_zero_point", *ref.INT8_RANGE)
    if not ref.int32_safe_from_sign_sums(packed.positive_sums, packed.negative_sums, *ref.INT8_RANGE, zero_point):
        raise ref.AccumulatorOverflowError(
            f"int8 GEMM with K={packed.k} could overflow int32; use quantized_linear (widens) or split K"
        )
    return _raw_gemm(a, packed, zero_point, np.int32)  # int32-safe sums imply every tile sum fits int32


def gemm_s16s8s64(a: np.ndarray, w) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.gemm_s16s8s64`.

    >>> gemm_s16s8s64(np.array([[32767, -32768]], np.int16), np.array([[127, 127]], np.int8))
    array([[-127]])
    """
    packed = _as_packed(w)
    ref.check_gemm_args(a, packed.weight, (np.int16,), (np.int8,))
    if packed.k > MAX_FUSED_K:
        return ref.gemm_s16s8s64(a, packed.weight)
    return _raw_gemm(a, packed, 0, np.int64)


def gemm_s16s16s64(a: np.ndarray, w) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.gemm_s16s16s64`.

    >>> gemm_s16s16s64(np.array([[-32768]], np.int16), np.array([[-32768]], np.int16))
    array([[1073741824]])
    """
    packed = _as_packed(w)
    ref.check_gemm_args(a, packed.weight, (np.int16,), (np.int16,))
    if packed.k > MAX_FUSED_K:
        return ref.gemm_s16s16s64(a, packed.weight)
    return _raw_gemm(a, packed, 0, np.int64)


# ------------------------------------------------------------------------------------------ linear
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
        self.packed = _as_packed(w_q)
        self.x_dtype = _check_x_dtype(x_dtype)
        self.out_dtype = out_spec.dtype
        self.arguments = (bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu)  # for the fallback
        self.x_zero_point, offsets, self.tail = _layer_epilogue(
            self.packed, self.x_dtype, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec, relu, 2
        )
        self.base_offsets = offsets  # bias - x_zp * rowsum(w): what exact products need
        self.offsets = _linear_offsets(offsets, self.x_dtype, self.packed)
        self.passes = _passes(2 if self.x_dtype == np.int16 else 1, self.packed.parts.shape[0])

    def check_input(self, x_q: np.ndarray) -> None:
        """The per-call check: ``x_q`` has the prepared dtype, two dimensions, K features, C order."""
        _check_input(x_q, self.x_dtype, 2, self.packed.k, 1)

    def finish(self, products: np.ndarray) -> np.ndarray:
        """The layer's output from exact products ``x_q @ w.T`` (int32 or int64 ``(M, N)``, e.g. from the
        AVX2 GEMM): zero-point fold, bias, requantization, ReLU -- the epilogue of :meth:`__call__`."""
        out = np.empty(products.shape, dtype=kernel_dtype(self.out_dtype))
        finish_products(products, (self.base_offsets, np.zeros(products.shape[0], np.int64)) + self.tail, out)
        return out.astype(self.out_dtype, copy=False)

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        _check_input(x_q, self.x_dtype, 2, self.packed.k, 1)
        if self.packed.k > MAX_FUSED_K:
            return ref.quantized_linear(x_q, self.packed.weight, *self.arguments)
        out = np.empty((x_q.shape[0], self.packed.n), dtype=kernel_dtype(self.out_dtype))
        _run_linear(x_q, self.packed, self.offsets, self.tail, out, self.passes)
        return out.astype(self.out_dtype, copy=False)


def quantized_linear(
    x_q: np.ndarray,
    w_q,
    bias_q: np.ndarray | None,
    x_zero_point: int,
    m0,
    shift,
    out_zero_point: int,
    out_spec: QuantSpec,
    relu: bool = False,
) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.quantized_linear` (``w_q`` may be a
    :class:`PackedWeights`). Layers called repeatedly should hold a :class:`LinearPlan`.

    >>> x = np.array([[10, -3]], np.int8); w = np.array([[2, 1], [-1, 4]], np.int8)
    >>> quantized_linear(x, w, np.array([1, 0], np.int32), 0, 2**30, 0, 0, QuantSpec())
    array([[  9, -11]], dtype=int8)
    """
    ref.check_array(x_q, "x_q", (np.int8, np.int16), 2)
    plan = LinearPlan(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu, x_q.dtype)
    if x_q.shape[1] != plan.packed.k:
        raise ValueError(f"x_q (M, K) and w_q (N, K) must share K, got {x_q.shape} and {plan.packed.weight.shape}")
    return plan(x_q)


# -------------------------------------------------------------------------------------------- conv
@dataclass(frozen=True)
class PackedConv2d:
    """Conv weights ``(OC, IC/groups, KH, KW)`` prepared once.

    ``parts``: ``(groups, 1 or 2, OC_g padded to 8, KH*KW*IC_g)`` int8 with K in ``(kh, kw, c)`` order
    (matching the NHWC im2col), byte parts as in :class:`PackedWeights`; ``row_sums`` / sign sums per
    output channel.
    """

    weight: np.ndarray  # (OC, IC/groups, KH, KW), the original
    groups: int
    parts: np.ndarray  # (groups, 1 or 2, OC_g padded, KH*KW*IC_g) int8
    row_sums: np.ndarray  # (OC,) int64
    positive_sums: np.ndarray  # (OC,) int64
    negative_sums: np.ndarray  # (OC,) int64


def pack_conv2d_weights(w_q: np.ndarray, groups: int = 1) -> PackedConv2d:
    """Prepare conv weights for :func:`quantized_conv2d`.

    >>> pack_conv2d_weights(np.ones((4, 2, 3, 3), np.int8), groups=2).parts.shape
    (2, 1, 8, 18)
    """
    ref.check_array(w_q, "w_q", (np.int8, np.int16), 4)
    groups = ref.check_int(groups, "groups", 1, 2**31 - 1)
    out_channels, group_channels, kh, kw = w_q.shape
    if out_channels % groups:
        raise ValueError(f"out channels {out_channels} must be divisible by groups={groups}")
    per_group = out_channels // groups
    rows = -(-per_group // PANEL) * PANEL
    reordered = w_q.transpose(0, 2, 3, 1).reshape(groups, per_group, kh * kw * group_channels)  # (kh, kw, c)
    parts = np.stack([_pad_rows(_parts(np.ascontiguousarray(matrix)), rows) for matrix in reordered])
    positive, negative = ref.weight_sign_sums(w_q)
    row_sums = w_q.reshape(out_channels, -1).sum(axis=1, dtype=np.int64)
    return PackedConv2d(w_q, groups, parts, row_sums, positive, negative)


@njit(cache=True, inline="always")
def _im2col_rows(padded, part, n, c_lo, channels, conv, p_lo, rows, cols):
    """``cols[r, (i kw + j) channels + c] = padded[part, n, y(p) + i dh, x(p) + j dw, c_lo + c]`` for pixels
    ``p = p_lo + r``, from the NHWC ``padded (parts, N, Hp, Wp, C)``; flat indices (no array views in the
    loops). When a patch row is one contiguous run (all channels, ``dw == 1``) it is copied as one run."""
    kh, kw, sh, sw, dh, dw, out_w = conv[3], conv[4], conv[5], conv[6], conv[7], conv[8], conv[9]
    total_channels, width = padded.shape[4], padded.shape[3]
    source = padded.reshape(-1)
    target = cols.reshape(-1)
    image = (part * padded.shape[1] + n) * padded.shape[2] * width * total_channels
    depth = kh * kw * channels
    run = kw * channels
    contiguous = channels == total_channels and dw == 1
    # Unsigned offsets: Numba then skips its negative-index fix-up and LLVM vectorises the copies (~25x).
    for r in range(rows):
        y0 = (p_lo + r) // out_w * sh
        x0 = (p_lo + r) % out_w * sw
        for i in range(kh):
            start = np.uint64(image + ((y0 + i * dh) * width + x0) * total_channels + c_lo)
            out = np.uint64(r * depth + i * run)
            if contiguous:
                for t in range(np.uint64(run)):
                    target[out + t] = source[start + t]
            else:
                for j in range(kw):
                    offset_in = start + np.uint64(j * dw * total_channels)
                    offset_out = out + np.uint64(j * channels)
                    for c in range(np.uint64(channels)):
                        target[offset_out + c] = source[offset_in + c]


@njit(cache=True)
def _pad_nhwc(x, zero_point, pad_h, pad_w, padded):
    """Fill ``padded (parts, N, H + 2 pad_h, W + 2 pad_w, C)`` int8 with NCHW ``x`` and a ``zero_point``
    border: the values themselves (int8 ``x``, one part) or their byte parts (int16 ``x``, two parts)."""
    split = padded.shape[0] == 2
    if split:
        padded[0] = zero_point >> 8
        padded[1] = (zero_point & 255) - BYTE_OFFSET
    else:
        padded[0] = zero_point
    batch, channels, height, width = x.shape
    for n in range(batch):
        for c in range(channels):
            for y in range(height):
                for xx in range(width):
                    value = np.int64(x[n, c, y, xx])
                    if split:
                        padded[0, n, y + pad_h, xx + pad_w, c] = value >> 8
                        padded[1, n, y + pad_h, xx + pad_w, c] = (value & 255) - BYTE_OFFSET
                    else:
                        padded[0, n, y + pad_h, xx + pad_w, c] = value


@njit(cache=True)
def _conv_item(padded, w_parts, passes, item, conv, epilogue, out3):
    """One work item (image, group, 64-pixel block): im2col of the int8 parts -> GEMM passes -> NCHW."""
    groups, channels, per_group, kh, kw, sh, sw, dh, dw, out_w, pixels = conv
    blocks = (pixels + CONV_PIXELS - 1) // CONV_PIXELS
    n = item // (groups * blocks)
    group = (item // blocks) % groups
    p_lo = (item % blocks) * CONV_PIXELS
    rows = min(p_lo + CONV_PIXELS, pixels) - p_lo
    parts, depth, c_lo = padded.shape[0], kh * kw * channels, group * channels
    cols = np.empty((parts, rows, depth), dtype=np.int8)
    for part in range(parts):
        _im2col_rows(padded, part, n, c_lo, channels, conv, p_lo, rows, cols[part])
    row_offsets = np.zeros(rows, dtype=np.int64)
    if w_parts.shape[1] == 2:  # byte-split term of int16 weights: 128 * rowsum(a), a = 256 hi + lo + 128
        for r in range(rows):
            total = np.int64(0)
            for k in range(depth):
                total += 256 * np.int64(cols[0, r, k]) + np.int64(cols[1, r, k]) + BYTE_OFFSET
            row_offsets[r] = BYTE_OFFSET * total
    block_epilogue = (epilogue[0], row_offsets) + epilogue[2:]
    geometry = (n, group * per_group, per_group, p_lo, CONV_CHANNEL_MAJOR)
    _gemm_block((cols, w_parts[group], passes), block_epilogue, geometry, out3, 0, rows, 0, w_parts.shape[2])


@njit(cache=True)
def _conv_serial(padded, w_parts, passes, items, conv, epilogue, out3):
    for item in range(items):
        _conv_item(padded, w_parts, passes, item, conv, epilogue, out3)


@njit(cache=True, parallel=True)
def _conv_parallel(padded, w_parts, passes, items, conv, epilogue, out3):
    for item in prange(items):
        _conv_item(padded, w_parts, passes, item, conv, epilogue, out3)


@njit(cache=True, parallel=True)
def _conv_direct(padded, weight, per_group, sh, sw, dh, dw, epilogue, out4):
    """Direct convolution, one output plane (image, channel) per work item, int64 accumulator row."""
    channels_out, out_h, out_w = out4.shape[1], out4.shape[2], out4.shape[3]
    group_channels, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    offsets = epilogue[0]
    for plane in prange(out4.shape[0] * channels_out):
        n, o = plane // channels_out, plane % channels_out
        c_lo = (o // per_group) * group_channels
        acc = np.zeros(out_w, dtype=np.int64)
        for y in range(out_h):
            acc[:] = 0
            for c in range(group_channels):
                for i in range(kh):
                    row = y * sh + i * dh
                    for j in range(kw):
                        w = np.int64(weight[o, c, i, j])
                        if padded.shape[0] == 2:  # int16 input as byte parts: 256 hi + lo + 128
                            for xx in range(out_w):
                                column = xx * sw + j * dw
                                high = np.int64(padded[0, n, row, column, c_lo + c])
                                low = np.int64(padded[1, n, row, column, c_lo + c])
                                acc[xx] += w * (256 * high + low + BYTE_OFFSET)
                        else:
                            for xx in range(out_w):
                                acc[xx] += w * np.int64(padded[0, n, row, xx * sw + j * dw, c_lo + c])
            for xx in range(out_w):
                out4[n, o, y, xx] = _finish(acc[xx] + offsets[o], o, epilogue)


# ------------------------------------------------------------------------------- thin direct convolution
THIN_MAX_DEPTH = 96  # unit-stride int8 convs with at most this many taps (IC/groups * KH * KW) run the loop below
THIN_TAPS = 4  # taps summed per pass over the accumulator row (taps are padded with zero weights to this)


def thin_conv_taps(weight: np.ndarray, height: int, width: int, dilation) -> tuple[np.ndarray, np.ndarray]:
    """The taps of the direct thin convolution for an image padded to ``height x width`` (NCHW planes):
    ``(offsets (T,), weights (OC, T))`` with ``T`` a multiple of ``THIN_TAPS``; tap ``t = (c kh + i) kw + j``
    reads ``plane[c][(y sh + i dh) width + x sw + j dw]``, i.e. the flat offset ``c height width + i dh width
    + j dw`` from the output pixel's corner. Padding taps have weight 0 and offset 0.

    >>> offsets, weights = thin_conv_taps(np.ones((2, 1, 1, 2), np.int8), 4, 5, (1, 1))
    >>> offsets, weights.shape
    (array([0, 1, 0, 0]), (2, 4))
    """
    out_channels, group_channels, kh, kw = weight.shape
    c, i, j = np.meshgrid(np.arange(group_channels), np.arange(kh), np.arange(kw), indexing="ij")
    offsets = (c * height * width + i * dilation[0] * width + j * dilation[1]).reshape(-1)
    taps = -(-offsets.size // THIN_TAPS) * THIN_TAPS
    padded_offsets = np.zeros(taps, np.int64)
    padded_offsets[: offsets.size] = offsets
    weights = np.zeros((out_channels, taps), np.int32)
    weights[:, : offsets.size] = weight.reshape(out_channels, -1)
    return padded_offsets, weights


@njit(cache=True, inline="always")
def _thin_accumulate(source, base, offsets, weights, o, acc, rows, columns, row_stride):
    """``acc[y columns + x] (+)= sum_t weights[o, t] source[base + y row_stride + x + offsets[t]]`` over
    ``rows x columns`` accumulators, four taps per pass (int32 is exact: ``|x w| <= 2^14`` and at most
    MAX_FUSED_K taps). Contiguous loads only, so that LLVM vectorises the inner loop; nested loops, not one
    flat index with ``//`` and ``%``, which cost more than the products (measured: 20x slower)."""
    for t in range(0, offsets.shape[0], THIN_TAPS):
        w0, w1 = np.int32(weights[o, t]), np.int32(weights[o, t + 1])
        w2, w3 = np.int32(weights[o, t + 2]), np.int32(weights[o, t + 3])
        first = t == 0
        for y in range(rows):
            start = base + y * row_stride
            r0 = source[start + offsets[t] : start + offsets[t] + columns]
            r1 = source[start + offsets[t + 1] : start + offsets[t + 1] + columns]
            r2 = source[start + offsets[t + 2] : start + offsets[t + 2] + columns]
            r3 = source[start + offsets[t + 3] : start + offsets[t + 3] + columns]
            row = acc[y * columns : (y + 1) * columns]
            for x in range(columns):
                value = np.int32(
                    w0 * np.int32(r0[x]) + w1 * np.int32(r1[x]) + w2 * np.int32(r2[x]) + w3 * np.int32(r3[x])
                )
                row[x] = value if first else np.int32(row[x] + value)


@njit(cache=True)
def _thin_conv_image(x, n, zero_point, geometry, offsets, weights, epilogue, out4):
    """Image ``n``: its zero-point-padded NCHW copy (plus a tail of ``slack`` zero points read only by the
    discarded columns of the unit-stride grid), then per output channel the tap sums and the epilogue."""
    pad_h, pad_w, sh, sw, per_group, slack = geometry
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    channels_out, out_h, out_w = out4.shape[1], out4.shape[2], out4.shape[3]
    padded_h, padded_w = height + 2 * pad_h, width + 2 * pad_w
    plane = padded_h * padded_w
    source = np.full(channels * plane + slack, np.int8(zero_point), dtype=np.int8)
    for c in range(channels):
        for y in range(height):
            row = c * plane + (y + pad_h) * padded_w + pad_w
            for xx in range(width):
                source[row + xx] = x[n, c, y, xx]
    # Every column from the first to the last output's is summed (contiguous loads; with a column stride the
    # ones between outputs are discarded); unit stride sums one flat run over whole padded rows, whose
    # columns past the image's right edge are discarded.
    span = (out_w - 1) * sw + 1
    if sh == 1 and sw == 1:
        rows, run, columns = 1, out_h * padded_w, padded_w
    else:
        rows, run, columns = out_h, span, span
    acc = np.empty(out_h * columns, dtype=np.int32)
    no_row_offsets = np.zeros(out_w, dtype=np.int64)
    group_channels = channels // (channels_out // per_group)
    for o in range(channels_out):
        base = (o // per_group) * group_channels * plane
        _thin_accumulate(source, base, offsets, weights, o, acc, rows, run, sh * padded_w)
        for y in range(out_h):
            if sw == 1:  # a contiguous slice: the epilogue vectorises
                values = acc[y * columns : y * columns + out_w]
                _finish_pixels(values, epilogue[0][o], no_row_offsets, epilogue[2][o], epilogue[3][o], epilogue,
                               out4[n, o, y])  # fmt: skip
            else:
                values = acc[y * columns : y * columns + span : sw]
                _finish_pixels(values, epilogue[0][o], no_row_offsets, epilogue[2][o], epilogue[3][o], epilogue,
                               out4[n, o, y])  # fmt: skip


@njit(cache=True)
def _thin_conv_serial(x, zero_point, geometry, offsets, weights, epilogue, out4):
    for n in range(x.shape[0]):
        _thin_conv_image(x, n, zero_point, geometry, offsets, weights, epilogue, out4)


@njit(cache=True, parallel=True)
def _thin_conv_parallel(x, zero_point, geometry, offsets, weights, epilogue, out4):
    for n in prange(x.shape[0]):
        _thin_conv_image(x, n, zero_point, geometry, offsets, weights, epilogue, out4)


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
        self.x_dtype = _check_x_dtype(x_dtype)
        self.out_dtype = out_spec.dtype
        self.stride, self.padding = ref.pair(stride, "stride", 1), ref.pair(padding, "padding", 0)
        self.dilation, self.groups = ref.pair(dilation, "dilation", 1), groups
        self.arguments = (bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, self.stride, self.padding,
                          self.dilation, groups, relu)  # fmt: skip
        self.x_zero_point, offsets, self.tail = _layer_epilogue(
            self.packed, self.x_dtype, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec, relu, 4
        )
        out_channels, group_channels, kh, kw = self.packed.weight.shape
        self.depth = kh * kw * group_channels
        self.a_split, w_split = self.x_dtype == np.int16, self.packed.parts.shape[1] == 2
        self.offsets = offsets + _channel_correction(self.a_split, w_split, self.packed.row_sums, self.depth)
        self.direct_offsets = offsets  # the direct kernel reads whole values: no byte-split terms
        self.passes = _passes(2 if self.a_split else 1, self.packed.parts.shape[1])
        # The direct thin loop (int8 activations and weights; int32 sums are exact as depth <= MAX_FUSED_K):
        # depthwise-like layers (too few channels per group for the 4x4 tiles; 3-12x faster than the direct
        # loop it replaced) and unit-stride layers with few taps, where im2col costs more than the products
        # (measured on Zen 5, 1 thread, batch 64-256: 1->6 5x5 on 28x28 2.0 ms vs 7.8 ms tiles, 17.6 ms AVX2;
        # 3->16 3x3 0.9 vs 4.1 ms; 8->8 3x3 0.3 vs 0.7 ms; it loses from depth ~150 and at stride 2).
        per_group = out_channels // groups
        few_taps = self.depth <= THIN_MAX_DEPTH and self.stride == (1, 1)
        int8 = self.x_dtype == np.int8 and self.packed.weight.dtype == np.int8
        self.thin = int8 and (per_group < TILE_COLUMNS or few_taps)
        self._thin_taps: dict = {}

    def output_shape(self, x_q: np.ndarray) -> tuple[int, int, int, int]:
        """Check ``x_q`` (dtype, layout, channels, size) and return the output shape ``(N, OC, OH, OW)``."""
        out_channels, group_channels, kh, kw = self.packed.weight.shape
        _check_input(x_q, self.x_dtype, 4, self.groups * group_channels, 1)
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        out_h = ref.conv_output_size(x_q.shape[2], kh, sh, ph, dh, "height")
        out_w = ref.conv_output_size(x_q.shape[3], kw, sw, pw, dw, "width")
        return x_q.shape[0], out_channels, out_h, out_w

    def pad(self, x_q: np.ndarray) -> np.ndarray:
        """``(parts, N, H + 2 ph, W + 2 pw, C)`` int8 NHWC copy of ``x_q`` with a zero-point border."""
        (ph, pw), (batch, channels, height, width) = self.padding, x_q.shape
        parts = 2 if self.a_split else 1
        padded = np.empty((parts, batch, height + 2 * ph, width + 2 * pw, channels), dtype=np.int8)
        _pad_nhwc(x_q, self.x_zero_point, ph, pw, padded)
        return padded

    def conv_tuple(self, out_h: int, out_w: int) -> tuple:
        """The geometry tuple of the compiled conv kernels."""
        out_channels, group_channels, kh, kw = self.packed.weight.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return (self.groups, group_channels, out_channels // self.groups, kh, kw, sh, sw, dh, dw, out_w,
                out_h * out_w)  # fmt: skip

    def external_arguments(self, x_q: np.ndarray) -> tuple:
        """For a conv whose products come from another GEMM (the AVX2 one, int8 activations): ``(padded,
        items, conv, epilogue, out)`` -- the NHWC input, the number of 256-pixel work items, the geometry
        tuple, the epilogue of exact products and the output to fill (``kernel_dtype``; cast it with
        :meth:`cast_output`). Each item: :func:`_im2col_rows`, the product, :func:`_epilogue_block` with
        the ``CONV_PIXEL_MAJOR`` layout."""
        batch, out_channels, out_h, out_w = self.output_shape(x_q)
        if self.x_dtype != np.int8:
            raise TypeError("external products need int8 activations")
        pixels = out_h * out_w
        items = batch * self.groups * ((pixels + EXTERNAL_PIXELS - 1) // EXTERNAL_PIXELS)
        epilogue = (self.direct_offsets, np.zeros(EXTERNAL_PIXELS, np.int64)) + self.tail
        out = np.empty((batch, out_channels, out_h, out_w), dtype=kernel_dtype(self.out_dtype))
        return self.pad(x_q), items, self.conv_tuple(out_h, out_w), epilogue, out

    def cast_output(self, out: np.ndarray) -> np.ndarray:
        """``out`` (written as :func:`kernel_dtype`) in the layer's output dtype."""
        return out.astype(self.out_dtype, copy=False)

    def run_thin(self, x_q: np.ndarray, out_shape: tuple[int, int, int, int]) -> np.ndarray:
        """The direct thin convolution (:func:`_thin_conv_image`) of a checked int8 ``x_q``."""
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        padded_h, padded_w = x_q.shape[2] + 2 * ph, x_q.shape[3] + 2 * pw
        if (padded_h, padded_w) not in self._thin_taps:
            self._thin_taps[padded_h, padded_w] = thin_conv_taps(self.packed.weight, padded_h, padded_w, (dh, dw))
        offsets, weights = self._thin_taps[padded_h, padded_w]
        batch, out_channels, out_h, out_w = out_shape
        out = np.empty(out_shape, dtype=kernel_dtype(self.out_dtype))
        slack = (self.packed.weight.shape[3] - 1) * dw
        geometry = (ph, pw, sh, sw, out_channels // self.groups, slack)
        epilogue = (self.direct_offsets, np.zeros(1, np.int64)) + self.tail
        arguments = (x_q, np.int64(self.x_zero_point), geometry, offsets, weights, epilogue, out)
        if _use_threads(2 * out.size * self.depth):
            _thin_conv_parallel(*arguments)
        else:
            _thin_conv_serial(*arguments)
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
            _conv_direct(padded, weight.astype(np.int16), per_group, sh, sw, dh, dw, epilogue, out)
            return out.astype(self.out_dtype, copy=False)
        pixels = out_h * out_w
        items = batch * self.groups * ((pixels + CONV_PIXELS - 1) // CONV_PIXELS)
        conv = self.conv_tuple(out_h, out_w)
        epilogue = (self.offsets, np.zeros(0, np.int64)) + self.tail
        out3 = out.reshape(batch, out_channels, pixels)
        arguments = (padded, self.packed.parts, self.passes, items, conv, epilogue, out3)
        if _use_threads(2 * out.size * self.depth * self.passes.shape[0]):
            _conv_parallel(*arguments)
        else:
            _conv_serial(*arguments)
        return out.astype(self.out_dtype, copy=False)


def quantized_conv2d(
    x_q: np.ndarray,
    w_q,
    bias_q: np.ndarray | None,
    x_zero_point: int,
    m0,
    shift,
    out_zero_point: int,
    out_spec: QuantSpec,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = False,
) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.quantized_conv2d` (``w_q`` may be a
    :class:`PackedConv2d` made with the same ``groups``). Layers called repeatedly should hold a
    :class:`Conv2dPlan`.

    >>> x = np.ones((1, 1, 3, 3), np.int8); w = np.ones((1, 1, 3, 3), np.int8)
    >>> quantized_conv2d(x, w, None, 0, 2**30, 0, 0, QuantSpec(), padding=1)[0, 0]
    array([[2, 3, 2],
           [3, 5, 3],
           [2, 3, 2]], dtype=int8)
    """
    ref.check_array(x_q, "x_q", (np.int8, np.int16), 4)
    weight = w_q.weight if isinstance(w_q, PackedConv2d) else w_q
    ref.check_array(weight, "w_q", (np.int8, np.int16), 4)
    ref.check_conv_geometry(x_q, weight, stride, padding, dilation, groups)
    plan = Conv2dPlan(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding,
                      dilation, groups, relu, x_q.dtype)  # fmt: skip
    return plan(x_q)


# ------------------------------------------------------------------------------------ AVX2 glue
# The dispatch point (nanoopt.kernels) runs the AVX2 GEMM of nanoopt.kernels.avx2 inside these Numba
# drivers. Each driver calls one int8 kernel by its own name -- the plain AVX2 one or the AVX-VNNI one, never
# the alias avx2.gemm_s8s8s32_into: Numba's cache keys a function on its own code and the target CPU, not on
# what the globals it names were bound to, so a cached driver that called the alias would keep the kernel of
# the process that compiled it (and a process with VNNI masked would run VNNI code). A dispatcher passed as an
# argument would defeat the cache. The drivers compile only when first called, which happens only where
# avx2.available() (and, for the vnni_* ones, avx2.KERNEL_S8 == "avx-vnni"): elsewhere they never compile.
@njit(cache=True, parallel=True)
def avx2_s8_rows_parallel(a, panels, n, k, out, rows_per_item):
    """The plain AVX2 int8 GEMM on row blocks of ``a`` in parallel (each block is C-contiguous)."""
    for item in prange((a.shape[0] + rows_per_item - 1) // rows_per_item):
        lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, a.shape[0])
        avx2.gemm_s8s8s32_avx2_into(a[lo:hi], panels, n, k, out[lo:hi])


@njit(cache=True, parallel=True)
def vnni_s8_rows_parallel(a, panels, n, k, out, rows_per_item):
    """The AVX-VNNI int8 GEMM on row blocks of ``a`` in parallel."""
    for item in prange((a.shape[0] + rows_per_item - 1) // rows_per_item):
        lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, a.shape[0])
        avx2.gemm_s8s8s32_vnni_into(a[lo:hi], panels, n, k, out[lo:hi])


@njit(cache=True, parallel=True)
def avx2_s16_rows_parallel(a, panels, n, k, out, rows_per_item):
    """The AVX2 int16 x int8 GEMM on row blocks of ``a`` in parallel."""
    for item in prange((a.shape[0] + rows_per_item - 1) // rows_per_item):
        lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, a.shape[0])
        avx2.gemm_s16s8s64_into(a[lo:hi], panels, n, k, out[lo:hi])


@njit(cache=True)
def _external_conv_block(padded, item, conv):
    """The im2col rows of one 256-pixel work item of an int8 conv, an int32 buffer for their products, the
    item's group and its epilogue geometry."""
    groups, channels, per_group, pixels = conv[0], conv[1], conv[2], conv[10]
    blocks = (pixels + EXTERNAL_PIXELS - 1) // EXTERNAL_PIXELS
    n, group = item // (groups * blocks), (item // blocks) % groups
    p_lo = (item % blocks) * EXTERNAL_PIXELS
    rows = min(p_lo + EXTERNAL_PIXELS, pixels) - p_lo
    cols = np.empty((rows, conv[3] * conv[4] * channels), dtype=np.int8)
    _im2col_rows(padded, 0, n, group * channels, channels, conv, p_lo, rows, cols)
    products = np.empty((rows, per_group), dtype=np.int32)
    return cols, products, group, (n, group * per_group, per_group, p_lo, CONV_PIXEL_MAJOR)


@njit(cache=True)
def _avx2_conv_item(padded, panels, item, conv, epilogue, out3):
    """One 256-pixel block of an int8 conv: Numba im2col -> plain AVX2 product -> Numba epilogue into NCHW."""
    cols, products, group, geometry = _external_conv_block(padded, item, conv)
    avx2.gemm_s8s8s32_avx2_into(cols, panels[group], products.shape[1], cols.shape[1], products)
    _epilogue_block(products.reshape(-1), products.shape[0], products.shape[1], 0, 0, epilogue, geometry, out3)


@njit(cache=True)
def _vnni_conv_item(padded, panels, item, conv, epilogue, out3):
    """The same block with the AVX-VNNI product."""
    cols, products, group, geometry = _external_conv_block(padded, item, conv)
    avx2.gemm_s8s8s32_vnni_into(cols, panels[group], products.shape[1], cols.shape[1], products)
    _epilogue_block(products.reshape(-1), products.shape[0], products.shape[1], 0, 0, epilogue, geometry, out3)


@njit(cache=True)
def avx2_conv_serial(padded, panels, items, conv, epilogue, out3):
    for item in range(items):
        _avx2_conv_item(padded, panels, item, conv, epilogue, out3)


@njit(cache=True, parallel=True)
def avx2_conv_parallel(padded, panels, items, conv, epilogue, out3):
    for item in prange(items):
        _avx2_conv_item(padded, panels, item, conv, epilogue, out3)


@njit(cache=True)
def vnni_conv_serial(padded, panels, items, conv, epilogue, out3):
    for item in range(items):
        _vnni_conv_item(padded, panels, item, conv, epilogue, out3)


@njit(cache=True, parallel=True)
def vnni_conv_parallel(padded, panels, items, conv, epilogue, out3):
    for item in prange(items):
        _vnni_conv_item(padded, panels, item, conv, epilogue, out3)


def external_s8_drivers(kernel: str) -> tuple:
    """``(rows_parallel, conv_serial, conv_parallel)``: the drivers around the int8 GEMM ``kernel``
    (``avx2.KERNEL_S8``: ``"avx2"`` or ``"avx-vnni"``). Nothing is compiled until a driver is called.

    >>> external_s8_drivers("avx2")[0] is avx2_s8_rows_parallel
    True
    """
    if kernel == "avx2":
        return avx2_s8_rows_parallel, avx2_conv_serial, avx2_conv_parallel
    if kernel == "avx-vnni":
        return vnni_s8_rows_parallel, vnni_conv_serial, vnni_conv_parallel
    raise ValueError(f"kernel must be 'avx2' or 'avx-vnni', got {kernel!r}")


# ------------------------------------------------------------------------------------------- pools
@njit(cache=True)
def _max_pool(x, kernel, stride, padding, out):
    height, width = x.shape[2], x.shape[3]
    for plane in range(out.shape[0] * out.shape[1]):
        n, c = plane // out.shape[1], plane % out.shape[1]
        for y in range(out.shape[2]):
            for xx in range(out.shape[3]):
                best = x[n, c, max(y * stride[0] - padding[0], 0), max(xx * stride[1] - padding[1], 0)]
                for i in range(kernel[0]):
                    row = y * stride[0] - padding[0] + i
                    if 0 <= row < height:
                        for j in range(kernel[1]):
                            column = xx * stride[1] - padding[1] + j
                            if 0 <= column < width and x[n, c, row, column] > best:
                                best = x[n, c, row, column]
                out[n, c, y, xx] = best


def quantized_max_pool2d(x_q: np.ndarray, kernel_size, stride=None, padding=0) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.quantized_max_pool2d`.

    >>> quantized_max_pool2d(np.arange(16, dtype=np.int8).reshape(1, 1, 4, 4), 2)[0, 0]
    array([[ 5,  7],
           [13, 15]], dtype=int8)
    """
    kernel, stride, padding, out_h, out_w = ref.check_pool_args(x_q, kernel_size, stride, padding)
    out = np.empty(x_q.shape[:2] + (out_h, out_w), dtype=x_q.dtype)
    _max_pool(x_q, kernel, stride, padding, out)
    return out


@njit(cache=True)
def _avg_pool(x, zero_point, kernel, stride, padding, count_include_pad, out):
    height, width = x.shape[2], x.shape[3]
    for plane in range(out.shape[0] * out.shape[1]):
        n, c = plane // out.shape[1], plane % out.shape[1]
        for y in range(out.shape[2]):
            for xx in range(out.shape[3]):
                total = np.int64(0)
                count = np.int64(kernel[0] * kernel[1])
                inside = np.int64(0)
                for i in range(kernel[0]):
                    row = y * stride[0] - padding[0] + i
                    for j in range(kernel[1]):
                        column = xx * stride[1] - padding[1] + j
                        if 0 <= row < height and 0 <= column < width:
                            total += np.int64(x[n, c, row, column]) - zero_point
                            inside += 1
                if not count_include_pad:
                    count = inside
                half = count // 2
                rounded = (total + half) // count if total >= 0 else -((-total + half) // count)
                out[n, c, y, xx] = rounded + zero_point


def quantized_avg_pool2d(
    x_q: np.ndarray, zero_point: int, kernel_size, stride=None, padding=0, count_include_pad: bool = True
) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.quantized_avg_pool2d`.

    >>> x = np.array([[[[1, 2], [3, 5]]]], np.int8)
    >>> quantized_avg_pool2d(x, 0, 2)[0, 0]
    array([[3]], dtype=int8)
    """
    kernel, stride, padding, out_h, out_w = ref.check_pool_args(x_q, kernel_size, stride, padding)
    zp = ref.check_int(zero_point, "zero_point", *ref.activation_range(x_q.dtype))
    out = np.empty(x_q.shape[:2] + (out_h, out_w), dtype=x_q.dtype)
    _avg_pool(x_q, zp, kernel, stride, padding, bool(count_include_pad), out)
    return out


# ------------------------------------------------------------------------------------------ add, relu
@njit(cache=True)
def _add(a, b, left_shift, a_params, b_params, out_params, out):
    a_zp, m_a, s_a = a_params
    b_zp, m_b, s_b = b_params
    out_zp, m_out, s_out, low, high = out_params
    for index in range(a.size):
        shifted_a = (np.int64(a[index]) - a_zp) << left_shift
        shifted_b = (np.int64(b[index]) - b_zp) << left_shift
        total = _multiply_int32(shifted_a, m_a, s_a) + _multiply_int32(shifted_b, m_b, s_b)
        value = _multiply_int32(total, m_out, s_out) + out_zp
        out[index] = min(max(value, low), high)


def quantized_add(
    a_q: np.ndarray,
    a_scale,
    a_zp: int,
    b_q: np.ndarray,
    b_scale,
    b_zp: int,
    out_scale,
    out_zp: int,
    spec: QuantSpec,
    relu: bool = False,
) -> np.ndarray:
    """Numba version of :func:`nanoopt.kernels.reference.quantized_add`.

    >>> a = np.array([10, -20], np.int8); b = np.array([4, 4], np.int8)
    >>> quantized_add(a, 0.5, 0, b, 0.25, 0, 0.5, 0, QuantSpec())
    array([ 12, -18], dtype=int8)
    """
    a_zp, b_zp, out_zp = ref.check_add_args(a_q, a_zp, b_q, b_zp, out_zp, spec)
    left_shift, (m_a, s_a), (m_b, s_b), (m_out, s_out) = ref.add_multipliers(a_scale, b_scale, out_scale, spec)
    low = max(spec.qmin, out_zp) if relu else spec.qmin
    out = np.empty(a_q.shape, dtype=spec.dtype)
    _add(a_q.reshape(-1), b_q.reshape(-1), np.int64(left_shift), (np.int64(a_zp), np.int64(m_a), np.int64(s_a)),
         (np.int64(b_zp), np.int64(m_b), np.int64(s_b)),
         (np.int64(out_zp), np.int64(m_out), np.int64(s_out), np.int64(low), np.int64(spec.qmax)),
         out.reshape(-1))  # fmt: skip
    return out


def quantized_relu(x_q: np.ndarray, zero_point: int) -> np.ndarray:
    """Same as :func:`nanoopt.kernels.reference.quantized_relu`: NumPy's ``maximum`` is already one
    vectorised pass, so there is no separate compiled kernel.

    >>> quantized_relu(np.array([-5, 3, 9], np.int8), 3)
    array([3, 3, 9], dtype=int8)
    """
    return ref.quantized_relu(x_q, zero_point)
