"""The direct "thin" int8 convolution: tap sums over a zero-point-padded NCHW plane, no im2col.

For a layer with few taps per output (``IC/groups * KH * KW <= THIN_MAX_DEPTH``) or few output channels per
group, copying patches into columns costs more than the products. Here the output plane of channel ``o`` is

    ``acc[y, x] = sum_t weights[o, t] * plane[base + y sh W + x sw + offsets[t]]``

over the taps ``t = (c kh + i) kw + j`` with flat offsets ``c H W + i dh W + j dw`` (:func:`thin_conv_taps`),
four taps per pass over a contiguous row of accumulators (vectorised loads; int32 is exact: ``|x w| <= 2^14``
and at most ``MAX_FUSED_K`` taps); then the epilogue of :mod:`nanoopt.kernels.numba_epilogue`. Reference:
:func:`nanoopt.kernels.reference.quantized_conv2d`. When it is chosen, and the timings behind the choice:
:class:`nanoopt.kernels.numba_cpu.Conv2dPlan` and ``docs/kernels.md``.

>>> offsets, weights = thin_conv_taps(np.ones((2, 1, 1, 2), np.int8), 4, 5, (1, 1))
>>> offsets, weights.shape
(array([0, 1, 0, 0]), (2, 4))
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from nanoopt.kernels.numba_epilogue import finish_pixels, max_pool_planes

__all__ = ["THIN_MAX_DEPTH", "THIN_TAPS", "thin_conv_parallel", "thin_conv_serial", "thin_conv_taps"]

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
    flat index with ``//`` and ``%`` (why: ``docs/kernels.md``)."""
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
def _thin_conv_image(x, n, zero_point, geometry, offsets, weights, epilogue, source, acc, planes, no_row_offsets,
                     out4):
    """Image ``n``: its zero-point-padded NCHW copy in ``source`` (plus a tail of ``slack`` zero points read only
    by the discarded columns of the unit-stride grid), then per output channel the tap sums into ``acc`` and the
    epilogue; with a fused ``pool_h x pool_w`` max pool the output planes go to ``planes`` first and are pooled
    into ``out4`` while they are in cache. The scratch arrays are the caller's, reused from image to image."""
    pad_h, pad_w, sh, sw, per_group, slack, out_h, out_w, pool_h, pool_w = geometry
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    channels_out = out4.shape[1]
    padded_h, padded_w = height + 2 * pad_h, width + 2 * pad_w
    plane = padded_h * padded_w
    source[:] = np.int8(zero_point)
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
    group_channels = channels // (channels_out // per_group)
    pooled = pool_h > 1 or pool_w > 1
    whole = pooled and sh == 1 and sw == 1  # the epilogue over the whole flat run, then pooled on padded rows
    for o in range(channels_out):
        base = (o // per_group) * group_channels * plane
        _thin_accumulate(source, base, offsets, weights, o, acc, rows, run, sh * padded_w)
        if whole:  # one long vectorised epilogue (the discarded columns too) instead of a short one per row
            finish_pixels(acc[:run], epilogue[0][o], no_row_offsets[:run], epilogue[2][o], epilogue[3][o], epilogue,
                          planes[o, :run])  # fmt: skip
            continue
        for y in range(out_h):
            target = planes[o, y * out_w : (y + 1) * out_w] if pooled else out4[n, o, y]
            if sw == 1:  # a contiguous slice: the epilogue vectorises
                values = acc[y * columns : y * columns + out_w]
                finish_pixels(values, epilogue[0][o], no_row_offsets, epilogue[2][o], epilogue[3][o], epilogue,
                               target)  # fmt: skip
            else:
                values = acc[y * columns : y * columns + span : sw]
                finish_pixels(values, epilogue[0][o], no_row_offsets, epilogue[2][o], epilogue[3][o], epilogue,
                               target)  # fmt: skip
    if pooled:
        max_pool_planes(planes, padded_w if whole else out_w, pool_h, pool_w, out4[n])


@njit(cache=True, inline="always")
def _scratch(x, geometry, out4):
    """The per-image scratch of :func:`_thin_conv_image`: the padded planes, the accumulators, the output planes
    (on whole padded rows at unit stride) and zero row offsets for the epilogue."""
    pad_h, pad_w, sh, sw, _, slack, out_h, out_w, _, _ = geometry
    padded_h, padded_w = x.shape[2] + 2 * pad_h, x.shape[3] + 2 * pad_w
    columns = padded_w if sh == 1 and sw == 1 else (out_w - 1) * sw + 1
    source = np.empty(x.shape[1] * padded_h * padded_w + slack, dtype=np.int8)
    acc = np.empty(out_h * columns, dtype=np.int32)
    planes = np.empty((out4.shape[1], out_h * max(columns, out_w)), dtype=out4.dtype)
    no_row_offsets = np.zeros(out_h * max(columns, out_w), dtype=np.int64)
    return source, acc, planes, no_row_offsets


@njit(cache=True)
def thin_conv_serial(x, zero_point, geometry, offsets, weights, epilogue, out4):
    """The thin convolution of every image in turn; ``geometry = (pad_h, pad_w, stride_h, stride_w, out channels
    per group, slack, out_h, out_w, pool_h, pool_w)``, ``out4`` the (pooled, when ``pool_h x pool_w`` is not 1x1)
    output."""
    source, acc, planes, zeros = _scratch(x, geometry, out4)
    for n in range(x.shape[0]):
        _thin_conv_image(x, n, zero_point, geometry, offsets, weights, epilogue, source, acc, planes, zeros, out4)


@njit(cache=True, parallel=True)
def thin_conv_parallel(x, zero_point, geometry, offsets, weights, epilogue, out4):
    """:func:`thin_conv_serial` with the images in parallel (scratch per image)."""
    for n in prange(x.shape[0]):
        source, acc, planes, zeros = _scratch(x, geometry, out4)
        _thin_conv_image(x, n, zero_point, geometry, offsets, weights, epilogue, source, acc, planes, zeros, out4)
