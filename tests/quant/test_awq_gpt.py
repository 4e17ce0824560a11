"""AWQ on the GPT folds its scales into the previous op, as the reference code does for decoder blocks: c_attn's
``1 / s`` into ln_1, c_fc's into ln_2, lm_head's into ln_f, attn.c_proj's into c_attn's value rows; mlp.c_proj
(after GELU) keeps an explicit InputScaled. The folds are exact algebra, happen before any layer is rounded, and the
result runs on the GPT's fast array path."""

import copy
import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn, quant
from nanoopt.quant.algorithms.awq import InputScaled, awq_plan
from nanoopt.quant.dynamic import WeightOnlyLinear

awq_module = importlib.import_module("nanoopt.quant.algorithms.awq")  # (the package exports the function as awq)
VOCAB, BLOCK, LAYERS, HEADS, WIDTH = 13, 8, 2, 2, 16


def small_gpt(seed, untie=False):
    no.manual_seed(seed)
    model = models.gpt(vocab_size=VOCAB, block_size=BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH).eval()
    rng = np.random.default_rng(seed)
    for parameter in model.parameters():  # larger weights and non-zero biases: every fold has something to divide
        parameter.data[...] = rng.standard_normal(parameter.shape).astype(np.float32) * 0.3
    if untie:  # a head of its own, so that AWQ may scale it
        model.transformer["wte"].weight = nn.Parameter(model.lm_head.weight.data.copy())
    return model


def calibration(seed=12):
    return [np.random.default_rng(seed).integers(0, VOCAB, size=(16, BLOCK))]


def test_the_plan_folds_into_the_norms_and_the_value_rows_and_keeps_mlp_c_proj_explicit():
    plan = [(g.layers, g.fold_into, g.fold_rows) for g in awq_plan(small_gpt(0), calibration(), ignore=["lm_head"])]
    expected = []
    for i in range(LAYERS):
        block = f"transformer.h.{i}"
        expected += [([f"{block}.attn.c_attn"], f"{block}.ln_1", None),
                     ([f"{block}.attn.c_proj"], f"{block}.attn.c_attn", (2 * WIDTH, 3 * WIDTH)),  # the value rows
                     ([f"{block}.mlp.c_fc"], f"{block}.ln_2", None),
                     ([f"{block}.mlp.c_proj"], None, None)]  # GELU is not positively homogeneous
    assert plan == expected
    assert awq_plan(small_gpt(0, untie=True), calibration())[-1].fold_into == "transformer.ln_f"
    unfolded = awq_plan(small_gpt(0), calibration(), ignore=["lm_head"], fold=False)
    assert all(g.fold_into is None for g in unfolded) and len(unfolded) == 4 * LAYERS


def test_head_pruned_blocks_fold_into_their_narrower_value_rows():
    model = small_gpt(0)
    no.prune.prune_heads(model, {0: [1]})
    width = model.transformer["h"][0].attn.inner_dim
    assert width == WIDTH // HEADS
    plan = {g.layers[0]: (g.fold_into, g.fold_rows) for g in awq_plan(model, calibration(), ignore=["lm_head"])}
    assert plan["transformer.h.0.attn.c_proj"] == ("transformer.h.0.attn.c_attn", (2 * width, 3 * width))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(0.5, 2.0))
def test_the_folds_are_exact_and_precede_rounding(seed, spread):
    """With random scales s in [e^-spread, e^spread] and a "rounding" that only copies the layer (so a fold arriving
    after it would be lost), the AWQ'd GPT computes the float GPT's function."""
    rng = np.random.default_rng(seed)

    def random_scale(weights, inputs, mean_abs, *args):
        return np.exp(rng.uniform(-spread, spread, size=inputs.shape[1])), 1.0, {"rtn": 0.0, "awq": 0.0}

    model = small_gpt(seed % 7, untie=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(awq_module, "search_scale", random_scale)
        patch.setattr(awq_module, "rtn_linear", lambda layer, *args: copy.deepcopy(layer))
        scaled = quant.awq(model, calibration(seed), bits=4, group_size=8)
    wrappers = [name for name, m in scaled.named_modules() if isinstance(m, InputScaled)]
    assert wrappers == [f"transformer.h.{i}.mlp.c_proj" for i in range(LAYERS)]
    value_rows = scaled.transformer["h"][0].attn.c_attn.weight.data[2 * WIDTH:]
    assert not np.allclose(value_rows, model.transformer["h"][0].attn.c_attn.weight.data[2 * WIDTH:], rtol=1e-3)
    ids = np.random.default_rng(seed + 1).integers(0, VOCAB, size=(2, BLOCK))
    np.testing.assert_allclose(scaled(ids).data, model(ids).data, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_eight_bit_awq_is_close_to_float_and_runs_the_array_path(rounding):
    model = small_gpt(3)
    small = quant.awq(model, calibration(), bits=8, group_size=None, rounding=rounding, ignore=["lm_head"])
    wrappers = {name for name, m in small.named_modules() if isinstance(m, InputScaled)}
    assert wrappers == {f"transformer.h.{i}.mlp.c_proj" for i in range(LAYERS)}
    assert sum(isinstance(m, WeightOnlyLinear) for m in small.modules()) == 4 * LAYERS
    ids = np.random.default_rng(5).integers(0, VOCAB, size=(1, BLOCK))
    reference = model(ids).data
    np.testing.assert_allclose(small(ids).data, reference, atol=0.05 * np.abs(reference).max())
    assert small._plain()  # the fast array path
    caches = small._new_caches(1)
    np.testing.assert_allclose(small._array_logits(ids[:, :5], caches), small(ids[:, :5]).data[:, -1], rtol=1e-5,
                               atol=1e-5)
    for i in range(5, BLOCK):  # one token per step through the cached values (scaled by the fold)
        np.testing.assert_allclose(small._array_logits(ids[:, i:i + 1], caches), small(ids[:, :i + 1]).data[:, -1],
                                   rtol=1e-5, atol=1e-5)
