"""models.gpt: nanoGPT's architecture, names and initialisation; generation with and without the KV cache."""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import data, models
from nanoopt.gradcheck import check_grads
from nanoopt.models_gpt import _attend, _causal_self_attention, _WindowBlocks, resize_block
from nanoopt.nn import functional as F
from nanoopt.nn.attention_functional import causal_bias
from nanoopt.ops import Context
from nanoopt.ops_transformer import SelfAttentionQKV, attention_forward


def small(**kwargs):
    no.manual_seed(0)
    config = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=12) | kwargs
    return models.gpt(**config)


def test_names_tying_and_initialisation():
    no.manual_seed(0)
    model = models.gpt(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    state = model.state_dict()
    assert list(state)[:4] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                               "transformer.h.0.ln_1.bias"]
    assert list(state)[-1] == "lm_head.weight" and "transformer.h.3.mlp.c_proj.bias" in state
    assert model.lm_head.weight is model.transformer["wte"].weight
    assert len(list(model.parameters())) == len(state) - 1  # the tied weight counts once
    assert abs(state["transformer.h.0.attn.c_attn.weight"].std() - 0.02) < 0.001
    assert abs(state["transformer.h.2.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.0005
    assert np.all(state["transformer.h.1.mlp.c_fc.bias"] == 0)


def test_no_bias_variant_has_no_bias_keys():
    assert not any(k.endswith("bias") for k in small(bias=False).state_dict())


def test_forward_gradients_by_finite_differences():
    model = small(n_embd=6, n_head=3, block_size=4, n_layer=1)  # odd head dimension (2) and 3 heads
    ids = np.array([[1, 5, 2, 7]])
    targets = np.array([3, 1, 0, 12])
    head = model.transformer["h"][0]
    slots = [(head.attn.c_attn, "weight"), (head.mlp.c_fc, "bias"), (model.lm_head, "weight")]
    originals = [m._parameters[n] for m, n in slots]

    def loss(*values):
        for (m, n), v in zip(slots, values, strict=True):
            m._parameters[n] = v
        model.transformer["wte"]._parameters["weight"] = values[2]  # keep the tie
        return F.cross_entropy(model(ids).reshape((-1, 13)), targets)

    try:
        check_grads(loss, [o.data for o in originals], rtol=1e-4, atol=1e-6)
    finally:
        for (m, n), v in zip(slots, originals, strict=True):
            m._parameters[n] = v
        model.transformer["wte"]._parameters["weight"] = originals[2]


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 14), st.integers(0, 2**32 - 1))
def test_generate_with_cache_gives_the_cacheless_tokens(batch, prompt, new, seed):
    model = small()
    rng = np.random.default_rng(seed)
    for p in model.parameters():  # larger weights than the init, so that logits are far from ties
        p.data[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.5
    ids = rng.integers(0, 13, size=(batch, prompt))
    cached = model.generate(ids, new, temperature=0.0)
    plain = model.generate(ids, new, temperature=0.0, use_cache=False)
    assert cached.shape == (batch, prompt + new) and np.array_equal(cached[:, :prompt], ids)
    np.testing.assert_array_equal(cached, plain)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 3), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_window_attention_gives_the_operator_bits(batch, t, heads, head_dim, seed):
    qkv = (np.random.default_rng(seed).standard_normal((batch, t, 3 * heads * head_dim)) * 4).astype(np.float32)
    expected = SelfAttentionQKV.forward(Context(SelfAttentionQKV), qkv, num_heads=heads, bias=causal_bias(t, t))
    np.testing.assert_array_equal(_causal_self_attention(qkv, heads, head_dim), expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.booleans(), st.integers(0, 2**32 - 1))
def test_array_attention_gives_attention_forwards_bits(queries, extra, masked, seed):
    rng = np.random.default_rng(seed)
    keys = queries + extra
    q, k, v = ((rng.standard_normal((2, 3, n, 5)) * 4).astype(np.float32) for n in (queries, keys, keys))
    bias = np.triu(np.full((queries, keys), -np.inf, np.float32), k=extra + 1) if masked else None
    expected, _, _ = attention_forward(q, k, v, bias, 0.3, None, True)
    np.testing.assert_array_equal(_attend(q, k, v, 0.3, extra if masked else None), expected)


def test_window_recompute_equals_the_full_forward():
    model = small()
    ids = np.random.default_rng(1).integers(0, 13, size=(2, 8))
    with no.no_grad():
        full = model(ids).data[:, -1]
    np.testing.assert_allclose(model._array_logits(ids), full, rtol=1e-5, atol=1e-6)


def test_cached_logits_equal_the_full_forward():
    model = small()
    ids = np.random.default_rng(0).integers(0, 13, size=(2, 8))
    full = model(ids).data
    caches = model._new_caches(2)
    with no.no_grad():
        first = model._logits_with_cache(ids[:, :5], caches)
        steps = [model._logits_with_cache(ids[:, i:i + 1], caches) for i in range(5, 8)]
    np.testing.assert_allclose(first, full[:, 4], rtol=1e-5, atol=1e-6)
    for i, logits in zip(range(5, 8), steps, strict=True):
        np.testing.assert_allclose(logits, full[:, i], rtol=1e-5, atol=1e-6)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = small()
    ids = np.zeros((2, 1), dtype=np.int64)
    a = model.generate(ids, 10, rng=np.random.default_rng(5))
    b = model.generate(ids, 10, rng=np.random.default_rng(5), use_cache=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.generate(ids, 10, top_k=1), model.generate(ids, 10, temperature=0.0))
    assert model.training  # restored


def test_bad_input_is_refused_with_the_shapes():
    model = small()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 12\], got range \[0, 13\]"):
        model(np.array([[0, 13]]))
    with pytest.raises(ValueError, match="a sequence of length 9 is longer than block_size 8"):
        model(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match=r"expected token ids \(B, T\) with T >= 1, got shape \(4,\)"):
        model.generate(np.zeros(4, dtype=np.int64), 3)
    with pytest.raises(ValueError, match=r"n_embd \(10\) must be divisible by n_head \(4\)"):
        models.gpt(13, 8, 1, 4, 10)


def test_checkpoint_round_trip_with_the_tokenizer():
    model = small()
    tokenizer = data.CharTokenizer("abcdefghijklm")
    path = os.path.join(tempfile.mkdtemp(), "gpt.npz")
    no.io.save(model.checkpoint_state(tokenizer), path)
    restored, restored_tokenizer = models.GPT.from_checkpoint_state(no.io.load(path))
    assert restored_tokenizer.vocab == tokenizer.vocab and restored.config == model.config
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(restored(ids).data, model(ids).data)


def test_equals_pytorch_nanogpt_values_and_gradients():
    torch = pytest.importorskip("torch", reason="comparison with PyTorch needs torch (optional extra)")
    from benchmarks.torch_gpt import TorchGPT

    torch.manual_seed(0)
    theirs = TorchGPT(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=12)
    ours = small()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    ids = np.random.default_rng(0).integers(0, 13, size=(3, 8))
    targets = np.random.default_rng(1).integers(0, 13, size=(3, 8))
    logits = ours(ids)
    reference = theirs(torch.from_numpy(ids))
    np.testing.assert_allclose(logits.data, reference.detach().numpy(), rtol=1e-4, atol=1e-5)
    F.cross_entropy(logits.reshape((-1, 13)), targets.reshape(-1)).backward()
    torch.nn.functional.cross_entropy(reference.view(-1, 13), torch.from_numpy(targets).view(-1)).backward()
    ours_grads = dict(ours.named_parameters())
    for name, parameter in theirs.named_parameters():
        np.testing.assert_allclose(ours_grads[name].grad, parameter.grad.numpy(), rtol=1e-3, atol=1e-6,
                                   err_msg=name)
    prompt = ids[:1, :3]
    np.testing.assert_array_equal(ours.generate(prompt, 20, temperature=0.0),
                                  theirs.generate(torch.from_numpy(prompt), 20, temperature=0.0).numpy())


def test_array_logits_equal_the_forward_and_hooked_models_take_the_module_path():
    model = small().eval()
    ids = np.random.default_rng(3).integers(0, 13, size=(2, 8))
    np.testing.assert_allclose(model._array_logits(ids), model(ids).data[:, -1], rtol=1e-5, atol=1e-6)
    caches = model._new_caches(2)
    np.testing.assert_allclose(model._array_logits(ids[:, :5], caches), model(ids[:, :5]).data[:, -1], rtol=1e-5,
                               atol=1e-6)
    for i in range(5, 8):
        np.testing.assert_allclose(model._array_logits(ids[:, i:i + 1], caches), model(ids[:, :i + 1]).data[:, -1],
                                   rtol=1e-5, atol=1e-6)
    assert model._plain()
    seen = []
    model.transformer["h"][1].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not model._plain()
    hooked = model.generate(ids[:1, :2], 10, temperature=0.0)  # slides past block_size 8, through the modules
    assert len(seen) == 10
    np.testing.assert_array_equal(hooked, model.generate(ids[:1, :2], 10, temperature=0.0, use_cache=False))


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 4), st.integers(1, 8), st.booleans(), st.booleans())
def test_the_window_blocks_give_the_bits_of_the_array_path(seed, layers, length, bias, pruned):
    """The blocks before the last of a batch-1 window, on preallocated buffers without the wrappers' checks
    (``_WindowBlocks``), give the array path's logits bit for bit with BLAS products, and the forward's to float32
    rounding with the register tiles (where available), with or without biases, with blocks of fewer heads (head
    pruning) and for every window length."""
    no.manual_seed(seed % 1000)
    model = models.gpt(vocab_size=11, block_size=8, n_layer=layers, n_head=3, n_embd=12, bias=bias).eval()
    if pruned:
        resize_block(model.transformer["h"][0], n_head=2, mlp_hidden=20)
    rng = np.random.default_rng(seed)
    for parameter in model.parameters():  # biases and LayerNorm parameters away from their initial 0 and 1
        parameter.data = rng.normal(0.0, 0.3, parameter.data.shape).astype(np.float32)
    ids = rng.integers(0, 11, size=(1, length))
    plan = model._array_plan()
    assert plan[2] is not None and len(plan[2].blocks) == layers - 1
    by_blas = plan[:2] + (_WindowBlocks.build(plan[0][:-1], tiles=False),)
    np.testing.assert_array_equal(model._array_logits(ids, None, by_blas),
                                  model._array_logits(ids, None, plan[:2] + (None,)))
    expected = model(ids).data[:, -1]
    np.testing.assert_allclose(model._array_logits(ids, None, by_blas), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model._array_logits(ids, None, plan), expected, rtol=1e-5, atol=1e-6)  # tiles, if any


def test_the_window_blocks_are_left_out_where_a_block_does_not_qualify():
    model = small(n_layer=3).eval()
    model.transformer["h"][1].mlp.gelu.approximate = "tanh"
    assert model._array_plan()[2] is None  # the tanh GELU is not the fused kernel's
    assert small(n_layer=1).eval()._array_plan()[2] is not None  # no block before the last: nothing to run
    ids = np.random.default_rng(0).integers(0, 13, size=(1, 8))
    np.testing.assert_allclose(model._array_logits(ids), model(ids).data[:, -1], rtol=1e-5, atol=1e-6)


def test_a_float64_model_generates_through_the_module_path_with_the_cacheless_tokens():
    """The fast paths are float32 kernels; a float64 GPT (its forward works) generates too, on the module path."""
    no.manual_seed(3)
    model = models.gpt(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=8)
    for parameter in model.parameters():
        parameter.data = parameter.data.astype(np.float64)
    assert not model._plain()
    prompt = np.array([[1, 2]])
    cached = model.generate(prompt, 12, temperature=0.0)  # the window slides after 8 tokens
    np.testing.assert_array_equal(cached, model.generate(prompt, 12, temperature=0.0, use_cache=False))
