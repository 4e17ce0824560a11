"""Structured pruning of the GPT: head importance and removal, MLP neuron shrinking, block removal, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, prune
from nanoopt.train_lm import evaluate_lm

VOCAB, BLOCK = 11, 8


def tiny(n_layer: int = 2, n_head: int = 4, n_embd: int = 16, seed: int = 0) -> models.GPT:
    no.manual_seed(seed)
    model = models.gpt(VOCAB, BLOCK, n_layer, n_head, n_embd)
    rng = np.random.default_rng(seed)
    for p in model.parameters():  # larger weights than the 0.02 init, so heads and neurons matter
        p.data[...] = rng.normal(0, 0.3, p.shape).astype(np.float32)
    return model


def windows(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, (count, BLOCK + 1))
    return ids[:, :-1], ids[:, 1:]


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_pruned_heads_equal_masked_heads_on_fresh_inputs(data):
    masked, pruned = tiny(seed=data.draw(st.integers(0, 5))), None
    heads = {i: data.draw(st.lists(st.integers(0, 3), max_size=3, unique=True), label=f"block {i}")
             for i in range(2)}
    masked = prune.mask_heads(masked, heads)
    pruned = tiny(seed=0)
    pruned.load_state_dict({k: v for k, v in prune.remove_all(_copy(masked)).state_dict().items()})
    prune.prune_heads(pruned, heads)
    for i, drop in heads.items():
        attn = pruned.transformer["h"][i].attn
        assert attn.n_head == 4 - len(drop)
        assert attn.c_attn.weight.shape == (3 * attn.n_head * 4, 16)
        assert attn.c_proj.weight.shape == (16, attn.n_head * 4)
    x, _ = windows(5, seed=99)   # fresh inputs, never seen while pruning
    with no.no_grad():
        expected, got = masked(x).data, pruned(x).data
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    prompt = x[:2, :3]
    greedy = pruned.generate(prompt, 5, temperature=0.0)        # KV cache and array path with per-block heads
    assert (greedy == pruned.generate(prompt, 5, temperature=0.0, use_cache=False)).all()
    assert (greedy == masked.generate(prompt, 5, temperature=0.0, use_cache=False)).all()


def _copy(model: models.GPT) -> models.GPT:
    state = model.state_dict()
    clone = tiny(seed=0)
    prune.load_pruned_state_dict(clone, state)
    return clone


def test_head_importance_is_the_gate_derivative():
    """|dL/dxi_h| equals a central difference of the loss in the gate (scaling the head's c_proj columns)."""
    model = tiny(n_layer=1, n_head=2, n_embd=8, seed=1)
    x, y = windows(1, seed=3)
    scores = prune.head_importance(model, (x, y), normalize=False)["transformer.h.0"]
    w = model.transformer["h"][0].attn.c_proj.weight
    base = w.data.copy()
    for h in range(2):
        losses = []
        for eps in (1e-2, -1e-2):
            w.data[...] = base
            w.data[:, h * 4:(h + 1) * 4] *= np.float32(1 + eps)
            losses.append(evaluate_lm(model, x, y))
        w.data[...] = base
        numeric = abs(losses[0] - losses[1]) / 2e-2
        assert scores[h] == pytest.approx(numeric, rel=2e-2, abs=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_head_importance_averages_absolute_per_window_gradients():
    model = tiny(seed=2)
    x, y = windows(6, seed=4)
    together = prune.head_importance(model, (x, y), batch_size=4, normalize=False)
    one_by_one = [prune.head_importance(model, (x[i:i + 1], y[i:i + 1]), normalize=False) for i in range(6)]
    for name, scores in together.items():
        np.testing.assert_allclose(scores, np.mean([s[name] for s in one_by_one], axis=0), rtol=1e-4, atol=1e-7)


def test_select_heads_keeps_one_head_per_block_and_takes_the_lowest():
    scores = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([0.9, 0.05]), "c": np.array([0.5, 0.6])}
    assert prune.select_heads(scores, amount=3) == {"a": [0, 1], "b": [1]}
    assert prune.select_heads(scores, amount=0.5, scope="layer") == {"a": [0, 1], "b": [1], "c": [0]}  # round(1.5) = 2
    with pytest.raises(ValueError, match="keep one head"):
        prune.select_heads(scores, amount=5)


def test_prune_heads_bad_input_names_the_block():
    model = tiny()
    with pytest.raises(ValueError, match="all 4 heads of block .transformer.h.1."):
        prune.prune_heads(model, {1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="transformer.h.0.*heads 0..3"):
        prune.prune_heads(model, {0: [4]})
    with pytest.raises(ValueError, match="no block 'transformer.h.7'"):
        prune.mask_heads(model, {"transformer.h.7": [0]})
    with pytest.raises(TypeError, match="expected a nanoopt GPT"):
        prune.head_importance(models.mlp(4, hidden=(3,), num_classes=2), windows(2, 0))
    with pytest.raises(ValueError, match="calibration x and y"):
        prune.head_importance(model, (np.zeros((2, 8), np.int64), np.zeros((3, 8), np.int64)))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100), amount=st.sampled_from([0.25, 0.5, 0.75]))
def test_shrink_removes_gpt_mlp_neurons_and_keeps_outputs_on_fresh_inputs(seed, amount):
    model = tiny(seed=seed % 7)
    for block in model.transformer["h"]:
        prune.ln_structured(block.mlp.c_fc, "weight", amount=amount, n=1, dim=0)
    prune.mask_heads(model, {0: [seed % 4]})
    x, _ = windows(4, seed=seed + 1000)
    with no.no_grad():
        expected = model(x).data
    report = prune.shrink(model, x[:1])
    hidden = 64 - int(round(amount * 64))
    assert [b.mlp.c_fc.out_features for b in model.transformer["h"]] == [hidden, hidden]
    assert [b.mlp.c_proj.in_features for b in model.transformer["h"]] == [hidden, hidden]
    assert [b.attn.n_head for b in model.transformer["h"]] == [3, 4]
    assert report.parameters_after < report.parameters_before
    with no.no_grad():
        np.testing.assert_allclose(model(x).data, expected, atol=3e-5, rtol=1e-5)


def test_shrink_refuses_to_remove_every_head_of_a_block():
    model = tiny()
    w = model.transformer["h"][1].attn.c_proj.weight
    w.data[...] = 0
    with pytest.raises(ValueError, match="every head of block 'transformer.h.1'"):
        prune.shrink(model, windows(1, 0)[0])


def test_block_removal_on_gpt_blocks():
    model = tiny(n_layer=3)
    x, _ = windows(4, seed=5)
    distances = prune.block_angular_distances(model, x)
    assert sorted(distances) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert all(0.0 <= d <= 1.0 for d in distances.values())
    third = model.transformer["h"][2]
    removed = prune.prune_blocks(model, x, count=1)
    assert removed == [min(distances, key=distances.get)]
    assert model.config.n_layer == 2 and len(model.transformer["h"]) == 2
    if removed != ["transformer.h.2"]:
        assert model.transformer["h"][1] is third     # later blocks move up
    prompt = x[:2, :3]
    greedy = model.generate(prompt, 5, temperature=0.0)
    assert (greedy == model.generate(prompt, 5, temperature=0.0, use_cache=False)).all()
    with pytest.raises(ValueError, match="all 2 blocks"):
        prune.remove_blocks(model, ["transformer.h.0", "transformer.h.1"], x)


def test_block_angular_distance_is_per_token_for_sequences():
    model = tiny(n_layer=1)
    x, _ = windows(2, seed=6)
    seen = {}
    block = model.transformer["h"][0]
    handle = block.register_forward_hook(lambda m, i, o: seen.update(a=i[0].data.reshape(-1, 16),
                                                                      b=o.data.reshape(-1, 16)))
    distance = prune.block_angular_distances(model, x)["transformer.h.0"]
    handle.remove()
    a, b = seen["a"].astype(np.float64), seen["b"].astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert distance == pytest.approx(float(np.mean(np.arccos(np.clip(cosine, -1, 1)) / np.pi)), rel=1e-9)


def test_pruned_gpt_checkpoint_round_trip(tmp_path):
    model = tiny(n_layer=3)
    x, _ = windows(3, seed=7)
    prune.prune_heads(model, {0: [1], 2: [0, 3]})
    prune.ln_structured(model.transformer["h"][1].mlp.c_fc, "weight", amount=0.5, n=1, dim=0)
    prune.shrink(model, x)
    prune.remove_blocks(model, ["transformer.h.1"], x)
    path = tmp_path / "pruned.npz"
    no.io.save(model.checkpoint_state(), path)
    restored, _ = models.GPT.from_checkpoint_state(no.io.load(path))
    assert [b.attn.n_head for b in restored.transformer["h"]] == [3, 2]
    with no.no_grad():
        np.testing.assert_array_equal(restored(x).data, model(x).data)


@pytest.mark.slow
def test_head_importance_ranks_heads_by_the_loss_change_when_masked():
    """On a GPT trained briefly on Shakespeare, masking the least important head costs less validation loss than
    masking the most important one (what Michel et al.'s score predicts)."""
    from nanoopt import data
    from nanoopt.train_lm import LMTrainConfig, train_lm

    tokenizer = data.CharTokenizer.from_text(data.load_shakespeare())
    train_ids = tokenizer.encode(data.load_shakespeare("train")[:200_000])
    val_ids = tokenizer.encode(data.load_shakespeare("val")[:50_000])
    no.manual_seed(0)
    model = models.gpt(tokenizer.vocab_size, 32, 2, 4, 32)
    train_lm(model, train_ids, LMTrainConfig(max_iters=150, batch_size=8, warmup_iters=10, lr_decay_iters=150),
             progress=False)
    validation = data.validation_windows(val_ids, 32, count=64)
    calibration = data.validation_windows(train_ids, 32, count=64, seed=5)
    scores = prune.head_importance(model, calibration, normalize=False)
    flat = [(float(s), name, h) for name, v in scores.items() for h, s in enumerate(v)]
    base = evaluate_lm(model, *validation)

    def masked_loss(name: str, head: int) -> float:
        clone = _copy_gpt(model)
        return evaluate_lm(prune.mask_heads(clone, {name: [head]}), *validation) - base

    low, high = min(flat), max(flat)
    assert masked_loss(low[1], low[2]) < masked_loss(high[1], high[2])


def _copy_gpt(model: models.GPT) -> models.GPT:
    clone = models.GPT(model.config)
    clone.load_state_dict(model.state_dict())
    return clone
