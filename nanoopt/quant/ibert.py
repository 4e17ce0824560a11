"""The integer-only nonlinear layers of the W8A8 GPT (``W8A8Config(nonlinear="ibert")``): I-BERT's softmax, GELU and
LayerNorm (Kim et al. 2021) between the int8 Linears of :mod:`nanoopt.quant.transformer`.

What runs on integers in this mode (the kernels are :mod:`nanoopt.kernels.ibert`; every constant below is an
integer computed once from the static scales):

* **LayerNorm** (``ln_1``, ``ln_2``, ``ln_f``; section 3.5, Algorithm 4): its float input (the residual stream) is
  quantized onto a calibrated symmetric int16 grid ``s_in`` (min/max observer; the one float-to-integer boundary
  per LayerNorm), normalised by :func:`~nanoopt.kernels.ibert.i_layernorm` (integer mean, variance and square
  root; ``z`` with scale ``sqrt(N) / 2^30``), then the affine ``gamma z + beta`` goes straight onto the int8 input
  grid ``(s_o, z_o)`` of the Linear that reads it: ``acc = sgn(gamma) z + round(beta / (|gamma| sqrt(N) 2^-30))``,
  ``q = requantize(acc, M_c)`` with a fixed-point multiplier ``M_c = |gamma_c| sqrt(N) 2^-30 / s_o`` per channel
  (Jacob et al. 2018, eq. 7). A channel whose ``M_c < 2^-32`` (its normalised part moves the output by under a
  quarter of a step) outputs the constant code of ``beta``.
* **GELU** (Algorithm 2): on ``c_fc``'s int32 accumulator plus its int32 bias (scale ``s_x s_w`` per output
  channel), :func:`~nanoopt.kernels.ibert.i_gelu`, then requantized per channel onto ``mlp.c_proj``'s int8 grid.
* **softmax** (Algorithm 3): on the int32 scores ``q k^T`` (scale ``s_q s_k / sqrt(D)``) with the causal mask,
  :func:`~nanoopt.kernels.ibert.i_softmax` gives the probabilities as codes 0..255 of scale 1/255 -- the grid the
  ``P V`` product of :func:`~nanoopt.quant.transformer.integer_attention` already uses.

Still float32 (stated): the embeddings, the residual adds and the dequantized outputs of ``attn.c_proj``,
``mlp.c_proj`` and ``lm_head`` that feed them, as in the float-nonlinear mode. The simulated (prepared) and the
converted GPT run these same functions on the same integers, so their logits agree bit for bit.

>>> import numpy as np
>>> from nanoopt.spec import QuantSpec
>>> out = QParams(np.float32(0.05), np.int32(3), QuantSpec(bits=8))
>>> gelu_codes(np.array([[-2000, 0, 2000]]), np.float32(0.01), np.full(3, 0.05, np.float32), None, out).tolist()
[[0, 3, 20]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nanoopt import nn
from nanoopt.kernels.ibert import NORM_FRACTION_BITS, i_gelu, i_layernorm, i_softmax
from nanoopt.quant.lowering import QParams
from nanoopt.quant.observers import MinMaxObserver, NotFittedError
from nanoopt.spec import QuantSpec, quantize, quantize_bias, quantize_multiplier, requantize

__all__ = ["IBertNorm", "NormConstants", "gelu_codes", "layernorm_codes", "layernorm_constants", "softmax_codes"]

LN_INPUT = QuantSpec(bits=16, symmetric=True, narrow_range=True)  # the LayerNorm input grid: int16, symmetric
DEAD_CHANNEL = 2.0**-32  # M_c below this: |z| <= 2^30 moves the output by under a quarter of a step


@dataclass(frozen=True)
class NormConstants:
    """The integers of one LayerNorm's affine part onto an int8 grid (one entry per channel)."""

    sign: np.ndarray  # int64, sgn(gamma_c) (0 on constant channels)
    bias: np.ndarray  # int64, round(beta_c / (|gamma_c| sqrt(N) 2^-30)), clipped to +-2^61
    m0: np.ndarray  # int32, the fixed-point multipliers of M_c (placeholder 2^30 on constant channels)
    shift: np.ndarray  # int32
    live: np.ndarray  # bool, False where M_c < 2^-32
    constant: np.ndarray  # the output codes of the constant channels (quantized beta)


def layernorm_constants(weight: np.ndarray, bias: np.ndarray | None, out: QParams) -> NormConstants:
    """The integer constants of ``gamma z + beta`` (``z`` of scale ``sqrt(N) / 2^30``) onto the grid ``out``.

    >>> c = layernorm_constants(np.array([1.0, -2.0, 0.0]), np.array([0.5, 0.0, 0.2]),
    ...                         QParams(np.float32(0.1), np.int32(0), QuantSpec(bits=8)))
    >>> c.sign.tolist(), c.live.tolist(), c.constant.tolist()
    ([1, -1, 0], [True, True, False], [5, 0, 2])
    """
    gamma = np.asarray(weight, np.float64)
    beta = np.zeros_like(gamma) if bias is None else np.asarray(bias, np.float64)
    z_scale = math.sqrt(gamma.shape[-1]) / 2.0**NORM_FRACTION_BITS
    real = np.abs(gamma) * z_scale / float(out.scale)
    live = real >= DEAD_CHANNEL
    m0, shift = quantize_multiplier(np.where(live, real, 1.0))
    safe = np.where(live, np.abs(gamma) * z_scale, 1.0)
    steps = np.clip(np.rint(beta / safe), -(2.0**61), 2.0**61)
    return NormConstants(sign=np.where(live, np.sign(gamma), 0).astype(np.int64),
                         bias=np.where(live, steps, 0).astype(np.int64), m0=np.asarray(m0), shift=np.asarray(shift),
                         live=live, constant=quantize(beta, out.scale, out.zero_point, out.spec))


def layernorm_codes(x: np.ndarray, input_scale: np.floating, eps: float, constants: NormConstants,
                    out: QParams) -> np.ndarray:
    """LayerNorm of float ``x`` (..., N) as int8 codes on ``out``: int16 input codes, :func:`i_layernorm`, the affine
    part with :class:`NormConstants`, requantized per channel.

    >>> c = layernorm_constants(np.ones(4), np.zeros(4), QParams(np.float32(0.02), np.int32(0), QuantSpec(bits=8)))
    >>> layernorm_codes(np.array([[1.0, 2.0, 3.0, 4.0]]), np.float32(0.001), 1e-5, c,
    ...                 QParams(np.float32(0.02), np.int32(0), QuantSpec(bits=8))).tolist()  # (x - 2.5) / 1.118
    [[-67, -22, 22, 67]]
    """
    q = quantize(x, input_scale, np.int32(0), LN_INPUT)
    z, _ = i_layernorm(q, float(input_scale), eps)
    acc = z * constants.sign + constants.bias
    codes = requantize(acc, constants.m0, constants.shift, out.zero_point, out.spec)
    return np.where(constants.live, codes, constants.constant)


def gelu_codes(acc: np.ndarray, input_scale: np.floating, weight_scale: np.ndarray, bias: np.ndarray | None,
               out: QParams) -> np.ndarray:
    """GELU of a linear layer's accumulators (M, N) (``acc = sum (x_q - z_x) w_q``) as int8 codes on ``out``.

    ``q = acc + round(b / (s_x s_w))`` (the bias of :func:`~nanoopt.spec.quantize_bias`, in int64: it is added
    to this int64 sum and never stored as int32, so a tiny ``s_x`` needs no weight-scale adjustment, unlike the
    int32 bias of :func:`~nanoopt.quant.lowering.integer_layer`; the same codes wherever int32 holds them),
    ``(g, S_g) = i_gelu(q, s_x s_w)`` per channel, ``codes = requantize(g, S_g / s_o)`` per channel.
    """
    scale = np.float64(input_scale) * np.asarray(weight_scale, np.float64)
    q = np.asarray(acc).astype(np.int64)
    if bias is not None:
        q = q + quantize_bias(bias, input_scale, weight_scale, dtype=np.int64)
    g, g_scale = i_gelu(q, scale)
    m0, shift = quantize_multiplier(np.asarray(g_scale, np.float64) / float(out.scale))
    return requantize(g, m0, shift, out.zero_point, out.spec)


def softmax_codes(acc: np.ndarray, score_scale: float, start: int) -> np.ndarray:
    """Causal softmax of int32 scores ``acc = q k^T`` (..., T, S), ``S = start + T``, of real scale ``score_scale``
    (``s_q s_k / sqrt(D)``), as codes 0..255 (int16) of scale 1/255: :func:`i_softmax` with key ``j`` masked for
    query ``i`` when ``j > start + i``.

    >>> softmax_codes(np.array([[[100, 0], [100, 0]]]), 1e-4, 0).tolist()  # softmax(0.01, 0) = (0.5025, 0.4975)
    [[[255, 0], [128, 127]]]
    """
    t, s = acc.shape[-2], acc.shape[-1]
    mask = np.triu(np.ones((t, s), bool), k=start + 1) if t > 1 else None
    return i_softmax(acc, float(score_scale), mask).astype(np.int16)


class IBertNorm(nn.Module):
    """The integer LayerNorm of one of the GPT's LayerNorms: its int16 input grid (an observer in the prepared GPT,
    a buffer in the converted one) and its integer constants (computed once per grid and weights)."""

    converted_by = "quant.prepare_w8a8 / convert_w8a8"  # nanoopt.nn.converted.MARKER

    def __init__(self, name: str, input_scale: np.floating | None = None) -> None:
        super().__init__()
        self.layer_name = name
        self.observer = MinMaxObserver(LN_INPUT) if input_scale is None else None
        if input_scale is not None:
            self.register_buffer("input_scale", np.asarray(input_scale, np.float32))
        self._constants: tuple[tuple, NormConstants] | None = None

    def observe(self, x: np.ndarray) -> None:
        """Calibration: record the range of the LayerNorm's float input."""
        self.observer.partial_fit(x)

    def grid_scale(self) -> np.float32:
        """The int16 input scale; a clear error while the prepared GPT is not calibrated."""
        if self.observer is None:
            return np.float32(self.input_scale)
        try:
            return np.float32(self.observer.scale_)
        except NotFittedError:
            raise ValueError(f"W8A8 layer {self.layer_name!r}: the LayerNorm input grid is not calibrated; run "
                             "calibration windows through the prepared GPT first (W8A8GPT.calibrate)") from None

    def frozen(self) -> IBertNorm:
        """The converted layer: the calibrated input scale as a buffer."""
        return IBertNorm(self.layer_name, self.grid_scale())

    def codes(self, x: np.ndarray, ln: nn.LayerNorm, out: QParams) -> np.ndarray:
        """``ln(x)`` of float ``x`` (..., N) as int8 codes on ``out`` (:func:`layernorm_codes`)."""
        weight = ln.weight.data
        bias = None if ln.bias is None else ln.bias.data
        key = (float(out.scale), int(out.zero_point), weight.tobytes(), None if bias is None else bias.tobytes())
        if self._constants is None or self._constants[0] != key:
            self._constants = (key, layernorm_constants(weight, bias, out))
        return layernorm_codes(x, self.grid_scale(), ln.eps, self._constants[1], out)
