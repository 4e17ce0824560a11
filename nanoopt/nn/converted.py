"""Which models are still float: the transforms that need float layers refuse converted models by name.

Quantization and sparse conversion replace float layers by modules that hold integer codes or packed weights
(``quant.convert``, ``quantize_dynamic``, ``quantize_weights``, ``prune.to_sparse``) or by simulated layers
(``quant.prepare``, ``prepare_qat``). A float transform (``prepare_qat``, ``cross_layer_equalization``,
``prune.shrink``, ``prune.to_sparse``, ``quantize_weights`` ...) finds no float layer in such a model and would
return it unchanged; :func:`require_float_model` makes that a ``TypeError`` naming the converted layers.

Converted modules are recognised by the module that defines their class (:data:`CONVERTED_IN`), so this file
imports nothing from the techniques above it.

>>> from nanoopt import nn
>>> require_float_model(nn.Sequential(nn.Linear(2, 2)), "prune.shrink")     # float: nothing to say
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoopt.nn.module import Module

__all__ = ["CONVERTED_IN", "converted_layers", "require_float_model"]

CONVERTED_IN = {  # module of the class -> what made it
    "nanoopt.quant.qmodules": "quant.convert",
    "nanoopt.quant.dynamic": "quant.quantize_dynamic / quantize_weights",
    "nanoopt.quant.ptq": "quant.prepare",
    "nanoopt.quant.simulate": "quant.prepare",
    "nanoopt.quant.qat": "quant.prepare_qat",
    "nanoopt.prune.sparse": "prune.to_sparse",
}


def converted_layers(model: Module, allow: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """``(name, class name, what made it)`` for every converted module of ``model`` (classes defined in the
    modules of :data:`CONVERTED_IN`, except those listed in ``allow``).

    >>> from nanoopt import nn
    >>> converted_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    []
    """
    found = []
    for name, module in model.named_modules():
        where = type(module).__module__
        if where in CONVERTED_IN and where not in allow:
            found.append((name or "(the model)", type(module).__name__, CONVERTED_IN[where]))
    return found


def require_float_model(model: Module, function: str, allow: Sequence[str] = ()) -> None:
    """``TypeError`` if ``model`` is not a Module or holds converted layers (module docstring).

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
