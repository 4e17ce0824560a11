"""The register-tiled float convolution (nanoopt.kernels.float_conv_avx2) against its NumPy reference.

Its sums run in another order than the float64 reference (taps in order, one rounding per fused multiply-add), so
on real-valued data the two agree to float tolerance; on small integers every sum is exact and they agree bit for
bit. Strides, dilations, groups, kernel shapes, odd sizes, batch 1, partial channel blocks (``OCg`` not a multiple
of 8 or 16), more than one pair of blocks and fused pools are drawn by hypothesis.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import float_conv_avx2 as fc

SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True)
def _needs_the_kernel(require_avx2_kernel):
    require_avx2_kernel(fc.available(), "the register-tiled float convolution")


@st.composite
def convolutions(draw, integers: bool):
    """A padded input, weight, bias, groups, stride, dilation, ReLU and pool whose output has at least one pixel."""
    groups = draw(st.integers(1, 3))
    group_channels, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 35))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride, dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3))), (draw(st.integers(1, 2)),) * 2
    pool = draw(st.sampled_from([(1, 1), (2, 2), (1, 3), (3, 2)]))
    span = [dilation[a] * (kernel[a] - 1) + 1 for a in range(2)]
    size = [span[a] + stride[a] * (pool[a] - 1) + draw(st.integers(0, 7)) for a in range(2)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (draw(st.integers(1, 3)), groups * group_channels, *size)
    w_shape = (groups * per_group, group_channels, *kernel)
    if integers:
        draw_values = lambda s: rng.integers(-8, 9, size=s).astype(np.float32)  # noqa: E731
    else:
        draw_values = lambda s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return (draw_values(shape), draw_values(w_shape), draw_values(groups * per_group), groups, stride, dilation,
            draw(st.booleans()), pool)


def run(padded, weight, bias, groups, stride, dilation, relu, pool):
    expected = fc.direct_conv_float_reference(padded, weight, bias, groups, stride, dilation, relu, pool)
    out = np.full(expected.shape, np.nan, np.float32)
    fc.conv2d_into(padded, weight, bias, groups, stride, dilation, relu, pool, out)
    return out, expected


@SETTINGS
@given(convolutions(integers=False))
def test_the_tiled_conv_matches_the_reference(case):
    out, expected = run(*case)
    depth = case[1][0].size  # |sum| <= depth * max|w x| grows the rounding: scale the tolerance with it
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6 * depth * max(1.0, float(np.abs(expected).max())))


@SETTINGS
@given(convolutions(integers=True))
def test_the_tiled_conv_is_exact_on_small_integers(case):
    """Products of integers in [-8, 8] summed over at most 4 * 25 taps stay far below 2**24: every FMA is exact,
    so any wrong tap, offset, lane or pool window shows as a different integer."""
    out, expected = run(*case)
    np.testing.assert_array_equal(out, expected)


def test_packing_pads_blocks_with_zeros():
    weight = np.arange(2 * 9 * 3, dtype=np.float32).reshape(18, 3, 1, 1)
    packed = fc.pack_weights(weight, 2)  # 2 groups of 9 channels: 2 blocks of 8 (the second holds 1 channel)
    assert packed.shape == (2, 2, 3, 8)
    np.testing.assert_array_equal(packed[1, 1, :, 0], weight[17, :, 0, 0])
    assert not packed[:, 1, :, 1:].any()
    assert not fc.pack_bias(np.ones(18, np.float32), 2, 2).reshape(2, 2, 8)[:, 1, 1:].any()


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"padded": np.ones((1, 2, 5, 5))}, TypeError, "padded must be a 4-D float32 array"),
    ({"weight": np.ones((4, 3, 3, 3), np.float32)}, ValueError, "does not fit an input of 2 channels"),
    ({"bias": np.ones(3, np.float32)}, ValueError, "bias must have shape (4,)"),
    ({"out": np.ones((1, 4, 2, 2), np.float32)}, ValueError, "out must have shape (1, 4, 3, 3)"),
])
def test_bad_arguments_are_named(change, error, words):
    arguments = {"padded": np.ones((1, 2, 5, 5), np.float32), "weight": np.ones((4, 2, 3, 3), np.float32),
                 "bias": np.ones(4, np.float32), "out": np.empty((1, 4, 3, 3), np.float32)}
    arguments.update(change)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        fc.conv2d_into(arguments["padded"], arguments["weight"], arguments["bias"], 1, (1, 1), (1, 1), False,
                       (1, 1), arguments["out"])


@pytest.mark.usefixtures("avx2_switched_off")
def test_switched_off_the_kernel_is_not_available_and_refuses():
    assert not fc.available()
    with pytest.raises(RuntimeError, match="needs AVX2 and FMA"):
        fc.conv2d_into(np.ones((1, 1, 3, 3), np.float32), np.ones((9, 1, 3, 3), np.float32), np.ones(9, np.float32),
                       1, (1, 1), (1, 1), False, (1, 1), np.empty((1, 9, 1, 1), np.float32))
