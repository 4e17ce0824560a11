"""Which models are still float: the transforms that need float layers refuse converted models.

Quantization and sparse conversion replace float layers by modules that hold integer codes or packed weights
(``quant.convert``, ``quantize_dynamic``, ``quantize_weights``, ``rtn`` / ``gptq`` / ``awq``, ``quantize_w8a8``,
``prune.to_sparse``) or by simulated layers and quantizers (``quant.prepare``, ``prepare_qat``,
``prepare_w8a8``). A float transform (``prepare_qat``, ``cross_layer_equalization``, ``prune.shrink``,
``prune.to_sparse``, ``quantize_weights`` ...) finds no float layer in such a model and would return it unchanged;
:func:`require_float_model` makes that a ``TypeError`` naming the converted layers.

A converted module says so itself: its class sets the class attribute ``converted_by`` (:data:`MARKER`) to the
function that makes it, and subclasses inherit it. No list of classes or modules is kept here, so this file
imports nothing from the techniques above it and a new converted layer cannot be missed by a stale registry.

>>> from nanoopt import nn
>>> require_float_model(nn.Sequential(nn.Linear(2, 2)), "prune.shrink")     # float: nothing to say
>>> class Packed(nn.Module):
...     converted_by = "my_packer"
>>> converted_layers(nn.Sequential(nn.Linear(2, 2), Packed()))
[('1', 'Packed', 'my_packer')]
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoopt.nn.module import Module

__all__ = ["MARKER", "converted_by", "converted_layers", "require_float_model"]

MARKER = "converted_by"  # the class attribute of converted modules: what made them (e.g. "quant.convert")


def converted_by(module: Module) -> str | None:
    """What made ``module`` (its class's ``converted_by``), or None for a float module.

    >>> from nanoopt import nn, quant, models
    >>> converted_by(nn.Linear(2, 2)), converted_by(quant.quantize_dynamic(models.tiny_mlp())[1])
    (None, 'quant.quantize_dynamic / quantize_weights')
    """
    return getattr(type(module), MARKER, None)


def converted_layers(model: Module, allow: Sequence[type] = ()) -> list[tuple[str, str, str]]:
    """``(name, class name, what made it)`` for every converted module of ``model``, except instances of the
    classes in ``allow``.

    >>> from nanoopt import nn
    >>> converted_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    []
    """
    found = []
    for name, module in model.named_modules():
        made_by = converted_by(module)
        if made_by is not None and not isinstance(module, tuple(allow)):
            found.append((name or "(the model)", type(module).__name__, made_by))
    return found


def require_float_model(model: Module, function: str, allow: Sequence[type] = ()) -> None:
    """``TypeError`` if ``model`` is not a Module or holds converted layers (module docstring); instances of the
    classes in ``allow`` are accepted.

    >>> from nanoopt import models, quant
    >>> import numpy as np
    >>> qmodel = quant.quantize_dynamic(models.tiny_mlp())
    >>> try:
    ...     require_float_model(qmodel, "prune.shrink")
    ... except TypeError as error:
    ...     print(str(error)[:97])
    prune.shrink: the model is already converted (layer '1' is a DynamicQuantizedLinear made by quant
    """
    if not isinstance(model, Module):
        raise TypeError(f"{function} expects a float nanoopt.nn.Module, got {type(model).__name__}")
    found = converted_layers(model, allow)
    if found:
        name, kind, made_by = found[0] if found[0][0] != "(the model)" or len(found) == 1 else found[1]
        others = f", and {len(found) - 1} more converted modules" if len(found) > 1 else ""
        raise TypeError(f"{function}: the model is already converted (layer {name!r} is a {kind} made by "
                        f"{made_by}{others}); {function} works on float models: apply it to the float model "
                        "before converting it")
