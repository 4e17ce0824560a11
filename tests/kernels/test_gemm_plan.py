"""GemmPlanS8 equals the reference int8 GEMM bit for bit on every backend that can run it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt import kernels
from nanoopt.kernels import reference
from nanoopt.kernels.gemm_plan import GemmPlanS8

BACKENDS = ["reference", "numba", "auto"] + (["avx2"] if kernels.avx2_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(0, 140), n=st.integers(1, 40), k=st.integers(1, 300),
       zero=st.integers(-128, 127), narrow=st.booleans())
def test_gemm_plan_equals_the_reference(backend, seed, m, n, k, zero, narrow):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    w = rng.integers(-127 if narrow else -128, 128, size=(n, k)).astype(np.int8)
    if backend == "avx2" and not narrow:
        w[w == -128] = -127
    plan = GemmPlanS8(w, zero)
    with kernels.use_backend(backend):
        out = plan(a)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, reference.gemm_s8s8s32(a, w, zero))


def test_gemm_plan_refuses_bad_input():
    plan = GemmPlanS8(np.ones((2, 3), np.int8), 0)
    with pytest.raises(TypeError, match="int8 codes"):
        plan(np.ones((1, 4), np.int8))
    with pytest.raises(TypeError, match="int8 codes"):
        plan(np.ones((1, 3), np.int16))
    with pytest.raises(ValueError, match="a_zero_point"):
        GemmPlanS8(np.ones((2, 3), np.int8), 300)
