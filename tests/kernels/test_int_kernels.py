"""Every integer-kernel backend equals the NumPy reference bit for bit, and fails the same way on bad input.

One test class runs once per backend through the dispatch point (``nanoopt.kernels``): ``numba`` (portable
kernels), ``avx2`` (skipped where the CPU/target lacks it) and ``auto``. Inputs are drawn by hypothesis with
the extremes forced in: rows of -128, weights of +-127 (and -128 where the backend allows it), zero points
at both ends of the range, int16 limits, M = 1, K = 1, odd sizes, long K.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanoopt.kernels as kernels
from nanoopt.kernels import numba_conv, numba_cpu, numba_gemm
from nanoopt.kernels import reference as ref
from nanoopt.spec import QuantSpec, quantize_multiplier

SETTINGS = settings(max_examples=25, deadline=None)
# The backend fixture only selects the backend for the whole test: nothing in it needs resetting per example.
BACKEND_SETTINGS = settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])
INT8 = QuantSpec()
INT16 = QuantSpec(bits=16)
BACKENDS = [
    "numba",
    pytest.param("avx2", marks=pytest.mark.skipif(not kernels.avx2_available(), reason="no AVX2 kernels here")),
    "auto",
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with kernels.use_backend(request.param):
        yield request.param


def draw_array(data, rng, shape, low, high, dtype):
    """Random values with whole rows/columns pinned to the extremes now and then."""
    values = rng.integers(low, high + 1, size=shape)
    style = data.draw(st.sampled_from(["random", "low rows", "high rows", "extremes"]))
    if style == "low rows":
        values[: max(1, shape[0] // 2)] = low
    elif style == "high rows":
        values[..., :1] = high
    elif style == "extremes":
        values = np.where(rng.random(shape) < 0.5, low, high)
    return values.astype(dtype)


def draw_requant(data, rng, channels: int, per_channel: bool, low: float, high: float):
    real = rng.uniform(low, high, size=channels) if per_channel else data.draw(st.floats(low, high))
    return quantize_multiplier(real)


shapes = st.tuples(
    st.one_of(st.integers(1, 9), st.just(1)),
    st.one_of(st.integers(1, 40), st.sampled_from([1, 257, 1000])),
    st.integers(1, 19),
)


def seeded(data) -> np.random.Generator:
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))


def linear_input(data, shape, low: int, high: int, dtype):
    """``(rng, x, m, k, n)``: a generator seeded by hypothesis and the input ``x (M, K)`` of a drawn linear case."""
    m, k, n = shape
    rng = seeded(data)
    return rng, draw_array(data, rng, (m, k), low, high, dtype), m, k, n


class TestBackendMatchesReference:
    @BACKEND_SETTINGS
    @given(shape=shapes, data=st.data())
    def test_int8_linear(self, backend, shape, data):
        rng, x, m, k, n = linear_input(data, shape, -128, 127, np.int8)
        weight_low = -127 if backend == "avx2" else -128
        w = draw_array(data, rng, (n, k), weight_low, 127, np.int8)
        bias = rng.integers(-(2**20), 2**20, size=n).astype(np.int32) if data.draw(st.booleans()) else None
        x_zp = data.draw(st.sampled_from([-128, 127, 0, int(rng.integers(-128, 128))]))
        out_zp = data.draw(st.sampled_from([-128, 127, 0]))
        low, high = data.draw(st.sampled_from([(1e-5, 0.05), (1e-13, 1e-9), (0.5, 3.0)]))  # right, long, left shifts
        m0, shift = draw_requant(data, rng, n, data.draw(st.booleans()), low, high)
        relu = data.draw(st.booleans())
        expected = ref.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, INT8, relu)
        layer = kernels.prepare_linear(w, bias, x_zp, m0, shift, out_zp, INT8, relu)
        np.testing.assert_array_equal(layer(x), expected)
        np.testing.assert_array_equal(
            kernels.quantized_linear(x, w, bias, x_zp, m0, shift, out_zp, INT8, relu), expected
        )
        np.testing.assert_array_equal(kernels.gemm_s8s8s32(x, w, x_zp), ref.gemm_s8s8s32(x, w, x_zp))

    @BACKEND_SETTINGS
    @given(shape=shapes, data=st.data())
    def test_int16_linear_and_gemms(self, backend, shape, data):
        rng, x, m, k, n = linear_input(data, shape, -32768, 32767, np.int16)
        w8 = draw_array(data, rng, (n, k), -128, 127, np.int8)
        w16 = draw_array(data, rng, (n, k), -32768, 32767, np.int16)
        bias = rng.integers(-(2**40), 2**40, size=n).astype(np.int64)
        out_zp = data.draw(st.sampled_from([-32768, 32767, 0]))
        m0, shift = draw_requant(data, rng, n, data.draw(st.booleans()), 1e-9, 1e-3)
        for w in (w8, w16):
            expected = ref.quantized_linear(x, w, bias, 0, m0, shift, out_zp, INT16, relu=True)
            layer = kernels.prepare_linear(w, bias, 0, m0, shift, out_zp, INT16, relu=True, x_dtype=np.int16)
            if backend == "avx2" and w.dtype == np.int16:  # forced, but the AVX2 kernels take int8 weights
                with pytest.raises(RuntimeError, match="int16 weights"):
                    layer(x)
                continue
            np.testing.assert_array_equal(layer(x), expected)
        np.testing.assert_array_equal(kernels.gemm_s16s8s64(x, w8), ref.gemm_s16s8s64(x, w8))
        if backend != "avx2":
            np.testing.assert_array_equal(kernels.gemm_s16s16s64(x, w16), ref.gemm_s16s16s64(x, w16))

    @BACKEND_SETTINGS
    @given(data=st.data())
    def test_conv2d(self, backend, data):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        groups = data.draw(st.sampled_from([1, 2, 3]))
        group_channels, per_group = data.draw(st.integers(1, 5)), data.draw(st.sampled_from([1, 2, 4, 5, 9]))
        kh, kw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        stride = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
        dilation = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
        padding = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
        height = data.draw(st.integers(dilation[0] * (kh - 1) + 1, 12))
        width = data.draw(st.integers(dilation[1] * (kw - 1) + 1, 12))
        batch = data.draw(st.integers(1, 3))
        x = draw_array(data, rng, (batch, groups * group_channels, height, width), -128, 127, np.int8)
        weight_low = -127 if backend == "avx2" and per_group >= 4 else -128
        w = draw_array(data, rng, (groups * per_group, group_channels, kh, kw), weight_low, 127, np.int8)
        bias = rng.integers(-(2**16), 2**16, size=w.shape[0]).astype(np.int32)
        x_zp = data.draw(st.sampled_from([-128, 127, 0, int(rng.integers(-128, 128))]))
        m0, shift = draw_requant(data, rng, w.shape[0], data.draw(st.booleans()), 1e-4, 0.1)
        relu = data.draw(st.booleans())
        args = (bias, x_zp, m0, shift, 7, INT8, stride, padding, dilation, groups, relu)
        expected = ref.quantized_conv2d(x, w, *args)
        if backend == "avx2" and per_group < 4:
            with pytest.raises(RuntimeError, match="depthwise"):
                kernels.prepare_conv2d(w, *args)(x)
            return
        np.testing.assert_array_equal(kernels.prepare_conv2d(w, *args)(x), expected)
        np.testing.assert_array_equal(kernels.quantized_conv2d(x, w, *args), expected)
        if backend == "numba":  # both Numba conv paths on every drawn layer: the thin direct loop and the tiles
            layer = kernels.prepare_conv2d(w, *args)
            for thin in (True, False):
                layer.plan.thin = thin
                np.testing.assert_array_equal(layer(x), expected, err_msg=f"thin={thin}")

    @BACKEND_SETTINGS
    @given(data=st.data())
    def test_int16_conv2d(self, backend, data):
        if backend == "avx2":
            pytest.skip("the AVX2 conv path is int8")
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        per_group = data.draw(st.sampled_from([1, 4, 6]))
        x = draw_array(data, rng, (2, 3, 6, 7), -32768, 32767, np.int16)
        dtype = data.draw(st.sampled_from([np.int8, np.int16]))
        info = np.iinfo(dtype)
        w = draw_array(data, rng, (per_group, 3, 3, 2), info.min, info.max, dtype)
        bias = rng.integers(-(2**40), 2**40, size=per_group).astype(np.int64)
        m0, shift = draw_requant(data, rng, per_group, True, 1e-10, 1e-4)
        args = (bias, 0, m0, shift, -3, INT16, 2, 1, 1, 1, True)
        np.testing.assert_array_equal(kernels.quantized_conv2d(x, w, *args), ref.quantized_conv2d(x, w, *args))

    @BACKEND_SETTINGS
    @given(data=st.data())
    def test_pools_add_relu(self, backend, data):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        spec = data.draw(st.sampled_from([INT8, INT16]))
        x = draw_array(data, rng, (2, 3, 7, 6), spec.qmin, spec.qmax, spec.dtype)
        kernel = data.draw(st.integers(1, 3))
        stride = data.draw(st.sampled_from([None, 1, 2]))
        padding = data.draw(st.integers(0, kernel // 2))
        zp = data.draw(st.sampled_from([spec.qmin, spec.qmax, 0]))
        include_pad = data.draw(st.booleans())
        np.testing.assert_array_equal(
            kernels.quantized_max_pool2d(x, kernel, stride, padding),
            ref.quantized_max_pool2d(x, kernel, stride, padding),
        )
        np.testing.assert_array_equal(
            kernels.quantized_avg_pool2d(x, zp, kernel, stride, padding, include_pad),
            ref.quantized_avg_pool2d(x, zp, kernel, stride, padding, include_pad),
        )
        y = draw_array(data, rng, x.shape, spec.qmin, spec.qmax, spec.dtype)
        scales = [np.float32(data.draw(st.floats(1e-4, 10.0))) for _ in range(3)]
        zps = [data.draw(st.sampled_from([spec.qmin, spec.qmax, 0])) for _ in range(3)]
        relu = data.draw(st.booleans())
        args = (x, scales[0], zps[0], y, scales[1], zps[1], scales[2], zps[2], spec, relu)
        np.testing.assert_array_equal(kernels.quantized_add(*args), ref.quantized_add(*args))
        np.testing.assert_array_equal(kernels.quantized_relu(x, zp), ref.quantized_relu(x, zp))

    def test_large_product_runs_threaded_path(self, backend):
        rng = np.random.default_rng(7)
        x = rng.integers(-128, 128, size=(150, 300)).astype(np.int8)
        w = rng.integers(-127, 128, size=(130, 300)).astype(np.int8)  # 2*M*N*K > PARALLEL_MIN_OPS
        m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-3, size=130))
        expected = ref.quantized_linear(x, w, None, -3, m0, shift, 4, INT8)
        np.testing.assert_array_equal(kernels.prepare_linear(w, None, -3, m0, shift, 4, INT8)(x), expected)
        x16 = rng.integers(-32768, 32768, size=(150, 300)).astype(np.int16)
        m0_16, shift_16 = quantize_multiplier(rng.uniform(1e-7, 1e-6, size=130))
        expected16 = ref.quantized_linear(x16, w, None, 0, m0_16, shift_16, 0, INT16)
        layer16 = kernels.prepare_linear(w, None, 0, m0_16, shift_16, 0, INT16, x_dtype=np.int16)
        np.testing.assert_array_equal(layer16(x16), expected16)
        conv_x = rng.integers(-128, 128, size=(4, 16, 20, 20)).astype(np.int8)
        conv_w = rng.integers(-127, 128, size=(32, 16, 3, 3)).astype(np.int8)
        m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-3, size=32))
        args = (None, 5, m0, shift, 0, INT8, 1, 1, 1, 1, True)
        np.testing.assert_array_equal(
            kernels.quantized_conv2d(conv_x, conv_w, *args), ref.quantized_conv2d(conv_x, conv_w, *args)
        )

    def test_overflow_guard(self, backend):
        k = 70_000  # the exact int8 accumulator can exceed int32: 70000 * 255 * 127 > 2^31
        w = np.full((2, k), -127, dtype=np.int8)
        x = np.full((1, k), -128, dtype=np.int8)
        with pytest.raises(kernels.AccumulatorOverflowError, match="overflow int32"):
            kernels.gemm_s8s8s32(x, w, 127)
        m0, shift = quantize_multiplier(5e-8)
        expected = ref.quantized_linear(x, w, None, 127, m0, shift, 0, INT8)
        assert int(expected[0, 0]) == round(k * 255 * 127 * 5e-8) == 113
        np.testing.assert_array_equal(kernels.quantized_linear(x, w, None, 127, m0, shift, 0, INT8), expected)

    @pytest.mark.parametrize(
        "change, error, match",
        [
            ({"x": np.zeros((2, 3), np.float32)}, TypeError, "x_q"),
            ({"x": np.zeros((3, 2), np.int8).T}, ValueError, "C-contiguous"),
            ({"x": np.zeros((2, 4), np.int8)}, ValueError, "K"),
            ({"w": np.zeros((4, 3), np.float64)}, TypeError, "w_q"),
            ({"bias": np.zeros(4, np.int64)}, TypeError, "bias_q"),
            ({"bias": np.zeros(5, np.int32)}, ValueError, "bias_q"),
            ({"x_zp": 128}, ValueError, "x_zero_point"),
            ({"x_zp": 1.5}, TypeError, "x_zero_point"),
            ({"out_zp": -129}, ValueError, "out_zero_point"),
            ({"m0": 2**31}, ValueError, "m0"),
            ({"m0": np.full(3, 2**30)}, ValueError, "m0"),
            ({"shift": 70}, ValueError, "shift"),
            ({"spec": QuantSpec(signed=False)}, ValueError, "out_spec"),
            ({"x": np.zeros((2, 3), np.int16)}, ValueError, "x_zero_point"),
        ],
    )
    def test_bad_linear_input(self, backend, change, error, match):
        arguments = {"x": np.zeros((2, 3), np.int8), "w": np.zeros((4, 3), np.int8), "bias": np.zeros(4, np.int32),
                     "x_zp": 1, "m0": 2**30, "shift": 1, "out_zp": 0, "spec": INT8}  # fmt: skip
        arguments.update(change)
        values = list(arguments.values())
        with pytest.raises(error, match=match):
            kernels.quantized_linear(*values)
        with pytest.raises(error, match=match):
            ref.quantized_linear(*values)

    def test_bad_conv_and_pool_input(self, backend):
        x = np.zeros((1, 4, 5, 5), np.int8)
        w = np.zeros((8, 2, 3, 3), np.int8)
        with pytest.raises(ValueError, match="groups"):
            kernels.quantized_conv2d(x, w, None, 0, 2**30, 0, 0, INT8)  # 4 channels, weights expect 2
        with pytest.raises(ValueError, match="does not fit"):
            kernels.quantized_conv2d(x, w, None, 0, 2**30, 0, 0, INT8, dilation=3, groups=2)
        layer = kernels.prepare_conv2d(w, None, 0, 2**30, 0, 0, INT8, groups=2)
        with pytest.raises(TypeError, match="int8"):
            layer(x.astype(np.int16))
        with pytest.raises(ValueError, match="padding"):
            kernels.quantized_max_pool2d(x, 2, padding=2)
        with pytest.raises(TypeError, match="a_q"):
            kernels.quantized_add(x.astype(np.float32), 1.0, 0, x, 1.0, 0, 1.0, 0, INT8)
        with pytest.raises(ValueError, match="a_scale"):
            kernels.quantized_add(x, 0.0, 0, x, 1.0, 0, 1.0, 0, INT8)
        with pytest.raises(ValueError, match="same shape"):
            kernels.quantized_add(x, 1.0, 0, x[:, :2].copy(), 1.0, 0, 1.0, 0, INT8)


# ------------------------------------------------------------------------------------------- dispatch
def test_backend_choice_and_forcing():
    good = np.full((8, 16), 127, np.int8)
    bad = good.copy()
    bad[0, 0] = -128
    layer_good = kernels.prepare_linear(good, None, 0, 2**30, 0, 0, INT8)
    layer_bad = kernels.prepare_linear(bad, None, 0, 2**30, 0, 0, INT8)
    assert layer_good.backend_for() == ("avx2" if kernels.avx2_available() else "numba")
    assert layer_bad.backend_for() == "numba"
    with kernels.use_backend("avx2"):
        with pytest.raises(RuntimeError, match="-128|not available"):
            layer_bad(np.zeros((1, 16), np.int8))
    with kernels.use_backend("reference"):
        assert layer_bad.backend_for() == "reference"
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("gpu")


def test_disabled_avx2_falls_back_in_a_fresh_process():
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, nanoopt.kernels as k; from nanoopt.spec import QuantSpec;"
        "l = k.prepare_linear(np.ones((8, 4), np.int8), None, 0, 2**30, 0, 0, QuantSpec());"
        "print(k.avx2_available(), l.backend_for(), l(np.ones((2, 4), np.int8)).tolist())"
    )
    env = dict(os.environ, NANOOPT_DISABLE_AVX2="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["False", "numba"]


# ------------------------------------------------------------------------------- Numba building blocks
@SETTINGS
@given(values=st.lists(st.integers(-32768, 32767), min_size=1, max_size=50))
def test_split_bytes_recombines(values):
    array = np.array(values, dtype=np.int16)
    high, low = numba_gemm.split_bytes(array)
    np.testing.assert_array_equal(256 * high.astype(np.int64) + low + numba_gemm.BYTE_OFFSET, array)


@SETTINGS
@given(data=st.data())
def test_finish_products_matches_reference_epilogue(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    m, k, n = data.draw(shapes)
    x = draw_array(data, rng, (m, k), -128, 127, np.int8)
    w = draw_array(data, rng, (n, k), -128, 127, np.int8)
    m0, shift = draw_requant(data, rng, n, True, 1e-4, 2.0)  # includes left shifts (multiplier >= 1)
    bias = rng.integers(-1000, 1000, size=n).astype(np.int32)
    plan = numba_cpu.LinearPlan(w, bias, -9, m0, shift, 1, INT8, relu=False)
    products = (x.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(plan.finish(products), ref.quantized_linear(x, w, bias, -9, m0, shift, 1, INT8))


@SETTINGS
@given(data=st.data())
def test_conv_im2col_rows_match_reference(data):
    """The NHWC im2col rows (contiguous-run and general paths) equal the reference im2col."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    groups, channels = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    x = rng.integers(-128, 128, size=(2, groups * channels, 6, 5)).astype(np.int8)
    w = rng.integers(-128, 128, size=(4 * groups, channels, 2, 3)).astype(np.int8)
    stride, padding = data.draw(st.sampled_from([(1, 1), (2, 1)])), data.draw(st.sampled_from([(1, 0), (0, 1)]))
    dilation = data.draw(st.sampled_from([(1, 1), (1, 2)]))
    m0, shift = quantize_multiplier(rng.uniform(1e-3, 1e-1, size=4 * groups))
    args = (None, 3, m0, shift, -2, INT8, stride, padding, dilation, groups, True)
    plan = numba_cpu.Conv2dPlan(w, *args)
    batch, _, out_h, out_w = plan.output_shape(x)
    padded = plan.pad(x)
    expected = ref.im2col(x, (2, 3), stride, padding, dilation, 3)  # (N, C, KH, KW, OH, OW)
    conv = plan.conv_tuple(out_h, out_w)
    for group in range(groups):
        block = expected[:, group * channels : (group + 1) * channels]  # (N, c, kh, kw, OH, OW)
        for n in range(batch):
            cols = np.empty((out_h * out_w, plan.depth), np.int8)
            numba_conv.im2col_rows(padded, 0, n, group * channels, channels, conv, 0, out_h * out_w, cols)
            np.testing.assert_array_equal(cols, block[n].transpose(3, 4, 1, 2, 0).reshape(cols.shape))
