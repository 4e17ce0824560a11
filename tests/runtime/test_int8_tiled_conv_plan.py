"""int8 plans on the register-tiled convolutions (nanoopt.kernels.int8_conv_avx2): LeNet-5's first conv (thin, unit
stride, 2x2 pool) in row tiles, its second in channel tiles, where the x86 kernels run; the plan equals the integer
model bit for bit at batch 1 and at odd batches, also for inputs far outside the calibrated range (every input code
-128 or 127). Elsewhere (no AVX2, a forced portable backend) the portable kernels run, with the same codes."""

import numpy as np
import pytest

import nanoopt as no
from nanoopt import kernels, models, quant, runtime
from nanoopt.kernels import int8_conv_avx2


@pytest.fixture(scope="module")
def lenet5_int8():
    no.manual_seed(3)
    model = models.lenet5().eval()
    calibration = np.random.default_rng(0).uniform(size=(64, 1, 28, 28)).astype(np.float32)
    return quant.quantize_static(model, calibration, progress=False)


def conv_kernels(plan, x):
    functions = [function for step in plan._bound[x.shape].per_step for function, _ in step]
    return [f for f in functions if f in (int8_conv_avx2.conv_rows_s8_into, int8_conv_avx2.conv_s8_into)]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_the_int8_plan_on_tiles_equals_the_model(lenet5_int8, batch, backend):
    rng = np.random.default_rng(batch)
    x = rng.uniform(size=(batch, 1, 28, 28)).astype(np.float32)
    x[:, :, :7] = 50.0  # far above the calibrated range: input code 127
    x[:, :, 7:10] = -50.0  # far below: -128
    with kernels.use_backend(backend):
        plan = runtime.compile(lenet5_int8)
    np.testing.assert_array_equal(plan(x), lenet5_int8(x).data)
    tiles = int8_conv_avx2.taps_per_lane() > 0 and backend == "auto"
    expected = [int8_conv_avx2.conv_rows_s8_into, int8_conv_avx2.conv_s8_into] if tiles else []
    assert conv_kernels(plan, x) == expected
