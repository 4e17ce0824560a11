"""im2col and its adjoint col2im for float convolution: NumPy references and Numba versions, bit-identical.

A convolution becomes one matrix product per image once every receptive field is laid out as a column
(Chellapilla et al. 2006): for a padded input x (N, C, H, W), groups G (Cg = C / G channels each), kernel (KH, KW),
stride s and dilation d,

    cols[n, g, (c, i, j), (y, x)] = x[n, g*Cg + c, y*s_h + i*d_h, x*s_w + j*d_w]        (N, G, Cg*KH*KW, OH*OW)

so that ``W[g] (OCg, Cg*KH*KW) @ cols[n, g]`` is image n's output of group g already in NCHW order (no transpose
after the product), and each row of ``cols[n, g]`` is ``OH`` runs of ``OW`` input values (contiguous at unit
stride). col2im is the adjoint (transpose) of that linear map: every column value is added back onto the input
cell it came from. Both versions add kernel position by kernel position (i, j), so a cell hit by several windows
accumulates in the same order and the results agree bit for bit.

>>> import numpy as np
>>> x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
>>> im2col(x, 1, 2, 2, 1, 1, 1, 1).shape
(1, 1, 4, 4)
>>> im2col(x, 1, 2, 2, 1, 1, 1, 1)[0, 0, 0].tolist()  # tap (0, 0) under the four output pixels
[0.0, 1.0, 3.0, 4.0]
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of a valid (already padded) convolution."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def im2col_reference(x: np.ndarray, groups: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
                     dilation_h: int, dilation_w: int) -> np.ndarray:
    """Columns (N, G, Cg*KH*KW, OH*OW) of the padded NCHW input, with NumPy strided views and one copy."""
    n, c, _, _ = x.shape
    span_h, span_w = dilation_h * (kernel_h - 1) + 1, dilation_w * (kernel_w - 1) + 1
    windows = sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::stride_h, ::stride_w, ::dilation_h, ::dilation_w]  # (N, C, OH, OW, KH, KW)
    oh, ow = windows.shape[2], windows.shape[3]
    cg = c // groups
    cols = windows.reshape(n, groups, cg, oh, ow, kernel_h, kernel_w).transpose(0, 1, 2, 5, 6, 3, 4)
    return np.ascontiguousarray(cols).reshape(n, groups, cg * kernel_h * kernel_w, oh * ow)


def col2im_reference(cols: np.ndarray, padded_shape: tuple[int, int, int, int], kernel_h: int, kernel_w: int,
                     stride_h: int, stride_w: int, dilation_h: int, dilation_w: int) -> np.ndarray:
    """Adjoint of :func:`im2col_reference`: (N, G, Cg*KH*KW, OH*OW) columns summed back onto (N, C, H, W)."""
    n, c, h, w = padded_shape
    oh, ow = output_size(h, kernel_h, stride_h, dilation_h), output_size(w, kernel_w, stride_w, dilation_w)
    windows = cols.reshape(n, c, kernel_h, kernel_w, oh, ow)  # (g, c) flatten to the channel index g*Cg + c
    out = np.zeros(padded_shape, dtype=cols.dtype)
    for i in range(kernel_h):
        top = i * dilation_h
        for j in range(kernel_w):
            left = j * dilation_w
            out[:, :, top:top + stride_h * (oh - 1) + 1:stride_h,
                left:left + stride_w * (ow - 1) + 1:stride_w] += windows[:, :, i, j]
    return out


# The kernels walk flat views with unsigned offsets: a 4-D index with signed integers costs a negative-index
# wraparound check per subscript, which slows the copy loops (docs/kernels.md). The (g, c) pair of
# the column layout is the input channel g*Cg + c, so both kernels loop over channels directly.
@numba.njit(cache=True, nogil=True)
def _walk(image, cols, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, add_back):
    """The walk both Numba kernels share, one run of OW cells per (plane, i, j, y): im2col fills the next column
    entries from the image cells (``add_back`` False); col2im adds them back onto their cells (True), per cell in
    kernel position order (i, j), the reference's order."""
    n, c, h, w = image.shape
    oh = (h - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    ow = np.uint64((w - dilation_w * (kernel_w - 1) - 1) // stride_w + 1)
    cells, entries = image.reshape(-1), cols.reshape(-1)
    at, step = np.uint64(0), np.uint64(stride_w)
    for plane in range(n * c):
        for i in range(kernel_h):
            for j in range(kernel_w):
                for y in range(oh):
                    start = np.uint64(plane * h * w + (y * stride_h + i * dilation_h) * w + j * dilation_w)
                    if stride_w == 1 and add_back:
                        for xo in range(ow):
                            cells[start + xo] += entries[at + xo]
                    elif stride_w == 1:
                        for xo in range(ow):
                            entries[at + xo] = cells[start + xo]
                    elif add_back:
                        for xo in range(ow):
                            cells[start + xo * step] += entries[at + xo]
                    else:
                        for xo in range(ow):
                            entries[at + xo] = cells[start + xo * step]
                    at += ow


def im2col(x: np.ndarray, groups: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
           dilation_h: int, dilation_w: int) -> np.ndarray:
    """Numba version of :func:`im2col_reference` (identical output)."""
    x = np.ascontiguousarray(x)
    n, c, h, w = x.shape
    oh, ow = output_size(h, kernel_h, stride_h, dilation_h), output_size(w, kernel_w, stride_w, dilation_w)
    cols = np.empty((n, groups, (c // groups) * kernel_h * kernel_w, oh * ow), dtype=x.dtype)
    _walk(x, cols, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, False)
    return cols


def col2im(cols: np.ndarray, padded_shape: tuple[int, int, int, int], kernel_h: int, kernel_w: int,
           stride_h: int, stride_w: int, dilation_h: int, dilation_w: int) -> np.ndarray:
    """Numba version of :func:`col2im_reference` (bit-identical output)."""
    out = np.zeros(padded_shape, dtype=cols.dtype)
    _walk(out, np.ascontiguousarray(cols), kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, True)
    return out
