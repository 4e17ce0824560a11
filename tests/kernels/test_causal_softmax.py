"""The fused causal softmax equals NumPy's sequence of operations (attention_forward's softmax) bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.float_kernels.causal_softmax import causal_softmax_, causal_softmax_reference
from nanoopt.ops_transformer import attention_forward


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(0, 12), st.floats(1e-3, 4.0), st.integers(0, 2**32 - 1),
       st.sampled_from([1.0, 30.0, 1e4]))
def test_fused_passes_equal_numpys_operations_exactly(lead, queries, offset, scale, seed, spread):
    keys = queries + offset if offset < 6 else queries + offset - 6  # a cache's continuation, or fewer keys
    scores = (np.random.default_rng(seed).standard_normal((lead, queries, keys)) * spread).astype(np.float32)
    expected = causal_softmax_reference(scores, scale, offset)
    out = causal_softmax_(scores.copy(), scale, offset)
    np.testing.assert_array_equal(out, expected)
    seen = np.minimum(np.arange(queries) + offset + 1, keys)
    assert np.all(out.sum(axis=-1) > 0.999) and np.all(out.sum(axis=-1) < 1.001)
    assert all((out[:, i, seen[i]:] == 0).all() for i in range(queries))  # masked keys get exactly 0


def test_it_is_attention_forwards_softmax():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 4, 7, 8)).astype(np.float32), rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    v = np.eye(9, dtype=np.float32)[None, None]  # out = the probabilities
    bias = np.triu(np.full((7, 9), -np.inf, np.float32), k=3)
    expected, probs, _ = attention_forward(q, k, v, bias, 0.25, None, True)
    np.testing.assert_array_equal(causal_softmax_(np.matmul(q, np.swapaxes(k, -1, -2)), 0.25, 2), probs)


def test_a_nan_spreads_over_its_row_as_in_numpy():
    scores = np.zeros((1, 3, 3), np.float32)
    scores[0, 2, 1] = np.nan
    out = causal_softmax_(scores.copy(), 1.0, 0)
    np.testing.assert_array_equal(out, causal_softmax_reference(scores, 1.0, 0))
    assert np.isnan(out[0, 2]).all() and not np.isnan(out[0, :2]).any()


def test_bad_input_is_refused_by_name():
    with pytest.raises(TypeError, match="expected a non-empty C-contiguous float32 array"):
        causal_softmax_(np.zeros((2, 2)), 1.0, 0)
    with pytest.raises(TypeError, match="C-contiguous"):
        causal_softmax_(np.zeros((3, 2), np.float32).T, 1.0, 0)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        causal_softmax_(np.zeros((2, 2), np.float32), 1.0, -1)
