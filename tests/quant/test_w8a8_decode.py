"""Batch-1 generation of the converted W8A8 GPT through the fused decode kernel equals the integer GPT's own
cached steps (and so its simulation) bit for bit: logits of every step, the int8 KV cache, and the tokens, on
random small GPTs (1-2 blocks, widths 16-64, 1-4 heads, odd head sizes; static and per-token grids), from the
first cached step to the end of the context and on past it (where the window slides and the model recomputes it
without a cache)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models
from nanoopt.quant.transformer import PROB_SCALE, PROB_ZERO, W8A8Config, convert_w8a8, prepare_w8a8
from nanoopt.quant.w8a8_decode import FusedDecoder


def integer_gpt(seed, n_layer, n_head, head_dim, block_size, vocab=13, bias=True, per_token=False):
    no.manual_seed(seed)
    model = models.gpt(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_head * head_dim, bias=bias)
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():  # what training gives: non-trivial norms and biases
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            parameter.data[...] = rng.uniform(0.5, 1.5, parameter.shape).astype(np.float32)
        elif name.endswith(".bias"):
            parameter.data[...] = rng.normal(0, 0.1, parameter.shape).astype(np.float32)
        elif parameter.ndim == 2:
            parameter.data[...] = rng.normal(0, 0.3, parameter.shape).astype(np.float32)
    calibration = rng.integers(0, vocab, size=(8, block_size))
    prepared = prepare_w8a8(model, W8A8Config(per_token=per_token)).calibrate(calibration)
    return prepared, convert_w8a8(prepared)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), n_layer=st.integers(1, 2), n_head=st.integers(1, 4),
       head_dim=st.sampled_from([3, 5, 7, 9, 11, 16]), block_size=st.integers(2, 12), bias=st.booleans(),
       per_token=st.booleans())
def test_fused_steps_equal_the_integer_gpt_steps_bit_for_bit(seed, n_layer, n_head, head_dim, block_size, bias,
                                                             per_token):
    if not 16 <= n_head * head_dim <= 64:
        n_head, head_dim = 2, 9
    _, integer = integer_gpt(seed, n_layer, n_head, head_dim, block_size, bias=bias, per_token=per_token)
    decoder = FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO)
    assert decoder is not None
    tokens = np.random.default_rng(seed).integers(0, 13, size=block_size)
    fused, model = decoder.new_caches(), integer._new_caches(1)
    integer.logits(tokens[None, :1], fused)
    integer.logits(tokens[None, :1], model)
    for position in range(1, block_size):  # the cache grows to block_size
        got = decoder.step(tokens[position], fused)
        expected = integer.logits(tokens[None, position:position + 1], model, last_only=True)
        assert got.shape == expected.shape == (1, 1, 13) and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        for ours, theirs in zip(fused, model, strict=True):
            assert ours.length == theirs.length == position + 1
            np.testing.assert_array_equal(ours.keys[:, :, :position + 1], theirs.keys[:, :, :position + 1])
            np.testing.assert_array_equal(ours.values[:, :, :position + 1], theirs.values[:, :, :position + 1])
    with pytest.raises(ValueError, match="longer than block_size"):
        decoder.step(tokens[0], fused)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), n_head=st.integers(1, 4), prompt=st.integers(1, 4),
       temperature=st.sampled_from([0.0, 0.8]), per_token=st.booleans())
def test_generate_at_batch_one_equals_the_unfused_model_and_the_simulation(seed, n_head, prompt, temperature,
                                                                          per_token):
    prepared, integer = integer_gpt(seed, 2, n_head, 5, block_size=8, per_token=per_token)
    ids = np.random.default_rng(seed).integers(0, 13, size=(1, prompt))
    new = 12  # past block_size 8: the window slides, and each step recomputes it without a cache
    fused = integer.generate(ids, new, temperature=temperature, rng=np.random.default_rng(1))
    unfused = integer.generate(np.concatenate([ids, ids]), new, temperature=temperature,
                               rng=np.random.default_rng(1))  # batch 2: the model's own path
    np.testing.assert_array_equal(fused, prepared.generate(ids, new, temperature=temperature,
                                                           rng=np.random.default_rng(1)))
    if temperature == 0:  # (at batch 2 the sampler draws two numbers per step: compare greedy rows only)
        np.testing.assert_array_equal(fused[0], unfused[0])
        np.testing.assert_array_equal(fused, integer.generate(ids, new, temperature=0.0, use_cache=False))


def test_the_fused_path_is_taken_only_where_it_applies():
    prepared, integer = integer_gpt(0, 1, 2, 8, block_size=6)
    assert FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO) is not None
    assert FusedDecoder.for_model(prepared, PROB_SCALE, PROB_ZERO) is None  # the simulation
    _, per_token = integer_gpt(0, 1, 2, 8, block_size=6, per_token=True)
    assert FusedDecoder.for_model(per_token, PROB_SCALE, PROB_ZERO).arrays.per_token
    integer.blocks[0].approximate = "tanh"
    assert FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO) is None


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_value_that_is_not_finite_takes_the_model_path():
    _, integer = integer_gpt(3, 1, 2, 8, block_size=6)
    integer.wte[4] = np.inf  # LayerNorm of an infinite row is NaN: the model refuses NaN by name
    decoder = FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO)
    caches = decoder.new_caches()
    integer.logits(np.array([[1]]), caches)
    with pytest.raises(ValueError, match="NaN"):
        decoder.step(4, caches)


def test_the_decoder_is_reused_until_the_model_changes():
    _, integer = integer_gpt(5, 1, 2, 8, block_size=6)
    first = FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO)
    assert FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO) is first
    prompt = np.array([[1, 2]])
    before = integer.generate(prompt, 3, temperature=0.0)
    integer.blocks[0].ln_2.weight.data[...] *= -1  # edited in place: the next generation sees it
    integer.ln_f.bias.data[...] += 1
    second = FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO)
    assert second is not first
    after = integer.generate(prompt, 3, temperature=0.0)
    np.testing.assert_array_equal(after, integer.generate(np.concatenate([prompt, prompt]), 3, temperature=0.0)[:1])
    assert not np.array_equal(before, after)


def test_generations_in_two_threads_do_not_share_a_cache():
    from concurrent.futures import ThreadPoolExecutor

    _, integer = integer_gpt(6, 2, 2, 8, block_size=12)
    prompts = [np.array([[1]]), np.array([[7, 3]])]
    expected = [integer.generate(p, 10, temperature=0.0) for p in prompts]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            got = list(pool.map(lambda p: integer.generate(p, 10, temperature=0.0), prompts * 4))
            for i, out in enumerate(got):
                np.testing.assert_array_equal(out, expected[i % 2])
    with pytest.raises(TypeError, match="caches must come from new_caches"):
        FusedDecoder.for_model(integer, PROB_SCALE, PROB_ZERO).step(1, integer._new_caches(1))
