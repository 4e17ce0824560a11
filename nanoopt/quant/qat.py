"""Quantization-aware training: ``prepare_qat`` -> train with :func:`nanoopt.fit` -> ``quant.convert``.

The model is trained through the rounding it will meet in integers (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", section 3; Krishnamoorthi 2018,
"Quantizing deep convolutional networks for efficient inference: A whitepaper", section 3), then converted to
the *same* integer model post-training quantization produces: :func:`prepare_qat` builds on
:func:`~nanoopt.quant.ptq.prepare`, and :func:`~nanoopt.quant.ptq.convert` is used unchanged.

What :func:`prepare_qat` adds to a prepared model
--------------------------------------------------
* **Weight fake quantization that follows the weights.** ``WeightFakeQuantize`` re-fits its observer to the
  current weights at every training step (the last-value range of Jacob et al. section 3.1) until frozen; or
  ``LSQQuantizer`` learns the step instead (``weight_quantizer="lsq"``). The quantizer modules and their
  gradients live in :mod:`nanoopt.quant.fake_quant`.
* **Activation fake quantization.** The config's observers (default here: moving-average min/max, section 3.1),
  or learned quantizers: LSQ steps (Esser et al. 2020) or PACT clipping levels (Choi et al. 2018) on outputs
  followed by a ReLU. Gradients pass the rounding straight through (:mod:`nanoopt.quant.fake_quant`).
* **BatchNorm folding simulated in training** (Jacob et al. section 3.2 and figure C.8; Krishnamoorthi section
  3.2): a Conv2d/Linear followed by BatchNorm becomes one :class:`QATConvBn2d` / :class:`QATLinearBn1d`. With
  ``gamma``, ``mu``, ``sigma = sqrt(var + eps)`` and ``f = gamma / sigma_running`` per output channel:

  - training, BN not frozen: ``y = BN_batch( conv(x, Q(W f)) / f + b )`` -- the weights are quantized exactly
    as they will be folded (with the running sigma), while the output is normalised with the *batch* statistics
    (which also keep updating the running ones). Algebraically ``conv(x, Q(W f)) * sigma_running / sigma_batch +
    (b - mu_batch) gamma / sigma_batch + beta``: Krishnamoorthi's correction of the folded weights.
  - BN frozen (:func:`freeze_batchnorm`) or eval mode: ``y = conv(x, Q(W f)) + (b - mu_running) f + beta``, the
    folded layer of inference (running statistics, no longer updated).

  With fake quantization off, both equal the float Conv2d -> BatchNorm (train / eval mode) up to float rounding.
* **Switches and schedules.** :func:`~nanoopt.quant.ptq.set_observers` / :func:`~nanoopt.quant.ptq.set_fake_quant`
  work on QAT models (every quantizer here is a :class:`~nanoopt.quant.fake_quant.FakeQuantize`);
  :func:`freeze_batchnorm` switches BN to running statistics; :class:`QATSchedule` (a training callback) freezes
  observers and BatchNorm after chosen steps.
* **Pruned models stay pruned.** A layer pruned with :mod:`nanoopt.prune` keeps its ``weight_orig * weight_mask``
  reparametrisation in the QAT model, so masked weights get zero gradients and stay exactly zero; they quantize to
  the integer 0 (weights have zero point 0) in the converted model.

Once every quantizer is frozen (observers off), the QAT model in eval mode runs the integer path of
:mod:`nanoopt.quant.simulate`: the same :func:`~nanoopt.quant.lowering.integer_layer` as ``convert``, so its
output equals the converted integer model's bit for bit (tested with hypothesis).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import data, models, quant
>>> no.manual_seed(0)
>>> x, y = data.load_digits("train")
>>> model = models.tiny_mlp()
>>> _ = no.fit(model, (x, y), epochs=2, progress=False)
>>> qat_model = prepare_qat(model, example_input=x[:1])
>>> _ = no.fit(qat_model, (x, y), epochs=1, lr=0.01, progress=False, callbacks=[QATSchedule(freeze_observers_after=5)])
>>> integer_model = quant.convert(qat_model)
>>> bool(np.array_equal(qat_model.eval()(x).data, integer_model(x).data))
True
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.nn.converted import require_float_model
from nanoopt.prune.masks import MASK_SUFFIX, ORIG_SUFFIX, apply_mask, pruned_names, set_effective
from nanoopt.quant.bn_fold import batchnorm_pairs
from nanoopt.quant.checks import check_finite_array, check_finite_parameters
from nanoopt.quant.config import QuantConfig
from nanoopt.quant.fake_quant import FakeQuantize, LSQQuantizer, PACTQuantizer, WeightFakeQuantize
from nanoopt.quant.lowering import IntegerLayer, integer_layer
from nanoopt.quant.observers import MovingAverageMinMaxObserver
from nanoopt.quant.ptq import PreparedModel, prepare, set_fake_quant, set_observers
from nanoopt.quant.simulate import SimulatedConv2d, SimulatedLinear
from nanoopt.tensor import Tensor, no_grad
from nanoopt.train import Callback

__all__ = [
    "QATConv2d",
    "QATConvBn2d",
    "QATLinear",
    "QATLinearBn1d",
    "QATSchedule",
    "freeze_batchnorm",
    "prepare_qat",
    "qat_config",
]

WEIGHT_QUANTIZERS = ("observer", "lsq")
ACTIVATION_QUANTIZERS = ("observer", "lsq", "pact")


def qat_config(**changes: Any) -> QuantConfig:
    """The default QAT configuration: :class:`~nanoopt.quant.config.QuantConfig` with moving-average min/max
    activation observers (Jacob et al. 2018, section 3.1) instead of the histogram search PTQ uses (which would
    rerun at every step). ``changes`` are QuantConfig fields.

    >>> from nanoopt.spec import QuantSpec
    >>> qat_config(weight=QuantSpec(bits=4, symmetric=True, per_channel=True)).activation_observer.__name__
    'MovingAverageMinMaxObserver'
    """
    return QuantConfig(**{"activation_observer": MovingAverageMinMaxObserver, **changes})


# ================================================================================================ layers
def _refresh_pruned(module: nn.Module) -> None:
    """Recompute ``<name> = <name>_orig * <name>_mask`` (the optimiser may have changed ``_orig`` since the last
    forward pass, when the pruning hook last ran)."""
    with no_grad():
        for name in pruned_names(module):
            set_effective(module, name)


def _adopt_layer(simulated: Any, layer: nn.Module) -> None:
    """Give a QAT layer the trainable parameters of the float ``layer`` it simulates, pruning included."""
    for name in ("weight", "bias"):
        if name in pruned_names(layer):
            setattr(simulated, name, layer._parameters[name + ORIG_SUFFIX])
            apply_mask(simulated, name, layer._buffers[name + MASK_SUFFIX].copy())


class QATLinear(SimulatedLinear):
    """The simulated Linear of a QAT model (pruning kept, weights read fresh when lowered to integers)."""

    converted_by = "quant.prepare_qat"  # nanoopt.nn.converted.MARKER

    def integer_layer(self) -> IntegerLayer:
        _refresh_pruned(self)
        return super().integer_layer()


class QATConv2d(SimulatedConv2d):
    """The simulated Conv2d of a QAT model (pruning kept, weights read fresh when lowered to integers)."""

    converted_by = "quant.prepare_qat"  # nanoopt.nn.converted.MARKER

    def integer_layer(self) -> IntegerLayer:
        _refresh_pruned(self)
        return super().integer_layer()


class _FoldedBatchNorm:
    """Mixin: a weighted layer followed by its BatchNorm ``self.bn``, trained with the fold simulated (see the
    module docstring for the two regimes). ``bn_frozen`` switches to running statistics."""

    bn: nn.Module
    bn_frozen: bool

    def _init_batchnorm(self, bn: nn.Module) -> None:
        self.bn = bn
        self.bn_frozen = False

    def get_extra_state(self) -> dict[str, np.ndarray]:
        """``bn_frozen`` (running or batch statistics in training) besides the layer's own extra state."""
        return {**super().get_extra_state(), "bn_frozen": np.array(bool(self.bn_frozen))}  # type: ignore[misc]

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        flag = state.get("bn_frozen")
        if flag is not None and (flag.dtype != np.bool_ or flag.shape != ()):
            raise ValueError(f"'bn_frozen' must be a bool scalar, got {flag.dtype} {flag.shape}")
        super().check_state(state)  # type: ignore[misc]

    def set_extra_state(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        if "bn_frozen" in state:
            self.bn_frozen = bool(state.pop("bn_frozen"))
        super().set_extra_state(state)  # type: ignore[misc]

    def fold_factor(self) -> Tensor:
        """``f = gamma / sqrt(running_var + eps)`` per output channel (a graph node through ``gamma``)."""
        inv_std = (1.0 / np.sqrt(self.bn.running_var + np.float32(self.bn.eps))).astype(np.float32)
        gamma = self.bn.weight if self.bn.weight is not None else Tensor(np.ones_like(inv_std))
        return gamma * Tensor(inv_std)

    def folded(self) -> tuple[Tensor, Tensor]:
        """The inference fold with running statistics: ``(W f, (b - mu) f + beta)``, as Tensors (float32)."""
        factor = self.fold_factor()
        weight = self.weight * factor.reshape((-1,) + (1,) * (self.weight.ndim - 1))
        mean = Tensor(self.bn.running_mean.astype(np.float32))
        bias = (self.bias - mean if self.bias is not None else -mean) * factor
        if self.bn.bias is not None:
            bias = bias + self.bn.bias
        return weight, bias

    def integer_layer(self) -> IntegerLayer:
        """Lower the folded layer (running statistics) to integers: the weights ``Q(W f)`` of training."""
        _refresh_pruned(self)
        with no_grad():
            weight, bias = self.folded()
        return integer_layer(weight.data, bias.data, self.weight_quantizer.qparams(), self.source_qparams(),
                             self.output_quantizer.qparams(), self.relu)

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        if self.integer_mode():
            return super().forward(x)  # the integer path, through integer_layer() above
        if self.training and not self.bn_frozen:
            factor = self.fold_factor()
            if not np.all(factor.data != 0):
                raise ValueError(f"layer {self.layer_name!r}: BatchNorm weight (gamma) is 0 for channels "
                                 f"{np.flatnonzero(factor.data == 0).tolist()}; the simulated fold divides by "
                                 "gamma / sigma in training (freeze_batchnorm, or fold_bn=False)")
            weight = self.weight * factor.reshape((-1,) + (1,) * (self.weight.ndim - 1))
            y = self.float_op(x, self.weight_quantizer(weight), None)
            channel_shape = (1, -1) + (1,) * (y.ndim - 2)
            y = y / factor.reshape(channel_shape)  # conv(x, Q(W f)) / f
            if self.bias is not None:
                y = y + self.bias.reshape(channel_shape)
            y = self.bn(y)  # batch statistics; the running ones are updated
        else:
            weight, bias = self.folded()
            y = self.float_op(x, self.weight_quantizer(weight), bias)
        if self.relu:
            y = y.relu()
        return self.output_quantizer(y)


class QATConvBn2d(_FoldedBatchNorm, QATConv2d):
    """Conv2d + BatchNorm2d trained with the fold simulated (Jacob et al. 2018 section 3.2)."""

    def __init__(self, simulated: SimulatedConv2d, layer: nn.Conv2d, bn: nn.Module) -> None:
        QATConv2d.__init__(self, layer, simulated.weight_quantizer, simulated.output_quantizer, simulated.relu,
                           simulated.layer_name, simulated.sources)
        self._init_batchnorm(bn)


class QATLinearBn1d(_FoldedBatchNorm, QATLinear):
    """Linear + BatchNorm1d trained with the fold simulated."""

    def __init__(self, simulated: SimulatedLinear, layer: nn.Linear, bn: nn.Module) -> None:
        QATLinear.__init__(self, layer, simulated.weight_quantizer, simulated.output_quantizer, simulated.relu,
                           simulated.layer_name, simulated.sources)
        self._init_batchnorm(bn)


# ================================================================================================ prepare
def _replace_quantizer(prepared: PreparedModel, old: FakeQuantize, new: FakeQuantize) -> None:
    """Put ``new`` everywhere ``old`` is referenced: owning attributes and the ``sources`` of its consumers."""
    if prepared.input_quantizer is old:
        prepared.input_quantizer = new
    if prepared.output_quantizer_ref[0] is old:
        prepared.output_quantizer_ref[0] = new
    for module in prepared.modules():
        for attribute in ("weight_quantizer", "output_quantizer"):
            if module.__dict__.get("_modules", {}).get(attribute) is old:
                setattr(module, attribute, new)
        sources = module.__dict__.get("sources")
        if sources is not None:
            module.sources = [new if source is old else source for source in sources]


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"prepare_qat: {name} must be one of {list(allowed)}, got {value!r}")


def prepare_qat(model: nn.Module, config: QuantConfig | None = None, example_input: Any = None, *,
                weight_quantizer: str = "observer", activation_quantizer: str = "observer",
                fold_bn: bool = True) -> PreparedModel:
    """A copy of ``model`` ready for quantization-aware training (see the module docstring), in train mode.

    Parameters
    ----------
    model : a float model (the original is not modified). Pruned layers keep their masks.
    config : a :class:`~nanoopt.quant.config.QuantConfig`; default :func:`qat_config` (int8, moving-average
        activation ranges). Its weight observers are re-fitted to the weights at every step while observing.
    example_input : one batch (or one example with its batch axis); needed for models that are not plain
        Sequentials.
    weight_quantizer : ``"observer"`` (the config's observer, re-fitted every step) or ``"lsq"`` (learned steps,
        one per output channel for per-channel specs, initialised from the weights).
    activation_quantizer : ``"observer"``, ``"lsq"`` (learned steps on every layer output) or ``"pact"``
        (learned clipping on outputs that go through a fused ReLU; other outputs keep observers).
    fold_bn : simulate the folding of each BatchNorm into the Conv2d/Linear before it (else BatchNorm stays a
        float layer).

    Train the result with :func:`nanoopt.fit` (its parameters include learned steps and clipping levels), freeze
    it (:class:`QATSchedule`, or ``quant.set_observers(model, False)`` and :func:`freeze_batchnorm`), then
    ``quant.convert`` it.

    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    >>> qat_model = prepare_qat(model, example_input=np.zeros((1, 1, 4, 4), np.float32), weight_quantizer="lsq")
    >>> [type(m).__name__ for m in qat_model.model]
    ['QATConvBn2d', 'Identity', 'Identity', 'Flatten', 'QATLinear']
    >>> type(qat_model.model[0].weight_quantizer).__name__, qat_model.training
    ('LSQQuantizer', True)
    """
    _check_choice(weight_quantizer, WEIGHT_QUANTIZERS, "weight_quantizer")
    _check_choice(activation_quantizer, ACTIVATION_QUANTIZERS, "activation_quantizer")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat expects an nn.Module, got {type(model).__name__}")
    require_float_model(model, "prepare_qat")
    config = qat_config() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if example_input is not None and not isinstance(example_input, Tensor):
        example_input = np.asarray(example_input, dtype=np.float32)
    check_finite_parameters(model, "quant.prepare_qat")
    if example_input is not None:
        check_finite_array(np.asarray(example_input.data if isinstance(example_input, Tensor) else example_input),
                           "quant.prepare_qat: example_input")

    # 1. BatchNorms that fold come out of the model (Identity in their place) and into the QAT layer later
    work = copy.deepcopy(model)
    batchnorms: dict[str, nn.Module] = {}
    if fold_bn:
        for layer_name, bn_name in batchnorm_pairs(work, example_input).items():
            batchnorms[layer_name] = work.get_submodule(bn_name)
            work.set_submodule(bn_name, nn.Identity())
    prepared = prepare(work, config, example_input, fold_bn=False)

    # 2. weighted layers become QAT layers with weight quantizers that follow (or learn) the weights
    for name, node in prepared.graph.nodes.items():
        simulated = prepared.model.get_submodule(name) if name else prepared.model
        if not isinstance(simulated, SimulatedLinear | SimulatedConv2d):
            continue
        layer = node.module
        kind_linear = isinstance(simulated, SimulatedLinear)
        if name in batchnorms:
            qat_layer = (QATLinearBn1d if kind_linear else QATConvBn2d)(simulated, layer, batchnorms[name])
        else:
            qat_layer = (QATLinear if kind_linear else QATConv2d)(
                layer, simulated.weight_quantizer, simulated.output_quantizer, simulated.relu, name, simulated.sources)
        _adopt_layer(qat_layer, layer)
        layer_config = config.for_layer(name, layer)
        channels = layer.weight.shape[0]
        owner = f"layer {name!r} weight"
        if weight_quantizer == "lsq":
            quantizer: FakeQuantize = LSQQuantizer(layer_config.weight, channels, per_example=False, owner=owner)
        else:
            quantizer = WeightFakeQuantize(layer_config.make_weight_observer(), channels, owner)
        with no_grad():
            weight = qat_layer.folded()[0] if name in batchnorms else qat_layer.weight
        quantizer.observe(weight.data)
        quantizer.qparams()
        qat_layer.weight_quantizer = quantizer
        if name:
            prepared.model.set_submodule(name, qat_layer)
        else:
            prepared.model = qat_layer

    # 3. learned activation quantizers on layer outputs
    if activation_quantizer != "observer":
        for name in prepared.graph.nodes:
            module = prepared.model.get_submodule(name) if name else prepared.model
            old = module.__dict__.get("_modules", {}).get("output_quantizer")
            if old is None or (activation_quantizer == "pact" and not getattr(module, "relu", False)):
                continue
            owner = f"layer {name!r} output"
            if activation_quantizer == "lsq":
                new: FakeQuantize = LSQQuantizer(old.spec, per_example=True, owner=owner)
            else:
                new = PACTQuantizer(old.spec, owner=owner)
            _replace_quantizer(prepared, old, new)

    set_observers(prepared, True)
    set_fake_quant(prepared, True)
    return prepared.train()


# ================================================================================================ switches
def freeze_batchnorm(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Switch every folded BatchNorm of a QAT model to running statistics (``frozen=True``) or back to batch
    statistics in training; returns ``model``. Frozen, the running statistics no longer change.

    >>> freeze_batchnorm(nn.Sequential(nn.Linear(2, 2))) is not None
    True
    """
    for module in model.modules():
        if isinstance(module, _FoldedBatchNorm):
            module.bn_frozen = bool(frozen)
    return model


class QATSchedule(Callback):
    """Freeze the observers (``quant.set_observers(model, False)``) and/or the folded BatchNorms
    (:func:`freeze_batchnorm`) after a number of optimiser steps (Jacob et al. 2018 section 3.2; Krishnamoorthi
    2018 section 3.2 recommends freezing BN statistics, then observers, late in training). ``None``: never;
    ``0``: before the first step. Steps count from 0 in each :func:`nanoopt.fit` call.

    Observers follow PyTorch's semantics: they observe whenever they are enabled, in eval mode too, so a QAT model
    whose observers were never frozen changes its ranges each time it runs and does not equal its converted
    integer model. If training ends before a step given here is reached, the schedule warns (``UserWarning``
    naming the step and the number of steps that ran).

    >>> schedule = QATSchedule(freeze_observers_after=100, freeze_bn_after=50)
    >>> schedule.freeze_observers_after, schedule.freeze_bn_after
    (100, 50)
    """

    def __init__(self, freeze_observers_after: int | None = None, freeze_bn_after: int | None = None) -> None:
        for name, value in (("freeze_observers_after", freeze_observers_after), ("freeze_bn_after", freeze_bn_after)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"QATSchedule: {name} must be None or a step count >= 0, got {value!r}")
        self.freeze_observers_after = freeze_observers_after
        self.freeze_bn_after = freeze_bn_after
        self.steps_done_ = 0

    def _apply(self, steps_done: int, model: nn.Module) -> None:
        self.steps_done_ = steps_done
        if steps_done == self.freeze_bn_after:
            freeze_batchnorm(model)
        if steps_done == self.freeze_observers_after:
            set_observers(model, False)

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        self._apply(0, model)

    def on_step_end(self, step: int, model: nn.Module, loss: float) -> None:
        self._apply(step + 1, model)

    def on_train_end(self, model: nn.Module) -> None:
        done = self.steps_done_
        missed = [(name, value) for name, value in (("freeze_bn_after", self.freeze_bn_after),
                                                     ("freeze_observers_after", self.freeze_observers_after))
                  if value is not None and value > done]
        if not missed:
            return
        if any(name == "freeze_observers_after" for name, _ in missed):
            consequence = ("the observers are still live: they keep changing the ranges whenever the model runs "
                           "(eval mode included), so quant.convert(model) will not equal model.eval()")
        else:
            consequence = "the folded BatchNorms still normalise with batch statistics in training"
        steps = " and ".join(f"{name}={value}" for name, value in missed)
        warnings.warn(f"QATSchedule: {steps} was never reached (training ran {done} optimiser steps); "
                      f"{consequence}. Use a smaller step count, or freeze by hand: quant.set_observers(model, False), "
                      "quant.freeze_batchnorm(model)", UserWarning, stacklevel=3)
