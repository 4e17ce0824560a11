"""Distillation losses: values against plain NumPy references, gradients against finite differences (float64),
non-negativity, zero at equality, the T^2 scaling of KD, DKD's decomposition, invariances, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import distill, nn
from nanoopt.distill import losses
from nanoopt.gradcheck import check_grads

FEW = settings(max_examples=30, deadline=None)

seeds = st.integers(0, 2**31 - 1)
temperatures = st.floats(0.5, 10.0)


def logits_pair(seed: int, count: int = 6, classes: int = 5, spread: float = 3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, spread, (count, classes)), rng.normal(0, spread, (count, classes))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def huber(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


# ----------------------------------------------------------------- NumPy references (the definitions)
def kd_reference(s, t, temperature):
    p, q = softmax(t / temperature), softmax(s / temperature)
    return temperature**2 * np.sum(p * (np.log(p) - np.log(q))) / len(s)


def dkd_reference(s, t, labels, alpha, beta, temperature):
    total = 0.0
    for zs, zt, y in zip(s, t, labels, strict=True):
        p, q = softmax(zt / temperature), softmax(zs / temperature)
        bp, bq = np.array([p[y], 1 - p[y]]), np.array([q[y], 1 - q[y]])
        others = np.arange(len(p)) != y
        hp, hq = p[others] / p[others].sum(), q[others] / q[others].sum()
        total += alpha * np.sum(bp * np.log(bp / bq)) + beta * np.sum(hp * np.log(hp / hq))
    return temperature**2 * total / len(s)


def rkd_distance_reference(s, t):
    def relative(e):
        i, j = np.triu_indices(len(e), 1)
        d = np.linalg.norm(e[i] - e[j], axis=1)
        return d / d.mean()
    return huber(relative(s) - relative(t)).mean()


def rkd_angle_reference(s, t):
    def cosines(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        a, b = e[j] - e[i], e[k] - e[i]
                        out[i, j, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        return out
    return huber(cosines(s) - cosines(t)).mean()


def sp_reference(s, t):
    def gram(a):
        g = a @ a.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    return np.sum((gram(s) - gram(t)) ** 2) / len(s) ** 2


def at_reference(s, t):
    def att(a):
        q = (a**2).mean(axis=1).reshape(len(a), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.mean((att(s) - att(t)) ** 2)


# ----------------------------------------------------------------- kd_loss
@FEW
@given(seeds, temperatures)
def test_kd_loss_equals_t_squared_times_batchmean_kl(seed, temperature):
    s, t = logits_pair(seed)
    value = distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature).item()
    assert value == pytest.approx(kd_reference(s, t, temperature), rel=1e-9, abs=1e-12)
    # the T^2 factor is exactly what separates it from nn.functional.kl_div (batchmean) at temperature T
    plain = nn.functional.kl_div(no.Tensor(s / temperature).log_softmax(), no.Tensor(softmax(t / temperature)))
    assert value == pytest.approx(temperature**2 * plain.item(), rel=1e-9, abs=1e-12)


@FEW
@given(seeds, temperatures)
def test_kd_loss_gradient_is_t_times_probability_gap(seed, temperature):
    """d/ds [T^2 KL(p^T || q^T)] = T (q^T - p^T) / N: the T^2 scaling keeps the gradient from shrinking as 1/T."""
    s, t = logits_pair(seed)
    student = no.Tensor(s, requires_grad=True)
    distill.kd_loss(student, no.Tensor(t), temperature).backward()
    expected = temperature * (softmax(s / temperature) - softmax(t / temperature)) / len(s)
    np.testing.assert_allclose(student.grad, expected, rtol=1e-9, atol=1e-12)


@FEW
@given(seeds)
def test_kd_loss_tends_to_centred_logit_matching_at_high_temperature(seed):
    """Hinton et al. eq. 3: for T >> |z|, T^2 KL -> (1 / 2C) mean_n ||(s - mean s) - (t - mean t)||^2."""
    s, t = logits_pair(seed, spread=1.0)
    classes = s.shape[1]
    centred = (s - s.mean(axis=1, keepdims=True)) - (t - t.mean(axis=1, keepdims=True))
    limit = np.sum(centred**2) / (2 * classes * len(s))
    value = distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature=1000.0).item()
    assert value == pytest.approx(limit, rel=2e-2)


@FEW
@given(seeds, temperatures)
def test_kd_loss_is_non_negative_and_zero_at_the_teacher(seed, temperature):
    s, t = logits_pair(seed)
    assert distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature).item() >= 0
    assert distill.kd_loss(no.Tensor(t), no.Tensor(t), temperature).item() == pytest.approx(0.0, abs=1e-12)
    # softmax is shift invariant: adding a per-sample constant to the student changes nothing
    shifted = t + np.random.default_rng(seed).normal(0, 5, (len(t), 1))
    assert distill.kd_loss(no.Tensor(shifted), no.Tensor(t), temperature).item() == pytest.approx(0.0, abs=1e-9)


@FEW
@given(seeds, temperatures)
def test_kd_loss_reductions(seed, temperature):
    s, t = logits_pair(seed)
    per_sample = distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature, reduction="none").data
    assert per_sample.shape == (len(s),)
    assert distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature, reduction="sum").item() == pytest.approx(
        per_sample.sum(), rel=1e-12)
    assert distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature).item() == pytest.approx(per_sample.mean(),
                                                                                            rel=1e-12)


@FEW
@given(seeds, temperatures)
def test_kd_loss_gradients_match_finite_differences(seed, temperature):
    s, t = logits_pair(seed)
    check_grads(lambda a, b: distill.kd_loss(a, b, temperature), [s, t], seed=seed)
    check_grads(lambda a, b: distill.kd_loss(a, b, temperature, reduction="none"), [s, t], seed=seed)


# ----------------------------------------------------------------- dkd_loss
@FEW
@given(seeds, temperatures, st.floats(0.0, 3.0), st.floats(0.0, 10.0))
def test_dkd_loss_matches_its_definition(seed, temperature, alpha, beta):
    s, t = logits_pair(seed)
    labels = np.random.default_rng(seed).integers(0, s.shape[1], len(s))
    value = distill.dkd_loss(no.Tensor(s), no.Tensor(t), labels, alpha, beta, temperature).item()
    assert value == pytest.approx(dkd_reference(s, t, labels, alpha, beta, temperature), rel=1e-8, abs=1e-12)


@FEW
@given(seeds, temperatures)
def test_kd_decomposes_into_tckd_plus_weighted_nckd(seed, temperature):
    """Zhao et al. 2022, eq. 5: KD = TCKD + (1 - p_target) NCKD, sample by sample."""
    s, t = logits_pair(seed)
    labels = np.random.default_rng(seed).integers(0, s.shape[1], len(s))
    args = (no.Tensor(s), no.Tensor(t), labels)
    tckd = distill.dkd_loss(*args, alpha=1.0, beta=0.0, temperature=temperature, reduction="none").data
    nckd = distill.dkd_loss(*args, alpha=0.0, beta=1.0, temperature=temperature, reduction="none").data
    kd = distill.kd_loss(no.Tensor(s), no.Tensor(t), temperature, reduction="none").data
    doubt = 1 - softmax(t / temperature)[np.arange(len(s)), labels]
    np.testing.assert_allclose(kd, tckd + doubt * nckd, rtol=1e-8, atol=1e-12)
    assert (tckd >= -1e-12).all() and (nckd >= -1e-12).all()


def test_dkd_loss_is_zero_at_the_teacher_and_stable_for_confident_logits():
    t = np.array([[60.0, 0.0, -3.0], [0.0, -50.0, 80.0]])
    labels = np.array([0, 2])
    assert distill.dkd_loss(no.Tensor(t), no.Tensor(t), labels).item() == pytest.approx(0.0, abs=1e-12)
    value = distill.dkd_loss(no.Tensor(t * 0.5), no.Tensor(t), labels, temperature=1.0).item()
    assert np.isfinite(value) and value > 0  # 1 - p_target underflows in float, its log-space form does not


@FEW
@given(seeds, temperatures)
def test_dkd_loss_gradients_match_finite_differences(seed, temperature):
    s, t = logits_pair(seed)
    labels = np.random.default_rng(seed).integers(0, s.shape[1], len(s))
    check_grads(lambda a, b: distill.dkd_loss(a, b, labels, 1.0, 8.0, temperature), [s, t], seed=seed)


# ----------------------------------------------------------------- feature-based
@FEW
@given(seeds)
def test_hint_loss_is_the_mean_squared_error_after_the_regressor(seed):
    rng = np.random.default_rng(seed)
    student, teacher = rng.normal(size=(4, 6)), rng.normal(size=(4, 3, 2, 2))
    adapter = distill.FeatureAdapter((6,), (3, 2, 2))
    value = distill.hint_loss(no.Tensor(student), no.Tensor(teacher), adapter).item()
    mapped = (student @ adapter.map.weight.data.T + adapter.map.bias.data).reshape(teacher.shape)
    assert value == pytest.approx(np.mean((mapped - teacher) ** 2), rel=1e-5)
    assert distill.hint_loss(no.Tensor(teacher), no.Tensor(teacher)).item() == 0.0
    check_grads(lambda a, b: distill.hint_loss(a, b), [student, rng.normal(size=(4, 6))], seed=seed)


@FEW
@given(seeds, st.floats(0.01, 100.0))
def test_attention_transfer_matches_reference_and_ignores_scale(seed, scale):
    rng = np.random.default_rng(seed)
    student, teacher = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 5, 4, 4))
    value = distill.attention_transfer_loss(no.Tensor(student), no.Tensor(teacher)).item()
    assert value == pytest.approx(at_reference(student, teacher), rel=1e-9)
    scaled = distill.attention_transfer_loss(no.Tensor(student * scale), no.Tensor(teacher)).item()
    assert scaled == pytest.approx(value, rel=1e-7, abs=1e-12)
    assert distill.attention_transfer_loss(no.Tensor(teacher), no.Tensor(teacher)).item() == pytest.approx(0, abs=1e-15)
    check_grads(distill.attention_transfer_loss, [student, teacher], seed=seed)


# ----------------------------------------------------------------- relation-based
embeddings = st.tuples(seeds, st.integers(3, 7), st.integers(1, 5), st.integers(1, 5))


def embedding_pair(case):
    """The generator of the case's seed, then from it student and teacher embeddings of the same samples."""
    seed, count, student_width, teacher_width = case
    rng = np.random.default_rng(seed)
    return rng, rng.normal(size=(count, student_width)), rng.normal(size=(count, teacher_width))


@FEW
@given(embeddings)
def test_relation_losses_match_their_definitions(case):
    rng, s, t = embedding_pair(case)
    pairs = ((distill.rkd_distance_loss, rkd_distance_reference), (distill.rkd_angle_loss, rkd_angle_reference),
             (distill.similarity_preserving_loss, sp_reference))
    for loss, reference in pairs:
        value = loss(no.Tensor(s), no.Tensor(t)).item()
        assert value >= 0
        assert value == pytest.approx(reference(s, t), rel=1e-8, abs=1e-12), loss.__name__


@FEW
@given(embeddings, st.floats(1e-2, 1e2), st.floats(1e-2, 1e2))
def test_relation_losses_are_invariant_to_a_global_scale(case, student_scale, teacher_scale):
    rng, s, t = embedding_pair(case)
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss, distill.similarity_preserving_loss):
        base = loss(no.Tensor(s), no.Tensor(t)).item()
        scaled = loss(no.Tensor(s * student_scale), no.Tensor(t * teacher_scale)).item()
        assert scaled == pytest.approx(base, rel=1e-7, abs=1e-12), loss.__name__
        # and zero when the student is a scaled copy of the teacher
        assert loss(no.Tensor(t * student_scale), no.Tensor(t)).item() == pytest.approx(0.0, abs=1e-12)
    # the angle loss is also invariant to a translation
    shift = rng.normal(size=(1, s.shape[1])) * 10
    assert distill.rkd_angle_loss(no.Tensor(s + shift), no.Tensor(t)).item() == pytest.approx(
        distill.rkd_angle_loss(no.Tensor(s), no.Tensor(t)).item(), rel=1e-6, abs=1e-12)


@FEW
@given(embeddings)
def test_relation_loss_gradients_match_finite_differences(case):
    _, s, t = embedding_pair(case)
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss, distill.similarity_preserving_loss):
        check_grads(loss, [s, t], seed=case[0], rtol=1e-4)


def test_rkd_gradients_stay_finite_for_coincident_embeddings():
    points = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])   # two identical rows: zero distance
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss):
        student = no.Tensor(points, requires_grad=True)
        loss(student, no.Tensor(np.random.default_rng(0).normal(size=(4, 3)))).backward()
        assert np.isfinite(student.grad).all()


# ----------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    s, t = no.Tensor(np.zeros((4, 10))), no.Tensor(np.zeros((4, 10)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        distill.kd_loss(s, no.Tensor(np.zeros((3, 10))))
    with pytest.raises(ValueError, match="class counts differ"):
        distill.kd_loss(s, no.Tensor(np.zeros((4, 9))))
    with pytest.raises(ValueError, match="class counts differ"):
        distill.dkd_loss(s, no.Tensor(np.zeros((4, 9))), np.zeros(4, dtype=int))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            distill.kd_loss(s, t, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        distill.kd_loss(s, t, temperature=True)
    with pytest.raises(ValueError, match="2-D"):
        distill.kd_loss(no.Tensor(np.zeros(10)), no.Tensor(np.zeros(10)))
    with pytest.raises(ValueError, match="reduction"):
        distill.kd_loss(s, t, reduction="mean")
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 9\]"):
        distill.dkd_loss(s, t, np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="expected 4 class indices"):
        distill.dkd_loss(s, t, np.array([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        distill.dkd_loss(s, t, np.zeros(4))
    with pytest.raises(ValueError, match="pass a regressor"):
        distill.hint_loss(no.Tensor(np.zeros((4, 3))), no.Tensor(np.zeros((4, 5))))
    with pytest.raises(ValueError, match="batch sizes differ"):
        distill.hint_loss(no.Tensor(np.zeros((4, 3))), no.Tensor(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="same spatial size"):
        distill.attention_transfer_loss(no.Tensor(np.zeros((2, 3, 4, 4))), no.Tensor(np.zeros((2, 3, 2, 2))))
    with pytest.raises(ValueError, match="at least 2 samples"):
        distill.rkd_distance_loss(no.Tensor(np.zeros((1, 3))), no.Tensor(np.zeros((1, 3))))
    with pytest.raises(ValueError, match="batch sizes differ"):
        distill.similarity_preserving_loss(no.Tensor(np.zeros((4, 3))), no.Tensor(np.zeros((5, 3))))
    with pytest.raises(TypeError, match="Tensor or an array"):
        distill.kd_loss("logits", t)


def test_losses_keep_float32_and_float64():
    for dtype in (np.float32, np.float64):
        s = no.Tensor(np.ones((3, 4), dtype=dtype))
        assert distill.kd_loss(s, s * 2).dtype == dtype
        assert losses.rkd_angle_loss(s + np.eye(3, 4, dtype=dtype), s).dtype == dtype
