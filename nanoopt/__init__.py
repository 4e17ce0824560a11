"""nanoopt: transparent quantization, pruning and distillation for CPUs, on a minimal NumPy autograd.

The subpackages and the names below load on first use (PEP 562), so that ``import nanoopt.runtime`` -- the
deployment runtime, which needs no autograd -- does not import the autograd, the layers or the techniques.

>>> import numpy as np, nanoopt as no
>>> x = no.Tensor(np.array([1.0, 2.0]), requires_grad=True)
>>> (x * x).sum().backward(); x.grad.tolist()
[2.0, 4.0]
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "deploy", "distill", "io", "models", "nn", "onnx", "ops", "optim", "prune", "quant",
               "random", "report", "runtime", "train")
_NAMES = {
    "concatenate": "nanoopt.ops", "maximum": "nanoopt.ops", "stack": "nanoopt.ops", "where": "nanoopt.ops",
    "manual_seed": "nanoopt.random",
    "Tensor": "nanoopt.tensor", "enable_grad": "nanoopt.tensor", "is_grad_enabled": "nanoopt.tensor",
    "no_grad": "nanoopt.tensor", "tensor": "nanoopt.tensor",
    "evaluate": "nanoopt.train", "fit": "nanoopt.train",
}

# the user's vocabulary (DESIGN.md's public API); ``ops``, ``random``, ``report``, ``train``, ``deploy`` and the
# ``tensor`` module stay reachable as attributes but are not exported
__all__ = [
    "Tensor", "concatenate", "data", "distill", "enable_grad", "evaluate", "fit", "io", "is_grad_enabled",
    "manual_seed", "maximum", "models", "nn", "no_grad", "onnx", "optim", "prune", "quant", "runtime", "stack",
    "where",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"nanoopt.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))
