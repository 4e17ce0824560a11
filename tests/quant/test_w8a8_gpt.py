"""W8A8 GPT: the simulated (prepared, calibrated) GPT equals the converted integer GPT bit for bit, with static and
per-token activation scales, with and without the KV cache; the integer attention matches float attention
closely and its products are exact; bad input is refused with the layer named."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models
from nanoopt.quant.lowering import QParams
from nanoopt.quant.transformer import (
    W8A8Config,
    convert_w8a8,
    exact_integer_matmul,
    integer_attention,
    prepare_w8a8,
    quantize_w8a8,
)
from nanoopt.spec import QuantSpec

SETTINGS = settings(max_examples=10, deadline=None)
VOCAB = 13


def trained_like_gpt(seed, n_layer=2):
    """A small GPT with non-trivial LayerNorms and biases (what training gives), deterministic per seed."""
    no.manual_seed(seed)
    model = models.gpt(vocab_size=VOCAB, block_size=8, n_layer=n_layer, n_head=2, n_embd=16)
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
            parameter.data[...] = rng.uniform(0.5, 1.5, parameter.shape).astype(np.float32)
        elif name.endswith(".bias"):
            parameter.data[...] = rng.normal(0, 0.1, parameter.shape).astype(np.float32)
        elif name.endswith(".weight") and parameter.ndim == 2:
            parameter.data[...] = rng.normal(0, 0.2, parameter.shape).astype(np.float32)
    return model


def windows(seed, n=8, t=8):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, t))


@SETTINGS
@given(seed=st.integers(0, 2**16), per_token=st.booleans(), t=st.integers(1, 8))
def test_simulated_gpt_equals_integer_gpt_bit_for_bit(seed, per_token, t):
    model = trained_like_gpt(seed % 5)
    prepared = prepare_w8a8(model, W8A8Config(per_token=per_token)).calibrate(windows(seed))
    integer = convert_w8a8(prepared)
    ids = windows(seed + 1, n=3, t=t)
    simulated, converted = prepared(ids).data, integer(ids).data
    assert simulated.dtype == converted.dtype == np.float32
    np.testing.assert_array_equal(simulated, converted)
    # and it is a quantization of the float model, not something else (relative RMS error of the logits)
    expected = model(ids).data
    # (worst over 240 draws: 0.22 on these 16-wide models; a wrong scale or grid gives errors of order 1)
    assert np.sqrt(np.mean((converted - expected) ** 2)) < 0.3 * np.sqrt(np.mean(expected ** 2))


def test_integer_gpt_holds_int8_weights_and_an_int8_cache():
    prepared = prepare_w8a8(trained_like_gpt(0)).calibrate(windows(0))
    integer = convert_w8a8(prepared)
    for block in integer.blocks:
        for name in ("c_attn", "c_proj", "c_fc", "mlp_proj"):
            layer = getattr(block, name)
            assert layer.weight.dtype == np.int8 and np.abs(layer.weight).max() <= 127
    assert integer.lm_head.weight.dtype == np.int8
    assert integer.blocks[0].c_attn.m0.dtype == np.int32  # c_attn requantizes with fixed-point multipliers
    assert all(cache.keys.dtype == np.int8 for cache in integer._new_caches(1))


@pytest.mark.parametrize("config", [W8A8Config(), W8A8Config(per_token=True), W8A8Config(nonlinear="ibert")])
def test_generation_with_the_cache_equals_generation_without_and_the_simulation(config):
    model = trained_like_gpt(3)
    prepared = prepare_w8a8(model, config).calibrate(windows(3))
    integer = convert_w8a8(prepared)
    prompt = windows(4, n=2, t=3)
    cached = integer.generate(prompt, 9, temperature=0.0)  # crosses block_size = 8: the window slides
    assert cached.shape == (2, 12)
    np.testing.assert_array_equal(cached, integer.generate(prompt, 9, temperature=0.0, use_cache=False))
    np.testing.assert_array_equal(cached, prepared.generate(prompt, 9, temperature=0.0))
    # the cached step computes what the full window computes: the logits of the last position agree bit for bit
    caches = integer._new_caches(2)
    integer.logits(prompt, caches)
    step = integer.logits(cached[:, 3:4], caches, last_only=True)
    np.testing.assert_array_equal(step[:, -1], integer.logits(cached[:, :4])[:, -1])


def test_smoothquant_then_w8a8_evaluates_close_to_float():
    model = trained_like_gpt(5)
    ids = windows(5, n=16)
    integer = quantize_w8a8(model, ids, alpha=0.5)
    x = windows(6, n=4)
    expected = model(x).data
    assert np.abs(integer(x).data - expected).max() < 0.1 * np.abs(expected).max()


@SETTINGS
@given(seed=st.integers(0, 2**16), t=st.integers(1, 6), start=st.integers(0, 5), d=st.sampled_from([4, 8, 16]))
def test_integer_attention_is_close_to_float_attention(seed, t, start, d):
    rng = np.random.default_rng(seed)
    s = start + t
    q, k, v = (rng.integers(-127, 128, size=(2, 3, n, d)).astype(np.int8) for n in (t, s, s))
    scales = (0.02, 0.03, 0.05)
    out_grid = QParams(np.float32(0.05 * 127 / 120), np.int32(3), QuantSpec(bits=8))
    codes = integer_attention(q, k, v, scales, out_grid, start)
    assert codes.dtype == np.int8 and codes.shape == (2, 3, t, d)
    qf, kf, vf = (a.astype(np.float64) * sc for a, sc in zip((q, k, v), scales, strict=True))
    scores = qf @ np.swapaxes(kf, -1, -2) / np.sqrt(d)
    scores = scores + np.triu(np.full((t, s), -np.inf), k=start + 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    reference = (p / p.sum(-1, keepdims=True)) @ vf
    got = (codes.astype(np.float64) - 3) * float(out_grid.scale)
    # error: half an output step + the probabilities' half step (1/510) times sum |v| over the keys
    bound = float(out_grid.scale) / 2 + s * (0.5 / 255) * 127 * 0.05 + 1e-6
    assert np.abs(got - reference).max() <= bound


@SETTINGS
@given(seed=st.integers(0, 2**16), k=st.integers(1, 2000), bound=st.sampled_from([127, 255, 40000]))
def test_exact_integer_matmul_is_exact(seed, k, bound):
    rng = np.random.default_rng(seed)
    a = rng.integers(-bound, bound + 1, size=(3, k))
    b = rng.integers(-127, 128, size=(k, 2))
    np.testing.assert_array_equal(exact_integer_matmul(a, b, bound, 127), a.astype(np.int64) @ b)


def test_bad_input_is_refused_with_the_layer_named():
    model = trained_like_gpt(0)
    prepared = prepare_w8a8(model)
    with pytest.raises(ValueError, match="layer .transformer.h.0.attn.c_proj.: the input grid is not calibrated"):
        prepared(windows(0))
    with pytest.raises(ValueError, match="not calibrated"):
        convert_w8a8(prepared)
    with pytest.raises(ValueError, match="calibration is empty"):
        prepared.calibrate(np.zeros((0, 8), np.int64))
    with pytest.raises(ValueError, match="ids must be in"):
        prepared.calibrate(np.full((1, 8), VOCAB))
    with pytest.raises(TypeError, match="must be a nanoopt GPT"):
        prepare_w8a8(models.tiny_mlp())
    with pytest.raises(ValueError, match="alpha must be"):
        quantize_w8a8(model, windows(0), alpha=2.0)
    integer = convert_w8a8(prepared.calibrate(windows(0)))
    with pytest.raises(ValueError, match="longer than block_size"):
        integer(np.zeros((1, 9), np.int64))
    with pytest.raises(TypeError, match="converted integer GPT"):
        integer.calibrate(windows(0))


def test_quant_prepare_calibrate_convert_take_a_gpt():
    from nanoopt import quant

    model = trained_like_gpt(7)
    ids = windows(7)
    prepared = quant.prepare(model, W8A8Config(per_token=True))
    assert isinstance(prepared, quant.W8A8GPT) and prepared.w8a8.per_token
    integer = quant.convert(quant.calibrate(prepared, ids))
    direct = convert_w8a8(prepare_w8a8(model, W8A8Config(per_token=True)).calibrate(ids))
    np.testing.assert_array_equal(integer(ids).data, direct(ids).data)


def test_integer_gpt_state_dict_round_trip():
    ids = windows(8)
    first = convert_w8a8(prepare_w8a8(trained_like_gpt(8)).calibrate(ids))
    second = convert_w8a8(prepare_w8a8(trained_like_gpt(9)).calibrate(windows(9)))
    second(ids)  # kernels packed for the old weights
    state = first.state_dict()
    assert state["blocks.0.c_attn.weight"].dtype == np.int8 and state["lm_head.weight"].dtype == np.int8
    second.load_state_dict(state)
    np.testing.assert_array_equal(second(ids).data, first(ids).data)


# --------------------------------------------------------------------------------------------- I-BERT nonlinears
IBERT = W8A8Config(nonlinear="ibert")


@SETTINGS
@given(seed=st.integers(0, 2**16), t=st.integers(1, 8))
def test_ibert_simulated_gpt_equals_integer_gpt_bit_for_bit(seed, t):
    model = trained_like_gpt(seed % 5)
    prepared = prepare_w8a8(model, IBERT).calibrate(windows(seed))
    integer = convert_w8a8(prepared)
    ids = windows(seed + 1, n=3, t=t)
    simulated, converted = prepared(ids).data, integer(ids).data
    np.testing.assert_array_equal(simulated, converted)
    # a quantization of the float model (same bar as the float-nonlinear mode) ...
    expected = model(ids).data
    assert np.sqrt(np.mean((converted - expected) ** 2)) < 0.3 * np.sqrt(np.mean(expected ** 2))
    # ... whose nonlinears are not the float ones: the float-nonlinear W8A8 GPT of the same grids differs
    float_nonlinear = convert_w8a8(prepare_w8a8(model).calibrate(windows(seed)))(ids).data
    assert not np.array_equal(converted, float_nonlinear)


def test_ibert_layer_norms_give_int8_codes_on_the_next_linears_grid():
    prepared = prepare_w8a8(trained_like_gpt(2), IBERT).calibrate(windows(2))
    integer = convert_w8a8(prepared)
    block = integer.blocks[0]
    x = np.random.default_rng(0).normal(0, 1, (2, 8, 16)).astype(np.float32)
    codes = block.norm_1.codes(x, block.ln_1, block.c_attn.input_qparams())
    assert codes.dtype == np.int8 and codes.shape == x.shape
    assert np.array_equal(codes, prepared.blocks[0].norm_1.codes(x, prepared.blocks[0].ln_1,
                                                                 prepared.blocks[0].c_attn.input_qparams()))
    assert integer.norm_f.input_scale.dtype == np.float32 and integer.blocks[1].norm_2.observer is None


def test_ibert_integer_gpt_state_dict_round_trip():
    ids = windows(8)
    first = convert_w8a8(prepare_w8a8(trained_like_gpt(8), IBERT).calibrate(ids))
    second = convert_w8a8(prepare_w8a8(trained_like_gpt(9), IBERT).calibrate(windows(9)))
    second(ids)  # constants computed for the old grids and weights
    state = first.state_dict()
    assert "blocks.0.norm_1.input_scale" in state and "norm_f.input_scale" in state
    second.load_state_dict(state)
    np.testing.assert_array_equal(second(ids).data, first(ids).data)


def test_ibert_bad_configuration_and_uncalibrated_layer_norms_are_refused():
    with pytest.raises(ValueError, match="nonlinear must be 'float' or 'ibert', got 'int'"):
        W8A8Config(nonlinear="int")
    with pytest.raises(ValueError, match="per_token=True is not supported"):
        W8A8Config(per_token=True, nonlinear="ibert")
    prepared = prepare_w8a8(trained_like_gpt(0), IBERT)
    with pytest.raises(ValueError, match="layer .transformer.ln_f.: the LayerNorm input grid is not calibrated"):
        convert_w8a8(prepared)


@pytest.mark.parametrize("nonlinear", ["float", "ibert"])
def test_a_bias_that_does_not_fit_int32_on_a_tiny_input_grid_converts(nonlinear):
    """LayerNorms scaled to 1e-6 give c_attn and c_fc input grids of 2^-23, on which biases of 3 leave int32
    (|b| / (s_x s_w) = 1.5e10). c_attn's static requantization raises those channels' weight scales
    (``lowering.integer_layer``, ONNX Runtime's rule) and the integer GPT stores the codes and scales its
    requantization was derived with; the I-BERT GELU adds c_fc's bias in int64. Simulated = integer, bit for bit."""
    model = trained_like_gpt(1)
    for name, parameter in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight")):
            parameter.data[...] = 1e-6
        elif name.endswith(("ln_1.bias", "ln_2.bias")):
            parameter.data[...] = 0.0
        elif name.endswith(("c_attn.bias", "c_fc.bias")):
            parameter.data[...] = np.where(parameter.data >= 0, 3.0, -3.0)
    with pytest.warns(UserWarning, match=r"layer 'transformer.h.0.attn.c_attn': the bias does not fit int32"):
        prepared = prepare_w8a8(model, W8A8Config(nonlinear=nonlinear)).calibrate(windows(0))
        integer = convert_w8a8(prepared)
    for simulated_block, integer_block in zip(prepared.blocks, integer.blocks, strict=True):
        layer = simulated_block.c_attn.integer_layer()
        assert np.any(layer.weight_scale > simulated_block.c_attn.weight_scale_array())
        np.testing.assert_array_equal(integer_block.c_attn.weight, layer.weight)
        np.testing.assert_array_equal(integer_block.c_attn.weight_scale, layer.weight_scale)
        np.testing.assert_array_equal(integer_block.c_attn.bias_q, layer.bias)
    ids = windows(1, n=3, t=8)
    np.testing.assert_array_equal(prepared(ids).data, integer(ids).data)
    expected = model(ids).data
    assert np.sqrt(np.mean((integer(ids).data - expected) ** 2)) < 0.3 * np.sqrt(np.mean(expected ** 2))
