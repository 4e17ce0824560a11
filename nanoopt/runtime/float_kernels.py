"""Small compiled float32 kernels the float plans need around BLAS: bias + ReLU epilogues, pools, a direct conv.

Each has a NumPy reference beside it (``*_reference``), equal to float tolerance only where the summation order
differs (the direct conv and the average pools add in a fixed loop order; the epilogues and max pool are exact).

* :func:`bias_act_rows` -- ``out[m, n] = max?(out[m, n] + bias[n], 0)`` in place (a linear layer's epilogue), and
  :func:`linear_bias_act` -- a whole float linear layer (BLAS product and that epilogue) in one call, and
  :func:`linear_chain` -- consecutive ones in one call;
* :func:`channel_affine` -- ``out = x * scale[c] + shift[c]`` (an unfolded BatchNorm in eval mode);
* :func:`avg_pool` -- average pooling, padded zeros counted in the divisor (PyTorch's default), and
  :func:`adaptive_avg_pool` with PyTorch's bins ``[floor(i H / OH), ceil((i + 1) H / OH))``;
* :func:`max_pool` -- max pooling on plane views (any dtype: the integer plans use it too; max is exact);
* :func:`im2col_gemm_conv` -- im2col + BLAS (``np.dot`` inside Numba) by blocks of images whose columns stay
  in cache, bias and ReLU fused into the NCHW write;
* :func:`im2col_image_gemm_conv` -- the same with compact per-image columns ``(D, OH OW)`` and one BLAS product
  per image (ungrouped layers; no columns computed and dropped, so faster where ``Wp`` is well above ``OW``);
* :func:`direct_conv_unit_stride` -- a direct convolution for unit-stride layers of small reduction depth, where
  laying out im2col columns costs more than the products (LeNet-5's layers): per output channel and tap, one long
  multiply-add sweep over the flat padded plane, which LLVM vectorises (reference: :func:`direct_conv_reference`);
  kernel rows of width 3 and 5 are swept whole (one pass over the accumulator per row: 1.5x on LeNet-5's first
  layer), and :func:`direct_conv_row_tiles` -- the same convolution in the AVX2 register row tiles of
  :mod:`nanoopt.kernels.float_conv_avx2` (whose channel tiles the runtime calls directly).

>>> out = np.array([[-1.0, 2.0]], np.float32); bias_act_rows(out, np.array([0.5, 0.5], np.float32), True); out
array([[0. , 2.5]], dtype=float32)
"""

from __future__ import annotations

import numba
import numpy as np

from nanoopt.kernels import float_conv_avx2

__all__ = ["adaptive_avg_pool", "adaptive_avg_pool_reference", "avg_pool", "avg_pool_reference", "bias_act_rows",
           "channel_affine", "direct_conv_reference", "direct_conv_row_tiles", "direct_conv_unit_stride",
           "im2col_columns", "im2col_gemm_conv", "im2col_image_gemm_conv", "linear_bias_act", "linear_chain",
           "linear_chain_reference", "max_pool", "max_pool_reference", "pack_row_tile_weights"]


@numba.njit(cache=True, nogil=True)
def bias_act_rows(out, bias, relu):  # pragma: no cover - compiled
    """In place: ``out (M, N) += bias (N,)``, then ``max(out, 0)`` if ``relu``."""
    rows, columns = out.shape
    for i in range(rows):
        row = out[i]
        for j in range(columns):
            value = row[j] + bias[j]
            row[j] = max(value, np.float32(0.0)) if relu else value


@numba.njit(cache=True, nogil=True)
def linear_bias_act(x, weight_t, bias, relu, out):  # pragma: no cover - compiled
    """A float linear layer in one call: ``out (M, N) = max?(x (M, K) @ weight_t (K, N) + bias, 0)``, the product
    by BLAS (``np.dot`` inside Numba; ``weight_t`` is the transposed view of the C-ordered ``(N, K)`` weight)."""
    np.dot(x, weight_t, out)
    bias_act_rows(out, bias, relu)


@numba.njit(cache=True, nogil=True)
def linear_chain(arguments):  # pragma: no cover - compiled
    """Consecutive float linear layers in one call: :func:`linear_bias_act` ``(*arguments[i])`` for ``i = 0, 1,
    ...`` in turn (each ``(x, weight_t, bias, relu, out)``, the next layer's ``x`` a view of this one's ``out``):
    the same products and epilogues in the same order as separate calls, so the same bits, without a return to
    Python between layers. The argument tuples are all of one Numba type."""
    for i in range(len(arguments)):
        linear_bias_act(*arguments[i])


def linear_chain_reference(x: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray],
                           relus: list[bool]) -> np.ndarray:
    """NumPy: ``x <- max?(x W_i^T + b_i, 0)`` for each layer in turn (float32; equal to :func:`linear_chain` to
    float tolerance: NumPy's product may block the sums differently from the BLAS call inside Numba).

    >>> linear_chain_reference(np.ones((1, 2), np.float32), [np.ones((1, 2), np.float32), np.full((1, 1), -2.0,
    ...                        np.float32)], [np.zeros(1, np.float32)] * 2, [True, False])
    array([[-4.]], dtype=float32)
    """
    for weight, bias, relu in zip(weights, biases, relus, strict=True):
        x = x @ weight.T + bias
        x = np.maximum(x, np.float32(0)) if relu else x
    return x


@numba.njit(cache=True, nogil=True)
def channel_affine(x, scale, shift, out):  # pragma: no cover - compiled
    """``out (N, C, P) = x (N, C, P) * scale[c] + shift[c]``."""
    batch, channels, pixels = x.shape
    for n in range(batch):
        for c in range(channels):
            for p in range(pixels):
                out[n, c, p] = x[n, c, p] * scale[c] + shift[c]


@numba.njit(cache=True, nogil=True)
def avg_pool(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out):  # pragma: no cover - compiled
    """Average pooling of NCHW float32 ``x`` into ``out``; padded cells count as zeros in the divisor."""
    height, width = x.shape[2], x.shape[3]
    divisor = np.float32(kernel_h * kernel_w)
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            for y in range(out.shape[2]):
                for xx in range(out.shape[3]):
                    total = np.float32(0.0)
                    for i in range(kernel_h):
                        row = y * stride_h - pad_h + i
                        if 0 <= row < height:
                            for j in range(kernel_w):
                                column = xx * stride_w - pad_w + j
                                if 0 <= column < width:
                                    total += x[n, c, row, column]
                    out[n, c, y, xx] = total / divisor


def avg_pool_reference(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                       padding: tuple[int, int]) -> np.ndarray:
    """NumPy average pooling (zeros padded and counted).

    >>> avg_pool_reference(np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2), (2, 2), (2, 2), (0, 0))
    array([[[[1.5]]]], dtype=float32)
    """
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    return windows.mean(axis=(-2, -1), dtype=np.float32)


@numba.njit(cache=True, nogil=True)
def adaptive_avg_pool(x, out):  # pragma: no cover - compiled
    """Adaptive average pooling of NCHW float32 ``x`` to ``out``'s size, with PyTorch's bins."""
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = out.shape[2], out.shape[3]
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            for y in range(out_h):
                top, bottom = (y * height) // out_h, -((-(y + 1) * height) // out_h)
                for xx in range(out_w):
                    left, right = (xx * width) // out_w, -((-(xx + 1) * width) // out_w)
                    total = np.float32(0.0)
                    for row in range(top, bottom):
                        for column in range(left, right):
                            total += x[n, c, row, column]
                    out[n, c, y, xx] = total / np.float32((bottom - top) * (right - left))


def adaptive_avg_pool_reference(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """NumPy adaptive average pooling with PyTorch's bins.

    >>> adaptive_avg_pool_reference(np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3), (1, 2))
    array([[[[2., 3.]]]], dtype=float32)
    """
    height, width = x.shape[2:]
    out = np.empty(x.shape[:2] + tuple(size), np.float32)
    for y in range(size[0]):
        top, bottom = (y * height) // size[0], -((-(y + 1) * height) // size[0])
        for xx in range(size[1]):
            left, right = (xx * width) // size[1], -((-(xx + 1) * width) // size[1])
            out[:, :, y, xx] = x[:, :, top:bottom, left:right].mean(axis=(2, 3), dtype=np.float32)
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _write_plane(values, row_step, bias, relu, pool_h, pool_w, scratch, target):  # pragma: no cover - compiled
    """``target[y, x] = max?(values[y row_step + x] + bias, 0)``, or with a fused max pool of ``pool_h x pool_w``
    windows (stride = window, no padding): the maximum of each window first (adding ``bias`` and taking
    ``max(., 0)`` are monotonic, so the order does not change the result), rows first into ``scratch`` (at least
    ``OW_pooled * pool_w`` long; contiguous, so vectorised), then the columns of each window."""
    width = target.shape[1]
    if pool_h == 1 and pool_w == 1:
        for y in range(target.shape[0]):
            line, target_row = values[y * row_step:y * row_step + width], target[y]
            for xx in range(width):
                value = line[xx] + bias
                target_row[xx] = max(value, np.float32(0.0)) if relu else value
        return
    span = width * pool_w
    for y in range(target.shape[0]):
        base = y * pool_h * row_step
        first = values[base:base + span]
        for q in range(span):
            scratch[q] = first[q]
        for i in range(1, pool_h):
            row = values[base + i * row_step:base + i * row_step + span]
            for q in range(span):
                value = row[q]
                scratch[q] = value if value > scratch[q] else scratch[q]
        target_row = target[y]
        for xx in range(width):
            best = scratch[xx * pool_w]
            for j in range(1, pool_w):
                value = scratch[xx * pool_w + j]
                best = value if value > best else best
            value = best + bias
            target_row[xx] = max(value, np.float32(0.0)) if relu else value


def im2col_columns(out_h: int, out_w: int, padded_w: int, stride: tuple[int, int]) -> int:
    """Columns per image of :func:`im2col_gemm_conv`: ``OH OW``, or ``(OH - 1) Wp + OW`` at unit stride.

    >>> im2col_columns(10, 10, 14, (1, 1)), im2col_columns(10, 10, 14, (2, 2))
    (136, 100)
    """
    return (out_h - 1) * padded_w + out_w if stride == (1, 1) else out_h * out_w


@numba.njit(cache=True, nogil=True)
def im2col_gemm_conv(padded, weight, bias, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, relu,
                     pool_h, pool_w, out_h, out_w, cols, products, out):  # pragma: no cover - compiled
    """Convolution a block of images and one group at a time: the block's im2col columns ``cols (D, B L)``, one
    BLAS product ``products (OCg, B L) = weight[g] (OCg, D) @ cols``, then bias and ReLU into NCHW ``out``.

    Row ``d = (c, i, j)`` of ``cols`` holds that tap's input under every output pixel of the block's images. At
    unit stride the pixels are laid out on rows of the padded width ``Wp`` (pixel ``(y, x)`` at ``y Wp + x``, ``L =
    (OH - 1) Wp + OW`` columns per image, the ``x >= OW`` ones computed and dropped), so that each row of ``cols``
    is one contiguous copy of the flat padded plane from ``i d_h Wp + j d_w``; otherwise ``L = OH OW``.
    ``weight``: ``(G, OCg, D)`` in ``(c, i, j)`` order; ``padded``: the padded input; ``OH x OW`` the size of the
    convolution's output, written to ``out`` through :func:`_write_plane` (a ``pool_h x pool_w`` max pool fused
    when above 1); the block size B is ``cols.shape[1] // L`` (sized by the caller so that the columns stay in
    cache)."""
    batch = out.shape[0]
    groups, per_group, depth = weight.shape
    group_channels = depth // (kernel_h * kernel_w)
    height, width = padded.shape[2], padded.shape[3]
    unit = stride_h == 1 and stride_w == 1
    columns = (out_h - 1) * width + out_w if unit else out_h * out_w
    scratch = np.empty(out_w, np.float32)  # the rows of a fused pool window
    block = cols.shape[1] // columns
    source = padded.reshape(-1)
    for n0 in range(0, batch, block):
        images = min(block, batch - n0)
        used = images * columns
        for g in range(groups):
            d = 0
            for c in range(group_channels):
                for i in range(kernel_h):
                    for j in range(kernel_w):
                        row = cols[d]
                        for b in range(images):
                            plane = ((n0 + b) * padded.shape[1] + g * group_channels + c) * height * width
                            at = b * columns
                            if unit:
                                start = plane + i * dilation_h * width + j * dilation_w
                                row[at:at + columns] = source[start:start + columns]
                            else:
                                for y in range(out_h):
                                    start = plane + (y * stride_h + i * dilation_h) * width + j * dilation_w
                                    for xx in range(out_w):
                                        row[at + xx] = source[start + xx * stride_w]
                                    at += out_w
                        d += 1
            if images == block:
                np.dot(weight[g], cols, products)
            else:  # the last, partial block: a contiguous copy of its columns (np.dot wants contiguous operands)
                products[:, :used] = np.dot(weight[g], np.ascontiguousarray(cols[:, :used]))
            row_step = width if unit else out_w
            for b in range(images):
                for o in range(per_group):
                    _write_plane(products[o, b * columns:(b + 1) * columns], row_step, bias[g * per_group + o], relu,
                                 pool_h, pool_w, scratch, out[n0 + b, g * per_group + o])


@numba.njit(cache=True, nogil=True)
def im2col_image_gemm_conv(padded, weight, bias, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, relu,
                           pool_h, pool_w, cols, products, out):  # pragma: no cover - compiled
    """An ungrouped convolution a block of ``B`` images at a time (``B = cols.shape[0]``): each image's columns
    ``cols[b] (D, OH OW)`` -- row ``d = (c, i, j)`` is ``OH`` runs of ``OW`` input values, ``cols[b, d, y OW + x] =
    padded[n, c, y s_h + i d_h, x s_w + j d_w]`` -- then one BLAS product per image ``products[b] (OC, OH OW) =
    weight (OC, D) @ cols[b]``, already in NCHW order, written to ``out`` with bias and ReLU (and a ``pool_h x
    pool_w`` max pool fused when above 1) by :func:`_write_plane`. ``cols``: ``(B, D, OH OW)``, ``products``:
    ``(B, OC, OH OW)``, float32, C-contiguous; ``weight``: ``(OC, D)`` in ``(c, i, j)`` order."""
    batch, out_channels = out.shape[0], out.shape[1]
    channels, height, width = padded.shape[1], padded.shape[2], padded.shape[3]
    block, pixels = cols.shape[0], cols.shape[2]
    out_h = (height - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = pixels // out_h
    scratch = np.empty(out_w, np.float32)  # the rows of a fused pool window
    source = padded.reshape(-1)
    for n0 in range(0, batch, block):
        images = min(block, batch - n0)
        for b in range(images):
            target = cols[b].reshape(-1)
            at = np.uint64(0)  # unsigned offsets: no negative-index wraparound checks (as in float_kernels/im2col.py)
            for c in range(channels):
                plane = ((n0 + b) * channels + c) * height * width
                for i in range(kernel_h):
                    for j in range(kernel_w):
                        for y in range(out_h):
                            start = np.uint64(plane + (y * stride_h + i * dilation_h) * width + j * dilation_w)
                            for xx in range(out_w):
                                target[at + np.uint64(xx)] = source[start + np.uint64(xx * stride_w)]
                            at += np.uint64(out_w)
            np.dot(weight, cols[b], products[b])
            for o in range(out_channels):
                _write_plane(products[b, o], out_w, bias[o], relu, pool_h, pool_w, scratch, out[n0 + b, o])


@numba.njit(cache=True, nogil=True)
def max_pool(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out):  # pragma: no cover - compiled
    """Max pooling of NCHW ``x`` (any dtype) into ``out``; padded cells never win. Non-overlapping windows without
    padding (the usual 2x2, stride 2) take a row-at-a-time path that LLVM vectorises (timing: docs/kernels.md)."""
    height, width = x.shape[2], x.shape[3]
    if stride_h == kernel_h and stride_w == kernel_w and pad_h == 0 and pad_w == 0:
        for n in range(out.shape[0]):
            for c in range(out.shape[1]):
                plane, target = x[n, c], out[n, c]
                for y in range(out.shape[2]):
                    line, first = target[y], plane[y * kernel_h]
                    for xx in range(out.shape[3]):
                        best = first[xx * kernel_w]
                        for j in range(1, kernel_w):
                            value = first[xx * kernel_w + j]
                            best = value if value > best else best
                        line[xx] = best
                    for i in range(1, kernel_h):
                        row = plane[y * kernel_h + i]
                        for xx in range(out.shape[3]):
                            best = line[xx]
                            for j in range(kernel_w):
                                value = row[xx * kernel_w + j]
                                best = value if value > best else best
                            line[xx] = best
        return
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            plane, target = x[n, c], out[n, c]
            for y in range(out.shape[2]):
                top = y * stride_h - pad_h
                row_lo, row_hi = max(top, 0), min(top + kernel_h, height)
                for xx in range(out.shape[3]):
                    left = xx * stride_w - pad_w
                    column_lo, column_hi = max(left, 0), min(left + kernel_w, width)
                    best = plane[row_lo, column_lo]
                    for row in range(row_lo, row_hi):
                        line = plane[row]
                        for column in range(column_lo, column_hi):
                            if line[column] > best:
                                best = line[column]
                    target[y, xx] = best


def max_pool_reference(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                       padding: tuple[int, int]) -> np.ndarray:
    """NumPy max pooling (padding never wins).

    >>> max_pool_reference(np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2), (2, 2), (2, 2), (0, 0))
    array([[[[3.]]]], dtype=float32)
    """
    low = np.finfo(x.dtype).min if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=low)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    return windows.max(axis=(-2, -1))


@numba.njit(cache=True, nogil=True)
def direct_conv_unit_stride(padded, weight, bias, groups, dilation_h, dilation_w, relu, pool_h, pool_w, acc,
                            out):  # pragma: no cover - compiled
    """A unit-stride direct convolution of an already padded NCHW float32 input, ``out[n, o, y, x] = max?(bias[o] +
    sum_{c, i, j} w[o, c, i, j] padded[n, g Cg + c, y + i d_h, x + j d_w], 0)``, computed on rows of the padded
    width: with ``Wp`` the padded width, the output pixel ``(y, x)`` lives at ``q = y Wp + x`` and tap ``(i, j)``
    reads the flat padded plane at ``q + i d_h Wp + j d_w``, so each tap is one long contiguous multiply-add sweep
    (vectorised) over ``acc`` (the columns ``x >= OW`` of each row are computed and dropped). ``acc``: float32
    scratch of ``(OH - 1) Wp + OW``; the plane is written to ``out`` through :func:`_write_plane` (a ``pool_h x
    pool_w`` max pool fused when above 1)."""
    batch, out_channels = out.shape[0], out.shape[1]
    group_channels, kernel_h, kernel_w = weight.shape[1], weight.shape[2], weight.shape[3]
    padded_w = padded.shape[3]
    length = acc.shape[0]
    per_group = out_channels // groups
    scratch = np.empty(padded_w, np.float32)  # the rows of a fused pool window
    for n in range(batch):
        for o in range(out_channels):
            g = o // per_group
            acc[:] = 0.0
            for c in range(group_channels):
                plane = padded[n, g * group_channels + c].reshape(-1)
                for i in range(kernel_h):
                    start, d = i * dilation_h * padded_w, dilation_w
                    if kernel_w == 5:  # a whole kernel row per sweep: one load and store of acc per 5 taps
                        w0, w1, w2 = weight[o, c, i, 0], weight[o, c, i, 1], weight[o, c, i, 2]
                        w3, w4 = weight[o, c, i, 3], weight[o, c, i, 4]
                        p0, p1 = plane[start:start + length], plane[start + d:start + d + length]
                        p2 = plane[start + 2 * d:start + 2 * d + length]
                        p3 = plane[start + 3 * d:start + 3 * d + length]
                        p4 = plane[start + 4 * d:start + 4 * d + length]
                        for q in range(length):
                            acc[q] += w0 * p0[q] + w1 * p1[q] + w2 * p2[q] + w3 * p3[q] + w4 * p4[q]
                    elif kernel_w == 3:
                        w0, w1, w2 = weight[o, c, i, 0], weight[o, c, i, 1], weight[o, c, i, 2]
                        p0, p1 = plane[start:start + length], plane[start + d:start + d + length]
                        p2 = plane[start + 2 * d:start + 2 * d + length]
                        for q in range(length):
                            acc[q] += w0 * p0[q] + w1 * p1[q] + w2 * p2[q]
                    else:
                        for j in range(kernel_w):
                            w = weight[o, c, i, j]
                            window = plane[start + j * d:start + j * d + length]
                            for q in range(length):
                                acc[q] += w * window[q]
            _write_plane(acc, padded_w, bias[o], relu, pool_h, pool_w, scratch, out[n, o])


def pack_row_tile_weights(weight: np.ndarray, groups: int) -> np.ndarray:
    """The weight ``(OC, Cg, KH, KW)`` as ``(G, B, D, 6)`` float32 blocks of :data:`~nanoopt.kernels.float_conv_avx2.
    ROW_TILE_CHANNELS` output channels per tap, for :func:`direct_conv_row_tiles` (zeros past a group's channels).

    >>> pack_row_tile_weights(np.arange(4, dtype=np.float32).reshape(2, 2, 1, 1), 1)[0, 0]
    array([[0., 2., 0., 0., 0., 0.],
           [1., 3., 0., 0., 0., 0.]], dtype=float32)
    """
    channels = float_conv_avx2.ROW_TILE_CHANNELS
    per_group, depth = weight.shape[0] // groups, int(np.prod(weight.shape[1:]))
    blocks = -(-per_group // channels)
    packed = np.zeros((groups, blocks * channels, depth), np.float32)
    packed[:, :per_group] = weight.reshape(groups, per_group, depth)
    return np.ascontiguousarray(packed.reshape(groups, blocks, channels, depth).transpose(0, 1, 3, 2))


@numba.njit(cache=True, nogil=True)
def direct_conv_row_tiles(padded, packed, taps, bias, relu, pool_h, pool_w, last, planes, out):  # pragma: no cover
    """The unit-stride direct convolution of :func:`direct_conv_unit_stride` (same output, same padded-width rows)
    in register row tiles of :mod:`nanoopt.kernels.float_conv_avx2` (AVX2 only: check its ``available()``): per
    block of 6 output channels of a group, 16 consecutive positions ``q = y Wp + x`` at a time, the 12 accumulators
    kept in registers over every tap ``taps[d] = c Hp Wp + i d_h Wp + j d_w``. ``packed``:
    :func:`pack_row_tile_weights`; ``planes``: float32 scratch ``(6, L')`` with ``L' >= (OH - 1) Wp + OW`` rounded
    up to 16; ``last``: a flat scratch of one padded image plus 16 floats, where the last image is copied (the last
    tile of a plane reads up to 15 values past it, which must exist). Each plane goes to ``out`` through
    :func:`_write_plane`; with a 2 x 2 pool, each tile is instead 8 positions of two consecutive rows, pooled, biased
    and rectified in registers (4 pooled columns; the last tile of a row may cover columns past ``OW`` that no
    window uses)."""
    batch, channels, height, width = padded.shape
    out_channels = out.shape[1]
    groups, blocks, depth = packed.shape[0], packed.shape[1], packed.shape[2]
    per_group, group_channels = out_channels // groups, channels // groups
    tile = float_conv_avx2.ROW_TILE_CHANNELS
    step = float_conv_avx2.ROW_TILE_VECTORS * float_conv_avx2.LANES
    half = float_conv_avx2.LANES // 2  # pooled columns of a 2 x 2 pooled tile
    length = planes.shape[1]
    image = channels * height * width
    weights = packed.reshape(-1)
    flat = padded.reshape(-1)
    scratch = np.empty(width, np.float32)  # the rows of a fused pool window
    for n in range(batch):
        source, start = flat, n * image
        if n == batch - 1:  # a copy with room for the last tile's overrun
            last[:image] = flat[start:start + image]
            source, start = last, 0
        for g in range(groups):
            at = start + g * group_channels * height * width
            for b in range(blocks):
                w_base = (g * blocks + b) * depth * tile
                valid = min(tile, per_group - b * tile)
                first = g * per_group + b * tile
                if pool_h == 2 and pool_w == 2:  # two rows per tile, pooled in registers
                    for y in range(out.shape[2]):
                        for x0 in range(0, out.shape[3], half):
                            float_conv_avx2.pooled_row_tile(source, at + 2 * y * width + 2 * x0, width, taps, weights,
                                                            w_base, bias, relu, valid, min(half, out.shape[3] - x0),
                                                            out[n], first, y, x0)
                    continue
                for q0 in range(0, length, step):
                    float_conv_avx2.row_tile(source, at, taps, weights, w_base, planes, q0)
                for k in range(valid):
                    _write_plane(planes[k], width, bias[first + k], relu, pool_h, pool_w, scratch, out[n, first + k])


def direct_conv_reference(padded: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int,
                          stride: tuple[int, int], dilation: tuple[int, int], relu: bool) -> np.ndarray:
    """NumPy convolution of an already padded input (float64 sums), the reference of the float conv kernels.

    >>> direct_conv_reference(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32),
    ...                       np.zeros(1, np.float32), 1, (1, 1), (1, 1), False)[0, 0]
    array([[4., 4.],
           [4., 4.]], dtype=float32)
    """
    return float_conv_avx2.direct_conv_float_reference(padded, weight, bias, groups, stride, dilation, relu, (1, 1))
