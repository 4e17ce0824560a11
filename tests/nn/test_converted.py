"""Converted modules carry the class-level marker ``converted_by`` (nanoopt.nn.converted): every module class the
techniques define to replace float layers has it, no float layer has it, and the float transforms refuse models
that hold the converted layers the old registry of module names missed (quantizers, W8A8 layers, AWQ's wrapper).
"""

import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import nanoopt as no
from nanoopt import models, nn, prune, quant
from nanoopt.nn.converted import MARKER, converted_by, converted_layers, require_float_model
from nanoopt.quant.algorithms.awq import InputScaled
from nanoopt.quant.fake_quant import FakeQuantize, LSQQuantizer, PACTQuantizer, WeightFakeQuantize
from nanoopt.quant.observers import MinMaxObserver
from nanoopt.quant.transformer import W8A8GPT, QuantizedW8A8Linear, SimulatedW8A8Linear


def _module_classes(package: str) -> list[type]:
    """The nn.Module subclasses defined in ``package`` and its submodules."""
    root = importlib.import_module(package)
    names = [package]
    if hasattr(root, "__path__"):
        names += [info.name for info in pkgutil.walk_packages(root.__path__, package + ".")]
    found = []
    for name in names:
        module = importlib.import_module(name)
        found += [value for value in vars(module).values() if inspect.isclass(value)
                  and issubclass(value, nn.Module) and value.__module__ == name]
    return found


def test_every_module_class_of_quant_and_sparse_pruning_is_marked():
    classes = _module_classes("nanoopt.quant") + _module_classes("nanoopt.prune.sparse")
    assert len(classes) > 30   # the walk found the layers (QuantizedLinear, SimulatedConv2d, FakeQuantize ...)
    unmarked = [f"{c.__module__}.{c.__qualname__}" for c in classes if getattr(c, MARKER, None) is None]
    assert not unmarked, f"converted module classes without {MARKER}: {unmarked}"


@pytest.mark.parametrize("package", ["nanoopt.nn", "nanoopt.models", "nanoopt.models_gpt", "nanoopt.distill",
                                     "nanoopt.interop.onnx_modules"])
def test_float_module_classes_are_not_marked(package):
    marked = [c.__qualname__ for c in _module_classes(package) if getattr(c, MARKER, None) is not None]
    assert not marked


@pytest.mark.parametrize("cls, made_by", [
    (FakeQuantize, "quant.prepare / prepare_qat"), (WeightFakeQuantize, "quant.prepare / prepare_qat"),
    (LSQQuantizer, "quant.prepare / prepare_qat"), (PACTQuantizer, "quant.prepare / prepare_qat"),
    (SimulatedW8A8Linear, "quant.prepare_w8a8"), (QuantizedW8A8Linear, "quant.convert_w8a8"),
    (W8A8GPT, "quant.prepare_w8a8 / convert_w8a8"), (InputScaled, "quant.awq"),
    (quant.QuantizedLinear, "quant.convert"), (prune.SparseLinear, "prune.to_sparse"),
])
def test_the_classes_the_registry_missed_say_what_made_them(cls, made_by):
    assert getattr(cls, MARKER) == made_by


def test_float_transforms_refuse_a_model_holding_a_quantizer():
    model = nn.Sequential(nn.Linear(4, 3), FakeQuantize(MinMaxObserver()))
    assert converted_layers(model) == [("1", "FakeQuantize", "quant.prepare / prepare_qat")]
    with pytest.raises(TypeError, match=r"prune.shrink: the model is already converted \(layer '1' is a "
                                        r"FakeQuantize made by quant.prepare / prepare_qat\)"):
        prune.shrink(model, np.ones((1, 4), np.float32))


def test_float_transforms_refuse_awq_and_w8a8_models():
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    awq_model = quant.awq(models.mlp(16, (8,)), [x], bits=4, group_size=8)
    assert isinstance(awq_model[1], InputScaled)
    assert converted_by(awq_model[1]) == "quant.awq"
    with pytest.raises(TypeError, match=r"quantize_dynamic: the model is already converted \(layer '1' is a "
                                        r"InputScaled made by quant.awq, and 2 more converted modules\)"):
        quant.quantize_dynamic(awq_model)

    no.manual_seed(0)
    gpt = models.gpt(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    ids = np.random.default_rng(0).integers(0, 11, size=(4, 8))
    prepared = quant.prepare_w8a8(gpt).calibrate(ids)
    for model, kind, made_by in ((prepared, "SimulatedW8A8Linear", "quant.prepare_w8a8"),
                                 (quant.convert_w8a8(prepared), "QuantizedW8A8Linear", "quant.convert_w8a8")):
        assert ("blocks.0.c_attn", kind, made_by) in converted_layers(model)
        with pytest.raises(TypeError, match=r"prune.shrink: the model is already converted \(layer 'blocks.0' is a "
                                            r"W8A8Block made by quant.prepare_w8a8 / convert_w8a8, and \d+ more"):
            prune.shrink(model, ids)


def test_allow_accepts_instances_of_the_given_classes():
    model = nn.Sequential(nn.Linear(4, 3), FakeQuantize(MinMaxObserver()))
    require_float_model(model, "test", allow=(FakeQuantize,))
    with pytest.raises(TypeError, match="FakeQuantize"):
        require_float_model(model, "test", allow=(InputScaled,))
