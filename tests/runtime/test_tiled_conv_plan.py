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


def wide_convs(seed):
    no.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(),  # unit stride: row tiles of 6 + 1 channels
                         nn.Conv2d(7, 20, 3, stride=2, padding=1), nn.ReLU(),  # strided: channel tiles, 16 + 4
                         nn.Conv2d(20, 24, (3, 2), padding=1, dilation=2, groups=2), nn.ReLU(),  # 2 groups of 12
                         nn.MaxPool2d(2),  # fused into the conv before it: row tiles pooled in registers
                         nn.Conv2d(24, 9, 1), nn.ReLU(),  # row tiles of 6 + 3 channels
                         nn.Conv2d(9, 8, 2),  # 2 of 3 columns used: no row tiles; 8 channels: no channel tiles
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
    kernels = [[function for function, _ in step if function is not np.copyto][0]
               for step in plan._bound[x.shape].per_step[:5]]
    if float_conv_avx2.available():  # the rules of float_steps (ROW_TILES_*, TILED_MIN_GROUP_CHANNELS)
        assert kernels == [fk.direct_conv_row_tiles, float_conv_avx2.conv_tiles_into, fk.direct_conv_row_tiles,
                           fk.direct_conv_row_tiles, fk.im2col_image_gemm_conv]
    else:
        assert kernels == [fk.direct_conv_unit_stride, fk.im2col_image_gemm_conv, fk.im2col_gemm_conv,
                           fk.direct_conv_unit_stride, fk.im2col_image_gemm_conv]
