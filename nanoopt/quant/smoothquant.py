"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", section 4): move activation outliers into the weights before W8A8 quantization.

A Linear ``Y = X W^T`` is unchanged when every input channel j of X is divided by ``s_j`` and the matching
column of W multiplied by it: ``Y = (X diag(s)^-1) (W diag(s))^T``. With the smoothing factors (eq. 4)

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (max over calibration tokens, resp. over output rows)

``alpha = 0.5`` splits the quantization difficulty evenly between activations and weights; ``alpha -> 1`` moves
more of it into the weights. The division of X costs nothing when X comes out of a LayerNorm: it is folded into
the LayerNorm's affine parameters (``gamma / s``, ``beta / s``). In a pre-LN GPT block two Linears read a
LayerNorm: the attention's packed ``c_attn`` (after ``ln_1``) and the MLP's ``c_fc`` (after ``ln_2``); those
are the pairs smoothed here (the paper's choice too: the projections after attention and GELU have no foldable
predecessor).

Channels where the activation or every weight is zero keep ``s_j = 1``; factors are clipped to [1e-5, 1e5].

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models
>>> no.manual_seed(0)
>>> gpt = models.gpt(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
>>> ids = np.random.default_rng(0).integers(0, 11, size=(4, 8))
>>> smoothed = smooth_quant(gpt, ids, alpha=0.5)
>>> bool(np.allclose(smoothed(ids).data, gpt(ids).data, atol=1e-5))
True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.nn.graph import evaluating, hooks

__all__ = ["activation_channel_max", "outlier_ratio", "smooth_quant", "smoothing_pairs", "smoothing_scales"]

_SCALE_RANGE = (1e-5, 1e5)


def smoothing_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layernorm name, linear name)`` of every LayerNorm -> Linear pair SmoothQuant folds into.

    For GPT blocks (modules with ``ln_1``, ``attn.c_attn``, ``ln_2``, ``mlp.c_fc``): ``ln_1 -> attn.c_attn`` and
    ``ln_2 -> mlp.c_fc``.

    >>> from nanoopt import models
    >>> smoothing_pairs(models.gpt(5, 4, 1, 1, 8))
    [('transformer.h.0.ln_1', 'transformer.h.0.attn.c_attn'), ('transformer.h.0.ln_2', 'transformer.h.0.mlp.c_fc')]
    """
    pairs = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(module.named_modules())
        for norm, linear in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")):
            if isinstance(children.get(norm), nn.LayerNorm) and isinstance(children.get(linear), nn.Linear):
                pairs.append((prefix + norm, prefix + linear))
    return pairs


def _batches(calibration: Any, batch_size: int) -> list[np.ndarray]:
    if isinstance(calibration, np.ndarray):
        batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
    elif isinstance(calibration, Iterable):
        batches = [np.asarray(b[0] if isinstance(b, tuple) else b) for b in calibration]
    else:
        raise TypeError(f"calibration must be an array of token windows (N, T) or an iterable of batches, got "
                        f"{type(calibration).__name__}")
    batches = [b for b in batches if len(b)]
    if not batches:
        raise ValueError("calibration is empty: SmoothQuant needs at least one window to measure activations")
    return batches


def activation_channel_max(model: nn.Module, calibration: Any, names: list[str],
                           batch_size: int = 32) -> dict[str, np.ndarray]:
    """``max |X_j|`` over every calibration token of the *outputs* of the modules ``names``, per channel j.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> gpt = models.gpt(5, 4, 1, 1, 8)
    >>> activation_channel_max(gpt, np.zeros((2, 4), np.int64), ["transformer.h.0.ln_1"])["transformer.h.0.ln_1"].shape
    (8,)
    """
    modules = dict(model.named_modules())
    stats: dict[str, np.ndarray] = {}

    def record(name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        data = np.abs(output.data).reshape(-1, output.shape[-1]).max(axis=0)
        stats[name] = data if name not in stats else np.maximum(stats[name], data)

    with evaluating(model), hooks({name: modules[name] for name in names}, after=record):
        for batch in _batches(calibration, batch_size):
            model(batch)
    return stats


def smoothing_scales(activation_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 4: ``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)`` (float64; 1 where undefined, clipped).

    >>> smoothing_scales(np.array([4.0, 1.0]), np.array([[1.0, 1.0]]), 0.5).tolist()
    [2.0, 1.0]
    """
    a = np.asarray(activation_max, np.float64)
    w = np.abs(np.asarray(weight, np.float64)).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = a ** alpha / w ** (1.0 - alpha)
    s = np.where((a > 0) & (w > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *_SCALE_RANGE)


def outlier_ratio(activation_max: np.ndarray) -> float:
    """How much the largest channel stands out: ``max_j max|X_j| / median_j max|X_j|``.

    >>> outlier_ratio(np.array([1.0, 1.0, 10.0]))
    10.0
    """
    a = np.asarray(activation_max, np.float64)
    median = float(np.median(a))
    return float(a.max() / median) if median > 0 else float("inf")


def smooth_quant(model: nn.Module, calibration: Any, alpha: float = 0.5, batch_size: int = 32) -> nn.Module:
    """A copy of ``model`` with SmoothQuant's per-channel factors folded into each LayerNorm -> Linear pair.

    ``calibration``: token windows (N, T) (split into batches of ``batch_size``) or an iterable of batches (or
    (x, y) pairs). The copy computes the same function in float (up to float32 rounding); the Linear inputs
    it quantizes have smaller outliers. ``alpha`` in [0, 1] (eq. 4).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> smooth_quant(models.gpt(5, 4, 1, 1, 8), np.zeros((1, 4), np.int64), alpha=1.5)
    Traceback (most recent call last):
    ...
    ValueError: smooth_quant: alpha must be a number in [0, 1], got 1.5
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_quant: alpha must be a number in [0, 1], got {alpha!r}")
    pairs = smoothing_pairs(model)
    if not pairs:
        raise ValueError(f"smooth_quant: {type(model).__name__} has no LayerNorm -> Linear pair to smooth "
                         "(expected GPT blocks with ln_1 -> attn.c_attn and ln_2 -> mlp.c_fc)")
    try:
        stats = activation_channel_max(model, calibration, [norm for norm, _ in pairs], batch_size)
    except ValueError as error:
        raise ValueError(f"smooth_quant: {error}") from None
    smoothed = copy.deepcopy(model)
    modules = dict(smoothed.named_modules())
    for norm_name, linear_name in pairs:
        norm, linear = modules[norm_name], modules[linear_name]
        if norm.weight is None:
            raise ValueError(f"smooth_quant: LayerNorm {norm_name!r} has no affine weight to fold the factors into")
        if linear.in_features != norm.weight.shape[-1]:
            raise ValueError(f"smooth_quant: Linear {linear_name!r} reads {linear.in_features} features but "
                             f"LayerNorm {norm_name!r} gives {norm.weight.shape[-1]}")
        s = smoothing_scales(stats[norm_name], linear.weight.data, alpha)
        norm.weight.data[...] = (norm.weight.data / s).astype(norm.weight.dtype)
        if norm.bias is not None:
            norm.bias.data[...] = (norm.bias.data / s).astype(norm.bias.dtype)
        linear.weight.data[...] = (linear.weight.data * s[None, :]).astype(linear.weight.dtype)
    return smoothed
