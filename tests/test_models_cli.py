"""Reference models build, run and have their published parameter counts; the demo prints its table."""

import numpy as np
import pytest

import nanoopt as no
from nanoopt import cli, models


@pytest.mark.parametrize("build, shape, parameters", [
    (lambda: models.lenet_300_100(), (2, 1, 28, 28), 266_610),
    (lambda: models.lenet5(), (2, 1, 28, 28), 61_706),
    (lambda: models.lenet5(input_size=8), (2, 1, 8, 8), None),
    (lambda: models.small_resnet(), (2, 1, 28, 28), None),
    (lambda: models.tiny_mlp(), (2, 64), None),
])
def test_models_run_and_count(build, shape, parameters):
    model = build()
    out = model(no.Tensor(np.zeros(shape, dtype=np.float32)))
    assert out.shape == (2, 10)
    if parameters is not None:
        assert model.num_parameters() == parameters


def test_resnet_has_residual_blocks_with_projection_shortcuts():
    keys = models.small_resnet(widths=(4, 8)).state_dict()
    assert "stages.1.0.shortcut.0.weight" in keys and "stages.0.0.bn1.running_var" in keys


def test_lenet5_rejects_unknown_sizes():
    with pytest.raises(ValueError, match="28 or 8"):
        models.lenet5(input_size=32)


@pytest.mark.slow
def test_demo_prints_a_measured_table(capsys):
    assert cli.main(["demo", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| LeNet-300-100 float32 |" in out and "KiB" in out
