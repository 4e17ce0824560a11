"""Sparse kernels against a dense float32 matrix product: y = x @ W^T for W 1024 x 1024, one thread.

W has uniformly random unstructured sparsity (90 %, plus 95 % and 99 % for context) and runs with nanoopt's CSR
product (``backend="auto"``: the AVX2 kernel of :mod:`nanoopt.kernels.sparse_avx2` up to batch
``sparse.AVX2_MAX_BATCH`` where the CPU has AVX2, else the portable Numba kernel), with the portable Numba kernel
alone (``backend="numba"``, what a CPU without AVX2 runs) and with scipy.sparse's CSR product; a 2:4 (50 %) and a
1:4 (75 %) N:M weight runs with the N:M kernel. The baseline is NumPy's dense ``x @ W.T`` (BLAS) on the same
dense float32 weight, measured in the same run; ratios above 1 mean the sparse kernel is faster. The N:M weights
run with the row-major kernel ``sparse.nm_matmul`` and with the slot-major kernel ``nm_sparse.nm_linear`` (what
``SparseLinear`` and the runtime run; ``python -m benchmarks.nm_kernels`` measures it at the GPT's and LeNet's
shapes, batch 1-32). Times are the best of 5 rounds (weights stay in cache).

    python -m benchmarks.sparse_kernels
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import numpy as np  # noqa: E402

from benchmarks.common import best_seconds, git_revision, machine_description  # noqa: E402
from nanoopt.kernels import nm_sparse, sparse, sparse_avx2  # noqa: E402

SIZE = 1024
BATCHES = (1, 32, 256)


def random_sparse(rng: np.random.Generator, sparsity: float) -> np.ndarray:
    weight = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
    weight[rng.random(weight.shape) < sparsity] = 0.0
    return weight


def n_of_m(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    weight = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
    groups = weight.reshape(SIZE, SIZE // m, m)
    order = np.argsort(-np.abs(groups), axis=-1)[..., :n]
    keep = np.zeros_like(groups)
    np.put_along_axis(keep, order, 1.0, axis=-1)
    return (groups * keep).reshape(SIZE, SIZE)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"## Sparse kernels: y = x @ W^T, W {SIZE}x{SIZE} float32, 1 thread\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    header = " | ".join(f"batch {b}" for b in BATCHES)
    print(f"| kernel | weight | {header} |")
    print("|---|---|" + "---:|" * len(BATCHES))
    inputs = {b: rng.standard_normal((b, SIZE)).astype(np.float32) for b in BATCHES}
    dense_seconds: dict[int, float] = {}

    def cells(function, weight_text: str, name: str) -> None:
        parts = []
        for b in BATCHES:
            seconds = best_seconds(lambda b=b: function(inputs[b]), repeats=5, min_time=0.1)
            if name == "dense":
                dense_seconds[b] = seconds
                parts.append(f"{seconds * 1e6:,.1f} us")
            else:
                parts.append(f"{seconds * 1e6:,.1f} us ({dense_seconds[b] / seconds:.2f}x)")
        print(f"| {name} | {weight_text} | " + " | ".join(parts) + " |", flush=True)

    dense_weight = random_sparse(rng, 0.9)
    cells(lambda x: x @ dense_weight.T, "dense float32 (the baseline, BLAS)", "dense")
    for sparsity in (0.9, 0.95, 0.99):
        weight = dense_weight if sparsity == 0.9 else random_sparse(rng, sparsity)
        matrix = sparse.CSRMatrix.from_dense(weight)
        scipy_matrix = matrix.to_scipy()
        for b in BATCHES:   # the kernels agree with the dense product before we time them
            np.testing.assert_allclose(sparse.csr_matmul(inputs[b], matrix), inputs[b] @ weight.T, rtol=1e-3,
                                       atol=1e-3)
        cells(lambda x, m=matrix: sparse.csr_matmul(x, m), f"{sparsity:.0%} unstructured, CSR", "nanoopt CSR")
        cells(lambda x, m=matrix: sparse.csr_matmul(x, m, backend="numba"), f"{sparsity:.0%} unstructured, CSR",
              "nanoopt CSR, portable Numba")
        cells(lambda x, m=scipy_matrix: (m @ x.T).T, f"{sparsity:.0%} unstructured, CSR", "scipy.sparse CSR")
    for n, m in ((2, 4), (1, 4)):
        weight = n_of_m(rng, n, m)
        packed = sparse.NMMatrix.from_dense(weight, n, m)
        cells(lambda x, p=packed: sparse.nm_matmul(x, p), f"{n}:{m} ({1 - n / m:.0%} sparse)", "nanoopt N:M")
        prepared = nm_sparse.prepare_nm(packed)
        cells(lambda x, p=prepared: nm_sparse.nm_linear(x, p, validate=False), f"{n}:{m} ({1 - n / m:.0%} sparse)",
              "nanoopt N:M, slot-major")
    avx2 = "runs" if sparse_avx2.available() else "is not available here; it falls back to the portable kernel"
    print("\nRatios in brackets: dense time / kernel time at the same batch (above 1: faster than dense). "
          f"nanoopt CSR uses the AVX2 kernel up to batch {sparse.AVX2_MAX_BATCH} (it {avx2}).")


if __name__ == "__main__":
    main()
