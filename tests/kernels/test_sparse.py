"""Sparse kernels: every backend equals the NumPy reference bit for bit (the summation order is the specification);
all equal a dense product to float tolerance; formats round-trip and interoperate with scipy.sparse; the AVX2 path
is used only where it can run."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import sparse, sparse_avx2

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=50, deadline=None)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def assert_same_bits(got, expected):
    """Bit-identical float32 arrays: NaN where the other has NaN, equal bit patterns elsewhere (so +0.0 != -0.0).

    NaN payloads are left out: IEEE 754 does not fix which NaN an operation returns.
    """
    assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def dense_bound(weight, x):
    """|y - x W^T| <= 2 * cols * eps * (|x| |W|^T): any summation order of float32 products."""
    return 2 * weight.shape[1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(weight).T)


def random_values(rng, kind, size):
    """float32 values: ``normal`` (scaled normal), ``wide`` (|v| from 1e-45 to 1e38, subnormals included) or
    ``extreme`` (+-FLOAT32_MAX, +-1, +-the smallest subnormal, +-0.0): all finite, products may overflow."""
    if kind == "normal":
        return (rng.standard_normal(size) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], size)
    if kind == "wide":
        return (sign * 10.0 ** rng.uniform(-45, 38, size)).astype(np.float32)
    return (sign * rng.choice([FLOAT32_MAX, 1.0, 1e-45, 0.0], size)).astype(np.float32)


@st.composite
def csr_cases(draw):
    """A CSR matrix with rows of 0..20 stored entries (empty rows included), 1..2000 columns, and an input x."""
    rows, cols, batch = draw(st.integers(1, 12)), draw(st.integers(1, 2000)), draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["normal", "normal", "wide", "extreme"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = rng.integers(0, min(20, cols) + 1, size=rows)
    lengths[rng.random(rows) < draw(st.floats(0, 0.5))] = 0
    shuffle = draw(st.booleans())  # columns in storage order need not ascend: the order is the stored one
    columns = [rng.choice(cols, size=n, replace=False) for n in lengths]
    columns = [c if shuffle else np.sort(c) for c in columns]
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(columns).astype(np.int32) if rows else np.zeros(0, np.int32)
    data = random_values(rng, kind, indices.size)
    x = random_values(rng, kind, (batch, cols)).reshape(batch, cols)
    return sparse.CSRMatrix(data, indices, indptr, (rows, cols)), x, kind


@pytest.fixture(scope="session")
def csr_backend(require_avx2_kernel):
    """``csr_backend(name)``: the backend ``name``, or a skip when it is AVX2 and this machine cannot run it (a
    failure if it should)."""

    def check(name):
        if name in ("avx2", "avx2-raw"):
            require_avx2_kernel(sparse_avx2.available(), "the sparse AVX2 kernel")
        return name

    return check


@pytest.mark.parametrize("backend", ["numba", "avx2", "avx2-raw", "auto"])
@SETTINGS
@given(case=csr_cases())
def test_csr_backends_equal_the_reference_bit_for_bit(csr_backend, backend, case):
    matrix, x, kind = case
    csr_backend(backend)
    with np.errstate(over="ignore", invalid="ignore"):  # extreme values overflow: inf and NaN are results too
        expected = sparse.csr_matmul(x, matrix, backend="reference")
    if backend == "avx2-raw":
        got = sparse_avx2.csr_matmul_avx2(x, matrix.data, matrix.indices, matrix.indptr, matrix.shape[0])
    else:
        got = sparse.csr_matmul(x, matrix, backend=backend)
    assert_same_bits(got, expected)
    if kind == "normal":
        weight = matrix.to_dense()
        error = np.abs(expected.astype(np.float64) - x.astype(np.float64) @ weight.T.astype(np.float64))
        assert np.all(error <= dense_bound(weight, x))


def test_the_reference_sums_eight_lanes_in_the_fixed_tree():
    """Entry e goes to partial sum e mod 8 and the tree is ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)): a case where
    another order (one running sum, or 4 lanes) gives a different float32 result."""
    values = np.array([2.0**24, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -(2.0**24)], np.float32)
    matrix = sparse.CSRMatrix.from_dense(values.reshape(1, -1))
    x = np.ones((1, values.size), np.float32)
    # s0 = 2^24 + (-2^24) = 0, s1..s7 = 1: the tree gives 7 exactly; a running sum would lose the ones.
    assert sparse.csr_matmul(x, matrix, backend="reference").tolist() == [[7.0]]
    for backend in ("numba", "auto"):
        assert sparse.csr_matmul(x, matrix, backend=backend).tolist() == [[7.0]]


def test_avx2_tails_ignore_the_entries_of_the_next_row(csr_backend):
    """A row tail reads a whole block of 8 (into the next row) and must drop the extra lanes, even when those
    products are inf or NaN; the last row's tail (past the end of the arrays) takes the masked path."""
    csr_backend("avx2")
    cols = 16
    weight = np.zeros((3, cols), np.float32)
    weight[0, :3] = [1.0, 2.0, 3.0]               # tail of 3: its block also reads row 1's entries
    weight[1, 3:14] = FLOAT32_MAX                 # 11 entries: one block and a tail of 3 (reads row 2)
    weight[2, 14:] = [5.0, 7.0]                   # the last 2 entries of the arrays: masked loads
    matrix = sparse.CSRMatrix.from_dense(weight)
    x = np.ones((1, cols), np.float32)
    x[0, 3:14] = [np.inf, np.nan, *([1e10] * 9)]  # row 1's products are inf or NaN
    got = sparse.csr_matmul(x, matrix, backend="avx2")
    assert got[0, 0] == 6.0 and got[0, 2] == 12.0
    with np.errstate(over="ignore", invalid="ignore"):
        assert_same_bits(got, sparse.csr_matmul(x, matrix, backend="reference"))


def test_avx2_handles_matrices_with_fewer_than_eight_entries_and_empty_ones(csr_backend):
    csr_backend("avx2")
    for weight in (np.zeros((4, 5), np.float32), np.diag(np.arange(1.0, 4.0, dtype=np.float32))):
        matrix = sparse.CSRMatrix.from_dense(weight)
        x = np.arange(weight.shape[1], dtype=np.float32).reshape(1, -1) + 1
        assert_same_bits(sparse.csr_matmul(x, matrix, backend="avx2"), (x @ weight.T).astype(np.float32))


def test_auto_uses_avx2_for_small_batches_only_and_both_give_the_same_bits():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((30, 50)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.8] = 0.0
    matrix = sparse.CSRMatrix.from_dense(weight)
    for batch in (1, sparse.AVX2_MAX_BATCH, sparse.AVX2_MAX_BATCH + 1):
        x = rng.standard_normal((batch, 50)).astype(np.float32)
        assert_same_bits(sparse.csr_matmul(x, matrix), sparse.csr_matmul(x, matrix, backend="numba"))


@pytest.mark.parametrize("backend", ["numba", "avx2", "auto"])
def test_inputs_in_any_memory_layout_give_the_same_bits(csr_backend, backend):
    csr_backend(backend)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((20, 40)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.7] = 0.0
    matrix = sparse.CSRMatrix.from_dense(weight)
    wide = rng.standard_normal((3, 80)).astype(np.float32)
    expected = sparse.csr_matmul(np.ascontiguousarray(wide[:, ::2]), matrix, backend="reference")
    for x in (wide[:, ::2], np.asfortranarray(wide[:, ::2]), wide[:1, ::2]):
        assert_same_bits(sparse.csr_matmul(x, matrix, backend=backend), expected[: x.shape[0]])


def test_disable_switch_turns_the_avx2_path_off(avx2_switched_off):
    matrix = sparse.CSRMatrix.from_dense(np.eye(3, dtype=np.float32))
    x = np.ones((1, 3), np.float32)
    assert sparse_avx2.available() is False
    assert sparse.csr_matmul(x, matrix).tolist() == [[1.0, 1.0, 1.0]]   # "auto" falls back to Numba
    with pytest.raises(RuntimeError, match="not available"):
        sparse.csr_matmul(x, matrix, backend="avx2")
    with pytest.raises(RuntimeError, match="not available"):
        sparse_avx2.csr_matmul_avx2(x, matrix.data, matrix.indices, matrix.indptr, 3)


def test_generic_numba_target_runs_the_portable_kernel_without_crashing(on_generic_target):
    """Under NUMBA_CPU_NAME=generic LLVM would abort on x86 intrinsics: the AVX2 path must say no first."""
    code = ("import numpy as np; from nanoopt.kernels import sparse, sparse_avx2; "
            "m = sparse.CSRMatrix.from_dense(np.eye(9, dtype=np.float32)); "
            "print(sparse_avx2.available(), sparse.csr_matmul(np.ones((1, 9), np.float32), m).sum())")
    assert on_generic_target(code).split() == ["False", "9.0"]


def test_avx2_entry_point_refuses_bad_arrays():
    matrix = sparse.CSRMatrix.from_dense(np.eye(3, dtype=np.float32))
    x = np.ones((1, 3), np.float32)
    data, indices, indptr = matrix.data, matrix.indices, matrix.indptr
    with pytest.raises(TypeError, match="x must be a float32"):
        sparse_avx2.csr_matmul_avx2(x.astype(np.float64), data, indices, indptr, 3)
    with pytest.raises(TypeError, match="data must be"):
        sparse_avx2.csr_matmul_avx2(x, data.astype(np.float64), indices, indptr, 3)
    with pytest.raises(TypeError, match="indices must be"):
        sparse_avx2.csr_matmul_avx2(x, data, indices.astype(np.int64), indptr, 3)
    with pytest.raises(TypeError, match="indptr must be"):
        sparse_avx2.csr_matmul_avx2(x, data, indices, indptr.astype(np.int32), 3)
    with pytest.raises(ValueError, match="rows \\+ 1 = 4"):
        sparse_avx2.csr_matmul_avx2(x, data, indices, indptr[:-1], 3)
    with pytest.raises(ValueError, match="from 0 to nnz"):
        sparse_avx2.csr_matmul_avx2(x, data, indices, np.array([0, 1, 2, 2], np.int64), 3)
    if sparse_avx2.available():
        with pytest.raises(ValueError, match="never decrease"):
            sparse_avx2.csr_matmul_avx2(x, data, indices, np.array([0, 2, 1, 3], np.int64), 3)


@st.composite
def nm_cases(draw):
    rows, batch = draw(st.integers(1, 12)), draw(st.sampled_from([1, 2, 3, 5, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    cols = m * draw(st.integers(1, 6))
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    weight[rng.random((rows, cols)) < draw(st.floats(0, 1))] = 0.0          # any density, empty rows included
    x = (rng.standard_normal((batch, cols)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))).astype(np.float32)
    return weight, x, n, m


@SETTINGS
@given(nm_cases())
def test_nm_numba_equals_the_reference_bit_for_bit(case):
    weight, x, n, m = case
    groups = np.abs(weight).reshape(weight.shape[0], -1, m)
    keep = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    mask = np.zeros_like(groups)
    np.put_along_axis(mask, keep, 1.0, axis=-1)
    weight = weight * mask.reshape(weight.shape)
    matrix = sparse.NMMatrix.from_dense(weight, n=n, m=m)
    np.testing.assert_array_equal(matrix.to_dense(), weight)
    expected = sparse.nm_matmul(x, matrix, backend="reference")
    assert_same_bits(sparse.nm_matmul(x, matrix), expected)
    error = np.abs(expected.astype(np.float64) - x.astype(np.float64) @ weight.T.astype(np.float64))
    assert np.all(error <= dense_bound(weight, x))


@SETTINGS
@given(csr_cases())
def test_csr_round_trips_through_dense_and_scipy(case):
    matrix, x, kind = case
    weight = matrix.to_dense()
    theirs = matrix.to_scipy()
    np.testing.assert_array_equal(theirs.toarray(), weight)
    again = sparse.CSRMatrix.from_scipy(theirs)          # sorted columns, explicit zeros kept
    np.testing.assert_array_equal(again.to_dense(), weight)
    if kind == "normal":
        np.testing.assert_allclose(sparse.csr_matmul(x, theirs), (theirs @ x.T).T, rtol=1e-4,
                                   atol=float(dense_bound(weight, x).max(initial=0)) + 1e-30)


def test_from_dense_keeps_the_nonzeros_in_row_order():
    weight = np.array([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    matrix = sparse.CSRMatrix.from_dense(weight)
    assert matrix.data.tolist() == [2.0, -1.0, 3.0]
    assert matrix.indices.tolist() == [1, 3, 0] and matrix.indptr.tolist() == [0, 2, 2, 3]
    np.testing.assert_array_equal(matrix.to_dense(), weight)


def test_scipy_formats_other_than_csr_are_accepted_and_duplicates_summed():
    coo = scipy.sparse.coo_matrix((np.array([1.0, 2.0, 3.0], np.float32), ([0, 0, 1], [1, 1, 0])), shape=(2, 2))
    matrix = sparse.CSRMatrix.from_scipy(coo)
    np.testing.assert_array_equal(matrix.to_dense(), [[0.0, 3.0], [3.0, 0.0]])


def test_bad_inputs_are_refused_with_clear_errors():
    with pytest.raises(TypeError, match="astype"):
        sparse.CSRMatrix.from_scipy(scipy.sparse.eye(3))                         # float64
    with pytest.raises(TypeError, match="float32"):
        sparse.CSRMatrix.from_dense(np.eye(3))
    matrix = sparse.CSRMatrix.from_dense(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        sparse.csr_matmul(np.ones((2, 4), np.float32), matrix)
    with pytest.raises(ValueError, match="float32"):
        sparse.csr_matmul(np.ones((2, 3)), matrix)
    with pytest.raises(ValueError, match="column indices"):
        sparse.CSRMatrix(np.ones(1, np.float32), np.array([5], np.int32), np.array([0, 1], np.int64), (1, 3))
    with pytest.raises(ValueError, match="indptr"):
        sparse.CSRMatrix(np.ones(1, np.float32), np.array([0], np.int32), np.array([0, 2], np.int64), (1, 3))
    with pytest.raises(ValueError, match="contiguous"):
        sparse.CSRMatrix(np.ones(4, np.float32)[::2], np.array([0, 1], np.int32), np.array([0, 2], np.int64), (1, 3))
    with pytest.raises(ValueError, match="more than n=2"):
        sparse.NMMatrix.from_dense(np.ones((1, 4), np.float32), 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        sparse.NMMatrix.from_dense(np.ones((1, 6), np.float32), 2, 4)
    with pytest.raises(ValueError, match="distinct"):
        sparse.NMMatrix(np.ones((1, 2), np.float32), np.zeros((1, 2), np.uint8), 2, 4, (1, 4))
    with pytest.raises(ValueError, match="backend"):
        sparse.csr_matmul(np.ones((1, 3), np.float32), matrix, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        sparse.nm_matmul(np.ones((1, 4), np.float32), sparse.NMMatrix.from_dense(np.eye(4, dtype=np.float32)),
                         backend="avx2")
