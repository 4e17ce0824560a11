"""The one-shot steps (GPTQ, AWQ, RTN, SmoothQuant, W8A8, Wanda, SparseGPT, heads, blocks), train_lm and ONNX
export in recipes: checked before any work (wrong values, the wrong kind of model, impossible orders, a missing
extra), and run on a small GPT over Shakespeare (no training: the steps are one-shot) with the saved file loading
back to bit-identical logits and the report giving validation loss."""

import importlib.util
import json

import numpy as np
import pytest

from nanoopt import data
from nanoopt.pipeline import Recipe, RecipeError, load_model, run_recipe
from nanoopt.pipeline import runner as runner_module

GPT = {"architecture": "gpt", "args": {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}}
TEXT = {"dataset": "shakespeare", "train_limit": 20_000, "validation_windows": 8}
RUN = {"latency_repeats": 1, "large_batch": 4}


def gpt_recipe(steps, model=None, data_table=None):
    return {"model": model or GPT, "data": data_table or TEXT, "run": RUN, "steps": steps}


@pytest.mark.parametrize("steps, message", [
    ([{"kind": "gptq", "bits": 9}], r"steps\[0\] \(gptq\): bits must be in \[2, 8\], got 9"),
    ([{"kind": "train_lm", "iters": 0}], r"steps\[0\] \(train_lm\): iters must be >= 1, got 0"),
    ([{"kind": "gptq", "percdamp": 1.0}], r"percdamp must be in \[0, 1\)"),
    ([{"kind": "wanda", "sparsity": 0.5, "n": 2, "m": 4}], r"steps\[0\] \(wanda\): give sparsity, or n and m"),
    ([{"kind": "sparsegpt"}], r"give sparsity, or n and m"),
    ([{"kind": "sparsegpt", "n": 4, "m": 4}], r"N:M needs 0 < n < m"),
    ([{"kind": "smooth_quant", "alpha": 1.5}], r"steps\[0\] \(smooth_quant\): alpha must be in \[0, 1\]"),
    ([{"kind": "heads", "amount": 1.0}], r"steps\[0\] \(heads\): amount must be in \(0, 1\)"),
    ([{"kind": "w8a8", "calibration": 0}], r"calibration must be >= 1"),
    ([{"kind": "gptq", "ignore": "lm_head"}], r"steps\[0\] \(gptq\)\.ignore: expected list or nothing"),
    ([{"kind": "qat"}, {"kind": "convert"}], r"steps\[0\] \(qat\): runs on an image classifier, not on a language "
                                             r"model"),
    ([{"kind": "export"}], r"steps\[0\] \(export\): runs on an image classifier"),
    ([{"kind": "gptq"}, {"kind": "smooth_quant"}], r"steps\[1\] \(smooth_quant\): cannot run on an integer model"),
    ([{"kind": "gptq"}, {"kind": "train_lm"}], r"steps\[1\] \(train_lm\): cannot run on an integer model"),
    ([{"kind": "smooth_quant"}, {"kind": "train_lm"}], r"steps\[1\] \(train_lm\): train_lm comes before compression"),
    ([{"kind": "heads"}, {"kind": "w8a8"}], r"steps\[1\] \(w8a8\): cannot follow heads"),
    ([{"kind": "w8a8"}, {"kind": "gptq"}], r"steps\[1\] \(gptq\): cannot run on an integer model"),
])
def test_gpt_steps_are_checked_by_name(steps, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(gpt_recipe(steps))


def test_keep_float_lets_w8a8_follow_gptq():
    recipe = Recipe.from_dict(gpt_recipe([{"kind": "gptq", "keep_float": True}, {"kind": "smooth_quant"},
                                          {"kind": "w8a8"}, {"kind": "save"}]))
    assert [step.kind for step in recipe.steps] == ["gptq", "smooth_quant", "w8a8", "save"]


@pytest.mark.parametrize("model, data_table, message", [
    ({"architecture": "tiny_mlp"}, TEXT, r"model.architecture: 'tiny_mlp' does not fit data.dataset = 'shakespeare'"),
    (GPT, {"dataset": "digits"}, r"model.architecture: 'gpt' does not fit data.dataset = 'digits'"),
    ({"architecture": "gpt", "args": {"block_size": 16}}, TEXT, r"model: args: gpt needs the argument 'n_layer'"),
    ({"architecture": "gpt", "args": {**GPT["args"], "vocab_size": 65}}, TEXT,
     r"model.args.vocab_size: the Shakespeare text has 84 distinct characters, got 65"),
    (GPT, {**TEXT, "validation_windows": 0}, r"data: validation_windows must be >= 1"),
])
def test_model_and_data_must_fit(model, data_table, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(gpt_recipe([{"kind": "save"}], model, data_table))


def test_classifier_steps_refuse_the_gpt_and_gpt_steps_refuse_classifiers():
    table = {"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits"}, "steps": [{"kind": "w8a8"}]}
    with pytest.raises(RecipeError, match=r"steps\[0\] \(w8a8\): runs on a language model .*, not on an image "
                                          r"classifier"):
        Recipe.from_dict(table)


def test_export_without_onnx_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    table = {"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits"},
             "steps": [{"kind": "export"}, {"kind": "save"}]}
    with pytest.raises(RecipeError, match=r"steps\[0\] \(export\): needs the optional extra 'onnx' .*"
                                          r"pip install 'nanoopt\[onnx\]'"):
        Recipe.from_dict(table)


def test_gpt_errors_come_before_any_work(monkeypatch):
    monkeypatch.setattr(runner_module, "load_data", lambda *a: pytest.fail("work started"))
    with pytest.raises(RecipeError):
        Recipe.from_dict(gpt_recipe([{"kind": "heads"}, {"kind": "w8a8"}, {"kind": "save"}]))


def logits(model, seed=1):
    ids = np.random.default_rng(seed).integers(0, 84, size=(3, 16))
    return model(ids).data


def run_gpt(tmp_path, steps):
    return run_recipe(Recipe.from_dict(gpt_recipe(steps)), output=tmp_path)


def test_gptq_smoothquant_w8a8_runs_and_loads_back(tmp_path):
    result = run_gpt(tmp_path, [{"kind": "gptq", "bits": 4, "group_size": 16, "calibration": 16, "keep_float": True},
                                {"kind": "smooth_quant", "calibration": 16}, {"kind": "w8a8", "calibration": 16},
                                {"kind": "save"}])
    assert type(result["model"]).__name__ == "W8A8GPT"
    assert np.array_equal(logits(load_model(result["files"]["model"])), logits(result["model"]))
    saved = json.loads(open(result["files"]["report_json"]).read())
    base, compressed = saved["baseline"], saved["compressed"]
    assert base["accuracy"] is None and compressed["accuracy"] is None
    assert 0 < base["val_loss"] < 10 and abs(compressed["val_loss"] - base["val_loss"]) < 0.5
    assert all("val_loss" in entry for entry in saved["steps"][:-1])
    assert compressed["stored_bytes"] == (tmp_path / "model.nnz").stat().st_size < base["stored_bytes"]
    markdown = open(result["files"]["report_md"]).read()
    assert "| model | validation loss | change |" in markdown and "validation loss after" in markdown
    if importlib.util.find_spec("matplotlib") is not None:   # the extra "plot": loss against size
        from nanoopt.pipeline.plot import plot_report

        names = sorted(path.name for path in plot_report(result["files"]["report_json"], tmp_path / "plots"))
        assert names == ["size_accuracy.png", "sparsity.png"]


@pytest.mark.parametrize("steps, layer_kind", [
    ([{"kind": "sparsegpt", "sparsity": 0.5, "calibration": 16},
      {"kind": "gptq", "group_size": 16, "calibration": 16}], "WeightOnlyLinear"),
    ([{"kind": "wanda", "n": 2, "m": 4, "calibration": 16}, {"kind": "rtn", "bits": 3, "group_size": 16}],
     "WeightOnlyLinear"),
    ([{"kind": "heads", "amount": 0.5, "calibration": 8}, {"kind": "blocks", "count": 1, "calibration": 4},
      {"kind": "awq", "group_size": 16, "calibration": 8}], "InputScaled"),
])
def test_one_shot_gpt_recipes_load_back_bit_identical(tmp_path, steps, layer_kind):
    result = run_gpt(tmp_path, [*steps, {"kind": "save"}])
    model = result["model"]
    assert any(type(module).__name__ == layer_kind for module in model.modules())
    restored = load_model(result["files"]["model"])
    assert np.array_equal(logits(restored), logits(model))
    if steps[0]["kind"] == "heads":
        assert len(model.transformer["h"]) == 1 and model.transformer["h"][0].attn.n_head == 1
        assert len(restored.transformer["h"]) == 1
    if steps[0]["kind"] in ("sparsegpt", "wanda"):
        assert result["compressed"]["sparsity"] > 0.3


def test_one_shot_steps_run_on_a_classifier(tmp_path):
    table = {"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits", "train_limit": 128},
             "run": {"reference": False, **RUN},
             "steps": [{"kind": "sparsegpt", "sparsity": 0.5, "calibration": 64},
                       {"kind": "gptq", "bits": 4, "group_size": 16, "calibration": 64}, {"kind": "save"}]}
    result = run_recipe(Recipe.from_dict(table), output=tmp_path)
    images = data.load_digits("test")[0][:32]
    assert np.array_equal(load_model(result["files"]["model"])(images).data, result["model"](images).data)
    assert 0 < result["compressed"]["accuracy"] <= 1 and result["compressed"]["val_loss"] is None


def test_export_step_writes_onnx(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the export step needs the optional extra onnx")
    table = {"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits", "train_limit": 128},
             "run": {"reference": False, **RUN},
             "steps": [{"kind": "ptq", "calibration": 64}, {"kind": "export", "name": "int8"}, {"kind": "save"}]}
    result = run_recipe(Recipe.from_dict(table), output=tmp_path)
    assert result["files"]["onnx"] == str(tmp_path / "int8.onnx")
    proto = onnx.load(result["files"]["onnx"])
    assert "QuantizeLinear" in {node.op_type for node in proto.graph.node}
