"""Distillation strategies: the Distiller loop (frozen teachers, hooked features, adapters, teacher cache,
multi-teacher weighting), cross-model, born-again, deep supervision, mutual learning, compressed students, and
their bad-input errors. Small models on tiny synthetic data or the bundled digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import data, distill, models, nn, optim
from nanoopt.nn import functional as F

FEW = settings(max_examples=25, deadline=None)


def batch(seed: int = 0, count: int = 16, features: int = 64):
    rng = np.random.default_rng(seed)
    return rng.random((count, features)).astype(np.float32), (np.arange(count) % 10).astype(np.int64)


def snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------- the Distiller loop
@pytest.mark.slow
def test_teacher_is_frozen_in_eval_mode_and_not_trained_or_saved():
    no.manual_seed(0)
    x, y = batch(count=64)
    teacher = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))
    before = snapshot(teacher)
    distiller = distill.Distiller(models.mlp(64, (16,)), teacher)
    assert not any(p is q for p in distiller.parameters() for q in teacher.parameters())
    assert all(key.startswith("student.") for key in distiller.state_dict())
    distiller.fit((x, y), epochs=2, batch_size=16, progress=False)
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_objective_is_the_weighted_sum_of_its_terms():
    no.manual_seed(0)
    x, y = batch()
    student, teacher = models.mlp(64, (16,)), models.mlp(64, (24,))
    config = distill.DistillConfig(temperature=3.0, hard_weight=0.7, soft_weight=2.5)
    distiller = distill.Distiller(student, teacher, config)
    loss, logits = distiller.compute_loss(distiller, x, y)
    with no.no_grad():
        teacher_logits = teacher(no.Tensor(x))
        expected = 0.7 * F.cross_entropy(student(no.Tensor(x)), y).item() + 2.5 * distill.kd_loss(
            student(no.Tensor(x)), teacher_logits, 3.0).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(logits.data, student(no.Tensor(x)).data, rtol=1e-6)


def test_features_are_captured_by_module_name_with_auto_adapters():
    no.manual_seed(0)
    x = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
    y = np.arange(8) % 10
    teacher, student = models.lenet5(input_size=8), models.mlp(64, (32,))
    pair = distill.FeaturePair("2", "3", weight=0.5, adapter="auto")     # MLP hidden (32,) <- conv maps (16, 4, 4)
    distiller = distill.Distiller(student, teacher, features=[pair], example_input=x)
    adapter = distiller.adapters[0]
    assert (adapter.student_shape, adapter.teacher_shape, adapter.kind) == ((32,), (16, 4, 4), "flatten-linear")
    assert any(key.startswith("adapters.0.") for key in distiller.state_dict())
    loss, _ = distiller.compute_loss(distiller, x, y)
    with no.no_grad():
        hidden = student[2](student[1](student[0](no.Tensor(x))))
        maps = teacher[3](teacher[2](teacher[1](teacher[0](no.Tensor(x)))))
        hint = distill.hint_loss(adapter(hidden), maps).item()
    assert distiller.last_terms["feature 2<-3"] == pytest.approx(hint, rel=1e-5)
    loss.backward()
    assert adapter.map.weight.grad is not None and np.abs(adapter.map.weight.grad).sum() > 0
    distiller.remove_hooks()
    assert not student[2]._forward_hooks and not teacher[3]._forward_hooks


def test_teacher_cache_gives_the_same_objective_and_runs_the_teacher_once_per_example():
    no.manual_seed(0)
    x, y = batch(count=32)
    teacher, calls = models.mlp(64, (24,)), []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    pair = distill.FeaturePair("1", "2", loss=distill.similarity_preserving_loss)
    plain = distill.Distiller(models.mlp(64, (16,)), teacher, features=[pair])
    student = copy.deepcopy(plain.student)
    cached = distill.Distiller(student, teacher, features=[pair], cache_teacher=True)
    order = np.random.default_rng(1).permutation(32)
    batches = (order[:16], order[16:], order[8:24], np.r_[order[:4], order[:4]])
    expected = [plain.compute_loss(plain, x[rows], y[rows])[0].item() for rows in batches]
    calls.clear()
    for rows, value in zip(batches, expected, strict=True):
        assert cached.compute_loss(cached, x[rows], y[rows])[0].item() == pytest.approx(value, rel=1e-6)
    assert calls == [16, 16] and len(cached._cache) == 32   # the teacher ran only for examples it had not seen


def test_multi_teacher_weightings():
    no.manual_seed(0)
    x, y = batch()
    teachers = [models.mlp(64, (20,)) for _ in range(3)]
    student = models.mlp(64, (16,))
    with no.no_grad():
        s = student(no.Tensor(x))
        t = [teacher(no.Tensor(x)).data for teacher in teachers]

    def objective(**options):
        config = distill.DistillConfig(temperature=4.0, hard_weight=0.0, soft_weight=1.0, **options)
        distiller = distill.Distiller(student, teachers, config)
        return distiller.compute_loss(distiller, x, y)[0].item()

    assert objective() == pytest.approx(distill.kd_loss(s, no.Tensor(np.mean(t, axis=0))).item(), rel=1e-5)
    fixed = sum(w * distill.kd_loss(s, no.Tensor(ti)).item() for w, ti in zip((0.5, 0.25, 0.25), t, strict=True))
    assert objective(teacher_weighting="fixed", teacher_weights=(2.0, 1.0, 1.0)) == pytest.approx(fixed, rel=1e-5)
    weights = distill.confidence_weights(t, y)
    per_teacher = [distill.kd_loss(s, no.Tensor(ti), reduction="none").data for ti in t]
    confident = np.mean(sum(w * p for w, p in zip(weights, per_teacher, strict=True)))
    assert objective(teacher_weighting="confidence") == pytest.approx(confident, rel=1e-5)


@FEW
@given(st.integers(0, 2**31 - 1), st.integers(2, 4))
def test_confidence_weights_form_a_distribution_favouring_the_right_teacher(seed, count):
    rng = np.random.default_rng(seed)
    logits = [rng.normal(0, 3, (5, 4)) for _ in range(count)]
    labels = rng.integers(0, 4, 5)
    weights = distill.confidence_weights(logits, labels)
    assert weights.shape == (count, 5)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-12)
    shifted = [z + rng.normal(0, 10, (5, 1)) for z in logits]      # softmax shift invariance per sample
    np.testing.assert_allclose(distill.confidence_weights(shifted, labels), weights, rtol=1e-9)
    right = [z.copy() for z in logits]
    right[0][np.arange(5), labels] += 100.0                         # teacher 0 is now sure of the truth
    favoured = distill.confidence_weights(right, labels)
    assert (favoured[0] >= favoured.max(axis=0) - 1e-12).all() and (favoured[0] >= 1 / count - 1e-12).all()
    assert (favoured[0] >= weights[0]).all()


# ----------------------------------------------------------------- strategies
@pytest.mark.slow
def test_cross_model_kd_trains_student_and_adapters_on_digits():
    no.manual_seed(0)
    (x, y), (xt, yt) = data.load_digits("train"), data.load_digits("test")
    teacher = models.lenet5(input_size=8)
    no.fit(teacher, (x, y), epochs=4, lr=0.05, batch_size=32, progress=False)
    student = models.mlp(64, (32,))
    distiller = distill.cross_model_distiller(student, teacher, {"2": "7"}, example_input=x[:2],
                                              config=distill.DistillConfig(temperature=2.0), hint_weight=0.1,
                                              cache_teacher=True)
    adapter_before = distiller.adapters[0].map.weight.data.copy()
    history = distiller.fit((x, y), epochs=6, lr=0.05, batch_size=32, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    assert not np.array_equal(adapter_before, distiller.adapters[0].map.weight.data)
    assert no.evaluate(student, (xt, yt))["accuracy"] > 0.85


@pytest.mark.slow
def test_born_again_generations_are_fresh_models_of_the_same_architecture():
    no.manual_seed(0)
    x, y = batch(count=64)
    family = distill.born_again(lambda: models.mlp(64, (16,)), (x, y), generations=2, epochs=2,
                                optimizer=lambda params: optim.SGD(params, lr=0.1, momentum=0.9),
                                progress=False, batch_size=16)
    assert len(family) == 3 and len({id(m) for m in family}) == 3
    assert [sorted(m.state_dict()) for m in family[1:]] == [sorted(family[0].state_dict())] * 2
    assert not any(m.training for m in family)
    assert not any(m._forward_hooks for g in family for m in g.modules())   # hooks removed after each generation


def test_deep_supervision_heads_learn_from_the_deepest_classifier():
    no.manual_seed(0)
    x, y = batch()
    backbone = models.mlp(64, (32, 24))
    heads = distill.auxiliary_heads(backbone, ["2", "4"], 10, x[:2])
    model = distill.DeepSupervision(backbone, heads, distill.DistillConfig(temperature=2.0, soft_weight=0.5))
    loss, logits = model.compute_loss(model, x, y)
    with no.no_grad():
        deepest = backbone(no.Tensor(x))
        hidden = backbone[2](backbone[1](backbone[0](no.Tensor(x))))
        head = heads["2"](hidden)
    assert model.last_terms["head 2 soft"] == pytest.approx(distill.kd_loss(head, deepest, 2.0).item(), rel=1e-5)
    np.testing.assert_allclose(model(no.Tensor(x)).data, deepest.data, rtol=1e-6)   # forward is the backbone
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(list(model.parameters())) == len(list(backbone.parameters())) + 4


def test_mutual_learning_peer_gradients_come_from_their_own_objective():
    no.manual_seed(0)
    x, y = batch()
    peers = [models.mlp(64, (16,)), models.mlp(64, (12,)), models.mlp(64, (8,))]
    mutual = distill.MutualLearning(peers)
    loss, ensemble = mutual.compute_loss(mutual, x, y)
    loss.backward()
    summed = [p.grad.copy() for p in peers[0].parameters()]
    mutual.zero_grad()
    with no.no_grad():
        others = [peer(no.Tensor(x)) for peer in peers[1:]]
    z = peers[0](no.Tensor(x))
    own = F.cross_entropy(z, y) + (distill.kd_loss(z, others[0], 1.0) + distill.kd_loss(z, others[1], 1.0)) / 2
    own.backward()
    for a, p in zip(summed, peers[0].parameters(), strict=True):
        np.testing.assert_allclose(a, p.grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ensemble.data, mutual(no.Tensor(x)).data, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_recover_keeps_pruned_weights_at_zero():
    prune = pytest.importorskip("nanoopt.prune")
    no.manual_seed(0)
    x, y = batch(count=64)
    float_model = models.mlp(64, (32,))
    no.fit(float_model, (x, y), epochs=2, batch_size=16, progress=False)
    student = copy.deepcopy(float_model)
    prune.global_unstructured([(student[1], "weight"), (student[3], "weight")], amount=0.8)
    mask = prune.get_mask(student[1], "weight").copy()
    distill.recover(student, float_model, (x, y), epochs=2, batch_size=16, progress=False)
    assert (student[1].weight.data[mask == 0] == 0).all()
    assert (mask == 0).mean() > 0.5


# ----------------------------------------------------------------- bad input
def test_bad_configurations_and_names_raise_clear_errors():
    x, y = batch()
    student, teacher = models.mlp(64, (16,)), models.mlp(64, (16,))
    with pytest.raises(ValueError, match="the student has no module named 'body'"):
        distill.Distiller(student, teacher, features=[distill.FeaturePair("body", "1")])
    with pytest.raises(ValueError, match=r"the teacher 0 has no module named '9'; its modules are \['0', '1'"):
        distill.Distiller(student, teacher, features=[distill.FeaturePair("1", "9")])
    with pytest.raises(ValueError, match="needs example_input"):
        distill.Distiller(student, teacher, features=[distill.FeaturePair("1", "1", adapter="auto")])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        distill.DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        distill.DistillConfig(temperature=-2.0)
    with pytest.raises(ValueError, match="response must be 'kd' or 'dkd'"):
        distill.DistillConfig(response="kl")
    with pytest.raises(ValueError, match="one weight per teacher"):
        distill.Distiller(student, [teacher, teacher], distill.DistillConfig(teacher_weighting="fixed",
                                                                            teacher_weights=(1.0,)))
    with pytest.raises(TypeError, match="teacher 0 must be a nanoopt.nn.Module"):
        distill.Distiller(student, [lambda t: t])
    with pytest.raises(ValueError, match="at least two peers"):
        distill.MutualLearning([student])
    wrong_classes = distill.Distiller(student, models.mlp(64, (16,), num_classes=7))
    with pytest.raises(ValueError, match=r"student logits \(16, 10\) and teacher 0 logits \(16, 7\) differ"):
        wrong_classes.compute_loss(wrong_classes, x, y)
    with pytest.raises(ValueError, match="shape"):
        distill.FeatureAdapter((64,), (0, 3))


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 10), ramp=st.integers(0, 10), soft=st.one_of(st.just(0.0), st.floats(1e-3, 4.0)),
       epoch=st.integers(0, 30))
def test_soft_weight_schedule_is_zero_then_linear_ramp_then_configured(start, ramp, soft, epoch):
    schedule = distill.SoftWeightSchedule(start, ramp)
    mutual = distill.MutualLearning([models.mlp(8, (4,), 3), models.mlp(8, (4,), 3)],
                                    distill.DistillConfig(temperature=1.0, hard_weight=1.0, soft_weight=soft))
    schedule.on_train_begin(mutual, None)
    schedule.on_epoch_begin(epoch, mutual)
    weight = mutual.config.soft_weight
    if epoch < start:
        assert weight == 0.0
    elif epoch >= start + max(ramp, 1) - 1:
        assert weight == soft
    else:
        assert weight == pytest.approx(soft * (epoch - start + 1) / ramp)
        assert 0.0 < weight < soft or soft == 0.0
    assert mutual.config.temperature == 1.0 and mutual.config.hard_weight == 1.0   # only the soft weight moves


@pytest.mark.slow
def test_mutual_learning_with_the_soft_term_off_trains_each_peer_exactly_as_alone():
    x, y = batch(count=64)
    no.manual_seed(3)
    mutual = distill.MutualLearning([models.mlp(64, (16,)), models.mlp(64, (12,))])
    no.manual_seed(3)
    alone = models.mlp(64, (16,))
    first = [p.data.copy() for p in alone.parameters()]
    np.testing.assert_array_equal(first[0], next(iter(mutual.peers[0].parameters())).data)
    loader = no.data.DataLoader(x, y, batch_size=16, shuffle=True, seed=5)
    mutual.fit(loader, epochs=2, callbacks=[distill.SoftWeightSchedule(start_epoch=2)], progress=False)
    no.fit(alone, no.data.DataLoader(x, y, batch_size=16, shuffle=True, seed=5), epochs=2, progress=False)
    for coupled, single in zip(mutual.peers[0].parameters(), alone.parameters(), strict=True):
        np.testing.assert_array_equal(coupled.data, single.data)
    assert mutual.config.soft_weight == 0.0 and mutual.last_terms["peer 0 soft"] > 0.0   # computed, weighted 0


def test_soft_weight_schedule_rejects_bad_arguments_and_non_strategies():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="integer >= 0"):
            distill.SoftWeightSchedule(bad)
        with pytest.raises(ValueError, match="ramp_epochs"):
            distill.SoftWeightSchedule(0, bad)
    with pytest.raises(TypeError, match="DistillConfig in .config"):
        no.fit(models.mlp(8, (4,), 3), (np.zeros((4, 8), np.float32), np.zeros(4, np.int64)), epochs=1,
               callbacks=[distill.SoftWeightSchedule(1)], progress=False)
    with pytest.raises(RuntimeError, match="not started"):
        distill.SoftWeightSchedule(1).weight_at(0)
