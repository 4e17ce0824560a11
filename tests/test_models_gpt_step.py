"""GPT.generate's fused one-token step (nanoopt.float_kernels.gpt_step) for plain float32 models at batch 1: its
logits equal GPT.forward's last position to float32 rounding over a whole context, its KV cache holds what the
array path's holds, generation gives the cache-less tokens, and every other model keeps its own path."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn
from nanoopt.models_gpt import StepDecoder, resize_block


def model_with(seed, n_layer=2, n_head=2, n_embd=12, bias=True, block_size=8, vocab_size=13, weight_scale=0.5):
    """A GPT with larger weights than the init (logits far from ties), drawn from ``seed``."""
    no.manual_seed(seed)
    model = models.gpt(vocab_size, block_size, n_layer, n_head, n_embd, bias=bias)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * weight_scale
    return model.eval()


def decoder_of(model, batch=1):
    return model._step_decoder(batch)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_layer=st.integers(1, 3), n_head=st.integers(1, 3), head_dim=st.integers(1, 7),
       bias=st.booleans())
def test_step_logits_equal_the_forward_over_a_whole_context(seed, n_layer, n_head, head_dim, bias):
    model = model_with(seed, n_layer, n_head, n_head * head_dim, bias, weight_scale=0.3)
    ids = np.random.default_rng(seed).integers(0, 13, size=(1, 8))
    with no.no_grad():
        full = model(ids).data[0]  # (T, V)
    decoder = decoder_of(model)
    assert decoder is not None
    for pos in range(8):
        logits = decoder.feed(ids[0, pos:pos + 1])
        np.testing.assert_allclose(logits[0], full[pos], rtol=1e-5, atol=1e-6)
    assert decoder.length == 8


def test_a_prompt_fed_at_once_equals_token_by_token():
    model = model_with(1)
    ids = np.random.default_rng(2).integers(0, 13, size=8)
    one, many = decoder_of(model), decoder_of(model)
    for pos in range(5):
        first = one.feed(ids[pos:pos + 1])
    np.testing.assert_array_equal(many.feed(ids[:5]), first)
    np.testing.assert_array_equal(many.feed(ids[5:]), one.feed(ids[5:]))


@pytest.mark.parametrize("bias", [True, False])
def test_the_cache_holds_the_array_paths_keys_and_values(bias):
    model = model_with(4, n_layer=3, n_head=3, n_embd=15, bias=bias)
    ids = np.random.default_rng(4).integers(0, 13, size=(1, 8))
    caches = model._new_caches(1)
    with no.no_grad():
        model._array_logits(ids[:, :3], caches)
        for pos in range(3, 8):
            model._array_logits(ids[:, pos:pos + 1], caches)
    decoder = decoder_of(model)
    decoder.feed(ids[0])
    keys, values = decoder.buffers.keys, decoder.buffers.values  # (L, H, D, P), (L, H, P, D)
    for layer, cache in enumerate(caches):
        assert cache.length == 8
        np.testing.assert_allclose(keys[layer].transpose(0, 2, 1), cache.keys[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values[layer], cache.values[0], rtol=1e-5, atol=1e-6)
        assert np.abs(cache.values[0]).max() > 0.1


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_layer=st.integers(1, 3), head_dim=st.integers(1, 5), bias=st.booleans(),
       prompt=st.integers(1, 8), new=st.integers(1, 14))
def test_generation_gives_the_cacheless_tokens(seed, n_layer, head_dim, bias, prompt, new):
    model = model_with(seed, n_layer, 3, 3 * head_dim, bias)
    ids = np.random.default_rng(seed).integers(0, 13, size=(1, prompt))
    calls = []
    feed = StepDecoder.feed

    def counted(self, tokens):
        calls.append(len(tokens))
        return feed(self, tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StepDecoder, "feed", counted)
        cached = model.generate(ids, new, temperature=0.0)
    plain = model.generate(ids, new, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(cached, plain)
    assert calls == [prompt] + [1] * (min(prompt + new - 1, 8) - prompt)  # every step up to block_size positions


def test_pruned_heads_and_neurons_use_the_step():
    model = model_with(7, n_layer=2, n_head=3, n_embd=12)
    block = model.transformer["h"][1]
    state = {name: p.data.copy() for name, p in block.named_parameters()}
    resize_block(block, 2, 9)
    rng = np.random.default_rng(7)
    for p in block.parameters():
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.5
    assert set(state) == {name for name, _ in block.named_parameters()}
    ids = rng.integers(0, 13, size=(1, 8))
    decoder = decoder_of(model)
    assert decoder is not None and decoder.arrays.heads.tolist() == [3, 2] and decoder.arrays.hidden.tolist() == [48, 9]
    with no.no_grad():
        full = model(ids).data[0]
    for pos in range(8):
        np.testing.assert_allclose(decoder.feed(ids[0, pos:pos + 1])[0], full[pos], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.generate(ids[:, :2], 10, temperature=0.0),
                                  model.generate(ids[:, :2], 10, temperature=0.0, use_cache=False))


def test_other_models_keep_their_paths():
    model = model_with(3)
    assert decoder_of(model, batch=2) is None
    tanh = model_with(3)
    for block in tanh.transformer["h"]:
        block.mlp.gelu = nn.GELU(approximate="tanh")
    assert decoder_of(tanh) is None
    wide = model_with(3)
    for p in wide.parameters():
        p.data = p.data.astype(np.float64)
    assert decoder_of(wide) is None
    ids = np.random.default_rng(3).integers(0, 13, size=(1, 3))
    np.testing.assert_array_equal(tanh.generate(ids, 9, temperature=0.0),
                                  tanh.generate(ids, 9, temperature=0.0, use_cache=False))
