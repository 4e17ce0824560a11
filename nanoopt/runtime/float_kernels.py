"""Small compiled float32 kernels the float plans need around BLAS: bias + ReLU epilogues, pools, a direct conv.

Each has a NumPy reference beside it (``*_reference``), equal to float tolerance only where the summation order
differs (the direct conv and the average pools add in a fixed loop order; the epilogues and max pool are exact).

* :func:`bias_act_rows` -- ``out[m, n] = max?(out[m, n] + bias[n], 0)`` in place (a linear layer's epilogue);
* :func:`nchw_bias_act` -- ``out[n, c, p] = max?(products[c, n, p] + bias[c], 0)``: the ``(OC, N, P)`` result
  of a batched ``W @ cols^T`` product written NCHW with bias and ReLU fused (one pass instead of three);
* :func:`channel_affine` -- ``out = x * scale[c] + shift[c]`` (an unfolded BatchNorm in eval mode);
* :func:`avg_pool` -- average pooling, padded zeros counted in the divisor (PyTorch's default), and
  :func:`adaptive_avg_pool` with PyTorch's bins ``[floor(i H / OH), ceil((i + 1) H / OH))``;
* :func:`direct_conv` -- a direct convolution for layers with few input channels per group, where laying out
  im2col columns costs more than the products (LeNet-5's first layer): for every output channel and tap, one
  multiply-add sweep over a padded input row, which LLVM vectorises.

>>> out = np.array([[-1.0, 2.0]], np.float32); bias_act_rows(out, np.array([0.5, 0.5], np.float32), True); out
array([[0. , 2.5]], dtype=float32)
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["adaptive_avg_pool", "adaptive_avg_pool_reference", "avg_pool", "avg_pool_reference", "bias_act_rows",
           "channel_affine", "direct_conv", "direct_conv_reference", "nchw_bias_act"]


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
def nchw_bias_act(products, bias, relu, out):  # pragma: no cover - compiled
    """``out (N, OC, P) = max?(products (OC, N, P) + bias[c], 0)``."""
    channels, batch, pixels = products.shape
    for n in range(batch):
        for c in range(channels):
            source, target, b = products[c, n], out[n, c], bias[c]
            for p in range(pixels):
                value = source[p] + b
                target[p] = max(value, np.float32(0.0)) if relu else value


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


@numba.njit(cache=True, nogil=True)
def direct_conv(padded, weight, bias, groups, stride_h, stride_w, dilation_h, dilation_w, relu,
                out):  # pragma: no cover - compiled
    """Direct convolution of an already padded NCHW float32 input: ``out[n, o, y, x] = max?(bias[o] + sum_{c, i,
    j} w[o, c, i, j] padded[n, g Cg + c, y s_h + i d_h, x s_w + j d_w], 0)``, summed tap by tap."""
    batch, out_channels, out_h, out_w = out.shape
    group_channels, kernel_h, kernel_w = weight.shape[1], weight.shape[2], weight.shape[3]
    per_group = out_channels // groups
    row = np.empty(out_w, np.float32)
    for n in range(batch):
        for o in range(out_channels):
            g = o // per_group
            for y in range(out_h):
                for xx in range(out_w):
                    row[xx] = bias[o]
                for c in range(group_channels):
                    plane = padded[n, g * group_channels + c]
                    for i in range(kernel_h):
                        source = plane[y * stride_h + i * dilation_h]
                        for j in range(kernel_w):
                            w = weight[o, c, i, j]
                            start = j * dilation_w
                            for xx in range(out_w):
                                row[xx] += w * source[start + xx * stride_w]
                target = out[n, o, y]
                for xx in range(out_w):
                    target[xx] = max(row[xx], np.float32(0.0)) if relu else row[xx]


def direct_conv_reference(padded: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int,
                          stride: tuple[int, int], dilation: tuple[int, int], relu: bool) -> np.ndarray:
    """NumPy version of :func:`direct_conv` (float64 sums: equal to float32 tolerance).

    >>> direct_conv_reference(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32),
    ...                       np.zeros(1, np.float32), 1, (1, 1), (1, 1), False)[0, 0]
    array([[4., 4.],
           [4., 4.]], dtype=float32)
    """
    batch, channels, height, width = padded.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    out_h = (height - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    out = np.zeros((batch, out_channels, out_h, out_w), np.float64) + bias.reshape(1, -1, 1, 1)
    per_group = out_channels // groups
    for o in range(out_channels):
        g = o // per_group
        for c in range(group_channels):
            for i in range(kernel_h):
                for j in range(kernel_w):
                    top, left = i * dilation[0], j * dilation[1]
                    window = padded[:, g * group_channels + c, top:top + stride[0] * (out_h - 1) + 1:stride[0],
                                    left:left + stride[1] * (out_w - 1) + 1:stride[1]]
                    out[:, o] += float(weight[o, c, i, j]) * window
    return (np.maximum(out, 0) if relu else out).astype(np.float32)
