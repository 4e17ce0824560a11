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

from nanoopt.float_kernels.attention_heads import qkv_heads_panels_reference
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


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 20), st.booleans(), st.integers(0, 2**16))
def test_the_causal_attention_products_match_numpy(length, heads, depth, integers, seed):
    """Scores over (at least) the causal triangle from the key panels, and the attention output from the value
    panels summing only the keys a query sees: exact on small integers, to float tolerance otherwise."""
    rng = np.random.default_rng(seed)
    draw = ((lambda *s: rng.integers(-8, 9, size=s).astype(np.float32)) if integers  # noqa: E731
            else (lambda *s: rng.normal(size=s).astype(np.float32)))  # noqa: E731
    q, k, v = draw(heads, length, depth), draw(heads, length, depth), draw(heads, length, depth)
    qkv = np.stack([q, k, v], axis=0).transpose(2, 0, 1, 3).reshape(length, 3 * heads * depth)
    queries, key_panels, value_panels = qkv_heads_panels_reference(qkv, None, heads, fg.PANEL)
    scores = np.full((heads, length, length), np.nan, np.float32)
    fg.causal_scores_into(queries, key_panels, scores)
    expected = (q.astype(np.float64) @ k.astype(np.float64).transpose(0, 2, 1)).astype(np.float32)
    lower = np.tril(np.ones((length, length), bool))
    tolerance = 0 if integers else 2e-7 * (depth + 1) * (np.abs(q) @ np.abs(k).transpose(0, 2, 1))
    assert np.all(np.abs(scores - expected)[:, lower] <= (tolerance if integers else tolerance[:, lower]))
    probabilities = np.where(lower, draw(heads, length, length), np.float32(0.0))
    out = np.full((length, heads * depth), np.nan, np.float32)
    fg.causal_attend_into(probabilities, value_panels, out)
    wanted = (probabilities.astype(np.float64) @ v.astype(np.float64)).astype(np.float32).transpose(1, 0, 2)
    bound = 0 if integers else 2e-7 * (length + 1) * (np.abs(probabilities) @ np.abs(v)).transpose(1, 0, 2)
    assert np.all(np.abs(out.reshape(length, heads, depth) - wanted) <= bound)


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
