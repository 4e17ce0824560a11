"""Language-model training: nanoGPT's schedule, AdamW groups, clipping, the token loss; one step equals PyTorch's."""

import math

import numpy as np
import pytest

import nanoopt as no
from nanoopt import data, models
from nanoopt.train_lm import LMTrainConfig, LMTrainer, configure_adamw, evaluate_lm, lm_loss, lr_schedule, train_lm


def test_warmup_then_cosine_to_min_lr():
    c = LMTrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert lr_schedule(0, c) == pytest.approx(1e-3 / 101)
    assert lr_schedule(99, c) == pytest.approx(1e-3 * 100 / 101)
    assert lr_schedule(100, c) == pytest.approx(1e-3)
    assert lr_schedule(1050, c) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 9e-4)
    assert lr_schedule(2000, c) == pytest.approx(1e-4) and lr_schedule(5000, c) == 1e-4
    values = [lr_schedule(i, c) for i in range(100, 2001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_only_on_two_dimensional_weights():
    model = models.gpt(10, 4, 2, 2, 8)
    decay, no_decay = configure_adamw(model, 1e-3, 0.1, (0.9, 0.99)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_token_loss_is_the_mean_over_all_positions():
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((2, 3, 5)), rng.integers(0, 5, (2, 3))
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_p, targets[..., None], -1).mean()
    assert lm_loss(no.Tensor(logits), targets).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"expected logits \(B, T, V\) and targets \(B, T\), got \(2, 3, 5\) and "
                                         r"\(2, 4\)"):
        lm_loss(no.Tensor(logits), np.zeros((2, 4), dtype=int))


def test_a_small_gpt_learns_shakespeare():
    text = data.load_shakespeare("train")[:200_000]
    tokenizer = data.CharTokenizer.from_text(data.load_shakespeare())
    ids = tokenizer.encode(text)
    no.manual_seed(0)
    model = models.gpt(tokenizer.vocab_size, 16, 1, 2, 32)
    validation = data.validation_windows(ids[-20_000:], 16, count=64)
    before = evaluate_lm(model, *validation)
    config = LMTrainConfig(max_iters=60, batch_size=8, learning_rate=1e-2, warmup_iters=5, lr_decay_iters=60)
    history = train_lm(model, ids[:-20_000], config, validation=validation, progress=False)
    assert before == pytest.approx(math.log(84), abs=0.05)  # nanoGPT's init: about uniform predictions
    assert history.val_loss[60] < before - 1.0 and len(history.train_loss) == 60 and history.ms_per_iter > 0
    assert model.training


def test_steps_equal_pytorch_nanogpt_steps():
    torch = pytest.importorskip("torch", reason="comparison with PyTorch needs torch (optional extra)")
    from benchmarks.chargpt import TorchTrainer

    no.manual_seed(1)
    model = models.gpt(20, 8, 2, 2, 16)
    config = LMTrainConfig(max_iters=4, batch_size=3, warmup_iters=2, lr_decay_iters=4, grad_clip=0.5,
                           learning_rate=3e-2)
    ours = LMTrainer(model, config)
    theirs = TorchTrainer(model.state_dict(), 20, config, dict(block_size=8, n_layer=2, n_head=2, n_embd=16))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, 500)
    for iteration in range(4):
        x, y = data.sample_windows(ids, 8, 3, rng)
        assert ours.step(x, y, iteration) == pytest.approx(theirs.step(x, y, iteration), rel=1e-4)
    reference = {k: v.numpy() for k, v in theirs.model.state_dict().items()}
    for name, value in model.state_dict().items():
        if name.endswith("c_attn.bias"):  # the key bias shifts every score of a row alike: its gradient is 0 up
            keys = slice(16, 32)          # to rounding, which Adam rescales to steps of up to lr; compare apart
            np.testing.assert_allclose(value[keys], reference[name][keys], atol=4 * config.learning_rate)
            value, reference[name] = np.delete(value, keys), np.delete(reference[name], keys)
        np.testing.assert_allclose(value, reference[name], rtol=1e-3, atol=2e-5, err_msg=name)
    assert theirs.torch is torch
