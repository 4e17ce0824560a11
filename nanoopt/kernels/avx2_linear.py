"""One int8 linear layer on AVX2 with the requantization done in the register tiles: no int32 product matrix.

Computes ``out = clip(RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x @ W.T + o, m0), shift) + zp, low,
high)`` as int8 (M, N), the integer linear layer of Jacob et al. 2018 (eq. 7 for the product, the per-channel offset
``o = bias - x_zp * rowsum(W)`` of eq. 8, eq. 6 for the fixed-point multiplier), for int8 codes ``x`` (M, K) and the
packed narrow-range int8 weights of :func:`nanoopt.kernels.avx2.pack_weights_s8`, with the constants of
:func:`nanoopt.kernels.avx512.requant_s8` (the layer's "fast" epilogue: every ``product + offset`` fits int32).

The register tiles are those of the AVX2 GEMM (:func:`nanoopt.kernels.avx2._tile`: 4 rows x 16 channels, the
7-bit or the sign-mask multiply-add); what differs is around them:

* the accumulators start at the layer's offsets (plus ``-64`` times the panel's row sums for the 7-bit tile, plus
  the row's correction for the sign mask), so that after the last K step they hold the sums the epilogue
  requantizes;
* they are requantized where they are, eight lanes at a time (:func:`nanoopt.kernels.avx2_requant.requantize_lanes`,
  the same 32-bit-lane arithmetic as :func:`~nanoopt.kernels.avx2_requant.requantize_rows_s8`), and stored as eight
  bytes; the right edge of a partial last panel lane by lane. The int32 products are never written and read back.
* the activations are prepared by the vector passes of :mod:`nanoopt.kernels.avx2_operands`.

This needs the whole K in one block (``K <= avx2.S8_BLOCK_K``, 4096; longer K is refused: the callers run the GEMM,
then :func:`~nanoopt.kernels.avx2_requant.requantize_rows_s8`, the same codes). The products are exact and the
requantization is the specification's, so the result equals :func:`nanoopt.kernels.avx512.linear_s8_reference` and
:func:`nanoopt.kernels.reference.quantized_linear` bit for bit (``tests/kernels/test_avx2_linear.py``). Speed:
``docs/kernels.md``. Call only where :func:`nanoopt.kernels.avx2.available` (compiling for a target without AVX2
aborts the process).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir

from nanoopt.kernels import avx2
from nanoopt.kernels.avx2 import (
    AVX2_ROWS,
    PANEL_COLUMNS,
    ROW_BLOCK,
    S8_BLOCK_K,
    S8_GROUP,
    S8_STEP,
    SEVEN_BIT,
    SIGN_MASK,
    VECTORS_PER_TILE,
    _lane,
    _load,
    _tile,
    _times,
)
from nanoopt.kernels.avx2_operands import seven_bit_codes, sign_split
from nanoopt.kernels.avx2_requant import requantize_lanes, store_codes
from nanoopt.kernels.llvm_intrinsics import LANES, int32x8, lanewise

__all__ = ["linear_s8_avx2_7bit_into", "linear_s8_avx2_auto_into", "linear_s8_avx2_into"]

_add = lanewise("_add", int32x8, ir.IRBuilder.add, "Lane-wise int32 sum, modulo 2**32.")


@numba.njit(cache=True, _nrt=False, inline="always")
def _write_codes(out, row, col, n, tile, m0, shift, zero, below, above):
    """The int8 codes of a tile of ``len(tile) // 2`` rows x 16 channels (its sums, offsets included) at ``out[row:,
    col:]``, clipped at column ``n``."""
    for r in range(len(tile) // VECTORS_PER_TILE):
        start = (row + r) * n
        for half in range(VECTORS_PER_TILE):
            c = col + half * LANES
            if c < n:
                codes = requantize_lanes(tile[VECTORS_PER_TILE * r + half], m0, shift, c, zero, below, above)
                if c + LANES <= n:
                    store_codes(out, start + c, codes)
                else:
                    for lane in range(n - c):
                        out[row + r, c + lane] = _lane(codes, lane)


@numba.njit(cache=True, _nrt=False)
def _fused_product(kind, rows, a, a_abs, panels, n, groups, padded_k, footer_scale, row_starts, requant, out):
    """``out = codes(a @ W.T + offsets)`` by row blocks x panels of ``kind`` register tiles of ``rows`` (<= 4) rows,
    then 2 and 1 rows for what is left, the whole K (``groups`` steps) in one block. ``a``, ``a_abs``,
    ``footer_scale`` and ``row_starts`` as in :func:`nanoopt.kernels.avx2._blocked_product`."""
    numba.literally(kind)
    numba.literally(rows)
    offsets, m0, shift = requant[0], requant[1], requant[2]
    zero = np.int32(requant[3])
    below, above = np.int32(requant[4] - requant[3]), np.int32(requant[5] - requant[3])
    add_rows = row_starts.shape[0] > 0
    panel_size = (groups + 1) * S8_STEP  # the panels end with the row-sum footer
    m = a.shape[0]
    for i0 in range(0, m, ROW_BLOCK):
        i1 = min(m, i0 + ROW_BLOCK)
        for p in range(panels.shape[0]):
            col = p * PANEL_COLUMNS
            w_offset = p * panel_size
            footer = w_offset + groups * S8_STEP
            start0 = _add(_load(offsets, col), _times(_load(panels, footer), footer_scale))
            start1 = _add(_load(offsets, col + LANES), _times(_load(panels, footer + 32), footer_scale))
            i = i0
            while i + rows <= i1:
                tile = _tile(kind, rows, a, a_abs, i * padded_k, padded_k, panels, w_offset, groups, start0, start1,
                             row_starts, i, add_rows)  # fmt: skip
                _write_codes(out, i, col, n, tile, m0, shift, zero, below, above)
                i += rows
            if i + 2 <= i1:  # the rows left below a 4-row tile: 2 + 1, 2, 1
                tile2 = _tile(kind, 2, a, a_abs, i * padded_k, padded_k, panels, w_offset, groups, start0, start1,
                              row_starts, i, add_rows)  # fmt: skip
                _write_codes(out, i, col, n, tile2, m0, shift, zero, below, above)
                i += 2
            if i < i1:
                tile1 = _tile(kind, 1, a, a_abs, i * padded_k, padded_k, panels, w_offset, groups, start0, start1,
                              row_starts, i, add_rows)  # fmt: skip
                _write_codes(out, i, col, n, tile1, m0, shift, zero, below, above)


@numba.njit(cache=True)
def _check(x, panels, n, k, requant, products, out):
    """Raise ValueError unless the shapes fit (as :func:`nanoopt.kernels.avx2.gemm_s8s8s32_avx2_into`, ``products``
    (M, n) and ``out`` (M, n), the constants in whole panels) and K fits one block; return the number of 4-value
    groups of K."""
    groups = avx2._check_s8_arguments(x, panels, n, k, products)
    padded_n = (n + PANEL_COLUMNS - 1) // PANEL_COLUMNS * PANEL_COLUMNS
    if requant[0].shape[0] < padded_n or requant[1].shape[0] < padded_n or requant[2].shape[0] < padded_n:
        raise ValueError("linear_s8_avx2_into: the requantization vectors need ceil(n/16)*16 entries")
    if out.shape[0] != x.shape[0] or out.shape[1] != n:
        raise ValueError("linear_s8_avx2_into: out must have shape (x.shape[0], n)")
    if groups * S8_GROUP > S8_BLOCK_K:
        raise ValueError("linear_s8_avx2_into: K > S8_BLOCK_K (4096) does not fit the tiles' one K block; use the "
                         "GEMM, then requantize_rows_s8 (x86_glue.linear_s8_requant_driver with fused=False)")
    return groups


AUTO = -1  # the kind of _layer that chooses the 7-bit or the sign-mask tile per call, from the codes


@numba.njit(inline="always")
def _layer(kind, x, panels, n, k, requant, products, out):
    """The layer of ``kind`` (a constant where it is inlined): SIGN_MASK, SEVEN_BIT (codes outside [-64, 63]
    refused) or AUTO. K = 0 runs too: tiles of no step requantize the offsets."""
    groups = _check(x, panels, n, k, requant, products, out)
    padded_k = groups * S8_GROUP
    if kind != SIGN_MASK:
        shifted, fits = seven_bit_codes(x, padded_k)  # (M, K padded), x + 64 as unsigned bytes
        if fits:
            _fused_product(SEVEN_BIT, AVX2_ROWS, shifted, shifted, panels, n, groups, padded_k, -64,
                           np.empty(0, np.int32), requant, out)  # fmt: skip
            return
        if kind == SEVEN_BIT:
            raise ValueError("linear_s8_avx2_7bit_into: x has codes outside [-64, 63]; use linear_s8_avx2_into (any "
                             "int8 codes) or linear_s8_avx2_auto_into")
    masks, magnitudes, starts = sign_split(x, padded_k)  # (M, K padded) x 2, (M,)
    _fused_product(SIGN_MASK, AVX2_ROWS, masks, magnitudes, panels, n, groups, padded_k, 0, starts, requant, out)


@numba.njit(cache=True)
def linear_s8_avx2_into(x: np.ndarray, panels: np.ndarray, n: int, k: int, requant: tuple, products: np.ndarray,
                        out: np.ndarray) -> None:  # fmt: skip
    """One int8 linear layer, any int8 codes ``x``: the sign-mask tile (4 instructions per 32 products), requantized
    in registers. ``x`` int8 (M, K) C-contiguous; ``panels = pack_weights_s8(W).panels``; ``requant =
    avx512.requant_s8(offsets, m0, shift, zero_point, low, high)``; ``products`` an int32 (M, N) array (its shape
    checked, its values not used); ``out`` int8 (M, N), overwritten. K at most ``avx2.S8_BLOCK_K`` (ValueError).

    >>> from nanoopt.kernels.avx512 import linear_s8_reference, requant_s8
    >>> w, x = np.array([[2, 1], [-1, 4]], np.int8), np.array([[-128, -3]], np.int8)
    >>> requant = requant_s8(np.array([1, 0]), np.array([2**30, 2**30]), np.array([0, 0]), 0, -128, 127)
    >>> out, scratch = np.empty((1, 2), np.int8), np.empty((1, 2), np.int32)
    >>> if avx2.available(): linear_s8_avx2_into(x, avx2.pack_weights_s8(w).panels, 2, 2, requant, scratch, out)
    ... else: out[:] = linear_s8_reference(x, w, requant)
    >>> out
    array([[-128,   58]], dtype=int8)
    """
    _layer(SIGN_MASK, x, panels, n, k, requant, products, out)


@numba.njit(cache=True)
def linear_s8_avx2_7bit_into(x: np.ndarray, panels: np.ndarray, n: int, k: int, requant: tuple, products: np.ndarray,
                             out: np.ndarray) -> None:  # fmt: skip
    """:func:`linear_s8_avx2_into` for codes ``x`` in [-64, 63] (7-bit activations): the 3-instruction tile on ``x +
    64`` (:func:`nanoopt.kernels.avx2.gemm_s8s8s32_avx2_7bit_into`); a code outside is refused (``ValueError``).

    >>> from nanoopt.kernels.avx512 import requant_s8
    >>> codes, weights = np.array([[63, -64, 5]], np.int8), np.array([[1, 1, 2], [127, 127, -127]], np.int8)
    >>> constants = requant_s8(np.zeros(2), np.full(2, 2**30), np.array([0, 3]), 0, 0, 127)  # x / 2, x / 16; ReLU
    >>> result = np.zeros((1, 2), np.int8)
    >>> _ = avx2.available() and linear_s8_avx2_7bit_into(codes, avx2.pack_weights_s8(weights).panels, 2, 3,
    ...                                                   constants, np.empty((1, 2), np.int32), result)
    >>> result.tolist() if avx2.available() else [[5, 0]]  # 9 / 2 rounds to 5; -762 / 16 clamps to 0
    [[5, 0]]
    """
    _layer(SEVEN_BIT, x, panels, n, k, requant, products, out)


@numba.njit(cache=True)
def linear_s8_avx2_auto_into(x: np.ndarray, panels: np.ndarray, n: int, k: int, requant: tuple,
                             products: np.ndarray, out: np.ndarray) -> None:  # fmt: skip
    """:func:`linear_s8_avx2_into` with the tile chosen per call from the codes of ``x``: the 7-bit tile when every
    code lies in [-64, 63], else the sign mask (the check is the pass that prepares the 7-bit operand, stopped at the
    first row with a code outside). Same arguments and result.

    >>> from nanoopt.kernels.avx512 import linear_s8_reference, requant_s8
    >>> w = np.array([[3, -1, 2]], np.int8)
    >>> constants = requant_s8(np.array([10]), np.array([2**30]), np.array([1]), -5, -128, 127)
    >>> for row in ([1, 2, 3], [-128, 2, 3]):  # the 7-bit tile, then the sign mask
    ...     x, out = np.array([row], np.int8), np.empty((1, 1), np.int8)
    ...     if avx2.available(): linear_s8_avx2_auto_into(x, avx2.pack_weights_s8(w).panels, 1, 3, constants,
    ...                                                   np.empty((1, 1), np.int32), out)
    ...     else: out[:] = linear_s8_reference(x, w, constants)
    ...     print(int(out[0, 0]))
    0
    -98
    """
    _layer(AUTO, x, panels, n, k, requant, products, out)
