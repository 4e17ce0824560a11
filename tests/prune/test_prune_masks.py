"""The weight_orig * weight_mask reparametrisation: gradients, training, remove, save/load."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import data, io, models, nn, optim, prune


def test_pruning_moves_the_same_parameter_object_to_weight_orig():
    layer = nn.Linear(4, 3)
    parameter = layer.weight
    prune.l1_unstructured(layer, "weight", amount=0.5)
    assert layer.weight_orig is parameter
    assert list(layer.state_dict()) == ["bias", "weight_orig", "weight_mask"]
    assert not isinstance(layer.weight, nn.Parameter)
    assert [p is parameter for p in layer.parameters()].count(True) == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.1, 0.95))
def test_masked_entries_get_exactly_zero_gradient(seed, amount):
    rng = np.random.default_rng(seed)
    layer = nn.Linear(6, 5)
    prune.l1_unstructured(layer, "weight", amount=amount)
    x = no.Tensor(rng.standard_normal((7, 6)).astype(np.float32))
    (layer(x) ** 2).sum().backward()
    mask = layer.weight_mask
    assert np.all(layer.weight_orig.grad[mask == 0] == 0)
    assert np.any(layer.weight_orig.grad[mask == 1] != 0)


@pytest.mark.slow
def test_training_with_momentum_and_weight_decay_never_revives_pruned_weights():
    no.manual_seed(0)
    x, y = data.load_digits("train")
    model = models.mlp(64, hidden=(48, 32))
    for index in (1, 3, 5):
        prune.l1_unstructured(model[index], "weight", amount=0.7)
    masks = [model[i].weight_mask.copy() for i in (1, 3, 5)]
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    before = no.evaluate(model, (x, y))["accuracy"]
    no.fit(model, (x, y), epochs=4, optimizer=optimizer, batch_size=32, progress=False)
    for index, mask in zip((1, 3, 5), masks, strict=True):
        np.testing.assert_array_equal(model[index].weight_mask, mask)
        model(no.Tensor(x[:2]))                               # refresh the effective weight
        assert np.all(model[index].weight.data[mask == 0] == 0)
    assert no.evaluate(model, (x, y))["accuracy"] > max(before + 0.3, 0.7)   # the survivors did train


def test_remove_bakes_the_mask_in_and_keeps_outputs():
    model = models.lenet_300_100(in_features=64)
    prune.l1_unstructured(model[1], "weight", amount=0.7)
    prune.l1_unstructured(model[1], "bias", amount=0.5)
    x = no.Tensor(np.random.default_rng(0).random((3, 64)).astype(np.float32))
    expected = model(x).data
    original = model[1].weight_orig
    prune.remove(model[1], "weight")
    prune.remove_all(model)
    assert model[1].weight is original and isinstance(model[1].weight, nn.Parameter)
    assert sorted(model[1].state_dict()) == ["bias", "weight"]
    assert int((model[1].weight.data == 0).sum()) == round(0.7 * 64 * 300)
    np.testing.assert_array_equal(model(x).data, expected)
    with pytest.raises(ValueError, match="not pruned"):
        prune.remove(model[1], "weight")


def test_save_and_load_of_a_pruned_model_is_lossless(tmp_path):
    no.manual_seed(1)
    model = models.lenet5(input_size=8)
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    prune.global_unstructured([(model[3], "weight"), (model[7], "weight")], amount=0.6)
    path = tmp_path / "pruned.npz"
    io.save(model, path)
    x = no.Tensor(np.random.default_rng(2).random((4, 1, 8, 8)).astype(np.float32))

    fresh = models.lenet5(input_size=8)
    prune.load_pruned_state_dict(fresh, io.load(path))
    assert sorted(fresh.state_dict()) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value)
    np.testing.assert_array_equal(fresh(x).data, model(x).data)
    # a model pruned the same way loads with the ordinary load_state_dict too
    again = copy.deepcopy(fresh)
    again.load_state_dict(io.load(path))
    np.testing.assert_array_equal(again(x).data, model(x).data)


def test_a_pruned_module_deep_copies_with_its_hook():
    layer = prune.l1_unstructured(nn.Linear(4, 4), "weight", amount=0.5)
    clone = copy.deepcopy(layer)
    assert prune.is_pruned(clone, "weight") and clone.weight_orig is not layer.weight_orig
    clone.weight_orig.data[...] = 1.0
    clone(no.Tensor(np.ones((1, 4))))
    np.testing.assert_array_equal(clone.weight.data, clone.weight_mask)


def test_plain_load_of_a_pruned_checkpoint_points_at_load_pruned_state_dict():
    source = nn.Linear(4, 3)
    prune.l1_unstructured(source, "weight", amount=0.5)
    with pytest.raises(KeyError, match="load_pruned_state_dict"):
        nn.Linear(4, 3).load_state_dict(source.state_dict())
