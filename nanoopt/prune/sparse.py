"""Run pruned Linear layers with sparse kernels, so unstructured sparsity saves time at inference.

:class:`SparseLinear` holds a pruned weight in CSR (any sparsity pattern) or N:M form (see
:mod:`nanoopt.kernels.sparse`) and computes y = x W^T + b with the sparse kernels: CSR with
:func:`~nanoopt.kernels.sparse.csr_matmul` (AVX2 at small batches where the CPU has it, else Numba), N:M with the
slot-major kernel :func:`~nanoopt.kernels.nm_sparse.nm_linear` (the weight laid out for it once, at the first call
and again after a load). :func:`to_sparse` swaps every sufficiently sparse Linear of a model for one. The result
is for inference only (no gradient); its outputs equal the masked model's to float tolerance (another summation
order than BLAS, bound in the kernel docstrings). Inputs may have leading axes (``(..., in)``, as ``nn.Linear``),
and :meth:`SparseLinear.forward_array` computes on arrays, so a GPT whose Linear layers were replaced keeps its
array fast path for generation (:meth:`nanoopt.models_gpt.GPT.generate`).

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

from nanoopt.kernels.nm_sparse import NMWeight, nm_linear, nm_row_kernel, prepare_nm
from nanoopt.kernels.sparse import CSRMatrix, NMMatrix, csr_matmul
from nanoopt.nn import Module
from nanoopt.nn import layers as L
from nanoopt.nn.converted import require_float_model
from nanoopt.prune.masks import get_mask, get_parameter, module_label
from nanoopt.tensor import Tensor, is_grad_enabled

_FLOAT32 = np.dtype(np.float32)
_NO_BIAS = np.zeros(0, np.float32)  # the bias argument of a kernel call without bias


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
        self._row_call: tuple | None = None  # the one-row kernel's arguments (_row_plan), made at the first call
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
        self._nm_weight = None
        self._row_call = None

    def nm_weight(self) -> NMWeight:
        """The N:M weight laid out for :func:`~nanoopt.kernels.nm_sparse.nm_linear` (made once, kept until a new
        state is loaded)."""
        if getattr(self, "_nm_weight", None) is None:
            if not isinstance(self.sparse_weight, NMMatrix):
                raise TypeError(f"{module_label(self)} holds a CSR weight, not an N:M one")
            self._nm_weight = prepare_nm(self.sparse_weight)
        return self._nm_weight

    def _row_plan(self) -> tuple | None:
        """``(kernel, values, offsets)`` of the one-row N:M kernel (2:4), made once with :meth:`nm_weight`; None
        for CSR and other n:m."""
        if self.__dict__.get("_row_call") is None:
            kernel = None if self.format == "csr" else nm_row_kernel(self.nm_weight())
            self._row_call = (kernel, self._nm_weight.values, self._nm_weight.offsets) if kernel else ()
        return self._row_call or None

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
        return Tensor(self.forward_array(x.data))

    def forward_array(self, x: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """``x (..., in) W[rows]^T + b[rows]`` on arrays (no graph): outputs ``rows`` (a slice with step 1, e.g. the
        query rows of a fused QKV projection) only; the same values as :meth:`forward`'s columns ``rows``.

        One row of a C-contiguous float32 input (a token at batch 1) on a 2:4 weight goes straight to the one-row
        kernel (:func:`~nanoopt.kernels.nm_sparse.nm_row_kernel`, the same bits as ``nm_linear``): at that size the
        checks, reshapes and look-ups of the general path cost more than the product."""
        plan = self._row_call or self._row_plan()
        if (plan is not None and type(x) is np.ndarray and x.dtype is _FLOAT32 and x.size == self.in_features
                and x.ndim and x.shape[-1] == self.in_features and x.flags.c_contiguous):
            start, stop, step = rows.indices(self.out_features)
            bias = self._buffers["bias"]
            if step == 1 and (bias is None or bias.dtype is _FLOAT32):
                stop = max(start, stop)
                out = np.empty(x.shape[:-1] + (stop - start,), _FLOAT32)
                plan[0](x, plan[1], plan[2], _NO_BIAS if bias is None else bias, bias is not None, start, stop,
                        out)
                return out
        if x.ndim < 1 or x.shape[-1] != self.in_features or x.dtype != np.float32:
            raise ValueError(f"{module_label(self)}: expected a float32 input (..., {self.in_features}), got shape "
                             f"{x.shape} dtype {x.dtype}")
        start, stop, step = rows.indices(self.out_features)
        if step != 1:
            raise ValueError(f"{module_label(self)}.forward_array: rows must be a slice with step 1, got {rows}")
        stop = max(start, stop)
        flat = x.reshape(-1, self.in_features)  # (M, K)
        bias = None if self.bias is None else np.asarray(self.bias, np.float32)
        if isinstance(self.sparse_weight, CSRMatrix):
            out = csr_matmul(flat, self.sparse_weight)[:, start:stop]
            if bias is not None:
                out += bias[start:stop]
        else:  # (x, bias and rows are checked above)
            out = nm_linear(flat, self.nm_weight(), bias, (start, stop), validate=False)
        return out.reshape(x.shape[:-1] + (stop - start,))

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
