"""Physical pruning: find which channels are tied together, then build smaller layers (and drop whole blocks).

Masking (``weight_orig * weight_mask``) keeps every shape, so it saves no time. This module removes channels for
real, as DepGraph does (Fang et al. 2023, "DepGraph: Towards any structural pruning"):

1. **Trace.** :func:`trace` runs one forward pass on an example input with forward hooks on every leaf module and
   follows the autograd graph between them. Every output channel of a Linear/Conv2d (a *producer*) gets a node;
   channels flow unchanged through BatchNorm, activations, pooling and dropout, expand to ``H*W`` features
   through Flatten, and are tied (union-find) by residual adds (``nn.Add`` or ``+``) and offset by concatenation
   along axis 1. Channels that reach the model's output, come from its input or feed a LayerNorm are pinned. An
   operation the tracer cannot follow (a grouped convolution, a matmul or transpose in a hand-written forward, a
   per-channel parameter used outside a layer, an unknown layer type) raises ``ValueError`` naming the layers
   whose channels it met, unless no prunable channel passes through it.
2. **Groups.** Producers that share tied channels form a *dependency group* (e.g. every convolution that writes
   into the same residual stream). A channel of a group can go only when it is *dead* in every producer: its
   effective weight slice ``weight[j]`` (``weight_orig * weight_mask``) is all zero.
3. **Shrink.** A dead channel outputs the constant ``bias[j]`` everywhere, so after per-channel layers it still
   reaches each consumer as a constant ``v`` (measured on the example input and checked to be constant). It is
   removed, and ``W[:, j] v`` (summed over the kernel for a convolution) is folded into the consumer's bias, which
   keeps the outputs equal to the masked model's, up to float rounding. Where that is impossible (``v != 0``
   entering a zero-padded convolution, whose border windows see fewer copies of ``v``) the channel is kept and
   the report says why. Removing every channel of a group is refused.

   **A GPT** (:func:`shrink_gpt`) has (B, T, C) activations with channels last and a pinned residual stream
   (every block reads it through a LayerNorm): what can shrink is inside the blocks. A block's MLP,
   ``c_proj(GELU(c_fc(x)))``, acts on every token alone, so it is shrunk as a model of its own on (tokens, C)
   rows: a neuron whose ``c_fc`` row is all masked outputs the constant GELU(b_j), folded into ``c_proj``'s bias
   (mask with e.g. ``prune.ln_structured(block.mlp.c_fc, "weight", 0.25, n=2, dim=0)``). A head whose columns of
   ``c_proj`` are all zero (:func:`~nanoopt.prune.heads.mask_heads`) contributes nothing and is removed with
   :func:`~nanoopt.prune.heads.prune_heads`.
4. **Layers** (Gromov et al. 2024, "The unreasonable ineffectiveness of the deeper layers"; Men et al. 2024,
   ShortGPT): a residual block whose output is close to its input, measured by the angular distance
   d = arccos(<x_in, x_out> / (|x_in| |x_out|)) / pi averaged over samples, can be replaced by the identity;
   finetuning afterwards ("healing") recovers most of the loss. On a GPT a block is deleted from
   ``transformer.h`` (the later blocks move up one index) and ``config.n_layer`` drops, so the KV cache and
   checkpoints follow (:func:`remove_gpt_blocks`).

Shrinking works on the evaluation-mode model (BatchNorm with running statistics). Masks of the surviving
channels are kept (sliced), so a shrunk model can go on training with its unstructured masks; other hooks on
replaced layers are not carried over, and replaced layers have new Parameter objects, so build a new optimiser
after shrinking (``nanoopt.fit`` does, unless one is passed in).

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models, prune
>>> model = models.lenet_300_100(in_features=64)
>>> _ = prune.ln_structured(model[1], "weight", amount=0.5, n=1, dim=0)
>>> x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
>>> expected = no.train.predict(model, x)
>>> report = shrink(model, x)
>>> model[1].out_features, model[3].in_features
(150, 150)
>>> bool(np.allclose(no.train.predict(model, x), expected, atol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoopt import ops
from nanoopt.models import BasicBlock
from nanoopt.models_gpt import GPT, Block
from nanoopt.nn import Module, Parameter
from nanoopt.nn import layers as L
from nanoopt.nn.converted import require_float_model
from nanoopt.nn.graph import capture, evaluating, hooks, record_calls, walk
from nanoopt.nn.names import check_layer_names
from nanoopt.prune.heads import dead_heads, gpt_blocks, prune_heads
from nanoopt.prune.masks import (
    MASK_SUFFIX,
    apply_mask,
    get_mask,
    get_parameter,
    is_pruned,
    module_label,
    pruned_names,
)
from nanoopt.prune.methods import count_to_prune
from nanoopt.tensor import Tensor

FIXED = 0   # the union-find node of channels that can never be removed (model input and output, LayerNorm ...)

_CHANNELWISE = (L.ReLU, L.GELU, L.Sigmoid, L.Tanh, L.Dropout, L.Identity, L.MaxPool2d, L.AvgPool2d,
                L.AdaptiveAvgPool2d)
_UNARY_OPS = (ops.Neg, ops.Exp, ops.Log, ops.Sqrt, ops.Abs, ops.Tanh, ops.Sigmoid, ops.ReLU, ops.Clip, ops.GELU,
              ops.MaxPool2d, ops.AvgPool2d, ops.AdaptiveAvgPool2d, ops.Pad2d)
_BINARY_OPS = (ops.Add, ops.Sub, ops.Mul, ops.Div, ops.Maximum, ops.Pow)


# ===================================================================== union-find over channel nodes
class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:   # FIXED (0) always stays a root, so a class tied to it is recognisable
            low, high = min(ra, rb), max(ra, rb)
            self.parent[high] = low

    def roots(self, nodes: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(n)) for n in nodes], dtype=np.int64)


# ===================================================================== the trace
@dataclass
class Use:
    """A layer reading channels: ``ids[p]`` is the channel node at input position p (axis 1)."""

    name: str
    module: Module
    ids: np.ndarray


@dataclass
class Trace:
    """What one traced forward pass found (see the module docstring)."""

    producers: dict[str, tuple[Module, np.ndarray]]      # name -> (Linear/Conv2d, node per output channel)
    consumers: list[Use]                                 # Linear/Conv2d inputs
    followers: list[Use]                                 # BatchNorm channels
    pinned_reasons: dict[str, str]                       # producer name -> why its channels are pinned
    union_find: _UnionFind

    def root(self, node: int) -> int:
        return self.union_find.find(int(node))


@dataclass
class Group:
    """Producers whose output channels are tied, channel by channel (``roots[j]`` is channel j's class)."""

    producers: list[str]
    roots: np.ndarray                 # (channels,) class of each channel, in the first producer's order
    pinned: str = ""                  # why the whole group cannot shrink ('' if it can)
    readers: list[str] = field(default_factory=list)   # consumers and followers of these channels

    @property
    def channels(self) -> int:
        return int(self.roots.size)


def _as_tensor(example_input: Any) -> Tensor:
    if isinstance(example_input, Tensor):
        return Tensor(example_input.data, requires_grad=True)
    if isinstance(example_input, np.ndarray):
        return Tensor(example_input, requires_grad=True)
    raise TypeError(f"example_input must be an ndarray or Tensor, got {type(example_input).__name__}")


def _producers_named(trace_state: _TraceState, ids: np.ndarray) -> str:
    roots = {trace_state.uf.find(int(n)) for n in ids if n != FIXED}
    names = [name for name, (_, nodes) in trace_state.producers.items()
             if roots & {trace_state.uf.find(int(n)) for n in nodes}]
    return ", ".join(repr(n) for n in names) or "(none)"


class _TraceState:
    def __init__(self, source: Tensor) -> None:
        self.source = source
        self.uf = _UnionFind()
        self.producers: dict[str, tuple[Module, np.ndarray]] = {}
        self.consumers: list[Use] = []
        self.followers: list[Use] = []
        self.pinned: dict[str, str] = {}
        self.calls: dict[int, tuple[str, Module, tuple, Any]] = {}

    def prunable(self, ids: np.ndarray | None) -> bool:
        return ids is not None and any(self.uf.find(int(n)) != FIXED for n in ids)

    def pin(self, ids: np.ndarray | None, reason: str) -> None:
        """Tie these channels to FIXED, remembering why for the producers that own them."""
        if ids is None or not self.prunable(ids):
            return
        roots = {self.uf.find(int(n)) for n in ids} - {FIXED}
        for name, (_, nodes) in self.producers.items():
            if roots & {self.uf.find(int(n)) for n in nodes}:
                self.pinned.setdefault(name, reason)
        for node in ids:
            self.uf.union(node, FIXED)

    def refuse(self, ids: np.ndarray | None, where: str) -> None:
        if self.prunable(ids):
            raise ValueError(f"prune.shrink: cannot follow the channels of {_producers_named(self, ids)} through "
                             f"{where}; shrink understands Linear, Conv2d (groups=1), BatchNorm, activations, "
                             "pooling, Dropout, Flatten, Add/+, concatenation along axis 1 and scaling by constants")


def _fixed(tensor: Tensor) -> np.ndarray | None:
    return np.zeros(tensor.shape[1], dtype=np.int64) if tensor.ndim >= 2 else None


def _module_rule(state: _TraceState, name: str, module: Module, inputs: tuple, output: Tensor,
                 ids: list[np.ndarray | None]) -> np.ndarray | None:
    """Channel ids of a leaf module's output from those of its inputs."""
    first = ids[0] if ids else None
    label = f"layer {name!r} ({module_label(module)})"
    if isinstance(module, (L.Linear, L.Conv2d)):
        if isinstance(module, L.Conv2d) and module.groups != 1:
            state.refuse(first, f"{label}: grouped convolutions are not supported")
            return _fixed(output)
        if isinstance(module, L.Linear) and inputs[0].ndim != 2:
            state.refuse(first, f"{label}: Linear on a {inputs[0].ndim}-D input (only (N, features))")
            return _fixed(output)
        state.consumers.append(Use(name, module, first))
        if name not in state.producers:
            state.producers[name] = (module, state.uf.new(output.shape[1]))
        return state.producers[name][1]
    if isinstance(module, L._BatchNorm):
        state.followers.append(Use(name, module, first))
        return first
    if isinstance(module, _CHANNELWISE):
        return first
    if isinstance(module, L.Flatten):
        if module.start_dim == 1 and inputs[0].ndim >= 2:
            return np.repeat(first, int(np.prod(inputs[0].shape[2:], dtype=np.int64)))
        state.refuse(first, f"{label}: only Flatten(start_dim=1) is followed")
        return _fixed(output)
    if isinstance(module, L.Add):
        for a, b in zip(ids[0], ids[1], strict=True):
            state.uf.union(a, b)
        return ids[0]
    if isinstance(module, L.LayerNorm):
        state.pin(first, f"feeds {label}, which normalises across channels")
        return _fixed(output)
    for tensor_ids in ids:
        state.refuse(tensor_ids, f"{label}: a layer type shrink does not know")
    return _fixed(output) if isinstance(output, Tensor) else None


def _varies_along_channels(constant: Tensor, activation: Tensor) -> bool:
    axis = 1 - (activation.ndim - constant.ndim)
    return axis >= 0 and constant.shape[axis] != 1


def _op_rule(state: _TraceState, tensor: Tensor, ids: list[np.ndarray | None]) -> np.ndarray | None:
    """Channel ids of a primitive's output (a raw operation in some forward(), outside any leaf module)."""
    node = tensor.grad_fn
    function, inputs = node.function, node.inputs
    where = f"the primitive {function.__name__} (called in a forward() outside any leaf layer)"
    if function in _UNARY_OPS:
        return ids[0]
    if function in _BINARY_OPS:
        activations = [i for i, x in enumerate(ids) if x is not None]
        if len(activations) == 2 and ids[0].size == ids[1].size:
            for a, b in zip(ids[0], ids[1], strict=True):
                state.uf.union(a, b)
            return ids[0]
        if len(activations) == 1:
            act, const = activations[0], 1 - activations[0]
            if _varies_along_channels(inputs[const], inputs[act]):
                state.refuse(ids[act], f"{where} with a per-channel constant of shape {inputs[const].shape}")
                return _fixed(tensor)
            return ids[act]
        for x in ids:
            state.refuse(x, where)
        return _fixed(tensor)
    if function is ops.Reshape:
        source = inputs[0]
        if source.ndim >= 2 and tensor.ndim >= 2 and tensor.shape[:2] == source.shape[:2]:
            return ids[0]
        if source.ndim >= 2 and tensor.ndim == 2 and tensor.shape[0] == source.shape[0]:
            return np.repeat(ids[0], int(np.prod(source.shape[2:], dtype=np.int64)))
        state.refuse(ids[0], f"{where} from shape {source.shape} to {tensor.shape}")
        return _fixed(tensor)
    if function in (ops.Sum, ops.Mean, ops.Max):
        axes = node.attributes["axes"]
        if 0 not in axes and 1 not in axes:
            return ids[0]   # a reduction over spatial axes (e.g. global average pooling) keeps axis 1
        state.refuse(ids[0], f"{where} over axes {axes}")
        return _fixed(tensor)
    if function is ops.Concatenate and tensor.ndim >= 2:
        axis = node.attributes.get("axis")
        parts = [x if x is not None else np.zeros(t.shape[1], np.int64) for x, t in zip(ids, inputs, strict=True)]
        if axis == 1:
            return np.concatenate(parts)
        for part in parts[1:]:
            for a, b in zip(parts[0], part, strict=True):
                state.uf.union(a, b)
        return parts[0]
    for x in ids:
        state.refuse(x, where)
    return _fixed(tensor)


def trace(model: Module, example_input: Any) -> Trace:
    """Trace one forward pass of ``model`` (in eval mode) and return producers, consumers and tied channels.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> found = trace(models.lenet_300_100(in_features=64), np.zeros((2, 64), np.float32))
    >>> sorted(found.producers)
    ['1', '3', '5']
    """
    source = _as_tensor(example_input)
    state = _TraceState(source)
    calls, output = record_calls(model, source, grad=True)
    for call in calls:
        if isinstance(call.output, Tensor) and not any(call.output is x for x in call.inputs):
            state.calls[id(call.output)] = (call.name, call.module, call.inputs, call.output)
    opaque = {key: call[2] for key, call in state.calls.items()}
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    channel_ids: dict[int, np.ndarray | None] = {}
    for out in outputs:
        if not isinstance(out, Tensor):
            raise ValueError(f"prune.shrink: the model returned a {type(out).__name__}; expected Tensor outputs")
        for tensor in walk(out, opaque):
            if id(tensor) in channel_ids:
                continue
            if tensor is source:
                channel_ids[id(tensor)] = _fixed(tensor)
            elif id(tensor) in state.calls:
                name, module, inputs, _ = state.calls[id(tensor)]
                ids = [channel_ids.get(id(x)) if isinstance(x, Tensor) else None for x in inputs]
                channel_ids[id(tensor)] = _module_rule(state, name, module, inputs, tensor, ids)
            elif tensor.grad_fn is not None:
                ids = [channel_ids.get(id(x)) for x in tensor.grad_fn.inputs]
                channel_ids[id(tensor)] = _op_rule(state, tensor, ids)
            else:
                channel_ids[id(tensor)] = None            # a parameter or constant, not an activation
        state.pin(channel_ids[id(out)], "its channels are the model's output")
    return Trace(state.producers, state.consumers, state.followers, state.pinned, state.uf)


def dependency_groups(model: Module, example_input: Any, found: Trace | None = None) -> list[Group]:
    """The dependency groups of ``model``: producers whose output channels are tied, with their readers.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> groups = dependency_groups(models.small_resnet(widths=(4, 8)), np.zeros((1, 1, 8, 8), np.float32))
    >>> [g.producers for g in groups if not g.pinned][:2]
    [['stem.0', 'stages.0.0.conv2'], ['stages.0.0.conv1']]
    """
    found = found or trace(model, example_input)
    groups: list[Group] = []
    by_root: dict[int, int] = {}
    for name, (_, nodes) in found.producers.items():
        roots = np.array([found.root(n) for n in nodes])
        shared = {by_root[r] for r in roots if r in by_root and r != FIXED}
        if shared:
            index = min(shared)
            groups[index].producers.append(name)
            for other in sorted(shared - {index}, reverse=True):   # a producer bridging two groups merges them
                groups[index].producers.extend(groups[other].producers)
                groups[other].producers = []
        else:
            index = len(groups)
            groups.append(Group([name], roots))
        for r in roots:
            if r != FIXED:
                by_root[r] = index
    groups = [g for g in groups if g.producers]
    for group in groups:
        group.roots = np.array([found.root(n) for n in found.producers[group.producers[0]][1]])
        reasons = [found.pinned_reasons[name] for name in group.producers if name in found.pinned_reasons]
        if any(r == FIXED for r in group.roots):
            group.pinned = reasons[0] if reasons else "its channels are tied to the model's input"
        members = set(group.roots.tolist()) - {FIXED}
        group.readers = [use.name for use in found.consumers + found.followers
                         if members & {found.root(n) for n in use.ids}]
    return groups


# ===================================================================== shrinking
@dataclass
class GroupReport:
    """What :func:`shrink` did with one dependency group."""

    producers: list[str]
    readers: list[str]
    channels_before: int
    channels_after: int
    folded: int = 0                                  # removed channels whose constant output went into biases
    kept: dict[int, str] = field(default_factory=dict)   # dead channels kept, and why
    pinned: str = ""

    def __str__(self) -> str:
        head = f"group {' + '.join(self.producers)} -> read by {', '.join(self.readers) or 'nothing'}"
        if self.pinned:
            return f"{head}: not shrinkable ({self.pinned})"
        text = f"{head}: {self.channels_before} -> {self.channels_after} channels"
        if self.channels_after < self.channels_before:
            text += (f" (removed {self.channels_before - self.channels_after} channels whose weights are all "
                     "masked in every producer")
            text += f"; folded the constant outputs of {self.folded} of them into the readers' biases)" \
                if self.folded else ")"
        if self.kept:
            first = next(iter(self.kept.items()))
            text += f"; kept {len(self.kept)} dead channels, e.g. channel {first[0]}: {first[1]}"
        return text


@dataclass
class ShrinkReport:
    """The groups :func:`shrink` examined and the parameter counts before and after."""

    groups: list[GroupReport]
    parameters_before: int
    parameters_after: int

    def __str__(self) -> str:
        lines = [f"shrink: {self.parameters_before:,} -> {self.parameters_after:,} parameters"]
        lines += ["  " + str(group) for group in self.groups]
        return "\n".join(lines)


def _effective(module: Module, name: str) -> np.ndarray | None:
    if name not in pruned_names(module) and module._parameters.get(name) is None:
        return None
    return get_parameter(module, name).data * get_mask(module, name)


def _dead_channels(module: Module) -> np.ndarray:
    weight = _effective(module, "weight")
    return ~np.any(weight.reshape(weight.shape[0], -1) != 0, axis=1)


def _capture_inputs(model: Module, example_input: Any, uses: list[Use]) -> dict[str, np.ndarray]:
    with capture(model, {use.name: use.module for use in uses}, inputs=True) as seen:
        model(Tensor(example_input.data if isinstance(example_input, Tensor) else example_input))
    return {name: values[0] for name, values in seen.inputs.items() if values}


def _copy_parameter(new: Module, old: Module, name: str, index: tuple, extra: np.ndarray | None = None) -> None:
    """Give ``new.<name>`` the sliced values (and sliced mask) of ``old.<name>``; add ``extra`` to the values."""
    if _effective(old, name) is None:
        return
    pruned = is_pruned(old, name)
    values, mask = get_parameter(old, name).data, get_mask(old, name)
    for axis, positions in enumerate(index):           # one axis at a time (two index arrays would pair up)
        if not isinstance(positions, slice):
            values, mask = np.take(values, positions, axis=axis), np.take(mask, positions, axis=axis)
    if extra is not None and np.any(extra != 0):
        values, pruned = values * mask + extra, False     # constants folded into a pruned bias: bake the mask in
    new._parameters[name] = Parameter(np.ascontiguousarray(values, dtype=np.float32))
    if pruned:
        apply_mask(new, name, mask)


def _rebuild(module: Module, keep_out: np.ndarray | None, keep_in: np.ndarray | None,
             bias_extra: np.ndarray | None) -> Module:
    """A new layer like ``module`` with output channels ``keep_out`` and input positions ``keep_in``."""
    out_index = slice(None) if keep_out is None else keep_out
    in_index = slice(None) if keep_in is None else keep_in
    if isinstance(module, L._BatchNorm):
        new = type(module)(len(keep_out), module.eps, module.momentum, module.affine, module.track_running_stats)
        for name in ("weight", "bias"):
            _copy_parameter(new, module, name, (out_index,))
        for name in ("running_mean", "running_var"):
            if module._buffers.get(name) is not None:
                new._buffers[name] = module._buffers[name][out_index].copy()
        if module._buffers.get("num_batches_tracked") is not None:
            new._buffers["num_batches_tracked"] = module._buffers["num_batches_tracked"].copy()
    else:
        weight = get_parameter(module, "weight")
        outs = weight.shape[0] if keep_out is None else len(keep_out)
        ins = weight.shape[1] if keep_in is None else len(keep_in)
        has_bias = _effective(module, "bias") is not None or (bias_extra is not None and np.any(bias_extra != 0))
        if isinstance(module, L.Linear):
            new = L.Linear(ins, outs, bias=has_bias)
        else:
            new = L.Conv2d(ins, outs, module.kernel_size, module.stride, module.padding, module.dilation, 1,
                           bias=has_bias)
        _copy_parameter(new, module, "weight", (out_index, in_index))
        if bias_extra is not None:
            bias_extra = bias_extra[out_index]
        if _effective(module, "bias") is not None:
            _copy_parameter(new, module, "bias", (out_index,), bias_extra)
        elif has_bias:
            new._parameters["bias"] = Parameter(bias_extra.astype(np.float32))
    for name in pruned_names(new):               # refresh the effective weights of re-applied masks
        apply_mask(new, name, np.ones_like(new._buffers[name + MASK_SUFFIX]))
    new.train(module.training)
    return new


def shrink(model: Module, example_input: Any) -> ShrinkReport:
    """Physically remove the dead channels of every dependency group of ``model``, in place.

    A channel is dead when its weight slice is entirely masked (or zero) in every producer of its group (prune
    with :func:`~nanoopt.prune.ln_structured` or :func:`prune_channels` first). Layers are replaced by smaller
    ones whose outputs equal the masked model's (eval mode) within float rounding. Raises ``ValueError`` if the
    trace cannot follow the model or if every channel of a group is dead. Returns a :class:`ShrinkReport`.

    >>> import numpy as np
    >>> from nanoopt import models, prune
    >>> model = models.mlp(8, hidden=(6,), num_classes=2)
    >>> _ = prune.ln_structured(model[1], "weight", amount=2, n=1, dim=0)
    >>> print(shrink(model, np.ones((1, 8), np.float32)).groups[0].channels_after)
    4
    """
    require_float_model(model, "prune.shrink")
    if _is_gpt(model):   # channels last and a pinned residual stream: shrink inside the blocks
        return shrink_gpt(model, example_input)
    before = model.num_parameters()
    found = trace(model, example_input)
    groups = dependency_groups(model, example_input, found)
    dead_roots: set[int] = set()
    for group in groups:
        if group.pinned:
            continue
        alive = set()
        for name in group.producers:
            module, nodes = found.producers[name]
            for node, dead in zip(nodes, _dead_channels(module), strict=True):
                if not dead:
                    alive.add(found.root(node))
        candidates = set(group.roots.tolist()) - alive - {FIXED}
        if candidates and len(candidates) == len(set(group.roots.tolist())):
            raise ValueError(f"prune.shrink refuses to remove every channel of the group of "
                             f"{', '.join(repr(p) for p in group.producers)} ({group.channels} channels, all masked): "
                             "the network would be cut in two")
        dead_roots |= candidates

    # measure what each dead channel delivers to each consumer, and decide whether it can be folded
    captured = _capture_inputs(model, example_input, found.consumers)
    kept: dict[int, str] = {}
    folds: list[tuple[Use, np.ndarray, np.ndarray]] = []       # (consumer, positions, constants)
    for use in found.consumers:
        roots = np.array([found.root(n) for n in use.ids])
        positions = np.flatnonzero(np.isin(roots, list(dead_roots)))
        if positions.size == 0:
            continue
        values = captured[use.name][:, positions]                       # (N, P) or (N, P, H, W)
        flat = np.moveaxis(values, 1, 0).reshape(positions.size, -1)
        constant = np.all(flat == flat[:, :1], axis=1)
        constants = flat[:, 0].astype(np.float64)
        for p, ok in zip(positions, constant, strict=True):
            if not ok:
                kept.setdefault(int(roots[p]), f"its value entering {use.name!r} is not constant")
        padded = isinstance(use.module, L.Conv2d) and use.module.padding != (0, 0)
        for p, value in zip(positions, constants, strict=True):
            if padded and value != 0:
                kept.setdefault(int(roots[p]), f"its constant output {value:.4g} enters the zero-padded "
                                f"convolution {use.name!r}, whose border windows would change")
        folds.append((use, positions, constants))
    removed = dead_roots - set(kept)

    # fold constants into consumer biases, then rebuild every touched layer
    extras: dict[str, np.ndarray] = {}
    folded_roots: set[int] = set()
    for use, positions, constants in folds:
        roots = np.array([found.root(n) for n in use.ids])
        weight = _effective(use.module, "weight").astype(np.float64)
        for p, value in zip(positions, constants, strict=True):
            if int(roots[p]) not in removed or value == 0:
                continue
            column = weight[:, p].reshape(weight.shape[0], -1).sum(axis=1)
            extras.setdefault(use.name, np.zeros(weight.shape[0]))
            extras[use.name] += column * value
            folded_roots.add(int(roots[p]))
    plans: dict[str, dict[str, Any]] = {}
    for name, (module, nodes) in found.producers.items():
        keep = np.array([i for i, n in enumerate(nodes) if found.root(n) not in removed])
        if keep.size < len(nodes):
            plans.setdefault(name, {"module": module})["keep_out"] = keep
    for use in found.consumers:
        keep = np.array([i for i, n in enumerate(use.ids) if found.root(n) not in removed])
        if keep.size < len(use.ids) or use.name in extras:
            plan = plans.setdefault(use.name, {"module": use.module})
            plan["keep_in"] = keep
    for use in found.followers:
        keep = np.array([i for i, n in enumerate(use.ids) if found.root(n) not in removed])
        if keep.size < len(use.ids):
            plans.setdefault(use.name, {"module": use.module})["keep_out"] = keep
    for name, plan in plans.items():
        extra = extras.get(name)
        new = _rebuild(plan["module"], plan.get("keep_out"), plan.get("keep_in"),
                       None if extra is None else extra.astype(np.float32))
        if name:
            model.set_submodule(name, new)

    reports = []
    for group in groups:
        roots = group.roots.tolist()
        report = GroupReport(group.producers, group.readers, group.channels,
                             sum(1 for r in roots if r not in removed), pinned=group.pinned)
        report.folded = sum(1 for r in roots if r in folded_roots)
        report.kept = {j: kept[r] for j, r in enumerate(roots) if r in kept}
        reports.append(report)
    return ShrinkReport(reports, before, model.num_parameters())


# ===================================================================== shrinking a GPT
def shrink_gpt(model: Module, example_input: Any = None) -> ShrinkReport:
    """Remove every dead MLP neuron and every dead head of a GPT, in place (see the module docstring).

    ``example_input`` (token ids) is accepted for :func:`~nanoopt.prune.shrink`'s signature and not needed: a
    dead neuron's output is a constant whatever the input. The report has one group per MLP (``c_fc``'s
    neurons) and one per attention (its merged heads, in channels).

    >>> import numpy as np, nanoopt as no
    >>> from nanoopt import models, prune
    >>> no.manual_seed(0)
    >>> model = models.gpt(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=8)
    >>> _ = prune.ln_structured(model.transformer["h"][0].mlp.c_fc, "weight", amount=0.5, n=2, dim=0)
    >>> x = np.random.default_rng(0).integers(0, 7, (2, 8))
    >>> expected = model(x).data
    >>> report = shrink_gpt(model, x)
    >>> model.transformer["h"][0].mlp.c_fc.out_features, bool(np.allclose(model(x).data, expected, atol=1e-5))
    (16, True)
    >>> print(shrink_gpt(models.gpt(5, 4, 1, 2, 8)).groups[0])
    group transformer.h.0.attn.c_attn -> read by transformer.h.0.attn.c_proj: 8 -> 8 channels
    """
    blocks = gpt_blocks(model, "prune.shrink")
    before = model.num_parameters()
    reports = []
    heads = dead_heads(model)
    for name, block in blocks.items():
        attn = block.attn
        inner = attn.inner_dim
        if name in heads and len(heads[name]) == attn.n_head:
            raise ValueError(f"prune.shrink refuses to remove every head of block {name!r} (all "
                             f"{attn.n_head} masked): the attention would be cut out")
        if name in heads:
            prune_heads(model, {name: heads[name]})
        reports.append(GroupReport([f"{name}.attn.c_attn"], [f"{name}.attn.c_proj"], inner, attn.inner_dim))
        rows = np.zeros((1, block.mlp.c_fc.in_features), dtype=np.float32)
        mlp_report = shrink(block.mlp, rows)
        for group in mlp_report.groups:
            group.producers = [f"{name}.mlp.{p}" for p in group.producers]
            group.readers = [f"{name}.mlp.{r}" for r in group.readers]
            if not group.pinned:
                reports.append(group)
    return ShrinkReport(reports, before, model.num_parameters())


# ===================================================================== group-aware channel pruning
def channel_importance(model: Module, group: Group, found: Trace, criterion: str = "l2") -> np.ndarray:
    """Importance of each channel of ``group``: the sum over its producers of the channel's weight norm
    (``"l1"``/``"l2"``), or the |gamma| of the BatchNorms reading it (``"bn_scale"``, Liu et al. 2017).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.mlp(3, hidden=(2,), num_classes=2); model[1].weight.data[...] = [[1, 1, 1], [0, 0, 2]]
    >>> found = trace(model, np.ones((1, 3), np.float32)); group = dependency_groups(model, None, found)[0]
    >>> channel_importance(model, group, found, "l1").tolist()
    [3.0, 2.0]
    """
    scores = np.zeros(group.channels)
    position = {int(r): j for j, r in enumerate(group.roots)}
    if criterion == "bn_scale":
        for use in found.followers:
            gamma = _effective(use.module, "weight")
            if gamma is None:
                continue
            for p, node in enumerate(use.ids):
                j = position.get(found.root(node))
                if j is not None:
                    scores[j] += abs(float(gamma[p]))
        return scores
    if criterion not in ("l1", "l2"):
        raise ValueError(f"channel_importance: criterion must be 'l1', 'l2' or 'bn_scale', got {criterion!r}")
    order = 1 if criterion == "l1" else 2
    for name in group.producers:
        module, nodes = found.producers[name]
        weight = _effective(module, "weight")
        norms = np.linalg.norm(weight.reshape(weight.shape[0], -1), ord=order, axis=1)
        for node, norm in zip(nodes, norms, strict=True):
            scores[position[found.root(node)]] += norm
    return scores


def prune_channels(model: Module, example_input: Any, amount: float | int, criterion: str = "l2") -> list[Group]:
    """Mask the ``amount`` least important channels of every shrinkable group, in every layer that carries them.

    For a chosen channel the producers' weight rows and bias entries and the following BatchNorms' weight and
    bias entries are masked, so the channel is exactly zero and :func:`shrink` removes it without folding.
    At least one channel of each group always survives. Returns the groups that were pruned.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.small_resnet(widths=(4, 8))
    >>> x = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
    >>> _ = prune_channels(model, x, amount=0.5)
    >>> report = shrink(model, x); model.stem[0].out_channels
    2
    """
    found = trace(model, example_input)
    pruned = []
    for group in dependency_groups(model, example_input, found):
        if group.pinned:
            continue
        k = count_to_prune(amount, group.channels, f"prune_channels(group of {group.producers})")
        k = min(k, group.channels - 1)
        if k == 0:
            continue
        scores = channel_importance(model, group, found, criterion)
        chosen = {int(group.roots[j]) for j in np.argsort(scores, kind="stable")[:k]}
        for name in group.producers:
            module, nodes = found.producers[name]
            drop = np.array([found.root(n) in chosen for n in nodes])
            _mask_rows(module, drop)
        for use in found.followers:
            drop = np.array([found.root(n) in chosen for n in use.ids])
            if drop.any():
                _mask_rows(use.module, drop)
        pruned.append(group)
    return pruned


def _mask_rows(module: Module, drop: np.ndarray) -> None:
    for name in ("weight", "bias"):
        if _effective(module, name) is None:
            continue
        shape = get_parameter(module, name).shape
        mask = np.ones(shape, dtype=np.float32)
        mask[drop] = 0.0
        apply_mask(module, name, mask)


# ===================================================================== layer pruning
def _is_gpt(model: Module) -> bool:
    return isinstance(model, GPT)


def _default_blocks(model: Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (BasicBlock, Block))]


def block_angular_distances(model: Module, example_input: Any, candidates: Sequence[str] | None = None
                            ) -> dict[str, float]:
    """Mean angular distance arccos(cos(x_in, x_out)) / pi between each candidate block's input and output.

    Candidates default to every :class:`~nanoopt.models.BasicBlock` whose output has its input's shape (so the
    identity can replace it) and every block of a GPT (``"transformer.h.0"``, ...). Small distances mark blocks
    that change their input least. For sequence activations (B, T, C) the distance is taken per token and
    averaged over tokens (ShortGPT's "Block Influence", Men et al. 2024); otherwise per sample.

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.small_resnet(widths=(4, 4), blocks_per_stage=2)
    >>> sorted(block_angular_distances(model, np.ones((2, 1, 8, 8), np.float32)))   # stages.1.0 has stride 2
    ['stages.0.0', 'stages.0.1', 'stages.1.1']
    """
    names = list(candidates) if candidates is not None else _default_blocks(model)
    modules = dict(model.named_modules())
    check_layer_names(names, list(modules), "block_angular_distances: candidates", "modules")
    distances: dict[str, float] = {}

    def measure(name: str, module: Module, inputs: tuple, output: Any) -> None:
        x_in, x_out = inputs[0].data, output.data
        if x_in.shape != x_out.shape:
            return
        rows = x_in.shape[0] * x_in.shape[1] if x_in.ndim == 3 else x_in.shape[0]  # tokens or samples
        a = x_in.reshape(rows, -1).astype(np.float64)
        b = x_out.reshape(rows, -1).astype(np.float64)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        distances[name] = float(np.mean(np.arccos(np.clip(cosine, -1.0, 1.0)) / np.pi))

    with evaluating(model), hooks({name: modules[name] for name in names}, after=measure):
        model(Tensor(example_input.data if isinstance(example_input, Tensor) else example_input))
    return distances


def remove_blocks(model: Module, names: Sequence[str], example_input: Any) -> Module:
    """Replace each named block by :class:`~nanoopt.nn.Identity`, after checking on ``example_input`` that its
    output has its input's shape (``ValueError`` naming the block otherwise). On a GPT the blocks are deleted
    from ``transformer.h`` instead (:func:`remove_gpt_blocks`: later blocks move up one index
    and ``config.n_layer`` drops, so the KV cache and checkpoints follow).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.small_resnet(widths=(4,), blocks_per_stage=2)
    >>> type(remove_blocks(model, ["stages.0.1"], np.ones((1, 1, 8, 8), np.float32)).stages[0][1]).__name__
    'Identity'
    """
    distances = block_angular_distances(model, example_input, names)
    for name in names:
        if name not in distances:
            raise ValueError(f"remove_blocks: block {name!r} changes the shape of its input, so the identity "
                             "cannot replace it")
    if _is_gpt(model):
        return remove_gpt_blocks(model, names)
    for name in names:
        model.set_submodule(name, L.Identity())
    return model


def remove_gpt_blocks(model: GPT, names: Sequence[str]) -> GPT:
    """Delete the named blocks (``"transformer.h.<i>"``) from a GPT; later blocks move up; ``n_layer`` drops.

    >>> from nanoopt import models
    >>> model = remove_gpt_blocks(models.gpt(5, 4, 3, 1, 4), ["transformer.h.1"])
    >>> model.config.n_layer, len(model.transformer["h"])
    (2, 2)
    """
    blocks = gpt_blocks(model, "remove_blocks")
    missing = [n for n in names if n not in blocks]
    if missing:
        raise ValueError(f"remove_blocks: no GPT block {missing[0]!r}; the blocks are {list(blocks)}")
    if len(set(names)) >= len(blocks):
        raise ValueError(f"remove_blocks: removing all {len(blocks)} blocks of the GPT is refused")
    kept = [block for name, block in blocks.items() if name not in set(names)]
    model.transformer["h"] = L.ModuleList(kept)
    model.config = dataclasses.replace(model.config, n_layer=len(kept))
    return model


def prune_blocks(model: Module, example_input: Any, count: int, candidates: Sequence[str] | None = None
                 ) -> list[str]:
    """Remove the ``count`` shape-preserving blocks with the smallest angular distance; returns their names.

    Finetune afterwards to heal (e.g. ``nanoopt.fit(model, data, epochs=1)``).

    >>> import numpy as np
    >>> from nanoopt import models
    >>> model = models.small_resnet(widths=(4, 4), blocks_per_stage=2)
    >>> len(prune_blocks(model, np.ones((2, 1, 8, 8), np.float32), count=1))
    1
    """
    distances = block_angular_distances(model, example_input, candidates)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= len(distances):
        raise ValueError(f"prune_blocks: count must be an int in [0, {len(distances)}] (the shape-preserving "
                         f"candidates {sorted(distances)}), got {count!r}")
    chosen = sorted(distances, key=lambda name: (distances[name], name))[:count]
    remove_blocks(model, chosen, example_input)
    return chosen
