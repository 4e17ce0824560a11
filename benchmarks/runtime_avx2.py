"""``benchmarks.runtime`` compiled for an AVX2-only CPU (without the cold-start rows), recorded as its own section.

The same latency tables as ``python -m benchmarks.runtime --avx2-target --no-cold-start``: nanoopt's plans compiled
for ``benchmarks.common.AVX2_TARGET`` (LLVM CPU ``skylake`` without AVX-512 or VNNI) and PyTorch on its AVX2
kernels; ONNX Runtime has no such switch and keeps the host's instructions, so its columns are not an AVX2 baseline.

    python -m benchmarks.runtime_avx2
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.common import AVX2_TARGET_OPTION

if __name__ == "__main__":
    sys.argv = [sys.argv[0], AVX2_TARGET_OPTION, "--no-cold-start"]
    runpy.run_module("benchmarks.runtime", run_name="__main__", alter_sys=True)
