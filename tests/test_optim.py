"""Optimisers against their update rules written out by hand (PyTorch's formulas), and the LR schedules."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import nanoopt as no
from nanoopt import optim

floats = st.floats(-3, 3, allow_nan=False, width=32)
vectors = arrays(np.float64, st.integers(1, 6), elements=floats)


def _run(optimizer_cls, start, grads, **kwargs):
    p = no.nn.Parameter(start.copy())
    opt = optimizer_cls([p], **kwargs)
    for g in grads:
        p.grad = g.copy()
        opt.step()
    return p.data


@settings(max_examples=30, deadline=None)
@given(vectors, st.floats(0.0, 0.99), st.floats(0.0, 0.1), st.booleans())
def test_sgd_matches_the_momentum_formula(start, momentum, weight_decay, nesterov):
    nesterov = nesterov and momentum > 0
    grads = [np.cos(start * (k + 1)) for k in range(4)]
    lr = 0.1
    expected, buffer = start.copy(), None
    for g in grads:
        g = g + weight_decay * expected
        if momentum:
            buffer = g.copy() if buffer is None else momentum * buffer + g
            g = g + momentum * buffer if nesterov else buffer
        expected = expected - lr * g
    got = _run(optim.SGD, start, grads, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(vectors, st.floats(0.0, 0.1), st.booleans())
def test_adam_and_adamw_match_algorithm_1(start, weight_decay, decoupled):
    grads = [np.sin(start * (k + 2)) for k in range(5)]
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    p, m, v = start.copy(), np.zeros_like(start), np.zeros_like(start)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
    cls = optim.AdamW if decoupled else optim.Adam
    got = _run(cls, start, grads, lr=lr, weight_decay=weight_decay)
    np.testing.assert_allclose(got, p, rtol=1e-9, atol=1e-12)


def test_parameters_without_grad_are_left_alone_and_zero_grad_clears():
    a, b = no.nn.Parameter(np.ones(2)), no.nn.Parameter(np.ones(2))
    opt = optim.SGD([a, b], lr=1.0)
    a.grad = np.ones(2, dtype=np.float32)
    opt.step()
    assert a.data.tolist() == [0.0, 0.0] and b.data.tolist() == [1.0, 1.0]
    opt.zero_grad()
    assert a.grad is None


def test_schedules_follow_their_formulas():
    p = no.nn.Parameter(np.ones(1))
    opt = optim.SGD([p], lr=1.0)
    step = optim.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    for _ in range(5):
        seen.append(step.get_last_lr()[0])
        step.step()
    assert seen == [1.0, 1.0, 0.5, 0.5, 0.25]
    opt = optim.SGD([p], lr=1.0)
    cosine = optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.1)
    for epoch in range(5):
        assert cosine.get_last_lr()[0] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * epoch / 4)) / 2)
        cosine.step()


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=-1.0),
    lambda p: optim.SGD(p, lr=0.1, nesterov=True),
    lambda p: optim.Adam(p, betas=(1.0, 0.9)),
    lambda p: optim.SGD([], lr=0.1),
    lambda p: optim.SGD([np.ones(2)], lr=0.1),
])
def test_bad_optimiser_arguments_raise(make):
    with pytest.raises((ValueError, TypeError)):
        make([no.nn.Parameter(np.ones(1))])
