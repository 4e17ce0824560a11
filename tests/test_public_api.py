"""The exported names (``__all__``) of nanoopt, nanoopt.quant and nanoopt.prune are the user's vocabulary
(DESIGN.md's public API): each exists, none is an internal (integer lowering records, formatting helpers,
submodules), and PyTorch's pruning signatures hold where we claim them."""

import inspect
import types
import warnings

import numpy as np
import pytest

import nanoopt as no
from nanoopt import models, nn, prune, quant
from nanoopt.nn import functional as F

INTERNALS = {"QParams", "IntegerLayer", "integer_layer", "quantizers", "trace", "format_sparsity",
             "format_sensitivity", "pack_int4", "unpack_int4"}
TOP_LEVEL_SUBPACKAGES = {"data", "distill", "io", "models", "nn", "onnx", "optim", "prune", "quant", "runtime"}


@pytest.mark.parametrize("package", [no, quant, prune], ids=["nanoopt", "quant", "prune"])
def test_all_names_exist_and_are_vocabulary(package):
    assert len(package.__all__) == len(set(package.__all__)), "a name is exported twice"
    for name in package.__all__:
        value = getattr(package, name)
        assert name not in INTERNALS, name
        if isinstance(value, types.ModuleType):   # only the top level exports (user-facing) subpackages
            assert package is no and name in TOP_LEVEL_SUBPACKAGES, f"{package.__name__} exports module {name}"


def test_design_vocabulary_is_exported():
    for name in ("QuantSpec", "qparams", "quantize", "dequantize", "fake_quantize", "quantize_multiplier",
                 "requantize", "MinMaxObserver", "quantize_static", "prepare", "convert", "prepare_qat",
                 "quantize_dynamic", "quantize_weights", "gptq", "awq", "smooth_quant"):
        assert name in quant.__all__, name
    for name in ("l1_unstructured", "random_unstructured", "ln_structured", "global_unstructured", "nm_sparsity",
                 "remove", "shrink", "sparsegpt", "wanda", "L1Unstructured", "RandomUnstructured"):
        assert name in prune.__all__, name
    for name in ("Tensor", "no_grad", "manual_seed", "nn", "optim", "quant", "prune", "distill", "data", "models",
                 "runtime", "io", "onnx"):
        assert name in no.__all__, name


def test_structured_pruning_requires_dim_as_pytorch():
    assert inspect.signature(prune.ln_structured).parameters["dim"].default is inspect.Parameter.empty
    assert inspect.signature(prune.random_structured).parameters["dim"].default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        prune.ln_structured(nn.Linear(3, 2), "weight", 0.5, n=2)  # type: ignore[call-arg]


def test_public_signatures_spell_dim_not_axis():
    for function in (prune.ln_structured, prune.random_structured, prune.nm_sparsity):
        assert "axis" not in inspect.signature(function).parameters, function.__name__
    for function in (F.softmax, F.log_softmax):  # dim first; axis= only as DESIGN.md's keyword spelling
        parameters = inspect.signature(function).parameters
        assert list(parameters)[1] == "dim" and parameters["axis"].kind is inspect.Parameter.KEYWORD_ONLY
    x = no.Tensor(np.array([[1.0, 2.0], [3.0, 5.0]]))
    np.testing.assert_allclose(F.softmax(x, dim=0).data.sum(axis=0), [1.0, 1.0])


@pytest.mark.parametrize("method, name", [(prune.L1Unstructured, "l1"), (prune.RandomUnstructured, "random")])
def test_global_unstructured_takes_pytorch_method_classes(method, name):
    def pruned(pruning_method):
        no.manual_seed(3)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
        model[0].weight.data[...] = np.arange(30, dtype=np.float32).reshape(5, 6) - 14.5
        model[2].weight.data[...] = np.arange(20, dtype=np.float32).reshape(4, 5) * 0.5 - 4.75
        no.manual_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prune.global_unstructured([(model[0], "weight"), (model[2], "weight")], pruning_method=pruning_method,
                                      amount=0.6)
        return np.concatenate([model[0].weight_mask.ravel(), model[2].weight_mask.ravel()])

    by_class, by_name = pruned(method), pruned(name)
    assert int((by_class == 0).sum()) == 30      # round(0.6 * 50)
    np.testing.assert_array_equal(by_class, by_name)
    with pytest.raises(ValueError, match="pruning_method"):
        pruned("l2")


def test_method_class_masks_match_the_functions():
    layer = nn.Linear(4, 3)
    expected = prune.l1_unstructured(nn.Linear(4, 3), "weight", 0.5, importance_scores=layer.weight.data).weight_mask
    mask = prune.L1Unstructured(0.5).compute_mask(layer.weight.data, np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(mask, expected)
    assert prune.L1Unstructured.apply(layer, "weight", amount=3) is layer and int((layer.weight_mask == 0).sum()) == 3


def test_basic_block_lives_with_the_models():
    assert models.BasicBlock.__module__ == "nanoopt.models"
    assert not hasattr(nn, "BasicBlock")


def test_softmax_takes_pytorchs_dim_and_designs_axis():
    """DESIGN.md's public API spells ``nn.functional.log_softmax(x, axis=-1)``; PyTorch spells ``dim``: both work."""
    import numpy as np

    from nanoopt import nn

    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    for function in (nn.functional.softmax, nn.functional.log_softmax):
        by_dim, by_axis = function(x, dim=0).data, function(x, axis=0).data
        np.testing.assert_array_equal(by_dim, by_axis)
        np.testing.assert_array_equal(function(x).data, function(x, axis=-1).data)
        with pytest.raises(TypeError, match="dim=0 and axis=1"):
            function(x, dim=0, axis=1)
