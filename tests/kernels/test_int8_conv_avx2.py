"""The int8 register-tiled convolution (nanoopt.kernels.int8_conv_avx2) against the integer specification.

Both forms -- int16 pairs (``vpmaddwd``, AVX2) and unsigned byte quads (``vpdpbusd``, 256-bit VNNI, only where the
CPU and Numba's target have it) -- must give the codes of ``reference.quantized_conv2d`` followed by
``quantized_max_pool2d`` bit for bit, for every code the spec allows: hypothesis draws the codes from the extremes
(-128, 127, the zero points) as well as at random, with strides, dilations (the packed-lane path), padding, groups,
kernel shapes, odd sizes, batch 1, partial channel blocks, ReLU and fused pools.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import cpu_features
from nanoopt.kernels import int8_conv_avx2 as ic
from nanoopt.spec import QuantSpec

SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True)
def _needs_the_kernel(require_avx2_kernel):
    require_avx2_kernel(ic.taps_per_lane() > 0, "the int8 register-tiled convolution")


def forms() -> list[int]:
    """The forms this process may compile: pairs wherever AVX2 runs, quads only where 256-bit VNNI does."""
    return [ic.PAIRS, ic.QUADS] if cpu_features.target_has_avx_vnni() else [ic.PAIRS]


def codes(rng: np.random.Generator, shape, extremes: tuple[int, ...]) -> np.ndarray:
    """int8 codes, about half of them drawn from ``extremes`` (the saturation cases of ``vpmaddubsw``)."""
    values = rng.integers(-128, 128, size=shape)
    pick = rng.random(size=shape) < 0.5
    values[pick] = rng.choice(np.array(extremes), size=int(pick.sum()))
    return values.astype(np.int8)


@st.composite
def layers(draw, rows: bool = False):
    """An int8 conv layer, its input and a fused pool, whose (pooled) output has at least one pixel; for the row
    tiles (``rows``) at unit stride with a 2 x 2 pool."""
    groups = draw(st.integers(1, 3))
    group_channels, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 14 if rows else 35))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride, dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3))), (draw(st.integers(1, 2)),) * 2
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pool = draw(st.sampled_from([(1, 1), (2, 2), (1, 3), (3, 2)]))
    if rows:
        stride, pool = (1, 1), (2, 2)
    span = [dilation[a] * (kernel[a] - 1) + 1 - 2 * padding[a] for a in range(2)]
    size = [max(1, span[a] + stride[a] * (pool[a] - 1)) + draw(st.integers(0, 6)) for a in range(2)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x_zp, out_zp = draw(st.sampled_from([-128, 127, 0, -5])), draw(st.integers(-128, 127))
    x = codes(rng, (draw(st.integers(1, 3)), groups * group_channels, *size), (-128, 127, x_zp))
    w = codes(rng, (groups * per_group, group_channels, *kernel), (-127, 127, 0))
    w[w == -128] = -127  # narrow-range weights, as the spec's int8 weights are
    channels = groups * per_group
    bias = rng.integers(-2**20, 2**20, size=channels).astype(np.int32)
    m0 = rng.integers(2**30, 2**31, size=channels)
    shift = rng.integers(0, 16, size=channels)
    return (x, w, bias, x_zp, m0, shift, out_zp, QuantSpec(), stride, padding, dilation, groups,
            draw(st.booleans())), pool


def run(arguments: tuple, pool: tuple[int, int], per_lane: int, rows: bool = False) -> np.ndarray:
    """The layer through :func:`ic.prepare` and :func:`ic.conv_s8_into` (``rows``: ``conv_rows_s8_into``) in the
    form ``per_lane``."""
    x, w = arguments[:2]
    stride, padding, dilation, groups = arguments[8:12]
    offsets, tail = ic._checked_layer(*arguments)
    packed, constants = ic.prepare(w, groups, offsets, tail, per_lane, rows)
    shape, taps, pixels, out_h, out_w = ic.geometry(x.shape, w.shape[2:], stride, padding, dilation, w.shape[1],
                                                    per_lane, arguments[3], pool)
    out = np.full((x.shape[0], w.shape[0], out_h // pool[0], out_w // pool[1]), 99, np.int8)
    if rows:
        ic.conv_rows_s8_into(x, shape, packed, taps, constants, out)
    else:
        ic.conv_s8_into(x, shape, packed, taps, pixels, constants, out)
    return out


@SETTINGS
@given(layers())
def test_the_tiles_equal_the_specification(case):
    arguments, pool = case
    expected = ic.conv2d_s8_reference(*arguments, pool=pool)
    for per_lane in forms():
        np.testing.assert_array_equal(run(arguments, pool, per_lane), expected, err_msg=f"{per_lane} taps per lane")


@SETTINGS
@given(layers(rows=True))
def test_the_row_tiles_equal_the_specification(case):
    """Row tiles (unit stride, 2 x 2 pool; int16 pairs on every CPU): partial blocks of 6 channels, odd channel
    counts (the last pair of a block half empty), rows whose last tile covers columns past the output."""
    arguments, pool = case
    np.testing.assert_array_equal(run(arguments, pool, ic.PAIRS, rows=True), ic.conv2d_s8_reference(*arguments,
                                                                                                     pool=pool))


@pytest.mark.parametrize("x_value", [-128, 127])
@pytest.mark.parametrize("w_value", [-127, 127])
def test_extreme_codes_everywhere(x_value, w_value):
    """Every input code and every weight at an extreme, 6 -> 16 channels 5x5 as in LeNet-5: the pair sums of
    ``vpmaddubsw`` would saturate here; the tiles must not."""
    x = np.full((2, 6, 14, 14), x_value, np.int8)
    w = np.full((16, 6, 5, 5), w_value, np.int8)
    arguments = (x, w, None, 3, np.full(16, 2**30), np.full(16, 14), 0, QuantSpec(), 1, 2, 1, 1, False)
    expected = ic.conv2d_s8_reference(*arguments, pool=(2, 2))
    assert len(np.unique(expected)) > 1  # the border (zero point) and the interior differ: a real check
    for per_lane in forms():
        np.testing.assert_array_equal(run(arguments, (2, 2), per_lane), expected)
    np.testing.assert_array_equal(run(arguments, (2, 2), ic.PAIRS, rows=True), expected)


def test_packed_lanes_hold_the_neighbouring_taps():
    padded = np.array([-128, 127, -1, 0, 5], np.int8)
    pairs = ic.pack_lanes_reference(padded, 2, ic.PAIRS).view(np.int16).reshape(-1, 2)
    assert pairs[:3].tolist() == [[-128, -1], [127, 0], [-1, 5]]
    quads = ic.pack_lanes_reference(padded, 1, ic.QUADS).view(np.uint8).reshape(-1, 4)
    assert quads[0].tolist() == [0, 255, 127, 128]  # x + 128


def test_the_checked_entry_point_matches_and_names_bad_arguments():
    x = np.arange(-50, 50, dtype=np.int8).reshape(1, 1, 10, 10)
    w = np.ones((5, 1, 3, 3), np.int8)
    arguments = (x, w, None, 0, 2**30, 1, 0, QuantSpec())
    np.testing.assert_array_equal(ic.conv2d_s8(*arguments, padding=1, pool=(2, 2)),
                                  ic.conv2d_s8_reference(*arguments, padding=1, pool=(2, 2)))
    with pytest.raises(TypeError, match="x_q"):
        ic.conv2d_s8(x.astype(np.float32), *arguments[1:])
    with pytest.raises(ValueError, match="pool"):
        ic.conv2d_s8(*arguments, pool=(11, 11))


def test_packing_pads_taps_and_channels_with_zeros():
    weight = np.arange(1, 1 + 18 * 3 * 3, dtype=np.int8).reshape(18, 3, 1, 3)  # KW = 3: 2 pairs, 1 quad per row
    pairs, quads = ic.pack_weights(weight, 2, ic.PAIRS), ic.pack_weights(weight, 2, ic.QUADS)
    assert pairs.shape == (2, 2, 6, 16) and quads.shape == (2, 2, 3, 32)
    np.testing.assert_array_equal(pairs[1, 1, :2, :2].reshape(-1)[:3], weight[17, 0, 0])  # group 1, channel 8
    assert not pairs[1, 1, 1, 1] and not quads[1, 1, 0, 3]  # the taps past KW
    assert not pairs[:, 1, :, 2:].any() and not quads[:, 1, :, 4:].any()  # channels past a group's 9


def test_lanes_along_the_channels_where_they_fill_better():
    """6 input channels and 5x5 kernels (LeNet-5's second conv): 3 pairs of channels per tap, not 3 pairs of taps per
    kernel row (of which one half empty)."""
    weight = np.random.default_rng(0).integers(-127, 128, size=(16, 6, 5, 5)).astype(np.int8)
    assert ic.along_channels(weight.shape, ic.PAIRS) and ic.along_channels(weight.shape, ic.QUADS)
    assert not ic.along_channels((6, 1, 5, 5), ic.PAIRS)  # LeNet-5's first conv: pairs along its kernel rows
    pairs = ic.pack_weights(weight, 1, ic.PAIRS)  # (1, 2, 3 * 25, 16): depth (c', i, j), lanes (channel, pair)
    assert pairs.shape == (1, 2, 75, 16)
    np.testing.assert_array_equal(pairs[0, 1, 25 + 7, 2:4], weight[9, 2:4, 1, 2])  # channel 9, pair 1, tap (1, 2)


@pytest.mark.usefixtures("avx2_switched_off")
def test_switched_off_the_kernel_is_not_available_and_refuses():
    assert ic.taps_per_lane() == 0
    with pytest.raises(RuntimeError, match="needs AVX2"):
        ic.conv2d_s8(np.ones((1, 1, 3, 3), np.int8), np.ones((1, 1, 3, 3), np.int8), None, 0, 2**30, 0, 0,
                     QuantSpec())
