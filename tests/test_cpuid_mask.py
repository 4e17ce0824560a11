"""The benchmarks' CPUID mask (``benchmarks.common.mask_cpuid_to_avx2``): libraries in the process, and threads
started after it, see an AVX2-only CPU; the other features are untouched; a real crash still crashes."""

import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


pytestmark = [
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                       reason="CPUID faulting is a Linux x86-64 feature"),
    pytest.mark.skipif("cpuid_fault" not in _cpu_flags(), reason="this CPU or kernel cannot fault on CPUID"),
    pytest.mark.skipif(shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None,
                       reason="no C compiler to build benchmarks/cpuid_mask.c"),
]

MASKED = """
import ctypes, faulthandler, threading
from benchmarks import common
print(common.mask_cpuid_to_avx2())
faulthandler.enable()  # as pytest or a benchmark may do after the mask: the CPUID faults must still reach the mask
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
answers = {}
def ask():  # a thread started after the mask: it inherits the faulting
    for leaf, subleaf in ((0, 0), (1, 0), (7, 0), (7, 1)):
        out = (ctypes.c_uint32 * 4)()
        common.CPUID_LIBRARY.nanoopt_cpuid(leaf, subleaf, out)
        answers[leaf, subleaf] = list(out)
thread = threading.Thread(target=ask)
thread.start()
thread.join()
ebx7, ecx7 = answers[7, 0][1], answers[7, 0][2]
print("avx2", bool(ebx7 >> 5 & 1), "avx512f", bool(ebx7 >> 16 & 1), "avx512vnni", bool(ecx7 >> 11 & 1),
      "avxvnni", bool(answers[7, 1][0] >> 4 & 1), "fma", bool(answers[1, 0][2] >> 12 & 1))
print("vendor", answers[0, 0][0] > 0)
print("numpy", numpy_features["AVX2"], numpy_features["AVX512F"])
"""


def test_the_mask_hides_avx512_and_vnni_from_libraries_and_new_threads_and_keeps_the_rest():
    result = subprocess.run([sys.executable, "-c", MASKED], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPUID masked to AVX2"), lines
    host = _cpu_flags()
    assert lines[1] == (f"avx2 {'avx2' in host} avx512f False avx512vnni False avxvnni False "
                        f"fma {'fma' in host}")
    assert lines[2] == "vendor True"
    assert lines[3] == f"numpy {'avx2' in host} False"


def test_a_real_segmentation_fault_still_ends_the_process():
    crash = "from benchmarks import common; common.mask_cpuid_to_avx2(); import ctypes; ctypes.string_at(0)"
    result = subprocess.run([sys.executable, "-c", crash], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert result.returncode == -11  # SIGSEGV, not swallowed (nor looping) by the CPUID handler
    assert b"Fatal Python error: Segmentation fault" in result.stderr  # faulthandler's report, passed on by it
