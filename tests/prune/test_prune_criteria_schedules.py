"""Criteria against plain references; schedules reach exact sparsities; lottery tickets rewind; analysis; sparse
inference layers."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import data, models, nn, prune
from nanoopt.data import DataLoader
from nanoopt.nn import functional as F
from nanoopt.train import predict

SETTINGS = settings(max_examples=25, deadline=None)


def tiny_problem(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def loss_at(model, x, y):
    with no.no_grad():
        return float(F.cross_entropy(model(no.Tensor(x)), y).item())


# ----------------------------------------------------------------- criteria
def test_taylor_is_weight_times_a_numerical_gradient():
    no.manual_seed(0)
    model = models.mlp(6, hidden=(5,), num_classes=3)
    model = copy.deepcopy(model)
    x, y = tiny_problem()
    scores = prune.taylor(model, [(x, y)])
    layer = model[1]
    h = 1e-2
    for (i, j) in [(0, 0), (2, 3), (4, 5)]:
        original = float(layer.weight.data[i, j])
        layer.weight.data[i, j] = original + h
        up = loss_at(model, x, y)
        layer.weight.data[i, j] = original - h
        down = loss_at(model, x, y)
        layer.weight.data[i, j] = original
        expected = abs(original * (up - down) / (2 * h))
        assert scores[(layer, "weight")][i, j] == pytest.approx(expected, rel=2e-2, abs=1e-5)
    assert all(p.grad is None for p in model.parameters())           # gradients cleared


def test_snip_is_normalised_taylor_on_one_batch():
    no.manual_seed(1)
    model = models.mlp(6, hidden=(5,), num_classes=3)
    x, y = tiny_problem(1)
    taylor = prune.taylor(model, [(x, y)])
    snip = prune.snip(model, (x, y))
    total = sum(s.sum() for s in taylor.values())
    for key in taylor:
        np.testing.assert_allclose(snip[key], taylor[key] / total, rtol=1e-12)


@pytest.mark.slow
def test_movement_scores_after_one_step_are_minus_gradient_times_initial_weight():
    no.manual_seed(2)
    model = models.mlp(6, hidden=(5,), num_classes=3)
    x, y = tiny_problem(2)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(no.Tensor(x)), y).backward()
    movement = prune.MovementScores(prune.prunable_parameters(model))
    no.fit(model, DataLoader(x, y, batch_size=len(y), shuffle=False), epochs=1, lr=0.1, momentum=0.0,
           callbacks=[movement], progress=False)
    for (module, _), ref_module in zip(movement.parameters, [reference[1], reference[3]], strict=True):
        expected = -ref_module.weight.grad.astype(np.float64) * ref_module.weight.data
        np.testing.assert_allclose(movement.scores_[(module, "weight")], expected, rtol=1e-5, atol=1e-9)


@SETTINGS
@given(st.integers(2, 6), st.integers(1, 5), st.integers(0, 2**31))
def test_fpgm_matches_a_loop_reference(filters, size, seed):
    layer = nn.Linear(size, filters)
    layer.weight.data[...] = np.random.default_rng(seed).standard_normal((filters, size))
    scores = prune.fpgm(layer)
    w = layer.weight.data.astype(np.float64)
    for i in range(filters):
        expected = sum(np.sqrt(((w[i] - w[j]) ** 2).sum()) for j in range(filters))
        assert np.allclose(scores[i], expected)


def test_bn_scale_and_its_l1_penalty_gradient():
    model = models.small_resnet(widths=(4,))
    bn = model.stem[1]
    bn.weight.data[...] = [0.5, -1.0, 2.0, -0.1]
    np.testing.assert_allclose(prune.bn_scale(model.stem[0], bn)[:, 0, 0, 0], [0.5, 1.0, 2.0, 0.1])
    prune.bn_l1_penalty(model, 0.01).backward()
    np.testing.assert_allclose(bn.weight.grad, 0.01 * np.sign(bn.weight.data))
    with pytest.raises(ValueError, match="output channels"):
        prune.bn_scale(model.fc, bn)


# ----------------------------------------------------------------- schedules
@SETTINGS
@given(st.floats(0, 1), st.floats(0, 1), st.sampled_from(["global", "layer"]))
def test_prune_to_sparsity_is_exact_and_never_relaxes(first, second, scope):
    model = models.mlp(7, hidden=(5, 4), num_classes=3)
    params = prune.prunable_parameters(model)
    sizes = [prune.masks.get_parameter(*key).size for key in params]
    prune.prune_to_sparsity(params, first, scope)
    zeros = lambda: [int((prune.get_mask(*key) == 0).sum()) for key in params]   # noqa: E731
    if scope == "global":
        assert sum(zeros()) == round(first * sum(sizes))
    else:
        assert zeros() == [round(first * s) for s in sizes]
    before = zeros()
    prune.prune_to_sparsity(params, second, scope)
    if scope == "global":
        assert sum(zeros()) == max(sum(before), round(second * sum(sizes)))
    else:
        assert zeros() == [max(b, round(second * s)) for b, s in zip(before, sizes, strict=True)]


@pytest.mark.slow
@SETTINGS
@given(st.floats(0, 0.5), st.floats(0.5, 0.99), st.integers(0, 3), st.integers(1, 3), st.integers(1, 4))
def test_gradual_pruning_follows_the_cubic_schedule_exactly(initial, final, begin, frequency, steps):
    no.manual_seed(0)
    model = models.mlp(6, hidden=(8,), num_classes=3)
    params = prune.prunable_parameters(model)
    x, y = tiny_problem(3, n=40)
    schedule = prune.GradualPruning(params, initial, final, begin, frequency, steps)
    total = sum(prune.masks.get_parameter(*key).size for key in params)
    seen = []

    class Check(no.train.Callback):
        def on_step_end(self, step, model, loss):
            seen.append((step, sum(int((prune.get_mask(*key) == 0).sum()) for key in params)))

    no.fit(model, (x, y), epochs=1, batch_size=2, callbacks=[schedule, Check()], progress=False)   # 20 steps
    expected_targets = [prune.cubic_sparsity(begin + k * frequency, initial, final, begin, frequency, steps)
                        for k in range(steps + 1) if begin + k * frequency < 20]
    assert schedule.history_ == pytest.approx(expected_targets)
    for step, zeros in seen:
        applied = [t for k, t in enumerate(expected_targets) if begin + k * frequency <= step]
        assert zeros == (round(max(applied) * total) if applied else 0)
    if begin + steps * frequency < 20:
        assert zeros == round(final * total)


def test_cubic_sparsity_formula():
    for t in range(0, 50, 5):
        progress = min(t, 40) / 40
        assert prune.cubic_sparsity(t, 0.1, 0.9, 0, 10, 4) == pytest.approx(0.9 - 0.8 * (1 - progress) ** 3)


@pytest.mark.slow
def test_iterative_and_one_shot():
    no.manual_seed(0)
    x, y = tiny_problem(4, n=32)
    model = models.mlp(6, hidden=(8,), num_classes=3)
    histories = prune.iterative(model, (x, y), [0.5, 0.75, 0.9], epochs_per_step=1, progress=False)
    assert len(histories) == 3
    assert prune.mask_sparsity(prune.prunable_parameters(model)) == pytest.approx(0.9, abs=1 / 80)
    with pytest.raises(ValueError, match="must not decrease"):
        prune.iterative(model, (x, y), [0.9, 0.5])
    with pytest.raises(ValueError, match="fraction"):
        prune.one_shot(model, 1.5)


@pytest.mark.slow
def test_lottery_ticket_rewinds_survivors_to_the_early_weights():
    no.manual_seed(0)
    x, y = tiny_problem(5, n=32)
    model = models.mlp(6, hidden=(8,), num_classes=3)
    params = prune.prunable_parameters(model)
    result = prune.lottery_ticket(model, DataLoader(x, y, batch_size=8, seed=0), rounds=3, amount_per_round=0.4,
                                  epochs=1, rewind_step=1, progress=False, lr=0.1)
    total = remaining = 8 * 6 + 3 * 8
    expected = []
    for _ in range(3):                                    # each round prunes round(0.4 * survivors)
        remaining -= round(0.4 * remaining)
        expected.append(total - remaining)
    assert [round(s * total) for s in result.sparsities] == expected
    assert len(result.histories) == 4 and len(result.sparsities) == 3
    assert set(result.rewind_state) == set(model.state_dict())
    for module, name in params:
        mask = prune.get_mask(module, name)
        assert np.all(module.weight.data[mask == 0] == 0)


@pytest.mark.slow
def test_lottery_ticket_rewind_restores_the_snapshot_before_retraining():
    no.manual_seed(0)
    x, y = tiny_problem(6, n=16)
    model = models.mlp(6, hidden=(8,), num_classes=3)
    seen = {}

    class Spy(no.train.Callback):
        def on_train_begin(self, model, optimizer):
            seen.setdefault("starts", []).append(copy.deepcopy(model.state_dict()))

    result = prune.lottery_ticket(model, (x, y), rounds=1, amount_per_round=0.5, epochs=1, rewind_step=-1,
                                  callbacks=[Spy()], progress=False)
    first, second = seen["starts"]
    for key, value in first.items():
        if key.endswith("_mask"):
            continue
        np.testing.assert_array_equal(second[key], value)                   # rewound to the initialisation
    assert result.sparsities == [0.5]


# ----------------------------------------------------------------- analysis and sparse inference
def test_sparsity_report_and_sensitivity_leave_the_model_unchanged():
    no.manual_seed(0)
    model = models.tiny_mlp()
    prune.ln_structured(model[1], "weight", amount=4, n=1, dim=0)
    report = {row.name: row for row in prune.sparsity_report(model)}
    assert report["1.weight"].zeros == 4 * 64 and report["1.weight"].empty_rows == 4
    assert report["3.weight"].zeros == 0
    state = copy.deepcopy(model.state_dict())
    test = data.load_digits("test")
    result = prune.layer_sensitivity(model, test, amounts=(0.5, 1.0))
    # with layer 3's weight all zero its logits are its bias for every image: one class, argmax of the bias
    constant_class = int(np.argmax(model[3].bias.data))
    assert result["3"][1.0] == pytest.approx(np.mean(test[1] == constant_class), rel=0, abs=1e-12)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    assert "| 1 |" in prune.format_sensitivity(result)
    with pytest.raises(ValueError, match="not a layer"):
        prune.layer_sensitivity(model, test, layers=["nope"])


@pytest.mark.parametrize("format_", ["csr", "nm"])
def test_to_sparse_keeps_outputs_and_is_inference_only(format_):
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    for key in prune.prunable_parameters(model):
        if format_ == "nm":
            prune.nm_sparsity(*key, n=2, m=4)
        else:
            prune.l1_unstructured(*key, amount=0.9)
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    expected = predict(model, x)
    replaced = prune.to_sparse(model, format=format_, min_sparsity=0.5)
    assert replaced == ["1", "3", "5"]
    np.testing.assert_allclose(predict(model, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference only"):
        model(no.Tensor(x, requires_grad=True))
