"""Gradient utilities with PyTorch's names and semantics (``torch.nn.utils``).

:func:`clip_grad_norm_` rescales all gradients together so that their global norm is at most ``max_norm``
(Pascanu et al. 2013, "On the difficulty of training recurrent neural networks", Algorithm 1):

    n = (sum over parameters p of ||g_p||_q^q)^(1/q)   (q = norm_type; q = inf: max |g|)
    g_p <- g_p * min(1, max_norm / (n + 1e-6))

>>> import numpy as np
>>> from nanoopt.nn import Parameter
>>> p = Parameter(np.zeros(2, dtype=np.float32)); p.grad = np.array([3.0, 4.0], dtype=np.float32)
>>> float(clip_grad_norm_([p], max_norm=1.0)), [round(g, 4) for g in p.grad.tolist()]
(5.0, [0.6, 0.8])
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from nanoopt.tensor import Tensor


def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> float:
    """Scale the gradients of ``parameters`` in place to a global ``norm_type``-norm of at most ``max_norm``.

    Returns the total norm before clipping (as PyTorch). Parameters without a gradient are skipped. The scale
    is ``min(1, max_norm / (total + 1e-6))``, PyTorch's clamped coefficient, so gradients under the bound stay
    unchanged. With ``error_if_nonfinite`` a NaN or infinite total norm raises instead of spreading.
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    if max_norm < 0 or norm_type <= 0:
        raise ValueError(f"clip_grad_norm_: need max_norm >= 0 and norm_type > 0, got {max_norm}, {norm_type}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if math.isinf(norm_type):
        total = max(float(np.max(np.abs(g))) if g.size else 0.0 for g in grads)
    elif norm_type == 2.0:
        total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
    else:
        total = sum(float(np.sum(np.abs(g.astype(np.float64)) ** norm_type)) for g in grads) ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total gradient norm ({norm_type}) is {total}; set "
                           "error_if_nonfinite=False to clip anyway")
    coefficient = min(1.0, max_norm / (total + 1e-6))
    if coefficient < 1.0:
        for g in grads:
            g *= np.asarray(coefficient, dtype=g.dtype)
    return total
