"""Module tree: PyTorch state_dict names and in-place round trip, strict loading errors, hooks, dotted submodules.

Key names and order follow PyTorch's ``state_dict``: a module's parameters, then its persistent buffers, then each
child's entries under ``"<child name>."``; BatchNorm contributes ``running_mean``, ``running_var`` and
``num_batches_tracked``.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn

FEW = settings(max_examples=25, deadline=None)


def mlp(widths, batch_norm=True):
    """Linear (+ BatchNorm1d) + ReLU stack, as a Sequential: keys '0.weight', '1.running_mean', ..."""
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.BatchNorm1d(fan_out)] if batch_norm else []) + [nn.ReLU()]
    return nn.Sequential(*layers)


def train_a_little(model, width):
    """One forward in training mode, so that BatchNorm's running statistics move away from (0, 1)."""
    model.train()
    model(no.Tensor(np.random.default_rng(5).standard_normal((6, width)).astype(np.float32)))


def snapshot(model):
    return {key: value.copy() for key, value in model.state_dict().items()}


# ===================================================================== names
def test_sequential_keys_follow_pytorch():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight"]


def test_basic_block_keys_follow_pytorch_order_with_buffers_and_shortcut():
    keys = list(models.BasicBlock(2, 4, stride=2).state_dict())
    batch_norm = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert keys == (["conv1.weight"] + [f"bn1.{k}" for k in batch_norm] + ["conv2.weight"]
                    + [f"bn2.{k}" for k in batch_norm] + ["shortcut.0.weight"]
                    + [f"shortcut.1.{k}" for k in batch_norm])
    assert "shortcut.0.weight" not in models.BasicBlock(4, 4).state_dict()  # identity shortcut: nothing to save


def test_num_batches_tracked_is_an_int64_scalar():
    state = nn.BatchNorm2d(3).state_dict()
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].shape == ()


def test_named_traversals_use_dotted_names():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    assert [name for name, _ in model.named_modules()] == ["", "0", "1", "1.0", "1.1"]
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.0.weight", "1.0.bias"]
    assert [name for name, _ in model.named_buffers()] == ["1.0.running_mean", "1.0.running_var",
                                                           "1.0.num_batches_tracked"]
    assert [type(m).__name__ for m in model.children()] == ["Linear", "Sequential"]
    assert model.num_parameters() == 2 * 3 + 3 + 3 + 3


def test_state_dict_values_are_copies():
    model = nn.Linear(2, 2)
    model.state_dict()["weight"][...] = 99
    assert not np.any(model.weight.data == 99)


def test_non_persistent_buffers_stay_out_of_state_dict():
    module = nn.Linear(2, 2)
    module.register_buffer("mask", np.ones((2, 2), dtype=np.float32), persistent=False)
    module.register_buffer("scale", np.ones(1, dtype=np.float32))
    assert list(module.state_dict()) == ["weight", "bias", "scale"]
    assert [name for name, _ in module.named_buffers()] == ["mask", "scale"]


def test_a_shared_parameter_is_listed_once():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    assert len(list(model.parameters())) == 3
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_reassigning_an_attribute_moves_it_between_tables():
    module = nn.Linear(2, 2)
    module.bias = None  # an absent optional parameter, as PyTorch
    assert list(module.state_dict()) == ["weight"]
    module.weight = nn.Identity()
    assert "weight" in dict(module.named_children()) and list(module.state_dict()) == []


def test_forgetting_super_init_is_reported():
    class Broken(nn.Module):
        def __init__(self):
            self.layer = nn.Linear(1, 1)

    with pytest.raises(RuntimeError, match=r"super\(\).__init__\(\)"):
        Broken()


# ===================================================================== round trip
@FEW
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4), st.booleans(), st.integers(0, 1000))
def test_state_dict_round_trip_is_exact_and_in_place(widths, batch_norm, seed):
    no.manual_seed(seed)
    source = mlp(widths, batch_norm)
    train_a_little(source, widths[0])
    no.manual_seed(seed + 1)
    target = mlp(widths, batch_norm)
    parameters_before = [(p, p.data) for p in target.parameters()]
    buffers_before = list(target.buffers())

    assert target.load_state_dict(source.state_dict()) == ([], [])

    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value, err_msg=key)
        assert target.state_dict()[key].dtype == value.dtype
    assert all(p is q and p.data is data for (p, data), q in zip(parameters_before, target.parameters(), strict=True))
    assert all(a is b for a, b in zip(buffers_before, target.buffers(), strict=True))
    x = no.Tensor(np.random.default_rng(seed).standard_normal((3, widths[0])).astype(np.float32))
    np.testing.assert_array_equal(source.eval()(x).data, target.eval()(x).data)


def test_load_accepts_tensors_and_casts_float64_to_the_parameter_dtype():
    model = nn.Linear(2, 1)
    model.load_state_dict({"weight": no.Tensor(np.array([[1.0, 2.0]])), "bias": np.array([0.5])})
    assert model.weight.dtype == np.float32 and model.weight.data.tolist() == [[1.0, 2.0]]


def test_a_module_shared_under_two_names_round_trips():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert model.load_state_dict(model.state_dict()) == ([], [])


# ===================================================================== strict loading and refusals
def test_strict_load_names_missing_and_unexpected_keys():
    model = mlp([3, 2])
    state = model.state_dict()
    del state["1.running_var"]
    state["1.running_average"] = np.zeros(2, dtype=np.float32)
    before = snapshot(model)
    with pytest.raises(KeyError, match=r"missing keys \['1.running_var'\].*unexpected keys \['1.running_average'\]"):
        model.load_state_dict({k: v + 1 if v.dtype.kind == "f" else v for k, v in state.items()})
    for key, value in before.items():
        np.testing.assert_array_equal(model.state_dict()[key], value)


def test_non_strict_load_reports_and_loads_the_rest():
    model = nn.Linear(2, 2)
    missing, unexpected = model.load_state_dict({"weight": np.ones((2, 2)), "extra": np.ones(1)}, strict=False)
    assert missing == ["bias"] and unexpected == ["extra"]
    assert model.weight.data.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_shape_mismatch_names_the_key_and_both_shapes_and_changes_nothing():
    model = mlp([3, 4, 2])
    before = snapshot(model)
    state = {k: (v + 1 if v.dtype.kind == "f" else v) for k, v in model.state_dict().items()}
    state["3.weight"] = np.zeros((2, 5), dtype=np.float32)  # '0.*' come first and would fit
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(2, 5\) in the checkpoint but \(2, 4\) in the model"):
        model.load_state_dict(state)
    for key, value in before.items():
        np.testing.assert_array_equal(model.state_dict()[key], value, err_msg=key)


def test_non_finite_and_non_numeric_values_are_refused():
    model = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="'bias' contains NaN"):
        model.load_state_dict({"weight": np.ones((1, 1)), "bias": np.array([np.nan])})
    with pytest.raises(TypeError, match="'weight' has non-numeric dtype"):
        model.load_state_dict({"weight": np.array([["a"]]), "bias": np.zeros(1)})


# ===================================================================== hooks
def test_forward_hook_sees_inputs_and_output_and_can_replace_the_output():
    layer, seen = nn.Linear(2, 2), []
    x = no.Tensor(np.ones((1, 2), dtype=np.float32))
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append((module, inputs, output)))
    replace = layer.register_forward_hook(lambda module, inputs, output: output * 0 + 7)
    out = layer(x)
    assert seen[0][0] is layer and seen[0][1][0] is x and seen[0][2].shape == (1, 2)
    assert out.data.tolist() == [[7.0, 7.0]]
    handle.remove()
    replace.remove()
    replace.remove()  # idempotent
    assert layer(x).data.tolist() != [[7.0, 7.0]] and len(seen) == 1


def test_forward_hooks_run_in_registration_order_each_seeing_the_last_output():
    layer = nn.Identity()
    layer.register_forward_hook(lambda m, i, o: o + 1)
    layer.register_forward_hook(lambda m, i, o: o * 10)
    assert layer(no.Tensor([1.0])).data.tolist() == [20.0]


def test_forward_pre_hook_can_replace_the_input():
    layer = nn.Identity()
    with layer.register_forward_pre_hook(lambda module, inputs: inputs[0] * 2):  # a single value is wrapped
        assert layer(no.Tensor([3.0])).data.tolist() == [6.0]
    assert layer(no.Tensor([3.0])).data.tolist() == [3.0]  # the context manager removed it
    add = nn.Add()
    add.register_forward_pre_hook(lambda module, inputs: (inputs[1], inputs[1]))  # a tuple replaces all
    assert add(no.Tensor([1.0]), no.Tensor([5.0])).data.tolist() == [10.0]


def test_hooks_on_children_fire_inside_a_model_and_gradients_flow_through_replacements():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    captured = {}

    def record(name):
        def hook(module, inputs, output):
            captured[name] = output.shape  # returns None: the output is left as it is
        return hook

    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(record(name))
    model[0].register_forward_hook(lambda m, i, o: o * 0)
    out = model(no.Tensor(np.ones((4, 2), dtype=np.float32)))
    assert captured == {"0": (4, 3), "1": (4, 3), "2": (4, 1)}
    out.sum().backward()
    assert not np.any(model[0].weight.grad)  # the replaced output (times 0) carries the gradient


# ===================================================================== dotted submodules and modes
def test_get_and_set_submodule_by_dotted_name():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert model.get_submodule("1.1") is model[1][1] and model.get_submodule("") is model
    replacement = nn.Identity()
    model.set_submodule("1.0", replacement)
    assert model.get_submodule("1.0") is replacement and model[1][0] is replacement
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    x = no.Tensor(np.ones((1, 2), dtype=np.float32))
    np.testing.assert_array_equal(model(x).data, np.maximum(model[0](x).data, 0))


def test_dotted_names_that_do_not_exist_are_reported():
    model = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(AttributeError, match=r"no submodule '5'.*children: \['0'\]"):
        model.get_submodule("5.weight")
    with pytest.raises(AttributeError, match="no submodule 'x' to replace"):
        model.set_submodule("x", nn.ReLU())
    with pytest.raises(TypeError, match="expected a Module"):
        model.set_submodule("0", np.zeros(1))


def test_train_and_eval_reach_every_descendant():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(2)))
    assert model.eval() is model
    assert all(not m.training for m in model.modules())
    assert model.train() is model and all(m.training for m in model.modules())
    model[1].eval()
    assert model.training and model[0].training and not model[1][0].training and not model[1][1].training


def test_requires_grad_freezes_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    out = model(no.Tensor(np.ones((1, 2), dtype=np.float32)))
    assert not out.requires_grad
