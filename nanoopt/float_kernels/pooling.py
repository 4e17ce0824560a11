"""Float max pooling kernels for the autograd: a NumPy reference and a Numba version, bit-identical.

Forward: for every window, the maximum and the flat position ``i * KW + j`` of its *first* maximum (row-major
scan, PyTorch's tie rule). Backward: each window's gradient is added at its argmax; additions are made in the
order of the kernel position (i, j), so overlapping windows accumulate in the same order in both versions and
the results agree bit for bit. The input must already be padded (with -inf) by the caller.

>>> import numpy as np
>>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
>>> out, argmax = max_pool2d_forward(x, 2, 2, 2, 2)
>>> out[0, 0].tolist(), argmax[0, 0].tolist()
([[5.0, 7.0], [13.0, 15.0]], [[3, 3], [3, 3]])
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _output_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def max_pool2d_forward_reference(x: np.ndarray, kernel_h: int, kernel_w: int, stride_h: int,
                                 stride_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, argmax) of max pooling over the padded NCHW ``x``; argmax is int64, flat in the window."""
    windows = sliding_window_view(x, (kernel_h, kernel_w), axis=(2, 3))[:, :, ::stride_h, ::stride_w]
    n, c, oh, ow = windows.shape[:4]
    flat = windows.reshape(n, c, oh, ow, kernel_h * kernel_w)
    argmax = flat.argmax(axis=-1)
    out = np.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0]
    return np.ascontiguousarray(out), argmax.astype(np.int64)


def max_pool2d_backward_reference(grad: np.ndarray, argmax: np.ndarray, padded_shape: tuple[int, ...],
                                  kernel_h: int, kernel_w: int, stride_h: int, stride_w: int) -> np.ndarray:
    """Gradient with respect to the padded input: ``grad`` added at every window's argmax, kernel position by
    kernel position."""
    out = np.zeros(padded_shape, dtype=grad.dtype)
    oh, ow = grad.shape[2], grad.shape[3]
    for i in range(kernel_h):
        for j in range(kernel_w):
            selected = np.where(argmax == i * kernel_w + j, grad, np.zeros((), dtype=grad.dtype))
            out[:, :, i:i + stride_h * (oh - 1) + 1:stride_h, j:j + stride_w * (ow - 1) + 1:stride_w] += selected
    return out


# Flat views with unsigned offsets: a 4-D index with signed integers costs a negative-index wraparound check per
# subscript (the same finding as in float_kernels/im2col.py; timings in docs/kernels.md).
@numba.njit(cache=True, nogil=True)
def _max_pool2d_forward_numba(x, kernel_h, kernel_w, stride_h, stride_w, out, argmax):
    n, c, oh, ow = out.shape
    h, w = x.shape[2], x.shape[3]
    source, best_out, index_out = x.reshape(-1), out.reshape(-1), argmax.reshape(-1)
    if kernel_h == 2 and kernel_w == 2 and stride_h == 2 and stride_w == 2:  # the usual pool: branch-free selects
        for plane in range(n * c):
            for y in range(oh):
                top = x[plane // c, plane % c, 2 * y]
                bottom = x[plane // c, plane % c, 2 * y + 1]
                row = plane * oh * ow + y * ow
                for xo in range(ow):
                    best, best_index = top[2 * xo], 0  # row-major scan, strict '>': the first maximum wins ties
                    value = top[2 * xo + 1]
                    best, best_index = (value, 1) if value > best else (best, best_index)
                    value = bottom[2 * xo]
                    best, best_index = (value, 2) if value > best else (best, best_index)
                    value = bottom[2 * xo + 1]
                    best, best_index = (value, 3) if value > best else (best, best_index)
                    best_out[row + xo] = best
                    index_out[row + xo] = best_index
        return
    at = np.uint64(0)
    for plane in range(n * c):
        base = np.uint64(plane * h * w)
        for y in range(oh):
            for xo in range(ow):
                corner = base + np.uint64(y * stride_h * w + xo * stride_w)
                best = source[corner]
                best_index = 0
                for i in range(kernel_h):
                    row = corner + np.uint64(i * w)
                    for j in range(kernel_w):
                        value = source[row + np.uint64(j)]
                        if value > best:  # strict: the first maximum wins ties
                            best = value
                            best_index = i * kernel_w + j
                best_out[at] = best
                index_out[at] = best_index
                at += np.uint64(1)


@numba.njit(cache=True, nogil=True)
def _max_pool2d_backward_numba(grad, argmax, kernel_h, kernel_w, stride_h, stride_w, out):
    n, c, oh, ow = grad.shape
    if stride_h >= kernel_h and stride_w >= kernel_w:  # windows do not overlap: one write per cell, any order
        h, w = out.shape[2], out.shape[3]
        source, positions, target = grad.reshape(-1), argmax.reshape(-1), out.reshape(-1)
        at = np.uint64(0)
        for plane in range(n * c):
            base = np.uint64(plane * h * w)
            for y in range(oh):
                for xo in range(ow):
                    position = positions[at]
                    i, j = position // kernel_w, position % kernel_w
                    target[base + np.uint64((y * stride_h + i) * w + xo * stride_w + j)] += source[at]
                    at += np.uint64(1)
        return
    for position in range(kernel_h * kernel_w):  # same accumulation order as the reference
        i, j = position // kernel_w, position % kernel_w
        for b in range(n):
            for ch in range(c):
                for y in range(oh):
                    for xo in range(ow):
                        if argmax[b, ch, y, xo] == position:
                            out[b, ch, y * stride_h + i, xo * stride_w + j] += grad[b, ch, y, xo]


def max_pool2d_forward(x: np.ndarray, kernel_h: int, kernel_w: int, stride_h: int,
                       stride_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Numba version of :func:`max_pool2d_forward_reference` (same results, bit for bit).

    Note: NaN inputs follow the scan rule (a NaN never wins a comparison) and so may differ from NumPy's argmax,
    which returns the first NaN; callers reject non-finite data before this point where it matters.
    """
    x = np.ascontiguousarray(x)
    n, c, h, w = x.shape
    shape = (n, c, _output_size(h, kernel_h, stride_h), _output_size(w, kernel_w, stride_w))
    out = np.empty(shape, dtype=x.dtype)
    argmax = np.empty(shape, dtype=np.int64)
    _max_pool2d_forward_numba(x, kernel_h, kernel_w, stride_h, stride_w, out, argmax)
    return out, argmax


def max_pool2d_backward(grad: np.ndarray, argmax: np.ndarray, padded_shape: tuple[int, ...], kernel_h: int,
                        kernel_w: int, stride_h: int, stride_w: int) -> np.ndarray:
    """Numba version of :func:`max_pool2d_backward_reference` (same results, bit for bit)."""
    out = np.zeros(padded_shape, dtype=grad.dtype)
    _max_pool2d_backward_numba(np.ascontiguousarray(grad), argmax, kernel_h, kernel_w, stride_h, stride_w, out)
    return out
