"""Pruning methods with ``torch.nn.utils.prune``'s names and arguments: each computes a mask and applies it.

Every method is a pure function ``scores, default_mask -> mask`` (the ``compute_mask`` of PyTorch's design)
plus a thin public function that reads the parameter, computes the mask and applies it with
:func:`nanoopt.prune.masks.apply_mask` (so pruning twice composes, the second call pruning among survivors).

* Unstructured (LeCun et al. 1990; Han et al. 2015): among the ``s`` surviving entries, the ``k`` with the
  smallest score are pruned, k = round(amount * s) for a float ``amount`` in [0, 1] (Python's round, half to
  even, as PyTorch), or k = amount for an int. Scores are |w| (``l1_unstructured``) or uniform random
  (``random_unstructured``). Ties are broken deterministically: among equal scores the entry with the lower
  flat (C-order) index is pruned first. ``global_unstructured`` ranks the entries of several parameters together.
* Structured (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): whole slices along ``dim`` (dim 0:
  output neurons / filters) are pruned by the L_n norm of their scores, ||s_c||_n = (sum_i |s_ci|^n)^(1/n)
  (n = inf: max |s_ci|). As in PyTorch, the scores are the *masked* weight ``orig * mask`` by default, and the
  ``importance_scores`` exactly as given otherwise (entries pruned earlier count in a slice's norm). A slice is
  alive while any of its mask entries is; k = round(amount * alive slices); ties: lower index first.
  ``random_structured`` ranks the alive slices by one uniform number each (every alive slice is equally likely
  to go, whatever its number of survivors, as ``torch.rand`` in PyTorch).
* N:M semi-structured (Mishra et al. 2021, NVIDIA's 2:4 sparsity; Zhou et al. 2021): in every group of ``m``
  consecutive weights along the input dimension (dim 1), the ``n`` with the largest |w| are kept (ties: the
  lower index is kept), and entries already pruned stay pruned.

Ties differ from PyTorch: ``torch.topk`` does not specify which of equal values it returns (pruning 3 entries of
``[1, 2, 1, 2, 1, 2, 1, 2, 0.5, 1]`` it zeroes indices 8, 4 and 6 on x86), so with ties in the scores both prune
the same number of entries (or slices) with the same multiset of scores, but not always the same ones; without
ties the masks are identical (``tests/prune/test_prune_vs_torch.py`` checks both against ``torch.nn.utils.prune``).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import nn
>>> layer = nn.Linear(4, 2)
>>> layer.weight.data[:] = [[1, -2, 3, -4], [5, -6, 7, 8]]
>>> _ = l1_unstructured(layer, "weight", amount=0.25)          # prunes round(0.25 * 8) = 2 entries
>>> layer.weight_mask.tolist()
[[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
>>> _ = l1_unstructured(layer, "weight", amount=0.5)           # half of the 6 survivors
>>> layer.weight_mask.tolist()
[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from nanoopt.nn import Module
from nanoopt.prune.masks import apply_mask, get_mask, get_parameter, module_label
from nanoopt.random import get_rng

Amount = int | float


# ===================================================================== amount
def count_to_prune(amount: Amount, count: int, what: str) -> int:
    """How many of ``count`` candidates to prune: round(amount * count) for a float, ``amount`` for an int.

    Raises ``TypeError``/``ValueError`` (mentioning ``what``) for a bool, a non-number, a float outside [0, 1]
    or an int outside [0, count].

    >>> count_to_prune(0.5, 5, "example"), count_to_prune(0.7, 10, "example"), count_to_prune(3, 10, "example")
    (2, 7, 3)
    """
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"{what}: amount must be a float in [0, 1] or an int count, got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if not 0 <= amount <= count:
            raise ValueError(f"{what}: amount={amount} entries to prune, but there are only {count} candidates "
                             f"(an int amount must be in [0, {count}])")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"{what}: a float amount is a fraction in [0, 1], got {amount}")
    return int(round(float(amount) * count))


def _check_scores(scores: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    scores = np.asarray(scores.data if hasattr(scores, "data") and not isinstance(scores, np.ndarray) else scores)
    if scores.shape != tuple(shape):
        raise ValueError(f"{what}: importance scores have shape {scores.shape}, expected the parameter's shape "
                         f"{tuple(shape)}")
    if scores.dtype.kind not in "biuf" or not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: importance scores must be finite numbers")
    return scores.astype(np.float64)


# ===================================================================== masks from scores (pure functions)
def unstructured_mask(scores: np.ndarray, default_mask: np.ndarray, amount: Amount, what: str = "unstructured"
                      ) -> np.ndarray:
    """Prune the ``k`` lowest-scoring survivors of ``default_mask`` (ties: lower flat index first).

    >>> unstructured_mask(np.array([3.0, 1.0, 1.0, 2.0]), np.ones(4), 0.5).tolist()
    [1.0, 0.0, 0.0, 1.0]
    """
    survivors = np.flatnonzero(default_mask)
    k = count_to_prune(amount, survivors.size, what)
    order = np.argsort(np.asarray(scores).reshape(-1)[survivors], kind="stable")
    mask = np.array(default_mask, dtype=np.float32, copy=True).reshape(-1)
    mask[survivors[order[:k]]] = 0.0
    return mask.reshape(np.shape(default_mask))


def _slice_norms(values: np.ndarray, n: int | float | str, dim: int) -> np.ndarray:
    """L_n norm of every slice along ``dim`` (one number per index of ``dim``)."""
    rows = np.moveaxis(values, dim, 0).reshape(values.shape[dim], -1)
    order = 2 if n == "fro" else n
    return np.linalg.norm(rows, ord=order, axis=1)


def slices_mask(slice_scores: np.ndarray, default_mask: np.ndarray, amount: Amount, dim: int,
                what: str = "structured") -> np.ndarray:
    """Prune the ``k`` alive slices along ``dim`` with the smallest ``slice_scores`` (one number per slice).

    A slice is alive while any entry of ``default_mask`` in it is 1; k counts alive slices. Ties: lower index first.

    >>> slices_mask(np.array([2.0, 1.0, 3.0]), np.ones((3, 2)), 1, dim=0).tolist()
    [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    default_mask = np.asarray(default_mask, dtype=np.float32)
    alive = np.flatnonzero(_slice_norms(default_mask, 1, dim) > 0)
    k = count_to_prune(amount, alive.size, what)
    order = np.argsort(np.asarray(slice_scores)[alive], kind="stable")
    mask = default_mask.copy()
    index = [slice(None)] * mask.ndim
    index[dim] = alive[order[:k]]
    mask[tuple(index)] = 0.0
    return mask


def structured_mask(scores: np.ndarray, default_mask: np.ndarray, amount: Amount, n: int | float | str, dim: int,
                    what: str = "structured") -> np.ndarray:
    """Prune the ``k`` alive slices along ``dim`` with the smallest L_n norm of ``scores`` (PyTorch's
    ``LnStructured.compute_mask``: the norm is of ``scores`` as given; mask them first to rank survivors only).

    >>> structured_mask(np.array([[1.0, 1.0], [3.0, 0.0], [0.5, 0.5]]), np.ones((3, 2)), 1, n=1, dim=0).tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """
    return slices_mask(_slice_norms(np.asarray(scores), n, dim), default_mask, amount, dim, what)


def nm_mask(scores: np.ndarray, default_mask: np.ndarray, n: int, m: int, dim: int = 1, what: str = "nm_sparsity"
            ) -> np.ndarray:
    """Keep the ``n`` highest-scoring survivors in every group of ``m`` consecutive entries along ``dim``.

    Ties: the lower index is kept. Groups start at index 0; the size along ``dim`` must be a multiple of m.

    >>> nm_mask(np.array([[4.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]]), np.ones((1, 8)), 2, 4).tolist()
    [[1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
    """
    default_mask = np.asarray(default_mask, dtype=np.float32)
    length = default_mask.shape[dim]
    if length % m:
        raise ValueError(f"{what}: dimension {dim} has {length} entries, not a multiple of m={m}; N:M sparsity "
                         f"needs whole groups of {m}")
    moved_mask = np.moveaxis(default_mask, dim, -1)
    moved_scores = np.moveaxis(np.asarray(scores, dtype=np.float64), dim, -1)
    groups_shape = moved_mask.shape[:-1] + (length // m, m)
    ranked = np.where(moved_mask > 0, moved_scores, -np.inf).reshape(groups_shape)
    order = np.argsort(-ranked, axis=-1, kind="stable")           # descending; equal scores keep index order
    keep = np.zeros(groups_shape, dtype=np.float32)
    np.put_along_axis(keep, order[..., :n], 1.0, axis=-1)
    keep = keep.reshape(moved_mask.shape) * moved_mask
    return np.ascontiguousarray(np.moveaxis(keep, -1, dim))


def random_scores(shape: tuple[int, ...], seed: int | None) -> np.ndarray:
    """Uniform [0, 1) scores from ``default_rng(seed)``, or from nanoopt's global generator when seed is None.

    >>> random_scores((2, 3), seed=0).shape
    (2, 3)
    """
    rng = get_rng() if seed is None else np.random.default_rng(seed)
    return rng.random(shape)


# ===================================================================== the public methods
def _what(method: str, module: Module, name: str) -> str:
    return f"{method}({module_label(module)}, {name!r})"


def _parameter_along(module: Module, name: str, dim: int, what: str) -> tuple[Any, int]:
    """``module.<name>`` (the original under a mask) and ``dim`` checked against its rank, as an index >= 0."""
    parameter = get_parameter(module, name)
    return parameter, _check_dim(dim, parameter.ndim, what)


def _check_dim(dim: int, ndim: int, what: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= dim < ndim:
        raise ValueError(f"{what}: dim must be an int in [{-ndim}, {ndim - 1}] for a {ndim}-D parameter, got {dim!r}")
    return int(dim) % ndim


def identity(module: Module, name: str) -> Module:
    """Reparametrise ``module.<name>`` with an all-ones mask (prunes nothing).

    >>> from nanoopt import nn
    >>> sorted(identity(nn.Linear(2, 2), "weight").state_dict())
    ['bias', 'weight_mask', 'weight_orig']
    """
    return apply_mask(module, name, np.ones(get_parameter(module, name).shape, dtype=np.float32))


def l1_unstructured(module: Module, name: str, amount: Amount, importance_scores: Any = None) -> Module:
    """Prune the ``amount`` survivors of ``module.<name>`` with the smallest |w| (or |importance_scores|).

    >>> from nanoopt import nn
    >>> layer = l1_unstructured(nn.Linear(10, 10), "weight", amount=0.3)
    >>> int((layer.weight_mask == 0).sum())
    30
    """
    what = _what("l1_unstructured", module, name)
    parameter = get_parameter(module, name)
    scores = parameter.data if importance_scores is None else importance_scores
    scores = np.abs(_check_scores(scores, parameter.shape, what))
    return apply_mask(module, name, unstructured_mask(scores, get_mask(module, name), amount, what))


def random_unstructured(module: Module, name: str, amount: Amount, seed: int | None = None) -> Module:
    """Prune ``amount`` survivors of ``module.<name>`` chosen uniformly at random (``seed``, else the global RNG).

    >>> from nanoopt import nn
    >>> layer = random_unstructured(nn.Linear(10, 10), "weight", amount=7, seed=0)
    >>> int((layer.weight_mask == 0).sum())
    7
    """
    what = _what("random_unstructured", module, name)
    parameter = get_parameter(module, name)
    scores = random_scores(parameter.shape, seed)
    return apply_mask(module, name, unstructured_mask(scores, get_mask(module, name), amount, what))


def ln_structured(module: Module, name: str, amount: Amount, n: int | float | str, dim: int,
                  importance_scores: Any = None) -> Module:
    """Prune whole slices along ``dim`` of ``module.<name>`` with the smallest L_n norm (``n``: int, float,
    ``float('inf')``, ``-inf`` or ``'fro'``). dim 0 removes output neurons / filters. ``n`` and ``dim`` are
    required, as in PyTorch's ``ln_structured``.

    The norm is of the masked weight, or of ``importance_scores`` as given (PyTorch's rule: after an unstructured
    pruning, entries already pruned still count in a slice's importance-score norm).

    >>> from nanoopt import nn
    >>> layer = ln_structured(nn.Linear(4, 6), "weight", amount=0.5, n=1, dim=0)
    >>> layer.weight_mask.sum(axis=1).tolist().count(0.0)
    3
    """
    what = _what("ln_structured", module, name)
    parameter, dim = _parameter_along(module, name, dim, what)
    valid_norm = n == "fro" or (isinstance(n, numbers.Real) and not isinstance(n, bool) and not np.isnan(n))
    if not valid_norm:
        raise ValueError(f"{what}: n must be a number (the L_n norm; inf allowed) or 'fro', got {n!r}")
    mask = get_mask(module, name)
    if importance_scores is None:                          # PyTorch ranks the masked weight ...
        scores = _check_scores(parameter.data, parameter.shape, what) * mask
    else:                                                  # ... or the importance scores exactly as given
        scores = _check_scores(importance_scores, parameter.shape, what)
    return apply_mask(module, name, structured_mask(scores, mask, amount, n, dim, what))


def random_structured(module: Module, name: str, amount: Amount, dim: int, seed: int | None = None) -> Module:
    """Prune ``amount`` alive slices along ``dim`` chosen at random (``seed``, else the global RNG); ``dim`` is
    required, as in PyTorch's ``random_structured``.

    >>> from nanoopt import nn
    >>> layer = random_structured(nn.Linear(4, 6), "weight", amount=2, dim=0, seed=1)
    >>> layer.weight_mask.sum(axis=1).tolist().count(0.0)
    2
    """
    what = _what("random_structured", module, name)
    parameter, dim = _parameter_along(module, name, dim, what)
    per_slice = random_scores((parameter.shape[dim],), seed)   # one uniform number per slice: all equally likely
    return apply_mask(module, name, slices_mask(per_slice, get_mask(module, name), amount, dim, what))


def nm_sparsity(module: Module, name: str = "weight", n: int = 2, m: int = 4, dim: int = 1,
                importance_scores: Any = None) -> Module:
    """N:M sparsity: in every group of ``m`` consecutive weights along ``dim`` (the input dimension) keep the
    ``n`` with the largest |w| (or |importance_scores|).

    >>> from nanoopt import nn
    >>> layer = nm_sparsity(nn.Linear(8, 3), "weight", n=2, m=4)
    >>> layer.weight_mask.reshape(3, 2, 4).sum(axis=-1).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    what = _what("nm_sparsity", module, name)
    for label, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{what}: {label} must be an int, got {value!r}")
    if not 1 <= n <= m:
        raise ValueError(f"{what}: need 1 <= n <= m (keep n of every m weights), got n={n}, m={m}")
    parameter = get_parameter(module, name)
    if parameter.ndim < 2:
        raise ValueError(f"{what}: N:M sparsity needs a parameter with an input dimension, got shape "
                         f"{parameter.shape}")
    dim = _check_dim(dim, parameter.ndim, what)
    scores = parameter.data if importance_scores is None else importance_scores
    scores = np.abs(_check_scores(scores, parameter.shape, what))
    return apply_mask(module, name, nm_mask(scores, get_mask(module, name), int(n), int(m), dim, what))


def custom_from_mask(module: Module, name: str, mask: Any) -> Module:
    """Prune ``module.<name>`` with a given 0/1 ``mask`` (composed with any existing one).

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> custom_from_mask(nn.Linear(2, 1), "weight", np.array([[0, 1]])).weight_mask.tolist()
    [[0.0, 1.0]]
    """
    return apply_mask(module, name, np.asarray(mask))


class L1Unstructured:
    """PyTorch's ``prune.L1Unstructured`` method class: the mask of :func:`l1_unstructured` (|w| ranked, the
    ``amount`` smallest survivors pruned). Pass the class as ``global_unstructured(..., pruning_method=)``.

    >>> import numpy as np
    >>> L1Unstructured(amount=1).compute_mask(np.array([3.0, -1.0, 2.0]), np.ones(3)).tolist()
    [1.0, 0.0, 1.0]
    """

    PRUNING_TYPE = "unstructured"
    method = "l1"

    def __init__(self, amount: Amount) -> None:
        self.amount = amount

    def compute_mask(self, t: Any, default_mask: Any) -> np.ndarray:
        """The mask pruning ``amount`` more survivors of ``default_mask`` by smallest ``|t|``."""
        scores = np.abs(np.asarray(getattr(t, "data", t), dtype=np.float64))
        return unstructured_mask(scores, np.asarray(default_mask), self.amount, "L1Unstructured")

    @classmethod
    def apply(cls, module: Module, name: str, amount: Amount, importance_scores: Any = None) -> Module:
        """``l1_unstructured(module, name, amount, importance_scores)``."""
        return l1_unstructured(module, name, amount, importance_scores)


class RandomUnstructured:
    """PyTorch's ``prune.RandomUnstructured`` method class: the mask of :func:`random_unstructured` (``amount``
    survivors chosen uniformly at random, from the global generator). Usable as ``pruning_method=``.

    >>> import numpy as np
    >>> int(RandomUnstructured(amount=2).compute_mask(np.ones(5), np.ones(5)).sum())
    3
    """

    PRUNING_TYPE = "unstructured"
    method = "random"

    def __init__(self, amount: Amount) -> None:
        self.amount = amount

    def compute_mask(self, t: Any, default_mask: Any) -> np.ndarray:
        """The mask pruning ``amount`` more survivors of ``default_mask`` chosen at random."""
        default_mask = np.asarray(default_mask)
        return unstructured_mask(random_scores(default_mask.shape, None), default_mask, self.amount,
                                 "RandomUnstructured")

    @classmethod
    def apply(cls, module: Module, name: str, amount: Amount, seed: int | None = None) -> Module:
        """``random_unstructured(module, name, amount, seed)``."""
        return random_unstructured(module, name, amount, seed)


_GLOBAL_METHODS = {"l1": "l1", "random": "random", L1Unstructured: "l1", RandomUnstructured: "random"}


def _floor(min_remaining: Amount, size: int, what: str) -> int:
    """Entries ``min_remaining`` keeps in a parameter of ``size`` entries (a fraction rounds up, an int is a count)."""
    if isinstance(min_remaining, bool) or not isinstance(min_remaining, numbers.Real):
        raise TypeError(f"{what}: min_remaining must be a float in [0, 1] or an int count, got {min_remaining!r}")
    if isinstance(min_remaining, numbers.Integral):
        if min_remaining < 0:
            raise ValueError(f"{what}: min_remaining must be >= 0, got {min_remaining}")
        return min(int(min_remaining), size)
    if not 0.0 <= float(min_remaining) <= 1.0:
        raise ValueError(f"{what}: a float min_remaining is a fraction in [0, 1], got {min_remaining}")
    return min(size, math.ceil(float(min_remaining) * size - 1e-9))


def global_unstructured(parameters: Iterable[tuple[Module, str]], pruning_method: str | type = "l1",
                        importance_scores: Mapping[tuple[Module, str], Any] | None = None, *, amount: Amount,
                        seed: int | None = None, min_remaining: Amount = 0, model: Module | None = None) -> None:
    """Rank the surviving entries of all ``parameters`` together and prune the ``amount`` lowest.

    ``pruning_method`` is ``"l1"`` or :class:`L1Unstructured` (|w|, or |importance_scores[(module, name)]| where
    given), or ``"random"`` or :class:`RandomUnstructured` (PyTorch passes the method class).
    A float ``amount`` is a fraction of all survivors together, so layers end up with different sparsities.

    A global ranking can take every entry of a layer whose weights are small (the layer then outputs only its
    bias): that gives a ``UserWarning`` naming the layer. ``min_remaining`` is a floor per parameter: a float
    fraction (rounded up) or an int count of its entries that stay unpruned (its highest-scoring survivors; a
    parameter already below the floor keeps all its survivors). The ``amount`` is still pruned in total, among
    the other survivors (``ValueError`` if they are too few). ``model`` (optional) names the layers in messages
    by their dotted names.

    >>> from nanoopt import nn
    >>> model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 5))
    >>> global_unstructured([(model[0], "weight"), (model[2], "weight")], amount=0.8)
    >>> int((model[0].weight_mask == 0).sum() + (model[2].weight_mask == 0).sum())
    200
    >>> model[2].weight.data[...] *= 1e-3       # a layer of small weights: the global ranking would take all
    >>> global_unstructured([(model[0], "weight"), (model[2], "weight")], pruning_method=L1Unstructured, amount=0.5,
    ...                     min_remaining=0.1)
    >>> int(model[2].weight_mask.sum())         # 10% of its 50 weights kept
    5
    """
    parameters = list(parameters)
    if not parameters:
        raise ValueError("global_unstructured: the list of (module, name) pairs is empty")
    try:
        method = _GLOBAL_METHODS.get(pruning_method)  # type: ignore[call-overload]
    except TypeError:                                 # an unhashable value
        method = None
    if method is None:
        raise ValueError(f"global_unstructured: pruning_method must be 'l1', 'random', prune.L1Unstructured or "
                         f"prune.RandomUnstructured, got {pruning_method!r}")
    pruning_method = method
    if model is not None and not isinstance(model, Module):
        raise TypeError(f"global_unstructured: model must be the Module that holds the parameters, got "
                        f"{type(model).__name__}")
    module_names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    seen: set[tuple[int, str]] = set()
    scores, masks = [], []
    for entry in parameters:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f"global_unstructured: expected (module, name) pairs, got {entry!r}")
        module, name = entry
        parameter = get_parameter(module, name)
        key = (id(module), name)
        if key in seen:
            raise ValueError(f"global_unstructured: ({module_label(module)}, {name!r}) is listed twice")
        seen.add(key)
        what = _what("global_unstructured", module, name)
        if pruning_method == "random":
            values = np.zeros(parameter.shape)
        elif importance_scores is not None and (module, name) in importance_scores:
            values = np.abs(_check_scores(importance_scores[(module, name)], parameter.shape, what))
        else:
            values = np.abs(parameter.data.astype(np.float64))
        scores.append(values.reshape(-1))
        masks.append(get_mask(module, name).reshape(-1))
    flat_scores = np.concatenate(scores)
    if pruning_method == "random":
        flat_scores = random_scores(flat_scores.shape, seed)
    flat_default = np.concatenate(masks)
    protected = _protect_floors(flat_scores, masks, min_remaining)
    if protected.any():
        survivors = int(np.count_nonzero(flat_default))
        k = count_to_prune(amount, survivors, "global_unstructured")
        if k > survivors - int(protected.sum()):
            raise ValueError(f"global_unstructured: amount={amount} prunes {k} of {survivors} surviving entries, "
                             f"but min_remaining={min_remaining} keeps {int(protected.sum())} of them; lower one of "
                             "the two")
        flat_scores = np.where(protected, np.inf, flat_scores)
    flat_mask = unstructured_mask(flat_scores, flat_default, amount, "global_unstructured")
    start = 0
    for index, ((module, name), mask) in enumerate(zip(parameters, masks, strict=True)):
        piece = flat_mask[start:start + mask.size]
        start += mask.size
        if mask.any() and not piece.any():
            label = (f"layer {module_names[id(module)]!r}" if id(module) in module_names
                     else f"parameters[{index}], {module_label(module)}")
            warnings.warn(f"global_unstructured: every entry of {name!r} in {label} is now pruned ({mask.size:,} of "
                          f"{mask.size:,}); the layer outputs only its bias, whatever its input. Keep a floor per "
                          "layer with min_remaining= (e.g. 0.02), or prune less", UserWarning, stacklevel=2)
        apply_mask(module, name, piece.reshape(get_parameter(module, name).shape))


def _protect_floors(flat_scores: np.ndarray, masks: list[np.ndarray], min_remaining: Amount) -> np.ndarray:
    """A flat boolean array marking, in each parameter, its ``min_remaining`` highest-scoring survivors."""
    protected = np.zeros(flat_scores.shape, bool)
    start = 0
    for mask in masks:
        floor = _floor(min_remaining, mask.size, "global_unstructured")
        survivors = np.flatnonzero(mask)
        if floor:
            order = np.argsort(-flat_scores[start + survivors], kind="stable")
            protected[start + survivors[order[:floor]]] = True
        start += mask.size
    return protected
