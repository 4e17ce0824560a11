"""Sparse float32 matrix products for pruned layers: CSR (unstructured) and N:M (semi-structured).

Both compute ``y = x @ W^T`` for a pruned weight W (rows = output features, cols = input features) and a dense
float32 input x (B, cols), touching only the stored weights, so an unstructured 90%-sparse layer reads about a
tenth of the dense weight bytes (Gale et al. 2020, "Sparse GPU kernels for deep learning", make the same point for
GPUs; on a CPU at batch 1 the dense product is memory bound, so reading less is the speed-up).

* CSR (compressed sparse row, the layout of ``scipy.sparse.csr_matrix``): ``data`` (nnz,) float32, ``indices``
  (nnz,) int32 column of each stored value, ``indptr`` (rows + 1,) int64; row i owns entries
  ``indptr[i]:indptr[i+1]``.
* N:M (Mishra et al. 2021, "Accelerating sparse deep neural networks"): at most n of every m consecutive
  weights along the input dimension are non-zero; each row stores exactly ``(cols / m) * n`` values and their
  offsets (uint8, 0..m-1, distinct) inside their group, with no row pointers (a group with fewer than n
  non-zeros stores explicit zeros at some of its zero columns).

**The summation order is part of the specification**, so that the NumPy reference and every compiled kernel
agree bit for bit. For output (b, i), let e = 0, 1, 2, ... number the stored entries of row i in order; then

    s_j = sum over e with e mod 8 == j, in increasing e, of fl(value_e * x[b, column_e])   (float32, from +0.0)
    y[b, i] = fl(fl(fl(s_0 + s_1) + fl(s_2 + s_3)) + fl(fl(s_4 + s_5) + fl(s_6 + s_7)))

Each product is rounded before it is added (no fused multiply-add). Eight partial sums hide the latency of the
additions (a single running sum is one long dependency chain) and are exactly the eight float32 lanes of one
AVX register, so :mod:`nanoopt.kernels.sparse_avx2` keeps them in one vector (entry e in lane e mod 8).

Backends (``backend=`` of :func:`csr_matmul`), all bit-identical to the reference (tested with hypothesis):

* ``"reference"``: :func:`csr_matmul_reference`, NumPy, the executable specification;
* ``"numba"``: :func:`csr_matmul_numba`, portable Numba (any CPU): eight scalar partial sums at batch 1, and
  for larger batches a loop over the batch innermost (vectorised by LLVM);
* ``"avx2"``: :func:`nanoopt.kernels.sparse_avx2.csr_matmul_avx2`, eight partial sums in one register;
* ``"auto"`` (default): ``"avx2"`` for batches up to :data:`AVX2_MAX_BATCH` where the CPU has it (checked once
  per process; ``NANOOPT_DISABLE_AVX2=1`` turns it off), else ``"numba"``.

:func:`nm_matmul` has ``"reference"`` and ``"numba"`` (``"auto"``): the same order, eight scalar partial sums.

Against a dense float32 ``x @ W.T`` (BLAS, another order) the results agree to float tolerance,
|y - y_dense| <= 2 * cols * eps * (|x| @ |W|^T).

>>> import numpy as np
>>> w = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, -1.0]], dtype=np.float32)
>>> x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
>>> csr_matmul(x, CSRMatrix.from_dense(w)).tolist()
[[4.0, -2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from nanoopt.kernels import sparse_avx2

PARTIAL_SUMS = 8   # number of interleaved partial sums per output (see the module docstring)
AVX2_MAX_BATCH = 8  # "auto" runs the AVX2 kernel (one pass per row of x) up to this batch size; beyond it
                    # the portable batch-inner loop is faster (measured: docs/kernels.md)
CSR_BACKENDS = ("auto", "avx2", "numba", "reference")
NM_BACKENDS = ("auto", "numba", "reference")


# ===================================================================== formats
@dataclass(frozen=True)
class CSRMatrix:
    """A float32 sparse matrix in compressed sparse row form, validated on construction.

    >>> m = CSRMatrix.from_dense(np.eye(3, dtype=np.float32))
    >>> m.nnz, m.shape, m.density
    (3, (3, 3), 0.3333333333333333)
    """

    data: np.ndarray      # (nnz,) float32
    indices: np.ndarray   # (nnz,) int32, the column of each value
    indptr: np.ndarray    # (rows + 1,) int64, row i is data[indptr[i]:indptr[i+1]]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.data.dtype != np.float32 or self.indices.dtype != np.int32 or self.indptr.dtype != np.int64:
            raise TypeError(f"CSRMatrix needs float32 data, int32 indices and int64 indptr, got "
                            f"{self.data.dtype}, {self.indices.dtype}, {self.indptr.dtype}")
        if self.data.ndim != 1 or self.indices.shape != self.data.shape or self.indptr.shape != (rows + 1,):
            raise ValueError(f"CSRMatrix: data {self.data.shape} and indices {self.indices.shape} must be equal 1-D "
                             f"arrays and indptr {self.indptr.shape} must have rows + 1 = {rows + 1} entries")
        if not (self.data.flags.c_contiguous and self.indices.flags.c_contiguous and self.indptr.flags.c_contiguous):
            raise ValueError("CSRMatrix: data, indices and indptr must be contiguous arrays (the kernels read them "
                             "as raw memory); pass np.ascontiguousarray(...) of each")
        if self.indptr[0] != 0 or self.indptr[-1] != self.data.size or np.any(np.diff(self.indptr) < 0):
            raise ValueError("CSRMatrix: indptr must start at 0, never decrease and end at nnz "
                             f"({self.data.size}), got {self.indptr[:3]}...{self.indptr[-3:]}")
        if self.data.size and (self.indices.min() < 0 or self.indices.max() >= cols):
            raise ValueError(f"CSRMatrix: column indices must be in [0, {cols}), got range "
                             f"[{self.indices.min()}, {self.indices.max()}]")

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    @classmethod
    def from_dense(cls, weight: np.ndarray) -> CSRMatrix:
        """The non-zero entries of a 2-D float32 array, row by row, columns ascending."""
        weight = _float32_matrix(weight, "CSRMatrix.from_dense")
        rows, cols = np.nonzero(weight)
        indptr = np.zeros(weight.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=weight.shape[0]), out=indptr[1:])
        return cls(np.ascontiguousarray(weight[rows, cols]), cols.astype(np.int32), indptr, weight.shape)

    @classmethod
    def from_scipy(cls, matrix: Any) -> CSRMatrix:
        """From any ``scipy.sparse`` matrix or array of dtype float32 (converted to CSR, indices sorted).

        Other dtypes are refused rather than silently rounded: convert with ``matrix.astype(np.float32)``.
        """
        import scipy.sparse

        if not scipy.sparse.issparse(matrix):
            raise TypeError(f"from_scipy expects a scipy.sparse matrix, got {type(matrix).__name__}")
        if matrix.dtype != np.float32:
            raise TypeError(f"from_scipy: the matrix has dtype {matrix.dtype}; convert it explicitly with "
                            ".astype(np.float32)")
        csr = scipy.sparse.csr_matrix(matrix, copy=True)
        csr.sum_duplicates()
        csr.sort_indices()
        return cls(csr.data.astype(np.float32), csr.indices.astype(np.int32), csr.indptr.astype(np.int64),
                   (int(csr.shape[0]), int(csr.shape[1])))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.csr_matrix`` sharing nothing with this one."""
        import scipy.sparse

        return scipy.sparse.csr_matrix((self.data.copy(), self.indices.copy(), self.indptr.copy()), shape=self.shape)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        dense[rows, self.indices] = self.data
        return dense


@dataclass(frozen=True)
class NMMatrix:
    """A float32 matrix with at most ``n`` non-zeros in every group of ``m`` consecutive columns.

    ``values[i, g*n + t]`` is the t-th kept weight of group g of row i, at column ``g*m + offsets[i, g*n + t]``.

    >>> w = np.array([[0, 3, 0, 1, 2, 0, 0, 5]], dtype=np.float32)
    >>> packed = NMMatrix.from_dense(w, n=2, m=4)
    >>> packed.values.tolist(), packed.offsets.tolist()
    ([[3.0, 1.0, 2.0, 5.0]], [[1, 3, 0, 3]])
    """

    values: np.ndarray    # (rows, cols / m * n) float32
    offsets: np.ndarray   # (rows, cols / m * n) uint8, each < m
    n: int
    m: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if not 1 <= self.n <= self.m <= 255 or cols % self.m:
            raise ValueError(f"NMMatrix: need 1 <= n <= m <= 255 and cols a multiple of m, got n={self.n}, "
                             f"m={self.m}, shape={self.shape}")
        expected = (rows, cols // self.m * self.n)
        if self.values.dtype != np.float32 or self.offsets.dtype != np.uint8:
            raise TypeError(f"NMMatrix needs float32 values and uint8 offsets, got {self.values.dtype} and "
                            f"{self.offsets.dtype}")
        if self.values.shape != expected or self.offsets.shape != expected:
            raise ValueError(f"NMMatrix: values {self.values.shape} and offsets {self.offsets.shape} must both be "
                             f"{expected}")
        if self.offsets.size and self.offsets.max() >= self.m:
            raise ValueError(f"NMMatrix: offsets must be < m={self.m}, got {self.offsets.max()}")
        grouped = np.sort(self.offsets.reshape(rows, cols // self.m, self.n), axis=-1)
        if np.any(np.diff(grouped, axis=-1) == 0):
            raise ValueError("NMMatrix: the offsets inside a group must be distinct")

    @classmethod
    def from_dense(cls, weight: np.ndarray, n: int = 2, m: int = 4) -> NMMatrix:
        """Pack a 2-D float32 array that already has at most ``n`` non-zeros per group of ``m`` columns."""
        weight = _float32_matrix(weight, "NMMatrix.from_dense")
        rows, cols = weight.shape
        if not 1 <= n <= m <= 255 or cols % m:
            raise ValueError(f"NMMatrix.from_dense: need 1 <= n <= m <= 255 and {cols} columns a multiple of m, got "
                             f"n={n}, m={m}")
        groups = weight.reshape(rows, cols // m, m)
        counts = np.count_nonzero(groups, axis=-1)
        if counts.max(initial=0) > n:
            row, group = np.argwhere(counts > n)[0]
            raise ValueError(f"NMMatrix.from_dense: row {row}, columns {group * m}..{group * m + m - 1} hold "
                             f"{counts[row, group]} non-zeros, more than n={n}; prune with nm_sparsity first")
        # stable sort puts the non-zeros of each group first, in column order; keep the first n of each group
        order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :n]          # (rows, groups, n)
        values = np.take_along_axis(groups, order, axis=-1)
        return cls(np.ascontiguousarray(values.reshape(rows, -1)), order.reshape(rows, -1).astype(np.uint8),
                   n, m, (rows, cols))

    def to_dense(self) -> np.ndarray:
        rows, cols = self.shape
        dense = np.zeros((rows, cols // self.m, self.m), dtype=np.float32)
        offsets = self.offsets.reshape(rows, cols // self.m, self.n).astype(np.int64)
        np.put_along_axis(dense, offsets, self.values.reshape(offsets.shape), axis=-1)
        return dense.reshape(rows, cols)


def _float32_matrix(weight: Any, what: str) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise TypeError(f"{what}: expected a 2-D float32 array, got shape {weight.shape} dtype {weight.dtype}")
    return weight


def _check_input(x: Any, cols: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"{what}: expected a float32 input (B, {cols}), got shape {x.shape} dtype {x.dtype}")
    return x


# ===================================================================== CSR: reference and Numba
def csr_matmul_reference(x: np.ndarray, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                         rows: int) -> np.ndarray:
    """``x @ W^T`` (B, rows) for W in CSR, in NumPy, with the summation order of the module docstring.

    >>> m = CSRMatrix.from_dense(np.array([[1.0, 2.0]], np.float32))
    >>> csr_matmul_reference(np.ones((1, 2), np.float32), m.data, m.indices, m.indptr, 1).tolist()
    [[3.0]]
    """
    batch = x.shape[0]
    lengths = np.diff(indptr)
    partial = np.zeros((PARTIAL_SUMS, batch, rows), dtype=np.float32)
    for position in range(int(lengths.max(initial=0))):
        active = np.flatnonzero(lengths > position)                 # rows with an entry number `position`
        entries = indptr[active] + position
        products = data[entries] * x[:, indices[entries]]           # (B, active) float32 products
        partial[position % PARTIAL_SUMS][:, active] += products
    return _sum_partials(partial)


def _sum_partials(partial: np.ndarray) -> np.ndarray:
    """The fixed tree ``((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`` over axis 0, in float32."""
    return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5])
                                                                      + (partial[6] + partial[7]))


# The kernels index with unsigned integers (indices viewed as uint32, row pointers as uint64; both are validated
# non-negative): Numba adds a negative-index wraparound check to every signed index, which here costs more than
# the arithmetic. Integer constants are uint64 too, since uint64 mixed with int64 would be promoted to float64.
@numba.njit(cache=True)
def _csr_matvec(x, data, indices, indptr, rows, out):  # pragma: no cover - compiled
    one, two, three, four = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)
    five, six, seven, eight = np.uint64(5), np.uint64(6), np.uint64(7), np.uint64(8)
    for i in range(rows):
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        start, end = indptr[i], indptr[i + 1]
        full = start + (end - start) // eight * eight
        k = start
        while k < full:
            s0 += data[k] * x[indices[k]]
            s1 += data[k + one] * x[indices[k + one]]
            s2 += data[k + two] * x[indices[k + two]]
            s3 += data[k + three] * x[indices[k + three]]
            s4 += data[k + four] * x[indices[k + four]]
            s5 += data[k + five] * x[indices[k + five]]
            s6 += data[k + six] * x[indices[k + six]]
            s7 += data[k + seven] * x[indices[k + seven]]
            k += eight
        if full < end:  # the last (end - full) < 8 entries go to s0, s1, ... in order
            s0 += data[full] * x[indices[full]]
        if full + one < end:
            s1 += data[full + one] * x[indices[full + one]]
        if full + two < end:
            s2 += data[full + two] * x[indices[full + two]]
        if full + three < end:
            s3 += data[full + three] * x[indices[full + three]]
        if full + four < end:
            s4 += data[full + four] * x[indices[full + four]]
        if full + five < end:
            s5 += data[full + five] * x[indices[full + five]]
        if full + six < end:
            s6 += data[full + six] * x[indices[full + six]]
        out[i] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True)
def _csr_matmat(x_t, data, indices, indptr, rows, out_t):  # pragma: no cover - compiled
    batch = x_t.shape[1]
    seven = np.uint64(7)
    partial = np.zeros((8, batch), dtype=np.float32)
    for i in range(rows):
        partial[:] = 0.0
        start, end = indptr[i], indptr[i + 1]
        k = start
        while k < end:
            value = data[k]
            row = x_t[indices[k]]
            acc = partial[(k - start) & seven]
            for b in range(batch):
                acc[b] += value * row[b]
            k += np.uint64(1)
        for b in range(batch):
            out_t[i, b] = (((partial[0, b] + partial[1, b]) + (partial[2, b] + partial[3, b]))
                           + ((partial[4, b] + partial[5, b]) + (partial[6, b] + partial[7, b])))


def csr_matmul_numba(x: np.ndarray, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                     rows: int) -> np.ndarray:
    """The Numba kernel with :func:`csr_matmul_reference`'s signature and bit-identical results.

    Portable (any CPU). Batch 1 runs a matrix-vector loop with eight scalar partial sums; larger batches transpose
    x to (cols, B) so that the innermost loop runs over contiguous batch entries (vectorised by LLVM).

    >>> m = CSRMatrix.from_dense(np.array([[1.0, 2.0]], np.float32))
    >>> csr_matmul_numba(np.ones((2, 2), np.float32), m.data, m.indices, m.indptr, 1).tolist()
    [[3.0], [3.0]]
    """
    indices, indptr = indices.view(np.uint32), indptr.view(np.uint64)     # validated non-negative
    if x.shape[0] == 1:
        out = np.empty(rows, dtype=np.float32)
        _csr_matvec(np.ascontiguousarray(x[0]), data, indices, indptr, rows, out)
        return out.reshape(1, rows)
    out_t = np.empty((rows, x.shape[0]), dtype=np.float32)
    _csr_matmat(np.ascontiguousarray(x.T), data, indices, indptr, rows, out_t)
    return np.ascontiguousarray(out_t.T)


def csr_matmul(x: np.ndarray, matrix: CSRMatrix | Any, backend: str = "auto") -> np.ndarray:
    """``x @ W^T`` for a float32 input (B, cols) and W a :class:`CSRMatrix` or a float32 ``scipy.sparse`` matrix.

    ``backend``: ``"auto"``, ``"avx2"``, ``"numba"`` or ``"reference"`` (module docstring); all give the same bits.
    Forcing ``"avx2"`` where it cannot run raises ``RuntimeError``.

    >>> import scipy.sparse
    >>> w = scipy.sparse.random(4, 6, density=0.5, format="csr", dtype=np.float32, random_state=0)
    >>> x = np.ones((2, 6), dtype=np.float32)
    >>> bool(np.allclose(csr_matmul(x, w), x @ w.toarray().T))
    True
    >>> bool(np.array_equal(csr_matmul(x, w, backend="numba"), csr_matmul(x, w, backend="reference")))
    True
    """
    if not isinstance(matrix, CSRMatrix):
        matrix = CSRMatrix.from_scipy(matrix)
    x = _check_input(x, matrix.shape[1], "csr_matmul")
    if backend == "auto":
        backend = "avx2" if x.shape[0] <= AVX2_MAX_BATCH and sparse_avx2.available() else "numba"
    elif backend == "avx2":
        sparse_avx2.require_available("csr_matmul(backend='avx2')")
    if backend == "avx2":  # x and the matrix (a CSRMatrix) are validated: the jitted kernel, one row of x at a time
        x = np.ascontiguousarray(x)
        out = np.empty((x.shape[0], matrix.shape[0]), np.float32)  # (B, rows)
        for b in range(x.shape[0]):
            sparse_avx2.csr_matvec_into(x[b], matrix.data, matrix.indices, matrix.indptr, out[b])
        return out
    kernel = _backend(backend, CSR_BACKENDS, csr_matmul_reference, csr_matmul_numba)
    return kernel(x, matrix.data, matrix.indices, matrix.indptr, matrix.shape[0])


# ===================================================================== N:M: reference and Numba
def nm_matmul_reference(x: np.ndarray, values: np.ndarray, offsets: np.ndarray, n: int, m: int) -> np.ndarray:
    """``x @ W^T`` (B, rows) for W packed as N:M, in NumPy, with the summation order of the module docstring.

    >>> p = NMMatrix.from_dense(np.array([[0, 2, 0, 1]], np.float32), 2, 4)
    >>> nm_matmul_reference(np.ones((1, 4), np.float32), p.values, p.offsets, 2, 4).tolist()
    [[3.0]]
    """
    batch, rows = x.shape[0], values.shape[0]
    entries = values.shape[1]
    columns = (np.arange(entries) // n) * m + offsets.astype(np.int64)    # (rows, entries) absolute columns
    partial = np.zeros((PARTIAL_SUMS, batch, rows), dtype=np.float32)
    for e in range(entries):
        partial[e % PARTIAL_SUMS] += values[:, e] * x[:, columns[:, e]]  # (B, rows)
    return _sum_partials(partial)


@numba.njit(cache=True)
def _nm_matmat(x_t, values, offsets, group_start, out_t):  # pragma: no cover - compiled
    rows, entries = values.shape
    batch = x_t.shape[1]
    seven = np.uint64(7)
    partial = np.zeros((8, batch), dtype=np.float32)
    for i in range(rows):
        partial[:] = 0.0
        row_values, row_offsets = values[i], offsets[i]
        e = np.uint64(0)
        while e < entries:
            value = row_values[e]
            row = x_t[group_start[e] + row_offsets[e]]
            acc = partial[e & seven]
            for b in range(batch):
                acc[b] += value * row[b]
            e += np.uint64(1)
        for b in range(batch):
            out_t[i, b] = (((partial[0, b] + partial[1, b]) + (partial[2, b] + partial[3, b]))
                           + ((partial[4, b] + partial[5, b]) + (partial[6, b] + partial[7, b])))


@numba.njit(cache=True)
def _nm_matvec(x, values, offsets, group_start, out):  # pragma: no cover - compiled
    rows, entries = values.shape
    one, two, three, four = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)
    five, six, seven, eight = np.uint64(5), np.uint64(6), np.uint64(7), np.uint64(8)
    full = np.uint64(entries) // eight * eight
    size = np.uint64(entries)
    for i in range(rows):
        row_values, row_offsets = values[i], offsets[i]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        e = np.uint64(0)
        while e < full:
            s0 += row_values[e] * x[group_start[e] + row_offsets[e]]
            s1 += row_values[e + one] * x[group_start[e + one] + row_offsets[e + one]]
            s2 += row_values[e + two] * x[group_start[e + two] + row_offsets[e + two]]
            s3 += row_values[e + three] * x[group_start[e + three] + row_offsets[e + three]]
            s4 += row_values[e + four] * x[group_start[e + four] + row_offsets[e + four]]
            s5 += row_values[e + five] * x[group_start[e + five] + row_offsets[e + five]]
            s6 += row_values[e + six] * x[group_start[e + six] + row_offsets[e + six]]
            s7 += row_values[e + seven] * x[group_start[e + seven] + row_offsets[e + seven]]
            e += eight
        if full < size:  # the last (size - full) < 8 entries go to s0, s1, ... in order
            s0 += row_values[full] * x[group_start[full] + row_offsets[full]]
        if full + one < size:
            s1 += row_values[full + one] * x[group_start[full + one] + row_offsets[full + one]]
        if full + two < size:
            s2 += row_values[full + two] * x[group_start[full + two] + row_offsets[full + two]]
        if full + three < size:
            s3 += row_values[full + three] * x[group_start[full + three] + row_offsets[full + three]]
        if full + four < size:
            s4 += row_values[full + four] * x[group_start[full + four] + row_offsets[full + four]]
        if full + five < size:
            s5 += row_values[full + five] * x[group_start[full + five] + row_offsets[full + five]]
        if full + six < size:
            s6 += row_values[full + six] * x[group_start[full + six] + row_offsets[full + six]]
        out[i] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


def nm_matmul_numba(x: np.ndarray, values: np.ndarray, offsets: np.ndarray, n: int, m: int) -> np.ndarray:
    """The Numba kernel with :func:`nm_matmul_reference`'s signature and bit-identical results.

    >>> p = NMMatrix.from_dense(np.array([[0, 2, 0, 1]], np.float32), 2, 4)
    >>> nm_matmul_numba(np.ones((1, 4), np.float32), p.values, p.offsets, 2, 4).tolist()
    [[3.0]]
    """
    rows = values.shape[0]
    group_start = (np.arange(values.shape[1], dtype=np.uint32) // n) * np.uint32(m)   # first column of e's group
    if x.shape[0] == 1:
        out = np.empty(rows, dtype=np.float32)
        _nm_matvec(np.ascontiguousarray(x[0]), values, offsets, group_start, out)
        return out.reshape(1, rows)
    out_t = np.empty((rows, x.shape[0]), dtype=np.float32)
    _nm_matmat(np.ascontiguousarray(x.T), values, offsets, group_start, out_t)
    return np.ascontiguousarray(out_t.T)


def nm_matmul(x: np.ndarray, matrix: NMMatrix, backend: str = "auto") -> np.ndarray:
    """``x @ W^T`` for a float32 input (B, cols) and W packed as an :class:`NMMatrix`.

    ``backend``: ``"auto"`` (= ``"numba"``: there is no AVX2 N:M kernel), ``"numba"`` or ``"reference"``.

    >>> w = np.array([[1, 0, 0, 2], [0, 3, 4, 0]], dtype=np.float32)
    >>> nm_matmul(np.ones((1, 4), dtype=np.float32), NMMatrix.from_dense(w, 2, 4)).tolist()
    [[3.0, 7.0]]
    """
    if not isinstance(matrix, NMMatrix):
        raise TypeError(f"nm_matmul expects an NMMatrix, got {type(matrix).__name__}")
    x = _check_input(x, matrix.shape[1], "nm_matmul")
    kernel = _backend("numba" if backend == "auto" else backend, NM_BACKENDS, nm_matmul_reference,
                      nm_matmul_numba)
    return kernel(x, matrix.values, matrix.offsets, matrix.n, matrix.m)


def _backend(backend: str, choices: tuple[str, ...], reference: Any, numba_kernel: Any) -> Any:
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return reference if backend == "reference" else numba_kernel
