"""What every benchmark shares: a clean, pinned environment, the machine description and timing.

``pin_environment(threads)`` must run before NumPy is imported: it re-executes the process with
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed (they are set on some machines to work around old OpenBLAS
builds, and slow a current NumPy down; tests and CI keep them, benchmarks measure without them) and with every
thread-count variable (OpenBLAS, OpenMP, MKL, Numba) set to ``threads``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_REMOVED_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# A faithful AVX2-only target on any newer x86 CPU (e.g. Zen 4 or an AVX-512 Xeon): LLVM compiles for Skylake
# (client: AVX2 and FMA, no AVX-512, no VNNI), so Numba's code has no EVEX instruction and no zmm / ymm16-31 /
# mask register, as on an AVX2-only machine, and nanoopt's dispatch (which reads Numba's target,
# nanoopt.kernels.cpu_features) chooses the AVX2 kernels. NANOOPT_CPU_FEATURES=avx2 alone narrows only nanoopt's
# kernel choice: LLVM would still target the host CPU and use AVX-512VL encodings in "AVX2" code.
AVX2_TARGET = {"NUMBA_CPU_NAME": "skylake",
               "NUMBA_CPU_FEATURES": "+avx2,+fma,+bmi,+bmi2,+lzcnt,+popcnt,+movbe,+f16c,-avx512f,-avxvnni"}
AVX2_TARGET_OPTION = "--avx2-target"  # the command-line switch of the benchmarks that can run on AVX2_TARGET
# ... which also keeps PyTorch's int8 kernels on AVX2 (FBGEMM's and oneDNN's dispatch, ATen's vector code), so
# that its column is the AVX2 baseline too. ONNX Runtime (MLAS) has no such switch: it reads CPUID, which
# mask_cpuid_to_avx2() answers for it (and for NumPy, OpenBLAS and PyTorch) where Linux can fault on CPUID.
AVX2_BASELINES = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# glibc picks its string functions at start-up, before the CPUID mask can be set: keep them off AVX-512 as well
AVX2_GLIBC = {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"}
CPUID_MASK: str | None = None  # what mask_cpuid_to_avx2() did in this process (None: not asked)
CPUID_LIBRARY = None  # the loaded benchmarks/cpuid_mask.c (its nanoopt_cpuid runs the instruction), once masked


def pin_environment(threads: int = 1, avx2_target: bool = False) -> None:
    """Re-exec this process (once) with a benchmark environment; call before importing numpy. With
    ``avx2_target``, Numba also compiles for :data:`AVX2_TARGET` (an AVX2-only CPU, emulated faithfully),
    PyTorch runs its AVX2 kernels (:data:`AVX2_BASELINES`) and, where the kernel allows it, CPUID reports an
    AVX2-only CPU to every library in the process (:func:`mask_cpuid_to_avx2`)."""
    wanted = {name: str(threads) for name in _THREAD_VARIABLES}
    if avx2_target:
        wanted.update(AVX2_TARGET)
        wanted.update(AVX2_BASELINES)
        wanted.update(AVX2_GLIBC)
    clean = all(name not in os.environ for name in _REMOVED_VARIABLES)
    pinned = all(os.environ.get(name) == value for name, value in wanted.items())
    if clean and pinned:
        if avx2_target and CPUID_MASK is None and "numpy" not in sys.modules:
            mask_cpuid_to_avx2()
        return
    if "numpy" in sys.modules:
        raise RuntimeError("pin_environment() must run before numpy is imported")
    env = {k: v for k, v in os.environ.items() if k not in _REMOVED_VARIABLES}
    env.update(wanted)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def mask_cpuid_to_avx2() -> str:
    """Make the CPUID instruction report an AVX2-only CPU (no AVX-512, VNNI or AMX) in this process and the
    threads it starts from now on; returns, and keeps in :data:`CPUID_MASK`, what was done or why not.

    Libraries choose their kernels from CPUID: NumPy's SIMD dispatch, OpenBLAS, PyTorch (cpuinfo: FBGEMM, oneDNN,
    ATen) and ONNX Runtime (MLAS), which has no other switch. Linux can make CPUID fault (``arch_prctl
    (ARCH_SET_CPUID)``, on CPUs listing ``cpuid_fault``); ``benchmarks/cpuid_mask.c``, compiled here with the C
    compiler Python was built with, answers the fault with the real CPUID minus those features. Call it before
    importing NumPy (threads that exist already keep the real CPUID). Without a compiler or the kernel's support
    the process runs unmasked, and the returned reason is printed with the machine description. The faults come
    as SIGSEGV: :mod:`faulthandler` is enabled first (ours hands it every real fault); a SIGSEGV handler set after
    this call, other than ``faulthandler.enable()`` again, would take them and end the process at the next CPUID.
    """
    global CPUID_MASK, CPUID_LIBRARY
    import ctypes
    import faulthandler
    import hashlib
    import sysconfig
    import tempfile
    from pathlib import Path

    source = Path(__file__).with_name("cpuid_mask.c")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        CPUID_MASK = f"CPUID not masked: needs Linux on x86-64, this is {platform.system()} {platform.machine()}"
        return CPUID_MASK
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / f"nanoopt-cpuid-mask-{digest}.so"
    if not library.exists():
        compiler = (sysconfig.get_config_var("CC") or "cc").split()
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run([*compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(partial)], check=True,
                           capture_output=True, text=True)
            partial.replace(library)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            CPUID_MASK = f"CPUID not masked: compiling {source.name} failed ({detail.strip()[:200]})"
            return CPUID_MASK
    # The CPUID faults arrive as SIGSEGV: a handler installed after ours would take them (and end the process).
    # faulthandler, which benchmarks and pytest enable, goes first: ours passes it every other fault, and a later
    # faulthandler.enable() leaves an enabled handler in place.
    faulthandler.enable()
    CPUID_LIBRARY = ctypes.CDLL(str(library))
    status = CPUID_LIBRARY.nanoopt_mask_cpuid_to_avx2()
    CPUID_MASK = {0: "CPUID masked to AVX2 (no AVX-512, VNNI or AMX) for every library in the process",
                  1: "CPUID not masked: this kernel or CPU cannot fault on CPUID (no cpuid_fault)",
                  2: "CPUID not masked: the SIGSEGV handler could not be installed"}[status]
    return CPUID_MASK


def machine_description() -> str:
    """CPU model, core count, Python/NumPy/Numba versions and the BLAS NumPy uses."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"Python {platform.python_version()}", f"NumPy {np.__version__}"]
    try:
        import llvmlite.binding as llvm
        import numba

        features = llvm.get_host_cpu_features()
        flags = [name for name in ("avx2", "fma", "avx512f", "avx512vnni", "avxvnni") if features.get(name)]
        parts.append(f"Numba {numba.__version__} (LLVM CPU {llvm.get_host_cpu_name()}: {', '.join(flags)})")
    except Exception:  # pragma: no cover - information only
        pass
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        parts.append("BLAS " + "; ".join(blas))
    except ImportError:
        pass
    if os.environ.get("NUMBA_CPU_NAME"):
        parts.append(f"Numba target NUMBA_CPU_NAME={os.environ['NUMBA_CPU_NAME']} "
                     f"NUMBA_CPU_FEATURES={os.environ.get('NUMBA_CPU_FEATURES', '(the CPU name default)')}")
    if CPUID_MASK is not None:
        parts.append(CPUID_MASK)
    limits = [f"{name}={os.environ[name]}" for name in AVX2_BASELINES if name in os.environ]
    if limits:
        parts.append("PyTorch limited by " + " ".join(limits))
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    parts.append(f"threads pinned to {threads}")
    return "; ".join(parts)


def best_seconds(fn: Callable[[], object], repeats: int = 5, min_time: float = 0.2) -> float:
    """Best wall-clock time of ``fn()`` over ``repeats`` rounds, each looping until ``min_time`` has passed (after a
    warm-up call, which also compiles)."""
    return best_seconds_interleaved([fn], repeats, min_time)[0]


def best_seconds_interleaved(functions: list[Callable[[], object]], repeats: int = 5,
                             min_time: float = 0.2) -> list[float]:
    """:func:`best_seconds` of several functions measured in turns (round 1 of each, then round 2 of each, ...):
    a disturbance of the machine that lasts a few seconds then slows all of them, not only the one measured in
    that stretch, so their ratios hold on a loaded machine (one thread: with several, one library's spinning
    workers would slow the next)."""
    for function in functions:
        function()  # warm-up (and JIT compilation)
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            count, start = 0, time.perf_counter()
            while True:
                function()
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            best[index] = min(best[index], elapsed / count)
    return best


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def generation_runs(generators: list[Callable[[int], object]], new_tokens: int,
                    repeats: int = 5) -> list[tuple[float, object]]:
    """``(tokens per second, output)`` of each ``generate(new_tokens)`` in ``generators``: the fastest of ``repeats``
    runs (the one least disturbed by other work) after a 4-token warm-up (compilation, packing), and what its last
    run returned. The generators run interleaved, run by run, so that a passing disturbance slows all of them and
    their ratios hold."""
    for generate in generators:
        generate(4)
    best = [float("inf")] * len(generators)
    outputs: list[object] = [None] * len(generators)
    for _ in range(repeats):
        for index, generate in enumerate(generators):
            start = time.perf_counter()
            outputs[index] = generate(new_tokens)
            best[index] = min(best[index], time.perf_counter() - start)
    return [(new_tokens / seconds, output) for seconds, output in zip(best, outputs, strict=True)]


def generation_speeds(candidates, prompt, new_tokens: int = 63, repeats: int = 5) -> list[float]:
    """Tokens per second of greedy ``generate(prompt, new_tokens)`` of each model in ``candidates``, by
    :func:`generation_runs`."""
    runs = generation_runs([lambda k, m=m: m.generate(prompt, k, temperature=0.0) for m in candidates], new_tokens,
                           repeats)
    return [rate for rate, _ in runs]


def generation_speed(model, prompt, new_tokens: int = 63, repeats: int = 5) -> float:
    """:func:`generation_speeds` of one model."""
    return generation_speeds([model], prompt, new_tokens, repeats)[0]


def fashion_mnist(split: str):
    """``nanoopt.data.load_fashion_mnist(split)`` (images, labels), or exit saying how to install the data set.

    nanoopt is imported here, not at the top: this module is imported before :func:`pin_environment` has run."""
    from nanoopt import data

    if not data.fashion_mnist_available():
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist "
                         "(or see nanoopt.data.load_fashion_mnist)")
    return data.load_fashion_mnist(split)


def torch_lenet(name: str):
    """PyTorch's ``"LeNet-300-100"`` or ``"LeNet-5"`` with the layer order and state_dict keys of
    ``nanoopt.models.lenet_300_100()`` / ``lenet5()``, freshly initialised, with torch on one thread; None where
    torch is not installed (it is optional: the ``bench`` extra)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    nn = torch.nn
    if name == "LeNet-300-100":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def torch_sgd_epochs(model, images, labels, epochs: int, lr: float, rng, momentum: float = 0.9, batch: int = 128,
                     on_step: Callable[[int], object] | None = None):
    """Train a PyTorch ``model`` in place (and return it): SGD with momentum on cross-entropy, ``epochs`` passes
    over the tensors ``images``/``labels`` in an order drawn from the NumPy generator ``rng``, calling
    ``on_step(step)`` after every optimiser step."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    step = 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(labels)))
        for begin in range(0, len(labels), batch):
            index = order[begin:begin + batch]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
            if on_step is not None:
                on_step(step)
            step += 1
    return model
