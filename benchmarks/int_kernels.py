"""Quantized int8 layers (requantization included) against NumPy float32 on the same shapes, same run.

For each thread count (1, then 2; each in its own pinned process, see ``benchmarks/common.py``):

* **linear** ``(M, K, N)``: a prepared :func:`nanoopt.kernels.prepare_linear` layer -- int8 codes in, int8
  codes out: GEMM, zero-point fold, int32 bias, per-channel requantization -- on the ``auto`` backend and on the
  portable ``numba`` backend, against NumPy's ``x @ w.T`` in float32 (the weights pre-transposed, as a float
  layer would hold them). ``auto`` runs the x86 GEMM chosen at run time (:func:`nanoopt.kernels.int8_gemm_kernel`,
  printed above the table): where the CPU has AVX-512F/BW/VNNI the 512-bit ``vpdpbusd`` kernel of
  :mod:`nanoopt.kernels.avx512`, which requantizes in registers and writes int8 directly; else AVX-VNNI or AVX2
  (:mod:`nanoopt.kernels.avx2`) with the Numba epilogue; ``NANOOPT_CPU_FEATURES=avx2`` (or
  ``avx2,avx512vnni,avx512vl``) measures the 256-bit kernels on the same machine;
* **linear, 7-bit activations** (same shapes, a second table): the same prepared layer on int8 codes in [-64, 63]
  (PyTorch's ``reduce_range`` grid, as its x86 default qconfig uses), where the ``auto`` AVX2 path of a CPU without
  VNNI takes the 3-instruction 7-bit tile (:func:`nanoopt.kernels.avx2.gemm_s8s8s32_avx2_auto_into`, range checked
  per call), beside the same layer on full-range codes and PyTorch's int8 Linear on the same 7-bit codes as quint8
  (``codes + 64`` in [0, 127], zero point 64); elsewhere (VNNI, AVX-512) the codes do not change the kernel;
* **conv2d** N=1 and N=32, C=32, 28x28, 3x3, OC=64, padding 1: a prepared
  :func:`nanoopt.kernels.prepare_conv2d` layer against NumPy float32 im2col (``sliding_window_view`` + one
  copy) + matmul, output NCHW.

GOP/s = 2 M K N / best time (:func:`benchmarks.common.best_seconds`); "x f32" is the float32 time over the
int8 time (above 1: int8 is faster). Threads are pinned through the environment before NumPy loads
(OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS), OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed. Also: the first
call's compile time with an empty Numba cache and the time with a warm cache, each in a fresh process.
When ``torch`` is installed, its int8 layers (``torch.ao.nn.quantized.Linear`` / ``Conv2d``: quint8 activations,
per-channel qint8 weights, requantized quint8 output, the default x86/fbgemm engine) are timed on the same
shapes and thread count as an extra column; ONNX Runtime is not measured here.

With ``--avx2-target`` Numba compiles for an AVX2-only CPU (LLVM CPU ``skylake``, no AVX-512, no VNNI:
:data:`benchmarks.common.AVX2_TARGET`), so that a newer machine runs the code an AVX2-only one would, EVEX-free,
with the AVX2 kernels chosen, and PyTorch runs its AVX2 kernels (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` and the
like, :data:`benchmarks.common.AVX2_BASELINES`); ``NANOOPT_CPU_FEATURES=avx2`` alone only narrows nanoopt's
choice while LLVM still uses the host's AVX-512 encodings.

    python -m benchmarks.int_kernels               # both thread counts and the startup times
    python -m benchmarks.int_kernels --threads 2   # one thread count
    python -m benchmarks.int_kernels --threads 1 --avx2-target   # as on an AVX2-only CPU
"""

from __future__ import annotations

import sys

_THREADS = None  # set when run as `python -m benchmarks.int_kernels --threads T`: measure with T threads
_AVX2_TARGET = False  # set by --avx2-target: compile for an AVX2-only CPU
if __name__ == "__main__":
    import os

    from benchmarks.common import AVX2_BASELINES, AVX2_TARGET, AVX2_TARGET_OPTION, pin_environment

    _AVX2_TARGET = AVX2_TARGET_OPTION in sys.argv
    if "--threads" in sys.argv:
        _THREADS = int(sys.argv[sys.argv.index("--threads") + 1])
        pin_environment(threads=_THREADS, avx2_target=_AVX2_TARGET)
    elif _AVX2_TARGET:  # before Numba reads its configuration: the startup probes inherit it
        os.environ.update(AVX2_TARGET)
        os.environ.update(AVX2_BASELINES)

import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import (  # noqa: E402
    AVX2_TARGET_OPTION,
    best_seconds,
    best_seconds_interleaved,
    git_revision,
    machine_description,
)

LINEAR_SHAPES = [(1, 1024, 1024), (32, 1024, 1024), (256, 1024, 1024), (1024, 1024, 1024), (64, 4096, 4096)]
CONV_BATCHES = [1, 32]
CONV = {"channels": 32, "size": 28, "kernel": 3, "out_channels": 64, "padding": 1}
ROOT = Path(__file__).resolve().parent.parent


def linear_layer(m: int, k: int, n: int, rng: np.random.Generator):
    """A random int8 layer and input: narrow-range weights, int32 bias, per-channel multipliers."""
    import nanoopt.kernels as kernels
    from nanoopt.spec import QuantSpec, quantize_multiplier

    x = rng.integers(-128, 128, size=(m, k)).astype(np.int8)  # (M, K)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)  # (N, K)
    bias = rng.integers(-(2**16), 2**16, size=n).astype(np.int32)
    m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-3, size=n))
    return x, w, kernels.prepare_linear(w, bias, -3, m0, shift, 5, QuantSpec(), relu=True)


def conv_layer(batch: int, rng: np.random.Generator):
    import nanoopt.kernels as kernels
    from nanoopt.spec import QuantSpec, quantize_multiplier

    c, size, kernel, oc = CONV["channels"], CONV["size"], CONV["kernel"], CONV["out_channels"]
    x = rng.integers(-128, 128, size=(batch, c, size, size)).astype(np.int8)  # (N, C, H, W)
    w = rng.integers(-127, 128, size=(oc, c, kernel, kernel)).astype(np.int8)  # (OC, C, KH, KW)
    m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-3, size=oc))
    layer = kernels.prepare_conv2d(w, None, -3, m0, shift, 5, QuantSpec(), padding=CONV["padding"], relu=True)
    return x, w, layer


def float_conv(x: np.ndarray, w: np.ndarray, padding: int) -> np.ndarray:
    """NumPy float32 convolution: im2col (strided view + one copy) then one matmul; NCHW output."""
    batch, channels = x.shape[:2]
    out_channels, _, kh, kw = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))  # (N, C, OH, OW, KH, KW)
    out_h, out_w = windows.shape[2], windows.shape[3]
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(batch * out_h * out_w, channels * kh * kw)  # copies
    return (cols @ w.reshape(out_channels, -1).T).reshape(batch, out_h, out_w, out_channels).transpose(0, 3, 1, 2)


def torch_int8_linear(x: np.ndarray, w: np.ndarray, seven_bit: bool = False):
    """A callable running PyTorch's static int8 Linear on the same shapes, or None without torch. With
    ``seven_bit``, the input is ``x`` itself (codes in [-64, 63]) as quint8 codes ``x + 64`` with zero point 64."""
    try:
        import torch
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    n, k = w.shape
    layer = torch.ao.nn.quantized.Linear(k, n, dtype=torch.qint8)
    scales = torch.full((n,), 0.01, dtype=torch.float64)
    weight = torch.quantize_per_channel(torch.from_numpy(w.astype(np.float32) * 0.01), scales,
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    layer.set_weight_bias(weight, torch.zeros(n))
    layer.scale, layer.zero_point = 0.5, 3
    qx = torch.quantize_per_tensor(torch.from_numpy(x.astype(np.float32) * 0.05), 0.05, 0, torch.quint8)
    if seven_bit:
        codes = torch.from_numpy((x.astype(np.int16) + 64).astype(np.uint8))  # quint8 [0, 127]: reduce_range
        qx = torch._make_per_tensor_quantized_tensor(codes, 0.05, 64)
    return lambda: layer(qx)


def torch_int8_conv(x: np.ndarray, w: np.ndarray, padding: int):
    """A callable running PyTorch's static int8 Conv2d on the same shapes, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    out_channels, channels, kh, kw = w.shape
    layer = torch.ao.nn.quantized.Conv2d(channels, out_channels, (kh, kw), padding=padding)
    weight = torch.quantize_per_channel(torch.from_numpy(w.astype(np.float32) * 0.01),
                                        torch.full((out_channels,), 0.01, dtype=torch.float64),
                                        torch.zeros(out_channels, dtype=torch.long), 0, torch.qint8)
    layer.set_weight_bias(weight, torch.zeros(out_channels))
    layer.scale, layer.zero_point = 0.5, 3
    qx = torch.quantize_per_tensor(torch.from_numpy(x.astype(np.float32) * 0.05), 0.05, 0, torch.quint8)
    return lambda: layer(qx)


def torch_on_threads(threads: int) -> None:
    """PyTorch's intra-op threads set to ``threads`` (nothing where torch is absent)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def torch_seconds(functions: list, threads: int) -> list[float | None]:
    """Best seconds of each PyTorch callable (None where torch is absent), with ``threads`` intra-op threads."""
    if all(function is None for function in functions):
        return [None] * len(functions)
    torch_on_threads(threads)
    return [best_seconds(function) if function is not None else None for function in functions]


def _ratio(reference: float, seconds: float | None) -> str:
    return f"{reference / seconds:.2f}x" if seconds else "-"


def time_layers(cases: list, torch_cases: list, threads: int) -> list[tuple[float, float, float, float | None]]:
    """(auto, numba, float32, PyTorch) best seconds per case ``(int8 layer, int8 input, float32 function)`` and
    PyTorch callable (None where torch is absent).

    On one thread auto, float32 and PyTorch run in turns (:func:`benchmarks.common.best_seconds_interleaved`), so
    that a passing disturbance weighs on all of them (numba, the portable fallback, runs by itself before). With
    2 threads on 2 cores, all int8 timings run first, then (after a pause)
    all float32 ones, then PyTorch's: worker threads that keep spinning after a Numba or OpenBLAS parallel region
    would otherwise slow the other library down.
    """
    import time

    import nanoopt.kernels as kernels

    if threads == 1:
        torch_on_threads(1)
        timings = []
        for (layer, x, reference), torch_case in zip(cases, torch_cases, strict=True):
            with kernels.use_backend("numba"):
                expected = layer(x)
                portable = best_seconds(lambda layer=layer, x=x: layer(x))  # (not compared with PyTorch)
            assert np.array_equal(layer(x), expected), "auto and numba backends disagree"
            functions = [lambda layer=layer, x=x: layer(x), reference]
            seconds = best_seconds_interleaved(functions + ([torch_case] if torch_case is not None else []))
            timings.append((seconds[0], portable, seconds[1], seconds[2] if torch_case is not None else None))
        return timings
    int8 = []
    for layer, x, _ in cases:
        with kernels.use_backend("numba"):
            expected = layer(x)
            portable = best_seconds(lambda layer=layer, x=x: layer(x))
        assert np.array_equal(layer(x), expected), "auto and numba backends disagree"
        int8.append((best_seconds(lambda layer=layer, x=x: layer(x)), portable))
    time.sleep(1.0)
    references = [best_seconds(reference) for _, _, reference in cases]
    time.sleep(1.0)
    torch_times = torch_seconds(torch_cases, threads)
    return [(auto, portable, reference, torch_time) for (auto, portable), reference, torch_time
            in zip(int8, references, torch_times, strict=True)]


def measure(threads: int) -> None:
    import nanoopt.kernels as kernels

    rng = np.random.default_rng(0)
    fast = "avx2" if kernels.avx2_available() else "numba"
    gemm = f" (int8 GEMM: `{kernels.int8_gemm_kernel()}`)" if kernels.avx2_available() else ""
    print(f"### {threads} thread{'s' if threads > 1 else ''}\n")
    if common.CPUID_MASK is not None:  # this process (not the one that printed the machine line) masked CPUID
        print(f"{common.CPUID_MASK}.\n")
    print(f"`auto` runs the `{fast}` backend here{gemm}. GOP/s, and float32 time / int8 time:\n")
    print("| linear M x K x N | int8 auto | x f32 | int8 numba | x f32 | NumPy f32 | PyTorch int8 | x f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cases, torch_cases = [], []
    for m, k, n in LINEAR_SHAPES:
        x, w, layer = linear_layer(m, k, n, rng)
        x_float, w_t = x.astype(np.float32), np.ascontiguousarray(w.T.astype(np.float32))  # (M, K), (K, N)
        cases.append((layer, x, lambda x_float=x_float, w_t=w_t: x_float @ w_t))
        torch_cases.append(torch_int8_linear(x, w))
    for (m, k, n), (auto, portable, reference, torch_time) in zip(LINEAR_SHAPES,
                                                                 time_layers(cases, torch_cases, threads), strict=True):
        giga = 2.0 * m * k * n / 1e9
        torch_text = f"{giga / torch_time:.0f}" if torch_time else "not installed"
        print(f"| {m}x{k}x{n} | {giga / auto:.0f} | {reference / auto:.2f}x | {giga / portable:.0f} | "
              f"{reference / portable:.2f}x | {giga / reference:.0f} | {torch_text} | "
              f"{_ratio(reference, torch_time)} |")  # fmt: skip
    measure_seven_bit(threads, rng)
    print("\n| conv2d N x 32 x 28 x 28, 3x3, 64 out, pad 1 | int8 auto ms | x f32 | int8 numba ms | x f32 | "
          "NumPy f32 im2col+matmul ms | PyTorch int8 ms | x f32 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cases, torch_cases = [], []
    for batch in CONV_BATCHES:
        x, w, layer = conv_layer(batch, rng)
        x_float, w_float = x.astype(np.float32), w.astype(np.float32)
        cases.append((layer, x, lambda x_float=x_float, w_float=w_float: float_conv(x_float, w_float, CONV["padding"])))
        torch_cases.append(torch_int8_conv(x, w, CONV["padding"]))
    for batch, (auto, portable, reference, torch_time) in zip(CONV_BATCHES, time_layers(cases, torch_cases, threads),
                                                               strict=True):
        torch_text = f"{torch_time * 1e3:.3f}" if torch_time else "not installed"
        print(f"| N={batch} | {auto * 1e3:.3f} | {reference / auto:.2f}x | {portable * 1e3:.3f} | "
              f"{reference / portable:.2f}x | {reference * 1e3:.3f} | {torch_text} | "
              f"{_ratio(reference, torch_time)} |")  # fmt: skip
    print()


def measure_seven_bit(threads: int, rng: np.random.Generator) -> None:
    """The linear table on 7-bit activation codes (see the module docstring): our layer on codes in [-64, 63] and on
    full-range codes, PyTorch's on the same 7-bit codes; the products are checked equal to the numba backend's."""
    import nanoopt.kernels as kernels
    from nanoopt.kernels import x86_glue

    chosen = x86_glue.s8_kernel_for_codes(kernels.int8_gemm_kernel(), -64, 63) if kernels.avx2_available() else "-"
    print(f"\n7-bit activations (codes in [-64, 63], PyTorch's `reduce_range`): the int8 GEMM for such codes is "
          f"`{chosen}` here. GOP/s:\n")
    print("| linear M x K x N | int8 auto, 7-bit codes | int8 auto, full-range codes | 7-bit / full-range | "
          "PyTorch int8, 7-bit codes | nanoopt / PyTorch, 7-bit |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for m, k, n in LINEAR_SHAPES:
        x, w, layer = linear_layer(m, k, n, rng)
        x7 = rng.integers(-64, 64, size=(m, k)).astype(np.int8)  # (M, K), the 7-bit grid's codes
        auto_codes = layer(x7)
        with kernels.use_backend("numba"):
            assert np.array_equal(layer(x7), auto_codes), "auto and numba backends disagree (7-bit codes)"
        torch_case = torch_int8_linear(x7, w, seven_bit=True)
        if threads == 1 and torch_case is not None:  # ours and PyTorch's in turns: their ratio holds under load
            torch_on_threads(1)
            seven, full, torch_time = best_seconds_interleaved([lambda layer=layer, x7=x7: layer(x7),
                                                                lambda layer=layer, x=x: layer(x), torch_case])
        else:
            seven, full = (best_seconds(lambda layer=layer, x7=x7: layer(x7)),
                           best_seconds(lambda layer=layer, x=x: layer(x)))
            torch_time = torch_seconds([torch_case], threads)[0]
        rows.append(((m, k, n), seven, full, torch_time))
    for (m, k, n), seven, full, torch_time in rows:
        giga = 2.0 * m * k * n / 1e9
        torch_text = f"{giga / torch_time:.0f}" if torch_time else "not installed"
        print(f"| {m}x{k}x{n} | {giga / seven:.0f} | {giga / full:.0f} | {full / seven:.2f}x | {torch_text} | "
              f"{_ratio(torch_time, seven) if torch_time else '-'} |")  # fmt: skip


# Run in a fresh process with a given Numba cache directory: seconds to import nanoopt.kernels, then to the
# first result of each layer kind (compile or cache load included).
_STARTUP_PROBE = """
import time
start = time.perf_counter()
import numpy as np
import nanoopt.kernels as kernels
from nanoopt.spec import QuantSpec
imported = time.perf_counter()
spec, x, w = QuantSpec(), np.ones((4, 64), np.int8), np.ones((16, 64), np.int8)
with kernels.use_backend("numba"):
    kernels.prepare_linear(w, None, 0, 2**30, 0, 0, spec)(x)
numba_linear = time.perf_counter()
kernels.prepare_linear(w, None, 0, 2**30, 0, 0, spec)(x)
auto_linear = time.perf_counter()
xc, wc = np.ones((1, 8, 6, 6), np.int8), np.ones((16, 8, 3, 3), np.int8)
kernels.prepare_conv2d(wc, None, 0, 2**30, 0, 0, spec, padding=1)(xc)
with kernels.use_backend("numba"):
    kernels.prepare_conv2d(wc, None, 0, 2**30, 0, 0, spec, padding=1)(xc)
convs = time.perf_counter()
print(imported - start, numba_linear - imported, auto_linear - numba_linear, convs - auto_linear)
"""


def startup_seconds(cache_dir: str) -> list[float]:
    """Seconds (import, numba linear, auto linear, both convs) in a fresh process with Numba cache ``cache_dir``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _STARTUP_PROBE], env=env, capture_output=True, text=True,
                            check=True, cwd=ROOT)  # fmt: skip
    return [float(value) for value in result.stdout.split()]


def main() -> None:
    if _THREADS is not None:
        measure(_THREADS)
        return
    print(f"Machine: {machine_description()}; git {git_revision()}\n")
    for threads in (1, 2):
        target = [AVX2_TARGET_OPTION] if _AVX2_TARGET else []
        result = subprocess.run([sys.executable, "-m", "benchmarks.int_kernels", "--threads", str(threads), *target],
                                cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
        print(result.stdout, end="")
    with tempfile.TemporaryDirectory() as cache_dir:
        compiling = startup_seconds(cache_dir)
        cached = startup_seconds(cache_dir)
    print("| startup, fresh process | import | first numba linear | first auto linear | first convs |")
    print("|---|---:|---:|---:|---:|")
    for name, values in (("empty Numba cache (compile)", compiling), ("warm cache (load)", cached)):
        print(f"| {name} | " + " | ".join(f"{value:.2f} s" for value in values) + " |")


if __name__ == "__main__":
    main()
