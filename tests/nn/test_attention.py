"""Transformer layers: values against NumPy formulas, gradients against finite differences (check_grads), and
values and gradients against PyTorch where it is installed (skipped otherwise).

Hypothesis draws batch shapes, lengths and head sizes (odd ones included), T = 1 and batch 1, and masks (none,
boolean, float, causal, with fully masked rows).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import nn
from nanoopt.gradcheck import check_grads
from nanoopt.nn import functional as F

FEW = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
batches = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
sizes = st.integers(1, 5)
mask_kinds = st.sampled_from(["none", "bool", "float", "causal"])


def reference_attention(q, k, v, bias, scale):
    """softmax(scale q k^T + bias) v in float64, rows with nothing to attend to giving 0 (PyTorch's SDPA)."""
    scores = scale * q @ np.swapaxes(k, -1, -2) + (0 if bias is None else bias)
    top = scores.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    e = np.exp(scores - top)
    z = e.sum(axis=-1, keepdims=True)
    return (e / np.where(z == 0, 1, z)) @ v


def draw_mask(kind, rng, batch, length, source):
    """(mask passed to SDPA, the equivalent additive bias or None)."""
    if kind == "none":
        return None, None
    if kind == "causal":
        return None, np.triu(np.full((length, source), -np.inf), k=1)
    shape = (*batch, length, source)[rng.integers(0, len(batch) + 1):]  # broadcastable: drop some leading axes
    allowed = rng.random(shape) > 0.3
    if kind == "bool":
        return allowed, np.where(allowed, 0.0, -np.inf)
    floats = np.where(allowed, rng.standard_normal(shape), -np.inf)
    return floats, floats


@FEW
@given(batches, sizes, sizes, sizes, sizes, mask_kinds, seeds)
def test_sdpa_matches_the_formula_and_finite_differences(batch, length, source, e, ev, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "causal":
        source = max(source, length)  # top-left aligned causal mask: every query sees key 0
    q, k, v = (rng.standard_normal((*batch, n, d)) for n, d in ((length, e), (source, e), (source, ev)))
    mask, bias = draw_mask(kind, rng, batch, length, source)
    out = F.scaled_dot_product_attention(no.Tensor(q), no.Tensor(k), no.Tensor(v), attn_mask=mask,
                                         is_causal=kind == "causal")
    np.testing.assert_allclose(out.data, reference_attention(q, k, v, bias, 1 / np.sqrt(e)), rtol=1e-10, atol=1e-12)
    check_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, is_causal=kind == "causal"),
                [q, k, v])


@FEW
@given(sizes, sizes, seeds, st.floats(0.1, 3.0))
def test_sdpa_custom_scale_and_broadcast_keys(length, e, seed, scale):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((2, 3, length, e)), rng.standard_normal((1, 4, e)), rng.standard_normal((4, 3))
    out = F.scaled_dot_product_attention(no.Tensor(q), no.Tensor(k), no.Tensor(v), scale=scale)
    np.testing.assert_allclose(out.data, reference_attention(q, k, v, None, scale), rtol=1e-10, atol=1e-12)
    check_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale), [q, k, v])


def test_sdpa_fully_masked_rows_give_zero_output_and_gradient():
    rng = np.random.default_rng(0)
    q, k, v = (no.Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True) for _ in range(3))
    mask = np.ones((3, 3), dtype=bool)
    mask[1] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert np.all(out.data[:, 1] == 0) and np.all(q.grad[:, 1] == 0) and np.all(np.isfinite(k.grad))
    assert np.all(out.data[:, 0] != 0)


def test_sdpa_is_stable_for_large_scores():
    q = no.Tensor(np.array([[[1e4, 0.0], [0.0, 1e4]]], dtype=np.float32))
    out = F.scaled_dot_product_attention(q, q, q)
    np.testing.assert_allclose(out.data, q.data, rtol=1e-6)


def test_sdpa_dropout_is_seeded_and_scales_the_kept_weights():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 8, 4)) for _ in range(3))
    no.manual_seed(3)
    a = F.scaled_dot_product_attention(no.Tensor(q), no.Tensor(k), no.Tensor(v), dropout_p=0.5).data
    no.manual_seed(3)
    keep = (no.random.get_rng().random((2, 8, 8)) >= 0.5) / 0.5
    scores = q @ np.swapaxes(k, -1, -2) / 2
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(a, (p * keep) @ v, rtol=1e-10)

    def seeded(x, y, z):
        no.manual_seed(3)
        return F.scaled_dot_product_attention(x, y, z, dropout_p=0.5)

    check_grads(seeded, [q, k, v])


@pytest.mark.parametrize("mask, error, match", [
    (np.ones((3, 5), dtype=bool), ValueError, r"attn_mask of shape \(3, 5\) does not broadcast .* \(2, 3, 4\)"),
    (np.ones((3, 4), dtype=np.int64), TypeError, "attn_mask must be a boolean or float mask, got dtype int64"),
])
def test_sdpa_refuses_bad_masks(mask, error, match):
    x = no.Tensor(np.zeros((2, 3, 4)))
    with pytest.raises(error, match=match):
        F.scaled_dot_product_attention(x, no.Tensor(np.zeros((2, 4, 4))), no.Tensor(np.zeros((2, 4, 4))),
                                       attn_mask=mask)


def test_sdpa_refuses_mismatched_shapes_and_mask_with_causal():
    x = no.Tensor(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"key \(\.\.\., S, E\).*\(2, 3, 4\), \(2, 3, 5\)"):
        F.scaled_dot_product_attention(x, no.Tensor(np.zeros((2, 3, 5))), x)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        F.scaled_dot_product_attention(x, x, x, attn_mask=np.ones((3, 3), bool), is_causal=True)


# ----------------------------------------------------------------- embedding
@FEW
@given(st.integers(1, 7), st.integers(1, 5), batches, seeds)
def test_embedding_lookup_and_scatter_gradient(num, dim, batch, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((num, dim))
    ids = rng.integers(0, num, size=(*batch, 3))
    np.testing.assert_array_equal(F.embedding(ids, no.Tensor(weight)).data, weight[ids])
    check_grads(lambda w: F.embedding(ids, w), [weight])


def test_embedding_padding_idx_row_starts_zero_and_gets_no_gradient():
    table = nn.Embedding(5, 3, padding_idx=-1)
    assert table.padding_idx == 4 and np.all(table.weight.data[4] == 0)
    table(np.array([[4, 4, 1]])).sum().backward()
    assert np.all(table.weight.grad[4] == 0) and np.all(table.weight.grad[1] == 1)


def test_embedding_refuses_bad_ids():
    table = nn.Embedding(5, 3)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4\], got range \[-1, 2\]"):
        table(np.array([-1, 2]))
    with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
        table(np.array([0.5]))
    assert table.state_dict()["weight"].shape == (5, 3)


# ----------------------------------------------------------------- MultiheadAttention
def reference_mha(mha, q, k, v, bias):
    """PyTorch's multi_head_attention_forward written out in NumPy (batch first)."""
    w, b = mha.in_proj_weight.data.astype(np.float64), mha.in_proj_bias.data.astype(np.float64)
    e, h = mha.embed_dim, mha.num_heads
    d = e // h

    def heads(x, part):
        y = x @ w[part * e:(part + 1) * e].T + b[part * e:(part + 1) * e]
        return y.reshape(x.shape[0], x.shape[1], h, d).transpose(0, 2, 1, 3)

    out = reference_attention(heads(q, 0), heads(k, 1), heads(v, 2), bias, 1 / np.sqrt(d))
    merged = out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], e)
    return merged @ mha.out_proj.weight.data.T + mha.out_proj.bias.data


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), sizes, sizes, st.sampled_from(["none", "attn", "padding", "both"]),
       st.booleans(), seeds)
def test_multihead_attention_matches_the_formula_and_finite_differences(n, heads, length, source, kind, same, seed):
    rng = np.random.default_rng(seed)
    e = heads * int(rng.integers(1, 4))  # odd head dimensions included
    mha = nn.MultiheadAttention(e, heads, batch_first=True)
    mha.in_proj_bias.data[...] = rng.standard_normal(3 * e)
    mha.out_proj.bias.data[...] = rng.standard_normal(e)
    q = rng.standard_normal((n, length, e))
    k, v = (q, q) if same else (rng.standard_normal((n, source, e)), rng.standard_normal((n, source, e)))
    source = k.shape[1]
    attn_mask = key_padding_mask = None
    bias = np.zeros((n, 1, length, source))
    if kind in ("attn", "both"):
        attn_mask = rng.random((length, source)) < 0.3  # True: may not attend
        attn_mask[:, 0] = False
        bias = bias + np.where(attn_mask, -np.inf, 0)
    if kind in ("padding", "both"):
        key_padding_mask = rng.standard_normal((n, source))  # float masks are added
        bias = bias + key_padding_mask[:, None, None, :]
    for need_weights in (True, False):
        out, weights = mha(no.Tensor(q), no.Tensor(k), no.Tensor(v), key_padding_mask=key_padding_mask,
                           attn_mask=attn_mask, need_weights=need_weights)
        np.testing.assert_allclose(out.data, reference_mha(mha, q, k, v, bias), rtol=1e-5, atol=1e-5)
        assert (weights is None) != need_weights
        if need_weights:
            assert weights.shape == (n, length, source)
            np.testing.assert_allclose(weights.data.sum(-1), 1, rtol=1e-5)
    slots = [(mha, "in_proj_weight"), (mha, "in_proj_bias"), (mha.out_proj, "weight"), (mha.out_proj, "bias")]
    originals = [module._parameters[name] for module, name in slots]

    def run(x, *values):  # the parameters swapped for check_grads' float64 tensors
        for (module, name), value in zip(slots, values, strict=True):
            module._parameters[name] = value
        return mha(x, x if same else k, x if same else v, attn_mask=attn_mask, need_weights=False)[0]

    try:
        check_grads(run, [q, *[o.data.astype(np.float64) for o in originals]])
    finally:
        for (module, name), value in zip(slots, originals, strict=True):
            module._parameters[name] = value


def test_multihead_attention_layouts_and_fully_masked_rows():
    rng = np.random.default_rng(0)
    first, second = nn.MultiheadAttention(6, 3, batch_first=True), nn.MultiheadAttention(6, 3)
    second.load_state_dict(first.state_dict())
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    a = first(x, x, x)[0].data
    b = second(x.transpose(1, 0, 2), x.transpose(1, 0, 2), x.transpose(1, 0, 2))[0].data
    c = first(x[0], x[0], x[0])[0].data  # unbatched (L, E)
    np.testing.assert_allclose(a, b.transpose(1, 0, 2), rtol=1e-6)
    np.testing.assert_allclose(a[0], c, rtol=1e-6)
    padding = np.zeros((2, 4), dtype=bool)
    padding[1] = True
    out, weights = first(x, x, x, key_padding_mask=padding)
    assert np.isnan(out.data[1]).all() and np.isnan(weights.data[1]).all() and np.isfinite(out.data[0]).all()
    out, _ = first(x, x, x, key_padding_mask=padding, need_weights=False)
    assert np.all(out.data[1] == first.out_proj.bias.data)  # attention output 0, then out_proj


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_mask=np.ones((4, 5), bool)), r"attn_mask must have shape \(L, S\) = \(4, 4\) or .* \(6, 4, 4\), got "
                                            r"\(4, 5\)"),
    (dict(key_padding_mask=np.ones((4,), bool)), r"key_padding_mask must have shape \(N, S\) = \(2, 4\), got \(4,\)"),
    (dict(attn_mask=np.ones((4, 4), np.int32)), "attn_mask must be a boolean or float mask, got dtype int32"),
    (dict(is_causal=True), "is_causal=True is a hint"),
])
def test_multihead_attention_refuses_bad_masks(kwargs, match):
    mha = nn.MultiheadAttention(6, 3, batch_first=True)
    x = no.Tensor(np.zeros((2, 4, 6)))
    with pytest.raises((ValueError, TypeError), match=match):
        mha(x, x, x, **kwargs)


def test_multihead_attention_refuses_indivisible_heads_and_wrong_inputs():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(4\)"):
        nn.MultiheadAttention(10, 4)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"expected query \(N, L, E\) with E = 8, got shape \(2, 3, 6\)"):
        x = no.Tensor(np.zeros((2, 3, 6)))
        mha(x, x, x)


def test_module_dict_registers_children_under_their_keys():
    d = nn.ModuleDict({"a": nn.Linear(2, 3)})
    d["b"] = nn.ModuleList([nn.LayerNorm(3, bias=False)])
    assert list(d) == ["a", "b"] and "a" in d and len(d) == 2
    assert list(d.state_dict()) == ["a.weight", "a.bias", "b.0.weight"]
    with pytest.raises(KeyError, match="without '.'"):
        d["c.d"] = nn.ReLU()


def test_clip_grad_norm_scales_all_gradients_together():
    rng = np.random.default_rng(0)
    params = [nn.Parameter(np.zeros(s, np.float32)) for s in ((3, 4), (5,))]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.copy()
    total = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert nn.utils.clip_grad_norm_(params, 0.5) == pytest.approx(total, rel=1e-6)
    for p, g in zip(params, grads, strict=True):
        np.testing.assert_allclose(p.grad, g * 0.5 / (total + 1e-6), rtol=1e-5)
    assert nn.utils.clip_grad_norm_(params, 10.0) == pytest.approx(0.5, rel=1e-5)  # under the bound: unchanged
    np.testing.assert_allclose(params[1].grad, grads[1] * 0.5 / (total + 1e-6), rtol=1e-5)


def test_layer_norm_without_bias_and_stable_for_large_inputs():
    ln = nn.LayerNorm(4, bias=False)
    assert list(ln.state_dict()) == ["weight"]
    x = np.array([[1e6 + 1, 1e6 + 2, 1e6 + 3, 1e6 + 4]], dtype=np.float32)
    out = ln(x).data
    z = (np.arange(1, 5) - 2.5) / np.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(out[0], z, rtol=1e-3, atol=1e-3)


def test_dropout_module_train_and_eval():
    drop, x = nn.Dropout(0.5), no.Tensor(np.ones((100, 100)))
    y = drop(x).data
    assert set(np.unique(y)) == {0.0, 2.0} and 0.45 < (y == 0).mean() < 0.55
    assert drop.eval()(x) is x


# ----------------------------------------------------------------- against PyTorch
@FEW
@given(batches, sizes, sizes, sizes, mask_kinds, seeds)
def test_sdpa_equals_pytorch(batch, length, source, e, kind, seed):
    torch = pytest.importorskip("torch", reason="comparison with PyTorch needs torch (optional extra)")
    rng = np.random.default_rng(seed)
    if kind == "causal":
        source = max(source, length)
    arrays = [rng.standard_normal((*batch, n, e)).astype(np.float32) for n in (length, source, source)]
    mask, _ = draw_mask(kind, rng, batch, length, source)
    if mask is not None and mask.dtype != bool:
        mask = mask.astype(np.float32)
    ours = [no.Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = F.scaled_dot_product_attention(*ours, attn_mask=mask, is_causal=kind == "causal")
    ref = torch.nn.functional.scaled_dot_product_attention(
        *theirs, attn_mask=None if mask is None else torch.tensor(mask), is_causal=kind == "causal")
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    (out * no.Tensor(cotangent)).sum().backward()
    (ref * torch.tensor(cotangent)).sum().backward()
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_first, need_weights", [(True, True), (False, False), (True, False)])
def test_multihead_attention_equals_pytorch(batch_first, need_weights):
    torch = pytest.importorskip("torch", reason="comparison with PyTorch needs torch (optional extra)")
    rng = np.random.default_rng(1)
    theirs = torch.nn.MultiheadAttention(10, 2, batch_first=batch_first)
    ours = nn.MultiheadAttention(10, 2, batch_first=batch_first)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = rng.standard_normal((3, 5, 10)).astype(np.float32)
    mask = np.triu(np.ones((3 if not batch_first else 5, 3 if not batch_first else 5), bool), 1)
    padding = np.zeros((5 if not batch_first else 3, 3 if not batch_first else 5), bool)
    padding[0, -1] = True
    xo, xt = no.Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, w = ours(xo, xo, xo, attn_mask=mask, key_padding_mask=padding, need_weights=need_weights)
    ref, rw = theirs(xt, xt, xt, attn_mask=torch.tensor(mask), key_padding_mask=torch.tensor(padding),
                     need_weights=need_weights)
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    if need_weights:
        np.testing.assert_allclose(w.data, rw.detach().numpy(), rtol=1e-4, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.in_proj_weight.grad, theirs.in_proj_weight.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_layer_norm_equal_pytorch(approximate):
    torch = pytest.importorskip("torch", reason="comparison with PyTorch needs torch (optional extra)")
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 6)) * 3).astype(np.float32)
    xo, xt = no.Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ln_o, ln_t = nn.LayerNorm(6, bias=False), torch.nn.LayerNorm(6, bias=False)
    ln_o.weight.data[...] = ln_t.weight.data.numpy() + rng.standard_normal(6).astype(np.float32)
    ln_t.weight.data = torch.tensor(ln_o.weight.data)
    out = nn.GELU(approximate)(ln_o(xo))
    ref = torch.nn.GELU(approximate)(ln_t(xt))
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ln_o.weight.grad, ln_t.weight.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_clip_grad_norm_equals_pytorch():
    torch = pytest.importorskip("torch", reason="comparison with PyTorch needs torch (optional extra)")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(s).astype(np.float32) * 3 for s in ((4, 4), (7,))]
    ours = [nn.Parameter(np.zeros(g.shape, np.float32)) for g in grads]
    theirs = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for o, t, g in zip(ours, theirs, grads, strict=True):
        o.grad, t.grad = g.copy(), torch.tensor(g)
    for norm_type in (2.0, 1.0, float("inf")):
        total = nn.utils.clip_grad_norm_(ours, 1.0, norm_type)
        assert total == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)), rel=1e-5)
    for o, t in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(o.grad, t.grad.numpy(), rtol=1e-5, atol=1e-7)
