"""``benchmarks.int_kernels`` compiled for an AVX2-only CPU, recorded as a section of its own.

The same tables as ``python -m benchmarks.int_kernels --avx2-target``: Numba compiles for
``benchmarks.common.AVX2_TARGET`` (LLVM CPU ``skylake`` without AVX-512 or VNNI, so the code is what an AVX2-only
machine runs) and PyTorch runs its AVX2 kernels (``benchmarks.common.AVX2_BASELINES``), both in the same run. The
speed of a real AVX2-only core differs from this emulation on a newer one; the ratios compare like with like.

    python -m benchmarks.int_kernels_avx2
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.common import AVX2_TARGET_OPTION

if __name__ == "__main__":
    sys.argv = [sys.argv[0], AVX2_TARGET_OPTION]
    runpy.run_module("benchmarks.int_kernels", run_name="__main__", alter_sys=True)
