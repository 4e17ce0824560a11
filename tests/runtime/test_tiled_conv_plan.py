"""Float plans on the register-tiled convolutions (nanoopt.kernels.float_conv_avx2): the channel tiles for groups
of more than 8 output channels, the row tiles for thin unit-stride layers, where the AVX2 kernels run; the plan
then equals the float model to float tolerance, on any batch size, for strided, dilated, grouped, padded and pooled
layers. Elsewhere the portable kernels run, with the same results."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import nn, runtime
from nanoopt.kernels import float_conv_avx2
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime import float_steps


def wide_convs(seed):
    no.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(),  # thin, unit stride: row tiles (6 + 1 channels)
                         nn.Conv2d(7, 20, 3, stride=2, padding=1), nn.ReLU(),  # strided, padded, 20 = 16 + 4
                         nn.Conv2d(20, 24, (3, 2), padding=1, dilation=2, groups=2), nn.ReLU(),  # 2 groups of 12
                         nn.MaxPool2d(2),  # fused into the conv before it
                         nn.Conv2d(24, 9, 1), nn.ReLU(),  # 9 channels: one full block and one lane of the next
                         nn.Conv2d(9, 8, 2),  # 8 channels: not tiled
                         nn.Flatten(), nn.Linear(16, 3))


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1, 2, 5]))
def test_float_plan_on_tiled_convs_matches_the_model(seed, batch):
    model = wide_convs(seed)
    model.eval()
    x = np.random.default_rng(seed + 1).normal(size=(batch, 3, 11, 13)).astype(np.float32)
    plan = runtime.compile(model, x[:1])
    with no.no_grad():
        expected = model(x).data
    np.testing.assert_allclose(plan(x), expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))
    convs = [op for op in plan.ops if isinstance(op, float_steps.Conv2d)]
    tiled = float_conv_avx2.available()
    assert [op.tiled for op in convs] == [False] + [tiled] * 3 + [False]
    assert [op.row_tiled for op in convs] == [tiled] + [False] * 4
    calls = [function for step in plan._bound[x.shape].per_step for function, _ in step]
    assert (float_conv_avx2.conv_tiles_into in calls) == tiled
    assert (fk.direct_conv_row_tiles in calls) == tiled
