"""The epilogue of the Numba integer kernels: exact accumulators -> output codes, per block of a GEMM or conv.

After the products of a block (Jacob et al. 2018, eq. 7-9), one loop adds the per-channel offsets (``bias -
x_zp * rowsum(w)``, Jacob et al. eq. 8, plus the byte-split terms of 16-bit operands) and the per-row offsets,
requantizes with :mod:`nanoopt.kernels.requant` -- the branch-free int32 form when the accumulator bound fits
int32 and every shift is a right shift of at most 30, else the exact wide (int64) form -- adds the output zero
point and clamps (ReLU = clamp at the output zero point). The mode tests sit outside the loops so that these
vectorise.

An *epilogue* is the tuple ``(offsets, row_offsets, m0, shift, out_zero_point, low, high, raw, fast)``; raw
epilogues (the GEMM entry points) store the sums plus offsets as they are. int8 outputs are stored directly;
int16 outputs and raw int32/int64 sums are stored as int64 and cast (:func:`kernel_dtype`). The NumPy reference
is ``reference._epilogue`` (via :func:`nanoopt.kernels.reference.quantized_linear` / ``quantized_conv2d``).

>>> kernel_dtype(np.int16)
dtype('int64')
"""

from __future__ import annotations

import numpy as np
from numba import njit

from nanoopt.kernels import reference as ref
from nanoopt.kernels.requant import requantize_value
from nanoopt.spec import INT32_MAX

__all__ = [
    "CONV_CHANNEL_MAJOR",
    "CONV_PIXEL_MAJOR",
    "LINEAR",
    "check_x_dtype",
    "epilogue_block",
    "finish_pixels",
    "finish_products",
    "finish_run",
    "finish_value",
    "kernel_dtype",
    "layer_epilogue",
    "max_pool_planes",
    "raw_tail",
]

@njit(cache=True, inline="always")
def finish_value(value, channel, epilogue):
    """Requantize one exact accumulator of output channel ``channel`` (or return it when raw)."""
    m0, shift, out_zero_point, low, high, raw, fast = epilogue[2:]
    if raw:
        return value
    return requantize_value(value, m0[channel], shift[channel], out_zero_point, low, high, fast)


@njit(cache=True, inline="always")
def finish_run(values, offsets, row_offset, m0, shift, epilogue, target):
    """``target[t] = finish(values[t] + offsets[t] + row_offset)`` with per-element ``m0``/``shift``; the mode
    tests sit outside the loops so that these vectorise (all operands are slices: no index arithmetic)."""
    out_zero_point, low, high, raw, fast = epilogue[4:]
    if raw:
        for t in range(values.shape[0]):
            target[t] = values[t] + offsets[t] + row_offset
    elif fast:
        for t in range(values.shape[0]):
            value = values[t] + offsets[t] + row_offset
            target[t] = requantize_value(value, m0[t], shift[t], out_zero_point, low, high, True)
    else:
        for t in range(values.shape[0]):
            value = values[t] + offsets[t] + row_offset
            target[t] = requantize_value(value, m0[t], shift[t], out_zero_point, low, high, False)


@njit(cache=True, inline="always")
def finish_pixels(values, offset, row_offsets, m0, shift, epilogue, target):
    """``target[t] = finish(values[t] + offset + row_offsets[t])`` for one channel (scalar ``m0``/``shift``)."""
    out_zero_point, low, high, raw, fast = epilogue[4:]
    if raw:
        for t in range(values.shape[0]):
            target[t] = values[t] + offset + row_offsets[t]
    elif fast:
        for t in range(values.shape[0]):
            value = values[t] + offset + row_offsets[t]
            target[t] = requantize_value(value, m0, shift, out_zero_point, low, high, True)
    else:
        for t in range(values.shape[0]):
            value = values[t] + offset + row_offsets[t]
            target[t] = requantize_value(value, m0, shift, out_zero_point, low, high, False)


@njit(cache=True, inline="always")
def max_pool_planes(planes, out_w, pool_h, pool_w, target):
    """A fused non-overlapping max pool: ``target[c, y, x] = max(planes[c, (y pool_h + i) out_w + x pool_w + j])``
    over ``i < pool_h, j < pool_w``, for flat output planes ``planes (C, >= out_h * out_w)`` of a layer just written
    (still in cache; ``out_w`` is the row stride, which may exceed the conv's width: columns past it are never
    read) and ``target (C, out_h // pool_h, width // pool_w)``; the rows and columns past the last whole window are
    dropped, as PyTorch's floor mode does. Max of codes, so the result equals the layer followed
    by :func:`nanoopt.kernels.reference.quantized_max_pool2d` exactly."""
    for c in range(target.shape[0]):
        plane = planes[c]
        for y in range(target.shape[1]):
            line = target[c, y]
            for i in range(pool_h):
                row = plane[(y * pool_h + i) * out_w : (y * pool_h + i + 1) * out_w]
                if pool_w == 2:  # the usual 2x2 window: branch-free pairs (4x faster than the loop below)
                    if i == 0:
                        for x in range(line.shape[0]):
                            u, v = row[2 * x], row[2 * x + 1]
                            line[x] = u if u > v else v
                    else:
                        for x in range(line.shape[0]):
                            u, v, w = row[2 * x], row[2 * x + 1], line[x]
                            u = u if u > v else v
                            line[x] = u if u > w else w
                else:
                    for x in range(line.shape[0]):
                        best = row[x * pool_w]
                        for j in range(1, pool_w):
                            value = row[x * pool_w + j]
                            best = value if value > best else best
                        if i == 0 or best > line[x]:
                            line[x] = best


LINEAR, CONV_CHANNEL_MAJOR, CONV_PIXEL_MAJOR = 0, 1, 2  # layouts of a block buffer (geometry[4])


@njit(cache=True)
def epilogue_block(buffer, rows, columns, i_lo, j_lo, epilogue, geometry, out3):
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
            finish_pixels(values, channel_offsets[c], block_row_offsets, channel_m0[c], channel_shift[c], epilogue,
                           target)  # fmt: skip
    elif layout == CONV_PIXEL_MAJOR:
        finished = np.empty(used, dtype=out3.dtype)
        for r in range(rows):
            values = buffer[r * columns : r * columns + used]
            finish_run(values, channel_offsets, block_row_offsets[r], channel_m0, channel_shift, epilogue, finished)
            planes = out3[batch_offset, first : first + used, row_offset + i_lo + r]
            for c in range(used):
                planes[c] = finished[c]
    else:
        out2 = out3.reshape(out3.shape[0], out3.shape[1])  # rows of channels, typed contiguous (vectorises)
        for r in range(rows):
            values = buffer[r * columns : r * columns + used]
            target = out2[row_offset + i_lo + r, first : first + used]
            finish_run(values, channel_offsets, block_row_offsets[r], channel_m0, channel_shift, epilogue, target)


def finish_products(products: np.ndarray, epilogue, out: np.ndarray) -> None:
    """``out[m, n] = finish(products[m, n] + offsets[n] + row_offsets[m])`` for exact int32/int64 sums
    ``products (M, N)`` computed by another GEMM (the AVX2 one); ``epilogue`` as in :func:`gemm_block`."""
    rows, columns = products.shape
    geometry = (0, 0, columns, 0, LINEAR)
    epilogue_block(products.reshape(-1), rows, columns, 0, 0, epilogue, geometry, out.reshape(out.shape + (1,)))

def check_x_dtype(x_dtype) -> np.dtype:
    dtype = np.dtype(x_dtype)
    if dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
        raise TypeError(f"x_dtype must be int8 or int16, got {dtype}")
    return dtype


def layer_epilogue(packed, x_dtype, x_zero_point, bias_q, m0, shift, out_zero_point, out_spec, relu, w_ndim):
    """Validate a layer's fixed parameters; return ``(x_zp, offsets, tail)`` where ``tail`` is the epilogue
    tuple after the offsets (``m0, shift, out_zp, low, high, raw, fast``)."""
    x_dtype = check_x_dtype(x_dtype)
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


def raw_tail(channels: int):
    """Epilogue tail of the raw GEMMs: the sums plus offsets, stored as they are."""
    unused = np.zeros(channels, dtype=np.int64)
    return (unused, unused, np.int64(0), np.int64(0), np.int64(0), True, False)


def kernel_dtype(out_dtype) -> np.dtype:
    """The dtype the compiled kernels write: int8 directly; int16/int32/int64 results are written as int64
    and cast (exactly: they are clamped or bounded already). One compiled variant fewer per kernel."""
    return np.dtype(np.int8) if np.dtype(out_dtype) == np.int8 else np.dtype(np.int64)

