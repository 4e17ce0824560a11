"""Pure-NumPy integer kernels: the executable specification of nanoopt's integer inference.

Every kernel here computes its exact integer result in int64 and is the oracle the Numba kernels
(``numba_cpu.py``) must equal bit for bit. The scheme is the integer-only one of Jacob et al. 2018
("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"):

* linear / conv (eq. 7 and 9): ``acc[m, n] = sum_k (x[m, k] - x_zp) * w[n, k] + bias[n]``, computed as
  ``x @ w.T - x_zp * rowsum(w) + bias`` (the zero-point term is folded with precomputed weight row sums,
  eq. 8, instead of a subtraction in the inner loop); weights are symmetric (zero point 0) in PyTorch
  layout ``(out_features, in_features)`` / ``(out_channels, in_channels / groups, kh, kw)``;
* requantization: ``out = clip(round(acc * M) + out_zp)`` with ``M = m0 * 2^-31 * 2^-shift`` evaluated by
  :func:`nanoopt.spec.requantize` (gemmlowp rounding), per channel or per tensor;
* elementwise add of two differently scaled tensors: TFLite's integer ADD (inputs shifted left, rescaled
  to a common scale with their own multipliers, summed, requantized);
* pools: max (exact) and average (integer sum, division rounded half away from zero).

Precision modes: int8 activations x int8 weights with int32 bias ("int8"); int16 activations (zero point
0) x int8 weights with int64 bias ("16x8", TFLite); int16 x int16 with int64 accumulation.

Overflow policy (never a silent wrap): :func:`accumulator_bound` gives the exact worst case ``|acc|`` per
output channel. The raw GEMM whose name promises an int32 result (:func:`gemm_s8s8s32`) raises
:class:`AccumulatorOverflowError` unless :func:`int32_accumulation_is_safe`. The fused layers
(:func:`quantized_linear`, :func:`quantized_conv2d`) always return the exact result, whatever the bound:
here everything is int64; the compiled kernels keep only provably bounded partial sums in int32 (int8 x int8
tiles over at most 131071 values, ``|a w| <= 2^14``) and add zero-point terms, bias and partial sums in int64
(widening), running this reference for longer reductions. A bound beyond ``2^62`` (the range of the wide
requantization) raises everywhere.

Input checks (shared with the Numba backend, so both fail the same way): dtypes (``TypeError``, e.g. a
float array passed as int8), C-contiguity (``ValueError``: the fast kernels index raw memory; call
``np.ascontiguousarray`` explicitly), shapes, zero points outside the type range, invalid multipliers
(``ValueError``), each message naming the argument.
"""

from __future__ import annotations

import numpy as np

from nanoopt.spec import (
    INT32_MAX,
    WIDE_LIMIT,
    QuantSpec,
    check_multiplier,
    check_scale,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize,
)

INT8_RANGE = (-128, 127)
INT16_RANGE = (-32768, 32767)
ADD_LEFT_SHIFT_8BIT = 20  # TFLite's left shift for int8 ADD (headroom: 255 * 2^20 < 2^28)
ADD_LEFT_SHIFT_16BIT = 15  # TFLite's left shift for int16 ADD (65535 * 2^15 < 2^31)


class AccumulatorOverflowError(OverflowError, ValueError):
    """The worst-case accumulator of a kernel does not fit its integer type."""


# --------------------------------------------------------------------------------------- argument checks
def check_array(value, name: str, dtypes: tuple, ndim: int) -> np.ndarray:
    """Check that ``value`` is a C-contiguous ndarray of one of ``dtypes`` with ``ndim`` dimensions.

    >>> check_array(np.zeros((2, 3), np.int8), "x_q", (np.int8,), 2).shape
    (2, 3)
    """
    allowed = ", ".join(np.dtype(d).name for d in dtypes)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array of {allowed}, got {type(value).__name__}")
    if value.dtype not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{name} must have dtype {allowed}, got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (call np.ascontiguousarray first), got strides {value.strides}")
    return value


def check_int(value, name: str, low: int, high: int) -> int:
    """Check an integer scalar in ``[low, high]`` (bools and floats refused) and return it as ``int``.

    >>> check_int(np.int32(5), "x_zero_point", -128, 127)
    5
    """
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer scalar, got {value!r}")
    result = int(array)
    if not low <= result <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {result}")
    return result


def check_out_spec(out_spec: QuantSpec) -> QuantSpec:
    """The integer kernels write signed int8 or int16 outputs."""
    if not isinstance(out_spec, QuantSpec):
        raise TypeError(f"out_spec must be a QuantSpec, got {type(out_spec).__name__}")
    if not out_spec.signed:
        raise ValueError(f"out_spec must be signed (int8/int16 outputs), got {out_spec}")
    return out_spec


def check_requant_params(m0, shift, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (scalar) or per-channel (``(channels,)``) multipliers as int64 arrays of ``(channels,)``.

    >>> check_requant_params(2**30, 1, 3)[1]
    array([1, 1, 1])
    """
    m0_array, shift_array = check_multiplier(m0, shift)
    for name, value in (("m0", m0_array), ("shift", shift_array)):
        if value.ndim == 0:
            continue
        if value.shape != (channels,):
            raise ValueError(f"{name} must be a scalar or have shape ({channels},), got shape {value.shape}")
    return (np.broadcast_to(m0_array, (channels,)).copy(), np.broadcast_to(shift_array, (channels,)).copy())


def check_bias(bias_q, channels: int, wide: bool) -> np.ndarray:
    """Bias: ``None`` (zeros) or a C-contiguous ``(channels,)`` array, int32 (int8 mode) or int64 (16-bit).

    Returned as int64.
    """
    if bias_q is None:
        return np.zeros(channels, dtype=np.int64)
    dtypes = (np.int64,) if wide else (np.int32,)
    check_array(bias_q, "bias_q", dtypes, 1)
    if bias_q.shape[0] != channels:
        raise ValueError(f"bias_q must have shape ({channels},), got {bias_q.shape}")
    return bias_q.astype(np.int64)


def activation_range(x_dtype: np.dtype) -> tuple[int, int]:
    """The integer range of an int8 or int16 activation array."""
    return INT8_RANGE if x_dtype == np.int8 else INT16_RANGE


# ------------------------------------------------------------------------------------------ the bound
def weight_sign_sums(w_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (axis 0): ``P_n = sum_k max(w, 0)`` and ``Q_n = sum_k max(-w, 0)`` as int64.

    >>> weight_sign_sums(np.array([[3, -2, 1]], np.int8))
    (array([4]), array([2]))
    """
    if not isinstance(w_q, np.ndarray) or w_q.dtype.kind != "i" or w_q.ndim < 2:
        raise TypeError(f"w_q must be a signed integer array with >= 2 dimensions, got {w_q!r:.60}")
    weights = w_q.reshape(w_q.shape[0], -1).astype(np.int64)  # (N, K)
    return np.maximum(weights, 0).sum(axis=1), np.maximum(-weights, 0).sum(axis=1)


def bound_from_sign_sums(positive, negative, x_qmin: int, x_qmax: int, x_zero_point: int, bias_q=None) -> np.ndarray:
    """:func:`accumulator_bound` from the sign sums of :func:`weight_sign_sums` (O(N), for cached weights).

    With ``lo = x_qmin - zp <= 0 <= hi = x_qmax - zp``: ``largest = P hi - Q lo + b``,
    ``smallest = P lo - Q hi + b``, bound ``= max(|largest|, |smallest|)``.
    """
    low = int(x_qmin) - int(x_zero_point)
    high = int(x_qmax) - int(x_zero_point)
    if low > 0 or high < 0:
        raise ValueError(f"x_zero_point must lie in [x_qmin, x_qmax] = [{x_qmin}, {x_qmax}], got {x_zero_point}")
    largest = positive * high - negative * low
    smallest = positive * low - negative * high
    if bias_q is not None:
        largest = largest + np.asarray(bias_q, dtype=np.int64)
        smallest = smallest + np.asarray(bias_q, dtype=np.int64)
    return np.maximum(np.abs(largest), np.abs(smallest))


def accumulator_bound(w_q: np.ndarray, x_qmin: int, x_qmax: int, x_zero_point: int, bias_q=None) -> np.ndarray:
    """Exact worst case of ``|sum_k (x_k - x_zero_point) w[n, k] + bias[n]|`` for ``x`` in ``[x_qmin, x_qmax]``.

    Each ``x_k`` is free, so the extremes are reached coordinate-wise:
    ``hi_n = sum_k max(w (x_qmax - zp), w (x_qmin - zp)) + b_n``, ``lo_n`` likewise with ``min``;
    the bound is ``max(|hi_n|, |lo_n|)``. Works for linear ``(N, K)`` and conv ``(OC, IC/g, KH, KW)``
    weights (axis 0 is the output channel). Returns int64 of shape ``(N,)``.

    >>> w = np.array([[127, -127, 1], [0, 0, 0]], dtype=np.int8)
    >>> accumulator_bound(w, -128, 127, 0)
    array([32513,     0])
    """
    positive, negative = weight_sign_sums(w_q)
    return bound_from_sign_sums(positive, negative, x_qmin, x_qmax, x_zero_point, bias_q)


def int32_safe_from_sign_sums(positive, negative, x_qmin: int, x_qmax: int, x_zero_point: int) -> bool:
    """:func:`int32_accumulation_is_safe` from cached sign sums."""
    raw = max(abs(int(x_qmin)), abs(int(x_qmax))) * int((positive + negative).max(initial=0))
    exact = int(bound_from_sign_sums(positive, negative, x_qmin, x_qmax, x_zero_point).max(initial=0))
    return max(raw, exact) <= INT32_MAX


def int32_accumulation_is_safe(w_q: np.ndarray, x_qmin: int, x_qmax: int, x_zero_point: int) -> bool:
    """True when a kernel may accumulate ``x @ w.T`` in int32 without any possible overflow.

    The fast kernels form the raw sum ``sum_k x_k w_nk`` first and subtract ``x_zp * rowsum(w)`` after, so
    both the raw sums (``<= max(|x_qmin|, |x_qmax|) * sum_k |w_nk|``) and the exact accumulator
    (:func:`accumulator_bound`, without bias: the bias is added in int64) must fit int32.

    >>> int32_accumulation_is_safe(np.full((1, 1024), -128, np.int8), -128, 127, 127)
    True
    """
    return int32_safe_from_sign_sums(*weight_sign_sums(w_q), x_qmin, x_qmax, x_zero_point)


def check_wide_bound(positive, negative, x_qmin, x_qmax, x_zero_point, bias) -> None:
    """Raise :class:`AccumulatorOverflowError` if the worst case exceeds ``2^62`` (the wide requant range)."""
    bound = int(bound_from_sign_sums(positive, negative, x_qmin, x_qmax, x_zero_point, bias).max(initial=0))
    if bound > WIDE_LIMIT:
        raise AccumulatorOverflowError(f"worst-case |accumulator| {bound} exceeds 2^62; split the reduction")


# ------------------------------------------------------------------------------------------------ GEMMs
def check_gemm_args(a, w, a_dtypes, w_dtypes) -> None:
    """Shared checks of the raw GEMMs: 2-D C-contiguous operands of the given dtypes sharing K."""
    check_array(a, "a", a_dtypes, 2)
    check_array(w, "w", w_dtypes, 2)
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"a (M, K) and w (N, K) must share K, got a {a.shape} and w {w.shape}")


def gemm_s8s8s32(a: np.ndarray, w: np.ndarray, a_zero_point: int) -> np.ndarray:
    """``acc[m, n] = sum_k (a[m, k] - a_zero_point) * w[n, k]`` for int8 ``a (M, K)``, int8 ``w (N, K)``.

    Computed as ``a @ w.T - a_zero_point * w.sum(1)`` in int64, returned as int32. Raises
    :class:`AccumulatorOverflowError` unless :func:`int32_accumulation_is_safe`.

    >>> a = np.array([[1, 2]], dtype=np.int8); w = np.array([[3, 4], [-1, 0]], dtype=np.int8)
    >>> gemm_s8s8s32(a, w, 1)
    array([[4, 0]], dtype=int32)
    """
    check_gemm_args(a, w, (np.int8,), (np.int8,))
    zero_point = check_int(a_zero_point, "a_zero_point", *INT8_RANGE)
    if not int32_accumulation_is_safe(w, *INT8_RANGE, zero_point):
        raise AccumulatorOverflowError(
            f"int8 GEMM with K={w.shape[1]} could overflow int32; use quantized_linear (widens) or split K"
        )
    weights = w.astype(np.int64)
    row_sums = weights.sum(axis=1)  # (N,)
    acc = a.astype(np.int64) @ weights.T - zero_point * row_sums  # (M, N)
    return acc.astype(np.int32)


def gemm_s16s8s64(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w.T`` for int16 ``a (M, K)`` (zero point 0) and int8 ``w (N, K)``; int64 result (TFLite 16x8).

    >>> gemm_s16s8s64(np.array([[32767, -32768]], np.int16), np.array([[127, 127]], np.int8))
    array([[-127]])
    """
    check_gemm_args(a, w, (np.int16,), (np.int8,))
    check_wide_bound(*weight_sign_sums(w), *INT16_RANGE, 0, None)
    return a.astype(np.int64) @ w.astype(np.int64).T


def gemm_s16s16s64(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w.T`` for int16 ``a (M, K)`` (zero point 0) and int16 ``w (N, K)``; int64 result.

    >>> gemm_s16s16s64(np.array([[-32768]], np.int16), np.array([[-32768]], np.int16))
    array([[1073741824]])
    """
    check_gemm_args(a, w, (np.int16,), (np.int16,))
    check_wide_bound(*weight_sign_sums(w), *INT16_RANGE, 0, None)
    return a.astype(np.int64) @ w.astype(np.int64).T


# ------------------------------------------------------------------------------------- fused epilogue
def check_layer_params(
    x_dtype, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, w_ndim: int, sign_sums=None
):
    """Checks of everything a fused linear/conv layer fixes before seeing its input.

    Modes: int8 activations with int8 ``w`` and int32 bias; int16 activations (zero point must be 0) with
    int8 or int16 ``w`` and int64 bias. ``sign_sums`` (from :func:`weight_sign_sums`) may be passed when
    cached. Returns ``(x_zp, bias64, m0, shift, out_zp)`` with per-channel int64 ``m0``/``shift``.
    """
    check_array(w_q, "w_q", (np.int8, np.int16), w_ndim)
    wide = np.dtype(x_dtype) == np.int16
    if not wide and w_q.dtype != np.int8:
        raise TypeError(f"int8 x_q needs int8 w_q, got {w_q.dtype}")
    x_zp = check_int(x_zero_point, "x_zero_point", *activation_range(x_dtype))
    if wide and x_zp != 0:
        raise ValueError(f"int16 activations are symmetric: x_zero_point must be 0, got {x_zp}")
    channels = w_q.shape[0]
    bias = check_bias(bias_q, channels, wide)
    m0_array, shift_array = check_requant_params(m0, shift, channels)
    check_out_spec(out_spec)
    out_zp = check_int(out_zero_point, "out_zero_point", out_spec.qmin, out_spec.qmax)
    positive, negative = weight_sign_sums(w_q) if sign_sums is None else sign_sums
    check_wide_bound(positive, negative, *activation_range(x_dtype), x_zp, bias)
    return x_zp, bias, m0_array, shift_array, out_zp


def check_layer_args(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, x_ndim: int):
    """Shared checks of the fused linear/conv layers: the input, then :func:`check_layer_params`."""
    check_array(x_q, "x_q", (np.int8, np.int16), x_ndim)
    return check_layer_params(x_q.dtype, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, x_ndim)


def _epilogue(acc, bias, m0, shift, out_zp, out_spec, relu, channel_axis):
    """``acc + bias`` -> requantize per channel -> optional ReLU (clamp at the output zero point)."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    acc = acc + bias.reshape(shape)
    out = requantize(acc.astype(np.int64), m0.reshape(shape), shift.reshape(shape), out_zp, out_spec)
    if relu:
        out = np.maximum(out, out_spec.dtype.type(out_zp))
    return out


def quantized_linear(x_q: np.ndarray, w_q: np.ndarray, bias_q: np.ndarray | None, x_zero_point: int, m0, shift,
                     out_zero_point: int, out_spec: QuantSpec, relu: bool = False) -> np.ndarray:  # fmt: skip
    """Fused quantized linear: ``out = clip(requant(sum_k (x - x_zp) w[n, k] + bias[n]) + out_zp)``.

    ``x_q (M, K)`` int8 or int16, ``w_q (N, K)``, ``bias_q (N,)`` int32 (int8 mode) / int64 (16-bit) or
    ``None``, ``m0``/``shift`` scalars or ``(N,)``; ReLU clamps at ``out_zero_point``. Returns ``(M, N)``
    of ``out_spec.dtype``.

    >>> x = np.array([[10, -3]], np.int8); w = np.array([[2, 1], [-1, 4]], np.int8)
    >>> m0, shift = quantize_multiplier(0.5)
    >>> quantized_linear(x, w, np.array([1, 0], np.int32), 0, m0, shift, 0, QuantSpec())
    array([[  9, -11]], dtype=int8)
    """
    x_zp, bias, m0_array, shift_array, out_zp = check_layer_args(
        x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, 2
    )
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x_q (M, K) and w_q (N, K) must share K, got {x_q.shape} and {w_q.shape}")
    weights = w_q.astype(np.int64)
    acc = x_q.astype(np.int64) @ weights.T - x_zp * weights.sum(axis=1)  # (M, N)
    return _epilogue(acc, bias, m0_array, shift_array, out_zp, out_spec, relu, 1)


# ------------------------------------------------------------------------------------------------ conv
def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each ``>= minimum``, as a 2-tuple."""
    items = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    result = tuple(check_int(item, name, minimum, 2**31 - 1) for item in items)
    return result  # type: ignore[return-value]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, name: str) -> int:
    """``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1`` (PyTorch's formula)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(
            f"{name}: the kernel ({kernel}, dilation {dilation}) does not fit the padded input ({size}, {padding})"
        )
    return out


def check_conv_geometry(x_q, w_q, stride, padding, dilation, groups):
    """Validate conv shapes; returns ``(stride, padding, dilation, groups, out_h, out_w)``."""
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    groups = check_int(groups, "groups", 1, 2**31 - 1)
    channels, weight_channels = x_q.shape[1], w_q.shape[1]
    if channels != groups * weight_channels:
        raise ValueError(
            f"x_q has {channels} channels but w_q (OC, IC/groups, KH, KW) = {w_q.shape} with groups={groups} "
            f"expects {groups * weight_channels}"
        )
    if w_q.shape[0] % groups:
        raise ValueError(f"out channels {w_q.shape[0]} must be divisible by groups={groups}")
    out_h = conv_output_size(x_q.shape[2], w_q.shape[2], stride[0], padding[0], dilation[0], "height")
    out_w = conv_output_size(x_q.shape[3], w_q.shape[3], stride[1], padding[1], dilation[1], "width")
    return stride, padding, dilation, groups, out_h, out_w


def im2col(x: np.ndarray, kernel: tuple[int, int], stride, padding, dilation, pad_value: int) -> np.ndarray:
    """Columns ``(N, C, KH, KW, OH, OW)`` of ``x (N, C, H, W)``, padded with ``pad_value`` (same dtype)."""
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = padding, stride, dilation, kernel
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((x.shape[0], x.shape[1], kh, kw, out_h, out_w), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            columns = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            cols[:, :, i, j] = padded[:, :, rows, columns]
    return cols


def quantized_conv2d(x_q: np.ndarray, w_q: np.ndarray, bias_q: np.ndarray | None, x_zero_point: int, m0, shift,
                     out_zero_point: int, out_spec: QuantSpec, stride=1, padding=0, dilation=1, groups: int = 1,
                     relu: bool = False) -> np.ndarray:  # fmt: skip
    """Fused quantized 2-D convolution (cross-correlation, PyTorch semantics) in NCHW.

    ``acc[n, o, y, x] = sum_{c, i, j} (xpad[n, g*C_g + c, y*sh + i*dh, x*sw + j*dw] - x_zp) w[o, c, i, j]``
    with ``g = o // (OC / groups)``; the padding holds ``x_zero_point`` (real zero) so it adds nothing.
    Then the same epilogue as :func:`quantized_linear` (bias, per-channel requantization, optional ReLU).
    ``groups == in_channels == out_channels`` is a depthwise convolution.

    >>> x = np.ones((1, 1, 3, 3), np.int8); w = np.ones((1, 1, 3, 3), np.int8)
    >>> quantized_conv2d(x, w, None, 0, 2**30, 0, 0, QuantSpec(), padding=1)[0, 0]
    array([[2, 3, 2],
           [3, 5, 3],
           [2, 3, 2]], dtype=int8)
    """
    x_zp, bias, m0_array, shift_array, out_zp = check_layer_args(
        x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, 4
    )
    stride, padding, dilation, groups, out_h, out_w = check_conv_geometry(x_q, w_q, stride, padding, dilation, groups)
    out_channels, group_channels, kh, kw = w_q.shape
    cols = im2col(x_q, (kh, kw), stride, padding, dilation, x_zp)  # (N, C, KH, KW, OH, OW)
    batch = x_q.shape[0]
    cols = cols.reshape(batch, groups, group_channels * kh * kw, out_h * out_w).astype(np.int64)
    weights = w_q.reshape(groups, out_channels // groups, group_channels * kh * kw).astype(np.int64)
    acc = np.einsum("gok,ngkp->ngop", weights, cols) - x_zp * weights.sum(axis=2)[None, :, :, None]
    acc = acc.reshape(batch, out_channels, out_h, out_w)
    return _epilogue(acc, bias, m0_array, shift_array, out_zp, out_spec, relu, 1)


# ----------------------------------------------------------------------------------------------- pools
def check_pool_args(x_q, kernel_size, stride, padding):
    """Validate a pool; returns ``(kernel, stride, padding, out_h, out_w)``. Padding <= kernel / 2."""
    check_array(x_q, "x_q", (np.int8, np.int16), 4)
    kernel = pair(kernel_size, "kernel_size", 1)
    stride = kernel if stride is None else pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding must be at most half the kernel, got padding={padding}, kernel={kernel}")
    out_h = conv_output_size(x_q.shape[2], kernel[0], stride[0], padding[0], 1, "height")
    out_w = conv_output_size(x_q.shape[3], kernel[1], stride[1], padding[1], 1, "width")
    return kernel, stride, padding, out_h, out_w


def quantized_max_pool2d(x_q: np.ndarray, kernel_size, stride=None, padding=0) -> np.ndarray:
    """Max pool on integer codes (exact: dequantization is monotonic, so scale and zero point carry over).

    Padding (at most half the kernel) holds the dtype minimum, so it is never selected.

    >>> quantized_max_pool2d(np.arange(16, dtype=np.int8).reshape(1, 1, 4, 4), 2)[0, 0]
    array([[ 5,  7],
           [13, 15]], dtype=int8)
    """
    kernel, stride, padding, out_h, out_w = check_pool_args(x_q, kernel_size, stride, padding)
    lowest = np.iinfo(x_q.dtype).min
    cols = im2col(x_q, kernel, stride, padding, (1, 1), lowest)  # (N, C, KH, KW, OH, OW)
    return cols.max(axis=(2, 3))


def rounding_divide(total: np.ndarray, count) -> np.ndarray:
    """``total / count`` rounded half away from zero, in integers (``count > 0``)."""
    half = count // 2
    return np.where(total >= 0, (total + half) // count, -((-total + half) // count))


def quantized_avg_pool2d(
    x_q: np.ndarray, zero_point: int, kernel_size, stride=None, padding=0, count_include_pad: bool = True
) -> np.ndarray:
    """Average pool on integer codes with the input's scale and zero point.

    ``out = zp + round(sum_window (q - zp) / count)`` where the division rounds half away from zero
    (so the rounding is symmetric around real zero, like TFLite's ``(acc +- count/2) / count``). Padding
    holds real zero (``zp``); ``count`` is the kernel area if ``count_include_pad`` (PyTorch's default)
    else the number of real pixels in the window.

    >>> x = np.array([[[[1, 2], [3, 5]]]], np.int8)
    >>> quantized_avg_pool2d(x, 0, 2)[0, 0]
    array([[3]], dtype=int8)
    """
    kernel, stride, padding, out_h, out_w = check_pool_args(x_q, kernel_size, stride, padding)
    zp = check_int(zero_point, "zero_point", *activation_range(x_q.dtype))
    cols = im2col(x_q, kernel, stride, padding, (1, 1), zp).astype(np.int64)
    total = (cols - zp).sum(axis=(2, 3))  # (N, C, OH, OW)
    if count_include_pad:
        count = np.int64(kernel[0] * kernel[1])
    else:
        ones = np.ones((1, 1) + x_q.shape[2:], dtype=np.int8)
        count = im2col(ones, kernel, stride, padding, (1, 1), 0).astype(np.int64).sum(axis=(2, 3))
    return (rounding_divide(total, count) + zp).astype(x_q.dtype)


# ------------------------------------------------------------------------------------------- add, relu
def add_multipliers(a_scale, b_scale, out_scale, spec: QuantSpec):
    """TFLite ADD parameters: ``(left_shift, (m_a, s_a), (m_b, s_b), (m_out, s_out))``.

    ``twice_max = 2 max(a_scale, b_scale)``; input multipliers ``a_scale / twice_max`` and
    ``b_scale / twice_max`` (<= 1/2), output multiplier ``twice_max / (2^left_shift * out_scale)``, all in
    float64 from the float32 scales; ``left_shift`` is 20 for <= 8 bits and 15 for 16 bits.
    """
    a64 = float(check_scale(a_scale, "a_scale"))
    b64 = float(check_scale(b_scale, "b_scale"))
    out64 = float(check_scale(out_scale, "out_scale"))
    for name, value in (("a_scale", a_scale), ("b_scale", b_scale), ("out_scale", out_scale)):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar (per-tensor), got shape {np.shape(value)}")
    left_shift = ADD_LEFT_SHIFT_8BIT if spec.bits <= 8 else ADD_LEFT_SHIFT_16BIT
    twice_max = 2.0 * max(a64, b64)
    return (
        left_shift,
        quantize_multiplier(a64 / twice_max),
        quantize_multiplier(b64 / twice_max),
        quantize_multiplier(twice_max / (2.0**left_shift * out64)),
    )


def check_add_args(a_q, a_zp, b_q, b_zp, out_zp, spec: QuantSpec) -> tuple[int, int, int]:
    """Shared checks of :func:`quantized_add`; returns the three zero points as ints."""
    check_out_spec(spec)
    for name, value in (("a_q", a_q), ("b_q", b_q)):
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array of {spec.dtype}, got {type(value).__name__}")
        if value.dtype != spec.dtype:
            raise TypeError(f"{name} must have dtype {spec.dtype} (from spec), got {value.dtype}")
        if not value.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (call np.ascontiguousarray first)")
    if a_q.shape != b_q.shape:
        raise ValueError(f"a_q and b_q must have the same shape, got {a_q.shape} and {b_q.shape}")
    return tuple(
        check_int(value, name, spec.qmin, spec.qmax)
        for name, value in (("a_zp", a_zp), ("b_zp", b_zp), ("out_zp", out_zp))
    )  # type: ignore[return-value]


def quantized_add(
    a_q: np.ndarray,
    a_scale,
    a_zp: int,
    b_q: np.ndarray,
    b_scale,
    b_zp: int,
    out_scale,
    out_zp: int,
    spec: QuantSpec,
    relu: bool = False,
) -> np.ndarray:
    """Integer-only sum of two tensors with different scales (TFLite ADD), for residual connections.

    With the parameters of :func:`add_multipliers`:
    ``a' = MBQM((a - a_zp) * 2^left_shift, m_a, s_a)``, ``b'`` likewise (int32),
    ``out = clip(MBQM(a' + b', m_out, s_out) + out_zp)``; ReLU clamps at ``out_zp``. ``MBQM`` is
    :func:`nanoopt.spec.multiply_by_quantized_multiplier`. Inputs and output share ``spec``'s dtype.

    >>> a = np.array([10, -20], np.int8); b = np.array([4, 4], np.int8)
    >>> quantized_add(a, 0.5, 0, b, 0.25, 0, 0.5, 0, QuantSpec())
    array([ 12, -18], dtype=int8)
    """
    a_zp, b_zp, out_zp = check_add_args(a_q, a_zp, b_q, b_zp, out_zp, spec)
    left_shift, (m_a, s_a), (m_b, s_b), (m_out, s_out) = add_multipliers(a_scale, b_scale, out_scale, spec)
    shifted_a = ((a_q.astype(np.int64) - a_zp) << left_shift).astype(np.int32)  # fits: see add_multipliers
    shifted_b = ((b_q.astype(np.int64) - b_zp) << left_shift).astype(np.int32)
    total = multiply_by_quantized_multiplier(shifted_a, m_a, s_a) + multiply_by_quantized_multiplier(
        shifted_b, m_b, s_b
    )  # int32, |.| <= 2^30
    out = requantize(total, m_out, s_out, out_zp, spec)
    if relu:
        out = np.maximum(out, spec.dtype.type(out_zp))
    return out


def quantized_relu(x_q: np.ndarray, zero_point: int) -> np.ndarray:
    """ReLU on codes: ``max(q, zero_point)`` (real zero is the zero point). Same dtype, scale and zero point.

    >>> quantized_relu(np.array([-5, 3, 9], np.int8), 3)
    array([3, 3, 9], dtype=int8)
    """
    if not isinstance(x_q, np.ndarray) or x_q.dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
        raise TypeError(f"x_q must be an int8 or int16 NumPy array, got {getattr(x_q, 'dtype', type(x_q))}")
    zp = check_int(zero_point, "zero_point", *activation_range(x_q.dtype))
    return np.maximum(x_q, x_q.dtype.type(zp))
