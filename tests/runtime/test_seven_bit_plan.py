"""7-bit activations (PyTorch's ``reduce_range``) from quantization to the runtime: ``QuantConfig.x86_reduce_range()``
and ``QuantConfig(activation=QuantSpec(bits=7))`` go through ``quantize_static`` -> ``convert`` ->
``runtime.compile``; the plan is bit-identical to the converted model, and on plain AVX2 its int8 layers take the
7-bit tile because their input grids say so (an 8-bit model's layers never do)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt import kernels, models, quant, runtime
from nanoopt.kernels import x86_glue
from nanoopt.quant.config import INT7_ACTIVATION, QuantConfig
from nanoopt.runtime.integer_steps import Conv2dQ, LinearQ
from nanoopt.spec import QuantSpec

CONFIGS = {"x86_reduce_range": QuantConfig.x86_reduce_range(), "bits=7": QuantConfig(activation=QuantSpec(bits=7)),
           "int8": QuantConfig()}
MODELS = {"lenet_300_100": (models.lenet_300_100, (1, 28, 28)), "lenet5": (models.lenet5, (1, 28, 28))}


def quantized(model_name, config_name, seed):
    build, shape = MODELS[model_name]
    rng = np.random.default_rng(seed)
    model = build()
    calibration = rng.uniform(size=(16, *shape)).astype(np.float32)
    return quant.quantize_static(model, calibration, CONFIGS[config_name], progress=False), shape


def test_the_preset_is_pytorchs_reduce_range():
    spec = QuantConfig.x86_reduce_range().activation
    assert spec == INT7_ACTIVATION == QuantSpec(bits=7)
    assert (spec.qmin, spec.qmax, spec.dtype) == (-64, 63, np.dtype(np.int8))  # quint8 [0, 127], shifted by 64


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.sampled_from([1, 3, 7]), spread=st.sampled_from([1.0, 40.0]))
def test_plan_is_bit_identical_and_takes_the_tile_its_grids_allow(model_name, config_name, seed, batch, spread):
    qmodel, shape = quantized(model_name, config_name, seed)
    seven_bit = config_name != "int8"
    assert (qmodel.input_spec.bits == 7) == seven_bit
    plan = runtime.compile(qmodel)
    x = (np.random.default_rng(seed + 1).normal(size=(batch, *shape)) * spread).astype(np.float32)
    np.testing.assert_array_equal(plan(x), qmodel(x).data)
    codes = qmodel.quantize_input(x)
    assert (codes.min() >= -64 and codes.max() <= 63) or not seven_bit
    np.testing.assert_array_equal(plan.forward_int(codes), qmodel.forward_int(codes))
    layers = [op for op in plan.ops if isinstance(op, LinearQ | Conv2dQ)]
    assert layers
    expected_range = (-64, 63) if seven_bit else (-128, 127)
    for op in layers:
        assert op.x_codes == expected_range
        chosen = op._s8_kernel()
        assert chosen == x86_glue.s8_kernel_for_codes(kernels.int8_gemm_kernel(), *expected_range)
        if kernels.int8_gemm_kernel() == "avx2":  # plain AVX2 (e.g. NANOOPT_CPU_FEATURES=avx2)
            assert chosen == ("avx2-7bit" if seven_bit else "avx2")
        if isinstance(op, LinearQ) and kernels.int8_gemm_kernel() in ("avx2", "avx-vnni"):
            assert op.requant_lanes is not None  # requantized in 32-bit lanes (the epilogue fits int32)


def test_forward_int_refuses_codes_outside_the_input_grid():
    qmodel, shape = quantized("lenet_300_100", "x86_reduce_range", 0)
    plan = runtime.compile(qmodel)
    codes = np.zeros((2, *shape), np.int8)
    codes[1, 0, 5, 5] = 64
    with pytest.raises(ValueError, match=r"in \[-64, 63\] \(7-bit\), got codes in \[0, 64\]"):
        plan.forward_int(codes)


def test_a_loaded_plan_keeps_the_choice(tmp_path):
    qmodel, shape = quantized("lenet_300_100", "x86_reduce_range", 1)
    plan = runtime.compile(qmodel)
    path = tmp_path / "plan.npz"
    runtime.save(plan, path)
    loaded = runtime.load(path)
    x = np.random.default_rng(2).normal(size=(4, *shape)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), plan(x))
    assert [op.x_codes for op in loaded.ops if isinstance(op, LinearQ)] == [(-64, 63)] * 3
