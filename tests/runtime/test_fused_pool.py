"""An int8 conv step with a fused non-overlapping max pool (``pool`` attribute, written by ``deploy.to_plan`` where
a max pool is the only reader of a conv) equals the reference conv followed by the reference max pool, bit for bit,
on every path the step can take here: the thin direct loop (few taps), the x86 driver that pads, convolves and
pools in one call (int8 GEMM where the CPU has one), the portable Numba conv, and the prepared layer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import kernels, models, quant, runtime
from nanoopt.kernels import reference as ref
from nanoopt.runtime.description import Step, spec_to_json
from nanoopt.runtime.integer_steps import Conv2dQ
from nanoopt.spec import QuantSpec


def conv_step(rng, in_channels, out_channels, kernel, stride, padding, groups, relu, pool):
    spec = QuantSpec()
    weight = rng.integers(-127, 128, size=(out_channels, in_channels // groups, kernel, kernel)).astype(np.int8)
    arrays = {"weight": weight, "bias": rng.integers(-3000, 3000, size=out_channels).astype(np.int32),
              "m0": rng.integers(2**30, 2**31, size=out_channels).astype(np.int32),
              "shift": rng.integers(6, 12, size=out_channels).astype(np.int32)}
    attrs = {"x_zero_point": int(rng.integers(-20, 20)), "out_zero_point": int(rng.integers(-10, 10)),
             "out_spec": spec_to_json(spec), "relu": relu, "x_dtype": "int8", "stride": [stride, stride],
             "padding": [padding, padding], "dilation": [1, 1], "groups": groups, "pool": list(pool)}
    return Step("conv2d_q", (0,), attrs, arrays, "conv"), spec


def reference(step, spec, x):
    a, arrays = step.attrs, step.arrays
    conv = ref.quantized_conv2d(x, arrays["weight"], arrays["bias"], a["x_zero_point"], arrays["m0"], arrays["shift"],
                                a["out_zero_point"], spec, tuple(a["stride"]), tuple(a["padding"]), 1, a["groups"],
                                a["relu"])  # fmt: skip
    pool = tuple(a["pool"])
    return ref.quantized_max_pool2d(conv, pool, pool, 0) if pool != (1, 1) else conv


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(1, 6, 1), (1, 4, 1), (6, 16, 1), (2, 8, 2), (3, 5, 1)]),
       st.integers(1, 5), st.integers(1, 2), st.integers(0, 2), st.integers(5, 12), st.booleans(),
       st.sampled_from([(1, 1), (2, 2), (3, 2), (2, 3)]), st.sampled_from(["auto", "numba"]), st.integers(0, 2**16))
def test_a_conv_with_a_fused_pool_equals_the_reference_conv_then_pool(batch, channels, kernel, stride, padding, size,
                                                                     relu, pool, backend, seed):
    in_channels, out_channels, groups = channels
    rng = np.random.default_rng(seed)
    out_size = (size + 2 * padding - kernel) // stride + 1
    if out_size < max(pool):
        pool = (1, 1)
    step, spec = conv_step(rng, in_channels, out_channels, kernel, stride, padding, groups, relu, pool)
    x = rng.integers(-128, 128, size=(batch, in_channels, size, size)).astype(np.int8)
    with kernels.use_backend(backend):
        op = Conv2dQ(step)
    out, calls = op.bind([x])
    for function, arguments in calls:
        function(*arguments)
    np.testing.assert_array_equal(out, reference(step, spec, x))


def test_a_pool_larger_than_the_conv_output_is_refused_when_bound():
    step, _ = conv_step(np.random.default_rng(0), 1, 4, 3, 1, 0, 1, False, (4, 4))
    with pytest.raises(ValueError, match="smaller than the fused 4x4 pool"):
        Conv2dQ(step).bind([np.zeros((1, 1, 5, 5), np.int8)])


def test_the_int8_lenet5_plan_pools_inside_its_convs_with_the_models_bits():
    """Both of LeNet-5's max pools are fused into the convs before them: no max_pool step, and the same bits."""
    no.manual_seed(0)
    model = models.lenet5().eval()
    x = np.random.default_rng(1).uniform(size=(64, 1, 28, 28)).astype(np.float32)
    qmodel = quant.quantize_static(model, x, progress=False)
    plan = runtime.compile(qmodel)
    ops = [step.op for step in plan.description.steps]
    assert "max_pool" not in ops
    assert [step.attrs.get("pool") for step in plan.description.steps if step.op == "conv2d_q"] == [[2, 2], [2, 2]]
    for batch in (1, 3, 64):
        np.testing.assert_array_equal(plan(x[:batch]), qmodel(x[:batch]).data)


@pytest.mark.parametrize("pool", [(1, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("size", [17, 20])
def test_a_conv_of_several_pixel_blocks_with_a_fused_pool_equals_the_reference(size, pool):
    """More than 256 output pixels per image (several blocks of the x86 conv, pooled from the NCHW planes)."""
    rng = np.random.default_rng(size)
    step, spec = conv_step(rng, 6, 16, 5, 1, 2, 1, True, pool)
    x = rng.integers(-128, 128, size=(2, 6, size, size)).astype(np.int8)
    out, calls = Conv2dQ(step).bind([x])
    for function, arguments in calls:
        function(*arguments)
    np.testing.assert_array_equal(out, reference(step, spec, x))
