"""One table for every technique: accuracy, parameters, stored size, sparsity and latency, each measured.

* size: the bytes of every array in ``state_dict()`` (what a checkpoint really stores: int8 weights count one
  byte each, a pruning mask counts too);
* sparsity: the fraction of exactly-zero weights over the weight tensors of Linear/Conv2d-like layers;
* latency: the best wall-clock time of a forward pass over a batch out of 10, after a warm-up run.

The full report of a compression recipe (:func:`measure_model`, :func:`comparison_table`) measures each model
against the float baseline: accuracy, the bytes of the file really written (:func:`file_bytes`), sparsity and
weight bit-width per layer (:func:`layer_infos`, any layer kind), multiply-accumulates per example (dense, and
skipping zero weights), and the *median* latency on one thread at batch 1 and a larger batch
(:func:`median_latency_ms`).

>>> import numpy as np, nanoopt as no
>>> model = no.models.tiny_mlp()
>>> stored_bytes(model)   # (64*32 + 32 + 32*10 + 10) float32 values
9640
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numba
import numpy as np

from nanoopt.nn import Module
from nanoopt.nn.graph import hooks
from nanoopt.tensor import Tensor, no_grad
from nanoopt.train import evaluate


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


# ============================================================================ the full report (issue 19)
# Each measurement below is taken on the model as it is, against the float baseline measured the same way:
# the bytes of the file really written, weight sparsity and bit-widths per layer, multiply-accumulates per
# example (dense, and skipping zero weights), and the median latency at batch 1 and a larger batch, 1 thread.


def file_bytes(path: str | os.PathLike) -> int:
    """The size of a saved file in bytes (what "stored bytes" means in :class:`Measurement`)."""
    return int(os.path.getsize(os.fspath(path)))


@dataclass
class LayerInfo:
    """One weighted layer: its weight values (dequantized for integer layers), bit-width and MACs."""

    name: str
    kind: str
    shape: tuple[int, ...]
    bits: int
    nonzero: int
    size: int
    macs: int = 0              # per example, dense
    nonzero_macs: int = 0      # per example, skipping zero weights

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.size if self.size else 0.0


def _layer_weight(module: Module) -> tuple[np.ndarray, int] | None:
    """(effective weight values, bits) of a weighted layer of any kind, else None."""
    sparse = getattr(module, "sparse_weight", None)
    if sparse is not None:  # a sparse layer: rebuild the dense values from its structure
        return np.asarray(sparse.to_dense() if hasattr(sparse, "to_dense") else sparse.dense()), 32
    if hasattr(module, "dequantized_weight") and callable(module.dequantized_weight):
        spec = getattr(module, "weight_spec", None)
        bits = getattr(spec, "bits", None) or getattr(module, "weight_bits", None) or getattr(module, "bits", 8)
        return np.asarray(module.dequantized_weight()), int(bits)
    if "weight_orig" in module._parameters:  # pruned with a mask
        return module._parameters["weight_orig"].data * module._buffers["weight_mask"], 32
    weight = getattr(module, "weight", None)
    array = weight.data if isinstance(weight, Tensor) else weight
    if isinstance(array, np.ndarray) and array.ndim >= 2:
        bits = 8 * array.dtype.itemsize if array.dtype.kind == "f" else int(getattr(module, "bits", 8))
        return array, bits
    return None


def layer_infos(model: Module, example: np.ndarray | None = None) -> list[LayerInfo]:
    """Every weighted layer (float, pruned, sparse, integer, weight-only) with its sparsity and bit-width; with
    an ``example`` batch, also its multiply-accumulates per example (weight entries x output positions).

    >>> import numpy as np, nanoopt as no
    >>> [(i.name, i.shape, i.macs) for i in layer_infos(no.models.tiny_mlp(), np.zeros((1, 64), np.float32))]
    [('1', (32, 64), 2048), ('3', (10, 32), 320)]
    """
    infos: dict[str, LayerInfo] = {}
    modules = {}
    for name, module in model.named_modules():
        found = _layer_weight(module)
        if found is None or any(name.startswith(other + ".") for other in infos):
            continue
        values, bits = found
        infos[name] = LayerInfo(name, type(module).__name__, tuple(values.shape), bits,
                                int(np.count_nonzero(values)), int(values.size))
        modules[name] = module
    if example is not None:
        positions: dict[str, int] = {}

        def record(name: str, module: Module, inputs: Any, output: Any) -> None:
            shape = np.shape(output.data if isinstance(output, Tensor) else output)
            positions[name] = int(np.prod(shape[2:])) if len(shape) == 4 else 1

        with hooks(modules, after=record):
            if isinstance(model, Module):
                model.eval()
            with no_grad():
                model(Tensor(example[:1]))
        for name, info in infos.items():
            info.macs = info.size * positions.get(name, 1)
            info.nonzero_macs = info.nonzero * positions.get(name, 1)
    return list(infos.values())


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the Numba kernels on one thread inside the block (BLAS threads are set by the environment:
    ``nanoopt`` commands start with ``OPENBLAS_NUM_THREADS=1``)."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def median_latency_ms(model: Callable[[Tensor], Any], batch: np.ndarray, repeats: int = 20) -> float:
    """Median milliseconds of ``model(batch)`` over ``repeats`` runs after one warm-up, on one thread, eval mode.

    >>> import numpy as np, nanoopt as no
    >>> median_latency_ms(no.models.tiny_mlp(), np.zeros((1, 64), np.float32), repeats=3) > 0
    True
    """
    if isinstance(model, Module):
        model.eval()
    times = []
    with single_thread(), no_grad():
        model(Tensor(batch))
        for _ in range(repeats):
            start = time.perf_counter()
            model(Tensor(batch))
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


@dataclass
class Measurement:
    """Everything the report says about one model, measured."""

    name: str
    accuracy: float                      # fraction in [0, 1]
    stored_bytes: int | None             # size of the file written (None: not saved)
    sparsity: float                      # fraction of zero weights over all weighted layers
    bits: dict[str, int]                 # weight bit-width per layer
    macs: int                            # per example, dense
    nonzero_macs: int                    # per example, skipping zero weights
    latency_ms_1: float                  # median, batch 1, 1 thread
    latency_ms_batch: float              # median, batch ``batch``, 1 thread
    batch: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_model(name: str, model: Module, test_data: tuple[np.ndarray, np.ndarray], path: str | None = None,
                  batch: int = 256, repeats: int = 20) -> Measurement:
    """Accuracy, the real size of the file at ``path``, sparsity, bit-widths, MACs and median latencies.

    >>> import numpy as np, nanoopt as no
    >>> x, y = no.data.load_digits("test")
    >>> m = measure_model("mlp", no.models.tiny_mlp(), (x, y), batch=8, repeats=2)
    >>> m.macs, m.bits
    (2368, {'1': 32, '3': 32})
    """
    images, labels = test_data
    accuracy = evaluate(model, (images, labels))["accuracy"]
    infos = layer_infos(model, images[:1])
    size = sum(info.size for info in infos)
    nonzero = sum(info.nonzero for info in infos)
    return Measurement(
        name, accuracy, file_bytes(path) if path is not None else None, 1.0 - nonzero / size if size else 0.0,
        {info.name: info.bits for info in infos}, sum(info.macs for info in infos),
        sum(info.nonzero_macs for info in infos), median_latency_ms(model, images[:1], repeats),
        median_latency_ms(model, images[:batch], repeats), min(batch, len(images)),
        [{**asdict(info), "sparsity": info.sparsity} for info in infos])


def _ratio(base: float | None, value: float | None) -> str:
    return f"{base / value:.2f}x" if base and value else "-"


def comparison_table(baseline: Measurement, others: Sequence[Measurement]) -> str:
    """A Markdown table: every model against the float baseline (size ratio = baseline bytes / bytes, so
    larger is smaller; latency ratio = baseline time / time, so larger is faster).

    >>> base = Measurement("float", 0.9, 1000, 0.0, {"1": 32}, 100, 100, 1.0, 2.0, 256)
    >>> small = Measurement("pruned", 0.89, 100, 0.9, {"1": 4}, 100, 10, 1.0, 1.0, 256)
    >>> print(comparison_table(base, [small]).splitlines()[-1])
    | pruned | 89.00% | -1.00 | 100 | 10.00x | 90.0% | 4 | 100 | 10 | 1.000 (1.00x) | 1.000 (2.00x) |
    """
    lines = ["| model | accuracy | change (points) | stored bytes | compression | sparsity | weight bits | MACs | "
             f"non-zero MACs | latency batch 1, ms | latency batch {baseline.batch}, ms |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for row in [baseline, *others]:
        change = "" if row is baseline else f"{100 * (row.accuracy - baseline.accuracy):+.2f}"
        bits = "/".join(str(b) for b in dict.fromkeys(row.bits.values())) or "-"
        stored = f"{row.stored_bytes:,}" if row.stored_bytes is not None else "-"
        lines.append(f"| {row.name} | {100 * row.accuracy:.2f}% | {change} | {stored} | "
                     f"{_ratio(baseline.stored_bytes, row.stored_bytes) if row is not baseline else '1.00x'} | "
                     f"{100 * row.sparsity:.1f}% | {bits} | {row.macs:,} | {row.nonzero_macs:,} | "
                     f"{row.latency_ms_1:.3f} ({_ratio(baseline.latency_ms_1, row.latency_ms_1)}) | "
                     f"{row.latency_ms_batch:.3f} ({_ratio(baseline.latency_ms_batch, row.latency_ms_batch)}) |")
    return "\n".join(lines)
