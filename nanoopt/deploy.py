"""From a model (Module tree) to a runtime plan description: the one place that knows both sides.

:func:`to_plan` reads a converted integer model (:class:`~nanoopt.quant.qmodules.QuantizedModel`) or a float model
in eval mode and writes a :class:`nanoopt.runtime.PlanDescription` -- plain ops, attributes and arrays -- that
:mod:`nanoopt.runtime` executes (and saves, and loads) without this module, the autograd or the layers.

* The data flow comes from running one example input with hooks on the leaf modules (for the integer model, on
  codes; for a float model, :func:`nanoopt.nn.graph.trace`); a chain of layers in nested ``Sequential``\\ s
  needs no example input, nor does an integer model (it records its input shape at conversion).
* Integer layers are copied as they are (the converted weights, biases, multipliers and grids), so the plan is
  bit-identical to the model; a max pool with non-overlapping windows that is the only reader of a conv's output
  is fused into the conv (the maximum of the codes it writes). A layer that runs in float inside the integer
  model (``FloatFallback``) is refused. Identities (ReLUs fused at conversion, Dropout in eval mode) become no
  step: their consumers read their input.
* Float layers: a BatchNorm in eval mode right after a Linear/Conv2d whose only consumer it is is folded into its
  weights (``w' = w gamma / sqrt(var + eps)``, ``b' = (b - mean) gamma / sqrt(var + eps) + beta``), otherwise it
  is a per-channel affine step; a ReLU that is the only consumer of a Linear/Conv2d/sparse layer or an Add is
  fused into it, and so is a max pool with non-overlapping windows that is the only consumer of a Conv2d (or of
  its ReLU), written as the convolution's output plane is; pruned weights are exported as their effective value
  ``weight_orig * weight_mask``, and :class:`~nanoopt.prune.sparse.SparseLinear` layers keep their CSR / N:M form.

>>> import numpy as np
>>> from nanoopt import models, quant
>>> x = np.random.default_rng(0).uniform(size=(16, 1, 8, 8)).astype(np.float32)
>>> qmodel = quant.quantize_static(models.tiny_mlp(), x, progress=False)
>>> [step.op for step in to_plan(qmodel).steps]
['flatten', 'linear_q', 'linear_q']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.kernels.sparse import CSRMatrix
from nanoopt.nn.graph import INPUT, hooks, trace
from nanoopt.prune.masks import get_mask, get_parameter
from nanoopt.prune.sparse import SparseLinear
from nanoopt.quant import qmodules as Q
from nanoopt.runtime.description import Grid, PlanDescription, Step, spec_to_json
from nanoopt.tensor import Tensor

__all__ = ["to_plan"]


def to_plan(model: nn.Module, example_input: Any = None) -> PlanDescription:
    """The plan description of a converted integer model or a float model in eval mode (see the module docstring).

    ``example_input``: one float batch (ndarray or Tensor) to trace the data flow with; optional for integer models
    and for chains of layers.
    """
    if isinstance(model, Q.QuantizedModel):
        return _integer_plan(model, example_input)
    if isinstance(model, Q.QuantizedModule):
        raise TypeError("to_plan takes the whole converted model (QuantizedModel, from quant.convert), not one of "
                        f"its layers ({type(model).__name__})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_plan takes a nanoopt Module, got {type(model).__name__}")
    return _float_plan(model, example_input)


# ============================================================================================ integer models
def _trace_codes(model: Q.QuantizedModel, codes: np.ndarray) -> tuple[list[tuple[str, nn.Module, list[str]]], str]:
    """Leaf calls of the integer tree on ``codes``: ``[(name, module, producer names)]`` and the output's producer."""
    leaves = [(name, module) for name, module in model.model.named_modules()
              if isinstance(module, Q.QuantizedModule | nn.Identity) or not list(module.children())]
    producer = {id(codes): INPUT}
    alive: list[Any] = [codes]
    calls: list[tuple[str, nn.Module, list[str]]] = []
    seen: set[str] = set()

    def before(name, module, inputs):
        if name in seen:
            raise ValueError(f"to_plan: layer {name!r} is called more than once; give each call its own module")
        seen.add(name)
        sources = []
        for position, value in enumerate(inputs):
            if id(value) not in producer:
                raise ValueError(f"to_plan: input {position} of layer {name!r} ({type(module).__name__}) was not "
                                 "made by a layer of the model (an operation outside any module?)")
            sources.append(producer[id(value)])
        calls.append((name, module, sources))

    def after(name, module, inputs, output):
        producer[id(output)] = name
        alive.append(output)

    with hooks(dict(leaves), before=before, after=after):
        output = model.forward_int(codes)
    if id(output) not in producer:
        raise ValueError("to_plan: the model output was not made by a layer of the model")
    return calls, producer[id(output)]


def _integer_step(name: str, module: nn.Module, inputs: tuple[int, ...]) -> Step:
    if isinstance(module, Q.QuantizedLinear | Q.QuantizedConv2d):
        layer = module.integer_layer()
        arrays = {"weight": np.ascontiguousarray(layer.weight), "m0": layer.m0.astype(np.int32),
                  "shift": layer.shift.astype(np.int32)}
        if layer.bias is not None:
            arrays["bias"] = layer.bias
        attrs: dict[str, Any] = {"x_zero_point": layer.input.zero, "out_zero_point": layer.output.zero,
                                 "out_spec": spec_to_json(layer.output.spec), "relu": bool(layer.relu),
                                 "x_dtype": layer.input.spec.dtype.name}
        if isinstance(module, Q.QuantizedLinear):
            return Step("linear_q", inputs, attrs, arrays, name)
        attrs.update(stride=list(module.stride), padding=list(module.padding), dilation=list(module.dilation),
                     groups=int(module.groups))
        return Step("conv2d_q", inputs, attrs, arrays, name)
    if isinstance(module, Q.QuantizedAdd):
        attrs = {"out_spec": spec_to_json(module.output_spec), "relu": bool(module.relu)}
        for prefix, key in (("first", "a"), ("second", "b"), ("output", "out")):
            attrs[f"{key}_scale"] = float(np.float32(getattr(module, f"{prefix}_scale")))
            attrs[f"{key}_zero_point"] = int(getattr(module, f"{prefix}_zero_point"))
        return Step("add_q", inputs, attrs, {}, name)
    if isinstance(module, Q.QuantizedMaxPool2d):
        return Step("max_pool", inputs, {"kernel": list(module.kernel_size), "stride": list(module.stride),
                                         "padding": list(module.padding)}, {}, name)
    if isinstance(module, Q.QuantizedAvgPool2d):
        attrs = {"zero_point": int(module.input_zero_point)}
        if module.output_size is not None:
            attrs["output_size"] = list(module.output_size)
        else:
            attrs.update(kernel=list(module.kernel_size), stride=list(module.stride), padding=list(module.padding))
        return Step("avg_pool_q", inputs, attrs, {}, name)
    if isinstance(module, Q.QuantizedReLU):
        return Step("relu_q", inputs, {"zero_point": int(module.input_zero_point)}, {}, name)
    if isinstance(module, Q.QuantizedFlatten):
        return Step("flatten", inputs, {"start_dim": int(module.start_dim)}, {}, name)
    if isinstance(module, Q.FloatFallback):
        raise ValueError(f"to_plan: layer {name!r} runs in float inside the integer model (FloatFallback of "
                         f"{type(module.float_module).__name__}); the runtime runs integer layers only")
    raise ValueError(f"to_plan: layer {name!r} ({type(module).__name__}) has no runtime operation")


def _fusable_pool(name: str, calls: list[tuple[str, nn.Module, list[str]]], output: str) -> tuple | None:
    """``(pool name, pool module)`` when the only reader of layer ``name``'s output (not the model's output), after
    identities, is a max pool with non-overlapping windows and no padding, whose input can then be pooled as it is
    written."""
    while True:  # through the identities (a ReLU fused at conversion) that only pass the output on
        if name == output:
            return None
        readers = [(reader, module) for reader, module, sources in calls if name in sources]
        if len(readers) != 1 or not isinstance(readers[0][1], nn.Identity):
            break
        name = readers[0][0]
    if len(readers) != 1 or not isinstance(readers[0][1], Q.QuantizedMaxPool2d):
        return None
    pool = readers[0][1]
    if tuple(pool.stride) != tuple(pool.kernel_size) or tuple(pool.padding) != (0, 0):
        return None
    return readers[0]


def _integer_plan(model: Q.QuantizedModel, example_input: Any) -> PlanDescription:
    if example_input is not None:
        codes = model.quantize_input(example_input)
    elif model.input_shape is not None:
        codes = np.full((1, *model.input_shape[1:]), int(model.input_zero_point), model.input_spec.dtype)
    else:
        raise ValueError("to_plan: this integer model did not record its input shape; pass example_input=")
    calls, output = _trace_codes(model, codes)
    value = {INPUT: 0}
    steps = []
    fused: set[str] = set()
    for name, module, sources in calls:
        if name in fused:
            continue
        if isinstance(module, nn.Identity):  # a ReLU fused away, a Dropout: the value passes through
            value[name] = value[sources[0]]
            continue
        steps.append(_integer_step(name, module, tuple(value[source] for source in sources)))
        value[name] = len(steps)
        pool = _fusable_pool(name, calls, output) if isinstance(module, Q.QuantizedConv2d) else None
        if pool is not None:  # written as the conv's output plane is (max of codes: the same codes)
            steps[-1].attrs["pool"] = list(pool[1].kernel_size)
            fused.add(pool[0])
            value[pool[0]] = len(steps)
    grids = [Grid(float(np.float32(getattr(model, f"{p}_scale"))), int(getattr(model, f"{p}_zero_point")),
                  getattr(model, f"{p}_spec")) for p in ("input", "output")]
    shape = None if model.input_shape is None else tuple(int(d) for d in model.input_shape[1:])
    if shape is None:
        shape = tuple(codes.shape[1:])
    return PlanDescription("int", shape, grids[0], grids[1], steps, value[output])


# ============================================================================================== float models
def _effective(module: nn.Module, name: str) -> np.ndarray | None:
    if name == "bias" and module._parameters.get("bias") is None and not hasattr(module, "bias_orig"):
        return None
    return np.ascontiguousarray(get_parameter(module, name).data * get_mask(module, name), dtype=np.float32)


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of a BatchNorm in eval mode, in float64."""
    if bn.running_mean is None:
        raise ValueError("to_plan: a BatchNorm without running statistics normalises with batch statistics even in "
                         "eval mode; the runtime needs running statistics (track_running_stats=True)")
    gamma = np.ones(bn.num_features) if bn.weight is None else bn.weight.data.astype(np.float64)
    beta = np.zeros(bn.num_features) if bn.bias is None else bn.bias.data.astype(np.float64)
    scale = gamma / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    return scale, beta - bn.running_mean.astype(np.float64) * scale


def _float_plan(model: nn.Module, example_input: Any) -> PlanDescription:
    training = [name or "(root)" for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"to_plan: the float model must be in eval mode (call model.eval()); in training mode: "
                         f"{training[:3]}")
    if example_input is not None:
        example = example_input.data if isinstance(example_input, Tensor) else np.asarray(example_input, np.float32)
        graph = trace(model, example)
        input_shape = tuple(int(d) for d in example.shape[1:])
    else:
        graph = trace(model)
        input_shape = None
    nodes = graph.nodes
    value: dict[str, int] = {INPUT: 0}
    steps: list[Step] = []
    fused: set[str] = set()

    def sole_consumer(name: str, kinds: tuple) -> str | None:
        consumer = graph.sole_consumer(name)
        if consumer is not None and isinstance(nodes[consumer].module, kinds):
            return consumer
        return None

    for name, node in nodes.items():
        if name in fused:
            continue
        module = node.module
        inputs = tuple(value[source] for source in node.inputs)
        last = name  # the node whose output this step's value stands for
        if isinstance(module, nn.Linear | nn.Conv2d | SparseLinear):
            if isinstance(module, SparseLinear):
                step = _sparse_step(name, module, inputs)
            else:
                weight, bias = _effective(module, "weight"), _effective(module, "bias")
                bn = sole_consumer(name, (nn.BatchNorm1d, nn.BatchNorm2d))
                if bn is not None and not isinstance(module, SparseLinear):
                    scale, shift = _bn_affine(nodes[bn].module)
                    shape = (-1,) + (1,) * (weight.ndim - 1)
                    weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(np.float32)
                    bias = ((np.zeros(len(scale)) if bias is None else bias.astype(np.float64)) * scale
                            + shift).astype(np.float32)
                    fused.add(bn)
                    last = bn
                arrays = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
                if isinstance(module, nn.Linear):
                    step = Step("linear", inputs, {}, arrays, name)
                else:
                    step = Step("conv2d", inputs, {"stride": list(module.stride), "padding": list(module.padding),
                                                   "dilation": list(module.dilation), "groups": int(module.groups)},
                                arrays, name)
            relu = sole_consumer(last, (nn.ReLU,))
            if relu is not None:
                step.attrs["relu"] = True
                fused.add(relu)
                last = relu
            pool = sole_consumer(last, (nn.MaxPool2d,)) if isinstance(module, nn.Conv2d) else None
            if pool is not None and not isinstance(nodes[pool].module, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
                pool_module = nodes[pool].module
                if pool_module.stride == pool_module.kernel_size and pool_module.padding == (0, 0):
                    step.attrs["pool"] = list(pool_module.kernel_size)
                    fused.add(pool)
                    last = pool
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            scale, shift = _bn_affine(module)
            step = Step("affine", inputs, {}, {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)},
                        name)
        elif isinstance(module, nn.ReLU):
            step = Step("relu", inputs, {}, {}, name)
        elif isinstance(module, nn.AvgPool2d):
            step = Step("avg_pool", inputs, {"kernel": list(module.kernel_size), "stride": list(module.stride),
                                             "padding": list(module.padding)}, {}, name)
        elif isinstance(module, nn.MaxPool2d):
            step = Step("max_pool", inputs, {"kernel": list(module.kernel_size), "stride": list(module.stride),
                                             "padding": list(module.padding)}, {}, name)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            step = Step("avg_pool", inputs, {"output_size": list(module.output_size)}, {}, name)
        elif isinstance(module, nn.Flatten):
            step = Step("flatten", inputs, {"start_dim": int(module.start_dim)}, {}, name)
        elif isinstance(module, nn.Identity | nn.Dropout):  # eval mode: the value passes through, no step
            value[name] = inputs[0]
            continue
        elif isinstance(module, nn.Add):
            step = Step("add", inputs, {}, {}, name)
            relu = sole_consumer(name, (nn.ReLU,))
            if relu is not None:  # the residual block's final ReLU
                step.attrs["relu"] = True
                fused.add(relu)
                last = relu
        else:
            raise ValueError(f"to_plan: layer {name!r} ({type(module).__name__}) has no runtime operation (supported: "
                             "Linear, Conv2d, BatchNorm, ReLU, pools, Flatten, Add, Dropout, Identity, SparseLinear)")
        steps.append(step)
        value[name] = len(steps)
        if last != name:
            value[last] = len(steps)
    return PlanDescription("float", input_shape, None, None, steps, value[graph.output])


def _sparse_step(name: str, module: SparseLinear, inputs: tuple[int, ...]) -> Step:
    arrays: dict[str, np.ndarray] = {} if module.bias is None else {"bias": np.asarray(module.bias, np.float32)}
    matrix = module.sparse_weight
    shape = [int(d) for d in matrix.shape]
    if isinstance(matrix, CSRMatrix):
        arrays.update(data=matrix.data, indices=matrix.indices, indptr=matrix.indptr)
        return Step("csr_linear", inputs, {"shape": shape}, arrays, name)
    arrays.update(values=matrix.values, offsets=matrix.offsets)
    return Step("nm_linear", inputs, {"shape": shape, "n": int(matrix.n), "m": int(matrix.m)}, arrays, name)
