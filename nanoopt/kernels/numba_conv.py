"""int8/int16 convolution on the portable GEMM: zero-point-padded NHWC copy, im2col by pixel blocks, the GEMM
tiles writing NCHW directly; and the direct loop for too few output channels per group.

Convolution (cross-correlation, PyTorch semantics) as a GEMM (Chellapilla et al. 2006, "High performance
convolutional neural networks for document processing"): ``acc[n, o, p] = sum_{(i, j, c)} cols[p, (i, j, c)]
w[o, (i, j, c)]`` over the patch of output pixel ``p``, K in ``(kh, kw, c)`` order so that each patch row is a
contiguous channel run of the NHWC copy (copied with unsigned offsets so that LLVM vectorises them). Work items are
(image, group, 64-pixel block), in parallel above ``PARALLEL_MIN_OPS``. Convolutions with fewer than 4 output
channels per group (depthwise) run :func:`conv_direct`, one int64 accumulator row per output plane. The padding
holds the input zero point, so it adds nothing. Reference: :func:`nanoopt.kernels.reference.quantized_conv2d`;
the plan that chooses among the algorithms is :class:`nanoopt.kernels.numba_cpu.Conv2dPlan`.

>>> pack_conv2d_weights(np.ones((4, 2, 3, 3), np.int8), groups=2).parts.shape
(2, 1, 8, 18)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from nanoopt.kernels import reference as ref
from nanoopt.kernels.numba_epilogue import CONV_CHANNEL_MAJOR, finish_value
from nanoopt.kernels.numba_gemm import BYTE_OFFSET, PANEL, gemm_block, int8_parts, pad_rows

__all__ = [
    "CONV_PIXELS",
    "EXTERNAL_PIXELS",
    "PackedConv2d",
    "conv_direct",
    "conv_parallel",
    "conv_serial",
    "im2col_rows",
    "pack_conv2d_weights",
    "pad_nhwc",
]

CONV_PIXELS = 64  # output pixels per im2col block in conv2d
EXTERNAL_PIXELS = 256  # output pixels per block when the product comes from another GEMM (the AVX2 one)


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
    parts = np.stack([pad_rows(int8_parts(np.ascontiguousarray(matrix)), rows) for matrix in reordered])
    positive, negative = ref.weight_sign_sums(w_q)
    row_sums = w_q.reshape(out_channels, -1).sum(axis=1, dtype=np.int64)
    return PackedConv2d(w_q, groups, parts, row_sums, positive, negative)


@njit(cache=True, inline="always")
def im2col_rows(padded, part, n, c_lo, channels, conv, p_lo, rows, cols):
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
    # Unsigned offsets: Numba then skips its negative-index fix-up and LLVM vectorises the copies (docs/kernels.md).
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
def pad_nhwc(x, zero_point, pad_h, pad_w, padded):
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
        im2col_rows(padded, part, n, c_lo, channels, conv, p_lo, rows, cols[part])
    row_offsets = np.zeros(rows, dtype=np.int64)
    if w_parts.shape[1] == 2:  # byte-split term of int16 weights: 128 * rowsum(a), a = 256 hi + lo + 128
        for r in range(rows):
            total = np.int64(0)
            for k in range(depth):
                total += 256 * np.int64(cols[0, r, k]) + np.int64(cols[1, r, k]) + BYTE_OFFSET
            row_offsets[r] = BYTE_OFFSET * total
    block_epilogue = (epilogue[0], row_offsets) + epilogue[2:]
    geometry = (n, group * per_group, per_group, p_lo, CONV_CHANNEL_MAJOR)
    gemm_block((cols, w_parts[group], passes), block_epilogue, geometry, out3, 0, rows, 0, w_parts.shape[2])


@njit(cache=True)
def conv_serial(padded, w_parts, passes, items, conv, epilogue, out3):
    for item in range(items):
        _conv_item(padded, w_parts, passes, item, conv, epilogue, out3)


@njit(cache=True, parallel=True)
def conv_parallel(padded, w_parts, passes, items, conv, epilogue, out3):
    for item in prange(items):
        _conv_item(padded, w_parts, passes, item, conv, epilogue, out3)



def conv_direct(padded, weight, per_group, sh, sw, dh, dw, epilogue, out4):
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
                out4[n, o, y, xx] = finish_value(acc[xx] + offsets[o], o, epilogue)


