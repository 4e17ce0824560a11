"""``benchmarks.chargpt`` as an AVX2-only machine runs it (issue 17's PyTorch figures were measured on one),
recorded as its own section.

The same table as ``python -m benchmarks.chargpt --avx2-target``: Numba compiles for ``benchmarks.common.AVX2_TARGET``
(LLVM CPU ``skylake`` without AVX-512 or VNNI), PyTorch runs its AVX2 kernels and CPUID reports an AVX2-only CPU to
NumPy, OpenBLAS and PyTorch (``benchmarks.common.mask_cpuid_to_avx2``).

    python -m benchmarks.chargpt_avx2
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.common import AVX2_TARGET_OPTION

if __name__ == "__main__":
    sys.argv = [sys.argv[0], AVX2_TARGET_OPTION]
    runpy.run_module("benchmarks.chargpt", run_name="__main__", alter_sys=True)
