"""Recipe checking: unknown keys, wrong types, out-of-range values, missing files and impossible orders are
refused before any work starts, naming the key or the step."""

import json

import pytest

from nanoopt.pipeline import Recipe, RecipeError
from nanoopt.pipeline import runner as runner_module


def recipe(steps, **top):
    table = {"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits"}, "steps": steps}
    table.update(top)
    return table


GOOD = [{"kind": "prune", "sparsity": 0.5, "epochs": 1}, {"kind": "qat", "bits": 4, "epochs": 1},
        {"kind": "convert"}, {"kind": "save"}]


def test_a_good_recipe_is_accepted():
    assert [s.kind for s in Recipe.from_dict(recipe(GOOD)).steps] == ["prune", "qat", "convert", "save"]


@pytest.mark.parametrize("table, message", [
    (recipe(GOOD, colour="red"), "recipe: unknown key 'colour'"),
    (recipe(GOOD, run={"sed": 1}), "run: unknown key 'sed'"),
    (recipe([{"kind": "prune", "sparsity": 0.5, "epoch": 2}]), r"steps\[0\] \(prune\): unknown key 'epoch'"),
    (recipe([{"kind": "prnue"}]), r"steps\[0\]: unknown step kind 'prnue'"),
    ({"data": {"dataset": "digits"}, "steps": GOOD}, "recipe: missing required key 'model'"),
    (recipe([{"kind": "prune"}]), r"steps\[0\] \(prune\): missing required key 'sparsity'"),
    ({"model": {"architecture": "tiny_mlp", "args": {"widht": 3}}, "steps": GOOD}, "takes no argument 'widht'"),
    ({"model": {"architecture": "resnet900"}, "steps": GOOD}, "architecture: unknown 'resnet900'"),
])
def test_unknown_and_missing_keys_are_named(table, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(table)


@pytest.mark.parametrize("table, message", [
    (recipe([{"kind": "prune", "sparsity": "high"}]), r"steps\[0\] \(prune\).sparsity: expected float, got str"),
    (recipe([{"kind": "qat", "bits": 4.5}, {"kind": "convert"}]), r"steps\[0\] \(qat\).bits: expected int"),
    (recipe([{"kind": "qat", "bits": True}, {"kind": "convert"}]), r"\(qat\).bits: expected int, got bool"),
    (recipe([{"kind": "prune", "sparsity": 0.5, "schedule": "cubic"}]), r"schedule: expected one of 'gradual'"),
    (recipe(GOOD, run={"seed": "0"}), "run.seed: expected int, got str"),
    (recipe(GOOD, data={"dataset": 3}), "data.dataset: expected one of"),
    (recipe("prune"), "recipe.steps: expected a non-empty list"),
])
def test_wrong_types_are_named(table, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(table)


@pytest.mark.parametrize("table, message", [
    (recipe([{"kind": "prune", "sparsity": 1.5, "schedule": "one_shot"}]), r"\(prune\): sparsity must be in"),
    (recipe([{"kind": "prune", "sparsity": 0.5}]), r"\(prune\): a gradual schedule prunes while training"),
    (recipe([{"kind": "qat", "bits": 1}, {"kind": "convert"}]), r"\(qat\): bits must be in \[2, 8\]"),
    (recipe(GOOD, run={"batch_size": 0}), "run: batch_size must be >= 1"),
])
def test_values_out_of_range_are_named(table, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(table)


@pytest.mark.parametrize("steps, message", [
    (GOOD[:3] + [{"kind": "qat"}, {"kind": "convert"}], r"steps\[3\] \(qat\): cannot run on an integer model "
                                                         r"\(after steps\[2\] \(convert\)"),
    (GOOD[1:3] + [{"kind": "prune", "sparsity": 0.5, "schedule": "one_shot"}], r"steps\[2\] \(prune\): cannot run"),
    ([{"kind": "convert"}], r"steps\[0\] \(convert\): cannot run on a float model .*needs a qat model"),
    ([{"kind": "qat"}], r"steps\[0\] \(qat\): the recipe ends with a QAT model; add a convert step"),
    ([{"kind": "save"}, {"kind": "finetune"}], r"steps\[1\] \(finetune\): cannot run on a saved model"),
    ([{"kind": "prune", "sparsity": 0.5, "schedule": "one_shot"}, {"kind": "train"}], r"steps\[1\] \(train\)"),
    ([{"kind": "weight_only"}, {"kind": "finetune"}], r"steps\[1\] \(finetune\): cannot run on an integer model"),
])
def test_impossible_orders_are_named(steps, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(recipe(steps))


def test_errors_come_before_any_work(tmp_path, monkeypatch):
    """A bad last step is refused by from_file; the runner (data loading, training) is never reached."""
    monkeypatch.setattr(runner_module, "load_data", lambda *a: pytest.fail("work started"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe(GOOD + [{"kind": "qat"}])))
    with pytest.raises(RecipeError, match=r"steps\[4\] \(qat\)"):
        Recipe.from_file(path)


def test_toml_and_json_read_the_same(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(recipe(GOOD)))
    (tmp_path / "r.toml").write_text('[model]\narchitecture = "tiny_mlp"\n[data]\ndataset = "digits"\n'
                                     '[[steps]]\nkind = "prune"\nsparsity = 0.5\nepochs = 1\n'
                                     '[[steps]]\nkind = "qat"\nbits = 4\nepochs = 1\n'
                                     '[[steps]]\nkind = "convert"\n[[steps]]\nkind = "save"\n')
    a, b = Recipe.from_file(tmp_path / "r.json"), Recipe.from_file(tmp_path / "r.toml")
    assert a.as_dict() == b.as_dict()


def test_missing_files_and_bad_syntax_are_named(tmp_path):
    with pytest.raises(RecipeError, match="model.file: .*missing.npz does not exist"):
        Recipe.from_dict({"model": {"architecture": "tiny_mlp", "file": "missing.npz"}, "steps": GOOD},
                         base=tmp_path)
    with pytest.raises(RecipeError, match="data.train_images: .* does not exist"):
        Recipe.from_dict(recipe(GOOD, data={"dataset": "idx", "train_images": "a", "train_labels": "b",
                                            "test_images": "c", "test_labels": "d"}), base=tmp_path)
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_file(tmp_path / "bad.toml")
    (tmp_path / "r.yaml").write_text("{}")
    with pytest.raises(RecipeError, match="a recipe is a .toml or .json file"):
        Recipe.from_file(tmp_path / "r.yaml")
