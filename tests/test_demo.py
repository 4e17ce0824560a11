"""``nanoopt demo``'s options: the combined-recipe row, ``--dataset fashion-mnist`` and ``--model gpt`` (argument
errors and a missing dataset are fast; the full runs train and are marked slow)."""

import pytest

from nanoopt import cli, data
from nanoopt.data import fashion_mnist
from nanoopt.demo import combined_recipe, demo_data


def test_gpt_options_are_checked(capsys):
    for argv, message in ((["demo", "--model", "gpt", "--iters", "0"], "--iters must be >= 1"),
                          (["demo", "--model", "gpt", "--dataset", "fashion-mnist"], "--dataset and --epochs are for"),
                          (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
                          (["demo", "--dataset", "mnist"], "invalid choice: 'mnist'")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    assert cli.main(["demo", "--dataset", "fashion-mnist"]) == 2
    error = capsys.readouterr().err
    assert "Fashion-MNIST train split not found" in error and "apt-get install dataset-fashion-mnist" in error


def test_the_combined_recipe_is_prune_kd_qat_convert_save():
    table = combined_recipe(demo_data("digits"), "float.npz")
    steps = table["steps"]
    assert [step["kind"] for step in steps] == ["prune", "qat", "convert", "save"]
    assert steps[0]["distill"] and steps[1]["distill"] and steps[1]["bits"] == 4 and steps[-1]["format"] == "compact"


@pytest.mark.slow
def test_digits_demo_has_the_recipe_row_and_quiet_progress(capsys):
    assert cli.main(["demo", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "| LeNet-300-100 recipe: prune 90% + KD -> W4A8 QAT -> convert -> .nnz |" in captured.out
    assert "smaller than the float .npz" in captured.out
    assert "epoch" not in captured.err and "it/s" not in captured.err   # not a terminal: no progress bars


@pytest.mark.slow
def test_gpt_demo_prints_validation_loss(capsys):
    assert cli.main(["demo", "--model", "gpt", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "| model | validation loss | parameters | size | sparsity | tokens/s | note |" in out
    for name in ("| GPT float32 |", "| GPTQ W4 (groups of 32) |", "| SmoothQuant W8A8 |", "| SparseGPT 50% |",
                 "of 8 heads removed |"):
        assert name in out


@pytest.mark.slow
@pytest.mark.skipif(not data.fashion_mnist_available(), reason="Fashion-MNIST is not installed (Debian package "
                    "dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)")
def test_fashion_mnist_demo_runs(capsys):
    assert cli.main(["demo", "--dataset", "fashion-mnist", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "Fashion-MNIST 28x28 (60,000 train / 10,000 test images)" in out and "LeNet-5 (28x28) float32" in out
