"""The README's code is real: every ```python block of "The main flows" runs, in order, as one script."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_the_main_flows():
    code = "\n".join(python_blocks())
    for name in ("no.fit", "prune.shrink", "quant.quantize_static", "quant.prepare_qat", "distill.Distiller"):
        assert name in code, f"README's main flows lost {name}"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the flows save a checkpoint in the working directory
    namespace: dict = {"__name__": "readme"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("\n".join(python_blocks()), str(README), "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert (tmp_path / "lenet5.npz").exists() and len(printed) >= 4
    # the QAT flow's claim: its observers were frozen in training, so convert(qat) == qat.eval() bit for bit
    messages = [str(w.message) for w in caught if "QATSchedule" in str(w.message) or "quant.convert" in str(w.message)]
    assert not messages, messages
    qat, integer_model, images = namespace["qat"], namespace["integer_model"], namespace["test"][0]
    assert np.array_equal(qat.eval()(images).data, integer_model(images).data)
    assert np.array_equal(qat.eval()(images).data, integer_model(images).data)  # evaluating changed nothing


def shown_results() -> list[tuple[str, str, str]]:
    """``(code before the line, expression, shown repr)`` for each README line ending ``expr  # array(...)``."""
    found = []
    for block in python_blocks():
        lines = block.splitlines()
        for index, line in enumerate(lines):
            code, _, comment = line.partition("#")
            comment = comment.strip()
            if comment.startswith("array("):
                *statements, expression = [part.strip() for part in code.split(";")]
                shown = comment[:comment.index(")") + 1]
                found.append(("\n".join(lines[:index] + statements), expression, shown))
    return found


def test_readme_shows_what_its_lines_print():
    """A value shown in a comment (``x.grad  # array([ 2., -4.])``) is the repr the line gives, dtype included."""
    found = shown_results()
    assert found, "the README's first flow lost its x.grad line"
    for before, expression, shown in found:
        namespace: dict = {"__name__": "readme"}
        exec(compile(before, str(README), "exec"), namespace)
        assert repr(eval(expression, namespace)) == shown, expression


def readme_statements() -> list[tuple[str, object]]:
    """The README's flows as top-level statements ``(source lines with comments, code)``, in order, one at a time."""
    import ast

    script = "\n".join(python_blocks())
    tree = ast.parse(script)
    lines = script.splitlines()
    return [("\n".join(lines[node.lineno - 1:node.end_lineno]), compile(ast.Module([node], []), str(README), "exec"))
            for node in tree.body]


@pytest.mark.slow
def test_readme_pruning_claims_hold(tmp_path, monkeypatch):
    """The pruning flow's comments are claims: after finetuning, "pruned weights stay exactly zero" (the same zeros
    as right after ``global_unstructured``), and ``shrink`` gives "physically smaller layers, same outputs" on test
    images it never saw (it was shown the first 32)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    zeros_after_pruning = None
    checked = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source, code in readme_statements():
            if source.startswith("print(prune.shrink("):
                model, unseen = namespace["model"], namespace["test"][0][32:]
                before_shrink, parameters = model.eval()(unseen).data.copy(), model.num_parameters()
            exec(code, namespace)
            if source.startswith("prune.global_unstructured("):
                zeros_after_pruning = {name: value == 0 for name, value in namespace["model"].state_dict().items()
                                       if name.endswith("weight_mask")}
            if "stay exactly zero" in source:
                model = namespace["model"]
                masks = model.state_dict()
                for name, was_zero in zeros_after_pruning.items():
                    weight = model[int(name.split(".")[0])].weight.data
                    assert np.array_equal(masks[name] == 0, was_zero), f"{name} changed in finetuning"
                    assert was_zero.any() and not weight[was_zero].any(), f"a pruned entry of {name} is not zero"
                checked.add("zeros")
            if source.startswith("print(prune.shrink("):
                after_shrink = model.eval()(unseen).data
                assert model.num_parameters() < parameters
                np.testing.assert_allclose(after_shrink, before_shrink, rtol=1e-5, atol=1e-5)
                checked.add("shrink")
    assert checked == {"zeros", "shrink"}, f"the README's pruning flow lost a claim: checked only {checked}"
