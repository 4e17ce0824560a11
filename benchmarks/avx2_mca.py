"""The AVX2 GEMMs' inner K loops under llvm-mca's models of Intel and AMD cores: cycles per K step (modelled).

We have no AVX2-only Intel machine, so this is the evidence for one: the machine code of the register tiles of
:mod:`nanoopt.kernels.avx2` -- the int8 kernel ``gemm_s8s8s32_avx2_into`` (sign-mask trick: ``vpxor``,
``vpmaddubsw``, ``vpmaddwd``, ``vpaddd``), its 7-bit tile ``gemm_s8s8s32_avx2_7bit_into`` (codes in [-64, 63]:
``vpmaddubsw``, ``vpmaddwd``, ``vpaddd``) and the int16 x int8 kernel ``gemm_s16s8s64_into`` (``vpmaddwd`` +
``vpaddd`` on int16 operands, the "int16-widened tile": int16 activations and pre-widened int16 weights) --
compiled by Numba for a faithful AVX2-only target (:data:`benchmarks.common.AVX2_TARGET`: LLVM CPU
``skylake``, no AVX-512, no VNNI; the script checks that the code has no EVEX instruction), its innermost loop cut
out of ``inspect_asm`` and run through ``llvm-mca -mcpu=skylake``, ``icelake-client`` and ``znver3``.

Columns: int8/int16 products per loop iteration (32 per ``vpmaddubsw``, 16 per product ``vpmaddwd``), cycles per
iteration in llvm-mca's simulation (500 iterations) with its own dispatch width (6) and with the width the core
renames per cycle (``-dispatch``: Skylake 4, Ice Lake 5, Zen 3 6), products per cycle and the GOP/s that implies
at a nominal 3.0 GHz (2 operations per product) at the core's width, for one core and the loop alone (no loads
from beyond L1, no epilogue): a **model**, not a measurement. llvm-mca's "Block RThroughput" (the bound from port
pressure alone) is printed too; it is not a cycle count.

    python -m benchmarks.avx2_mca          # prints a Markdown table; skips with a message without llvm-mca

The same Numba target runs the speed benchmarks faithfully on a newer CPU: ``python -m benchmarks.int_kernels
--avx2-target`` and ``python -m benchmarks.runtime --avx2-target``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile

from benchmarks.common import AVX2_TARGET

_TEMPORARY_CACHE = "BENCHMARKS_AVX2_MCA_CACHE"  # set in the re-executed process: its Numba cache, removed at exit
if __name__ == "__main__" and _TEMPORARY_CACHE not in os.environ:
    # Re-exec on the AVX2 target with an empty Numba cache: inspect_asm needs code compiled in this process.
    if "numpy" in sys.modules:
        raise RuntimeError("benchmarks.avx2_mca must set its target before numpy is imported")
    cache = tempfile.mkdtemp(prefix="nanoopt-mca-")
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, **AVX2_TARGET, "NUMBA_CACHE_DIR": cache, _TEMPORARY_CACHE: cache})
if __name__ == "__main__":
    atexit.register(shutil.rmtree, os.environ[_TEMPORARY_CACHE], ignore_errors=True)

import subprocess  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import git_revision  # noqa: E402

# llvm-mca CPU -> the width its core renames/dispatches per cycle: llvm-mca's own models issue 6 per cycle, more
# than Skylake (4 fused uops) and Ice Lake (5) allocate, so each loop is also run with -dispatch at that width.
MCA_CPUS = {"skylake": 4, "icelake-client": 5, "znver3": 6}
NOMINAL_GHZ = 3.0
ITERATIONS = 500
# Instructions or registers that only EVEX (AVX-512) encodings have: none may appear in AVX2-only code.
EVEX_ONLY = re.compile(
    r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}|\b(vpternlog[dq]|vmovdqu(8|16|32|64)|vmovdqa(32|64)"
    r"|vp(and|andn|or|xor)[dq]|v\w+(32x4|64x2|32x8|64x4)|vpmov(db|dw|qb|qw|qd|wb|m2\w|\w2m)|vpcmpu?[bwdq]"
    r"|kmov\w|vperm[it]2\w+|vpermw|vpsraq|vpabsq|vpro[lr]v?[dq]|vpdpbusds?)\b"
)
LABEL = re.compile(r"^(\.LBB\w+):")
JUMP = re.compile(r"^\s+j\w+\s+(\.LBB\w+)")


def inner_loops(asm: str) -> list[list[str]]:
    """The innermost loops of an assembly listing: the instructions between a label and the jump back to it, for
    loops that contain no other backward jump."""
    lines = [line for line in asm.splitlines() if line.strip() and not line.strip().startswith(("#", ".p2align"))]
    labels = {}
    loops = []
    for index, line in enumerate(lines):
        label = LABEL.match(line)
        if label:
            labels[label.group(1)] = index
            continue
        jump = JUMP.match(line)
        if jump and jump.group(1) in labels:
            body = lines[labels[jump.group(1)] + 1 : index + 1]
            if not any(JUMP.match(other) and JUMP.match(other).group(1) in labels for other in body[:-1]):
                loops.append([line for line in body if not LABEL.match(line) and not line.lstrip().startswith(".")])
    return loops


def products_per_iteration(loop: list[str]) -> int:
    """int8/int16 products in one iteration: 32 per vpmaddubsw (its vpmaddwd only add pairs), else 16 per
    vpmaddwd."""
    mnemonics = [line.split()[0] for line in loop]
    if "vpmaddubsw" in mnemonics:
        return 32 * mnemonics.count("vpmaddubsw")
    return 16 * mnemonics.count("vpmaddwd")


def mca(loop: list[str], cpu: str, *options: str) -> tuple[float, float]:
    """(simulated cycles per iteration, block reciprocal throughput) of ``loop`` under ``llvm-mca -mcpu=cpu``."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as handle:
        handle.write("\n".join(loop) + "\n")
    try:
        report = subprocess.run(["llvm-mca", f"-mcpu={cpu}", f"-iterations={ITERATIONS}", *options, handle.name],
                                capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    cycles = float(re.search(r"Total Cycles:\s+(\d+)", report).group(1)) / ITERATIONS
    bound = float(re.search(r"Block RThroughput:\s+([\d.]+)", report).group(1))
    return cycles, bound


def tile_loops() -> dict[str, list[str]]:
    """Compile the AVX2 kernels here (4-row and 1-row tiles), check that they are AVX2-only, and return the hottest
    inner loop of each tile, by name."""
    from nanoopt.kernels import avx2, avx2_linear, avx512

    if not avx2.available():
        raise SystemExit("the AVX2 kernels are not available on this CPU / Numba target")
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(16, 64)).astype(np.int8)
    for m in (4, 1):
        avx2.gemm_s8s8s32_avx2_into(rng.integers(-128, 128, size=(m, 64)).astype(np.int8),
                                    avx2.pack_weights_s8(w).panels, 16, 64, np.empty((m, 16), np.int32))
        avx2.gemm_s16s8s64_into(rng.integers(-128, 128, size=(m, 64)).astype(np.int16),
                                avx2.pack_weights_s16(w).panels, 16, 64, np.empty((m, 16), np.int64))
        avx2.gemm_s8s8s32_avx2_7bit_into(rng.integers(-64, 64, size=(m, 64)).astype(np.int8),
                                         avx2.pack_weights_s8(w).panels, 16, 64, np.empty((m, 16), np.int32))
    requant = avx512.requant_s8(np.zeros(16), np.full(16, 2**30), np.zeros(16), 0, -128, 127)
    for layer, low in ((avx2_linear.linear_s8_avx2_into, -128), (avx2_linear.linear_s8_avx2_7bit_into, -64)):
        layer(rng.integers(low, -low, size=(4, 64)).astype(np.int8), avx2.pack_weights_s8(w).panels, 16, 64, requant,
              np.empty((4, 16), np.int32), np.empty((4, 16), np.int8))  # the fused layer (avx2_linear)
    for signature, asm in avx2_linear._fused_product.inspect_asm().items():
        evex = EVEX_ONLY.search(asm)
        if evex:
            raise SystemExit(f"the target is not AVX2-only: {evex.group(0)!r} in the code of _fused_product{signature}")
    loops = {}
    for signature, asm in avx2._tile.inspect_asm().items():
        evex = EVEX_ONLY.search(asm)
        if evex:
            raise SystemExit(f"the target is not AVX2-only: {evex.group(0)!r} in the code of _tile{signature}")
        kind, rows = signature[0].literal_value, signature[1].literal_value
        name = {"avx2": "int8 sign mask (gemm_s8s8s32_avx2_into)", "s16": "int16 x int8 (gemm_s16s8s64_into)",
                "avx2-7bit": "int8, 7-bit codes (gemm_s8s8s32_avx2_7bit_into)"}
        best = max(inner_loops(asm), key=products_per_iteration)
        loops[f"{name.get(avx2.TILE_KINDS[kind], avx2.TILE_KINDS[kind])}, {rows}x16 tile"] = best
    return loops


def main() -> None:
    print("## AVX2 GEMM inner loops under llvm-mca (modelled, not measured)\n")
    if shutil.which("llvm-mca") is None:
        print("Skipped: llvm-mca is not installed (Debian/Ubuntu: apt-get install llvm).")
        return
    version = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout.split("\n")
    print(f"Numba target: NUMBA_CPU_NAME={os.environ['NUMBA_CPU_NAME']}, NUMBA_CPU_FEATURES="
          f"{os.environ['NUMBA_CPU_FEATURES']} (no EVEX instruction in the tiles: checked); "
          f"{next((line.strip() for line in version if 'version' in line), 'llvm-mca')}; git {git_revision()}\n")
    print(f"| inner loop | llvm-mca CPU | products / iteration | cycles / iteration (llvm-mca's width) | "
          f"cycles at the core's width | products / cycle | GOP/s at {NOMINAL_GHZ:.1f} GHz | port bound "
          f"(RThroughput) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, loop in sorted(tile_loops().items()):
        products = products_per_iteration(loop)
        for cpu, width in MCA_CPUS.items():
            cycles, bound = mca(loop, cpu)
            narrow, _ = mca(loop, cpu, f"-dispatch={width}")
            print(f"| {name} | {cpu} | {products} | {cycles:.2f} | {narrow:.2f} (width {width}) | "
                  f"{products / narrow:.1f} | {2 * products / narrow * NOMINAL_GHZ:.0f} | {bound:.1f} |")


if __name__ == "__main__":
    main()
