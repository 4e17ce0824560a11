"""nanoopt: transparent quantization, pruning and distillation for CPUs, on a minimal NumPy autograd.

>>> import numpy as np, nanoopt as no
>>> x = no.Tensor(np.array([1.0, 2.0]), requires_grad=True)
>>> (x * x).sum().backward(); x.grad.tolist()
[2.0, 4.0]
"""

from nanoopt import data, distill, io, models, nn, onnx, ops, optim, prune, quant, random, report, train
from nanoopt.ops import concatenate, maximum, stack, where
from nanoopt.random import manual_seed
from nanoopt.tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from nanoopt.train import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "Tensor", "concatenate", "data", "distill", "enable_grad", "evaluate", "fit", "io", "is_grad_enabled",
    "manual_seed", "maximum", "models", "nn", "no_grad", "onnx", "ops", "optim", "prune", "quant", "random", "report",
    "stack", "tensor", "train", "where",
]
