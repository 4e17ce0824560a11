"""Slot-major N:M kernel: the Numba kernel equals the NumPy reference bit for bit (the summation order is the
specification) for 2:4 (its own kernel), other n at m = 4 and any other m, row slices, any number of rows
(blocks of four and the rest), groups with fewer than n non-zeros and signed zeros; both equal the dense product to
float tolerance; bad arguments are refused by name."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels.nm_sparse import NMWeight, nm_linear, nm_linear_reference, nm_row_kernel, prepare_nm
from nanoopt.kernels.sparse import NMMatrix

EXAMPLES = settings(max_examples=80, deadline=None)


def bits(y):
    """The float32 bit patterns of y (so that -0.0 and +0.0 differ), with its shape."""
    assert y.dtype == np.float32
    return y.view(np.uint32)


@st.composite
def problems(draw):
    n, m = draw(st.sampled_from([(2, 4), (2, 4), (1, 4), (3, 4), (4, 4), (1, 2), (2, 8), (3, 5), (1, 1)]))
    rows, groups, batch = draw(st.integers(1, 37)), draw(st.integers(0, 9)), draw(st.sampled_from([0, 1, 3, 4, 5,
                                                                                                   8, 11, 32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
    weight = (rng.standard_normal((rows, groups, m)) * scale).astype(np.float32)
    drop = np.argsort(rng.random((rows, groups, m)), axis=-1)[..., n:]  # random kept columns
    np.put_along_axis(weight, drop, 0.0, axis=-1)
    weight[rng.random(weight.shape) < draw(st.sampled_from([0.0, 0.3]))] = 0.0  # groups with fewer than n left
    if draw(st.booleans()):
        weight[weight == 0] = -0.0 if draw(st.booleans()) else 0.0
    x = (rng.standard_normal((batch, groups * m)) * draw(st.sampled_from([1e-20, 1.0, 1e3]))).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = draw(st.sampled_from([0.0, -0.0, 1e-40]))  # zeros and subnormals
    bias = rng.standard_normal(rows).astype(np.float32) if draw(st.booleans()) else None
    start = draw(st.integers(0, rows))
    stop = draw(st.integers(start, rows))
    return weight.reshape(rows, groups * m), n, m, x, bias, (start, stop)


@EXAMPLES
@given(problems())
def test_kernel_equals_reference_bit_for_bit(problem):
    dense, n, m, x, bias, rows = problem
    weight = prepare_nm(NMMatrix.from_dense(dense, n, m))
    for r in (rows, None):
        expected = bits(nm_linear_reference(x, weight, bias, r))
        np.testing.assert_array_equal(bits(nm_linear(x, weight, bias, r)), expected, strict=True)
        np.testing.assert_array_equal(bits(nm_linear(x, weight, bias, r, validate=False)), expected, strict=True)
        out = np.full(expected.shape, np.nan, np.float32)  # written whole, whatever it held
        assert nm_linear(x, weight, bias, r, out=out) is out
        np.testing.assert_array_equal(bits(out), expected, strict=True)


@EXAMPLES
@given(problems())
def test_reference_is_the_dense_product(problem):
    dense, n, m, x, bias, (start, stop) = problem
    weight = prepare_nm(NMMatrix.from_dense(dense, n, m))
    got = nm_linear_reference(x, weight, bias, (start, stop))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float64) @ dense.T.astype(np.float64) + (0 if bias is None else bias)
        magnitude = np.abs(x).astype(np.float64) @ np.abs(dense).T + (0 if bias is None else np.abs(bias))
    finite = np.isfinite(got)
    assert np.all(finite[np.abs(expected[:, start:stop]) < 1e37])  # no overflow where the true value is in range
    # float32 rounding of every product and sum: |error| <= (slots + 2) eps sum |x| |W| (+ |b|), plus underflow
    bound = (weight.values.shape[0] + 2) * np.finfo(np.float32).eps * magnitude[:, start:stop] + 1e-37
    assert np.all(np.abs(got - expected[:, start:stop])[finite] <= bound[finite])


def test_prepare_sorts_offsets_and_keeps_the_product():
    w = np.array([[0, 0, 5, 0, 1, 0, 0, 2]], np.float32)  # group 0 has one non-zero: a padding slot before it
    matrix = NMMatrix.from_dense(w, 2, 4)
    weight = prepare_nm(matrix)
    assert matrix.offsets.tolist() == [[2, 0, 0, 3]] and weight.offsets[:, 0].tolist() == [0, 2, 0, 3]
    x = np.arange(1, 9, dtype=np.float32)[None]
    assert nm_linear(x, weight).tolist() == [[15.0 + 5.0 + 16.0]]


def test_bad_arguments_are_refused_by_name():
    weight = prepare_nm(NMMatrix.from_dense(np.eye(4, dtype=np.float32), 1, 2))
    good = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="x must be a float32 array"):
        nm_linear(good.astype(np.float64), weight)
    with pytest.raises(ValueError, match=r"x must be a float32 array \(M, 4\)"):
        nm_linear(np.ones((1, 5), np.float32), weight)
    with pytest.raises(ValueError, match="bias must be float32"):
        nm_linear(good, weight, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="rows must satisfy"):
        nm_linear(good, weight, rows=(3, 2))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 array \(1, 4\)"):
        nm_linear(good, weight, out=np.empty((1, 3), np.float32))
    with pytest.raises(TypeError, match="must be an NMWeight"):
        nm_linear(good, NMMatrix.from_dense(np.eye(4, dtype=np.float32), 1, 2))
    with pytest.raises(TypeError, match="prepare_nm: matrix must be an NMMatrix"):
        prepare_nm(np.eye(4, dtype=np.float32))
    unsorted = NMWeight(weight.values, np.array([[1] * 4, [0] * 4], np.uint8), 2, 4, 4, 4)  # 2:4, decreasing
    with pytest.raises(ValueError, match="offsets of each group must be increasing"):
        nm_linear(good, unsorted)


@EXAMPLES
@given(problems(), st.sampled_from([(1, -1), (1, 1, -1), (-1,)]))
def test_row_kernel_equals_reference_bit_for_bit(problem, shape):
    """The one-row 2:4 kernel (a layer's batch-1 path) on inputs and outputs of any shape holding one row."""
    dense, n, m, x, bias, (start, stop) = problem
    weight = prepare_nm(NMMatrix.from_dense(dense, n, m))
    kernel = nm_row_kernel(weight)
    assert (kernel is None) == ((n, m) != (2, 4))
    if kernel is None or x.shape[0] == 0:
        return
    expected = bits(nm_linear_reference(x[:1], weight, bias, (start, stop)))
    row = np.ascontiguousarray(x[0].reshape(shape[:-1] + (x.shape[1],)))
    out = np.full(shape[:-1] + (stop - start,), np.nan, np.float32)  # written whole, whatever it held
    kernel(row, weight.values, weight.offsets, np.zeros(0, np.float32) if bias is None else bias, bias is not None,
           start, stop, out)
    np.testing.assert_array_equal(bits(out).reshape(expected.shape), expected, strict=True)
