"""Optimisers and learning-rate schedules, with PyTorch's update rules, arguments and defaults.

* SGD with momentum and Nesterov (Sutskever et al. 2013), in PyTorch's form:
  g = grad + wd * p;  b = mu * b + (1 - dampening) * g  (b = g at the first step);
  d = g + mu * b if nesterov else b;  p -= lr * d.
* Adam (Kingma & Ba 2015, Algorithm 1) with L2 weight decay added to the gradient.
* AdamW (Loshchilov & Hutter 2019): the decay is decoupled, p -= lr * wd * p, before the Adam step.
* StepLR (lr * gamma ** (epoch // step_size)) and CosineAnnealingLR
  (eta_min + (lr0 - eta_min) * (1 + cos(pi * epoch / T_max)) / 2), stepped once per epoch.

Parameters are updated in place (``p.data`` keeps its identity), so modules and optimisers share them.

>>> import numpy as np, nanoopt as no
>>> w = no.nn.Parameter(np.array([1.0], dtype=np.float32))
>>> opt = SGD([w], lr=0.1)
>>> (w * w).sum().backward(); opt.step(); w.data.tolist()   # 1 - 0.1 * 2
[0.800000011920929]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from nanoopt.tensor import Tensor


class Optimizer:
    """Holds parameter groups (dicts with ``params`` and hyper-parameters) and per-parameter state."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = defaults
        self.param_groups: list[dict[str, Any]] = []
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"{type(self).__name__}: parameters must be Tensors, got {type(p).__name__}")
            if not (isinstance(group["lr"], int | float | np.number) and 0 <= group["lr"] < float("inf")):
                raise ValueError(f"{type(self).__name__}: learning rate must be a finite number >= 0, got "
                                 f"{group['lr']!r}")
            group.setdefault("initial_lr", group["lr"])
            self.param_groups.append(group)
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self) -> None:
        """Clear the gradient of every parameter (``.grad = None``)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad.astype(p.data.dtype, copy=False), group,
                                 self.state.setdefault(id(p), {}))

    def _update(self, p: Tensor, grad: np.ndarray, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and L2 weight decay."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _update(self, p, grad, group, state):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p.data
        momentum = group["momentum"]
        if momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = grad.copy()
            else:
                buffer *= momentum
                buffer += (1 - group["dampening"]) * grad
            grad = grad + momentum * buffer if group["nesterov"] else buffer
        p.data -= group["lr"] * grad


class Adam(Optimizer):
    """Adam: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * m_hat / (sqrt(v_hat) + eps)."""

    decoupled = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: need betas in [0, 1), eps >= 0, weight_decay >= 0; got "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, p, grad, group, state):
        beta1, beta2 = group["betas"]
        if group["weight_decay"]:
            if self.decoupled:
                p.data *= 1 - group["lr"] * group["weight_decay"]
            else:
                grad = grad + group["weight_decay"] * p.data
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1 - beta1) * grad
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        denominator = np.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + group["eps"]
        p.data -= (group["lr"] / bias_correction1) * exp_avg / denominator


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01, as PyTorch)."""

    decoupled = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LRScheduler:
    """Sets each group's ``lr`` from its ``initial_lr`` and the epoch count; call ``step()`` once per epoch."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.last_epoch = 0
        self._apply()

    def lr_at(self, initial_lr: float, epoch: int) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(group["initial_lr"], self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


class StepLR(LRScheduler):
    """lr = initial_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def lr_at(self, initial_lr: float, epoch: int) -> float:
        return initial_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 (Loshchilov & Hutter 2017)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:  # noqa: N803
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, initial_lr: float, epoch: int) -> float:
        return self.eta_min + (initial_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
