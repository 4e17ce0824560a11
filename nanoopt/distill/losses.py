"""Knowledge-distillation losses: response-, feature- and relation-based, as pure functions of Tensors.

Response-based (what the teacher outputs):

* :func:`kd_loss`: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", eq. 1-2:
  ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.
* :func:`dkd_loss`: Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation", eq. 1-7:
  the KD loss split into a target-class part (TCKD) and a non-target part (NCKD), re-weighted.

Feature-based (what the teacher computes on the way):

* :func:`hint_loss`: Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", eq. 3: squared error between the
  teacher's hint layer and a trainable regressor (see :mod:`nanoopt.distill.adapters`) on the student's layer.
* :func:`attention_transfer_loss`: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention", eq. 2:
  distance between normalised spatial attention maps ``sum_c |A_c|^p``.

Relation-based (how the teacher arranges a batch):

* :func:`rkd_distance_loss` and :func:`rkd_angle_loss`: Park, Kim, Lu & Cho 2019, "Relational Knowledge
  Distillation", eq. 3-7: pairwise distances (normalised by their mean) and triplet angles must agree.
* :func:`similarity_preserving_loss`: Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation",
  eq. 2-4: row-normalised batch Gram matrices must agree.

Conventions shared by every function here:

* Inputs are :class:`~nanoopt.tensor.Tensor` (or arrays) with the batch on axis 0; student and teacher must have
  the same batch size, and response losses the same number of classes, or a ``ValueError`` says what differs.
* Gradients flow into *both* arguments when they require grad (so each loss can be gradient-checked in either).
  A teacher is a constant: the strategies in :mod:`nanoopt.distill.strategies` pass its outputs computed under
  ``no_grad``, and mutual learning detaches the peers it learns from.
* Every loss is >= 0 and equals 0 when the student's input equals the teacher's (and for the relation losses,
  whenever the two batches have the same geometry up to a global scale).

>>> import numpy as np, nanoopt as no
>>> teacher = no.Tensor([[4.0, 1.0, 0.0]])
>>> round(kd_loss(teacher, teacher).item(), 6)
0.0
>>> round(kd_loss(no.Tensor([[0.0, 0.0, 0.0]]), teacher, temperature=1.0).item(), 4)
0.8243
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanoopt import ops
from nanoopt.nn.module import Module
from nanoopt.tensor import Tensor

_REDUCTIONS = ("batchmean", "sum", "none")
_EPS = 1e-24  # floor under squared norms (a norm floor of 1e-12, as F.normalize): finite gradients at zero


# ===================================================================== input checks
def _tensor(x: Any, name: str, function: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple, float, int)) and not isinstance(x, bool):
        return Tensor(x)
    raise TypeError(f"{function}: {name} must be a Tensor or an array, got {type(x).__name__}")


# The largest temperature at which T^2 KL keeps its digits, by the float type of the logits. The log-probabilities
# log softmax(z / T) carry a rounding error of about eps * log(C) each, and the loss multiplies their difference by
# T^2: its error is at most about T^2 * eps * 8 log(C) (tested), 0.02 for float32 at T = 100 and C = 10, while its
# value tends to a constant (the logit-matching limit). What larger T give: docs/measurements.md.
MAX_TEMPERATURE = {np.dtype(np.float32): 100.0, np.dtype(np.float64): 1e5}


def _check_temperature(temperature: Any, function: str, dtype: Any = np.float32) -> float:
    """A finite ``temperature`` in ``(0, MAX_TEMPERATURE[dtype]]`` (``dtype``: of the logits it divides)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"{function}: temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{function}: temperature must be a finite number > 0, got {temperature}")
    limit = MAX_TEMPERATURE.get(np.dtype(dtype), MAX_TEMPERATURE[np.dtype(np.float32)])
    if temperature > limit:
        raise ValueError(f"{function}: temperature {temperature:g} is above {limit:g}, where T^2 KL on "
                         f"{np.dtype(dtype)} logits loses its precision (rounding error ~ T^2 * eps * log C; at "
                         "T = 1e9 the loss is 0 or negative); use a smaller T (large T tends to logit matching, "
                         "which the loss at T = 10..100 already approximates)")
    return float(temperature)


def _check_logits(student: Any, teacher: Any, function: str) -> tuple[Tensor, Tensor]:
    student = _tensor(student, "student logits", function)
    teacher = _tensor(teacher, "teacher logits", function)
    for name, logits in (("student", student), ("teacher", teacher)):
        if logits.ndim != 2:
            raise ValueError(f"{function}: {name} logits must be 2-D (batch, classes), got shape {logits.shape}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{function}: student and teacher batch sizes differ: student logits {student.shape}, "
                         f"teacher logits {teacher.shape}")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{function}: student and teacher class counts differ: student logits {student.shape}, "
                         f"teacher logits {teacher.shape}")
    if student.shape[1] < 2:
        raise ValueError(f"{function}: needs at least 2 classes, got logits of shape {student.shape}")
    return student, teacher


def _check_batch(student: Any, teacher: Any, function: str, what: str = "features") -> tuple[Tensor, Tensor]:
    student = _tensor(student, f"student {what}", function)
    teacher = _tensor(teacher, f"teacher {what}", function)
    if student.ndim < 1 or teacher.ndim < 1:
        raise ValueError(f"{function}: {what} need a batch axis, got shapes {student.shape} and {teacher.shape}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{function}: student and teacher batch sizes differ: student {what} {student.shape}, "
                         f"teacher {what} {teacher.shape}")
    return student, teacher


def _check_labels(labels: Any, count: int, classes: int, function: str) -> np.ndarray:
    array = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if array.shape != (count,):
        raise ValueError(f"{function}: expected {count} class indices (one per sample), got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{function}: class indices must be integers, got dtype {array.dtype}")
    if count and (array.min() < 0 or array.max() >= classes):
        raise ValueError(f"{function}: class indices must be in [0, {classes - 1}], got range "
                         f"[{array.min()}, {array.max()}]")
    return array.astype(np.int64)


def _reduce(per_sample: Tensor, reduction: str, function: str) -> Tensor:
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"{function}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _logsumexp(x: Tensor, axis: int) -> Tensor:
    """log sum_i exp(x_i) along ``axis``, shifted by the (constant) max so that exp never overflows."""
    shift = Tensor(x.data.max(axis=axis, keepdims=True))
    return (x - shift).exp().sum(axis=axis).log() + shift.reshape(shift.shape[:axis] + shift.shape[axis + 1:])


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c) for each row, from log-probabilities: shape (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(axis=1)


def _smooth_l1(x: Tensor) -> Tensor:
    """Huber loss with delta = 1 (PyTorch's smooth_l1_loss): 0.5 x^2 where |x| < 1, |x| - 0.5 elsewhere."""
    return ops.where(np.abs(x.data) < 1.0, 0.5 * x * x, x.abs() - 0.5)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


# ===================================================================== response-based
def soft_targets(logits: Any, temperature: float = 4.0) -> Tensor:
    """Softened class probabilities ``softmax(z / T)`` (Hinton et al. 2015, eq. 1).

    >>> import nanoopt as no
    >>> [round(p, 4) for p in soft_targets(no.Tensor([[2.0, 0.0]]), temperature=2.0).data[0].tolist()]
    [0.7311, 0.2689]
    """
    logits = _tensor(logits, "logits", "soft_targets")
    temperature = _check_temperature(temperature, "soft_targets", logits.dtype)
    return (logits / temperature).softmax(axis=-1)


def kd_loss(student_logits: Any, teacher_logits: Any, temperature: float = 4.0,
            reduction: str = "batchmean") -> Tensor:
    r"""Hinton et al. 2015 knowledge distillation: the soft-target loss, scaled by T^2.

    .. math::
        L = T^2 \cdot \frac{1}{N} \sum_n \mathrm{KL}\big(\mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(s_n / T)\big)
          = T^2 \cdot \frac{1}{N} \sum_n \sum_c p^T_{nc} (\log p^T_{nc} - \log q^T_{nc})

    with student logits ``s`` and teacher logits ``t`` of shape (N, C); ``reduction="batchmean"`` divides the sum
    by N (the true mean KL per sample, PyTorch's ``kl_div(..., reduction="batchmean")``), ``"sum"`` does not,
    ``"none"`` returns the N per-sample values. The gradient is dL/ds = T (q^T - p^T) / N. For large T the loss
    tends to logit matching, (1/2CN) sum_n ||(s_n - mean s_n) - (t_n - mean t_n)||^2 (their eq. 3), whose
    gradient does not depend on T: that is what the T^2 factor is for (without it the gradient shrinks as 1/T^2,
    Hinton et al. section 2). Far from the teacher (a fresh student) the gradient is instead up to T times that
    of cross-entropy, so at T = 4 the soft term takes larger steps than the hard one.

    The training objective is ``hard_weight * cross_entropy(s, y) + soft_weight * kd_loss(s, t, T)``; see
    :class:`nanoopt.distill.DistillConfig` for the defaults (0.5, 0.5, T = 2) that help on Fashion-MNIST and
    for why the textbook ``alpha = 0.9, T = 4`` loses to training from scratch there.

    >>> import nanoopt as no
    >>> student, teacher = no.Tensor([[1.0, 0.0, 0.0]]), no.Tensor([[3.0, 0.0, 0.0]])
    >>> round(kd_loss(student, teacher, temperature=2.0).item(), 4)
    0.4673
    >>> round(kd_loss(teacher, teacher).item(), 6)
    0.0
    """
    student, teacher = _check_logits(student_logits, teacher_logits, "kd_loss")
    temperature = _check_temperature(temperature, "kd_loss", np.result_type(student.dtype, teacher.dtype))
    log_q = (student / temperature).log_softmax(axis=1)     # (N, C) student log-probabilities at T
    log_p = (teacher / temperature).log_softmax(axis=1)     # (N, C) teacher log-probabilities at T
    return _reduce(_kl_rows(log_p, log_q) * (temperature * temperature), reduction, "kd_loss")


def _binary_and_non_target(logits: Tensor, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """log [p_target, 1 - p_target] (N, 2) and the non-target log-distribution (N, C - 1) of softmax(logits)."""
    count, classes = logits.shape
    rows = np.arange(count)
    offsets = np.arange(classes - 1)[None, :]
    others = offsets + (offsets >= labels[:, None])               # (N, C - 1): every class but the label
    target = logits[rows, labels]                                  # (N,)
    non_target = logits[rows[:, None], others]                     # (N, C - 1)
    # log p_target = z_y - lse(z), log(1 - p_target) = lse(z_others) - lse(z): a 2-way log-softmax, no log(1 - p)
    binary = ops.stack([target, _logsumexp(non_target, axis=1)], axis=1).log_softmax(axis=1)   # (N, 2)
    return binary, non_target.log_softmax(axis=1)


def dkd_loss(student_logits: Any, teacher_logits: Any, labels: Any, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, reduction: str = "batchmean") -> Tensor:
    r"""Decoupled knowledge distillation (Zhao et al. 2022, eq. 7): ``T^2 (alpha TCKD + beta NCKD)``.

    With p = softmax(t / T), q = softmax(s / T) and label y, the binary target distributions are
    b = [p_y, 1 - p_y] and the non-target distributions are p-hat_c = p_c / (1 - p_y) for c != y. Then

    .. math::
        \mathrm{TCKD} = \mathrm{KL}(b^t \| b^s), \qquad \mathrm{NCKD} = \mathrm{KL}(\hat p^t \| \hat p^s),
        \qquad \mathrm{KL}(p \| q) = \mathrm{TCKD} + (1 - p_y)\,\mathrm{NCKD} \quad \text{(their eq. 5)}

    so classical KD ties the non-target term to the teacher's doubt (1 - p_y), which is small exactly where the
    teacher is confident; DKD weights it independently (``beta``; the paper uses alpha = 1, beta = 8, T = 4 on
    CIFAR-100). ``labels`` are class indices (N,). Reductions as in :func:`kd_loss`.

    >>> import numpy as np, nanoopt as no
    >>> student, teacher = no.Tensor([[1.0, 0.0, 0.0]]), no.Tensor([[3.0, 1.0, 0.0]])
    >>> round(dkd_loss(student, teacher, np.array([0])).item(), 4)
    1.2588
    """
    student, teacher = _check_logits(student_logits, teacher_logits, "dkd_loss")
    temperature = _check_temperature(temperature, "dkd_loss", np.result_type(student.dtype, teacher.dtype))
    labels = _check_labels(labels, student.shape[0], student.shape[1], "dkd_loss")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"dkd_loss: {name} must be a finite number >= 0, got {value}")
    binary_s, others_s = _binary_and_non_target(student / temperature, labels)
    binary_t, others_t = _binary_and_non_target(teacher / temperature, labels)
    tckd = _kl_rows(binary_t, binary_s)                            # (N,)
    nckd = _kl_rows(others_t, others_s)                            # (N,)
    per_sample = (tckd * alpha + nckd * beta) * (temperature * temperature)
    return _reduce(per_sample, reduction, "dkd_loss")


# ===================================================================== feature-based
def hint_loss(student_features: Any, teacher_features: Any, regressor: Module | None = None) -> Tensor:
    r"""FitNets hint loss (Romero et al. 2015, eq. 3): mean squared error between the teacher's hint and the
    regressed student ("guided") layer.

    .. math:: L_{HT} = \frac{1}{N D} \sum_n \| u_n - r(v_n) \|_2^2

    where u (N, ...) is the teacher's hint, v the student's guided-layer output and r the trainable ``regressor``
    (e.g. :class:`~nanoopt.distill.FeatureAdapter`, which maps a student shape to a teacher shape, including
    between a CNN's (C, H, W) maps and an MLP's vectors); D is the number of features per sample. This is the
    paper's (1/2) ||u - r(v)||^2 divided by N D / 2, so its size does not depend on the layer width. Without a
    regressor the shapes must already match.

    >>> import nanoopt as no
    >>> round(hint_loss(no.Tensor([[1.0, 2.0]]), no.Tensor([[1.0, 4.0]])).item(), 4)
    2.0
    """
    student, teacher = _check_batch(student_features, teacher_features, "hint_loss")
    if regressor is not None:
        if not callable(regressor):
            raise TypeError(f"hint_loss: regressor must be a Module (callable), got {type(regressor).__name__}")
        student = regressor(student)
    if student.shape != teacher.shape:
        hint = " after the regressor" if regressor is not None else "; pass a regressor (FeatureAdapter)"
        raise ValueError(f"hint_loss: student features {student.shape} and teacher features {teacher.shape} "
                         f"differ in shape{hint}")
    difference = student - teacher
    return (difference * difference).mean()


def attention_map(features: Any, p: float = 2.0) -> Tensor:
    r"""Spatial attention map of Zagoruyko & Komodakis 2017 (eq. 1, the authors' code): for A of shape
    (N, C, H, W), Q = mean_c |A_c|^p flattened to (N, H W), then divided by its L2 norm per sample.

    >>> import numpy as np, nanoopt as no
    >>> attention_map(no.Tensor(np.ones((1, 3, 2, 2)))).data.tolist()
    [[0.5, 0.5, 0.5, 0.5]]
    """
    features = _tensor(features, "features", "attention_map")
    if features.ndim != 4:
        raise ValueError(f"attention_map: expected feature maps (N, C, H, W), got shape {features.shape}")
    if not (math.isfinite(p) and p >= 1):
        raise ValueError(f"attention_map: p must be a finite number >= 1, got {p}")
    energy = (features * features).mean(axis=1) if p == 2 else (features.abs() ** p).mean(axis=1)   # (N, H, W)
    flat = _flat(energy)                                                                            # (N, H W)
    norm = ((flat * flat).sum(axis=1, keepdims=True).clip(_EPS, None)).sqrt()                       # (N, 1)
    return flat / norm


def attention_transfer_loss(student_features: Any, teacher_features: Any, p: float = 2.0) -> Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis 2017): mean squared difference of normalised attention maps.

    .. math:: L_{AT} = \frac{1}{N H W} \sum_n \Big\| \frac{Q^s_n}{\|Q^s_n\|_2} - \frac{Q^t_n}{\|Q^t_n\|_2} \Big\|_2^2

    with Q from :func:`attention_map`. This is the authors' code (``(at(x) - at(y)).pow(2).mean()``, used with a
    weight beta = 1000); the paper's eq. 2 writes the unsquared p-norm with beta / 2. Student and teacher need the
    same spatial size H x W; their channel counts may differ (the maps average over channels).

    >>> import numpy as np, nanoopt as no
    >>> maps = no.Tensor(np.arange(8.0).reshape(1, 2, 2, 2))
    >>> round(attention_transfer_loss(maps, maps * 3).item(), 6)   # invariant to a scale of the features
    0.0
    """
    student, teacher = _check_batch(student_features, teacher_features, "attention_transfer_loss")
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"attention_transfer_loss: needs feature maps (N, C, H, W) of the same spatial size, got "
                         f"student {student.shape} and teacher {teacher.shape}")
    difference = attention_map(student, p) - attention_map(teacher, p)
    return (difference * difference).mean()


# ===================================================================== relation-based
def _pair_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distances ||e_i - e_j|| of the N(N-1)/2 pairs i < j, shape (P,)."""
    first, second = np.triu_indices(embeddings.shape[0], k=1)
    difference = embeddings[first] - embeddings[second]                 # (P, D)
    return (difference * difference).sum(axis=1).clip(_EPS, None).sqrt()


def rkd_distance_loss(student_embeddings: Any, teacher_embeddings: Any) -> Tensor:
    r"""RKD distance-wise loss (Park et al. 2019, eq. 3-5).

    .. math::
        \psi_D(e_i, e_j) = \frac{\|e_i - e_j\|_2}{\mu}, \quad \mu = \frac{1}{|P|}\sum_{(i,j) \in P} \|e_i - e_j\|_2,
        \qquad L = \frac{1}{|P|} \sum_{(i,j) \in P} \ell_\delta\big(\psi_D(s_i, s_j) - \psi_D(t_i, t_j)\big)

    over the pairs P = {i < j} of the batch, with the Huber loss l_delta (delta = 1). Embeddings are flattened to
    (N, D); student and teacher widths may differ. Dividing by the mean distance makes the loss invariant to a
    global scale of either embedding. The paper weights it by 25 (lambda_D) next to the angle loss (50).

    >>> import numpy as np, nanoopt as no
    >>> points = no.Tensor(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    >>> round(rkd_distance_loss(points * 5.0, points).item(), 6)
    0.0
    """
    student, teacher = _check_batch(student_embeddings, teacher_embeddings, "rkd_distance_loss", "embeddings")
    if student.shape[0] < 2:
        raise ValueError(f"rkd_distance_loss: needs a batch of at least 2 samples, got {student.shape[0]}")
    student_distances, teacher_distances = _pair_distances(_flat(student)), _pair_distances(_flat(teacher))
    relative_student = student_distances / student_distances.mean()
    relative_teacher = teacher_distances / teacher_distances.mean()
    return _smooth_l1(relative_student - relative_teacher).mean()


def _triplet_cosines(embeddings: Tensor) -> Tensor:
    """cos of the angle at e_i between e_j and e_k, for every (i, j, k): shape (N, N, N); 0 where j or k is i.

    By the law of cosines, <e_j - e_i, e_k - e_i> = (d_ij^2 + d_ik^2 - d_jk^2) / 2, so one (N, N) matrix of
    squared distances gives every angle without an (N, N, D) batch of unit vectors and their N matrix products.
    """
    count = embeddings.shape[0]
    difference = embeddings.reshape(1, count, -1) - embeddings.reshape(count, 1, -1)   # (N, N, D): e_j - e_i
    squared = (difference * difference).sum(axis=2)                                   # (N, N): d_ij^2, exact
    to_j, to_k = squared.reshape(count, count, 1), squared.reshape(count, 1, count)   # d_ij^2, d_ik^2
    between = squared.reshape(1, count, count)                                        # d_jk^2
    safe_j, safe_k = ops.where(to_j.data > 0, to_j, 1.0), ops.where(to_k.data > 0, to_k, 1.0)   # no 0 / 0
    cosines = (to_j + to_k - between) / ((safe_j * safe_k).sqrt() * 2.0)
    return ops.where((to_j.data > 0) & (to_k.data > 0), cosines, 0.0)              # 0 where j == i or k == i


def rkd_angle_loss(student_embeddings: Any, teacher_embeddings: Any) -> Tensor:
    r"""RKD angle-wise loss (Park et al. 2019, eq. 6-7).

    .. math::
        \psi_A(e_i, e_j, e_k) = \Big\langle \frac{e_j - e_i}{\|e_j - e_i\|_2}, \frac{e_k - e_i}{\|e_k - e_i\|_2}
        \Big\rangle, \qquad L = \frac{1}{N^3} \sum_{i,j,k} \ell_\delta\big(\psi_A(s) - \psi_A(t)\big)

    (the cosine of the angle at vertex i), averaged over all N^3 triples as in the authors' code (triples with
    j = i or k = i have psi = 0 on both sides and contribute nothing). Invariant to a global scale and a
    translation of either embedding. Memory grows as N^3: keep batches in the hundreds.

    >>> import numpy as np, nanoopt as no
    >>> points = no.Tensor(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    >>> round(rkd_angle_loss(points * 3.0 + 1.0, points).item(), 6)
    0.0
    """
    student, teacher = _check_batch(student_embeddings, teacher_embeddings, "rkd_angle_loss", "embeddings")
    if student.shape[0] < 3:
        raise ValueError(f"rkd_angle_loss: needs a batch of at least 3 samples, got {student.shape[0]}")
    return _smooth_l1(_triplet_cosines(_flat(student)) - _triplet_cosines(_flat(teacher))).mean()


def _normalised_gram(features: Tensor) -> Tensor:
    """G = A A^T for A = features flattened to (N, D), each row divided by its L2 norm: (N, N)."""
    flat = _flat(features)
    gram = flat @ flat.T                                                     # (N, N)
    return gram / (gram * gram).sum(axis=1, keepdims=True).clip(_EPS, None).sqrt()


def similarity_preserving_loss(student_features: Any, teacher_features: Any) -> Tensor:
    r"""Similarity-preserving KD (Tung & Mori 2019, eq. 2-4).

    .. math::
        \tilde G = \mathrm{rownorm}(A A^\top), \qquad L = \frac{1}{N^2} \| \tilde G^t - \tilde G^s \|_F^2

    for activations A flattened to (N, D) (student and teacher widths may differ). Samples that the teacher
    finds similar must be similar for the student. Invariant to a global scale of either input. The paper
    weights it by gamma = 3000.

    >>> import numpy as np, nanoopt as no
    >>> features = no.Tensor(np.array([[1.0, 0.0], [1.0, 1.0]]))
    >>> round(similarity_preserving_loss(features, features * 7.0).item(), 6)
    0.0
    """
    student, teacher = _check_batch(student_features, teacher_features, "similarity_preserving_loss")
    difference = _normalised_gram(student) - _normalised_gram(teacher)
    return (difference * difference).sum() / (student.shape[0] ** 2)
