"""W8A8 integer inference for the GPT of :mod:`nanoopt.models_gpt`: int8 Linears and integer attention.

What is integer (everything else is float32, stated):

* **every Linear** (``c_attn``, ``c_proj``, ``c_fc``, ``mlp.c_proj``, ``lm_head``): int8 weights, symmetric per
  output channel (narrow range, ``qparams`` of :mod:`nanoopt.spec`), times int8 activations, accumulated
  exactly in int32 (the int8 GEMMs of :mod:`nanoopt.kernels`). Activations are asymmetric int8 per tensor on a
  grid calibrated by min/max observers (static), or -- ``W8A8Config(per_token=True)`` -- symmetric int8 with a
  scale per token computed at run time from the token's ``max |x|`` (dynamic; the Linears that read a float op:
  ``c_attn``, ``c_fc``, ``mlp.c_proj``, ``lm_head``).
* **the packed q/k/v projection** ``c_attn`` requantizes its int32 accumulators to int8 q, k and v (one
  symmetric grid each) with the integer-only fixed-point multipliers of :func:`~nanoopt.quant.lowering.integer_layer`
  (Jacob et al. 2018, eq. 7), so attention starts from codes. (With per-token scales the multiplier would change
  per token: there the float result is rounded onto the q/k/v grids instead.) The KV cache stores int8 codes.
* **attention** (:func:`integer_attention`): ``Q K^T`` is an int8 x int8 -> int32 product; the scores
  ``s_q s_k / sqrt(D) * acc`` go through the causal mask and a float softmax; the probabilities are quantized
  to int8 (``P = (p_q + 128) / 255``), ``P V`` is an int8 x int8 -> int32 product, requantized with a
  fixed-point multiplier ``s_p s_v / s_o`` straight onto the input grid of ``c_proj``.
* **in float32**: embeddings, LayerNorm, softmax, GELU, the residual adds, and the Linears' outputs that feed
  them (``y = float32(acc) * (s_x s_w) + b``: int32 accumulators dequantized once, as SmoothQuant's W8A8 GEMMs
  do, rather than rounded to int8 and back).
* ``W8A8Config(nonlinear="ibert")``: softmax, GELU and LayerNorm integer-only instead, by I-BERT's polynomial
  approximations and integer square root (Kim et al. 2021; :mod:`nanoopt.quant.ibert`); the embeddings and the
  residual adds stay float32.

Two models compute this: :func:`prepare_w8a8` gives a **simulated** GPT (float weights and observers;
:meth:`W8A8GPT.calibrate` runs float windows through it; in eval mode after calibration it quantizes the float
weights with the calibrated grids on every call and emulates the integer arithmetic -- exact float64 products of
integers, :func:`~nanoopt.quant.lowering.emulate_linear`), and :func:`convert_w8a8` gives the **integer** GPT
(int8 weight buffers packed once for the AVX2/Numba kernels). Both run the same skeleton, the same lowering and
the same attention function: their logits are equal bit for bit (tested). :func:`quantize_w8a8` chains
SmoothQuant (Xiao et al. 2022), prepare, calibrate and convert.

The int32 products of attention are evaluated as float32 (or float64) matrix products of small integers: exact
whenever every partial sum stays below 2^24 (2^53), which :func:`exact_integer_matmul` checks from the operand
bounds (``D * 127 * 127`` for ``Q K^T``, ``S * 255 * 127`` for ``P V``).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models
>>> no.manual_seed(0)
>>> gpt = models.gpt(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
>>> ids = np.random.default_rng(0).integers(0, 11, size=(8, 8))
>>> prepared = prepare_w8a8(gpt).calibrate(ids)
>>> integer = convert_w8a8(prepared)
>>> integer.blocks[0].c_attn.weight.dtype, bool((integer(ids).data == prepared.eval()(ids).data).all())
(dtype('int8'), True)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoopt import kernels, nn, ops
from nanoopt.float_kernels import softmax
from nanoopt.kernels import requant
from nanoopt.kernels.gemm_plan import GemmPlanS8
from nanoopt.models_gpt import GPT, KVCache, sample_tokens
from nanoopt.nn.attention_functional import check_indices
from nanoopt.ops import Context
from nanoopt.ops_transformer import attention_forward
from nanoopt.quant.ibert import IBertNorm, gelu_codes, softmax_codes
from nanoopt.quant.lowering import IntegerLayer, QParams, emulate_linear, integer_layer
from nanoopt.quant.observers import MinMaxObserver, NotFittedError
from nanoopt.quant.smoothquant import smooth_quant
from nanoopt.quant.w8a8_decode import FusedDecoder
from nanoopt.random import get_rng
from nanoopt.runtime import boundary
from nanoopt.spec import QuantSpec, qparams, quantize, requantization_multipliers, requantize
from nanoopt.tensor import Tensor, no_grad

__all__ = ["W8A8Config", "W8A8GPT", "attention_multiplier", "calibrate_w8a8", "convert_w8a8", "exact_integer_matmul",
           "integer_attention",
           "prepare_w8a8", "quantize_w8a8"]

ACTIVATION = QuantSpec(bits=8)  # asymmetric int8 per tensor
WEIGHT = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, narrow_range=True)
QKV = QuantSpec(bits=8, symmetric=True, narrow_range=True)  # q, k, v: symmetric int8, one grid each
TOKEN = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, narrow_range=True)  # per-token rows
PROB_SCALE, PROB_ZERO = np.float32(1.0 / 255.0), np.int32(-128)  # P in [0, 1] -> codes -128..127
_LINEARS = ("c_attn", "c_proj", "c_fc", "mlp_proj")


@dataclass(frozen=True)
class W8A8Config:
    """How the GPT's activations are quantized (weights: int8 symmetric per output channel, always)."""

    per_token: bool = False  # dynamic symmetric int8 scales per token for the Linears that read a float op
    nonlinear: str = "float"  # softmax, GELU, LayerNorm: "float" (float32) or "ibert" (integer-only, quant/ibert.py)

    def __post_init__(self) -> None:
        if self.nonlinear not in ("float", "ibert"):
            raise ValueError(f"W8A8Config.nonlinear must be 'float' or 'ibert', got {self.nonlinear!r}")
        if self.nonlinear == "ibert" and self.per_token:
            raise ValueError("W8A8Config: nonlinear='ibert' needs static activation grids (the integer LayerNorm and "
                             "GELU requantize onto them); per_token=True is not supported with it")


# --------------------------------------------------------------------------------------------- shared math
def exact_integer_matmul(a: np.ndarray, b: np.ndarray, bound_a: int, bound_b: int) -> np.ndarray:
    """``a @ b`` of integer arrays (broadcast over leading axes) as exact int64, through float BLAS.

    ``|a| <= bound_a``, ``|b| <= bound_b``: with K the inner size, every partial sum is at most
    ``K * bound_a * bound_b``; below 2^24 float32 is exact, below 2^53 float64, else int64 arithmetic.

    >>> exact_integer_matmul(np.array([[127, -127]], np.int8), np.array([[127], [127]], np.int8), 127, 127)
    array([[0]])
    """
    worst = a.shape[-1] * int(bound_a) * int(bound_b)
    if worst < 2**24:
        return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.int64)
    if worst < 2**53:
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def integer_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scales: tuple[float, float, float],
                      output: QParams, start: int = 0, multiplier: tuple[int, int] | None = None,
                      compiled: bool = False, nonlinear: str = "float") -> np.ndarray:
    """Causal attention on int8 codes: q (B, H, T, D), k and v (B, H, S, D) with S = start + T -> int8 (B, H, T, D).

    ``acc = q k^T`` (int32), ``P = softmax(s_q s_k / sqrt(D) acc + causal mask)`` (float32),
    ``p_q = quantize(P, 1/255, -128)``, ``acc' = (p_q + 128) v`` (int32),
    ``out = requantize(acc', M0, shift, z_o)`` with ``M0 2^-shift ~= s_p s_v / s_o`` (fixed point;
    ``multiplier`` passes ``(M0, shift)`` computed once by :func:`attention_multiplier`). ``compiled``: quantize
    and requantize with the compiled kernels (:func:`nanoopt.runtime.boundary.quantize_into`,
    :func:`nanoopt.kernels.requant.requantize_into`) instead of the spec's NumPy functions; the same integers.
    ``nonlinear="ibert"``: the softmax is I-BERT's integer-only one on ``acc``
    (:func:`~nanoopt.quant.ibert.softmax_codes`), giving the codes ``p_q + 128`` directly.

    >>> q = np.full((1, 1, 2, 4), 10, np.int8)
    >>> out = integer_attention(q, q, q, (0.1, 0.1, 0.1), QParams(np.float32(0.1), np.int32(0), QuantSpec()))
    >>> out[0, 0].tolist()
    [[10, 10, 10, 10], [10, 10, 10, 10]]
    """
    s_q, s_k, s_v = scales
    t, s, d = q.shape[-2], k.shape[-2], q.shape[-1]
    acc = exact_integer_matmul(q, np.swapaxes(k, -1, -2), 127, 127)  # (B, H, T, S)
    if nonlinear == "ibert":
        return _probabilities_times_values(softmax_codes(acc, float(s_q) * float(s_k) / math.sqrt(d), start), v,
                                           s_v, output, multiplier, compiled)
    scores = acc.astype(np.float32) * np.float32(np.float32(s_q) * np.float32(s_k) * np.float32(1.0 / math.sqrt(d)))
    if t > 1:
        scores += np.triu(np.full((t, s), -np.inf, np.float32), k=start + 1)
    # every row has a finite score (causal: the diagonal); one fixed exp for both models (float_kernels/softmax.py)
    probs = softmax.softmax(scores) if compiled else softmax.softmax_reference(scores)
    if compiled:
        codes = np.empty(probs.shape, np.int8)
        low, high = np.float32(ACTIVATION.qmin - PROB_ZERO), np.float32(ACTIVATION.qmax - PROB_ZERO)
        if not boundary.quantize_into(probs.reshape(-1), PROB_SCALE, np.int64(PROB_ZERO), low, high, codes.reshape(-1)):
            raise ValueError("integer_attention: the softmax gave values that are not finite")
    else:
        codes = quantize(probs, PROB_SCALE, PROB_ZERO, ACTIVATION)
    centred = codes.astype(np.int16) - np.int16(PROB_ZERO)  # 0..255
    return _probabilities_times_values(centred, v, s_v, output, multiplier, compiled)


def _probabilities_times_values(centred: np.ndarray, v: np.ndarray, s_v: float, output: QParams,
                                multiplier: tuple[int, int] | None, compiled: bool) -> np.ndarray:
    """``P V`` of probability codes 0..255 (scale 1/255) and int8 values, requantized onto ``output``."""
    acc = exact_integer_matmul(centred, v, 255, 127)  # (B, H, T, D)
    m0, shift = attention_multiplier(s_v, output) if multiplier is None else multiplier
    if not compiled:
        return requantize(acc, m0, shift, output.zero, output.spec)
    out = np.empty(acc.shape, output.spec.dtype)
    requant.requantize_into(acc.reshape(-1), int(m0), int(shift), output.zero, output.spec.qmin, output.spec.qmax,
                            out.reshape(-1))
    return out


def attention_multiplier(value_scale: float, output: QParams) -> tuple[int, int]:
    """``(M0, shift)`` of the P V requantization: ``s_p s_v / s_o`` with ``s_p = 1/255``.

    >>> attention_multiplier(0.1, QParams(np.float32(0.1), np.int32(0), QuantSpec()))
    (1077952640, 7)
    """
    return requantization_multipliers(PROB_SCALE, np.float32(value_scale), output.scale)


def _per_token_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic symmetric int8 per token: rows of ``x`` (M, K) -> codes (M, K) and scales (M, 1) float32."""
    peak = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x))
    scale, zero = qparams(-peak, peak, TOKEN)
    return quantize(x, scale, zero, TOKEN), scale.reshape(-1, 1)


def _float_output(acc: np.ndarray, x_scale: Any, weight_scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``float32(acc) * (s_x s_w) + b``: an int32 accumulator dequantized once (float32 arithmetic)."""
    y = acc.astype(np.float32) * (np.asarray(x_scale, np.float32) * weight_scale.astype(np.float32))
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------- the linears
class _W8A8Linear(nn.Module):
    """The interface both models' linears give the skeleton (float or int8 codes in, float or int8 codes out)."""

    converted_by = "quant.prepare_w8a8 / convert_w8a8"  # nanoopt.nn.converted.MARKER

    def __init__(self, name: str, per_token: bool, qkv_output: bool) -> None:
        super().__init__()
        self.layer_name, self.per_token, self.qkv_output = name, per_token, qkv_output

    def input_codes(self, x: np.ndarray) -> tuple[np.ndarray, Any, int]:
        """Float input (..., K) -> codes (M, K), their scale (scalar or (M, 1)) and zero point."""
        rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        if self.per_token:
            codes, scale = _per_token_codes(rows)
            return codes, scale, 0
        grid = self.input_qparams()
        return grid.quantize(rows), grid.scale, grid.zero

    def float_output(self, x: np.ndarray) -> np.ndarray:
        """Float in, float out: quantize, integer product, dequantized accumulator plus bias."""
        codes, scale, zero = self.input_codes(x)
        return self.codes_to_float(codes, scale, zero).reshape(x.shape[:-1] + (-1,))

    def codes_to_float(self, codes: np.ndarray, scale: Any, zero: int) -> np.ndarray:
        acc = self.accumulate(codes, zero)
        return _float_output(acc, scale, self.weight_scale_array(), self.float_bias())

    def qkv_codes(self, x: np.ndarray) -> np.ndarray:
        """Float in, int8 q|k|v codes out (..., 3C): integer requantization (static) or float rounding (per token)."""
        if self.per_token:
            codes, scale, zero = self.input_codes(x)
            y = self.codes_to_float(codes, scale, zero)
            grid = self.qkv_qparams()
            spec = QuantSpec(bits=8, symmetric=True, per_channel=True, axis=-1, narrow_range=True)
            out = quantize(y, grid.scale, np.zeros(grid.scale.shape, np.int32), spec)
        else:
            out = self.requantized(self.input_codes(x)[0])
        return out.reshape(x.shape[:-1] + (-1,))


class SimulatedW8A8Linear(_W8A8Linear):
    """A Linear of the prepared GPT: float weight, observers; after calibration it emulates the integer layer."""

    converted_by = "quant.prepare_w8a8"  # nanoopt.nn.converted.MARKER

    def __init__(self, layer: nn.Linear, name: str, per_token: bool, qkv_output: bool, observe_input: bool,
                 heads: int = 1) -> None:
        super().__init__(name, per_token, qkv_output)
        self.weight = nn.Parameter(layer.weight.data.copy())
        self.register_parameter("bias", None if layer.bias is None else nn.Parameter(layer.bias.data.copy()))
        self.input_observer = MinMaxObserver(ACTIVATION) if observe_input else None
        self.qkv_observers = [MinMaxObserver(QKV) for _ in range(3)] if qkv_output else []
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def calibration_forward(self, x: np.ndarray) -> np.ndarray:
        """The float layer; observes its input (static grids) and, for ``c_attn``, q, k and v."""
        if self.input_observer is not None:
            self.input_observer.partial_fit(x)
        y = ops.Linear.forward(Context(ops.Linear), x, self.weight.data, None if self.bias is None else self.bias.data)
        if self.qkv_observers:
            for observer, part in zip(self.qkv_observers, np.split(y, 3, axis=-1), strict=True):
                observer.partial_fit(part)
        return y

    def _grid(self, observer: MinMaxObserver | None, what: str) -> QParams:
        if observer is None:
            raise ValueError(f"W8A8 layer {self.layer_name!r} has no static {what} grid (per-token scales)")
        try:
            return QParams(np.float32(observer.scale_), np.int32(observer.zero_point_), observer.spec)
        except NotFittedError:
            raise ValueError(f"W8A8 layer {self.layer_name!r}: the {what} grid is not calibrated; run calibration "
                             "windows through the prepared GPT first (W8A8GPT.calibrate)") from None

    def input_qparams(self) -> QParams:
        return self._grid(self.input_observer, "input")

    def qkv_qparams(self) -> QParams:
        grids = [self._grid(observer, name) for observer, name in zip(self.qkv_observers, "qkv", strict=True)]
        c = self.out_features // 3
        return QParams(np.repeat(np.array([g.scale for g in grids], np.float32), c), np.int32(0), QKV)

    def weight_qparams(self) -> QParams:
        w = self.weight.data
        scale, zero = qparams(w.min(axis=1), w.max(axis=1), WEIGHT)
        return QParams(scale, zero, WEIGHT)

    def weight_codes(self) -> np.ndarray:
        return self.weight_qparams().quantize(self.weight.data)

    def weight_scale_array(self) -> np.ndarray:
        return self.weight_qparams().scale

    def float_bias(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.data.astype(np.float32)

    def accumulate(self, codes: np.ndarray, zero: int) -> np.ndarray:
        w = self.weight_codes()
        return exact_integer_matmul(codes.astype(np.int16) - np.int16(zero), w.T, 255, 127)

    def integer_layer(self) -> IntegerLayer:
        """The static requantizing layer (``c_attn``): :func:`~nanoopt.quant.lowering.integer_layer`."""
        return integer_layer(self.weight.data, None if self.bias is None else self.bias.data, self.weight_qparams(),
                             self.input_qparams(), self.qkv_qparams(), relu=False, name=self.layer_name)

    def requantized(self, codes: np.ndarray) -> np.ndarray:
        return emulate_linear(codes, self.integer_layer())


class QuantizedW8A8Linear(_W8A8Linear):
    """A Linear of the integer GPT: int8 weight codes, per-channel scales, packed once for the int8 GEMMs."""

    converted_by = "quant.convert_w8a8"  # nanoopt.nn.converted.MARKER

    def __init__(self, simulated: SimulatedW8A8Linear) -> None:
        super().__init__(simulated.layer_name, simulated.per_token, simulated.qkv_output)
        self.in_features, self.out_features = simulated.in_features, simulated.out_features
        self.register_buffer("weight", simulated.weight_codes())
        self.register_buffer("weight_scale", simulated.weight_scale_array())
        self.register_buffer("bias", simulated.float_bias())
        self.static_input = simulated.input_observer is not None
        if self.static_input:
            grid = simulated.input_qparams()
            self.register_buffer("input_scale", np.asarray(grid.scale, np.float32))
            self.register_buffer("input_zero_point", np.asarray(grid.zero_point, np.int32))
        self._requant: Any = None
        if self.qkv_output:
            grid = simulated.qkv_qparams()
            self.register_buffer("qkv_scale", grid.scale)
            if self.static_input:
                layer = simulated.integer_layer()
                self.weight[...] = layer.weight  # the codes of the requantization: scales raised where a bias
                self.weight_scale[...] = layer.weight_scale  # would not fit int32 (lowering.integer_layer)
                self.register_buffer("bias_q", layer.bias)
                self.register_buffer("m0", layer.m0)
                self.register_buffer("shift", layer.shift)
        self._weights = kernels.prepare_weights(self.weight)
        self._gemms: dict[int, GemmPlanS8] = {}

    def after_load(self) -> None:
        """New buffers were loaded: pack the weights again, forget the prepared GEMMs."""
        self._weights = kernels.prepare_weights(self.weight)
        self._gemms, self._requant = {}, None

    def input_qparams(self) -> QParams:
        return QParams(self.input_scale, self.input_zero_point, ACTIVATION)

    def input_codes(self, x: np.ndarray) -> tuple[np.ndarray, Any, int]:
        """As the simulation's, through the compiled boundary kernel for a static grid (bit-identical to
        ``spec.quantize``; tested in :mod:`nanoopt.runtime.boundary`)."""
        if self.per_token or not self.static_input:
            return super().input_codes(x)
        rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        zero = int(self.input_zero_point)
        out = np.empty(rows.shape, np.int8)
        low, high = np.float32(ACTIVATION.qmin - zero), np.float32(ACTIVATION.qmax - zero)
        if not boundary.quantize_into(rows.reshape(-1), np.float32(self.input_scale), np.int64(zero), low, high,
                                      out.reshape(-1)):
            return super().input_codes(x)  # spec.quantize: saturates +-inf, refuses NaN by name
        return out, self.input_scale, zero

    def qkv_qparams(self) -> QParams:
        return QParams(self.qkv_scale, np.int32(0), QKV)

    def weight_scale_array(self) -> np.ndarray:
        return self.weight_scale

    def float_bias(self) -> np.ndarray | None:
        return self.bias

    def accumulate(self, codes: np.ndarray, zero: int) -> np.ndarray:
        plan = self._gemms.get(zero)
        if plan is None:  # one per input zero point (static: one; per token: zero point 0)
            plan = self._gemms[zero] = GemmPlanS8(self._weights, zero)
        return plan(codes)

    def requantized(self, codes: np.ndarray) -> np.ndarray:
        if self._requant is None:
            self._requant = kernels.prepare_linear(self._weights, self.bias_q, int(self.input_zero_point), self.m0,
                                                   self.shift, 0, QKV)
        return self._requant(codes)


# --------------------------------------------------------------------------------------------- the model
def _layer_norm(module: nn.LayerNorm, x: np.ndarray) -> np.ndarray:
    bias = module.bias.data if module.bias is not None else np.zeros_like(module.weight.data)
    return ops.LayerNorm.forward(Context(ops.LayerNorm), x, module.weight.data, bias, ndim_normalised=1,
                                 eps=module.eps)


class W8A8Block(nn.Module):
    """One GPT block's float LayerNorms and its four W8A8 linears."""

    converted_by = "quant.prepare_w8a8 / convert_w8a8"  # nanoopt.nn.converted.MARKER

    def __init__(self, ln_1: nn.LayerNorm, ln_2: nn.LayerNorm, linears: dict[str, _W8A8Linear],
                 approximate: str, norms: tuple[IBertNorm, IBertNorm] | None = None) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = ln_1, ln_2
        self.norm_1, self.norm_2 = norms if norms is not None else (None, None)  # I-BERT LayerNorms (or None)
        for name in _LINEARS:
            setattr(self, name, linears[name])
        self.approximate = approximate
        self.multiplier: tuple[tuple, tuple[int, int]] | None = None  # (grids, the attention's (M0, shift))


class W8A8GPT(nn.Module):
    """A GPT whose Linears and attention run W8A8 (module docstring): ``forward(idx)`` -> logits (B, T, V).

    Made by :func:`prepare_w8a8` (``simulated=True``; :meth:`calibrate` it) or :func:`convert_w8a8`.
    """

    converted_by = "quant.prepare_w8a8 / convert_w8a8"  # nanoopt.nn.converted.MARKER

    def __init__(self, config: Any, wte: np.ndarray, wpe: np.ndarray, blocks: list[W8A8Block], ln_f: nn.LayerNorm,
                 lm_head: _W8A8Linear, w8a8: W8A8Config, simulated: bool, norm_f: IBertNorm | None = None) -> None:
        super().__init__()
        self.config, self.w8a8, self.simulated = config, w8a8, simulated
        self.register_buffer("wte", wte)
        self.register_buffer("wpe", wpe)
        self.blocks = nn.ModuleList(blocks)
        self.ln_f, self.lm_head = ln_f, lm_head
        self.norm_f = norm_f  # nonlinear="ibert": the integer LayerNorm of ln_f
        self.calibrating = False

    # ----------------------------------------------------------------------------------------- forward
    def _norm(self, ln: nn.LayerNorm, norm: IBertNorm | None, x: np.ndarray, reader: _W8A8Linear) -> np.ndarray:
        """``ln(x)``: float32, or (I-BERT, not calibrating) int8 codes on the input grid of ``reader``."""
        if norm is None or self.calibrating:
            if norm is not None:
                norm.observe(x)
            return _layer_norm(ln, x)
        return norm.codes(x, ln, reader.input_qparams())

    def _attention(self, block: W8A8Block, h: np.ndarray, cache: KVCache | None) -> np.ndarray:
        """Attention of one block on ln_1's output h (B, T, C) -> float output of c_proj (B, T, C)."""
        b, t, c = h.shape
        heads = self.config.n_head
        d = c // heads
        start = 0 if cache is None else cache.length
        if self.calibrating:
            qkv = block.c_attn.calibration_forward(h).reshape(b, t, 3, heads, d).transpose(2, 0, 3, 1, 4)
            bias = np.triu(np.full((t, t), -np.inf, np.float32), k=1)
            out, _, _ = attention_forward(qkv[0], qkv[1], qkv[2], bias, 1.0 / math.sqrt(d), None, True)
            return block.c_proj.calibration_forward(out.transpose(0, 2, 1, 3).reshape(b, t, c))
        qkv = block.c_attn.requantized(h.reshape(b * t, c)) if h.dtype == np.int8 else block.c_attn.qkv_codes(h)
        qkv = qkv.reshape(b, t, 3, heads, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D) int8
        keys, values = qkv[1], qkv[2]
        if cache is not None:
            keys, values = cache.append(keys, values)
        grid = block.c_attn.qkv_qparams()
        scales = (float(grid.scale[0]), float(grid.scale[c]), float(grid.scale[2 * c]))
        out_grid = block.c_proj.input_qparams()
        multiplier = None
        if not self.simulated:  # the integer model's grids are fixed: its multiplier too
            key = (scales[2], float(out_grid.scale))
            if block.multiplier is None or block.multiplier[0] != key:
                block.multiplier = (key, attention_multiplier(scales[2], out_grid))
            multiplier = block.multiplier[1]
        codes = integer_attention(np.ascontiguousarray(qkv[0]), np.ascontiguousarray(keys),
                                  np.ascontiguousarray(values), scales, out_grid, start, multiplier,
                                  compiled=not self.simulated, nonlinear=self.w8a8.nonlinear)  # (B, H, T, D)
        merged = np.ascontiguousarray(codes.transpose(0, 2, 1, 3)).reshape(b * t, c)
        return block.c_proj.codes_to_float(merged, out_grid.scale, out_grid.zero).reshape(b, t, c)

    def _mlp(self, block: W8A8Block, h: np.ndarray) -> np.ndarray:
        if self.calibrating:
            u = block.c_fc.calibration_forward(h)
            g = ops.GELU.forward(Context(ops.GELU), u, approximate=block.approximate)
            return block.mlp_proj.calibration_forward(g)
        if h.dtype == np.int8:  # I-BERT: int8 codes of ln_2 -> int32 -> integer GELU -> int8 codes
            grid, out_grid = block.c_fc.input_qparams(), block.mlp_proj.input_qparams()
            acc = block.c_fc.accumulate(h.reshape(-1, h.shape[-1]), grid.zero)
            codes = gelu_codes(acc, grid.scale, block.c_fc.weight_scale_array(), block.c_fc.float_bias(), out_grid)
            y = block.mlp_proj.codes_to_float(codes, out_grid.scale, out_grid.zero)
            return y.reshape(h.shape[:-1] + (-1,))
        u = block.c_fc.float_output(h)
        g = ops.GELU.forward(Context(ops.GELU), u, approximate=block.approximate)
        return block.mlp_proj.float_output(g)

    def logits(self, ids: np.ndarray, caches: list[KVCache] | None = None, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, V) (or (B, 1, V) with ``last_only``) of token ids (B, T) continuing ``caches``."""
        b, t = ids.shape
        start = 0 if caches is None else caches[0].length
        if start + t > self.config.block_size:
            raise ValueError(f"W8A8GPT: a sequence of length {start + t} is longer than block_size "
                             f"{self.config.block_size}")
        x = self.wte[ids] + self.wpe[start:start + t]  # (B, T, C) float32
        for i, block in enumerate(self.blocks):
            h = self._norm(block.ln_1, block.norm_1, x, block.c_attn)
            x = x + self._attention(block, h, None if caches is None else caches[i])
            x = x + self._mlp(block, self._norm(block.ln_2, block.norm_2, x, block.c_fc))
        if last_only:
            x = x[:, -1:]
        h = self._norm(self.ln_f, self.norm_f, x, self.lm_head)
        if self.calibrating:
            return self.lm_head.calibration_forward(h)
        if h.dtype == np.int8:
            grid = self.lm_head.input_qparams()
            return self.lm_head.codes_to_float(h.reshape(-1, h.shape[-1]), grid.scale, grid.zero).reshape(
                h.shape[:-1] + (-1,))
        return self.lm_head.float_output(h)

    def forward(self, idx: Any) -> Tensor:
        ids = check_indices(idx, self.config.vocab_size, "W8A8GPT.forward")
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"W8A8GPT.forward: expected token ids (B, T) with T >= 1, got shape {ids.shape}")
        if self.simulated and not self.calibrating:
            self._check_calibrated()
        return Tensor(self.logits(ids))

    def _check_calibrated(self) -> None:
        for norm in [self.norm_f] + [n for block in self.blocks for n in (block.norm_1, block.norm_2)]:
            if norm is not None:
                norm.grid_scale()
        for block in self.blocks:
            block.c_proj.input_qparams()
            block.c_attn.qkv_qparams()
            for name in _LINEARS:
                if not self.w8a8.per_token or name == "c_proj":
                    getattr(block, name).input_qparams()

    def calibrate(self, calibration: Any, batch_size: int = 32) -> W8A8GPT:
        """Run calibration windows (N, T) (or an iterable of batches) through the float layers, observing every
        grid; returns ``self`` in eval mode."""
        if not self.simulated:
            raise TypeError("W8A8GPT.calibrate: this is the converted integer GPT; calibrate the prepared one")
        if isinstance(calibration, np.ndarray):
            batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
        else:
            batches = [np.asarray(x[0] if isinstance(x, tuple) else x) for x in calibration]
        batches = [batch for batch in batches if len(batch)]
        if not batches:
            raise ValueError("W8A8GPT.calibrate: calibration is empty; pass at least one window of token ids (N, T)")
        self.calibrating = True
        try:
            for batch in batches:
                ids = check_indices(batch, self.config.vocab_size, "W8A8GPT.calibrate")
                self.logits(ids)
        finally:
            self.calibrating = False
        return self.eval()

    # ----------------------------------------------------------------------------------------- generation
    def _new_caches(self, batch: int) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.n_head, c.block_size, c.n_embd // c.n_head, np.int8) for _ in range(c.n_layer)]

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """As :meth:`nanoopt.models_gpt.GPT.generate`; the KV cache holds int8 key and value codes."""
        ids = check_indices(idx, self.config.vocab_size, "W8A8GPT.generate")
        if ids.ndim != 2 or ids.shape[1] < 1 or max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"W8A8GPT.generate: need ids (B, T >= 1), max_new_tokens >= 0 and temperature >= 0, "
                             f"got shape {ids.shape}, {max_new_tokens} and {temperature}")
        if self.simulated:
            self._check_calibrated()
        rng = get_rng() if rng is None else rng
        block = self.config.block_size
        out = np.empty((ids.shape[0], ids.shape[1] + max_new_tokens), dtype=np.int64)
        out[:, :ids.shape[1]] = ids
        length, caches = ids.shape[1], None
        # batch 1 with the cache: one compiled call per token, the same logits (nanoopt/quant/w8a8_decode.py)
        fused = None
        if use_cache and ids.shape[0] == 1 and max_new_tokens > 1 and length < block:
            fused = FusedDecoder.for_model(self, PROB_SCALE, PROB_ZERO)
        with no_grad():
            for _ in range(max_new_tokens):
                window = out[:, max(0, length - block):length]
                if use_cache and caches is not None and length <= block:
                    if fused is None:
                        logits = self.logits(window[:, -1:], caches, last_only=True)
                    else:
                        logits = fused.step(window[0, -1], caches)
                elif use_cache and length <= block:
                    caches = self._new_caches(ids.shape[0]) if fused is None else fused.new_caches()
                    logits = self.logits(window, caches, last_only=True)
                else:
                    logits = self.logits(window, None, last_only=True)
                out[:, length] = sample_tokens(logits[:, -1], temperature, top_k, rng)
                length += 1
        return out


def prepare_w8a8(model: GPT, config: W8A8Config | None = None) -> W8A8GPT:
    """The simulated W8A8 GPT of a float ``GPT`` (copied weights, fresh observers); calibrate it next."""
    if not isinstance(model, GPT):
        raise TypeError(f"prepare_w8a8: model must be a nanoopt GPT (models.gpt), got {type(model).__name__}")
    config = W8A8Config() if config is None else config
    per_token = config.per_token
    blocks = []
    for i, block in enumerate(model.transformer["h"]):
        prefix = f"transformer.h.{i}"
        linears = {
            "c_attn": SimulatedW8A8Linear(block.attn.c_attn, f"{prefix}.attn.c_attn", per_token, True, not per_token),
            "c_proj": SimulatedW8A8Linear(block.attn.c_proj, f"{prefix}.attn.c_proj", False, False, True),
            "c_fc": SimulatedW8A8Linear(block.mlp.c_fc, f"{prefix}.mlp.c_fc", per_token, False, not per_token),
            "mlp_proj": SimulatedW8A8Linear(block.mlp.c_proj, f"{prefix}.mlp.c_proj", per_token, False,
                                            not per_token),
        }
        norms = (IBertNorm(f"{prefix}.ln_1"), IBertNorm(f"{prefix}.ln_2")) if config.nonlinear == "ibert" else None
        blocks.append(W8A8Block(copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2), linears,
                                block.mlp.gelu.approximate, norms))
    head = SimulatedW8A8Linear(model.lm_head, "lm_head", per_token, False, not per_token)
    return W8A8GPT(model.config, model.transformer["wte"].weight.data.copy(),
                   model.transformer["wpe"].weight.data.copy(), blocks, copy.deepcopy(model.transformer["ln_f"]),
                   head, config, simulated=True,
                   norm_f=IBertNorm("transformer.ln_f") if config.nonlinear == "ibert" else None)


def calibrate_w8a8(prepared: W8A8GPT, calibration: Any, batch_size: int = 32) -> W8A8GPT:
    """``prepared.calibrate(calibration, batch_size)``."""
    return prepared.calibrate(calibration, batch_size)


def convert_w8a8(prepared: W8A8GPT) -> W8A8GPT:
    """The integer GPT: every linear's int8 weights and grids frozen into buffers, kernels packed once."""
    if not isinstance(prepared, W8A8GPT) or not prepared.simulated:
        raise TypeError(f"convert_w8a8 takes the prepared (simulated) W8A8GPT of prepare_w8a8, got "
                        f"{type(prepared).__name__}")
    prepared._check_calibrated()
    blocks = []
    for block in prepared.blocks:
        linears = {name: QuantizedW8A8Linear(getattr(block, name)) for name in _LINEARS}
        norms = None if block.norm_1 is None else (block.norm_1.frozen(), block.norm_2.frozen())
        blocks.append(W8A8Block(copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2), linears, block.approximate,
                                norms))
    return W8A8GPT(prepared.config, prepared.wte.copy(), prepared.wpe.copy(), blocks, copy.deepcopy(prepared.ln_f),
                   QuantizedW8A8Linear(prepared.lm_head), prepared.w8a8, simulated=False,
                   norm_f=None if prepared.norm_f is None else prepared.norm_f.frozen()).eval()


def quantize_w8a8(model: GPT, calibration: Any, alpha: float | None = 0.5, config: W8A8Config | None = None,
                  batch_size: int = 32) -> W8A8GPT:
    """SmoothQuant (``alpha``; None skips it), then prepare, calibrate and convert: the integer W8A8 GPT."""
    if alpha is not None:
        model = smooth_quant(model, calibration, alpha=alpha, batch_size=batch_size)
    return convert_w8a8(prepare_w8a8(model, config).calibrate(calibration, batch_size))
