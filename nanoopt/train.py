"""The training and evaluation loops that every technique in nanoopt reuses.

:func:`fit` runs mini-batch gradient descent: for each batch, ``loss = compute_loss(model, x, y)``, backward,
``optimizer.step()``, then the callbacks. Quantization-aware training, pruning schedules and distillation plug
in through ``compute_loss`` (what the loss is) and callbacks (what happens between steps and epochs), so none of
them needs a loop of its own. :func:`evaluate` runs the model in eval mode under ``no_grad``.

Runs are deterministic under :func:`nanoopt.manual_seed`: initialisation, dropout and shuffling all draw from the
global generator.

>>> import nanoopt as no
>>> from nanoopt import data, models
>>> no.manual_seed(0)
>>> x, y = data.load_digits("train"); xt, yt = data.load_digits("test")
>>> model = models.lenet_300_100(in_features=64)
>>> history = fit(model, (x, y), epochs=5, lr=0.05, progress=False)
>>> evaluate(model, (xt, yt))["accuracy"] > 0.8
True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nanoopt import optim
from nanoopt.data import DataLoader
from nanoopt.nn import Module
from nanoopt.nn import functional as F
from nanoopt.tensor import Tensor, no_grad

Batches = DataLoader | Iterable[tuple[np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray]


class Callback:
    """Hooks called by :func:`fit`; override any of them. ``step`` counts optimiser steps from 0."""

    def on_train_begin(self, model: Module, optimizer: optim.Optimizer) -> None: ...

    def on_epoch_begin(self, epoch: int, model: Module) -> None: ...

    def on_step_end(self, step: int, model: Module, loss: float) -> None: ...

    def on_epoch_end(self, epoch: int, model: Module, logs: dict[str, float]) -> None: ...

    def on_train_end(self, model: Module) -> None: ...


@dataclass
class History:
    """Per-epoch records of a :func:`fit` run (lists indexed by epoch)."""

    train_loss: list[float] = field(default_factory=list)   # mean batch loss
    train_accuracy: list[float] = field(default_factory=list)   # on the training batches, while training
    val_accuracy: list[float] = field(default_factory=list)   # empty without validation data
    epoch_seconds: list[float] = field(default_factory=list)


def _loader(data: Batches, batch_size: int, shuffle: bool, where: str = "fit", classes: bool = True) -> Any:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], np.ndarray) \
            and not isinstance(data[0], np.ndarray):
        raise TypeError(f"{where}: the images of an (images, labels) pair must be an ndarray, got "
                        f"{type(data[0]).__name__}; pass np.asarray(images, dtype=np.float32)")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        if classes:
            _check_labels(data[1], len(data[0]), where)
        if len(data[0]) == 0:
            raise ValueError(f"{where}: the data hold no samples (images of shape {data[0].shape})")
        return DataLoader(data[0], data[1], batch_size=batch_size, shuffle=shuffle)
    return data


def _check_labels(labels: Any, count: int, where: str) -> None:
    """Class indices of shape (count,) (one-hot or probability labels are refused by name)."""
    shape = np.shape(labels)
    if len(shape) != 1:
        hint = "; one-hot labels? pass labels.argmax(axis=1)" if len(shape) == 2 else ""
        raise ValueError(f"{where}: labels must be class indices of shape ({count},), got shape {shape}{hint}")
    if shape[0] != count:
        raise ValueError(f"{where}: {count} images but {shape[0]} labels")


def default_loss(model: Module, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the model's logits; returns (loss, logits)."""
    logits = model(Tensor(x))
    return F.cross_entropy(logits, y), logits


def fit(model: Module, train_data: Batches, epochs: int = 1, optimizer: optim.Optimizer | None = None,
        lr: float = 0.05, momentum: float = 0.9, batch_size: int = 128,
        compute_loss: Callable[[Module, np.ndarray, np.ndarray], tuple[Tensor, Tensor | None]] | None = None,
        scheduler: optim.LRScheduler | None = None, val_data: Batches | None = None,
        callbacks: Sequence[Callback] = (), progress: bool = True) -> History:
    """Train ``model`` for ``epochs`` epochs and return a :class:`History`.

    Parameters
    ----------
    train_data : a :class:`~nanoopt.data.DataLoader`, any iterable of ``(x, y)`` batches, or a pair of arrays
        ``(images, labels)`` (then shuffled batches of ``batch_size`` are drawn from the global generator).
    optimizer : defaults to ``SGD(model.parameters(), lr, momentum)``.
    compute_loss : ``(model, x, y) -> (loss, logits or None)``; defaults to cross-entropy of ``model(x)``.
    scheduler : stepped once at the end of every epoch.
    callbacks : :class:`Callback` objects (pruning schedules, observer freezing, logging ...).
    progress : show a tqdm bar per epoch.

    Refused up front (``ValueError``/``TypeError`` naming the argument): a learning rate that is negative, NaN or
    infinite; images given as a list; labels that are not class indices of shape (N,) (one-hot, for the default
    loss); no samples. A DataLoader or iterable that yields no batch raises at the end of its first epoch.
    """
    if epochs < 0:
        raise ValueError(f"fit: epochs must be >= 0, got {epochs}")
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optim.SGD(params, lr=lr, momentum=momentum)
    classes = compute_loss is None  # the default loss takes class indices; a custom one may take other targets
    compute_loss = compute_loss or default_loss
    loader = _loader(train_data, batch_size, shuffle=True, classes=classes)
    history = History()
    step = 0
    for callback in callbacks:
        callback.on_train_begin(model, optimizer)
    for epoch in range(epochs):
        model.train()
        for callback in callbacks:
            callback.on_epoch_begin(epoch, model)
        start = time.perf_counter()
        total_loss, correct, seen, batches = 0.0, 0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y in bar:
            if classes:
                _check_labels(y, len(x), f"fit: training batch {batches} of epoch {epoch}")
            if not np.isfinite(x).all():
                raise ValueError(f"fit: training batch {batches} of epoch {epoch} contains NaN or Inf inputs")
            optimizer.zero_grad()
            loss, logits = compute_loss(model, x, y)
            if not np.isfinite(loss.data).all():
                raise FloatingPointError(f"fit: the loss became {loss.item()} at epoch {epoch}, step {step}; "
                                         "lower the learning rate")
            loss.backward()
            optimizer.step()
            value = loss.item()
            total_loss += value
            batches += 1
            if logits is not None:
                correct += int((logits.data.argmax(axis=1) == y).sum())
                seen += len(y)
            for callback in callbacks:
                callback.on_step_end(step, model, value)
            step += 1
            if progress:
                bar.set_postfix(loss=f"{value:.4f}")
        if batches == 0:
            raise ValueError(f"fit: the training data gave no batches in epoch {epoch} (an empty dataset, or an "
                             "iterator already used up?)")
        logs = {"loss": total_loss / batches, "accuracy": correct / seen if seen else float("nan")}
        history.train_loss.append(logs["loss"])
        history.train_accuracy.append(logs["accuracy"])
        history.epoch_seconds.append(time.perf_counter() - start)
        if val_data is not None:
            logs["val_accuracy"] = evaluate(model, val_data)["accuracy"]
            history.val_accuracy.append(logs["val_accuracy"])
        if scheduler is not None:
            scheduler.step()
        for callback in callbacks:
            callback.on_epoch_end(epoch, model, logs)
    for callback in callbacks:
        callback.on_train_end(model)
    model.eval()
    return history


def predict(model: Module | Callable[[Tensor], Any], images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Model outputs for ``images``, in eval mode and without recording a graph, as one ndarray."""
    outputs = []
    if isinstance(model, Module):
        was_training = model.training
        model.eval()
    with no_grad():
        for start in range(0, len(images), batch_size):
            out = model(Tensor(images[start:start + batch_size]))
            outputs.append(out.data if isinstance(out, Tensor) else np.asarray(out))
    if isinstance(model, Module):
        model.train(was_training)
    return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.float32)


def evaluate(model: Module | Callable[[Tensor], Any], data: Batches, batch_size: int = 256,
             progress: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (arrays or batches), in eval mode.

    Returns ``{"accuracy": ..., "loss": ..., "count": ...}``.
    """
    batches: Any = _loader(data, batch_size, shuffle=False, where="evaluate")
    correct, seen, loss_sum = 0, 0, 0.0
    if isinstance(model, Module):
        was_training = model.training
        model.eval()
    with no_grad():
        for x, y in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
            _check_labels(y, len(x), "evaluate")
            out = model(Tensor(x))
            logits = out if isinstance(out, Tensor) else Tensor(np.asarray(out))
            correct += int((logits.data.argmax(axis=1) == y).sum())
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            seen += len(y)
    if isinstance(model, Module):
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate: the data held no samples")
    return {"accuracy": correct / seen, "loss": loss_sum / seen, "count": float(seen)}
