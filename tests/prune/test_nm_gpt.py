"""An N:M-pruned GPT converted to sparse Linear layers (``prune.to_sparse(format="nm")``) runs the slot-major N:M
kernel in the generation fast path: its logits equal the masked dense model's to float tolerance, generation gives
the dense-equivalent's tokens, the cache changes nothing, and the array path equals the module path."""

import copy

import numpy as np
import pytest

import nanoopt as no
from nanoopt import models, nn, prune
from nanoopt.kernels.nm_sparse import nm_linear
from nanoopt.prune.sparse import SparseLinear


def small_gpt(seed):
    """A 2-block GPT whose matrices are 15 times nanoGPT's init (std 0.3): distinct logits, no argmax ties."""
    no.manual_seed(seed)
    model = models.gpt(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    for parameter in {id(p): p for p in model.parameters()}.values():  # the tied head/embedding once
        if parameter.ndim == 2:
            parameter.data *= np.float32(15.0)
    return model


def nm_pruned(model, n, m, method):
    if method == "sparsegpt":
        calibration = [np.random.default_rng(3).integers(0, 13, size=(8, 8))]  # 64 rows: full-rank Hessians
        return prune.sparsegpt(model, calibration, n=n, m=m, ignore=["lm_head"])
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            prune.nm_sparsity(module, "weight", n=n, m=m)
    return model


@pytest.mark.parametrize("n, m, method", [(2, 4, "magnitude"), (1, 4, "magnitude"), (2, 4, "sparsegpt"),
                                          (3, 8, "magnitude")])
def test_sparse_gpt_equals_its_masked_dense_model_and_generates_its_tokens(n, m, method):
    dense = nm_pruned(small_gpt(1), n, m, method)
    prune.remove_all(dense)
    sparse = copy.deepcopy(dense)
    replaced = prune.to_sparse(sparse, format="nm", n=n, m=m)
    assert len(replaced) == 8 and "lm_head" not in replaced  # 4 Linear layers per block; the tied head stays dense
    assert all(isinstance(sparse.get_submodule(name), SparseLinear) for name in replaced)
    assert sparse._plain()  # the array fast path, not the module path
    ids = np.random.default_rng(2).integers(0, 13, size=(3, 8))
    with no.no_grad():
        np.testing.assert_allclose(sparse(ids).data, dense(ids).data, rtol=1e-5, atol=1e-5)
    prompt = ids[:2, :3]
    tokens = sparse.generate(prompt, 9, temperature=0.0)  # crosses block_size 8: the window slides
    np.testing.assert_array_equal(tokens, dense.generate(prompt, 9, temperature=0.0))
    np.testing.assert_array_equal(tokens, sparse.generate(prompt, 9, temperature=0.0, use_cache=False))


def test_array_logits_equal_the_module_forward():
    model = nm_pruned(small_gpt(4), 2, 4, "magnitude")
    prune.to_sparse(model, format="nm")
    ids = np.random.default_rng(5).integers(0, 13, size=(1, 8))
    caches = model._new_caches(1)
    with no.no_grad():
        np.testing.assert_allclose(model._array_logits(ids[:, :5], caches), model(ids[:, :5]).data[:, -1],
                                   rtol=1e-5, atol=1e-6)
        for i in range(5, 8):  # one row per step: the N:M kernel at M = 1
            np.testing.assert_allclose(model._array_logits(ids[:, i:i + 1], caches),
                                       model(ids[:, :i + 1]).data[:, -1], rtol=1e-5, atol=1e-6)
        layer = model.transformer["h"][0].attn.c_attn
        x = np.random.default_rng(6).standard_normal((2, 3, 16)).astype(np.float32)
        full = layer(x).data
    assert full.shape == (2, 3, 48)
    np.testing.assert_array_equal(layer.forward_array(x, slice(16, 48)), full[..., 16:48])  # bit for bit


def test_forward_array_refuses_bad_input_by_name():
    model = nm_pruned(small_gpt(4), 2, 4, "magnitude")
    prune.to_sparse(model, format="nm")
    layer = model.transformer["h"][0].mlp.c_fc
    with pytest.raises(ValueError, match=r"expected a float32 input \(\.\.\., 16\)"):
        layer.forward_array(np.ones((1, 16), np.float64))
    with pytest.raises(ValueError, match="rows must be a slice with step 1"):
        layer.forward_array(np.ones((1, 16), np.float32), slice(0, 8, 2))


def test_one_row_path_equals_nm_linear_bit_for_bit_and_follows_a_loaded_state():
    """A token at batch 1 takes the one-row kernel; its outputs are nm_linear's bits for any row slice and shape,
    a non-contiguous or float64 row takes the general path, and a newly loaded weight is used, not a stale one."""
    model = nm_pruned(small_gpt(4), 2, 4, "magnitude")
    prune.to_sparse(model, format="nm")
    layer = model.transformer["h"][0].attn.c_attn
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 1, 16)).astype(np.float32)
    for rows in (slice(None), slice(16, 48), slice(0, 16), slice(30, 20), slice(-8, None)):
        start, stop, _ = rows.indices(48)
        expected = nm_linear(x.reshape(1, 16), layer.nm_weight(), layer.bias, (start, max(start, stop)))
        got = layer.forward_array(x, rows)
        assert got.shape == (1, 1, expected.shape[1])
        np.testing.assert_array_equal(got.reshape(expected.shape).view(np.uint32), expected.view(np.uint32))
    strided = np.repeat(x, 2, axis=-1)[..., ::2]  # the same values, not contiguous
    np.testing.assert_array_equal(layer.forward_array(strided), layer.forward_array(x))
    before = layer.forward_array(x)
    other = nm_pruned(small_gpt(5), 2, 4, "magnitude")
    prune.to_sparse(other, format="nm")
    model.load_state_dict(other.state_dict())
    np.testing.assert_array_equal(layer.forward_array(x),
                                  other.transformer["h"][0].attn.c_attn.forward_array(x.copy()))
    assert not np.array_equal(layer.forward_array(x), before)
