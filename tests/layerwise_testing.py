"""What the tests of the layer-wise calibrated methods share (``tests/prune/test_wanda_sparsegpt.py``,
``tests/quant/test_gptq_awq.py``): correlated calibration inputs, the output reconstruction error, a residual MLP
without LayerNorm and a model's eval-mode outputs.

Importable from every test folder: pytest puts ``tests/`` (the folder of ``conftest.py``) on ``sys.path``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import nanoopt as no
from nanoopt import nn
from nanoopt.tensor import Tensor


def correlated_inputs(seed: int, rows: int = 512, features: int = 64, noise: float = 0.1) -> np.ndarray:
    """Rows ``z A + noise e`` with a random mixing ``A``: strongly correlated input channels (float64)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features)) / np.sqrt(features)
    return rng.normal(size=(rows, features)) @ mixing + noise * rng.normal(size=(rows, features))


def error(weight: np.ndarray, approximation: np.ndarray, inputs: np.ndarray) -> float:
    """``||W X - W^ X||_F^2`` over the rows of ``inputs``."""
    difference = np.asarray(weight, np.float64) - np.asarray(approximation, np.float64)
    return float(np.sum((inputs @ difference.T) ** 2))


class ResidualMLP(nn.Module):
    """Linear layers with residual connections and no LayerNorm: ``h = stem(x)``, per block
    ``h = h + down(relu(up(h)))``, ``head(h)``; the sum is a functional ``+`` unless ``add_module``."""

    def __init__(self, add_module: bool = False, in_features: int = 16, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.up, block.act, block.down = nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)
            block.add = nn.Add() if add_module else None
            self.blocks.append(block)
        self.head = nn.Linear(width, 8)

    def forward(self, x: Any) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            branch = block.down(block.act(block.up(h)))
            h = block.add(h, branch) if block.add is not None else h + branch
        return self.head(h)


def outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """``model(x)`` in eval mode without a graph, as an array (``x`` cast to float32)."""
    model.eval()
    with no.no_grad():
        return model(Tensor(x.astype(np.float32))).data
