"""Sparse kernels: Numba equals the NumPy reference bit for bit; both equal a dense product to float tolerance;
formats round-trip and interoperate with scipy.sparse."""

import numpy as np
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import sparse

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def sparse_cases(draw, nm=False):
    rows, batch = draw(st.integers(1, 12)), draw(st.sampled_from([1, 2, 3, 5, 8]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if nm:
        m = draw(st.integers(1, 8))
        n = draw(st.integers(1, m))
        cols = m * draw(st.integers(1, 6))
    else:
        n = m = None
        cols = draw(st.integers(1, 40))
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    weight[rng.random((rows, cols)) < draw(st.floats(0, 1))] = 0.0          # any density, empty rows included
    x = (rng.standard_normal((batch, cols)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))).astype(np.float32)
    return weight, x, n, m


def dense_bound(weight, x):
    """|y - x W^T| <= 2 * cols * eps * (|x| |W|^T): any summation order of float32 products."""
    return 2 * weight.shape[1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(weight).T)


@SETTINGS
@given(sparse_cases())
def test_csr_numba_equals_the_reference_bit_for_bit(case):
    weight, x, _, _ = case
    matrix = sparse.CSRMatrix.from_dense(weight)
    expected = sparse.csr_matmul(x, matrix, backend="reference")
    got = sparse.csr_matmul(x, matrix)
    assert got.dtype == np.float32 and got.shape == (x.shape[0], weight.shape[0])
    np.testing.assert_array_equal(got, expected)
    error = np.abs(expected.astype(np.float64) - x.astype(np.float64) @ weight.T.astype(np.float64))
    assert np.all(error <= dense_bound(weight, x))


@SETTINGS
@given(sparse_cases(nm=True))
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
    np.testing.assert_array_equal(sparse.nm_matmul(x, matrix), expected)
    error = np.abs(expected.astype(np.float64) - x.astype(np.float64) @ weight.T.astype(np.float64))
    assert np.all(error <= dense_bound(weight, x))


@SETTINGS
@given(sparse_cases())
def test_csr_round_trips_through_dense_and_scipy(case):
    weight, x, _, _ = case
    matrix = sparse.CSRMatrix.from_dense(weight)
    assert matrix.nnz == np.count_nonzero(weight)
    np.testing.assert_array_equal(matrix.to_dense(), weight)
    theirs = matrix.to_scipy()
    np.testing.assert_array_equal(theirs.toarray(), weight)
    again = sparse.CSRMatrix.from_scipy(theirs)
    np.testing.assert_array_equal(sparse.csr_matmul(x, again), sparse.csr_matmul(x, matrix))
    np.testing.assert_allclose(sparse.csr_matmul(x, theirs), (theirs @ x.T).T, rtol=1e-4,
                               atol=float(dense_bound(weight, x).max(initial=0)) + 1e-30)


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
    with pytest.raises(ValueError, match="more than n=2"):
        sparse.NMMatrix.from_dense(np.ones((1, 4), np.float32), 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        sparse.NMMatrix.from_dense(np.ones((1, 6), np.float32), 2, 4)
    with pytest.raises(ValueError, match="distinct"):
        sparse.NMMatrix(np.ones((1, 2), np.float32), np.zeros((1, 2), np.uint8), 2, 4, (1, 4))
    with pytest.raises(ValueError, match="backend"):
        sparse.csr_matmul(np.ones((1, 3), np.float32), matrix, backend="cuda")
