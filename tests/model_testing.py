"""Small models that the PTQ tests (``tests/quant/test_ptq.py``) and the deployment-plan tests
(``tests/runtime/test_runtime_plans.py``) both run, and BatchNorm statistics moved off their defaults.

Importable from every test folder: pytest puts ``tests/`` (the folder of ``conftest.py``) on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import nanoopt as no
from nanoopt import models, nn

# each a model and the shape of one input (without the batch axis)
_SMALL_MODELS = {
    "mlp": lambda: (models.mlp(12, (7, 5), 3), (3, 2, 2)),
    "lenet5": lambda: (models.lenet5(input_size=8), (1, 8, 8)),
    # BatchNorm, residual adds, adaptive average pool
    "resnet": lambda: (models.small_resnet(widths=(4, 8), blocks_per_stage=1, num_classes=5), (1, 8, 8)),
}


def build_model(architecture: str, seed: int, others: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]]
                ) -> tuple[nn.Module, tuple[int, ...]]:
    """A small ``"mlp"``, ``"lenet5"`` or ``"resnet"``, or one the test file builds (``others``: architecture ->
    function giving a model and its input shape), initialised from ``seed``, and the shape of one input."""
    no.manual_seed(seed)
    return {**_SMALL_MODELS, **others}[architecture]()


def randomise_batchnorms(model: nn.Module, rng: np.random.Generator) -> None:
    """Running statistics and scales of every BatchNorm2d drawn from ``rng`` (means ~ N(0, 0.3^2), variances and
    scales uniform in [0.5, 2] and [0.5, 1.5])."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean[...] = rng.normal(scale=0.3, size=module.num_features)
            module.running_var[...] = rng.uniform(0.5, 2.0, size=module.num_features)
            module.weight.data[...] = rng.uniform(0.5, 1.5, size=module.num_features)
