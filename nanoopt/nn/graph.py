"""Watching a model run: the data flow between its leaf modules, and the inputs or outputs of named modules.

One service for every technique that needs to see inside a forward pass (quantization, pruning, distillation,
analysis), so that the "register hooks, switch to eval mode, run under ``no_grad``, remove the hooks, restore the
training flag" sequence exists once:

* :func:`evaluating` -- eval mode (and ``no_grad`` unless ``grad=True``) for the block; the training flag is
  restored on exit, even on error.
* :func:`hooks` -- ``before(name, module, inputs)`` / ``after(name, module, inputs, output)`` on named modules for
  the block; the hooks are removed on exit. They observe only (their return values are ignored).
* :func:`capture` -- both: copies of the first input and/or the output of each named module, one per call.
* :func:`record_calls` -- one forward pass with every leaf module (a module without children) recorded as a
  :class:`Call` (its name, module, inputs and output, in execution order); the autograd graph between the calls
  is read through the public node API of :class:`~nanoopt.tensor.Tensor` (``grad_fn``: ``function``, ``inputs``
  and the named ``attributes`` of the primitive), see :func:`walk`.
* :func:`trace` -- the data flow between leaf modules as a :class:`Graph`: which leaf consumes the output of which
  (``Node.inputs`` are the producing leaves, or ``"input"``, the model input; ``Graph.output`` is the leaf whose
  output the model returns). Without an example input, a model made only of (nested) :class:`~nanoopt.nn.Sequential`
  containers is read structurally (each leaf consumes the previous one). The trace refuses what eager
  quantization cannot see: a tensor computed outside any module (a functional ``x + y`` in a ``forward``: use
  ``nn.Add``), or a leaf module called twice (give each call its own module).

>>> import numpy as np
>>> from nanoopt import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> graph = trace(model, np.zeros((1, 4), np.float32))
>>> [(node.name, node.inputs) for node in graph.nodes.values()]
[('0', ['input']), ('1', ['0']), ('2', ['1'])]
>>> graph.output, graph.consumers("0")
('2', ['1'])
>>> with capture(model, ["1"], outputs=True) as seen:
...     _ = model(np.ones((2, 4), np.float32))
>>> seen.outputs["1"][0].shape, model.training
((2, 3), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt.nn.layers import Sequential
from nanoopt.nn.module import Module
from nanoopt.tensor import Tensor, no_grad, post_order

INPUT = "input"  # the name of the model input in Node.inputs

__all__ = ["INPUT", "Call", "Captured", "Graph", "Node", "capture", "evaluating", "hooks", "leaf_modules",
           "record_calls", "trace", "walk"]


# ================================================================================================ running
def leaf_modules(model: Module) -> list[tuple[str, Module]]:
    """The modules of ``model`` without children, with their dotted names, in registration order.

    >>> from nanoopt import nn
    >>> [name for name, _ in leaf_modules(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())))]
    ['0', '1.0']
    """
    return [(name, module) for name, module in model.named_modules() if next(module.children(), None) is None]


def _named(model: Module, modules: Mapping[str, Module] | Sequence[str]) -> dict[str, Module]:
    if isinstance(modules, Mapping):
        return dict(modules)
    found = dict(model.named_modules())
    missing = [name for name in modules if name not in found]
    if missing:
        raise KeyError(f"modules: no module named {missing[0]!r} in {type(model).__name__} "
                       f"(known: {', '.join(repr(n) for n in list(found)[:8])}{', ...' if len(found) > 8 else ''})")
    return {name: found[name] for name in modules}


@contextmanager
def evaluating(model: Module, grad: bool = False) -> Iterator[Module]:
    """``model`` in eval mode (under ``no_grad`` unless ``grad``) for the block; its training flag is restored.

    >>> from nanoopt import nn
    >>> layer = nn.Dropout(0.5)
    >>> with evaluating(layer):
    ...     layer.training
    False
    >>> layer.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        if grad:
            yield model
        else:
            with no_grad():
                yield model
    finally:
        model.train(was_training)


@contextmanager
def hooks(modules: Mapping[str, Module], before: Callable[[str, Module, tuple], None] | None = None,
          after: Callable[[str, Module, tuple, Any], None] | None = None) -> Iterator[None]:
    """``before(name, module, inputs)`` and ``after(name, module, inputs, output)`` run around every call of the
    named modules within the block (observers: return values are ignored); the hooks are removed on exit.

    >>> import nanoopt as no
    >>> from nanoopt import nn
    >>> layer, seen = nn.ReLU(), []
    >>> with hooks({"relu": layer}, after=lambda name, m, i, o: seen.append((name, o.shape))):
    ...     _ = layer(no.Tensor([[1.0, -1.0]]))
    >>> _ = layer(no.Tensor([[1.0]])); seen
    [('relu', (1, 2))]
    """
    handles = []

    def pre(name: str) -> Callable[[Module, tuple], None]:
        def hook(module: Module, inputs: tuple) -> None:
            before(name, module, inputs)  # type: ignore[misc]
        return hook

    def post(name: str) -> Callable[[Module, tuple, Any], None]:
        def hook(module: Module, inputs: tuple, output: Any) -> None:
            after(name, module, inputs, output)  # type: ignore[misc]
        return hook

    try:
        for name, module in modules.items():
            if before is not None:
                handles.append(module.register_forward_pre_hook(pre(name)))
            if after is not None:
                handles.append(module.register_forward_hook(post(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Captured:
    """What :func:`capture` saw: per module name, one copy per call of its first input / its output."""

    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _copy(value: Any) -> np.ndarray:
    return np.array(value.data if isinstance(value, Tensor) else value, copy=True)


@contextmanager
def capture(model: Module, modules: Mapping[str, Module] | Sequence[str], inputs: bool = False,
            outputs: bool = False, grad: bool = False) -> Iterator[Captured]:
    """Within the block ``model`` is in eval mode (under ``no_grad`` unless ``grad``) and every call of the named
    modules (names in ``model``, or a ``{name: module}`` mapping) leaves a copy of its first input (``inputs``)
    and/or of its output (``outputs``) in the yielded :class:`Captured`, in call order. On exit the hooks are
    removed and the training flag restored.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with capture(model, ["1"], inputs=True) as seen:
    ...     _ = model(np.ones((2, 4), np.float32)); _ = model(np.ones((5, 4), np.float32))
    >>> [x.shape for x in seen.inputs["1"]]
    [(2, 3), (5, 3)]
    """
    if not inputs and not outputs:
        raise ValueError("capture: choose inputs=True and/or outputs=True")
    named = _named(model, modules)
    seen = Captured({name: [] for name in named} if inputs else {}, {name: [] for name in named} if outputs else {})

    def before(name: str, module: Module, args: tuple) -> None:
        seen.inputs[name].append(_copy(args[0]))

    def after(name: str, module: Module, args: tuple, output: Any) -> None:
        seen.outputs[name].append(_copy(output))

    with evaluating(model, grad), hooks(named, before if inputs else None, after if outputs else None):
        yield seen


# ================================================================================================ calls
@dataclass
class Call:
    """One call of a leaf module during :func:`record_calls`."""

    name: str
    module: Module
    inputs: tuple
    output: Any


def record_calls(model: Module, x: Tensor, grad: bool = False) -> tuple[list[Call], Any]:
    """Run ``model(x)`` once in eval mode (under ``no_grad`` unless ``grad``) and return every leaf module call in
    execution order, and the model's output. The calls keep their tensors alive, so ``id`` of a tensor is unique
    among them.

    >>> import numpy as np
    >>> from nanoopt import nn
    >>> calls, _ = record_calls(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), Tensor(np.ones((1, 2), np.float32)))
    >>> [(call.name, type(call.module).__name__) for call in calls]
    [('0', 'Linear'), ('1', 'ReLU')]
    """
    calls: list[Call] = []

    def after(name: str, module: Module, inputs: tuple, output: Any) -> None:
        calls.append(Call(name, module, inputs, output))

    with evaluating(model, grad), hooks(dict(leaf_modules(model)), after=after):
        output = model(x)
    return calls, output


def walk(output: Tensor, opaque: Mapping[int, Sequence[Any]]) -> list[Tensor]:
    """Every tensor ``output`` depends on, each after the tensors it was computed from (post order).

    The parents of a tensor are ``opaque[id(tensor)]`` when given (e.g. the inputs of the module call that produced
    it, whose inner operations are then not visited), else the inputs of its autograd node (``tensor.grad_fn``).

    >>> x = Tensor(np.ones(2, np.float32), requires_grad=True)
    >>> y = (x * 2.0).sum()
    >>> [t.grad_fn.function.__name__ if t.grad_fn else "leaf" for t in walk(y, {})]
    ['leaf', 'leaf', 'Mul', 'Sum']
    """
    def parents(tensor: Tensor) -> list[Tensor]:
        if id(tensor) in opaque:
            return [x for x in opaque[id(tensor)] if isinstance(x, Tensor)]
        return list(tensor.grad_fn.inputs) if tensor.grad_fn is not None else []

    return post_order(output, parents)


# ================================================================================================ the data flow
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
    for name, module in leaf_modules(model):
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
    calls, output = record_calls(model, x)
    producer_of: dict[int, str] = {id(x): INPUT}
    graph = Graph(input_shape=tuple(x.shape))
    for call in calls:
        name, module = call.name, call.module
        if name in graph.nodes:
            raise ValueError(f"module {name!r} ({type(module).__name__}) is called more than once in forward; "
                             "eager quantization needs one module per call (e.g. one ReLU per place)")
        sources = []
        for position, value in enumerate(call.inputs):
            if id(value) not in producer_of:
                raise ValueError(
                    f"input {position} of module {name!r} ({type(module).__name__}) was not produced by a leaf module "
                    "or the model input (a functional operation inside a forward?); use modules such as nn.Add, "
                    "nn.ReLU, nn.Flatten so that quantization can see every operation"
                )
            sources.append(producer_of[id(value)])
        values = call.output.data if isinstance(call.output, Tensor) else call.output
        graph.nodes[name] = Node(name, module, sources, tuple(np.shape(values)))
        producer_of[id(call.output)] = name
    if id(output) not in producer_of:
        raise ValueError(f"the output of {type(model).__name__} was not produced by a leaf module (a functional "
                         "operation at the end of forward?); use modules for every operation")
    graph.output = producer_of[id(output)]
    return graph
