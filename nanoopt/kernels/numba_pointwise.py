"""The Numba backend of the integer pooling and residual-add operations (codes in, codes out).

Max pooling takes the largest code of each window; average pooling sums ``code - zero_point`` over the window
(the padded cells count when ``count_include_pad``) and rounds half away from zero; the residual add rescales
both inputs to a common scale with :func:`nanoopt.kernels.requant.multiply_int32` after a left shift, adds and
requantizes (TFLite's ADD). The specification: :func:`nanoopt.kernels.reference.quantized_max_pool2d`,
``quantized_avg_pool2d`` and ``quantized_add``, whose argument checks these share. Call the dispatchers
(:func:`nanoopt.kernels.quantized_max_pool2d` ...), which choose the backend; ReLU has no compiled kernel
(NumPy's ``maximum`` is one vectorised pass).

>>> max_pool2d(np.arange(16, dtype=np.int8).reshape(1, 1, 4, 4), 2)[0, 0]
array([[ 5,  7],
       [13, 15]], dtype=int8)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from nanoopt.kernels import reference as ref
from nanoopt.kernels.requant import multiply_int32
from nanoopt.spec import QuantSpec

__all__ = ["add", "add_arguments", "add_into", "avg_pool2d", "avg_pool_into", "max_pool2d", "max_pool_into"]

@njit(cache=True)
def max_pool_into(x, kernel, stride, padding, out):
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


def max_pool2d(x_q: np.ndarray, kernel_size, stride=None, padding=0) -> np.ndarray:
    """The Numba backend of :func:`nanoopt.kernels.quantized_max_pool2d` (the dispatcher; call that).

    >>> max_pool2d(np.arange(16, dtype=np.int8).reshape(1, 1, 4, 4), 2)[0, 0]
    array([[ 5,  7],
           [13, 15]], dtype=int8)
    """
    kernel, stride, padding, out_h, out_w = ref.check_pool_args(x_q, kernel_size, stride, padding)
    out = np.empty(x_q.shape[:2] + (out_h, out_w), dtype=x_q.dtype)
    max_pool_into(x_q, kernel, stride, padding, out)
    return out


@njit(cache=True)
def avg_pool_into(x, zero_point, kernel, stride, padding, count_include_pad, out):
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


def avg_pool2d(
    x_q: np.ndarray, zero_point: int, kernel_size, stride=None, padding=0, count_include_pad: bool = True
) -> np.ndarray:
    """The Numba backend of :func:`nanoopt.kernels.quantized_avg_pool2d` (the dispatcher; call that).

    >>> x = np.array([[[[1, 2], [3, 5]]]], np.int8)
    >>> avg_pool2d(x, 0, 2)[0, 0]
    array([[3]], dtype=int8)
    """
    kernel, stride, padding, out_h, out_w = ref.check_pool_args(x_q, kernel_size, stride, padding)
    zp = ref.check_int(zero_point, "zero_point", *ref.activation_range(x_q.dtype))
    out = np.empty(x_q.shape[:2] + (out_h, out_w), dtype=x_q.dtype)
    avg_pool_into(x_q, zp, kernel, stride, padding, bool(count_include_pad), out)
    return out


@njit(cache=True)
def add_into(a, b, left_shift, a_params, b_params, out_params, out):
    a_zp, m_a, s_a = a_params
    b_zp, m_b, s_b = b_params
    out_zp, m_out, s_out, low, high = out_params
    for index in range(a.size):
        shifted_a = (np.int64(a[index]) - a_zp) << left_shift
        shifted_b = (np.int64(b[index]) - b_zp) << left_shift
        total = multiply_int32(shifted_a, m_a, s_a) + multiply_int32(shifted_b, m_b, s_b)
        value = multiply_int32(total, m_out, s_out) + out_zp
        out[index] = min(max(value, low), high)


def add_arguments(a_scale, b_scale, out_scale, a_zp: int, b_zp: int, out_zp: int, spec: QuantSpec,
                  relu: bool = False) -> tuple:  # fmt: skip
    """The constant arguments of :func:`add_into` after the two inputs, for checked zero points: ``(left_shift,
    (a_zp, m_a, s_a), (b_zp, m_b, s_b), (out_zp, m_out, s_out, low, high))`` as int64 (the multipliers of
    :func:`nanoopt.kernels.reference.add_multipliers`; ReLU raises ``low`` to the output zero point).

    >>> add_arguments(0.5, 0.25, 0.5, 0, 0, 0, QuantSpec())[0]
    np.int64(20)
    """
    left_shift, (m_a, s_a), (m_b, s_b), (m_out, s_out) = ref.add_multipliers(a_scale, b_scale, out_scale, spec)
    low = max(spec.qmin, out_zp) if relu else spec.qmin
    return (np.int64(left_shift), (np.int64(a_zp), np.int64(m_a), np.int64(s_a)),
            (np.int64(b_zp), np.int64(m_b), np.int64(s_b)),
            (np.int64(out_zp), np.int64(m_out), np.int64(s_out), np.int64(low), np.int64(spec.qmax)))  # fmt: skip


def add(a_q: np.ndarray, a_scale, a_zp: int, b_q: np.ndarray, b_scale, b_zp: int, out_scale, out_zp: int,
        spec: QuantSpec, relu: bool = False) -> np.ndarray:  # fmt: skip
    """The Numba backend of :func:`nanoopt.kernels.quantized_add` (the dispatcher; call that).

    >>> a = np.array([10, -20], np.int8); b = np.array([4, 4], np.int8)
    >>> add(a, 0.5, 0, b, 0.25, 0, 0.5, 0, QuantSpec())
    array([ 12, -18], dtype=int8)
    """
    a_zp, b_zp, out_zp = ref.check_add_args(a_q, a_zp, b_q, b_zp, out_zp, spec)
    out = np.empty(a_q.shape, dtype=spec.dtype)
    arguments = add_arguments(a_scale, b_scale, out_scale, a_zp, b_zp, out_zp, spec, relu)
    add_into(a_q.reshape(-1), b_q.reshape(-1), *arguments, out.reshape(-1))
    return out
