"""Integer-only GELU, softmax and LayerNorm of I-BERT (Kim et al. 2021): pure-NumPy reference kernels.

Kim, Gholami, Yao, Mahoney & Keutzer, "I-BERT: Integer-only BERT Quantization", ICML 2021. Every function takes
integer codes ``q`` together with the real scaling factor ``S`` they stand for (``x = S q``) and returns integer
codes with their new scaling factor -- the "scaling factor carried alongside" of the paper. The scaling factors
are static (known when the model is converted), so every constant that depends on them (``floor(b / S)``,
``floor(c / (a S^2))``, ``floor(ln 2 / S)``, ...) is an integer computed once; what runs on activations is integer
arithmetic only: additions, multiplications, comparisons, shifts and integer division, in int64 with the worst
case of every intermediate checked against 2^62 (:func:`check_range`).

* :func:`i_poly` -- Algorithm 1: a second-order polynomial ``a (x + b)^2 + c`` on integers;
* :func:`i_erf`, :func:`i_gelu` -- Algorithm 2: ``erf`` by the clipped second-order polynomial of eq. (8),
  ``GELU(x) = x (1 + erf(x / sqrt 2)) / 2``;
* :func:`i_exp`, :func:`i_softmax` -- Algorithm 3: ``exp(x) = 2^-z exp(p)`` with ``x = -z ln 2 + p``,
  ``p`` in ``(-ln 2, 0]``, ``exp(p)`` by a second-order polynomial, ``2^-z`` by a right shift; softmax divides by
  the row sum through one integer reciprocal per row;
* :func:`i_sqrt` -- Algorithm 4: ``floor(sqrt(n))`` by Newton's iteration on integers;
* :func:`i_layernorm` -- section 3.5: mean, variance and the standard deviation (through :func:`i_sqrt`) in
  integers.

Approximation errors of the polynomials themselves (measured on a dense grid, before any rounding of the
integers): ``|L(p) / exp(p) - 1| <= 3.1e-3`` on ``[-ln 2, 0]`` (:data:`EXP_RELATIVE_ERROR`);
``|L(x) - erf(x)| <= 0.0963`` (largest near 0, where GELU multiplies it by ``x / 2``);
``|i-GELU(x) - GELU(x)| <= 0.0182`` for every real x (:data:`GELU_ABSOLUTE_ERROR`, largest near x = 2.35).

>>> import numpy as np
>>> q, s = i_exp(np.array([0, -1000, -5000]), 1e-3)
>>> np.round(q * s, 3).tolist()  # exp(0), exp(-1), exp(-5)
[1.0, 0.368, 0.007]
"""

from __future__ import annotations

import math

import numpy as np

EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344  # L(p) = a (p + b)^2 + c ~ exp(p) on [-ln 2, 0] (eq. 13)
ERF_A, ERF_B = -0.2888, -1.769  # L(x) = sgn(x) [a (min(|x|, -b) + b)^2 + 1] ~ erf(x) (eq. 8)
LN2 = math.log(2.0)
EXP_RELATIVE_ERROR = 3.1e-3  # max |L(p) / exp(p) - 1| on [-ln 2, 0], measured on 2e6 points
GELU_ABSOLUTE_ERROR = 0.0182  # max |x / 2 (1 + L(x / sqrt 2)) - GELU(x)| over the reals, measured on 4e6 points
EXP_CLIP = 30  # inputs below -30 ln 2 are clipped there (exp < 1e-9; I-BERT's n)
INT64_LIMIT = 2**62  # every intermediate stays below this: int64 with a bit to spare
SOFTMAX_RECIPROCAL_BITS = 54  # softmax divides by the row sum through floor(2^54 / sum)
SOFTMAX_SUM_BITS = 34  # exponentials are shifted so that a row's sum stays below 2^34: the reciprocal keeps 20 bits
GELU_INPUT_BITS = 24  # i_gelu coarsens a scale finer than 2^-24 (so that i_erf's constants stay below 2^51)
GELU_FRACTION_BITS = 20  # 1 + erf is kept to about 20 bits, so that x (1 + erf) fits int64 for |x| < 2^41
NORM_RECIPROCAL_BITS = 61  # LayerNorm divides by the integer standard deviation through floor(2^61 / std)
NORM_FRACTION_BITS = 30  # normalised values carry 30 fractional bits (scale sqrt(N) / 2^30), as in I-BERT


def check_range(bound: int, what: str, limit: int = INT64_LIMIT) -> None:
    """Refuse a computation whose worst-case intermediate ``bound`` reaches ``limit`` (2^62 by default).

    >>> check_range(2**40, "a product")
    >>> check_range(2**63, "a product")
    Traceback (most recent call last):
    ...
    OverflowError: a product could reach 9223372036854775808, which does not fit int64 (limit 2^62)
    """
    if bound >= limit:
        raise OverflowError(f"{what} could reach {bound}, which does not fit int64 (limit 2^{limit.bit_length() - 1})")


def _codes(q, name: str) -> np.ndarray:
    array = np.asarray(q)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer codes, got dtype {array.dtype}")
    return array.astype(np.int64)


def _scale(scale, name: str = "scale") -> np.ndarray:
    value = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(value)) or np.any(value <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
    return value


def _max_abs(q: np.ndarray) -> int:
    return int(np.abs(q).max()) if q.size else 0


# --------------------------------------------------------------------------------------------- Algorithm 1
def i_poly(q, scale, a: float, b: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 (I-POLY): ``a (x + b)^2 + c`` of ``x = S q`` on integers.

    ``q_b = floor(b / S)``, ``q_c = floor(c / (a S^2))`` (integer constants), ``q_out = (q + q_b)^2 + q_c``,
    ``S_out = a S^2``; then ``S_out q_out ~= a (x + b)^2 + c`` (``S_out`` is negative when ``a`` is). ``scale``
    may be an array broadcasting against ``q`` (per channel).

    >>> q, s = i_poly(np.array([0, 8]), 0.125, 1.0, 2.0, 3.0)  # (x + 2)^2 + 3 at x = 0 and 1
    >>> (q * s).round(6).tolist()
    [7.0, 12.0]
    """
    codes, s = _codes(q, "q"), _scale(scale)
    q_b = np.floor(b / s).astype(np.int64)
    q_c = np.floor(c / (a * s * s)).astype(np.int64)
    check_range((_max_abs(codes) + _max_abs(q_b)) ** 2 + _max_abs(q_c), "i_poly: (q + q_b)^2 + q_c")
    shifted = codes + q_b
    return shifted * shifted + q_c, a * s * s


# --------------------------------------------------------------------------------------------- Algorithm 2
def i_erf(q, scale) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2 (I-ERF): ``erf(x)``, ``x = S q``, by ``L(x) = sgn(x) [a (min(|x|, -b) + b)^2 + 1]`` (eq. 8,
    ``a = -0.2888``, ``b = -1.769``) on integers.

    With ``q_b = floor(-b / S)`` (the clip point) and ``q_c = floor(1 / (|a| S^2))``:
    ``q_out = sgn(q) (q_c - (min(|q|, q_b) - q_b)^2)``, ``S_out = |a| S^2`` (the paper's I-POLY with ``a < 0``,
    written with a positive scale). Error: ``|L - erf| <= 0.0963`` plus the rounding of the constants.

    >>> q, s = i_erf(np.array([-20000, 0, 5000]), 1e-4)
    >>> np.round(q * s, 2).tolist()  # erf(-2) = -0.995, erf(0.5) = 0.52
    [-1.0, 0.0, 0.53]
    """
    codes, s = _codes(q, "q"), _scale(scale)
    q_b = np.floor(-ERF_B / s).astype(np.int64)
    q_c = np.floor(1.0 / (-ERF_A * s * s)).astype(np.int64)
    check_range(_max_abs(q_b) ** 2 + _max_abs(q_c), "i_erf: q_c - (min(|q|, q_b) - q_b)^2")
    d = np.minimum(np.abs(codes), q_b) - q_b  # in [-q_b, 0]
    return np.sign(codes) * (q_c - d * d), -ERF_A * s * s


def i_gelu(q, scale) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2 (I-GELU): ``GELU(x) = x (1 + erf(x / sqrt 2)) / 2`` of ``x = S q`` on integers.

    ``(q_erf, S_erf) = i_erf(q, S / sqrt 2)``, ``q_1 = floor(1 / S_erf)``; then, keeping about 20 bits of
    ``1 + erf`` (``k = max(0, bits(q_1) - 20)`` per channel, an arithmetic right shift),
    ``q_out = q ((q_erf + q_1) >> k)``, ``S_out = S S_erf 2^k / 2``. A scale finer than 2^-24 is first coarsened
    to ``S 2^c >= 2^-24`` by ``q >> c`` (keeps ``q_b^2`` and ``q_c`` of :func:`i_erf` below 2^51; the output
    scale then uses ``S 2^c``). Per-channel ``scale`` (an array along the last axis) gives per-channel constants
    and output scales. ``|q| < 2^41`` keeps the product below 2^62 (checked). Error against exact GELU:
    ``GELU_ABSOLUTE_ERROR`` (0.0182) plus rounding of a few ``S |x|``.

    >>> q, s = i_gelu(np.array([-10000, 0, 10000, 30000]), 1e-4)
    >>> np.round(q * s, 3).tolist()  # GELU(-1) = -0.159, GELU(0), GELU(1) = 0.841, GELU(3) = 2.996
    [-0.163, 0.0, 0.837, 3.0]
    """
    codes, s = _codes(q, "q"), _scale(scale)
    coarsen = np.maximum(0, np.ceil(-np.log2(s)).astype(np.int64) - GELU_INPUT_BITS)  # S 2^c >= 2^-24
    if np.any(coarsen):
        codes, s = codes >> coarsen, s * np.exp2(coarsen)
    q_erf, s_erf = i_erf(codes, s / math.sqrt(2.0))
    q_one = np.floor(1.0 / s_erf).astype(np.int64)
    _, bits = np.frexp(np.maximum(q_one, 1).astype(np.float64))  # q_1 < 2^51: exact bit lengths
    k = np.maximum(0, bits.astype(np.int64) - GELU_FRACTION_BITS)  # per channel
    factor = (q_erf + q_one) >> k  # 1 + erf >= 0, about 2^20 units
    check_range(_max_abs(codes) * (_max_abs((2 * q_one) >> k) + 1), "i_gelu: q (q_erf + q_1)")
    return codes * factor, s * s_erf * np.exp2(k) / 2.0


# --------------------------------------------------------------------------------------------- Algorithm 3
def i_exp(q, scale: float) -> tuple[np.ndarray, float]:
    """Algorithm 3 (I-EXP): ``exp(x)`` of ``x = S q <= 0`` on integers.

    ``q_ln2 = floor(ln 2 / S)``; ``q`` is clipped at ``-30 q_ln2``; ``z = floor(-q / q_ln2)``,
    ``q_p = q + z q_ln2`` (so ``p = S q_p`` in ``(-ln 2, 0]``); ``(q_L, S_L) = i_poly(q_p, S, 0.3585, 1.353, 0.344)``
    (eq. 13); ``q_out = q_L >> z`` (``exp(x) = 2^-z exp(p)``), ``S_out = S_L``. Needs ``0 < S <= ln 2 / 16``
    (at least 16 steps per ``ln 2``; finer is more accurate) and ``S >= 2^-24`` (``q_L < 2^51``).
    Error: ``|S_out q_out - exp(x)| <= (3.1e-3 + 4 S) exp(x) + S_out``.

    >>> q, s = i_exp(np.array([0, -693, -2000]), 1e-3)
    >>> (q * s).round(4).tolist()  # exp(0), exp(-0.693), exp(-2) = 0.1353
    [1.0003, 0.5001, 0.1349]
    """
    codes = _codes(q, "q")
    s = float(_scale(scale))
    if not 2.0**-24 <= s <= LN2 / 16:
        raise ValueError(f"i_exp: scale must lie in [2^-24, ln 2 / 16] (at least 16 steps per ln 2), got {scale!r}")
    if codes.size and codes.max() > 0:
        raise ValueError(f"i_exp: the codes must be <= 0 (subtract the row maximum first), got max {codes.max()}")
    q_ln2 = int(math.floor(LN2 / s))
    clipped = np.maximum(codes, -EXP_CLIP * q_ln2)
    z = (-clipped) // q_ln2  # 0..30
    q_poly, s_poly = i_poly(clipped + z * q_ln2, s, EXP_A, EXP_B, EXP_C)
    return q_poly >> z, float(s_poly)


def i_softmax(q, scale: float, mask: np.ndarray | None = None, bits: int = 8) -> np.ndarray:
    """Algorithm 3 (softmax): codes ``p`` in ``[0, 2^bits - 1]`` of ``softmax(S q)`` along the last axis, scale
    ``1 / (2^bits - 1)``.

    Per row: ``q - max(q)`` (over the unmasked entries; ``mask`` True = excluded, every row keeps one);
    ``(e, S_e) = i_exp(.)`` (with ``S`` coarsened by a right shift of ``q`` below 2^-16, see :func:`i_exp`);
    ``e`` of masked entries is 0; ``e`` is shifted right by ``r`` so that the row sum stays below 2^34
    (``r`` per row, from the largest exponential ``e(0)`` and the row's count of unmasked entries, so that a row
    gives the same codes whatever else is masked or batched with it); ``f = floor(2^54 / sum)`` (one integer
    division per row); ``p = (e f (2^bits - 1) + 2^53) >> 54`` (rounded ``(2^bits - 1) e / sum``, never above
    ``2^bits - 1`` since ``e f <= 2^54``). Output int64.

    >>> i_softmax(np.array([[0, 0], [1000, 0]]), 1e-3).tolist()  # 255 softmax(1, 0) = (186.4, 68.6)
    [[127, 127], [186, 69]]
    """
    codes = _codes(q, "q")
    s = float(_scale(scale))
    if not 1 <= bits <= 8:
        raise ValueError(f"i_softmax: bits must be in [1, 8], got {bits}")
    if codes.ndim == 0 or codes.shape[-1] == 0:
        raise ValueError(f"i_softmax: need rows of at least one score, got shape {codes.shape}")
    coarsen = max(0, math.ceil(-math.log2(s)) - 16)  # S 2^coarsen >= 2^-16: e(0) ~ 2.8 / S^2 stays below 2^34
    if coarsen:
        codes, s = codes >> coarsen, s * 2.0**coarsen
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), codes.shape)
        if np.any(mask.all(axis=-1)):
            raise ValueError("i_softmax: every row needs at least one unmasked score")
        low = np.iinfo(np.int64).min
        row_max = np.where(mask, low, codes).max(axis=-1, keepdims=True)
        codes = np.where(mask, row_max, codes)
    else:
        row_max = codes.max(axis=-1, keepdims=True)
    check_range(2 * _max_abs(codes) + 1, "i_softmax: q - max(q)")
    e, _ = i_exp(codes - row_max, s)
    if mask is not None:
        e = np.where(mask, 0, e)
    largest, _ = i_exp(np.zeros(1, np.int64), s)  # e(0), the largest exponential
    counts = codes.shape[-1] if mask is None else (~mask).sum(axis=-1, keepdims=True)  # unmasked per row
    _, sum_bits = np.frexp((int(largest[0]) * np.asarray(counts, np.int64)).astype(np.float64))
    e = e >> np.maximum(0, sum_bits.astype(np.int64) - SOFTMAX_SUM_BITS)  # per row: a row's result ignores the others
    total = e.sum(axis=-1, keepdims=True)  # >= e(0) >> r >= 1: the row maximum contributes e(0)
    factor = (np.int64(1) << SOFTMAX_RECIPROCAL_BITS) // total
    top = (1 << bits) - 1
    return (e * factor * top + (np.int64(1) << (SOFTMAX_RECIPROCAL_BITS - 1))) >> SOFTMAX_RECIPROCAL_BITS


# --------------------------------------------------------------------------------------------- Algorithm 4
def i_sqrt(n) -> np.ndarray:
    """Algorithm 4 (I-SQRT): ``floor(sqrt(n))`` of integers ``0 <= n < 2^62`` by Newton's iteration.

    ``x_0 = 2^ceil(bits(n) / 2) >= sqrt(n)``; ``x_{i+1} = floor((x_i + floor(n / x_i)) / 2)`` while it decreases
    (from above, Newton's iterates decrease monotonically to ``floor(sqrt(n))``, then stop decreasing);
    ``n = 0`` gives 0. Elementwise on arrays, int64.

    >>> i_sqrt(np.array([0, 1, 3, 4, 15, 16, 2**61])).tolist()
    [0, 1, 1, 2, 3, 4, 1518500249]
    """
    values = _codes(n, "n")
    if values.size and (values.min() < 0 or values.max() >= INT64_LIMIT):
        raise ValueError(f"i_sqrt: n must lie in [0, 2^62), got range [{values.min()}, {values.max()}]")
    positive = np.maximum(values, 1)
    _, exponent = np.frexp(positive.astype(np.float64))  # >= bits(n): float64 rounding can only raise it
    x = np.left_shift(np.int64(1), (exponent.astype(np.int64) + 1) // 2)
    while True:
        nxt = (x + positive // x) >> 1
        smaller = nxt < x
        if not smaller.any():
            break
        x = np.where(smaller, nxt, x)
    return np.where(values == 0, 0, x)


def i_layernorm(q, scale: float, eps: float = 0.0) -> tuple[np.ndarray, float]:
    """Section 3.5: ``(x - mean(x)) / sqrt(var(x) + eps)`` along the last axis (N values) of ``x = S q``, on integers.

    ``mu = floor((sum q + N // 2) / N)`` (the rounded mean), ``y = q - mu``; ``v = sum y^2 + q_eps`` with
    ``q_eps = round(N eps / S^2)`` (so ``v ~ N (var + eps) / S^2``); per row, ``k = min(30, (61 - bits(v)) // 2)``
    extra bits for the root: ``sigma = i_sqrt(v 4^k)`` (Algorithm 4; ``sigma ~ 2^k sqrt(N) std / S``, so the
    floor of the root costs a relative ``2^-k / sqrt(v)`` at most); ``f = floor(2^61 / sigma)`` (one division per
    row); ``out = (y f) >> (31 - k)`` ``~ 2^30 y / sqrt(v)``, scale ``sqrt(N) / 2^30``:
    ``out sqrt(N) / 2^30 ~ y S / std``. (I-BERT omits ``eps`` and the extra bits; eps is kept here, as the float
    LayerNorm has it.) A constant row (``v = 0``) gives 0. ``|out| <= 2^30 + 1`` since ``|y| <= sqrt(v)``.

    >>> out, s = i_layernorm(np.array([[10, 20, 30, 40]]), 0.1)
    >>> np.round(out * s, 4).tolist()  # (x - 2.5) / 1.118
    [[-1.3416, -0.4472, 0.4472, 1.3416]]
    """
    codes = _codes(q, "q")
    s = float(_scale(scale))
    n = codes.shape[-1]
    if codes.ndim == 0 or n == 0:
        raise ValueError(f"i_layernorm: need rows of at least one value, got shape {codes.shape}")
    peak = _max_abs(codes)
    check_range(n * peak + n, "i_layernorm: sum q")
    mean = (codes.sum(axis=-1, keepdims=True) + n // 2) // n
    y = codes - mean
    q_eps = int(round(n * float(eps) / (s * s)))
    check_range(n * (2 * peak + 1) ** 2 + q_eps, "i_layernorm: sum (q - mean)^2 + q_eps")
    v = (y * y).sum(axis=-1, keepdims=True) + q_eps
    _, bits = np.frexp(np.maximum(v, 1).astype(np.float64))  # >= bits(v): float64 rounding can only raise it
    k = np.clip((NORM_RECIPROCAL_BITS - bits.astype(np.int64)) // 2, 0, NORM_RECIPROCAL_BITS - NORM_FRACTION_BITS)
    sigma = i_sqrt(v << (2 * k))
    factor = (np.int64(1) << NORM_RECIPROCAL_BITS) // np.maximum(sigma, 1)
    out = (y * factor) >> (NORM_RECIPROCAL_BITS - NORM_FRACTION_BITS - k)
    return np.where(sigma == 0, 0, out), math.sqrt(n) / 2.0**NORM_FRACTION_BITS
