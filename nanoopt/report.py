"""One table for every technique: accuracy, parameters, stored size, sparsity and latency, each measured.

* size: the bytes of every array in ``state_dict()`` (what a checkpoint really stores: int8 weights count one
  byte each, a pruning mask counts too);
* sparsity: the fraction of exactly-zero weights over the weight tensors of Linear/Conv2d-like layers;
* latency: the best wall-clock time of a forward pass over a batch out of 10, after a warm-up run.

>>> import numpy as np, nanoopt as no
>>> model = no.models.tiny_mlp()
>>> stored_bytes(model)   # (64*32 + 32 + 32*10 + 10) float32 values
9640
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanoopt.nn import Module
from nanoopt.tensor import Tensor, no_grad


def stored_bytes(model: Module) -> int:
    """Total bytes of the arrays in ``model.state_dict()``."""
    return int(sum(array.nbytes for array in model.state_dict().values()))


def count_parameters(model: Module) -> int:
    """Number of elements over all parameters and, for converted models, their integer weight and bias buffers
    (a quantized layer stores ``weight`` and ``bias`` as int8/int32 buffers, not as Parameters); a layer with a
    ``stored_parameters()`` method (a sparse layer: its non-zeros and bias) counts itself."""
    total = model.num_parameters()
    for module in model.modules():
        if hasattr(module, "stored_parameters"):  # a layer that counts what it stores (sparse: its non-zeros)
            total += module.stored_parameters()
            continue
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if name in ("weight", "bias") and buffer.dtype.kind in "iu":
                total += buffer.size          # integer weights and biases of converted layers
            elif name == "bias" and "weight_packed" in module._buffers:
                total += buffer.size          # the float bias of a weight-only layer
            elif name == "weight_packed" and hasattr(module, "weight_shape"):
                total += int(np.prod(module.weight_shape))  # packed low-bit weights, counted unpacked
    return int(total)


def weight_sparsity(model: Module) -> float:
    """Fraction of zeros among the effective weights (``weight``, or ``weight_orig * weight_mask``) of all layers."""
    zeros = total = 0
    for module in model.modules():
        sparse = getattr(module, "sparse_weight", None)
        if sparse is not None:  # a sparse layer: the entries it does not store are zeros, and stored zeros too
            stored = sparse.data if hasattr(sparse, "indptr") else sparse.values
            total += int(np.prod(sparse.shape))
            zeros += int(np.prod(sparse.shape)) - int(np.count_nonzero(stored))
            continue
        weight = getattr(module, "weight", None)
        array = weight.data if isinstance(weight, Tensor) else weight
        if isinstance(array, np.ndarray) and array.ndim >= 2:
            zeros += int(np.count_nonzero(array == 0))
            total += array.size
    return zeros / total if total else 0.0


def latency_ms(model: Callable[[Tensor], Any], batch: np.ndarray, repeats: int = 10) -> float:
    """Best (minimum) milliseconds of ``model(batch)`` over ``repeats`` runs, after one warm-up run, in eval mode.

    The minimum is the least disturbed by other processes on a shared machine (the usual micro-benchmark rule);
    compare latencies measured in the same run."""
    if isinstance(model, Module):
        model.eval()
    times = []
    with no_grad():
        model(Tensor(batch))
        for _ in range(repeats):
            start = time.perf_counter()
            model(Tensor(batch))
            times.append(time.perf_counter() - start)
    return float(np.min(times) * 1e3)


@dataclass
class Row:
    """One line of the comparison table."""

    name: str
    accuracy: float          # fraction in [0, 1]
    parameters: int
    size_bytes: int
    sparsity: float = 0.0
    latency_ms: float | None = None
    note: str = ""


def measure(name: str, model: Module, test_data: tuple[np.ndarray, np.ndarray], batch_size: int = 256,
            note: str = "") -> Row:
    """Evaluate ``model`` and measure its size, sparsity and the latency of one batch."""
    from nanoopt.train import evaluate

    images, labels = test_data
    accuracy = evaluate(model, (images, labels), batch_size=batch_size)["accuracy"]
    return Row(name, accuracy, count_parameters(model), stored_bytes(model), weight_sparsity(model),
               latency_ms(model, images[:batch_size]), note)


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of the rows."""
    lines = ["| model | accuracy | parameters | size | sparsity | latency / batch | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        latency = f"{row.latency_ms:.2f} ms" if row.latency_ms is not None else "-"
        lines.append(f"| {row.name} | {100 * row.accuracy:.2f}% | {row.parameters:,} | "
                     f"{row.size_bytes / 1024:.1f} KiB | {100 * row.sparsity:.1f}% | {latency} | {row.note} |")
    return "\n".join(lines)
