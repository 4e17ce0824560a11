"""The deployment runtime: a model as a flat plan of prepared kernel calls, loadable from one file.

``plan = nanoopt.runtime.compile(model)`` turns a converted integer model (:func:`nanoopt.quant.convert`) or a
float model in eval mode into a callable ``plan(x: np.ndarray) -> np.ndarray``: the input quantization, the
integer layers and the output dequantization of an integer model run as a list of compiled kernel calls over
buffers preallocated per input shape, bit-identical to the model itself; a float model runs its layers on BLAS and
compiled kernels the same way. Constants are validated once, when the plan is built; a call checks only its input.

``save(plan, path)`` / ``load(path)`` store and read a plan as one ``.npz`` file (no pickle). This package imports
only NumPy, Numba, the integer specification (:mod:`nanoopt.spec`) and :mod:`nanoopt.kernels` -- no
autograd, layers or techniques -- so an application that loads a saved plan embeds just that. (``compile`` also
takes a Module: that conversion is :func:`nanoopt.deploy.to_plan`, imported only then.)

Numba compiles each kernel on its first call and caches it on disk (``cache=True``); :func:`precompile` runs a
plan once per batch size so that the cache is filled before deployment (``nanoopt precompile plan.npz``).

>>> import numpy as np
>>> from nanoopt.runtime import PlanDescription, Step
>>> w = np.array([[2.0, 0.0], [0.0, -1.0]], np.float32)
>>> plan = compile(PlanDescription("float", (2,), None, None, [Step("linear", (0,), {}, {"weight": w})], 1))
>>> plan(np.ones((1, 2), np.float32))
array([[ 2., -1.]], dtype=float32)
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import IO, Any

import numpy as np

from nanoopt.runtime.description import FORMAT_VERSION, Grid, PlanDescription, PlanFormatError, Step
from nanoopt.runtime.description import load as load_description
from nanoopt.runtime.description import save as save_description
from nanoopt.runtime.plan import Plan

__all__ = ["FORMAT_VERSION", "Grid", "Plan", "PlanDescription", "PlanFormatError", "Step", "compile", "load",
           "precompile", "save"]


def compile(model: Any, example_input: Any = None) -> Plan:  # noqa: A001 - the name the API promises
    """A :class:`Plan` from a :class:`PlanDescription`, a converted integer model or a float model (eval mode).

    For a Module the description comes from :func:`nanoopt.deploy.to_plan` (``example_input`` as there: needed
    for models that are not a chain of layers and have no recorded input shape).
    """
    if isinstance(model, Plan):
        return model
    if not isinstance(model, PlanDescription):
        model = importlib.import_module("nanoopt.deploy").to_plan(model, example_input)
    return Plan(model)


def save(plan: Plan | PlanDescription, file: str | os.PathLike | IO[bytes]) -> None:
    """Write a plan (or its description) to an ``.npz`` file that :func:`load` reads."""
    save_description(plan.description if isinstance(plan, Plan) else plan, file)


def load(file: str | os.PathLike | IO[bytes]) -> Plan:
    """Read a plan file and build the plan (constants validated, weights packed); ``PlanFormatError`` if the file
    is not a plan of this format version or is damaged."""
    return Plan(load_description(file))


def precompile(plan: Plan, batch_sizes: Iterable[int] = (1, 256)) -> list[int]:
    """Run ``plan`` once on zeros for each batch size, so that Numba compiles (and caches on disk) every kernel it
    uses; returns the batch sizes run. Needs a plan with a fixed input shape.

    >>> from nanoopt.runtime import PlanDescription, Step
    >>> plan = compile(PlanDescription("float", (3,), None, None, [Step("relu", (0,))], 1))
    >>> precompile(plan, [1, 8])
    [1, 8]
    """
    if plan.input_shape is None:
        raise ValueError("precompile needs a plan with a fixed input shape (export it with an example input)")
    sizes = [int(size) for size in batch_sizes]
    for size in sizes:
        plan(np.zeros((size, *plan.input_shape), np.float32))
    return sizes
