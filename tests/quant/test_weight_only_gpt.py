"""Weight-only low-bit GPTs generate through the fast array path: each Linear computes from its stored codes
(the low-bit kernel for a few rows, the dequantized weight and BLAS for many), the array path equals the module
path, and generation with the KV cache equals generation without it at temperature 0."""

import numpy as np
import pytest

import nanoopt as no
from nanoopt import models, nn, quant
from nanoopt.kernels.lowbit import lowbit_linear_reference
from nanoopt.quant.dynamic import KERNEL_MAX_ROWS, WeightOnlyLinear


def small_gpt(seed):
    no.manual_seed(seed)
    model = models.gpt(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    rng = np.random.default_rng(seed)
    for parameter in model.parameters():  # larger weights than the init: distinct logits, no argmax ties
        parameter.data[...] = rng.standard_normal(parameter.shape).astype(np.float32) * 0.3
    return model


QUANTIZERS = {
    "rtn W4 g8 asymmetric": lambda m: quant.rtn(m, bits=4, group_size=8, ignore=["lm_head"]),
    "rtn W3 g16 symmetric": lambda m: quant.rtn(m, bits=3, group_size=16, symmetric=True, ignore=["lm_head"]),
    "rtn W2 g4 head too": lambda m: quant.rtn(m, bits=2, group_size=4),
    "W6 per channel (unpacked)": lambda m: quant.quantize_weights(m, bits=6),
    "AWQ W4 g8 (InputScaled c_proj)": lambda m: quant.awq(
        m, [np.random.default_rng(12).integers(0, 13, size=(4, 8))], bits=4, group_size=8, ignore=["lm_head"]),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_generation_runs_the_array_path_and_the_cache_changes_nothing(name):
    model = QUANTIZERS[name](small_gpt(1))
    assert any(isinstance(m, WeightOnlyLinear) for m in model.modules())
    if name.startswith("AWQ"):  # a scale no previous op can absorb stays as a wrapper, which computes on arrays
        assert any(type(m).__name__ == "InputScaled" for m in model.modules())
    assert model._plain()  # the fast array path, not the module path
    prompt = np.random.default_rng(2).integers(0, 13, size=(2, 3))
    cached = model.generate(prompt, 9, temperature=0.0)  # crosses block_size 8: the window slides
    np.testing.assert_array_equal(cached, model.generate(prompt, 9, temperature=0.0, use_cache=False))
    model.transformer["h"][0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: None)
    assert not model._plain()  # the module path gives the same tokens
    np.testing.assert_array_equal(cached, model.generate(prompt, 9, temperature=0.0))


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_array_logits_equal_the_module_forward(name):
    model = QUANTIZERS[name](small_gpt(4))
    ids = np.random.default_rng(5).integers(0, 13, size=(1, 8))
    caches = model._new_caches(1)
    np.testing.assert_allclose(model._array_logits(ids[:, :5], caches), model(ids[:, :5]).data[:, -1], rtol=1e-5,
                               atol=1e-5)
    for i in range(5, 8):  # one row per step: the kernel, in both paths; the module forward: 1 x i rows
        step = model._array_logits(ids[:, i:i + 1], caches)
        np.testing.assert_allclose(step, model(ids[:, :i + 1]).data[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 8, False), (3, 5, True), (7, None, False)])
def test_weight_only_linear_is_the_kernel_reference_for_few_rows_and_blas_for_many(bits, group_size, symmetric):
    no.manual_seed(6)
    layer = nn.Linear(15, 9)
    if group_size is None:
        stored = quant.quantize_weights(layer, bits=bits)
    else:
        stored = quant.rtn(layer, bits=bits, group_size=group_size if 15 % group_size == 0 else 15,
                           symmetric=symmetric)
    rng = np.random.default_rng(7)
    few = rng.standard_normal((2, 3, 15)).astype(np.float32)  # 6 rows <= KERNEL_MAX_ROWS
    expected = lowbit_linear_reference(few.reshape(-1, 15), stored.lowbit_weight(), stored.bias)
    np.testing.assert_array_equal(stored(few).data, expected.reshape(2, 3, 9))
    rows = slice(2, 7)
    np.testing.assert_array_equal(stored.forward_array(few, rows), expected.reshape(2, 3, 9)[..., rows])
    many = rng.standard_normal((KERNEL_MAX_ROWS + 1, 15)).astype(np.float32)
    dense = many @ stored.dequantized_weight().T + stored.bias
    np.testing.assert_allclose(stored(many).data, dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stored(many[:3]).data, dense[:3], rtol=1e-5, atol=1e-5)


def test_a_loaded_state_replaces_the_kernel_layout():
    no.manual_seed(8)
    a, b = quant.rtn(nn.Linear(8, 4), bits=4, group_size=4), quant.rtn(nn.Linear(8, 4), bits=4, group_size=4)
    x = np.random.default_rng(9).standard_normal((1, 8)).astype(np.float32)
    a(x)  # lays the codes out for the kernel
    a.load_state_dict(b.state_dict())
    np.testing.assert_array_equal(a(x).data, b(x).data)


def test_gradient_reaches_the_input():
    no.manual_seed(10)
    stored = quant.rtn(nn.Linear(6, 4), bits=4, group_size=3)
    x = no.Tensor(np.random.default_rng(11).standard_normal((2, 6)).astype(np.float32), requires_grad=True)
    (stored(x) * no.Tensor(np.arange(8, dtype=np.float32).reshape(2, 4))).sum().backward()
    np.testing.assert_allclose(x.grad, np.arange(8, dtype=np.float32).reshape(2, 4) @ stored.dequantized_weight(),
                               rtol=1e-6)
