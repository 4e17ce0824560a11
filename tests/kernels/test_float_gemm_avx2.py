"""The register-tiled float32 product by packed weights (nanoopt.kernels.float_gemm_avx2) against its reference.

Its sums run in another order than the float64 reference (k in order, one rounding per fused multiply-add), so on
real-valued data the two agree to float tolerance; on small integers every sum is exact and they agree bit for
bit. Row counts around the tile heights (6, 4, 2, 1), column counts around the 16-wide panels (partial last
panel), K = 0 and K = 1 are drawn by hypothesis.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.kernels import float_gemm_avx2 as fg

SETTINGS = settings(max_examples=80, deadline=None)


@pytest.fixture(autouse=True)
def _needs_the_kernel(require_avx2_kernel):
    require_avx2_kernel(fg.available(), "the register-tiled float product")


@st.composite
def products(draw, integers: bool):
    m, k, n = draw(st.integers(0, 27)), draw(st.integers(0, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if integers:
        return (rng.integers(-8, 9, size=(m, k)).astype(np.float32),
                rng.integers(-8, 9, size=(k, n)).astype(np.float32))
    return rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)


def run(a, weight_t):
    out = np.full((a.shape[0], weight_t.shape[1]), np.nan, np.float32)
    fg.matmul_packed_into(a, fg.pack_panels(weight_t), out)
    return out


@SETTINGS
@given(products(integers=False))
def test_the_tiled_product_matches_the_reference(case):
    a, weight_t = case
    out = run(a, weight_t)
    bound = 2e-7 * (a.shape[1] + 1) * (np.abs(a).astype(np.float64) @ np.abs(weight_t).astype(np.float64))
    assert np.all(np.abs(out - fg.matmul_reference(a, weight_t)) <= bound + 1e-30)


@SETTINGS
@given(products(integers=True))
def test_the_tiled_product_is_exact_on_small_integers(case):
    """Products of integers in [-8, 8] summed over at most 70 terms stay far below 2**24: every FMA is exact, so a
    wrong row, column, panel offset or lane shows as a different integer (and an unwritten output as NaN)."""
    a, weight_t = case
    np.testing.assert_array_equal(run(a, weight_t), fg.matmul_reference(a, weight_t))


def test_panels_pad_with_zeros():
    weight_t = np.arange(3 * 20, dtype=np.float32).reshape(3, 20)
    panels = fg.pack_panels(weight_t)
    assert panels.shape == (2, 3, 16)
    np.testing.assert_array_equal(panels[1, :, :4], weight_t[:, 16:])
    assert not panels[1, :, 4:].any()


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"a": np.ones((2, 3))}, TypeError, "a must be a 2-D float32 array"),
    ({"panels": np.ones((1, 4, 16), np.float32)}, ValueError, "panels of shape (P, 3, 16)"),
    ({"n": 17}, ValueError, "16 P >= n"),
    ({"out": np.empty((2, 4), np.float32)}, ValueError, "out must be a C-contiguous float32 array of shape (2, 5)"),
])
def test_bad_arguments_are_named(change, error, words):
    arguments = {"a": np.ones((2, 3), np.float32), "panels": fg.pack_panels(np.ones((3, 5), np.float32)), "n": 5,
                 "out": None}
    arguments.update(change)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        fg.matmul_packed(arguments["a"], arguments["panels"], arguments["n"], arguments["out"])


@pytest.mark.usefixtures("avx2_switched_off")
def test_switched_off_the_kernel_is_not_available_and_refuses():
    assert not fg.available()
    with pytest.raises(RuntimeError, match="needs AVX2 and FMA"):
        fg.matmul_packed(np.ones((1, 2), np.float32), fg.pack_panels(np.ones((2, 3), np.float32)), 3)
