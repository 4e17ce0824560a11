"""Run pruned Linear layers with sparse kernels, so unstructured sparsity saves time at inference.

:class:`SparseLinear` holds a pruned weight in CSR (any sparsity pattern) or N:M form (see
:mod:`nanoopt.kernels.sparse`) and computes y = x W^T + b with the sparse kernels (AVX2 at small batches where
the CPU has it, else Numba); :func:`to_sparse` swaps every sufficiently sparse Linear of a model for one. The
result is for inference only (no gradient); its outputs equal the masked model's to float tolerance (another
summation order than BLAS, bound in the kernel docstring).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models, prune
>>> model = models.lenet_300_100(in_features=64)
>>> prune.global_unstructured(prune.criteria.prunable_parameters(model), amount=0.9, min_remaining=0.02)
>>> x = np.random.default_rng(0).random((2, 64)).astype(np.float32)
>>> expected = no.train.predict(model, x)
>>> converted = to_sparse(model)
>>> sorted(converted), bool(np.allclose(no.train.predict(model, x), expected, atol=1e-5))
(['1', '3', '5'], True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanoopt.kernels.sparse import CSRMatrix, NMMatrix, csr_matmul, nm_matmul
from nanoopt.nn import Module
from nanoopt.nn import layers as L
from nanoopt.nn.converted import require_float_model
from nanoopt.prune.masks import get_mask, get_parameter, module_label
from nanoopt.tensor import Tensor, is_grad_enabled


class SparseLinear(Module):
    """An inference-only Linear layer with a sparse weight (``CSRMatrix`` or ``NMMatrix``) and a dense bias.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt.kernels.sparse import CSRMatrix
    >>> layer = SparseLinear(CSRMatrix.from_dense(np.eye(2, dtype=np.float32)), bias=np.ones(2))
    >>> layer(no.Tensor(np.array([[1.0, 2.0]], np.float32))).data.tolist()
    [[2.0, 3.0]]
    """

    def __init__(self, weight: CSRMatrix | NMMatrix, bias: np.ndarray | None = None) -> None:
        super().__init__()
        if not isinstance(weight, (CSRMatrix, NMMatrix)):
            raise TypeError(f"SparseLinear: weight must be a CSRMatrix or NMMatrix, got {type(weight).__name__}")
        self.sparse_weight = weight
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float32)
            if bias.shape != (self.out_features,):
                raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got {bias.shape}")
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, layer: L.Linear, format: str = "csr", n: int = 2, m: int = 4) -> SparseLinear:
        """Pack the effective (masked) weight of ``layer`` as CSR or, with ``format="nm"``, as N:M."""
        if not isinstance(layer, L.Linear):
            raise TypeError(f"SparseLinear.from_linear expects a Linear layer, got {module_label(layer)}")
        weight = np.ascontiguousarray(get_parameter(layer, "weight").data * get_mask(layer, "weight"),
                                      dtype=np.float32)
        bias = None
        if layer._parameters.get("bias") is not None or hasattr(layer, "bias_orig"):
            bias = get_parameter(layer, "bias").data * get_mask(layer, "bias")
        if format == "csr":
            packed: CSRMatrix | NMMatrix = CSRMatrix.from_dense(weight)
        elif format == "nm":
            packed = NMMatrix.from_dense(weight, n, m)
        else:
            raise ValueError(f"SparseLinear.from_linear: format must be 'csr' or 'nm', got {format!r}")
        return cls(packed, bias)

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.requires_grad and is_grad_enabled():
            raise RuntimeError(f"{module_label(self)} is for inference only: run it under no_grad() or on inputs "
                               "that do not require grad")
        if x.ndim != 2 or x.shape[1] != self.in_features or x.dtype != np.float32:
            raise ValueError(f"{module_label(self)}: expected a float32 input (N, {self.in_features}), got shape "
                             f"{x.shape} dtype {x.dtype}")
        if isinstance(self.sparse_weight, CSRMatrix):
            out = csr_matmul(x.data, self.sparse_weight)
        else:
            out = nm_matmul(x.data, self.sparse_weight)
        if self.bias is not None:
            out += self.bias
        return Tensor(out)

    def extra_repr(self) -> str:
        kind = "CSR" if isinstance(self.sparse_weight, CSRMatrix) else \
            f"{self.sparse_weight.n}:{self.sparse_weight.m}"
        density = (self.sparse_weight.nnz / (self.in_features * self.out_features)
                   if isinstance(self.sparse_weight, CSRMatrix) else self.sparse_weight.n / self.sparse_weight.m)
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, density={density:.3f}"


def to_sparse(model: Module, min_sparsity: float = 0.5, format: str = "csr", n: int = 2, m: int = 4
              ) -> list[str]:
    """Replace, in place, every Linear of ``model`` whose effective weight has at least ``min_sparsity`` zeros
    by a :class:`SparseLinear`; returns the names of the replaced layers.

    >>> from nanoopt import models, prune
    >>> model = models.tiny_mlp(); _ = prune.l1_unstructured(model[1], "weight", amount=0.8)
    >>> to_sparse(model, min_sparsity=0.5), type(model[1]).__name__
    (['1'], 'SparseLinear')
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"to_sparse: min_sparsity must be in [0, 1], got {min_sparsity}")
    require_float_model(model, "prune.to_sparse", allow=("nanoopt.prune.sparse",))  # sparse layers stay as they are
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, L.Linear):
            continue
        weight = get_parameter(module, "weight").data * get_mask(module, "weight")
        if np.count_nonzero(weight == 0) >= min_sparsity * weight.size:
            model.set_submodule(name, SparseLinear.from_linear(module, format, n, m))
            replaced.append(name)
    return replaced
