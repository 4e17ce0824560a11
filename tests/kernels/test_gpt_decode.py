"""The fused decode step of the W8A8 GPT equals its NumPy specification bit for bit: logits and int8 KV cache,
token after token up to the end of the context, on random operands (odd head sizes, uneven MLP widths), with
static and per-token activation grids."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import gpt_decode

PROB = (np.float32(1.0 / 255.0), -128)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 2), heads=st.integers(1, 4), head_dim=st.integers(1, 9),
       per_token=st.booleans(), hidden=st.integers(1, 40), vocab=st.integers(1, 9), context=st.integers(1, 9))
def test_kernel_equals_reference_token_after_token(seed, layers, heads, head_dim, per_token, hidden, vocab, context):
    rng = np.random.default_rng(seed)
    arrays = gpt_decode.random_arrays(rng, layers, heads * head_dim, heads, hidden, vocab, context, per_token)
    fused, reference = gpt_decode.DecodeBuffers.empty(arrays), gpt_decode.DecodeBuffers.empty(arrays)
    for pos in range(context):
        token = int(rng.integers(0, vocab))
        assert gpt_decode.decode_step(arrays, fused, token, pos, *PROB)
        expected = gpt_decode.decode_step_reference(arrays, reference, token, pos, *PROB)
        np.testing.assert_array_equal(fused.logits, expected)
        np.testing.assert_array_equal(fused.keys[:, :, :pos + 1], reference.keys[:, :, :pos + 1])
        np.testing.assert_array_equal(fused.values[:, :, :pos + 1], reference.values[:, :, :pos + 1])
    assert np.isfinite(fused.logits).all()
    if heads * head_dim > 1:  # (a LayerNorm of one value is 0: nothing to see then)
        assert np.abs(fused.logits).max() > 0


def test_a_value_that_is_not_finite_is_reported():
    arrays = gpt_decode.random_arrays(np.random.default_rng(1), 1, 8, 2, 12, 5, 4)
    arrays.wte[2, 3] = np.nan
    buffers = gpt_decode.DecodeBuffers.empty(arrays)
    assert gpt_decode.decode_step(arrays, buffers, 1, 0, *PROB)
    assert not gpt_decode.decode_step(arrays, buffers, 2, 1, *PROB)
