"""AdaRound: learning whether each weight rounds up or down (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization").

Rounding every weight to the nearest grid point is not what minimises the layer's output error. AdaRound learns,
per weight, a continuous variable ``V`` and the soft-quantized weight (eq. 22)

    ``W~ = s * clip(floor(W / s) + h(V), qmin, qmax)``,  ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``

(the rectified sigmoid, ``zeta = 1.1``, ``gamma = -0.1``), minimising layer by layer (eq. 25)

    ``|| f(W x) - f(W~ x~) ||_F^2 + lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta)``

where ``x`` is the layer's input in the float model, ``x~`` its input in the quantized model (layers before it
already rounded: the "asymmetric" reconstruction of section 5), ``f`` the fused ReLU if any, and the regulariser
(eq. 24) pushes every ``h`` to 0 or 1 as ``beta`` is annealed from 20 to 2; it is off for the first ``warmup``
fraction of the iterations. ``V`` starts where ``h(V) = W / s - floor(W / s)`` (plain rounding's neighbourhood)
and is trained with Adam through nanoopt's autograd. At the end ``W`` is replaced by ``s * clip(floor(W / s) +
[V >= 0])``: a float weight on the grid, so the prepared model, ``convert`` and the integer kernels all use exactly
the learned rounding (the weight quantizer's scale stays frozen).

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(64, 1, 8, 8)).astype(np.float32)
>>> prepared = quant.calibrate(quant.prepare(models.tiny_mlp(), quant.QuantConfig.weights4(), x[:1]), [x],
...                            progress=False)
>>> report = adaround(prepared, [x], iterations=50, progress=False)
>>> report["1"]["loss_after"] <= report["1"]["loss_nearest"]
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nanoopt import optim
from nanoopt.nn import Parameter
from nanoopt.quant.algorithms.layer_data import capture_inputs, check_calibrated, float_mode, weighted_layers
from nanoopt.quant.ptq import PreparedModel, iterate_batches
from nanoopt.quant.simulate import SimulatedConv2d
from nanoopt.tensor import Tensor, no_grad

__all__ = ["adaround", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (section 4.1)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (Louizos et al. 2018; AdaRound eq. 23).

    >>> rectified_sigmoid(Tensor(np.array([-10.0, 0.0, 10.0], np.float32))).data.tolist()
    [0.0, 0.5, 1.0]
    """
    return (v.sigmoid() * (ZETA - GAMMA) + GAMMA).clip(0.0, 1.0)


def _initial_v(rest: np.ndarray) -> np.ndarray:
    """``V`` with ``h(V) = rest`` (``rest`` in ``[0, 1)``)."""
    probability = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return np.log(probability / (1 - probability)).astype(np.float32)


def _reconstruction(layer, x: np.ndarray, weight: Tensor, bias: Tensor | None, target: np.ndarray) -> Tensor:
    """``mean over examples (and positions) of sum over channels (f(W~ x~) - target)^2``."""
    out = layer.float_op(Tensor(x), weight, bias)
    if layer.relu:
        out = out.relu()
    channel_axis = 1 if isinstance(layer, SimulatedConv2d) else out.ndim - 1
    squared = (out - Tensor(target)) ** 2
    return squared.sum(axis=channel_axis).mean()


def _round_layer(layer, float_inputs: list[np.ndarray], quantized_inputs: list[np.ndarray], iterations: int,
                 batch_size: int, learning_rate: float, regularization: float, beta: tuple[float, float],
                 warmup: float, rng: np.random.Generator) -> dict[str, float]:
    params = layer.weight_quantizer.qparams()
    spec = params.spec
    weight = layer.weight.data.astype(np.float32)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    scale = np.broadcast_to(params.scale, (weight.shape[0],)).astype(np.float32).reshape(shape)
    steps = weight / scale  # (C_out, ...)
    floor = np.floor(steps)
    bias = None if layer.bias is None else Tensor(layer.bias.data)
    x_float, x_quant = np.concatenate(float_inputs), np.concatenate(quantized_inputs)
    with no_grad():
        target = layer.float_op(Tensor(x_float), Tensor(weight), bias)
        target = (target.relu() if layer.relu else target).data

    def loss_of(codes: np.ndarray) -> float:
        with no_grad():
            return float(_reconstruction(layer, x_quant, Tensor(codes * scale), bias, target).data)

    nearest = np.clip(np.rint(steps), spec.qmin, spec.qmax)
    v = Parameter(_initial_v(steps - floor))
    optimizer = optim.Adam([v], lr=learning_rate)
    start_beta, end_beta = beta
    regularize_from = int(warmup * iterations)
    for step in range(iterations):
        index = rng.choice(len(x_quant), size=min(batch_size, len(x_quant)), replace=False)
        h = rectified_sigmoid(v)
        soft = (Tensor(floor) + h).clip(spec.qmin, spec.qmax) * Tensor(scale)
        loss = _reconstruction(layer, x_quant[index], soft, bias, target[index])
        if step >= regularize_from:
            progress = (step - regularize_from) / max(iterations - regularize_from, 1)
            current_beta = start_beta + (end_beta - start_beta) * progress  # linear annealing, 20 -> 2
            loss = loss + regularization * (1.0 - ((h * 2.0 - 1.0).abs() ** current_beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = np.clip(floor + (v.data >= 0), spec.qmin, spec.qmax)
    loss_nearest, loss_learned = loss_of(nearest), loss_of(learned)
    rounded = learned if loss_learned <= loss_nearest else nearest      # never worse than nearest (see adaround)
    codes = rounded.astype(spec.dtype)
    layer.weight.data = params.dequantize(codes).astype(layer.weight.dtype)  # on the grid: re-quantizes exactly
    return {"loss_nearest": loss_nearest, "loss_learned": loss_learned, "loss_after": min(loss_learned, loss_nearest),
            "kept_nearest": float(loss_learned > loss_nearest), "changed_fraction": float(np.mean(rounded != nearest))}


def adaround(prepared: PreparedModel, batches: Any, iterations: int = 1000, batch_size: int = 64,
             learning_rate: float = 1e-2, regularization: float = 0.01, beta: tuple[float, float] = (20.0, 2.0),
             warmup: float = 0.2, num_samples: int = 1024, seed: int = 0,
             progress: bool = True) -> dict[str, dict[str, float]]:
    """Learn the rounding of every Linear/Conv2d weight of a calibrated prepared model, in place.

    ``num_samples`` examples of ``batches`` are used. Returns, per layer, the reconstruction loss (on those
    examples, quantized inputs) of round-to-nearest (``loss_nearest``), of the learned hard rounding
    (``loss_learned``) and of the rounding kept (``loss_after``), whether nearest was kept (``kept_nearest``, 1.0 or
    0.0), and the fraction of weights whose rounding changed.

    The learned rounding is optimised softly, on mini-batches, with the regulariser; its hard rounding can
    reconstruct a layer's output worse than round-to-nearest on the calibration examples. Then (a guard of ours,
    not in the paper) the layer keeps round-to-nearest, so ``loss_after <= loss_nearest`` for every layer.
    """
    check_calibrated(prepared, "adaround")
    if iterations < 1 or batch_size < 1 or not 0.0 <= warmup < 1.0:
        raise ValueError(f"adaround needs iterations >= 1, batch_size >= 1 and warmup in [0, 1), got {iterations}, "
                         f"{batch_size}, {warmup}")
    examples = np.concatenate(list(iterate_batches(batches)))[:num_samples]
    if len(examples) == 0:
        raise ValueError("adaround: no batches were given")
    batch_list = [examples[start:start + 256] for start in range(0, len(examples), 256)]
    layers = weighted_layers(prepared)
    with float_mode(prepared):
        float_inputs = capture_inputs(prepared, [layer for _, layer in layers], batch_list)
    rng = np.random.default_rng(seed)
    report = {}
    for (name, layer), inputs in tqdm(list(zip(layers, float_inputs, strict=True)), desc="adaround",
                                      disable=not progress, leave=False):
        quantized_inputs = capture_inputs(prepared, [layer], batch_list)[0]  # earlier layers already rounded
        report[name] = _round_layer(layer, inputs, quantized_inputs, iterations, batch_size, learning_rate,
                                    regularization, beta, warmup, rng)
    return report
