"""Plots from a report: every PNG is written and is a real image; the Pareto front is right."""

import json

import pytest

from nanoopt.pipeline.recipe import Recipe

pytest.importorskip("matplotlib", reason="plots are the optional extra 'plot' (pip install 'nanoopt[plot]')")

from nanoopt.pipeline.plot import pareto_front, plot_report  # noqa: E402


def test_pareto_front():
    points = [(100, 0.90), (50, 0.91), (20, 0.80), (20, 0.85), (500, 0.95), (400, 0.90)]
    assert pareto_front(points) == [3, 1, 4]


@pytest.mark.slow
def test_plots_from_a_recipe_report_and_a_sweep_table(tmp_path):
    from nanoopt.pipeline import run_recipe

    recipe = Recipe.from_dict({"name": "plots", "model": {"architecture": "lenet_300_100", "args": {"in_features": 64}},
                               "data": {"dataset": "digits", "train_limit": 256},
                               "run": {"reference": False, "latency_repeats": 1, "large_batch": 8},
                               "steps": [{"kind": "train", "epochs": 1},
                                         {"kind": "prune", "sparsity": 0.5, "schedule": "one_shot"},
                                         {"kind": "qat", "bits": 4, "epochs": 1}, {"kind": "convert"},
                                         {"kind": "save"}]})
    result = run_recipe(recipe, output=tmp_path)
    paths = plot_report(result["files"]["report_json"], tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["histograms.png", "sensitivity.png", "size_accuracy.png", "sparsity.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    table = tmp_path / "sweep.json"
    table.write_text(json.dumps([{"bits": 4, "sparsity": 0.5, "distill": False, "accuracy": 0.9, "stored_bytes": 10},
                                 {"bits": 8, "sparsity": 0.0, "distill": True, "accuracy": 0.95, "stored_bytes": 40}]))
    assert [p.name for p in plot_report(table)] == ["size_accuracy.png"]


def test_not_a_report_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a nanoopt report"):
        plot_report(path)


def test_plot_command_names_a_missing_or_bad_file(tmp_path, capsys):
    from nanoopt.cli import main

    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["plot", str(tmp_path / "bad.json")]) == 2
    assert "not a JSON report" in capsys.readouterr().err
