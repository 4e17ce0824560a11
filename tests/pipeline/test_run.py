"""Running recipes on the bundled digits: the report's sizes are the files' sizes, every saved kind loads back to
bit-identical outputs, and the size attribution multiplies up to the total ratio."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import nanoopt as no
from nanoopt import data
from nanoopt.pipeline import Recipe, load_model, run_recipe

SMALL = {"dataset": "digits", "train_limit": 256}
RUN = {"reference": False, "latency_repeats": 2, "large_batch": 32}


def run(tmp_path, steps, architecture="lenet_300_100", args=None, run_options=None):
    table = {"name": "test", "model": {"architecture": architecture, "args": args or {"in_features": 64}},
             "data": SMALL, "run": {**RUN, **(run_options or {})}, "steps": steps}
    return run_recipe(Recipe.from_dict(table), output=tmp_path)


def outputs(model):
    images = data.load_digits("test")[0][:64]
    return no.train.predict(model, images)


@pytest.mark.slow
def test_deep_compression_recipe_report_sizes_are_file_sizes_and_it_loads_bit_identically(tmp_path):
    result = run(tmp_path, [{"kind": "train", "epochs": 2},
                            {"kind": "prune", "sparsity": 0.9, "epochs": 2, "distill": True},
                            {"kind": "qat", "bits": 4, "epochs": 1, "distill": True},
                            {"kind": "convert"}, {"kind": "save", "name": "dc"}])
    files = result["files"]
    assert result["compressed"]["stored_bytes"] == os.path.getsize(files["model"])
    assert result["baseline"]["stored_bytes"] == os.path.getsize(files["float"])
    saved = json.load(open(files["report_json"]))
    assert saved["compressed"]["stored_bytes"] == os.path.getsize(files["model"])
    assert "| **total** |" in open(files["report_md"]).read()
    total = np.prod([row["factor"] for row in result["attribution"]])
    assert total == pytest.approx(result["baseline"]["stored_bytes"] / result["compressed"]["stored_bytes"])
    assert result["compressed"]["sparsity"] >= 0.89
    assert set(result["compressed"]["bits"].values()) == {4}
    loaded = load_model(files["model"])
    assert np.array_equal(outputs(loaded), outputs(result["model"]))
    assert type(loaded).__name__ == "QuantizedModel"


@pytest.mark.slow
@pytest.mark.parametrize("steps", [
    [{"kind": "prune", "sparsity": 0.7, "schedule": "one_shot", "epochs": 1}, {"kind": "save"}],
    [{"kind": "prune", "sparsity": 0.7, "schedule": "one_shot"}, {"kind": "weight_only", "bits": 3,
                                                                   "group_size": 16}, {"kind": "save"}],
    [{"kind": "prune", "sparsity": 0.8, "schedule": "one_shot"}, {"kind": "ptq", "bits": 8, "calibration": 64},
     {"kind": "save"}],
    [{"kind": "prune", "sparsity": 0.8, "schedule": "one_shot"}, {"kind": "sparse"}, {"kind": "save"}],
    [{"kind": "sparse", "format": "nm"}, {"kind": "save"}],
    [{"kind": "qat", "bits": 8, "epochs": 1, "weight_quantizer": "lsq"}, {"kind": "convert"}, {"kind": "save"}],
], ids=["pruned-float", "weight-only-3", "ptq-int8", "sparse-csr", "sparse-nm", "qat-lsq-int8"])
def test_every_saved_kind_loads_back_bit_identically(tmp_path, steps):
    result = run(tmp_path, steps)
    assert result["compressed"]["stored_bytes"] == os.path.getsize(result["files"]["model"])
    assert np.array_equal(outputs(load_model(result["files"]["model"])), outputs(result["model"]))


@pytest.mark.slow
def test_npz_format_and_a_conv_model(tmp_path):
    result = run(tmp_path, [{"kind": "prune", "sparsity": 0.5, "schedule": "one_shot"},
                            {"kind": "ptq", "bits": 4, "calibration": 64}, {"kind": "save", "format": "npz"}],
                 architecture="lenet5", args={"input_size": 8})
    assert result["files"]["model"].endswith(".npz")
    assert result["compressed"]["stored_bytes"] == os.path.getsize(result["files"]["model"])
    assert result["compressed"]["macs"] == result["baseline"]["macs"] > result["compressed"]["nonzero_macs"]


@pytest.mark.slow
def test_reference_is_trained_for_as_many_epochs(tmp_path):
    result = run(tmp_path, [{"kind": "train", "epochs": 1}, {"kind": "prune", "sparsity": 0.5, "epochs": 2},
                            {"kind": "finetune", "epochs": 1}, {"kind": "save"}], run_options={"reference": True})
    assert result["reference"]["epochs"] == 4          # from scratch: 1 float + 3 compression epochs
    result = run(tmp_path, [{"kind": "train", "epochs": 1}, {"kind": "prune", "sparsity": 0.5, "epochs": 2},
                            {"kind": "save"}], run_options={"reference": True, "reference_mode": "continue"})
    assert result["reference"]["epochs"] == 2          # the baseline, 2 more epochs


def test_compress_command_refuses_a_bad_recipe_before_work(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\narchitecture = "tiny_mlp"\n[[steps]]\nkind = "weight_only"\n[[steps]]\n'
                    'kind = "prune"\nsparsity = 0.5\nschedule = "one_shot"\n')
    done = subprocess.run([sys.executable, "-m", "nanoopt", "compress", "--recipe", str(path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 2
    assert "steps[1] (prune): cannot run on an integer model" in done.stderr
    assert not (tmp_path / "compressed").exists()


@pytest.mark.slow
def test_python_m_nanoopt_compress_writes_the_files_and_keeps_progress_bars_off_a_pipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "cli"\n[model]\narchitecture = "tiny_mlp"\n[data]\ndataset = "digits"\ntrain_limit = 128\n'
                    '[run]\noutput = "out"\nreference = false\nlatency_repeats = 1\nprogress = true\n'
                    '[[steps]]\nkind = "prune"\nsparsity = 0.5\nepochs = 1\n[[steps]]\nkind = "save"\n')
    done = subprocess.run([sys.executable, "-m", "nanoopt", "compress", "--recipe", str(path), "--progress"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert "# Compression report: cli" in done.stdout
    assert "epoch 1/1" not in done.stderr and "it/s" not in done.stderr      # stderr is a pipe: no bars
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["compressed"]["stored_bytes"] == os.path.getsize(tmp_path / "out" / "model.nnz")
