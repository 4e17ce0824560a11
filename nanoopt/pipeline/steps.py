"""The step registry: one small function per kind of recipe step, with a typed schema and its place in the order.

A step kind is registered with :func:`register_step`: its schema (a dataclass, checked by
:func:`nanoopt.pipeline.schema.build`), the model states it can start from (``accepts``), the state it leaves
(``produces``; ``None``: unchanged), the tasks it serves (``"classify"``: the image classifiers; ``"lm"``: the GPT
on Shakespeare), an optional extra it needs (``requires``: module and extra name, checked before any work), the
function that does the work ``run(context, step)``, and, for steps that change the model's structure,
``rebuild(model, step, record, example)``: the same structural change without training, used to make an empty
model of the right kind when a saved file is loaded.

Model states: ``"float"`` (masks allowed), ``"qat"`` (prepared for quantization-aware training),
``"integer"`` (converted, weight-only or sparse: no more training), ``"saved"`` (nothing may follow).
So QAT after convert, prune after convert and convert without QAT are refused by the order check, naming the step.

The one-shot steps from calibration data (GPTQ, AWQ, RTN, SmoothQuant and W8A8, Wanda, SparseGPT, heads, blocks)
register the same way in :mod:`nanoopt.pipeline.steps_calibrated`.

>>> [name for name in ("train", "prune", "qat", "convert", "save") if name in STEPS]
['train', 'prune', 'qat', 'convert', 'save']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

import nanoopt as no
from nanoopt import data, distill, nn, onnx, optim, prune, quant
from nanoopt.prune.sparse import SparseLinear
from nanoopt.train_lm import LMTrainConfig, train_lm

__all__ = ["STEPS", "Context", "StepKind", "register_step"]


@dataclass
class Context:
    """What the steps share while a recipe runs.

    For a language model (``task == "lm"``) ``train_set`` is (ids[:-1], ids[1:]) of the training text (inputs and
    next tokens) and ``test_set`` the fixed validation windows (x, y), each (N, block_size).
    """

    model: nn.Module                       # the model being compressed
    train_set: tuple[np.ndarray, np.ndarray]
    test_set: tuple[np.ndarray, np.ndarray]
    seed: int = 0
    batch_size: int = 128
    progress: bool = False
    state: str = "float"                   # float | qat | integer | saved
    teacher: nn.Module | None = None       # the float model before the first compression step
    epochs_trained: int = 0                # training epochs run by the steps (for the float reference)
    records: list[dict[str, Any]] = field(default_factory=list)   # structural changes, for rebuilding
    saver: Callable[[Context, Any], None] | None = None           # the runner's save function
    task: str = "classify"                 # classify (images, labels) | lm (token ids, next tokens)
    output: str = "."                      # the folder the files go to
    files: dict[str, str] = field(default_factory=dict)           # files written by the steps, by kind


def calibration_inputs(context: Context, count: int) -> np.ndarray:
    """``count`` model inputs for calibration: the first training images, or random windows of the training text
    (seeded by the run's seed), each (count, block_size)."""
    return calibration_pairs(context, count)[0]


def calibration_pairs(context: Context, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (inputs, targets) for calibration: training images and labels, or random windows of the training
    text and their next tokens."""
    if context.task == "lm":
        block = context.model.config.block_size
        return data.sample_windows(context.train_set[0], block, count, np.random.default_rng(context.seed))
    return context.train_set[0][:count], context.train_set[1][:count]


@dataclass(frozen=True)
class StepKind:
    name: str
    schema: type
    run: Callable[[Context, Any], None]
    accepts: frozenset[str]
    produces: str | Callable[[Any], str] | None = None    # the state after it (or a function of its parameters)
    rebuild: Callable[[nn.Module, Any, dict[str, Any], np.ndarray], nn.Module] | None = None
    help: str = ""
    tasks: frozenset[str] = frozenset({"classify"})
    requires: tuple[str, str] | None = None    # (module, extra): an optional package the step needs
    not_after: dict[str, str] = field(default_factory=dict)   # earlier step kinds it cannot follow, and why

    def state_after(self, params: Any, state: str) -> str:
        """The model state after this step with these parameters, starting from ``state``."""
        produced = self.produces(params) if callable(self.produces) else self.produces
        return produced or state


STEPS: dict[str, StepKind] = {}


def register_step(name: str, schema: type, accepts: tuple[str, ...], produces: str | Callable[[Any], str] | None = None,
                  rebuild: Callable[..., nn.Module] | None = None, tasks: tuple[str, ...] = ("classify",),
                  requires: tuple[str, str] | None = None, not_after: dict[str, str] | None = None
                  ) -> Callable[[Callable], Callable]:
    """Register ``run(context, step)`` as the step kind ``name`` (a decorator).

    >>> @dataclass
    ... class Nothing:
    ...     pass
    >>> @register_step("noop-example", Nothing, accepts=("float",))
    ... def noop(context, step):
    ...     pass
    >>> STEPS.pop("noop-example").accepts
    frozenset({'float'})
    """
    if name in STEPS:
        raise ValueError(f"register_step: a step kind {name!r} is already registered")

    def decorate(run: Callable[[Context, Any], None]) -> Callable[[Context, Any], None]:
        STEPS[name] = StepKind(name, schema, run, frozenset(accepts), produces, rebuild,
                               (run.__doc__ or "").strip().split("\n")[0], frozenset(tasks), requires,
                               dict(not_after or {}))
        return run
    return decorate


# ============================================================================ shared helpers
def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_epochs(epochs: int, low: int = 0) -> None:
    if epochs < low:
        raise ValueError(f"epochs must be >= {low}, got {epochs}")


def _steps_per_epoch(context: Context) -> int:
    return -(-len(context.train_set[1]) // context.batch_size)


def _train(context: Context, model: nn.Module, epochs: int, lr: float, use_distill: bool, temperature: float,
           callbacks: list[Any], cosine: bool = False) -> None:
    """SGD (momentum 0.9) for ``epochs``, from the teacher's outputs too when ``use_distill``; with ``cosine``,
    the learning rate decays from ``lr`` towards 0 along a half cosine over the epochs."""
    if epochs == 0:
        for callback in callbacks:   # schedules that act at step 0 still act
            callback.on_train_begin(model, None)
        return
    no.manual_seed(context.seed + len(context.records) + 1)
    options = dict(epochs=epochs, lr=lr, momentum=0.9, batch_size=context.batch_size, progress=context.progress,
                   callbacks=callbacks)
    trained: nn.Module = model
    if use_distill:
        assert context.teacher is not None
        config = distill.DistillConfig(temperature=temperature)
        trained = distill.Distiller(model, context.teacher, config, cache_teacher=True)
    if cosine:
        optimizer = optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        options.update(optimizer=optimizer, scheduler=optim.CosineAnnealingLR(optimizer, T_max=epochs))
    try:
        if use_distill:
            trained.fit(context.train_set, **options)
        else:
            no.fit(model, context.train_set, **options)
    finally:
        if use_distill:
            trained.remove_hooks()
    context.epochs_trained += epochs


def _keep_teacher(context: Context) -> None:
    if context.teacher is None:
        context.teacher = copy.deepcopy(context.model).eval()


# ============================================================================ float training
@dataclass
class TrainStep:
    epochs: int = 10                  # epochs of SGD (momentum 0.9) on the training set
    lr: float = 0.05                  # learning rate
    cosine: bool = False              # decay the learning rate along a half cosine (Loshchilov & Hutter 2017)

    def check(self) -> None:
        _check_epochs(self.epochs, 1)
        _check_positive(lr=self.lr)


@register_step("train", TrainStep, accepts=("float",))
def train(context: Context, step: TrainStep) -> None:
    """Train the float model (before any compression; the teacher of later steps is the model after it)."""
    if context.teacher is not None:
        raise ValueError("a train step after compression began; use finetune")
    _train(context, context.model, step.epochs, step.lr, False, 2.0, [], step.cosine)


@dataclass
class TrainLMStep:
    iters: int = 1000                 # AdamW steps on random windows of the training text (nanoGPT's recipe)
    batch_size: int = 12              # windows per step
    lr: float = 1e-3                  # peak learning rate (linear warmup, then cosine decay to lr / 10)
    warmup: int = 100                 # warmup steps (at most iters / 2 are used)

    def check(self) -> None:
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        _check_positive(lr=self.lr)
        if self.batch_size < 1 or self.warmup < 0:
            raise ValueError(f"batch_size must be >= 1 and warmup >= 0, got {self.batch_size} and {self.warmup}")


@register_step("train_lm", TrainLMStep, accepts=("float",), tasks=("lm",))
def train_language_model(context: Context, step: TrainLMStep) -> None:
    """Train the language model (before any compression) with :func:`nanoopt.train_lm.train_lm`."""
    if context.teacher is not None:
        raise ValueError("a train_lm step after compression began")
    config = LMTrainConfig(max_iters=step.iters, batch_size=step.batch_size, learning_rate=step.lr,
                           min_lr=step.lr / 10, warmup_iters=min(step.warmup, step.iters // 2),
                           lr_decay_iters=step.iters, seed=context.seed)
    no.manual_seed(context.seed)
    train_lm(context.model, context.train_set[0], config, progress=context.progress)


# ============================================================================ pruning
@dataclass
class PruneStep:
    sparsity: float                   # fraction of the prunable weights set to zero at the end
    schedule: Literal["gradual", "one_shot"] = "gradual"   # gradual: cubic ramp (Zhu & Gupta 2017) while training
    scope: Literal["global", "layer"] = "global"           # one magnitude threshold for all layers, or per layer
    epochs: int = 0                   # training epochs during (gradual) or after (one-shot) pruning
    ramp: float = 0.5                 # gradual: fraction of the training steps over which sparsity rises
    pruning_steps: int = 10           # gradual: number of pruning events
    lr: float = 0.01                  # learning rate of the training
    distill: bool = False             # train from the original float model's outputs too (Hinton KD)
    temperature: float = 2.0          # KD temperature
    cosine: bool = False              # decay the learning rate along a half cosine

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        _check_epochs(self.epochs)
        _check_positive(lr=self.lr, temperature=self.temperature)
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"ramp must be in (0, 1], got {self.ramp}")
        if self.pruning_steps < 1:
            raise ValueError(f"pruning_steps must be >= 1, got {self.pruning_steps}")
        if self.schedule == "gradual" and self.epochs == 0:
            raise ValueError("a gradual schedule prunes while training: give epochs >= 1 (or schedule='one_shot')")


@register_step("prune", PruneStep, accepts=("float",))
def prune_step(context: Context, step: PruneStep) -> None:
    """Magnitude pruning of every Linear/Conv2d weight (masks stay until the model is saved or converted)."""
    _keep_teacher(context)
    parameters = prune.prunable_parameters(context.model)
    callbacks = []
    if step.schedule == "one_shot":
        prune.prune_to_sparsity(parameters, step.sparsity, step.scope)
    else:
        total = step.epochs * _steps_per_epoch(context)
        events = min(step.pruning_steps, max(1, int(step.ramp * total)))
        frequency = max(1, int(step.ramp * total) // events)
        callbacks.append(prune.GradualPruning(parameters, 0.0, step.sparsity, begin_step=0, frequency=frequency,
                                              pruning_steps=events, scope=step.scope))
    _train(context, context.model, step.epochs, step.lr, step.distill, step.temperature, callbacks, step.cosine)
    context.records.append({"kind": "prune", "sparsity": prune.mask_sparsity(parameters)})


# ============================================================================ finetuning
@dataclass
class FinetuneStep:
    epochs: int = 1                   # epochs of training (float, pruned or QAT model)
    lr: float = 0.01                  # learning rate
    distill: bool = False             # train from the original float model's outputs too (Hinton KD)
    temperature: float = 2.0          # KD temperature
    cosine: bool = False              # decay the learning rate along a half cosine

    def check(self) -> None:
        _check_epochs(self.epochs, 1)
        _check_positive(lr=self.lr, temperature=self.temperature)


@register_step("finetune", FinetuneStep, accepts=("float", "qat"))
def finetune(context: Context, step: FinetuneStep) -> None:
    """Train further (masks kept; a QAT model keeps its fake quantization), optionally distilling."""
    _keep_teacher(context)
    _train(context, context.model, step.epochs, step.lr, step.distill, step.temperature, [], step.cosine)


# ============================================================================ quantization-aware training
@dataclass
class QATStep:
    bits: int = 8                     # weight bits (per-channel symmetric); activations are int8
    epochs: int = 2                   # QAT epochs
    lr: float = 0.01                  # learning rate
    freeze_after: float = 0.5         # fraction of the QAT steps after which observers stop moving the ranges
    weight_quantizer: Literal["observer", "lsq"] = "observer"   # observed ranges, or learned steps (LSQ)
    distill: bool = False             # train from the original float model's outputs too (Hinton KD)
    temperature: float = 2.0          # KD temperature
    cosine: bool = False              # decay the learning rate along a half cosine

    def check(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        _check_epochs(self.epochs, 1)
        _check_positive(lr=self.lr, temperature=self.temperature)
        if not 0.0 <= self.freeze_after <= 1.0:
            raise ValueError(f"freeze_after must be in [0, 1], got {self.freeze_after}")


def _qat_config(step: QATStep) -> Any:
    return quant.qat_config(weight=quant.weight_spec(step.bits)) if step.bits != 8 else quant.qat_config()


def _rebuild_qat(model: nn.Module, step: QATStep, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    return quant.prepare_qat(model, _qat_config(step), example_input=example, weight_quantizer=step.weight_quantizer)


@register_step("qat", QATStep, accepts=("float",), produces="qat", rebuild=_rebuild_qat)
def qat(context: Context, step: QATStep) -> None:
    """Quantization-aware training (fake quantization, straight-through gradients); masks are kept."""
    _keep_teacher(context)
    example = context.train_set[0][:1]
    context.model = quant.prepare_qat(context.model, _qat_config(step), example_input=example,
                                      weight_quantizer=step.weight_quantizer)
    freeze = int(step.freeze_after * step.epochs * _steps_per_epoch(context))
    _train(context, context.model, step.epochs, step.lr, step.distill, step.temperature,
           [quant.QATSchedule(freeze_observers_after=freeze, freeze_bn_after=freeze)], step.cosine)
    context.records.append({"kind": "qat", "bits": step.bits})


@dataclass
class ConvertStep:
    pass


def _rebuild_convert(model: nn.Module, step: ConvertStep, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    model.train()
    with no.no_grad():
        model(no.Tensor(example))              # any ranges: the loaded state replaces them
    quant.set_observers(model, False)
    quant.freeze_batchnorm(model)
    return quant.convert(model.eval())


@register_step("convert", ConvertStep, accepts=("qat",), produces="integer", rebuild=_rebuild_convert)
def convert(context: Context, step: ConvertStep) -> None:
    """Convert the QAT model to integer kernels (equal to the QAT model in eval mode, bit for bit)."""
    context.model = quant.convert(context.model.eval())


# ============================================================================ post-training quantization
@dataclass
class PTQStep:
    bits: int = 8                     # weight bits (per-channel symmetric); activations are int8
    calibration: int = 512            # training images used to calibrate the activation ranges

    def check(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.calibration < 1:
            raise ValueError(f"calibration must be >= 1 images, got {self.calibration}")


def _ptq_config(step: PTQStep) -> Any:
    return quant.QuantConfig(weight=quant.weight_spec(step.bits)) if step.bits != 8 else None


def _rebuild_ptq(model: nn.Module, step: PTQStep, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    return quant.quantize_static(prune.remove_all(model), example, _ptq_config(step), progress=False)


@register_step("ptq", PTQStep, accepts=("float",), produces="integer", rebuild=_rebuild_ptq)
def ptq(context: Context, step: PTQStep) -> None:
    """Static post-training quantization (calibrate on training images, convert to integer kernels)."""
    _keep_teacher(context)
    model = prune.remove_all(context.model)
    context.model = quant.quantize_static(model, context.train_set[0][:step.calibration], _ptq_config(step),
                                          progress=False)


# ============================================================================ weight-only quantization
@dataclass
class WeightOnlyStep:
    bits: int = 4                     # bits of the weight codes (per output channel, or per group)
    group_size: int | None = None     # consecutive input weights sharing a scale (None: one per channel)

    def check(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


def _rebuild_weight_only(model: nn.Module, step: WeightOnlyStep, record: dict[str, Any],
                         example: np.ndarray) -> nn.Module:
    return quant.quantize_weights(prune.remove_all(model), bits=step.bits, group_size=step.group_size)


@register_step("weight_only", WeightOnlyStep, accepts=("float",), produces="integer", rebuild=_rebuild_weight_only)
def weight_only(context: Context, step: WeightOnlyStep) -> None:
    """Weight-only quantization (codes packed; float activations)."""
    _keep_teacher(context)
    context.model = quant.quantize_weights(prune.remove_all(context.model), bits=step.bits,
                                           group_size=step.group_size)


# ============================================================================ sparse execution
@dataclass
class SparseStep:
    format: Literal["csr", "nm"] = "csr"   # compressed sparse rows, or 2:4 (every Linear is pruned to 2:4 first)
    min_sparsity: float = 0.5              # csr: Linear layers with at least this fraction of zeros become sparse

    def check(self) -> None:
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must be in [0, 1], got {self.min_sparsity}")


def _rebuild_sparse(model: nn.Module, step: SparseStep, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    model = prune.remove_all(model)
    for name in record["layers"]:
        layer = model.get_submodule(name)
        if step.format == "nm":
            prune.remove(prune.nm_sparsity(layer, "weight", n=2, m=4), "weight")
        model.set_submodule(name, SparseLinear.from_linear(layer, step.format))
    return model


@register_step("sparse", SparseStep, accepts=("float",), produces="integer", rebuild=_rebuild_sparse)
def sparse(context: Context, step: SparseStep) -> None:
    """Replace sufficiently sparse Linear layers by sparse ones (CSR or 2:4) that skip the zeros."""
    _keep_teacher(context)
    model = prune.remove_all(context.model)
    if step.format == "nm":   # 2:4 by magnitude in every Linear (zeros already there stay zero)
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.in_features % 4 == 0:
                prune.remove(prune.nm_sparsity(module, "weight", n=2, m=4), "weight")
    layers = prune.to_sparse(model, min_sparsity=0.5 if step.format == "nm" else step.min_sparsity,
                             format=step.format)
    context.model = model
    context.records.append({"kind": "sparse", "layers": layers})


# ============================================================================ saving
@dataclass
class SaveStep:
    format: Literal["compact", "npz"] = "compact"   # compact: sparse + entropy coded; npz: nanoopt.io.save
    name: str = "model"                              # file name (without suffix) in the output folder

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain file name, got {self.name!r}")


@register_step("save", SaveStep, accepts=("float", "integer"), produces="saved", tasks=("classify", "lm"))
def save(context: Context, step: SaveStep) -> None:
    """Write the model (pruning masks baked in) to the output folder."""
    if context.state == "float":
        context.model = prune.remove_all(context.model)
    assert context.saver is not None
    context.saver(context, step)


# ============================================================================ ONNX export
@dataclass
class ExportStep:
    quant_format: Literal["qdq", "qoperator"] = "qdq"   # integer models: QDQ, or integer operators (exact)
    name: str = "model"                                 # file name (without .onnx) in the output folder

    def check(self) -> None:
        SaveStep(name=self.name).check()


@register_step("export", ExportStep, accepts=("float", "integer"), requires=("onnx", "onnx"))
def export(context: Context, step: ExportStep) -> None:
    """Write the model as ONNX (float, or integer as QDQ / integer operators; needs the optional extra onnx)."""
    model = prune.remove_all(copy.deepcopy(context.model)) if context.state == "float" else context.model
    path = f"{context.output}/{step.name}.onnx"
    onnx.export(model, path, context.train_set[0][:1], quant_format=step.quant_format)
    context.files["onnx"] = path
