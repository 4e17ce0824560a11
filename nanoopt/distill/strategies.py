"""Distillation strategies around one loop: offline (one or many teachers), cross-model, self and online.

* :class:`Distiller`: the offline loop. Teachers are frozen in eval mode and run under ``no_grad``; features
  are captured by module name through forward hooks; the objective is

      hard_weight * CE(s, y) + soft_weight * response(s, t) + sum_k weight_k * feature_loss_k

  with ``response`` Hinton's :func:`~nanoopt.distill.kd_loss` or :func:`~nanoopt.distill.dkd_loss`.
  With several teachers it is the multi-teacher strategy (averaged logits, fixed weights, or per-sample
  confidence weights: :class:`DistillConfig`); with a compressed student (pruned, or under quantization-aware
  training) and its own float model as teacher it is the usual recovery recipe (:func:`recover`).
* :func:`cross_model_distiller`: teacher and student of different families (a CNN teaching an MLP), the
  features joined by learned :class:`~nanoopt.distill.FeatureAdapter` s (Romero et al. 2015).
* Self-distillation: :func:`born_again` generations (Furlanello et al. 2018, "Born-Again Neural Networks") and
  :class:`DeepSupervision`, where the deepest classifier teaches auxiliary heads on earlier layers (Zhang et al.
  2019, "Be Your Own Teacher").
* Online: :class:`MutualLearning` (Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning"), peers trained
  together, each distilled from the others.

Every strategy is a :class:`~nanoopt.nn.Module` whose ``forward`` is the model being trained and whose
``compute_loss(model, x, y)`` plugs into :func:`nanoopt.fit`; ``.fit(train_data, epochs, ...)`` does both.
The trainable parameters are the student's plus the adapters' or auxiliary heads'; teachers are not children,
so they are neither trained nor saved.

Why the defaults are what they are (:class:`DistillConfig`): the measurements are in ``docs/distillation.md``
(``python -m benchmarks.distillation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.distill.adapters import FeatureAdapter
from nanoopt.distill.losses import _check_temperature, dkd_loss, hint_loss, kd_loss
from nanoopt.nn import functional as F
from nanoopt.nn.graph import evaluating
from nanoopt.nn.module import Module, RemovableHandle
from nanoopt.tensor import Tensor, no_grad
from nanoopt.train import Callback, History, fit


# ===================================================================== configuration
@dataclass
class DistillConfig:
    """Weights and temperature of the distillation objective (see :class:`Distiller`):

        ``loss = hard_weight * CE(student, labels) + soft_weight * T^2 KL(softmax(t / T) || softmax(s / T))``

    (Hinton et al. 2015; with ``response="dkd"`` the soft term is decoupled KD, Zhao et al. 2022). The defaults,
    0.5 CE + 0.5 KD at T = 2, keep ``hard_weight + soft_weight = 1`` and T small: the gradient of T^2 KD with
    respect to a fresh student's logits grows with T, so a larger soft weight or T raises the effective learning
    rate and spends the student's capacity on the teacher's small probabilities of wrong classes. They replace
    the textbook ``(1 - alpha) CE + alpha T^2 KD`` with alpha = 0.9, T = 4; why, with the measurements (what the
    teacher must reach, the schedule, the gradient scales), is in ``docs/distillation.md``
    (``python -m benchmarks.distillation``).

    Porting a recipe from PyTorch: average the KL over the batch only (``reduction="batchmean"``, as
    :func:`~nanoopt.distill.kd_loss` does); ``nn.KLDivLoss()``'s default ``"mean"`` also divides by the number of
    classes, which shrinks the soft term by that factor.
    """

    temperature: float = 2.0            # T of the soft targets; kd_loss multiplies by T^2
    hard_weight: float = 0.5            # weight of cross-entropy with the true labels
    soft_weight: float = 0.5            # weight of the response loss (kd_loss or dkd_loss)
    response: str = "kd"                # "kd" (Hinton et al. 2015) or "dkd" (Zhao et al. 2022)
    dkd_alpha: float = 1.0              # DKD weight of the target-class term (TCKD)
    dkd_beta: float = 8.0               # DKD weight of the non-target term (NCKD), the paper's CIFAR value
    teacher_weighting: str = "average_logits"   # several teachers: "average_logits", "fixed" or "confidence"
    teacher_weights: tuple[float, ...] | None = None   # "fixed": one non-negative weight per teacher

    def __post_init__(self) -> None:
        _check_temperature(self.temperature, "DistillConfig")  # models are float32: T <= 100
        for name in ("hard_weight", "soft_weight", "dkd_alpha", "dkd_beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DistillConfig: {name} must be a finite number >= 0, got {value!r}")
        if self.hard_weight == 0 and self.soft_weight == 0:
            raise ValueError("DistillConfig: hard_weight and soft_weight are both 0, so the objective has neither "
                             "the labels nor the teacher's outputs; give one of them a positive weight")
        if self.response not in ("kd", "dkd"):
            raise ValueError(f"DistillConfig: response must be 'kd' or 'dkd', got {self.response!r}")
        if self.teacher_weighting not in ("average_logits", "fixed", "confidence"):
            raise ValueError("DistillConfig: teacher_weighting must be 'average_logits', 'fixed' or 'confidence', "
                             f"got {self.teacher_weighting!r}")
        if self.teacher_weights is not None:
            weights = np.asarray(self.teacher_weights, dtype=np.float64)
            if weights.ndim != 1 or not len(weights) or (weights < 0).any() or not np.isfinite(weights).all() \
                    or weights.sum() <= 0:
                raise ValueError("DistillConfig: teacher_weights must be non-negative finite numbers with a "
                                 f"positive sum, got {self.teacher_weights!r}")


@dataclass
class FeaturePair:
    """One feature-based term: the output of ``student_layer`` is compared with that of ``teacher_layer``."""

    student_layer: str                  # dotted module name in the student, as in student.named_modules()
    teacher_layer: str                  # dotted module name in the teacher
    loss: Callable[[Tensor, Tensor], Tensor] = hint_loss   # (student features, teacher features) -> scalar
    weight: float = 1.0                 # multiplies this term in the objective
    adapter: Module | str | None = None   # None, a Module, or "auto": a FeatureAdapter (needs example_input)
    teacher_index: int = 0              # which teacher, when there are several


# ===================================================================== hooks
def _find_module(model: Module, name: str, role: str) -> Module:
    if not isinstance(name, str):
        raise TypeError(f"{role} layer name must be a string, got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"the {role} has no module named {name!r}; its modules are {names}") from None


class _FeatureRecorder:
    """Forward hooks that keep the latest output of named modules (``outputs[name]``)."""

    def __init__(self, model: Module, names: Sequence[str], role: str) -> None:
        self.outputs: dict[str, Tensor] = {}
        self.handles: list[RemovableHandle] = []
        for name in dict.fromkeys(names):
            module = _find_module(model, name, role)
            self.handles.append(module.register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str) -> Callable[[Module, tuple, Any], None]:
        def keep(module: Module, inputs: tuple, output: Any) -> None:
            self.outputs[name] = output
        return keep

    def take(self, name: str, role: str) -> Tensor:
        if name not in self.outputs:
            raise RuntimeError(f"the {role} module {name!r} did not run in the forward pass, so it produced no "
                               "features to distill")
        return self.outputs[name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _check_module(model: Any, role: str) -> Module:
    if not isinstance(model, Module):
        raise TypeError(f"the {role} must be a nanoopt.nn.Module, got {type(model).__name__}")
    return model


def _logits(output: Any, role: str) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = getattr(output, "shape", None)
        raise ValueError(f"the {role} must return logits of shape (N, classes), got {type(output).__name__} "
                         f"{shape if shape is not None else ''}".rstrip())
    return output


# ===================================================================== the offline loop
class Distiller(nn.Module):
    """Train ``student`` from one or several frozen ``teachers`` (see the module docstring for the objective).

    Parameters
    ----------
    student : the model being trained (any Module returning logits; it may be pruned or under QAT).
    teachers : a Module or a sequence of Modules returning logits with the student's class count.
    config : :class:`DistillConfig` (weights, temperature, response loss, multi-teacher weighting).
    features : :class:`FeaturePair` s; their adapters (``"auto"`` ones are built from ``example_input``) are
        trained with the student.
    example_input : one batch, needed when an adapter is ``"auto"`` (its shapes are read from a forward pass).
    cache_teacher : remember each training example's teacher outputs (keyed by the example's bytes), so that a
        teacher runs once per distinct example instead of once per epoch. Valid because a frozen teacher in eval
        mode is a fixed function of its input; with random augmentation most examples are new and it only costs
        memory. Memory: one copy of every captured output per distinct example.

    Multi-teacher weighting (``config.teacher_weighting``), with teacher logits t_1..t_K:

    * ``"average_logits"``: distil from mean_k t_k. Simple, but it can be wrong: logits of different models live
      on different scales (a confident, over-fitted teacher has large logits and dominates the mean whether it is
      right or not), and the softmax of averaged logits is a normalised *product* of the teachers' distributions,
      which is sharper than any of them and confidently wrong where they disagree.
    * ``"fixed"``: sum_k w_k KD(s, t_k) with ``config.teacher_weights`` (normalised to sum 1): the KD towards the
      mixture sum_k w_k softmax(t_k / T) (up to a constant), which is scale-safe.
    * ``"confidence"``: per-sample weights w_k(n) = softmax_k(-CE(t_k(n), y_n)) (the confidence-aware
      multi-teacher KD of Zhang, Chen & Wang 2022): for each example, teachers that give the true label a high
      probability count more.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> x, y = np.random.default_rng(0).random((32, 1, 8, 8)), np.arange(32) % 10
    >>> teacher, student = models.lenet5(input_size=8), models.mlp(64, (16,))
    >>> distiller = Distiller(student, teacher, features=[FeaturePair("2", "7", adapter="auto")], example_input=x)
    >>> loss, logits = distiller.compute_loss(distiller, x, y)
    >>> logits.shape, sorted(distiller.last_terms)
    ((32, 10), ['feature 2<-7', 'hard', 'soft'])
    """

    def __init__(self, student: Module, teachers: Module | Sequence[Module], config: DistillConfig | None = None,
                 features: Sequence[FeaturePair] = (), example_input: np.ndarray | None = None,
                 cache_teacher: bool = False) -> None:
        super().__init__()
        self.student = _check_module(student, "student")
        if not isinstance(teachers, Module | list | tuple):
            raise TypeError(f"Distiller: teachers must be a nanoopt.nn.Module or a list of them, got "
                            f"{type(teachers).__name__} ({teachers!r:.80})")
        teacher_list = [teachers] if isinstance(teachers, Module) else list(teachers)
        if not teacher_list:
            raise ValueError("Distiller needs at least one teacher")
        for index, teacher in enumerate(teacher_list):
            _check_module(teacher, f"teacher {index}")
            teacher.eval()
        object.__setattr__(self, "teachers", teacher_list)   # not children: never trained, never saved
        self.config = config if config is not None else DistillConfig()
        if not isinstance(self.config, DistillConfig):
            raise TypeError(f"Distiller: config must be a DistillConfig, got {type(self.config).__name__}")
        if self.config.teacher_weighting == "fixed":
            if self.config.teacher_weights is None or len(self.config.teacher_weights) != len(teacher_list):
                raise ValueError(f"Distiller: teacher_weighting='fixed' needs one weight per teacher "
                                 f"({len(teacher_list)}), got {self.config.teacher_weights!r}")
        self.features = list(features)
        for pair in self.features:
            if not isinstance(pair, FeaturePair):
                raise TypeError(f"Distiller: features must be FeaturePair objects, got {type(pair).__name__}")
            if not 0 <= pair.teacher_index < len(teacher_list):
                raise ValueError(f"Distiller: FeaturePair {pair.student_layer!r} names teacher {pair.teacher_index}"
                                 f", but there are {len(teacher_list)} teachers")
        self._student_hooks = _FeatureRecorder(student, [p.student_layer for p in self.features], "student")
        self._teacher_hooks = [
            _FeatureRecorder(teacher, [p.teacher_layer for p in self.features if p.teacher_index == index],
                             f"teacher {index}")
            for index, teacher in enumerate(teacher_list)]
        self.cache_teacher = bool(cache_teacher)
        self._cache: dict[bytes, tuple[np.ndarray, ...]] = {}
        self.adapters = nn.ModuleList(self._build_adapters(example_input))
        self.last_terms: dict[str, float] = {}

    # ------------------------------------------------------------------ construction helpers
    def _build_adapters(self, example_input: np.ndarray | None) -> list[Module]:
        needs_shapes = any(isinstance(p.adapter, str) for p in self.features)
        student_shapes, teacher_shapes = {}, {}
        if needs_shapes:
            if example_input is None:
                raise ValueError("Distiller: FeaturePair(adapter='auto') needs example_input (one batch) to read "
                                 "the feature shapes")
            with evaluating(self.student):
                self.student(Tensor(example_input))
                teacher_features = self._run_teachers(np.asarray(example_input))[1]
            student_shapes = {n: o.shape[1:] for n, o in self._student_hooks.outputs.items()}
            teacher_shapes = {key: array.shape[1:] for key, array in teacher_features.items()}
            self._student_hooks.outputs.clear()
        adapters: list[Module] = []
        for pair in self.features:
            if pair.adapter is None:
                adapters.append(nn.Identity())
            elif isinstance(pair.adapter, str):
                if pair.adapter != "auto":
                    raise ValueError(f"FeaturePair.adapter must be None, a Module or 'auto', got {pair.adapter!r}")
                adapters.append(FeatureAdapter(student_shapes[pair.student_layer],
                                               teacher_shapes[(pair.teacher_index, pair.teacher_layer)]))
            elif isinstance(pair.adapter, Module):
                adapters.append(pair.adapter)
            else:
                raise TypeError(f"FeaturePair.adapter must be None, a Module or 'auto', got "
                                f"{type(pair.adapter).__name__}")
        return adapters

    def remove_hooks(self) -> None:
        """Unregister the forward hooks this distiller put on the student and the teachers."""
        self._student_hooks.remove()
        for hooks in self._teacher_hooks:
            hooks.remove()

    # ------------------------------------------------------------------ teachers
    def _run_teachers(self, x: np.ndarray) -> tuple[list[np.ndarray], dict[tuple[int, str], np.ndarray]]:
        """Every teacher's logits, and its hooked features keyed by (teacher index, layer name), as arrays."""
        logits, features = [], {}
        with no_grad():
            for index, (teacher, hooks) in enumerate(zip(self.teachers, self._teacher_hooks, strict=True)):
                teacher.eval()
                hooks.outputs.clear()
                logits.append(_logits(teacher(Tensor(x)), f"teacher {index}").data)
                for name in hooks.outputs:
                    features[(index, name)] = hooks.take(name, f"teacher {index}").data
        return logits, features

    def _teacher_outputs(self, x: np.ndarray) -> tuple[list[np.ndarray], dict[tuple[int, str], np.ndarray]]:
        """:meth:`_run_teachers`, through the per-example cache when ``cache_teacher`` is on."""
        if not self.cache_teacher:
            return self._run_teachers(x)
        count, feature_keys = len(self.teachers), [(p.teacher_index, p.teacher_layer) for p in self.features]
        feature_keys = list(dict.fromkeys(feature_keys))
        keys = [row.tobytes() for row in x]
        new: dict[bytes, int] = {}                        # example bytes -> its first row in this batch
        for row, key in enumerate(keys):
            if key not in self._cache and key not in new:
                new[key] = row
        if new:
            logits, features = self._run_teachers(x[list(new.values())])
            columns = [*logits, *(features[k] for k in feature_keys)]
            for position, key in enumerate(new):
                self._cache[key] = tuple(column[position] for column in columns)
        columns = [np.stack(column) for column in zip(*(self._cache[key] for key in keys), strict=True)]
        return columns[:count], dict(zip(feature_keys, columns[count:], strict=True))

    # ------------------------------------------------------------------ the objective
    def _response(self, student_logits: Tensor, teacher_logits: list[np.ndarray], labels: np.ndarray) -> Tensor:
        config = self.config

        def per_sample(target: np.ndarray) -> Tensor:
            if config.response == "dkd":
                return dkd_loss(student_logits, Tensor(target), labels, config.dkd_alpha, config.dkd_beta,
                                config.temperature, reduction="none")
            return kd_loss(student_logits, Tensor(target), config.temperature, reduction="none")

        if len(teacher_logits) == 1 or config.teacher_weighting == "average_logits":
            return per_sample(np.mean(teacher_logits, axis=0)).mean()
        if config.teacher_weighting == "fixed":
            weights = np.asarray(config.teacher_weights, dtype=np.float64)
            weights = weights / weights.sum()
            return sum(per_sample(t).mean() * float(w) for t, w in zip(teacher_logits, weights, strict=True))
        weights = confidence_weights(teacher_logits, labels)                 # (K, N)
        total = sum(per_sample(t) * w.astype(t.dtype) for t, w in zip(teacher_logits, weights, strict=True))
        return total.mean()

    def compute_loss(self, model: Module, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        """The objective on one batch: returns (loss, student logits); ``last_terms`` keeps each term's value.

        ``model`` is ignored (it is this distiller when called by :func:`nanoopt.fit`).
        """
        x = np.asarray(x)
        teacher_logits, teacher_features = self._teacher_outputs(x)
        self._student_hooks.outputs.clear()
        logits = _logits(self.student(Tensor(x)), "student")
        for index, t in enumerate(teacher_logits):
            if t.shape != logits.shape:
                raise ValueError(f"Distiller: student logits {logits.shape} and teacher {index} logits {t.shape} "
                                 "differ (batch size or class count)")
        config, terms = self.config, {}
        loss = F.cross_entropy(logits, y) * config.hard_weight
        terms["hard"] = loss.item() / config.hard_weight if config.hard_weight else float("nan")
        if config.soft_weight:
            soft = self._response(logits, teacher_logits, np.asarray(y))
            terms["soft"] = soft.item()
            loss = loss + soft * config.soft_weight
        for pair, adapter in zip(self.features, self.adapters, strict=True):
            student_features = adapter(self._student_hooks.take(pair.student_layer, "student"))
            teacher = Tensor(teacher_features[(pair.teacher_index, pair.teacher_layer)])
            term = pair.loss(student_features, teacher)
            terms[f"feature {pair.student_layer}<-{pair.teacher_layer}"] = term.item()
            loss = loss + term * pair.weight
        self.last_terms = terms
        return loss, logits

    def forward(self, x: Any) -> Any:
        return self.student(x)

    def fit(self, train_data: Any, epochs: int = 1, **fit_options: Any) -> History:
        """:func:`nanoopt.fit` on this objective; ``fit_options`` are passed on.

        Without an ``optimizer`` fit builds SGD over ``self.parameters()`` (student and adapters); an optimiser
        of your own must also be given ``self.parameters()``, or the adapters will not learn.
        """
        return fit(self, train_data, epochs, compute_loss=self.compute_loss, **fit_options)


def confidence_weights(teacher_logits: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Per-sample teacher weights w_k(n) = softmax_k(-CE(t_k(n), y_n)), shape (K, N) (Zhang et al. 2022).

    >>> import numpy as np
    >>> right, wrong = np.array([[5.0, 0.0]]), np.array([[0.0, 5.0]])
    >>> confidence_weights([right, wrong], np.array([0])).round(3).tolist()
    [[0.993], [0.007]]
    """
    stacked = np.stack([np.asarray(t, dtype=np.float64) for t in teacher_logits])          # (K, N, C)
    shifted = stacked - stacked.max(axis=2, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
    cross_entropy = -log_probs[:, np.arange(stacked.shape[1]), labels]                      # (K, N)
    scores = -cross_entropy - (-cross_entropy).max(axis=0, keepdims=True)
    return np.exp(scores) / np.exp(scores).sum(axis=0, keepdims=True)


# ===================================================================== compressed students, cross-model
def recover(compressed: Module, float_model: Module, train_data: Any, epochs: int = 1,
            config: DistillConfig | None = None, cache_teacher: bool = False, **fit_options: Any) -> History:
    """Fine-tune a compressed model (pruned, or prepared for QAT) by distilling from its own float original.

    The usual recovery recipe: the teacher is the float model before compression, the student the compressed
    copy (masks or fake-quantization in place); returns the :class:`~nanoopt.train.History`.

    >>> import copy, numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> x, y = np.random.default_rng(0).random((64, 64)), np.arange(64) % 10
    >>> float_model = models.mlp(64, (32,)); student = copy.deepcopy(float_model)
    >>> history = recover(student, float_model, (x, y), epochs=1, progress=False)
    >>> len(history.train_loss)
    1
    """
    distiller = Distiller(compressed, float_model, config=config, cache_teacher=cache_teacher)
    try:
        return distiller.fit(train_data, epochs, **fit_options)
    finally:
        distiller.remove_hooks()


def cross_model_distiller(student: Module, teacher: Module, layer_pairs: dict[str, str], example_input: np.ndarray,
                          config: DistillConfig | None = None, hint_weight: float = 1.0,
                          cache_teacher: bool = False) -> Distiller:
    """A :class:`Distiller` between different architecture families, e.g. a CNN teacher and an MLP student.

    Each ``student_layer: teacher_layer`` pair gets a learned :class:`~nanoopt.distill.FeatureAdapter` (built
    from the shapes seen on ``example_input``) and a FitNets :func:`~nanoopt.distill.hint_loss` with weight
    ``hint_weight``, on top of the response loss of ``config``.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    >>> distiller = cross_model_distiller(models.mlp(64, (32,)), models.lenet5(input_size=8), {"2": "5"}, x)
    >>> distiller.adapters[0].kind, distiller.adapters[0].teacher_shape
    ('flatten-linear', (16, 2, 2))
    """
    pairs = [FeaturePair(s, t, hint_loss, hint_weight, "auto") for s, t in layer_pairs.items()]
    return Distiller(student, teacher, config=config, features=pairs, example_input=example_input,
                     cache_teacher=cache_teacher)


# ===================================================================== self-distillation
def born_again(build: Callable[[], Module], train_data: Any, generations: int = 2, epochs: int = 1,
               config: DistillConfig | None = None, optimizer: Callable[[list], Any] | None = None,
               cache_teacher: bool = False, **fit_options: Any) -> list[Module]:
    """Born-again networks (Furlanello et al. 2018): generation 0 trained on labels, generation k > 0 (same
    architecture, fresh initialisation from ``build()``) distilled from generation k - 1.

    Returns every generation, the oldest first (generation 0 is the from-scratch baseline). ``optimizer``, if
    given, maps a parameter list to an optimiser (one per generation); otherwise :func:`nanoopt.fit` builds SGD.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> x, y = np.random.default_rng(0).random((64, 64)), np.arange(64) % 10
    >>> family = born_again(lambda: models.mlp(64, (16,)), (x, y), generations=2, progress=False)
    >>> len(family)
    3
    """
    if generations < 0:
        raise ValueError(f"born_again: generations must be >= 0, got {generations}")
    family: list[Module] = []
    for generation in range(generations + 1):
        model = _check_module(build(), "build() result")
        options = dict(fit_options)
        if optimizer is not None:
            options["optimizer"] = optimizer(list(model.parameters()))
        if generation == 0:
            fit(model, train_data, epochs, **options)
        else:
            distiller = Distiller(model, family[-1], config=config, cache_teacher=cache_teacher)
            distiller.fit(train_data, epochs, **options)
            distiller.remove_hooks()
        model.eval()
        family.append(model)
    return family


def auxiliary_heads(backbone: Module, layers: Sequence[str], num_classes: int, example_input: np.ndarray
                    ) -> dict[str, Module]:
    """Classifier heads for :class:`DeepSupervision`: for each named layer, global average pooling (for
    (C, H, W) maps) or nothing (for vectors), then a Linear layer to ``num_classes``.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> heads = auxiliary_heads(models.lenet5(input_size=8), ["2"], 10, np.zeros((2, 1, 8, 8)))
    >>> [type(m).__name__ for m in heads["2"]]
    ['AdaptiveAvgPool2d', 'Flatten', 'Linear']
    """
    recorder = _FeatureRecorder(backbone, layers, "backbone")
    try:
        with evaluating(backbone):
            backbone(Tensor(example_input))
        heads = {}
        for name in layers:
            shape = recorder.take(name, "backbone").shape[1:]
            if len(shape) == 3:
                heads[name] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], num_classes))
            else:
                heads[name] = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), num_classes))
    finally:
        recorder.remove()
    return heads


class DeepSupervision(nn.Module):
    """Self-distillation by deep supervision ("Be Your Own Teacher", Zhang et al. 2019, eq. 1-3).

    Auxiliary classifier heads sit on earlier layers of ``backbone`` (given by module name, read through forward
    hooks); the backbone's own output is the deepest classifier. The objective is

        CE(deepest, y) + sum_i [ hard_weight * CE(head_i, y) + soft_weight * KD(head_i, deepest.detach(), T) ]

    so the deepest classifier teaches every shallower one, and their gradients regularise the early layers.
    The paper's third term (an L2 hint from the deepest features to each head's) is left out. ``forward`` is
    the backbone alone: the heads are dropped after training and the model keeps its size.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> backbone = models.mlp(64, (32, 32))
    >>> model = DeepSupervision(backbone, auxiliary_heads(backbone, ["2"], 10, np.zeros((2, 64))))
    >>> loss, logits = model.compute_loss(model, np.zeros((4, 64)), np.array([0, 1, 2, 3]))
    >>> logits.shape, sorted(model.last_terms)
    ((4, 10), ['deepest', 'head 2 hard', 'head 2 soft'])
    """

    def __init__(self, backbone: Module, heads: dict[str, Module], config: DistillConfig | None = None) -> None:
        super().__init__()
        self.backbone = _check_module(backbone, "backbone")
        if not heads:
            raise ValueError("DeepSupervision needs at least one auxiliary head")
        self.layer_names = list(heads)
        self.heads = nn.ModuleList([_check_module(heads[name], f"head {name!r}") for name in self.layer_names])
        self.config = config if config is not None else DistillConfig()
        self._hooks = _FeatureRecorder(backbone, self.layer_names, "backbone")
        self.last_terms: dict[str, float] = {}

    def compute_loss(self, model: Module, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        """The objective on one batch: returns (loss, deepest logits)."""
        self._hooks.outputs.clear()
        deepest = _logits(self.backbone(Tensor(np.asarray(x))), "backbone")
        teacher = deepest.detach()
        config = self.config
        loss = F.cross_entropy(deepest, y)
        terms = {"deepest": loss.item()}
        for name, head in zip(self.layer_names, self.heads, strict=True):
            logits = _logits(head(self._hooks.take(name, "backbone")), f"head {name!r}")
            hard = F.cross_entropy(logits, y)
            soft = kd_loss(logits, teacher, config.temperature)
            terms[f"head {name} hard"], terms[f"head {name} soft"] = hard.item(), soft.item()
            loss = loss + hard * config.hard_weight + soft * config.soft_weight
        self.last_terms = terms
        return loss, deepest

    def forward(self, x: Any) -> Any:
        return self.backbone(x)

    def fit(self, train_data: Any, epochs: int = 1, **fit_options: Any) -> History:
        """:func:`nanoopt.fit` on this objective (backbone and heads trained)."""
        return fit(self, train_data, epochs, compute_loss=self.compute_loss, **fit_options)


# ===================================================================== online distillation
class MutualLearning(nn.Module):
    """Deep mutual learning (Zhang et al. 2018, eq. 1-2 and 10): K peers trained together from scratch.

    Peer k minimises hard_weight * CE(z_k, y) + soft_weight / (K - 1) * sum_{l != k} KD(z_k, z_l.detach(), T);
    all peers step on the same batch (one backward through the sum, each peer's term reaching only its own
    parameters). The default config is the paper's: T = 1 and unit weights.
    ``forward`` returns the peers' mean logits (their ensemble); ``peers[k]`` is peer k alone.
    What it gains, and with which schedule (:class:`SoftWeightSchedule`): ``docs/distillation.md``
    (``python -m benchmarks.mutual_learning``).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> mutual = MutualLearning([models.mlp(64, (16,)), models.mlp(64, (16,))])
    >>> loss, logits = mutual.compute_loss(mutual, np.zeros((4, 64)), np.array([0, 1, 2, 3]))
    >>> logits.shape, sorted(mutual.last_terms)
    ((4, 10), ['peer 0 hard', 'peer 0 soft', 'peer 1 hard', 'peer 1 soft'])
    """

    def __init__(self, peers: Sequence[Module], config: DistillConfig | None = None) -> None:
        super().__init__()
        peers = list(peers)
        if len(peers) < 2:
            raise ValueError(f"MutualLearning needs at least two peers, got {len(peers)}")
        self.peers = nn.ModuleList([_check_module(p, f"peer {i}") for i, p in enumerate(peers)])
        self.config = config if config is not None else DistillConfig(temperature=1.0, hard_weight=1.0,
                                                                      soft_weight=1.0)
        self.last_terms: dict[str, float] = {}

    def compute_loss(self, model: Module, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        """The summed objective of every peer on one batch: returns (loss, ensemble logits)."""
        x = Tensor(np.asarray(x))
        logits = [_logits(peer(x), f"peer {k}") for k, peer in enumerate(self.peers)]
        targets = [z.detach() for z in logits]
        config, count, terms = self.config, len(logits), {}
        total = None
        for k, z in enumerate(logits):
            hard = F.cross_entropy(z, y)
            soft = sum(kd_loss(z, targets[other], config.temperature) for other in range(count) if other != k)
            soft = soft / (count - 1)
            terms[f"peer {k} hard"], terms[f"peer {k} soft"] = hard.item(), soft.item()
            term = hard * config.hard_weight + soft * config.soft_weight
            total = term if total is None else total + term
        self.last_terms = terms
        ensemble = sum(z.detach() for z in logits) / count
        return total, ensemble

    def forward(self, x: Any) -> Any:
        outputs = [peer(x) for peer in self.peers]
        return sum(outputs) / len(outputs)

    def fit(self, train_data: Any, epochs: int = 1, **fit_options: Any) -> History:
        """:func:`nanoopt.fit` on the summed objective (every peer trained)."""
        return fit(self, train_data, epochs, compute_loss=self.compute_loss, **fit_options)


class SoftWeightSchedule(Callback):
    r"""Switch a strategy's soft term on late: ``soft_weight`` is 0 for the first ``start_epoch`` epochs, then rises
    linearly over ``ramp_epochs`` epochs to the strategy's configured value (at once when ``ramp_epochs`` is 0).

    .. math::
        w(e) = w_{soft} \cdot \mathrm{clip}\Big(\frac{e - e_0 + 1}{\max(r, 1)}, 0, 1\Big) \text{ for } e \ge e_0,
        \qquad w(e) = 0 \text{ for } e < e_0

    It works with any strategy that has a ``config`` (:class:`Distiller`, :class:`DeepSupervision`,
    :class:`MutualLearning`): at the start of every epoch it sets ``model.config`` to a copy of the configuration
    seen at the start of training with ``soft_weight = w(e)``; the last epoch's value stays in place afterwards.
    For deep mutual learning, switching the KL on late lets the peers first learn apart, so that each knows
    something the other does not, and then learn from each other; the measurements are in
    ``docs/distillation.md`` (``python -m benchmarks.mutual_learning``).

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import distill, models
    >>> mutual = distill.MutualLearning([models.mlp(8, (4,), 3), models.mlp(8, (4,), 3)])
    >>> images, labels = np.zeros((4, 8), np.float32), np.array([0, 1, 2, 0])
    >>> schedule = distill.SoftWeightSchedule(start_epoch=1)
    >>> history = mutual.fit((images, labels), epochs=1, callbacks=[schedule], progress=False)
    >>> mutual.config.soft_weight
    0.0
    """

    def __init__(self, start_epoch: int, ramp_epochs: int = 0) -> None:
        for name, value in (("start_epoch", start_epoch), ("ramp_epochs", ramp_epochs)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SoftWeightSchedule: {name} must be an integer >= 0, got {value!r}")
        self.start_epoch, self.ramp_epochs = int(start_epoch), int(ramp_epochs)
        self.config: DistillConfig | None = None

    def weight_at(self, epoch: int) -> float:
        """The soft weight used during ``epoch`` (0-based), given the configuration seen at the start."""
        if self.config is None:
            raise RuntimeError("SoftWeightSchedule.weight_at: training has not started (no configuration seen yet)")
        if epoch < self.start_epoch:
            return 0.0
        return self.config.soft_weight * min(1.0, (epoch - self.start_epoch + 1) / max(self.ramp_epochs, 1))

    def on_train_begin(self, model: Module, optimizer: Any) -> None:
        config = getattr(model, "config", None)
        if not isinstance(config, DistillConfig):
            raise TypeError("SoftWeightSchedule: the trained model must be a distillation strategy with a "
                            f"DistillConfig in .config (Distiller, DeepSupervision, MutualLearning), got "
                            f"{type(model).__name__} with config {type(config).__name__}")
        self.config = config

    def on_epoch_begin(self, epoch: int, model: Module) -> None:
        model.config = replace(self.config, soft_weight=self.weight_at(epoch))
