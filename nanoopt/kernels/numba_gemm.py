"""The portable int8 GEMM: Numba register tiles over int8 parts, blocked and threaded, with the epilogue fused.

Computes ``sum_k a[m, k] w[n, k]`` exactly for int8 or int16 operands (the integer product of Jacob et al. 2018,
eq. 7), bit-identical to :func:`nanoopt.kernels.reference.gemm_s8s8s32` and its 16-bit siblings. What makes it
fast, in the order the code runs:

* **Dot-product register tiles.** Weights stay in PyTorch layout ``(N, K)`` (already "B transposed": each
  output channel's K values are contiguous), padded once to a multiple of 8 rows (:func:`pack_weights`).
  A 4x4 tile keeps 16 int32 accumulators ``c_rc += int32(a[i+r, k]) * int32(w[j+c, k])``; every
  accumulate is wrapped in ``np.int32(...)`` so LLVM vectorises the K loop in 32-bit lanes. Leftover rows
  use a 1x8 tile. Each tile runs over the whole K: ``|a * w| <= 2^14`` and ``K <= MAX_FUSED_K = 131071``
  keep every int32 sum exact; there is no K blocking (why: ``docs/kernels.md``).
* **Only int8 x int8 tiles.** An int16 operand is split into two int8 "bytes",
  ``v = 256 * high + low + 128`` with ``high = v >> 8`` and ``low = (v & 255) - 128`` (:func:`split_bytes`);
  16x8 runs two passes (``256 T(a_hi, w) + T(a_lo, w)``, :func:`byte_passes`), 16x16 four. The ``+ 128`` terms
  are sums of whole rows, added in the epilogue (:func:`channel_correction`). Passes accumulate into an int64
  block buffer.
* **Zero point folded.** ``sum_k (x - x_zp) w = x @ w.T - x_zp * rowsum(w)``: row sums are computed once
  per weight (Jacob et al. 2018, eq. 8) and become per-channel offsets of the epilogue
  (:mod:`nanoopt.kernels.numba_epilogue`), run once per 64x64 block.
* **Blocking and threads.** Output blocks of 64 rows x 64 channels (an A block and a weight block stay in
  L2, one 8-row weight panel in L1) are the work items of a ``prange`` when the product is large enough
  (``PARALLEL_MIN_OPS``) and ``numba.get_num_threads() > 1`` (:func:`use_threads`).

Every kernel compiles for one set of argument types whatever the precision mode (all operands are int8 parts),
with ``cache=True``. :func:`gemm_products` is the raw product for validated arguments; the checked entry points
are the dispatchers :func:`nanoopt.kernels.gemm_s8s8s32` / :func:`nanoopt.kernels.prepare_gemm`.

>>> packed = pack_weights(np.array([[3, 4], [-1, 0]], np.int8))
>>> gemm_products(np.array([[1, 2]], np.int8), packed, 1, np.int32)
array([[4, 0]], dtype=int32)
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from nanoopt.kernels import reference as ref
from nanoopt.kernels.numba_epilogue import CONV_CHANNEL_MAJOR, LINEAR, epilogue_block, raw_tail

__all__ = [
    "MAX_FUSED_K",
    "PackedWeights",
    "byte_passes",
    "channel_correction",
    "gemm_block",
    "gemm_parallel",
    "gemm_products",
    "gemm_serial",
    "linear_offsets",
    "pack_weights",
    "run_linear",
    "split_bytes",
    "use_threads",
]

TILE_ROWS = 4  # rows of A per register tile
TILE_COLUMNS = 4  # weight rows (output channels) per register tile
PANEL = 8  # weights are padded to a multiple of this many rows (two 4x4 tiles or one 1x8 tile)
BLOCK_ROWS = 64  # rows of A per cache block / parallel work item
BLOCK_COLUMNS = 64  # output channels per cache block / parallel work item
MAX_FUSED_K = 131071  # longest reduction of the compiled tiles: 131071 * 128 * 128 < 2^31
PARALLEL_MIN_OPS = 2**23  # 2*M*N*K below this runs single-threaded (a parallel launch's cost: docs/kernels.md)
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


def int8_parts(values: np.ndarray) -> np.ndarray:
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


def pad_rows(parts: np.ndarray, rows: int) -> np.ndarray:
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
    parts = pad_rows(int8_parts(w_q), rows)
    return PackedWeights(w_q, parts, w_q.sum(axis=1, dtype=np.int64), positive, negative)


def as_packed(w_q) -> PackedWeights:
    return w_q if isinstance(w_q, PackedWeights) else pack_weights(w_q)


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



@njit(cache=True)
def gemm_block(operands, epilogue, geometry, out3, i_lo, i_hi, j_lo, j_hi):
    """Block rows ``[i_lo, i_hi)`` x weight rows ``[j_lo, j_hi)`` (a multiple of 8): every pass of tiles
    into an int64 buffer (row-major for linear, channel-major for conv), then :func:`epilogue_block`."""
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
    epilogue_block(buffer, rows, columns, i_lo, j_lo, epilogue, geometry, out3)


@njit(cache=True)
def gemm_serial(operands, epilogue, geometry, out3):
    rows, padded_columns = operands[0].shape[1], operands[1].shape[1]
    for i_lo in range(0, rows, BLOCK_ROWS):
        for j_lo in range(0, padded_columns, BLOCK_COLUMNS):
            i_hi, j_hi = min(i_lo + BLOCK_ROWS, rows), min(j_lo + BLOCK_COLUMNS, padded_columns)
            gemm_block(operands, epilogue, geometry, out3, i_lo, i_hi, j_lo, j_hi)


@njit(cache=True, parallel=True)
def gemm_parallel(operands, epilogue, geometry, out3):
    rows, padded_columns = operands[0].shape[1], operands[1].shape[1]
    row_blocks = (rows + BLOCK_ROWS - 1) // BLOCK_ROWS
    column_blocks = (padded_columns + BLOCK_COLUMNS - 1) // BLOCK_COLUMNS
    for item in prange(row_blocks * column_blocks):
        i_lo = (item // column_blocks) * BLOCK_ROWS
        j_lo = (item % column_blocks) * BLOCK_COLUMNS
        i_hi, j_hi = min(i_lo + BLOCK_ROWS, rows), min(j_lo + BLOCK_COLUMNS, padded_columns)
        gemm_block(operands, epilogue, geometry, out3, i_lo, i_hi, j_lo, j_hi)


def use_threads(ops: int) -> bool:
    return numba.get_num_threads() > 1 and ops >= PARALLEL_MIN_OPS


# ------------------------------------------------------------------------------ argument preparation
def byte_passes(a_parts: int, w_parts: int) -> np.ndarray:
    """``(a part, w part, scale)`` per pass: ``sum A'W' = sum_passes scale * T(a part, w part)``."""
    rows = [
        (pa, pw, 256 ** ((a_parts - 1 - pa) + (w_parts - 1 - pw))) for pa in range(a_parts) for pw in range(w_parts)
    ]
    return np.array(rows, dtype=np.int64)


def channel_correction(a_split: bool, w_split: bool, w_row_sums: np.ndarray, depth: int) -> np.ndarray:
    """Per-channel ``+ 128`` terms of the byte split (the per-row one, ``128 [w split] rowsum(a)``, depends
    on the input and is added by the kernels).

    With ``a = a' + 128 [a split]`` and ``w = w' + 128 [w split]``: ``sum_k a w = sum_k a' w'
    + 128 [w split] rowsum(a) + 128 [a split] rowsum(w) - 128^2 K [a split][w split]``.
    """
    return BYTE_OFFSET * w_row_sums * a_split - BYTE_OFFSET**2 * depth * (a_split and w_split)


def run_linear(x_q: np.ndarray, packed: PackedWeights, offsets: np.ndarray, tail, out: np.ndarray, passes=None):
    """All passes of ``x_q (M, K) @ packed.T`` with the epilogue into ``out (M, N)`` (K <= MAX_FUSED_K).

    ``offsets`` must already hold the per-channel byte-split terms (:func:`linear_offsets`); ``passes``
    may be given when cached."""
    a_parts = int8_parts(x_q)
    if passes is None:
        passes = byte_passes(a_parts.shape[0], packed.parts.shape[0])
    if packed.parts.shape[0] == 2:  # int16 weights: the per-row byte-split term
        row_offsets = x_q.sum(axis=1, dtype=np.int64) * BYTE_OFFSET
    else:
        row_offsets = np.zeros(x_q.shape[0], np.int64)
    operands = (a_parts, packed.parts, passes)
    epilogue = (offsets, row_offsets) + tail
    geometry = (0, 0, packed.n, 0, LINEAR)
    out3 = out.reshape(out.shape + (1,))
    if use_threads(2 * x_q.shape[0] * packed.parts.shape[1] * x_q.shape[1] * passes.shape[0]):
        gemm_parallel(operands, epilogue, geometry, out3)
    else:
        gemm_serial(operands, epilogue, geometry, out3)


def linear_offsets(offsets: np.ndarray, x_dtype, packed: PackedWeights) -> np.ndarray:
    """``offsets`` plus the per-channel byte-split terms for activations of ``x_dtype``."""
    return offsets + channel_correction(x_dtype == np.int16, packed.parts.shape[0] == 2, packed.row_sums, packed.k)


def gemm_products(a: np.ndarray, packed: PackedWeights, a_zp: int, out_dtype) -> np.ndarray:
    out = np.empty((a.shape[0], packed.n), dtype=np.int64)
    run_linear(a, packed, linear_offsets(-a_zp * packed.row_sums, a.dtype, packed), raw_tail(packed.n), out)
    return out.astype(out_dtype, copy=False)

