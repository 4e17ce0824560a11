"""Fixtures the AVX2 kernel tests share: switching the AVX2 kernels off, the generic LLVM target, skip-or-fail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoopt.kernels import avx2, cpu_features, float_conv_avx2, float_gemm_avx2, int8_conv_avx2, sparse_avx2

REPO_ROOT = Path(__file__).resolve().parents[2]


def _forget_availability() -> None:
    avx2.available.cache_clear()
    sparse_avx2.available.cache_clear()
    float_conv_avx2.available.cache_clear()
    float_gemm_avx2.available.cache_clear()
    int8_conv_avx2.taps_per_lane.cache_clear()


@pytest.fixture
def avx2_switched_off(monkeypatch):
    """``NANOOPT_DISABLE_AVX2=1`` for one test; the AVX2 modules forget their cached answer before and after."""
    _forget_availability()
    monkeypatch.setenv(cpu_features.DISABLE_ENV, "1")
    try:
        yield
    finally:
        monkeypatch.delenv(cpu_features.DISABLE_ENV)
        _forget_availability()


@pytest.fixture
def on_generic_target():
    """Run Python ``code`` in a fresh process under ``NUMBA_CPU_NAME=generic`` (no x86 extension for LLVM, which
    would abort the process on an x86 intrinsic); return its stdout, failing the test if the process failed."""

    def run(code: str, timeout: int = 300) -> str:
        environment = dict(os.environ, NUMBA_CPU_NAME="generic", PYTHONPATH=str(REPO_ROOT))
        environment.pop(cpu_features.DISABLE_ENV, None)
        result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, result.stderr
        return result.stdout

    return run


def _require_avx2_kernel(available: bool, what: str) -> None:
    if available:
        return
    if cpu_features.target_has_avx2() and not cpu_features.switched_on(cpu_features.DISABLE_ENV):
        pytest.fail(f"the target has AVX2 but {what} failed its self-test (wrong result or no compile)")
    pytest.skip(f"{what} not available here (CPU or NUMBA_CPU_NAME/FEATURES without avx2, or "
                f"{cpu_features.DISABLE_ENV} set)")


@pytest.fixture(scope="session")
def require_avx2_kernel():
    """``require(available, what)``: skip when this machine (or Numba's target) cannot run the AVX2 kernel
    ``what``; a failed self-test on an AVX2 target is a failure, not a skip: a wrong kernel must not hide."""
    return _require_avx2_kernel
