"""Distilling a GPT into a shallower one: token-level logit KD, hidden-state matching and MiniLM's attention
relations.

The student is trained on random windows of the training ids, as :func:`nanoopt.train_lm.train_lm` trains a
language model (AdamW with decay on 2-D weights only, warmup + cosine learning rate, gradient clipping), on

    L = w_hard CE(s, y) + w_kd KD_T(s, t) + w_hidden sum_i MSE(r_i(h^S_i), h^T_m(i)) + w_attn (L_AT + L_VR)

* **Token-level logit KD** (Hinton et al. 2015; applied per position, as in DistilBERT/DistilGPT-2, Sanh et al.
  2019): :func:`nanoopt.distill.kd_loss` on the (B T, V) logits, T^2 KL(softmax(t/T) || softmax(s/T)).
* **Hidden states** (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020): student block i's output
  (B, T, C_s) is matched to teacher block m(i)'s (B, T, C_t) by :func:`nanoopt.distill.hint_loss`, per token,
  through a trainable :class:`~nanoopt.distill.FeatureAdapter` (Linear(C_s, C_t)) when the widths differ.
  The default map is uniform: student block i (of n_s) <- teacher block (i + 1) n_t / n_s - 1, so the last
  blocks are matched.
* **MiniLM** (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation", eq. 6-9) on the last block of each:
  per head a, the self-attention distributions A = softmax(Q K^T / sqrt(d)) and the value relation
  VR = softmax(V V^T / sqrt(d)) of the teacher and the student are compared by KL divergence,

      L_AT = 1/(A T) sum_a sum_t KL(A^T_{a,t} || A^S_{a,t}),   L_VR = 1/(A T) sum_a sum_t KL(VR^T_{a,t} || VR^S_{a,t})

  averaged over the batch. The model is causal, so both use the causal mask (position t relates to positions
  <= t; MiniLM's bidirectional BERT has none). Only the relations are matched, so the head widths may differ;
  the numbers of heads must agree (as in MiniLM).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models
>>> no.manual_seed(0)
>>> teacher = models.gpt(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=16)
>>> student = models.gpt(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8)
>>> ids = np.random.default_rng(0).integers(0, 7, 500)
>>> from nanoopt.train_lm import LMTrainConfig
>>> history = distill_gpt(student, teacher, ids, LMTrainConfig(max_iters=2, batch_size=2), progress=False)
>>> len(history.train_loss)
2
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nanoopt.data.text import sample_windows
from nanoopt.distill.adapters import FeatureAdapter
from nanoopt.distill.losses import hint_loss, kd_loss
from nanoopt.models_gpt import GPT
from nanoopt.nn import Module
from nanoopt.nn.utils import clip_grad_norm_
from nanoopt.tensor import Tensor, no_grad
from nanoopt.train_lm import LMHistory, LMTrainConfig, configure_adamw, evaluate_lm, lm_loss, lr_schedule

_MASKED = -1e9  # additive causal mask (finite, so that 0 * log 0 terms are 0, not NaN)


@dataclass
class GPTDistillConfig:
    """Weights of the terms of :func:`distill_gpt`'s objective (module docstring)."""

    hard_weight: float = 0.5  # cross-entropy against the next tokens
    kd_weight: float = 0.5  # token-level logit KD
    temperature: float = 1.0  # of the logit KD (language models: T near 1)
    hidden_weight: float = 0.1  # hidden-state matching (MSE per feature of the residual stream)
    attention_weight: float = 1.0  # MiniLM attention-distribution + value-relation KL, last block
    layer_map: tuple[int, ...] | None = None  # teacher block matched to each student block (None: uniform)

    def __post_init__(self) -> None:
        for name in ("hard_weight", "kd_weight", "hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"GPTDistillConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"GPTDistillConfig: temperature must be > 0, got {self.temperature}")


def _causal(t: int) -> np.ndarray:
    return np.triu(np.full((t, t), _MASKED, dtype=np.float32), k=1)


def _split_heads(qkv: Any, n_head: int) -> tuple[Any, Any, Any]:
    """(B, T, 3 H D) -> q, k, v each (B, H, T, D); works on Tensors and arrays."""
    b, t, c3 = qkv.shape
    d = c3 // 3 // n_head
    heads = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    return heads[0], heads[1], heads[2]


def _log_relation(a: Any, b: Any) -> Any:
    """log softmax(a b^T / sqrt(d) + causal mask) over the last axis: (B, H, T, T)."""
    d, t = a.shape[-1], a.shape[-2]
    if isinstance(a, Tensor):
        scores = (a @ b.transpose(0, 1, 3, 2)) * np.float32(1 / math.sqrt(d)) + _causal(t)
        return scores.log_softmax(axis=-1)
    scores = a @ np.swapaxes(b, -1, -2) / np.float32(math.sqrt(d)) + _causal(t)
    scores = scores - scores.max(axis=-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))


def minilm_loss(student_qkv: Tensor, teacher_qkv: np.ndarray, n_head: int) -> Tensor:
    """MiniLM's L_AT + L_VR (module docstring) from packed (B, T, 3 H D) projections of one block each.

    >>> import numpy as np, nanoopt as no
    >>> qkv = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32)
    >>> round(minilm_loss(no.Tensor(qkv), qkv, n_head=2).item(), 6)
    0.0
    """
    if student_qkv.shape[:2] != teacher_qkv.shape[:2]:
        raise ValueError(f"minilm_loss: student and teacher projections differ in (B, T): {student_qkv.shape} "
                         f"vs {teacher_qkv.shape}")
    if student_qkv.shape[-1] % (3 * n_head) or teacher_qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"minilm_loss: the packed widths {student_qkv.shape[-1]} (student) and "
                         f"{teacher_qkv.shape[-1]} (teacher) must both split into q, k, v of {n_head} heads")
    sq, sk, sv = _split_heads(student_qkv, n_head)
    tq, tk, tv = _split_heads(np.asarray(teacher_qkv, dtype=np.float32), n_head)
    b, _, t, _ = tq.shape
    total = None
    for (s_a, s_b), (t_a, t_b) in (((sq, sk), (tq, tk)), ((sv, sv), (tv, tv))):
        log_p = _log_relation(t_a, t_b)  # teacher (B, H, T, T)
        log_q = _log_relation(s_a, s_b)  # student
        p = np.exp(log_p)
        kl = (Tensor(p * log_p).sum() - (log_q * p).sum()) * np.float32(1 / (b * n_head * t))
        total = kl if total is None else total + kl
    return total


def _uniform_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    return tuple((i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers))


class _Outputs:
    """Forward hooks keeping each block's output and the last block's c_attn output."""

    def __init__(self, model: GPT, detach: bool) -> None:
        self.blocks: list[Any] = [None] * len(model.transformer["h"])
        self.qkv: Any = None
        self.handles = []
        for i, block in enumerate(model.transformer["h"]):
            def keep(module, inputs, output, _i=i):
                self.blocks[_i] = output.data if detach else output
            self.handles.append(block.register_forward_hook(keep))

        def keep_qkv(module, inputs, output):
            self.qkv = output.data if detach else output
        self.handles.append(model.transformer["h"][-1].attn.c_attn.register_forward_hook(keep_qkv))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def distill_gpt(student: GPT, teacher: GPT, train_ids: np.ndarray, config: LMTrainConfig | None = None,
                distill_config: GPTDistillConfig | None = None,
                validation: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True) -> LMHistory:
    """Train ``student`` from ``teacher`` (frozen, eval mode) on random windows of ``train_ids``; see module doc.

    ``config`` is the training recipe (as for :func:`~nanoopt.train_lm.train_lm`, same sampler and seed, so
    a run of ``train_lm`` with the same config sees the same windows); ``distill_config`` the loss weights. The
    adapters (where widths differ) are trained with the student and discarded. Returns the
    :class:`~nanoopt.train_lm.LMHistory` (training objective per step, validation loss of the student).
    """
    config = config or LMTrainConfig()
    distill_config = distill_config or GPTDistillConfig()
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, GPT):
            raise TypeError(f"distill_gpt: the {role} must be a nanoopt GPT, got {type(model).__name__}")
    s_blocks, t_blocks = list(student.transformer["h"]), list(teacher.transformer["h"])
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"distill_gpt: student and teacher vocabularies differ ({student.config.vocab_size} vs "
                         f"{teacher.config.vocab_size})")
    layer_map = distill_config.layer_map or _uniform_map(len(s_blocks), len(t_blocks))
    if len(layer_map) != len(s_blocks) or not all(0 <= m < len(t_blocks) for m in layer_map):
        raise ValueError(f"distill_gpt: layer_map needs one teacher block in 0..{len(t_blocks) - 1} for each of "
                         f"the {len(s_blocks)} student blocks, got {layer_map}")
    s_heads, t_heads = s_blocks[-1].attn.n_head, t_blocks[-1].attn.n_head
    if distill_config.attention_weight and s_heads != t_heads:
        raise ValueError(f"distill_gpt: MiniLM compares heads one to one; the student's last block "
                         f"'transformer.h.{len(s_blocks) - 1}' has {s_heads} heads, the teacher's "
                         f"'transformer.h.{len(t_blocks) - 1}' {t_heads} (set attention_weight=0)")
    s_width, t_width = student.config.n_embd, teacher.config.n_embd
    adapters = [FeatureAdapter((s_width,), (t_width,)) if s_width != t_width else None for _ in s_blocks]
    block_size = min(student.config.block_size, teacher.config.block_size)

    trainable = Module()
    trainable.student = student
    for i, adapter in enumerate(adapters):
        if adapter is not None:
            setattr(trainable, f"adapter{i}", adapter)
    optimizer = configure_adamw(trainable, config.learning_rate, config.weight_decay, config.betas)
    parameters = list(trainable.parameters())
    rng = np.random.default_rng(config.seed)
    history = LMHistory(tokens_per_step=config.batch_size * block_size)
    s_out, t_out = _Outputs(student, detach=False), _Outputs(teacher, detach=True)
    teacher_training = teacher.training
    teacher.eval()
    dc = distill_config
    try:
        bar = tqdm(range(config.max_iters), desc="distill", disable=not progress)
        for iteration in bar:
            start = time.perf_counter()
            x, y = sample_windows(train_ids, block_size, config.batch_size, rng)
            with no_grad():
                t_logits = teacher(x).data
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(iteration, config)
            student.train()
            for adapter in adapters:
                if adapter is not None:
                    adapter.train()
            logits = student(x)  # (B, T, V)
            v = logits.shape[-1]
            loss = lm_loss(logits, y) * np.float32(dc.hard_weight)
            if dc.kd_weight:
                loss = loss + kd_loss(logits.reshape(-1, v), t_logits.reshape(-1, v), dc.temperature) * \
                    np.float32(dc.kd_weight)
            if dc.hidden_weight:
                for i, m in enumerate(layer_map):
                    hs = s_out.blocks[i].reshape(-1, s_width)  # (B T, C_s)
                    loss = loss + hint_loss(hs, t_out.blocks[m].reshape(-1, t_width), adapters[i]) * \
                        np.float32(dc.hidden_weight / len(layer_map))
            if dc.attention_weight:
                loss = loss + minilm_loss(s_out.qkv, t_out.qkv, s_heads) * np.float32(dc.attention_weight)
            optimizer.zero_grad()
            loss.backward()
            if config.grad_clip:
                clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            history.train_loss.append(loss.item())
            seconds = time.perf_counter() - start
            history.step_seconds.append(seconds)
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}")
            last = iteration == config.max_iters - 1
            if validation is not None and (last or (config.eval_interval and
                                                    (iteration + 1) % config.eval_interval == 0)):
                history.val_loss[iteration + 1] = evaluate_lm(student, *validation)
    finally:
        s_out.remove()
        t_out.remove()
        teacher.train(teacher_training)
    return history
