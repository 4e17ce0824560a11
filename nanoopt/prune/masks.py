"""Pruning as a reversible reparametrisation: ``weight = weight_orig * weight_mask`` (PyTorch's ``prune`` API).

Pruning a parameter ``name`` of a module (LeCun et al. 1990; Han et al. 2015 prune by zeroing weights under a
fixed binary mask) does three things, with PyTorch's names so that checkpoints move between the two:

* the trainable :class:`~nanoopt.nn.Parameter` is moved, as the same object, to ``<name>_orig``
  (an optimiser that already holds it keeps training it);
* a buffer ``<name>_mask`` (float32 zeros and ones, the parameter's shape) is registered, so ``state_dict()``
  holds ``<name>_orig`` and ``<name>_mask`` and a pruned model saves and loads without loss;
* a forward pre-hook sets the plain attribute ``module.<name> = <name>_orig * <name>_mask`` before every call.
  The product is a node of the autograd graph, so d(loss)/d(orig) = d(loss)/d(weight) * mask: a pruned entry
  gets an exactly zero gradient and its effective weight stays exactly zero whatever the optimiser does.

Pruning the same parameter again composes: the new mask is computed among the survivors only and multiplied into
the old one (``mask = old_mask * new_mask``). :func:`remove` bakes ``orig * mask`` into a plain parameter again.
:func:`load_pruned_state_dict` loads a pruned checkpoint into a fresh (unpruned) model by applying the same
reparametrisation first.

The product is recomputed at every forward (as in PyTorch); for inference call :func:`remove` (or shrink the
model, :mod:`nanoopt.prune.surgery`) once training is over.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import nn
>>> layer = nn.Linear(3, 2)
>>> _ = apply_mask(layer, "weight", np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32))
>>> sorted(layer.state_dict())
['bias', 'weight_mask', 'weight_orig']
>>> bool((layer.weight.data[0, 1] == 0) and (layer.weight.data[1, 0] == 0))
True
>>> _ = remove(layer, "weight"); sorted(layer.state_dict())
['bias', 'weight']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from nanoopt.nn import Module, Parameter
from nanoopt.tensor import Tensor

ORIG_SUFFIX = "_orig"
MASK_SUFFIX = "_mask"


class MaskHook:
    """The forward pre-hook of one pruned parameter: ``module.<name> = <name>_orig * <name>_mask``.

    A small class (not a closure) so that it can be found again by :func:`remove` and deep-copied with its module.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: Module, inputs: tuple) -> None:
        set_effective(module, self.name)

    def __repr__(self) -> str:
        return f"MaskHook({self.name!r})"


def set_effective(module: Module, name: str) -> None:
    """Recompute ``module.<name> = <name>_orig * <name>_mask`` (a graph node when gradients are enabled).

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> layer = apply_mask(nn.Linear(2, 1), "weight", np.array([[1.0, 0.0]]))
    >>> layer.weight_orig.data[...] = 3.0; set_effective(layer, "weight"); layer.weight.data.tolist()
    [[3.0, 0.0]]
    """
    orig = module._parameters[name + ORIG_SUFFIX]
    mask = module._buffers[name + MASK_SUFFIX]
    object.__setattr__(module, name, orig * mask)


def module_label(module: Module) -> str:
    """A short description of a module for error messages, e.g. ``Linear(in_features=4, ...)``.

    >>> from nanoopt import nn
    >>> module_label(nn.Linear(2, 3))
    'Linear(in_features=2, out_features=3, bias=True)'
    """
    return f"{type(module).__name__}({module.extra_repr()})"


def is_pruned(module: Module, name: str | None = None) -> bool:
    """Whether ``module`` carries a pruning reparametrisation (for parameter ``name``, or for any parameter).

    >>> from nanoopt import nn
    >>> is_pruned(nn.Linear(2, 2))
    False
    """
    names = pruned_names(module)
    return bool(names) if name is None else name in names


def pruned_names(module: Module) -> list[str]:
    """Names of the parameters of ``module`` that are currently pruned (have a :class:`MaskHook`).

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> pruned_names(apply_mask(nn.Linear(2, 1), "bias", np.array([0.0])))
    ['bias']
    """
    return [hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, MaskHook)]


def get_mask(module: Module, name: str) -> np.ndarray:
    """The current mask of ``module.<name>``: its ``<name>_mask`` buffer, or all ones if it is not pruned.

    >>> from nanoopt import nn
    >>> get_mask(nn.Linear(2, 1), "weight").tolist()
    [[1.0, 1.0]]
    """
    if is_pruned(module, name):
        return module._buffers[name + MASK_SUFFIX]
    return np.ones(get_parameter(module, name).shape, dtype=np.float32)


def get_parameter(module: Module, name: str) -> Parameter:
    """The trainable tensor behind ``module.<name>``: ``<name>_orig`` when pruned, else the parameter itself.

    Raises ``ValueError`` naming the module when it has no such parameter.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> layer = nn.Linear(2, 1); original = layer.weight
    >>> get_parameter(apply_mask(layer, "weight", np.ones((1, 2))), "weight") is original
    True
    """
    if not isinstance(module, Module):
        raise TypeError(f"expected a nanoopt Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"parameter name must be a str, got {type(name).__name__}")
    if is_pruned(module, name):
        return module._parameters[name + ORIG_SUFFIX]
    parameter = module._parameters.get(name)
    if parameter is None:
        available = [key for key, value in module._parameters.items() if value is not None]
        raise ValueError(f"{module_label(module)} has no parameter {name!r} to prune; its parameters are "
                         f"{available}")
    return parameter


def apply_mask(module: Module, name: str, mask: np.ndarray) -> Module:
    """Prune ``module.<name>`` with a 0/1 ``mask`` of its shape, composing with any mask already applied.

    The stored mask becomes ``old_mask * mask`` (float32); the first call reparametrises the module (see the
    module docstring). Returns ``module``.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> layer = nn.Linear(2, 1)
    >>> _ = apply_mask(layer, "weight", np.array([[1.0, 0.0]])); _ = apply_mask(layer, "weight", np.array([[0.0, 1.0]]))
    >>> layer.weight_mask.tolist()
    [[0.0, 0.0]]
    """
    parameter = get_parameter(module, name)
    mask = np.asarray(mask)
    if mask.shape != parameter.shape:
        raise ValueError(f"{module_label(module)}: the mask for {name!r} has shape {mask.shape}, expected the "
                         f"parameter's shape {parameter.shape}")
    if mask.dtype.kind not in "biuf" or not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{module_label(module)}: a mask for {name!r} must hold only 0 and 1, got values "
                         f"{np.unique(mask)[:5]}")
    mask = mask.astype(np.float32)
    if is_pruned(module, name):
        module._buffers[name + MASK_SUFFIX] = module._buffers[name + MASK_SUFFIX] * mask
    else:
        del module._parameters[name]
        module.register_parameter(name + ORIG_SUFFIX, parameter)
        module.register_buffer(name + MASK_SUFFIX, mask)
        module.register_forward_pre_hook(MaskHook(name))
    set_effective(module, name)
    return module


def remove(module: Module, name: str) -> Module:
    """Make the pruning of ``module.<name>`` permanent: ``<name> = Parameter(orig * mask)``; drop orig and mask.

    The parameter object that was ``<name>_orig`` becomes ``<name>`` again (optimisers holding it keep working),
    with the pruned entries set to zero. Raises ``ValueError`` if the parameter is not pruned.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> layer = nn.Linear(2, 1); _ = apply_mask(layer, "weight", np.array([[0.0, 1.0]]))
    >>> bool(remove(layer, "weight").weight.data[0, 0] == 0)
    True
    """
    if not isinstance(module, Module):
        raise TypeError(f"remove: expected a nanoopt Module, got {type(module).__name__}")
    if not is_pruned(module, name):
        raise ValueError(f"remove: parameter {name!r} of {module_label(module)} is not pruned (pruned parameters: "
                         f"{pruned_names(module)})")
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, MaskHook) and hook.name == name:
            del module._forward_pre_hooks[key]
    orig = module._parameters.pop(name + ORIG_SUFFIX)
    mask = module._buffers.pop(name + MASK_SUFFIX)
    module.__dict__.pop(name, None)
    orig.data = (orig.data * mask).astype(orig.data.dtype, copy=False)
    module.register_parameter(name, orig)
    return module


def remove_all(model: Module) -> Module:
    """:func:`remove` every pruned parameter of every module of ``model``; returns ``model``.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> model = nn.Sequential(apply_mask(nn.Linear(2, 1), "weight", np.array([[0.0, 1.0]])))
    >>> sorted(remove_all(model).state_dict())
    ['0.bias', '0.weight']
    """
    for module in model.modules():
        for name in pruned_names(module):
            remove(module, name)
    return model


def pruned_parameters(model: Module) -> Iterator[tuple[str, Module, str]]:
    """``(module_name, module, parameter_name)`` for every pruned parameter in ``model``.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> model = nn.Sequential(nn.ReLU(), apply_mask(nn.Linear(2, 1), "weight", np.ones((1, 2))))
    >>> [(name, parameter) for name, _, parameter in pruned_parameters(model)]
    [('1', 'weight')]
    """
    for module_name, module in model.named_modules():
        for name in pruned_names(module):
            yield module_name, module, name


def load_pruned_state_dict(model: Module, state_dict: Mapping[str, Any], strict: bool = True
                           ) -> tuple[list[str], list[str]]:
    """Load a pruned checkpoint into ``model``: reparametrise every ``<name>_orig``/``<name>_mask`` pair first.

    For each key ``prefix.<name>_mask`` whose module has a plain parameter ``<name>``, the parameter is pruned
    with the stored mask; then ``model.load_state_dict(state_dict, strict)`` copies everything in. A model that
    is already pruned the same way loads directly. Returns (missing, unexpected) keys.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> pruned = nn.Sequential(nn.Linear(3, 2)); _ = apply_mask(pruned[0], "weight", np.eye(2, 3))
    >>> fresh = nn.Sequential(nn.Linear(3, 2)); _ = load_pruned_state_dict(fresh, pruned.state_dict())
    >>> np.array_equal(fresh[0].weight.data, pruned[0].weight.data)
    True
    """
    for key, value in state_dict.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        module_name, _, attribute = key.rpartition(".")
        name = attribute[: -len(MASK_SUFFIX)]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if is_pruned(module, name) or module._parameters.get(name) is None:
            continue
        if module_name + ("." if module_name else "") + name + ORIG_SUFFIX not in state_dict:
            continue
        apply_mask(module, name, np.asarray(value.data if isinstance(value, Tensor) else value))
    # a dict from state_dict() or nanoopt.io.load keeps its descriptions (metadata); any other mapping is copied
    missing, unexpected = model.load_state_dict(state_dict if isinstance(state_dict, dict) else dict(state_dict),
                                                 strict=strict)
    for module in model.modules():
        for name in pruned_names(module):
            set_effective(module, name)
    return missing, unexpected
