"""Post-training quantization: ``prepare`` -> ``calibrate`` -> ``convert`` (and ``quantize_static`` for all three).

The flow of Jacob et al. 2018 / Krishnamoorthi 2018 ("Quantizing deep convolutional networks for efficient
inference", section 3.1), in eager mode over the module tree:

1. :func:`prepare` copies the model, folds BatchNorm into the layer before it
   (:func:`~nanoopt.quant.bn_fold.fold_batchnorm`), traces the data flow
   (:func:`~nanoopt.nn.graph.trace`), fuses each ReLU that alone reads a Linear / Conv2d / Add into it, and
   replaces the leaves by the simulated modules of :mod:`nanoopt.quant.simulate`: a quantizer on the model input,
   one on every layer output that starts a new grid (Linear, Conv2d, Add, float-kept layers), weight quantizers
   (observed and frozen at once), and pass-through layers (pools, unfused ReLU, Flatten) on their input's grid.
   Layers without an integer kernel stay in float with a warning naming them.
2. :func:`calibrate` runs float batches in eval mode (a progress bar), the activation observers record ranges,
   then every quantizer is frozen and set to round. From then on the prepared model in eval mode *is* the
   integer model, emulated exactly (see :mod:`nanoopt.quant.simulate`).
3. :func:`convert` builds the integer model (:mod:`nanoopt.quant.qmodules`) from the same integer parameters;
   its output equals the prepared model's eval output bit for bit.

Quantization-aware training reuses this: :func:`set_observers` / :func:`set_fake_quant` flip the switches of
every quantizer (training then runs the straight-through fake-quant path), and :func:`convert` is the same.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models, data
>>> no.manual_seed(0)
>>> images, labels = data.load_digits("test")
>>> model = models.tiny_mlp().eval()
>>> qmodel = quantize_static(model, [images[:100], images[100:200]], progress=False)
>>> prepared = calibrate(prepare(model, example_input=images[:1]), [images[:100], images[100:200]], progress=False)
>>> bool(np.array_equal(prepared(images).data, qmodel(images).data))    # simulation == integer model
True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from nanoopt import nn
from nanoopt.models_gpt import GPT
from nanoopt.nn.converted import require_float_model
from nanoopt.nn.graph import INPUT, Graph, trace
from nanoopt.nn.names import check_layer_names
from nanoopt.quant.bn_fold import fold_batchnorm
from nanoopt.quant.checks import check_calibration_batch, check_finite_array, check_finite_parameters
from nanoopt.quant.config import QuantConfig
from nanoopt.quant.fake_quant import FakeQuantize
from nanoopt.quant.qmodules import (
    FloatFallback,
    QuantizedAdd,
    QuantizedAvgPool2d,
    QuantizedConv2d,
    QuantizedFlatten,
    QuantizedLinear,
    QuantizedMaxPool2d,
    QuantizedModel,
    QuantizedReLU,
)
from nanoopt.quant.range_check import RangeMonitor
from nanoopt.quant.simulate import (
    SimulatedAdd,
    SimulatedAvgPool2d,
    SimulatedConv2d,
    SimulatedFloat,
    SimulatedLinear,
    SimulatedMaxPool2d,
    SimulatedReLU,
)
from nanoopt.quant.transformer import W8A8GPT, convert_w8a8, prepare_w8a8
from nanoopt.tensor import Tensor, no_grad

__all__ = [
    "PreparedModel",
    "calibrate",
    "convert",
    "iterate_batches",
    "prepare",
    "quantize_static",
    "quantizers",
    "set_fake_quant",
    "set_observers",
]

WEIGHTED = (nn.Linear, nn.Conv2d)
SAME_GRID = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ReLU)
TRANSPARENT = (nn.Identity, nn.Dropout, nn.Flatten)  # values unchanged (up to shape): no module needed


class PreparedModel(nn.Module):
    """A model with simulated quantization: ``input_quantizer`` then the transformed ``model``.

    ``graph`` is the traced data flow, ``output_quantizer`` the quantizer whose grid the output lies on.
    """

    converted_by = "quant.prepare"  # nanoopt.nn.converted.MARKER

    def __init__(self, model: nn.Module, input_quantizer: FakeQuantize, output_quantizer: FakeQuantize,
                 graph: Graph) -> None:
        super().__init__()
        self.model = model
        self.input_quantizer = input_quantizer
        self.output_quantizer_ref = [output_quantizer]  # a list: the module is owned inside `model`
        self.graph = graph

    @property
    def output_quantizer(self) -> FakeQuantize:
        return self.output_quantizer_ref[0]

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        expected = self.graph.input_shape
        if expected is not None and tuple(x.shape[1:]) != tuple(expected[1:]):
            raise ValueError(f"the model was prepared for inputs of shape (N, {', '.join(map(str, expected[1:]))}), "
                             f"got {x.shape}")
        return self.model(self.input_quantizer(x))


# ------------------------------------------------------------------------------------------------ switches
def quantizers(model: nn.Module, kind: str = "all") -> list[FakeQuantize]:
    """The FakeQuantize modules of a prepared model: ``"all"``, ``"weight"`` or ``"activation"`` ones."""
    if kind not in ("all", "weight", "activation"):
        raise ValueError(f"kind must be 'all', 'weight' or 'activation', got {kind!r}")
    weight_ids = {id(m.weight_quantizer) for m in model.modules() if hasattr(m, "weight_quantizer")}
    found = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    if kind == "weight":
        return [q for q in found if id(q) in weight_ids]
    if kind == "activation":
        return [q for q in found if id(q) not in weight_ids]
    return found


def set_observers(model: nn.Module, enabled: bool, kind: str = "all") -> None:
    """Switch observing on or off (off = frozen: the current qparams are taken from the observer and kept)."""
    for quantizer in quantizers(model, kind):
        if enabled:
            quantizer.observer_enabled = True
        else:
            quantizer.freeze()


def set_fake_quant(model: nn.Module, enabled: bool, kind: str = "all") -> None:
    """Switch rounding (fake quantization) on or off."""
    for quantizer in quantizers(model, kind):
        quantizer.fake_quant_enabled = enabled


# ------------------------------------------------------------------------------------------------ prepare
def _walk_back_transparent(graph: Graph, name: str) -> str:
    """From ``name`` back through Identity/Dropout nodes that nothing else reads."""
    while name in graph.nodes and isinstance(graph.nodes[name].module, nn.Identity | nn.Dropout):
        source = graph.nodes[name].inputs[0]
        if graph.sole_consumer(source) != name:
            break
        name = source
    return name


def _fused_relus(graph: Graph, float_layers: set[str]) -> dict[str, str]:
    """``{relu name: layer name}`` for each ReLU that is the only reader of a Linear/Conv2d/Add output."""
    fused = {}
    for node in graph.nodes.values():
        if not isinstance(node.module, nn.ReLU):
            continue
        producer = _walk_back_transparent(graph, node.inputs[0])
        if producer == INPUT or producer in float_layers:
            continue
        if not isinstance(graph.nodes[producer].module, WEIGHTED + (nn.Add,)):
            continue
        chain, current = [], node.name  # every node between the producer and the ReLU must have one reader
        while current != producer:
            chain.append(current)
            current = graph.nodes[current].inputs[0]
        if all(graph.sole_consumer(graph.nodes[step].inputs[0]) == step for step in chain):
            fused[node.name] = producer
    return fused


def _has_integer_kernel(module: nn.Module) -> bool:
    return isinstance(module, WEIGHTED + SAME_GRID + TRANSPARENT + (nn.Add,))


def prepare(model: nn.Module, config: QuantConfig | None = None, example_input: Any = None, *,
            fold_bn: bool = True) -> PreparedModel:
    """A copy of ``model`` with simulated quantization, ready for :func:`calibrate` (see the module docstring).

    ``example_input`` (one batch, or a single example with its batch axis) is needed to trace models that are
    not plain Sequentials, and lets later calls check the input shape. The original model is not modified.
    A GPT (``models.gpt``) is prepared for W8A8 by :func:`nanoopt.quant.transformer.prepare_w8a8` (``config``: a
    ``W8A8Config`` or None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, GPT):
        return prepare_w8a8(model, config)
    if isinstance(model, PreparedModel | QuantizedModel):
        raise TypeError(f"prepare expects a float model, got a {type(model).__name__}")
    require_float_model(model, "quant.prepare")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if example_input is not None and not isinstance(example_input, Tensor):
        example_input = np.asarray(example_input, dtype=np.float32)
    _check_float_model(model, example_input, "quant.prepare")
    work = fold_batchnorm(model, example_input) if fold_bn else copy.deepcopy(model)
    work.eval()
    graph = trace(work, example_input)
    _check_config_names(config, graph)
    float_layers = {name for name, node in graph.nodes.items()
                    if config.keeps_float(name, node.module)
                    or not _has_integer_kernel(node.module)
                    or _unequal_adaptive_bins(node, graph)}
    for name in sorted(float_layers - {n for n, node in graph.nodes.items() if config.keeps_float(n, node.module)}):
        warnings.warn(f"quant.prepare: layer {name!r} ({type(graph.nodes[name].module).__name__}) has no integer "
                      "kernel; it is kept in float (its input is dequantized, its output quantized again)",
                      UserWarning, stacklevel=2)
    fused = _fused_relus(graph, float_layers)
    fused_into = set(fused.values())

    input_config = config.for_layer(INPUT)
    input_quantizer = FakeQuantize(input_config.make_activation_observer(), owner="the model input")
    grid: dict[str, FakeQuantize] = {INPUT: input_quantizer}
    replacements: dict[str, nn.Module] = {}
    for name, node in graph.nodes.items():
        module, sources = node.module, [grid[source] for source in node.inputs]
        layer_config = config.for_layer(name, module)
        if name in float_layers:
            output = FakeQuantize(layer_config.make_activation_observer(), owner=f"layer {name!r} output")
            replacements[name] = SimulatedFloat(module, output, name, sources)
            grid[name] = output
        elif isinstance(module, WEIGHTED):
            channels = module.weight.shape[0]
            weight_quantizer = FakeQuantize(layer_config.make_weight_observer(), channels, f"layer {name!r} weight")
            weight_quantizer.observe(module.weight.data)
            weight_quantizer.freeze()
            output = FakeQuantize(layer_config.make_activation_observer(), owner=f"layer {name!r} output")
            simulated = SimulatedLinear if isinstance(module, nn.Linear) else SimulatedConv2d
            replacements[name] = simulated(module, weight_quantizer, output, name in fused_into, name, sources)
            grid[name] = output
        elif isinstance(module, nn.Add):
            _check_add_grids(name, sources, layer_config.activation)
            output = FakeQuantize(layer_config.make_activation_observer(), owner=f"layer {name!r} output")
            replacements[name] = SimulatedAdd(output, name in fused_into, name, sources)
            grid[name] = output
        elif isinstance(module, nn.ReLU) and name in fused:
            replacements[name] = nn.Identity()
            grid[name] = grid[fused[name]]
        else:  # the same grid as the input
            grid[name] = sources[0]
            if isinstance(module, nn.MaxPool2d):
                replacements[name] = SimulatedMaxPool2d(module, name, sources)
            elif isinstance(module, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
                replacements[name] = SimulatedAvgPool2d(module, name, sources)
            elif isinstance(module, nn.ReLU):
                replacements[name] = SimulatedReLU(name, sources)
    for name, replacement in replacements.items():
        if name == "":
            work = replacement
        else:
            work.set_submodule(name, replacement)
    prepared = PreparedModel(work, input_quantizer, grid[graph.output], graph)
    set_observers(prepared, True, "activation")
    set_fake_quant(prepared, False)
    return prepared.eval()


def _check_float_model(model: nn.Module, example_input: Any, where: str) -> None:
    """Finite weights and buffers, and a finite ``example_input`` (quant/checks.py words the errors)."""
    check_finite_parameters(model, where)
    if example_input is not None:
        check_finite_array(np.asarray(example_input.data if isinstance(example_input, Tensor) else example_input),
                           f"{where}: example_input")


def _check_config_names(config: QuantConfig, graph: Graph) -> None:
    """Every layer name in ``config.overrides`` / ``config.keep_float`` is a layer of the traced model."""
    check_layer_names([key for key in config.overrides if isinstance(key, str)], [*graph.nodes, INPUT],
                      "QuantConfig.overrides")
    check_layer_names([item for item in config.keep_float if isinstance(item, str)], list(graph.nodes),
                      "QuantConfig.keep_float")


def _unequal_adaptive_bins(node, graph: Graph) -> bool:
    """An adaptive average pool whose traced input does not split into equal bins (no integer kernel)."""
    if not isinstance(node.module, nn.AdaptiveAvgPool2d) or node.inputs[0] not in graph.nodes:
        return False
    shape = graph.nodes[node.inputs[0]].output_shape
    if shape is None or len(shape) != 4:
        return False
    return any(size % out for size, out in zip(shape[2:], node.module.output_size, strict=True))


def _check_add_grids(name: str, sources: list[FakeQuantize], activation) -> None:
    dtypes = {source.spec.dtype for source in sources} | {activation.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"quant.prepare: the add {name!r} mixes integer types {sorted(str(d) for d in dtypes)}; "
                         "give both of its producers and the add the same activation bits")


# ------------------------------------------------------------------------------------------------ calibrate
def iterate_batches(batches: Any, batch_size: int = 256) -> Iterator[np.ndarray]:
    """Float input batches from an array (split into ``batch_size`` rows), a Tensor, ``(x, y)`` pairs, a
    DataLoader, or any iterable of these.

    >>> [b.shape for b in iterate_batches(np.zeros((5, 2), np.float32), batch_size=2)]
    [(2, 2), (2, 2), (1, 2)]
    """
    if isinstance(batches, Tensor):
        batches = batches.data
    if isinstance(batches, np.ndarray):
        for start in range(0, len(batches), batch_size):
            yield batches[start:start + batch_size]
        return
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], np.ndarray):
        yield from iterate_batches(batches[0], batch_size)
        return
    if not isinstance(batches, Iterable):
        raise TypeError(f"calibration data must be an array or an iterable of batches, got {type(batches).__name__}")
    for batch in batches:
        if isinstance(batch, tuple | list) and len(batch) == 2:
            batch = batch[0]
        yield batch.data if isinstance(batch, Tensor) else np.asarray(batch)


def calibrate(prepared: PreparedModel, batches: Any, progress: bool = True, max_batches: int | None = None,
              freeze: bool = True) -> PreparedModel:
    """Run float ``batches`` through ``prepared`` (eval mode, no graph) to record activation ranges; then (with
    ``freeze``) fix every quantizer and switch rounding on. Returns ``prepared``.

    A batch of the wrong shape raises ``ValueError`` naming it; calibrating with no batch raises too. Degenerate
    ranges (a zero range, one value dominating by orders of magnitude, an output on one code) give a
    ``UserWarning`` naming each layer and its observed range (:mod:`nanoopt.quant.range_check`).
    """
    if isinstance(prepared, W8A8GPT):  # a prepared GPT: windows of token ids
        return prepared.calibrate(batches if isinstance(batches, np.ndarray) else list(batches))
    if not isinstance(prepared, PreparedModel):
        raise TypeError(f"calibrate expects the result of quant.prepare, got {type(prepared).__name__}")
    set_fake_quant(prepared, False)
    set_observers(prepared, True, "activation")
    prepared.eval()
    seen = 0
    expected = prepared.graph.input_shape
    with no_grad(), RangeMonitor([prepared.input_quantizer, *quantizers(prepared, "activation")]) as monitor:
        for index, batch in enumerate(tqdm(iterate_batches(batches), desc="calibrate", disable=not progress,
                                           leave=False)):
            if max_batches is not None and index >= max_batches:
                break
            batch = check_calibration_batch(batch, index, "calibrate")
            if expected is not None and batch.shape[1:] != tuple(expected[1:]):
                raise ValueError(f"calibration batch {index} has shape {batch.shape}, but the model was prepared for "
                                 f"inputs (N, {', '.join(map(str, expected[1:]))})")
            prepared(Tensor(batch))
            seen += 1
    if seen == 0:
        raise ValueError("calibrate: no calibration batches were given (batches is empty); expected at least one "
                         "batch of float inputs")
    if freeze:
        set_observers(prepared, False)
        set_fake_quant(prepared, True)
    monitor.warn("quant.calibrate")
    return prepared


# ------------------------------------------------------------------------------------------------ convert
def _converted(module: nn.Module, name: str) -> nn.Module | None:
    """The integer counterpart of one module of a prepared model (None: keep it as it is)."""
    if isinstance(module, SimulatedLinear):
        return QuantizedLinear(module.integer_layer(), name, weight_spec=module.weight_quantizer.spec)
    if isinstance(module, SimulatedConv2d):
        return QuantizedConv2d(module.integer_layer(), module.stride, module.padding, module.dilation, module.groups,
                               name, weight_spec=module.weight_quantizer.spec)
    if isinstance(module, SimulatedAdd):
        return QuantizedAdd(module.source_qparams(0), module.source_qparams(1), module.output_quantizer.qparams(),
                            module.relu, name)
    if isinstance(module, SimulatedMaxPool2d):
        return QuantizedMaxPool2d(module.kernel_size, module.stride, module.padding, module.sources[0].spec, name)
    if isinstance(module, SimulatedAvgPool2d):
        if module.adaptive_size is not None:
            return QuantizedAvgPool2d(module.source_qparams(), output_size=module.adaptive_size, name=name)
        return QuantizedAvgPool2d(module.source_qparams(), module.kernel_size, module.stride, module.padding, name=name)
    if isinstance(module, SimulatedReLU):
        return QuantizedReLU(module.source_qparams(), name)
    if isinstance(module, SimulatedFloat):
        inputs = [source.qparams() for source in module.sources]
        return FloatFallback(module.float_module, inputs, module.output_quantizer.qparams(), name)
    if isinstance(module, nn.Identity | nn.Dropout):
        return nn.Identity()
    return None


def convert(prepared: PreparedModel) -> QuantizedModel:
    """The integer model of a calibrated prepared model (the prepared model is not modified).

    It equals ``prepared.eval()`` bit for bit once every quantizer is frozen and rounding (what
    :func:`calibrate` leaves, and :class:`~nanoopt.quant.qat.QATSchedule` or ``set_observers(prepared, False)``
    do for QAT). Quantizers still observing (they observe whenever enabled, eval mode too, as in PyTorch) or with
    rounding off are converted with their current grid, with a ``UserWarning`` naming them.
    """
    if isinstance(prepared, W8A8GPT):
        return convert_w8a8(prepared)
    if not isinstance(prepared, PreparedModel):
        raise TypeError(f"convert expects a model returned by quant.prepare (and calibrated), got "
                        f"{type(prepared).__name__}")
    check_finite_parameters(prepared, "quant.convert")
    graph = prepared.graph
    tree = copy.deepcopy(prepared.model)  # the copy shares nothing with `prepared`
    copied = dict(tree.named_modules())
    for name in graph.nodes:
        original = copied[name]
        module = graph.nodes[name].module
        if isinstance(module, nn.Flatten):
            source = _grid_of(prepared, graph, name)
            replacement: nn.Module | None = QuantizedFlatten(module.start_dim, source.spec, name)
        else:
            replacement = _converted(original, name)
        if replacement is None:
            continue
        if name == "":
            tree = replacement
        else:
            tree.set_submodule(name, replacement)
    converted = QuantizedModel(tree, prepared.input_quantizer.qparams(), prepared.output_quantizer.qparams(),
                               graph.input_shape)
    _warn_live_quantizers(prepared)  # after the conversion: an uncalibrated model raises first
    return converted


def _warn_live_quantizers(prepared: PreparedModel) -> None:
    """Warn when ``convert`` cannot equal ``prepared.eval()``: some quantizers observe or do not round."""
    live = [q.owner or type(q).__name__ for q in quantizers(prepared) if not q.frozen]
    off = [q.owner or type(q).__name__ for q in quantizers(prepared) if not q.fake_quant_enabled]
    problems = []
    if live:
        problems.append(f"{len(live)} quantizers are still observing ({', '.join(live[:4])}"
                        f"{', ...' if len(live) > 4 else ''}): they change their ranges whenever the prepared model "
                        "runs, eval mode included")
    if off:
        problems.append(f"{len(off)} quantizers have fake quantization off ({', '.join(off[:4])}"
                        f"{', ...' if len(off) > 4 else ''}): the prepared model runs them in float")
    if problems:
        warnings.warn(f"quant.convert: {'; '.join(problems)}. The integer model takes their current grids, so it "
                      "will not equal prepared.eval(); freeze first: quant.set_observers(prepared, False) and "
                      "quant.set_fake_quant(prepared, True) (QAT: QATSchedule(freeze_observers_after=...))",
                      UserWarning, stacklevel=3)


def _grid_of(prepared: PreparedModel, graph: Graph, name: str) -> FakeQuantize:
    """The quantizer whose grid the output of node ``name`` lies on."""
    modules = dict(prepared.model.named_modules())
    while True:
        if name == INPUT:
            return prepared.input_quantizer
        module = modules[name]
        if hasattr(module, "output_quantizer"):
            return module.output_quantizer
        if hasattr(module, "sources") and module.sources:
            return module.sources[0]
        name = graph.nodes[name].inputs[0]


def quantize_static(model: nn.Module, batches: Any, config: QuantConfig | None = None, example_input: Any = None,
                    progress: bool = True) -> QuantizedModel:
    """``convert(calibrate(prepare(model, config), batches))``; the first batch serves as example input."""
    batch_list = list(iterate_batches(batches))
    if not batch_list:
        raise ValueError(f"quantize_static: no calibration batches were given (batches is an empty "
                         f"{type(batches).__name__}); expected at least one batch of float inputs")
    batch_list = [check_calibration_batch(batch, index, "quantize_static") for index, batch in enumerate(batch_list)]
    example = batch_list[0][:1] if example_input is None else example_input
    prepared = prepare(model, config, example)
    return convert(calibrate(prepared, batch_list, progress=progress))
