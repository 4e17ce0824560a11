"""Run pruned Linear layers with sparse kernels, so unstructured sparsity saves time at inference.

:class:`SparseLinear` holds a pruned weight in CSR (any sparsity pattern) or N:M form (see
:mod:`nanoopt.kernels.sparse`) and computes y = x W^T + b with the sparse kernels (AVX2 at small batches where
the CPU has it, else Numba); :func:`to_sparse` swaps every sufficiently sparse Linear of a model for one. The
result is for inference only (no gradient); its outputs equal the masked model's to float tolerance (another
summation order than BLAS, bound in the kernel docstring).

What a sparse layer stores is what it saves: the arrays of its sparse weight are its buffers, so ``state_dict``
(and a checkpoint of :mod:`nanoopt.io`) holds ``weight_data``, ``weight_indices``, ``weight_indptr`` (CSR) or
``weight_values``, ``weight_offsets``, ``weight_nm`` (N:M), plus ``weight_shape`` and the bias, and a reload is
bit-identical. A CSR checkpoint loads into any CSR layer of the same shape, whatever its number of non-zeros (the
structure is validated as a :class:`~nanoopt.kernels.sparse.CSRMatrix` before anything changes).

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

    converted_by = "prune.to_sparse"  # nanoopt.nn.converted.MARKER

    def __init__(self, weight: CSRMatrix | NMMatrix, bias: np.ndarray | None = None) -> None:
        super().__init__()
        if not isinstance(weight, (CSRMatrix, NMMatrix)):
            raise TypeError(f"SparseLinear: weight must be a CSRMatrix or NMMatrix, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.format = "csr" if isinstance(weight, CSRMatrix) else "nm"
        # the arrays of the sparse weight are the buffers (shared, not copied): state_dict saves what is stored
        self.register_buffer("weight_shape", np.array(weight.shape, np.int64))
        if isinstance(weight, CSRMatrix):
            self.register_buffer("weight_data", weight.data)
            self.register_buffer("weight_indices", weight.indices)
            self.register_buffer("weight_indptr", weight.indptr)
        else:
            self.register_buffer("weight_values", weight.values)
            self.register_buffer("weight_offsets", weight.offsets)
            self.register_buffer("weight_nm", np.array([weight.n, weight.m], np.int64))
        self.sparse_weight = weight
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float32)
            if bias.shape != (self.out_features,):
                raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got {bias.shape}")
        self.register_buffer("bias", bias)

    def _sparse_from(self, state: dict[str, np.ndarray]) -> CSRMatrix | NMMatrix:
        """The sparse weight made of ``state``'s arrays (this layer's buffers where ``state`` has none), validated."""
        def entry(name: str) -> np.ndarray:
            return np.ascontiguousarray(state[name] if name in state else self._buffers[name])

        shape = tuple(int(size) for size in entry("weight_shape"))
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"weight_shape {list(shape)} in the checkpoint but [{self.out_features}, "
                             f"{self.in_features}] in the model")
        if self.format == "csr":
            return CSRMatrix(entry("weight_data"), entry("weight_indices"), entry("weight_indptr"), shape)
        n, m = (int(value) for value in entry("weight_nm"))
        if (n, m) != (self.sparse_weight.n, self.sparse_weight.m):
            raise ValueError(f"an {n}:{m} sparse weight does not load into a {self.sparse_weight.n}:"
                             f"{self.sparse_weight.m} layer")
        return NMMatrix(entry("weight_values"), entry("weight_offsets"), n, m, shape)

    def resizable_state(self) -> frozenset[str]:
        """A CSR weight of another number of non-zeros loads (its structure is validated first)."""
        return frozenset({"weight_data", "weight_indices"}) if self.format == "csr" else frozenset()

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        try:
            self._sparse_from(state)
        except TypeError as error:
            raise ValueError(str(error)) from None

    def after_load(self) -> None:
        self.sparse_weight = self._sparse_from({})

    def describe_state(self) -> dict[str, dict[str, Any]]:
        """The sparse layout (CSR, or N:M with its n and m), recorded with the weight's arrays."""
        layout: dict[str, Any] = {"sparse": "csr"} if self.format == "csr" else \
            {"sparse": "n:m", "n": self.sparse_weight.n, "m": self.sparse_weight.m}
        names = ("weight_data", "weight_indices", "weight_indptr") if self.format == "csr" else \
            ("weight_values", "weight_offsets", "weight_nm")
        return {name: dict(layout) for name in names}

    def stored_parameters(self) -> int:
        """The weights this layer stores (non-zeros of CSR; every kept slot of N:M) plus the bias."""
        weights = self.weight_data.size if self.format == "csr" else self.weight_values.size
        return int(weights + (0 if self.bias is None else self.bias.size))

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
    require_float_model(model, "prune.to_sparse", allow=(SparseLinear,))  # sparse layers stay as they are
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, L.Linear):
            continue
        weight = get_parameter(module, "weight").data * get_mask(module, "weight")
        if np.count_nonzero(weight == 0) >= min_sparsity * weight.size:
            model.set_submodule(name, SparseLinear.from_linear(module, format, n, m))
            replaced.append(name)
    return replaced
