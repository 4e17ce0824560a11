"""N:M sparse Linear against the dense float kernel at the GPT's and LeNet-300-100's shapes, batch 1-32, one thread.

``y = x W^T + b`` for W (N, K) with 2:4 (50 %) and 1:4 (75 %) sparsity (magnitude N:M of a random normal weight):
the slot-major kernel :func:`nanoopt.kernels.nm_sparse.nm_linear` (what ``SparseLinear`` and the runtime's N:M step
run), at 2:4 and batch 1 its one-row kernel :func:`nanoopt.kernels.nm_sparse.nm_row_kernel` (what a
``SparseLinear`` runs for a token at batch 1), and the older row-major kernel
:func:`nanoopt.kernels.sparse.nm_matmul` (no bias), against the dense float
kernel of the runtime (``float_kernels.linear_bias_act``: BLAS into a preallocated output, then the bias) on the same
masked dense weight, measured in the same run; the ratio in brackets is dense time / N:M time (above 1: the N:M
kernel is faster). Shapes: the 4-layer 128-wide GPT's c_attn (128 -> 384), attention c_proj (128 -> 128), c_fc
(128 -> 512) and MLP c_proj (512 -> 128); LeNet-300-100's 784 -> 300 and 300 -> 100. Best of 5 rounds.

    python -m benchmarks.nm_kernels
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import numpy as np  # noqa: E402

from benchmarks.common import best_seconds, git_revision, machine_description  # noqa: E402
from nanoopt.kernels import nm_sparse, sparse  # noqa: E402
from nanoopt.runtime import float_kernels  # noqa: E402

SHAPES = {"GPT c_attn": (384, 128), "GPT attn c_proj": (128, 128), "GPT c_fc": (512, 128),
          "GPT mlp c_proj": (128, 512), "LeNet-300-100 fc1": (300, 784), "LeNet-300-100 fc2": (100, 300)}
BATCHES = (1, 4, 16, 32)


def n_of_m(rng: np.random.Generator, rows: int, cols: int, n: int, m: int) -> np.ndarray:
    """A random normal (rows, cols) weight with the n largest of every m consecutive weights of a row kept."""
    groups = rng.standard_normal((rows, cols // m, m)).astype(np.float32)
    np.put_along_axis(groups, np.argsort(-np.abs(groups), axis=-1)[..., n:], 0.0, axis=-1)
    return groups.reshape(rows, cols)


def layer_cells(rng: np.random.Generator, inputs: dict[int, np.ndarray], bias: np.ndarray, rows: int, cols: int,
                n: int, m: int) -> dict[str, list[str]]:
    """The table cells of one layer at n:m: the dense kernel's time and each N:M kernel's time and ratio."""
    weight = n_of_m(rng, rows, cols, n, m)
    matrix = sparse.NMMatrix.from_dense(weight, n, m)
    prepared = nm_sparse.prepare_nm(matrix)
    weight_t = weight.T  # the runtime's dense layout: a transposed view of the C-ordered (N, K) weight
    cells: dict[str, list[str]] = {"dense float kernel (BLAS)": [], f"{n}:{m} nm_linear (slot-major)": [],
                                   f"{n}:{m} nm_matmul (row-major, no bias)": []}
    for b in BATCHES:
        x, out = inputs[b], np.empty((b, rows), np.float32)
        np.testing.assert_allclose(nm_sparse.nm_linear(x, prepared, bias), x @ weight.T + bias, rtol=1e-4,
                                   atol=1e-4)  # the kernel agrees with the dense product before it is timed
        dense = best_seconds(lambda x=x, out=out: float_kernels.linear_bias_act(x, weight_t, bias, False, out),
                             repeats=5, min_time=0.05)
        cells["dense float kernel (BLAS)"].append(f"{dense * 1e6:,.1f} us")
        kernels = {f"{n}:{m} nm_linear (slot-major)":
                   lambda x=x, out=out: nm_sparse.nm_linear(x, prepared, bias, None, False, out),
                   f"{n}:{m} nm_matmul (row-major, no bias)": lambda x=x: sparse.nm_matmul(x, matrix)}
        for name, function in kernels.items():
            seconds = best_seconds(function, repeats=5, min_time=0.05)
            cells[name].append(f"{seconds * 1e6:,.1f} us ({dense / seconds:.2f}x)")
        row_kernel = nm_sparse.nm_row_kernel(prepared)
        if row_kernel is not None:  # 2:4: the one-row kernel a SparseLinear runs for a token at batch 1
            name = f"{n}:{m} nm_row_kernel (one row, SparseLinear at batch 1)"
            if b != 1:
                cells.setdefault(name, []).append("-")
                continue
            got = np.empty((1, rows), np.float32)
            row_kernel(x, prepared.values, prepared.offsets, bias, True, 0, rows, got)
            np.testing.assert_array_equal(got, nm_sparse.nm_linear(x, prepared, bias))  # the same bits
            seconds = best_seconds(lambda x=x, out=out, kernel=row_kernel: kernel(x, prepared.values, prepared.offsets,
                                                                                  bias, True, 0, rows, out),
                                   repeats=5, min_time=0.05)
            cells.setdefault(name, []).append(f"{seconds * 1e6:,.1f} us ({dense / seconds:.2f}x)")
    return cells


def main() -> None:
    rng = np.random.default_rng(0)
    print("## N:M sparse Linear against the dense float kernel, batch 1-32, 1 thread\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print("| layer (N x K) | kernel | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|---|" + "---:|" * len(BATCHES))
    for label, (rows, cols) in SHAPES.items():
        inputs = {b: rng.standard_normal((b, cols)).astype(np.float32) for b in BATCHES}
        bias = rng.standard_normal(rows).astype(np.float32)
        for n, m in ((2, 4), (1, 4)):
            for name, parts in layer_cells(rng, inputs, bias, rows, cols, n, m).items():
                if name.startswith("dense") and n != 2:
                    continue  # one dense row per layer (the 1:4 weight's dense time is the same product)
                print(f"| {label} ({rows} x {cols}) | {name} | " + " | ".join(parts) + " |", flush=True)
    print("\nRatios in brackets: dense float time / N:M time at the same batch, each N:M weight against the dense "
          "product of the same masked weight (above 1: the N:M kernel is faster).")


if __name__ == "__main__":
    main()
