"""GPT distillation: MiniLM's attention-relation loss against the model's own attention, and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models
from nanoopt.distill.gpt import GPTDistillConfig, distill_gpt, minilm_loss
from nanoopt.gradcheck import check_grads
from nanoopt.nn.attention_functional import causal_bias
from nanoopt.ops_transformer import attention_forward
from nanoopt.train_lm import LMTrainConfig


def _probs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The model's own attention weights softmax(a b^T / sqrt(d) + causal -inf) (B, H, T, T)."""
    t, d = a.shape[-2], a.shape[-1]
    _, probs, _ = attention_forward(a, b, b, causal_bias(t, t, "float64"), 1 / np.sqrt(d), None, True)
    return probs


def _heads(qkv: np.ndarray, h: int) -> np.ndarray:
    b, t, c3 = qkv.shape
    return qkv.reshape(b, t, 3, h, c3 // 3 // h).transpose(2, 0, 3, 1, 4).astype(np.float64)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(terms.sum() / (p.shape[0] * p.shape[1] * p.shape[2]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.sampled_from([1, 2, 4]), t=st.integers(1, 6),
       d_s=st.sampled_from([2, 3]), d_t=st.sampled_from([2, 4]))
def test_minilm_loss_is_kl_of_the_attention_and_value_relations(seed, heads, t, d_s, d_t):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(2, t, 3 * heads * d_s)).astype(np.float32)
    teacher = rng.normal(size=(2, t, 3 * heads * d_t)).astype(np.float32)
    got = minilm_loss(no.Tensor(student), teacher, heads).item()
    sq, sk, sv = _heads(student, heads)
    tq, tk, tv = _heads(teacher, heads)
    expected = _kl(_probs(tq, tk), _probs(sq, sk)) + _kl(_probs(tv, tv), _probs(sv, sv))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert got >= -1e-6
    assert minilm_loss(no.Tensor(teacher), teacher, heads).item() == pytest.approx(0.0, abs=1e-5)


def test_minilm_loss_gradient():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(1, 4, 12))
    student = no.Tensor(rng.normal(size=(1, 4, 12)), requires_grad=True)
    check_grads(lambda s: minilm_loss(s, teacher, 2), [student])


def test_minilm_loss_bad_shapes():
    with pytest.raises(ValueError, match="split into q, k, v of 2 heads"):
        minilm_loss(no.Tensor(np.zeros((1, 3, 9))), np.zeros((1, 3, 12)), 2)
    with pytest.raises(ValueError, match=r"differ in \(B, T\)"):
        minilm_loss(no.Tensor(np.zeros((1, 3, 12))), np.zeros((1, 4, 12)), 2)


@pytest.mark.slow
def test_distill_gpt_trains_student_only_and_checks_its_input():
    no.manual_seed(0)
    teacher = models.gpt(9, 8, 2, 2, 16)
    student = models.gpt(9, 8, 1, 2, 16)
    before_teacher = {k: v.copy() for k, v in teacher.state_dict().items()}
    before_student = {k: v.copy() for k, v in student.state_dict().items()}
    ids = np.random.default_rng(0).integers(0, 9, 400)
    history = distill_gpt(student, teacher, ids, LMTrainConfig(max_iters=3, batch_size=2, warmup_iters=1),
                          progress=False)
    assert len(history.train_loss) == 3 and np.isfinite(history.train_loss).all()
    assert all((teacher.state_dict()[k] == v).all() for k, v in before_teacher.items())
    assert any((student.state_dict()[k] != v).any() for k, v in before_student.items())
    assert not teacher._forward_hooks and not student.transformer["h"][0]._forward_hooks
    with pytest.raises(ValueError, match="has 1 heads, the teacher's 'transformer.h.1' 2"):
        distill_gpt(models.gpt(9, 8, 1, 1, 16), teacher, ids, LMTrainConfig(max_iters=1), progress=False)
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill_gpt(models.gpt(5, 8, 1, 2, 16), teacher, ids, LMTrainConfig(max_iters=1), progress=False)
    with pytest.raises(ValueError, match="layer_map"):
        distill_gpt(student, teacher, ids, LMTrainConfig(max_iters=1), GPTDistillConfig(layer_map=(5,)),
                    progress=False)
