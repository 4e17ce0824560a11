"""``benchmarks.runtime`` compiled for an AVX2-only CPU (without the cold-start rows), recorded as its own section.

The same latency tables as ``python -m benchmarks.runtime --avx2-target --no-cold-start``: nanoopt's plans compiled
for ``benchmarks.common.AVX2_TARGET`` (LLVM CPU ``skylake`` without AVX-512 or VNNI) and PyTorch on its AVX2
kernels; CPUID reports an AVX2-only CPU to the whole process (``benchmarks.common.mask_cpuid_to_avx2``, where Linux
can fault on CPUID, as the machine line says), so ONNX Runtime, NumPy and OpenBLAS run their AVX2 code too.

    python -m benchmarks.runtime_avx2
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.common import AVX2_TARGET_OPTION

if __name__ == "__main__":
    sys.argv = [sys.argv[0], AVX2_TARGET_OPTION, "--no-cold-start"]
    runpy.run_module("benchmarks.runtime", run_name="__main__", alter_sys=True)
