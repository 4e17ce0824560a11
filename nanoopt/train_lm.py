"""Training a language model on token windows, with nanoGPT's recipe (karpathy/nanoGPT ``train.py``).

* Loss: token-level cross-entropy of the logits (B, T, V) against the next tokens (B, T), averaged over all
  B * T positions.
* Optimiser: AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on the 2-D weights only (matrices
  and embeddings); biases and LayerNorm parameters are not decayed (:func:`configure_adamw`).
* Gradient clipping to a global norm (:func:`nanoopt.nn.utils.clip_grad_norm_`).
* Learning rate: linear warmup then cosine decay (:func:`lr_schedule`),

      lr(it) = lr_max (it + 1) / (warmup + 1)                                        for it < warmup
      lr(it) = lr_min + (lr_max - lr_min) (1 + cos(pi (it - warmup) / (decay - warmup))) / 2   up to decay
      lr(it) = lr_min                                                                 after.

* Progress: a tqdm bar with the loss and tokens per second; validation loss on a fixed set of windows.

>>> import numpy as np, nanoopt as no
>>> config = LMTrainConfig(max_iters=3, batch_size=2, warmup_iters=1, lr_decay_iters=3)
>>> [round(lr_schedule(i, config), 6) for i in range(4)]
[0.0005, 0.001, 0.00055, 0.0001]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from nanoopt import optim
from nanoopt.data.text import sample_windows
from nanoopt.nn import functional as F
from nanoopt.nn.module import Module
from nanoopt.nn.utils import clip_grad_norm_
from nanoopt.tensor import Tensor, no_grad


@dataclass
class LMTrainConfig:
    """Hyper-parameters of :func:`train_lm` (defaults: the character-level GPT of issue 17)."""

    max_iters: int = 2000  # optimiser steps
    batch_size: int = 12  # windows per step
    learning_rate: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # learning rate at and after lr_decay_iters
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 2000  # end of the cosine decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW moment decay rates
    weight_decay: float = 0.1  # decoupled, on 2-D weights only
    grad_clip: float = 1.0  # global gradient-norm bound (0: no clipping)
    eval_interval: int = 0  # validation every this many steps (0: only after the last)
    seed: int = 0  # seed of the window sampler


@dataclass
class LMHistory:
    """What :func:`train_lm` measured: per-step loss and seconds, validation losses by step."""

    train_loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    val_loss: dict[int, float] = field(default_factory=dict)
    tokens_per_step: int = 0

    @property
    def ms_per_iter(self) -> float:
        """Median milliseconds per training step."""
        return 1000 * float(np.median(self.step_seconds)) if self.step_seconds else float("nan")


def lr_schedule(iteration: int, config: LMTrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr`` (formula in the module docstring; nanoGPT's ``get_lr``)."""
    if iteration < config.warmup_iters:
        return config.learning_rate * (iteration + 1) / (config.warmup_iters + 1)
    if iteration > config.lr_decay_iters:
        return config.min_lr
    ratio = (iteration - config.warmup_iters) / max(config.lr_decay_iters - config.warmup_iters, 1)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.learning_rate - config.min_lr)


def configure_adamw(model: Module, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float]) -> optim.AdamW:
    """AdamW with two groups: parameters of 2 or more dimensions decay, the others (biases, norms) do not.

    >>> from nanoopt import models
    >>> opt = configure_adamw(models.gpt(10, 4, 1, 1, 4), 1e-3, 0.1, (0.9, 0.99))
    >>> [(g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    [(0.1, 6), (0.0, 10)]
    """
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas)


def lm_loss(logits: Tensor, targets: np.ndarray) -> Tensor:
    """Mean cross-entropy over all positions of logits (B, T, V) against integer targets (B, T).

    >>> import numpy as np, nanoopt as no
    >>> round(lm_loss(no.Tensor(np.zeros((2, 3, 4))), np.zeros((2, 3), dtype=int)).item(), 4)   # log 4
    1.3863
    """
    targets = np.asarray(targets)
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"lm_loss: expected logits (B, T, V) and targets (B, T), got {logits.shape} and "
                         f"{targets.shape}")
    return F.cross_entropy(logits.reshape((-1, logits.shape[-1])), targets.reshape(-1))


def evaluate_lm(model: Module, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> float:
    """Mean token cross-entropy of ``model`` on windows x, y (N, T), in eval mode without a graph."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with no_grad():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                total += lm_loss(model(xb), yb).item() * len(xb)
    finally:
        model.train(was_training)
    return total / len(x)


class LMTrainer:
    """One optimiser step at a time (what :func:`train_lm` loops over): warmup/cosine learning rate, forward,
    token cross-entropy, backward, global-norm clipping, AdamW with decay on 2-D weights only.

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models
    >>> no.manual_seed(0)
    >>> trainer = LMTrainer(models.gpt(5, 4, 1, 1, 8), LMTrainConfig(max_iters=2))
    >>> x = np.array([[0, 1, 2, 3]]); loss = trainer.step(x, (x + 1) % 5, 0)
    >>> bool(abs(loss - np.log(5)) < 0.05)     # about log V at the nanoGPT initialisation
    True
    """

    def __init__(self, model: Module, config: LMTrainConfig) -> None:
        self.model, self.config = model, config
        self.optimizer = configure_adamw(model, config.learning_rate, config.weight_decay, config.betas)
        self.parameters = list(model.parameters())

    def step(self, x: np.ndarray, y: np.ndarray, iteration: int) -> float:
        """One step on windows x, y (B, T) at step number ``iteration`` (which sets the learning rate)."""
        lr = lr_schedule(iteration, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = lm_loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        if self.config.grad_clip:
            clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.optimizer.step()
        return loss.item()


def train_lm(model: Module, train_ids: np.ndarray, config: LMTrainConfig | None = None,
             validation: tuple[np.ndarray, np.ndarray] | None = None, block_size: int | None = None,
             progress: bool = True) -> LMHistory:
    """Train ``model`` (ids (B, T) -> logits (B, T, V)) on random windows of ``train_ids``; see the module doc.

    ``block_size`` defaults to ``model.config.block_size``. Windows come from
    :func:`nanoopt.data.sample_windows` with ``numpy.random.default_rng(config.seed)``. ``validation`` is a
    fixed (x, y) window set (e.g. :func:`nanoopt.data.validation_windows`), scored every ``eval_interval``
    steps and after the last.
    """
    config = config or LMTrainConfig()
    block_size = block_size or model.config.block_size
    trainer = LMTrainer(model, config)
    rng = np.random.default_rng(config.seed)
    history = LMHistory(tokens_per_step=config.batch_size * block_size)
    bar = tqdm(range(config.max_iters), desc="train", disable=not progress)
    for iteration in bar:
        start = time.perf_counter()
        x, y = sample_windows(train_ids, block_size, config.batch_size, rng)
        history.train_loss.append(trainer.step(x, y, iteration))
        seconds = time.perf_counter() - start
        history.step_seconds.append(seconds)
        bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", tok_s=f"{history.tokens_per_step / seconds:.0f}")
        last = iteration == config.max_iters - 1
        if validation is not None and (last or (config.eval_interval and (iteration + 1) % config.eval_interval == 0)):
            history.val_loss[iteration + 1] = evaluate_lm(model, *validation)
            if progress:
                bar.write(f"step {iteration + 1}: train loss {history.train_loss[-1]:.4f}, "
                          f"val loss {history.val_loss[iteration + 1]:.4f}")
    return history
