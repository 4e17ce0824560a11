"""Layer-wise calibration for one-shot compression of the ``nn.Linear`` layers of any model (GPTQ, AWQ, SparseGPT,
Wanda): which layers, in which order, what inputs they see, and the damped inverse of their input Hessian.

The one-shot methods compress one layer at a time from the inputs that layer receives on a few calibration
batches. As in GPTQ (Frantar et al. 2022, section 4) and SparseGPT (Frantar & Alistarh 2023), the inputs are
captured **sequentially**: layer ``l`` is calibrated on the inputs produced by the model in which layers
``1 .. l-1`` are already compressed, so each layer corrects for the errors made before it. :func:`sequential`
does this for any :class:`~nanoopt.nn.Module` (no block structure is assumed): it runs the calibration batches
once per layer, with a forward pre-hook on that layer streaming its inputs, as ``(rows, in_features)`` matrices,
into an accumulator (``add_batch``), then hands the accumulator to the method, which may replace the layer.

* :func:`calibration_batches` -- the batches as a list (an array or Tensor is one batch; ``(x, y)`` pairs give x);
* :func:`select_linears` -- the Linear layers to compress, by dotted-name patterns (``targets=``, ``ignore=``);
* :func:`execution_order` -- the selected layers in the order the model calls them;
* :func:`layers_to_calibrate` -- all of the above (and :func:`check_untied`) for a method that changes weights in
  place;
* :class:`LayerHessian` -- ``H = (2 / n) sum_rows x x^T`` accumulated batch by batch (GPTQ's ``add_batch``);
* :func:`inverse_hessian_cholesky` -- the upper Cholesky factor of ``(H + lambda I)^-1`` with GPTQ's damping.

>>> import numpy as np
>>> from nanoopt import models
>>> model = models.mlp(8, (16, 16), num_classes=4)
>>> [name for name, _ in select_linears(model, ignore=["5"], what="example")]
['1', '3']
>>> x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
>>> hessian = LayerHessian(8).add_batch(x)
>>> hessian.n_rows_, bool(np.allclose(hessian.hessian(), 2 * x.T.astype(np.float64) @ x / 32))
(32, True)
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from nanoopt.nn import Linear, Module
from nanoopt.nn.graph import hooks
from nanoopt.tensor import Tensor, no_grad

__all__ = [
    "LayerHessian", "calibration_batches", "check_untied", "execution_order", "inverse_hessian_cholesky",
    "layers_to_calibrate", "select_linears", "sequential",
]


class Accumulator(Protocol):
    """Anything that takes a layer's inputs batch by batch."""

    def add_batch(self, inputs: np.ndarray) -> Any: ...


# ------------------------------------------------------------------------------------------- calibration data
def calibration_batches(calibration: Any, what: str) -> list[Any]:
    """The calibration batches as a list (they are run once per layer, so an iterator is read once, here).

    An ndarray or Tensor is one batch, and so is the ``x`` of an ``(x, y)`` dataset; an iterable gives one batch
    per item, where an ``(x, y)`` pair (a DataLoader's) gives ``x``. Float arrays become Tensors; integer arrays
    (token ids) are passed as they are.

    >>> [b.shape for b in calibration_batches(np.zeros((4, 3), np.float32), "example")]
    [(4, 3)]
    >>> [b.shape for b in calibration_batches((np.zeros((4, 3), np.float32), np.zeros(4, np.int64)), "example")]
    [(4, 3)]
    """
    if isinstance(calibration, Tensor | np.ndarray):
        items: Iterable[Any] = [calibration]
    elif isinstance(calibration, tuple) and len(calibration) == 2 and isinstance(calibration[0], Tensor | np.ndarray):
        items = [calibration[0]]  # a dataset (x, y), as data.load_digits returns it: x is one batch
    elif isinstance(calibration, Iterable):
        items = calibration
    else:
        raise TypeError(f"{what}: calibration must be an array, a Tensor or an iterable of batches, got "
                        f"{type(calibration).__name__}")
    batches = []
    for index, item in enumerate(items):
        if isinstance(item, tuple | list) and len(item) == 2:
            item = item[0]
        array = np.asarray(item.data if isinstance(item, Tensor) else item)
        if array.dtype.kind == "f":
            bad = int(array.size - np.isfinite(array).sum())
            if bad:
                raise ValueError(f"{what}: calibration batch {index} holds {bad} NaN/Inf values; calibration needs "
                                 "finite inputs")
            batches.append(item if isinstance(item, Tensor) else Tensor(array.astype(np.float32, copy=False)))
        elif array.dtype.kind in "iu":
            batches.append(item)
        else:
            raise TypeError(f"{what}: calibration batch {index} must hold numbers, got dtype {array.dtype}")
    if not batches:
        raise ValueError(f"{what}: the calibration data is empty; pass at least one batch of model inputs")
    return batches


def run_batches(model: Module, batches: Sequence[Any]) -> None:
    """Run every batch through ``model`` in eval mode without a graph (the outputs are dropped)."""
    model.eval()
    with no_grad():
        for batch in batches:
            model(batch)


# ------------------------------------------------------------------------------------------- which layers
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_linears(model: Module, targets: Sequence[str] | None = None, ignore: Sequence[str] = (),
                   what: str = "compress") -> list[tuple[str, Linear]]:
    """``(name, layer)`` of the ``nn.Linear`` layers of ``model`` to compress, in module-tree order.

    ``targets`` (default: every Linear) and ``ignore`` are dotted module names or shell patterns
    (``fnmatch``: ``"blocks.*.mlp.*"``, ``"head"``); a pattern that matches no Linear layer is an error, so a
    misspelt ``ignore=["lm_haed"]`` cannot silently compress the head.

    >>> from nanoopt import nn
    >>> select_linears(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), targets=["2"])[0][0]
    '2'
    """
    for label, patterns in (("targets", targets), ("ignore", ignore)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{what}: {label} must be a list of module names or patterns, got {patterns!r}")
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, Linear)]
    names = [name for name, _ in linears]
    for label, patterns in (("targets", targets or ()), ("ignore", ignore)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"{what}: {label} pattern {pattern!r} matches no Linear layer; the Linear layers "
                                 f"are {names}")
    chosen = [(name, module) for name, module in linears
              if (targets is None or _matches(name, targets)) and not _matches(name, ignore)]
    if not chosen:
        raise ValueError(f"{what}: no Linear layer to compress (Linear layers: {names}, targets={targets}, "
                         f"ignore={list(ignore)})")
    return chosen


def check_untied(model: Module, layers: Sequence[tuple[str, Module]], what: str) -> None:
    """Refuse layers whose weight is shared with another module (tied embeddings): a method that changes the weight
    in place (pruning, AWQ's scaling) would silently change the other module too."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module._parameters.items():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(f"{module_name}.{parameter_name}".lstrip("."))
    for name, layer in layers:
        for parameter_name in ("weight", "weight_orig"):
            parameter = layer._parameters.get(parameter_name)
            if parameter is not None and len(owners[id(parameter)]) > 1:
                raise ValueError(f"{what}: the weight of layer {name!r} is shared with {owners[id(parameter)]} "
                                 f"(tied weights); {what} changes it in place, which would change the others too: "
                                 f"leave the layer out with ignore=[{name!r}] or untie the weights")


def execution_order(model: Module, layers: Sequence[tuple[str, Module]], batch: Any, what: str
                    ) -> list[tuple[str, Module]]:
    """``layers`` sorted by the order of their first call on ``batch``; a layer never called is an error."""
    first_call: dict[str, int] = {}

    def note(name: str, module: Module, inputs: tuple) -> None:
        first_call.setdefault(name, len(first_call))

    with hooks(dict(layers), before=note):
        run_batches(model, [batch])
    missing = [name for name, _ in layers if name not in first_call]
    if missing:
        raise ValueError(f"{what}: Linear layer(s) {missing} are not called on the calibration input, so they "
                         "have no inputs to calibrate on; leave them out with ignore=")
    return sorted(layers, key=lambda item: first_call[item[0]])


def layers_to_calibrate(model: Module, calibration: Any, targets: Sequence[str] | None, ignore: Sequence[str],
                        what: str, check: Callable[[str, Linear], None]) -> tuple[list[Any], list[tuple[str, Linear]]]:
    """The calibration batches and the ``(name, layer)`` of the Linear layers a method that changes weights in
    place compresses, in the order the model calls them: :func:`calibration_batches`, :func:`select_linears` by
    ``targets`` / ``ignore``, :func:`check_untied`, the method's own ``check(name, layer)`` on each, then
    :func:`execution_order` on the first batch.

    >>> from nanoopt import models
    >>> model = models.mlp(8, (16,), num_classes=4)
    >>> batches, layers = layers_to_calibrate(model, np.zeros((2, 8), np.float32), None, ["1"], "example",
    ...                                       lambda name, layer: None)
    >>> len(batches), [name for name, _ in layers]
    (1, ['3'])
    """
    batches = calibration_batches(calibration, what)
    layers = select_linears(model, targets, ignore, what)
    check_untied(model, layers, what)
    for name, layer in layers:
        check(name, layer)
    return batches, execution_order(model, layers, batches[0], what)


def sequential(model: Module, layers: Sequence[tuple[str, Module]], batches: Sequence[Any],
               start: Callable[[str, Module], Accumulator], finish: Callable[[str, Module, Any], Module | None],
               progress: bool = False, desc: str = "layers") -> Module:
    """Calibrate ``layers`` one after the other on the model as compressed so far (see the module docstring).

    For each ``(name, layer)`` in order: ``acc = start(name, layer)``; every call of the layer on every batch
    feeds ``acc.add_batch(inputs)`` (float32 ``(rows, in_features)``); then ``finish(name, layer, acc)`` returns
    a replacement module (set at ``name``) or None (the layer was changed in place). Returns the model (the
    replacement itself if the model *is* the layer).
    """
    for name, layer in tqdm(list(layers), desc=desc, disable=not progress, leave=False):
        accumulator = start(name, layer)
        rows = [0]

        def feed(name: str, module: Module, inputs: tuple, accumulator: Accumulator = accumulator,
                 rows: list[int] = rows) -> None:
            x = inputs[0]
            data = np.asarray(x.data if isinstance(x, Tensor) else x, dtype=np.float32)
            data = data.reshape(-1, data.shape[-1])  # (rows, in_features)
            if not np.all(np.isfinite(data)):
                raise ValueError(f"{desc}: the input of layer {name!r} holds NaN or Inf on the calibration data "
                                 "(a non-finite weight before it?)")
            accumulator.add_batch(data)
            rows[0] += data.shape[0]

        with hooks({name: layer}, before=feed):
            run_batches(model, batches)
        if rows[0] == 0:
            raise ValueError(f"{desc}: layer {name!r} received no calibration rows (are the batches empty?)")
        replacement = finish(name, layer, accumulator)
        if replacement is not None and replacement is not layer:
            if name == "":
                return replacement
            model.set_submodule(name, replacement)
    return model


# ------------------------------------------------------------------------------------------- the Hessian
class LayerHessian:
    """``H = (2 / n) sum_{rows x} x x^T`` of a layer's inputs: the Hessian of ``||W X - W^ X||_F^2`` with respect
    to each row of ``W^`` (GPTQ eq. 1-2; SparseGPT section 3), accumulated batch by batch in float64.

    >>> h = LayerHessian(2).add_batch(np.array([[1.0, 0.0], [0.0, 3.0]]))
    >>> h.hessian().tolist(), h.n_rows_
    ([[1.0, 0.0], [0.0, 9.0]], 2)
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum_ = np.zeros((in_features, in_features))  # sum_rows x x^T
        self.n_rows_ = 0

    def add_batch(self, inputs: np.ndarray) -> LayerHessian:
        """Add the rows of ``inputs (rows, in_features)``; returns self."""
        x = np.asarray(inputs, dtype=np.float64).reshape(-1, self.in_features)  # (rows, K)
        if not np.all(np.isfinite(x)):
            raise ValueError("LayerHessian: the layer input contains NaN or Inf")
        self.sum_ += x.T @ x
        self.n_rows_ += x.shape[0]
        return self

    def hessian(self) -> np.ndarray:
        """``(2 / n) sum x x^T`` (float64, ``(K, K)``)."""
        if self.n_rows_ == 0:
            raise ValueError("LayerHessian: no inputs were added")
        return 2.0 * self.sum_ / self.n_rows_


def inverse_hessian_cholesky(hessian: np.ndarray, percdamp: float, n_rows: int, name: str, what: str) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = (H + lambda I)^-1``), as GPTQ uses it.

    ``lambda = percdamp * mean(diag H)`` (GPTQ's "dampening", section 4 step 3: 1% of the average diagonal by
    default). It makes ``H`` positive definite even when the calibration has fewer rows than the layer has inputs
    (``rank H <= rows``): then a warning names the layer and the row count needed for a full-rank ``H``, and the
    method proceeds on the damped ``H``. With ``percdamp = 0`` such a singular ``H`` is an error saying how many
    rows are needed. An input that is zero in every row (``H_jj = 0``) gets ``H_jj = 1``: its column is then
    rounded without moving any other weight (GPTQ's reference zeroes that column instead; we keep it, since the
    calibration may simply not have exercised that input).

    >>> u = inverse_hessian_cholesky(np.diag([4.0, 1.0]), 0.0, 10, "0", "example")
    >>> np.round(u.T @ u, 6).tolist()
    [[0.25, 0.0], [0.0, 1.0]]
    """
    h = np.array(hessian, dtype=np.float64)
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    if n_rows < k:
        message = (f"{what}: layer {name!r} has {k} inputs but the calibration gave only {n_rows} rows, so its "
                   f"Hessian is singular (rank <= {n_rows})")
        if percdamp <= 0:
            raise ValueError(f"{message}; pass at least {k} rows (calibration windows x tokens) or percdamp > 0")
        warnings.warn(f"{message}; proceeding with the damping percdamp={percdamp} (lambda = {percdamp} x mean "
                      f"diagonal); {k} rows or more give a full-rank Hessian", stacklevel=3)
    h[np.diag_indices(k)] += percdamp * float(np.mean(np.diag(h)))
    try:
        lower = np.linalg.cholesky(h)
        inverse = scipy.linalg.cho_solve((lower, True), np.eye(k))
        return np.linalg.cholesky(inverse).T
    except np.linalg.LinAlgError:
        raise ValueError(f"{what}: the damped Hessian of layer {name!r} is not positive definite (percdamp="
                         f"{percdamp}, {n_rows} calibration rows for {k} inputs); raise percdamp (e.g. 0.1) or "
                         f"give at least {k} rows") from None
