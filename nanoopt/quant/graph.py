"""The data flow between the leaf modules of a model, as eager quantization needs it.

Quantization transforms work on the module tree (eager mode, like PyTorch's ``torch.ao.quantization``), but
folding BatchNorm, fusing ReLU and knowing which quantizer feeds which layer need the *data flow*: which leaf
module consumes the output of which. :func:`trace` records it by running one example input with forward hooks
on every leaf module (a module without children): each call notes the tensors it received and produced, so
``Node.inputs`` are the producing leaves (or ``"input"``, the model input) and ``Graph.output`` is the leaf
whose output the model returns. Without an example input, a model made only of (nested)
:class:`~nanoopt.nn.Sequential` containers is read structurally (each leaf consumes the previous one).

The trace refuses what eager quantization cannot see: a tensor computed outside any module (a functional
``x + y`` in a ``forward``: use ``nn.Add``), or a leaf module called twice (give each call its own module).

>>> import numpy as np
>>> from nanoopt import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> graph = trace(model, np.zeros((1, 4), np.float32))
>>> [(node.name, node.inputs) for node in graph.nodes.values()]
[('0', ['input']), ('1', ['0']), ('2', ['1'])]
>>> graph.output, graph.consumers("0")
('2', ['1'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt.nn import Module, Sequential
from nanoopt.tensor import Tensor, no_grad

INPUT = "input"  # the name of the model input in Node.inputs

__all__ = ["INPUT", "Graph", "Node", "trace"]


@dataclass
class Node:
    """One leaf module call: its dotted name, the module, and the producers of its inputs (in argument order)."""

    name: str
    module: Module
    inputs: list[str]
    output_shape: tuple[int, ...] | None = None  # from the trace (None when read structurally)


@dataclass
class Graph:
    """Leaf calls in execution order, and which one produces the model output."""

    nodes: dict[str, Node] = field(default_factory=dict)
    output: str = INPUT
    input_shape: tuple[int, ...] | None = None  # the example input's shape (None when read structurally)

    def consumers(self, name: str) -> list[str]:
        """Nodes that take the output of ``name`` (``"input"`` for the model input), in execution order."""
        return [node.name for node in self.nodes.values() if name in node.inputs]

    def sole_consumer(self, name: str) -> str | None:
        """The only consumer of ``name``, or None when there are several, none, or it is the model output."""
        users = self.consumers(name)
        if len(users) != 1 or name == self.output:
            return None
        return users[0]

    def producer(self, name: str) -> str:
        """The producer of the single input of ``name``."""
        inputs = self.nodes[name].inputs
        if len(inputs) != 1:
            raise ValueError(f"layer {name!r} has {len(inputs)} inputs, expected one")
        return inputs[0]


def _leaves(model: Module) -> list[tuple[str, Module]]:
    return [(name, module) for name, module in model.named_modules() if not list(module.children())]


def _structural(model: Module) -> Graph:
    """The chain of leaves of a model built only from nested Sequentials."""
    for name, module in model.named_modules():
        if list(module.children()) and not isinstance(module, Sequential):
            raise ValueError(
                f"{type(model).__name__}: module {name or '(root)'!r} ({type(module).__name__}) has its own "
                "forward, so the data flow cannot be read from the structure; pass example_input= to trace it"
            )
    graph = Graph()
    previous = INPUT
    for name, module in _leaves(model):
        graph.nodes[name] = Node(name, module, [previous])
        previous = name
    graph.output = previous
    return graph


def trace(model: Module, example_input: Any = None) -> Graph:
    """The data flow of ``model`` on ``example_input`` (ndarray or Tensor), or its structure if None.

    The model runs once in eval mode under ``no_grad``; its training flag is restored afterwards.
    """
    if example_input is None:
        return _structural(model)
    x = example_input if isinstance(example_input, Tensor) else Tensor(np.asarray(example_input))
    producer_of: dict[int, str] = {id(x): INPUT}
    keep_alive: list[Any] = [x]  # ids stay unique while every traced tensor is referenced
    graph = Graph(input_shape=tuple(x.shape))
    handles = []

    def before(module: Module, inputs: tuple) -> None:
        name = names[id(module)]
        if name in graph.nodes:
            raise ValueError(f"module {name!r} ({type(module).__name__}) is called more than once in forward; "
                             "eager quantization needs one module per call (e.g. one ReLU per place)")
        sources = []
        for position, value in enumerate(inputs):
            if id(value) not in producer_of:
                raise ValueError(
                    f"input {position} of module {name!r} ({type(module).__name__}) was not produced by a leaf module "
                    "or the model input (a functional operation inside a forward?); use modules such as nn.Add, "
                    "nn.ReLU, nn.Flatten so that quantization can see every operation"
                )
            sources.append(producer_of[id(value)])
        graph.nodes[name] = Node(name, module, sources)

    def after(module: Module, inputs: tuple, output: Any) -> None:
        producer_of[id(output)] = names[id(module)]
        values = output.data if isinstance(output, Tensor) else output
        graph.nodes[names[id(module)]].output_shape = tuple(np.shape(values))
        keep_alive.append(output)

    names = {}
    for name, module in _leaves(model):
        names[id(module)] = name
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if id(output) not in producer_of:
        raise ValueError(f"the output of {type(model).__name__} was not produced by a leaf module (a functional "
                         "operation at the end of forward?); use modules for every operation")
    graph.output = producer_of[id(output)]
    return graph
