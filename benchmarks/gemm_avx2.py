"""AVX2 int8 GEMM throughput against NumPy float32 matmul, one thread, measured in the same run.

For each shape (M, K, N), GOP/s = 2 M K N / seconds (best of several rounds) of:

* ``int8 AVX2``: :func:`nanoopt.kernels.avx2.gemm_s8s8s32_avx2_into` (sign mask: vpxor, vpmaddubsw, vpmaddwd),
  int8 (M, K) x packed int8 (N, K) -> int32 into a preallocated output;
* ``int8 VNNI``: :func:`nanoopt.kernels.avx2.gemm_s8s8s32_vnni_into` (vpdpbusd), when the CPU has AVX-VNNI;
* ``int16x8``: :func:`nanoopt.kernels.avx2.gemm_s16s8s64_packed`, int16 activations -> int64 (allocates);
* ``f32``: ``a @ w.T`` in float32 through NumPy's BLAS (allocates).

The ratio is the kernel's throughput over float32's on the same shape (above 1: faster than float32). The
weights are packed once, outside the timing, as a model would. Also reported: the first-call compile time
with an empty Numba cache and the load time from the cache, each in a fresh process.

    python -m benchmarks.gemm_avx2
    python -m benchmarks.gemm_avx2 --avx2-target   # compiled for an AVX2-only CPU (benchmarks.common.AVX2_TARGET)

``--avx2-target`` makes a newer machine (AVX-512, VNNI) run the code an AVX2-only CPU would: LLVM targets Skylake,
so no EVEX instruction, and the VNNI column disappears.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from benchmarks.common import AVX2_TARGET_OPTION, pin_environment

    pin_environment(threads=1, avx2_target=AVX2_TARGET_OPTION in sys.argv)

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import best_seconds, git_revision, machine_description  # noqa: E402
from nanoopt.kernels import avx2  # noqa: E402

SHAPES = [(1, 1024, 1024), (32, 1024, 1024), (256, 1024, 1024), (1024, 1024, 1024), (64, 4096, 4096)]
ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh process: seconds to import the module, to make the selected int8 kernel ready (available()
# compiles it and runs its self-test) and to make the int16 kernel ready (first call).
_STARTUP_PROBE = """
import time
start = time.perf_counter()
from nanoopt.kernels import avx2
imported = time.perf_counter()
assert avx2.available()
int8_ready = time.perf_counter()
import numpy as np
avx2.gemm_s16s8s64_packed(np.zeros((1, 3), np.int16), avx2.pack_weights_s16(np.zeros((2, 3), np.int8)))
int16_ready = time.perf_counter()
print(imported - start, int8_ready - imported, int16_ready - int8_ready)
"""


def startup_seconds(cache_dir: str) -> list[float]:
    """(import, int8 first call, int16 first call) seconds in a new process using ``cache_dir`` as Numba's cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _STARTUP_PROBE], env=env, capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return [float(value) for value in result.stdout.split()]


def throughput(m: int, k: int, n: int, rng: np.random.Generator) -> dict[str, float]:
    """GOP/s of the int8 kernels, the int16x8 kernel and float32 matmul for one shape."""
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)  # (M, K)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)  # (N, K)
    a16 = (a.astype(np.int16) * 256).astype(np.int16)  # (M, K) int16 activations
    a_float, w_float = a.astype(np.float32), w.astype(np.float32)
    packed8, packed16 = avx2.pack_weights_s8(w), avx2.pack_weights_s16(w)
    exact = a.astype(np.int64) @ w.T.astype(np.int64)
    out = np.empty((m, n), np.int32)  # (M, N)
    operations = 2.0 * m * k * n / 1e9
    rates = {}
    for name, kernel in int8_kernels().items():
        kernel(a, packed8.panels, n, k, out)
        assert np.array_equal(out, exact), f"{name} kernel is not exact"
        rates[name] = operations / best_seconds(lambda kernel=kernel: kernel(a, packed8.panels, n, k, out))
    assert np.array_equal(avx2.gemm_s16s8s64_packed(a16, packed16), exact * 256), "int16 kernel is not exact"
    rates["int16x8"] = operations / best_seconds(lambda: avx2.gemm_s16s8s64_packed(a16, packed16))
    rates["f32"] = operations / best_seconds(lambda: a_float @ w_float.T)
    return rates


def int8_kernels() -> dict:
    """The int8 kernels this machine can run, by column name."""
    kernels = {"int8 AVX2": avx2.gemm_s8s8s32_avx2_into}
    if avx2.target_has_avx_vnni():
        kernels["int8 VNNI"] = avx2.gemm_s8s8s32_vnni_into
    return kernels


def main() -> None:
    print(f"Machine: {machine_description()}; git {git_revision()}\n")
    if not avx2.available():
        print("AVX2 kernels not available on this machine (or disabled): nothing to measure.")
        return
    rng = np.random.default_rng(0)
    print(f"`gemm_s8s8s32_into` here is the {avx2.KERNEL_S8} kernel. GOP/s (ratio to NumPy float32):\n")
    names = [*int8_kernels(), "int16x8"]
    print("| M x K x N | " + " | ".join(names) + " | NumPy f32 |")
    print("|---" * (len(names) + 2) + "|")
    for m, k, n in SHAPES:
        rates = throughput(m, k, n, rng)
        cells = [f"{rates[name]:.0f} ({rates[name] / rates['f32']:.2f}x)" for name in names]
        print(f"| {m}x{k}x{n} | " + " | ".join(cells) + f" | {rates['f32']:.0f} |")
    with tempfile.TemporaryDirectory() as cache_dir:
        compiling = startup_seconds(cache_dir)
        cached = startup_seconds(cache_dir)
    print("\n| Numba startup (fresh process) | import | int8 kernel ready | int16 kernel ready |")
    print("|---|---|---|---|")
    print(f"| empty cache (compile) | {compiling[0]:.2f} s | {compiling[1]:.2f} s | {compiling[2]:.2f} s |")
    print(f"| warm cache (load) | {cached[0]:.2f} s | {cached[1]:.2f} s | {cached[2]:.2f} s |")


if __name__ == "__main__":
    main()
