"""The fused float32 decode step equals its NumPy specification bit for bit: logits and KV cache, token after token
up to the end of the context, on random operands (odd head sizes, pruned heads, uneven MLP widths, no biases)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.float_kernels import gpt_step


def assert_same_cache(arrays, fused, reference, length):
    """The first ``length`` positions of every block's keys and values (its own heads) are equal."""
    for layer, h in enumerate(arrays.heads):
        np.testing.assert_array_equal(fused.keys[layer, :h, :, :length], reference.keys[layer, :h, :, :length])
        np.testing.assert_array_equal(fused.values[layer, :h, :length], reference.values[layer, :h, :length])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 3), heads=st.integers(1, 4), head_dim=st.integers(1, 9),
       hidden=st.integers(1, 40), vocab=st.integers(1, 9), context=st.integers(1, 9), bias=st.booleans())
def test_kernel_equals_reference_token_after_token(seed, layers, heads, head_dim, hidden, vocab, context, bias):
    rng = np.random.default_rng(seed)
    arrays = gpt_step.random_arrays(rng, layers, heads * head_dim, heads, hidden, vocab, context, bias)
    buffers = [gpt_step.StepBuffers.empty(arrays) for _ in range(2)]  # the kernel's, the reference's
    for pos, token in enumerate(rng.integers(0, vocab, size=context).tolist()):
        gpt_step.gpt_step(arrays, buffers[0], token, pos)
        np.testing.assert_array_equal(buffers[0].logits, gpt_step.gpt_step_reference(arrays, buffers[1], token, pos))
        assert_same_cache(arrays, *buffers, pos + 1)
    assert np.isfinite(buffers[0].logits).all()
    if heads * head_dim > 1:  # (a LayerNorm of one value is 0: nothing to see then)
        assert np.abs(buffers[0].logits).max() > 0


def test_the_reference_is_the_float64_formula_to_float32_rounding():
    """The specification itself: one step at position 0 (attention returns v) against the formula in float64."""
    rng = np.random.default_rng(3)
    p = gpt_step.random_arrays(rng, 2, 12, 3, 20, 7, 4)
    logits = gpt_step.gpt_step_reference(p, gpt_step.StepBuffers.empty(p), 5, 0).astype(np.float64)

    def norm(x, w, b, eps):
        return (x - x.mean()) / np.sqrt(x.var() + eps) * w + b

    def gelu(x):
        from math import erf
        return np.array([v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in x])

    x = p.wte[5].astype(np.float64) + p.wpe[0]
    for layer in range(2):
        i, f = p.heads[layer] * p.head_dim, p.hidden[layer]
        qkv = norm(x, p.ln[layer, 0], p.ln[layer, 1], p.ln_eps[layer, 0]) @ p.w_attn[layer, :, :3 * i] \
            + p.b_attn[layer, :3 * i]
        x = x + qkv[2 * i:] @ p.w_proj[layer, :i] + p.b_proj[layer]  # one position: the softmax is 1
        u = norm(x, p.ln[layer, 2], p.ln[layer, 3], p.ln_eps[layer, 1]) @ p.w_fc[layer, :, :f] + p.b_fc[layer, :f]
        x = x + gelu(u) @ p.w_mlp[layer, :f] + p.b_mlp[layer]
    expected = norm(x, p.ln_f[0], p.ln_f[1], p.ln_f[2, 0]) @ p.w_head
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits, expected + 1e-2)


def test_bad_operands_are_named():
    rng = np.random.default_rng(0)
    good = gpt_step.random_arrays(rng, 1, 8, 2, 12, 5, 4)
    c, f = np.ones(8, np.float32), np.float32
    block = gpt_step.BlockWeights((c, None, 1e-5), (np.zeros((8, 24), f), None), (np.zeros((8, 8), f), None),
                                  (c, None, 1e-5), (np.zeros((8, 12), np.float64), None),
                                  (np.zeros((12, 8), f), None), 2)
    with pytest.raises(ValueError, match=r"blocks\[0\]\.fc W\^T must be a float32 array of shape \(8, 12\)"):
        gpt_step.step_arrays(good.wte, good.wpe, [block], (c, None, 1e-5), good.w_head, 4)
    with pytest.raises(ValueError, match=r"w_head must be a float32 array of shape \(8, 5\)"):
        gpt_step.step_arrays(good.wte, good.wpe, [block._replace(fc=(np.zeros((8, 12), f), None))],
                             (c, None, 1e-5), good.w_head.T.copy(), 4)
    with pytest.raises(ValueError, match=r"blocks\[0\]\.attn W\^T"):
        gpt_step.step_arrays(good.wte, good.wpe, [block._replace(heads=3, fc=(np.zeros((8, 12), f), None))],
                             (c, None, 1e-5), good.w_head, 4)
