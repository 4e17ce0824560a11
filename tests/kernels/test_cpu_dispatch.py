"""CPU-feature dispatch, tested without the features: forced feature sets pick a kernel the CPU can run, every
choice gives the same integers, and a kernel needing a masked feature is never compiled.

The choice is made by :func:`nanoopt.kernels.avx2.select_features` / :func:`~nanoopt.kernels.avx2.kernel_s8_for`
from the CPU's features, Numba's target and ``NANOOPT_CPU_FEATURES``; the first tests check that logic on the
feature sets of other machines (AVX2-only, AVX-512 without VL, no AVX2). The subprocess tests run one fixed
integer workload (int8 and 16x8 linear layers split over two threads, the AVX2 im2col conv, the thin and the
depthwise conv loops, a raw GEMM, a sparse product) in fresh processes under each forced feature set and under
Numba's generic LLVM target, and compare every result with the NumPy reference computed here; each process
also reports which of the AVX2 module's compiled functions it compiled or loaded, so that "never compiled" is
checked on the dispatchers themselves (a dispatcher that compiled or loaded a kernel lists its signature).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import AVX2_TARGET
from nanoopt.kernels import avx2, avx512

REPO_ROOT = Path(__file__).resolve().parents[2]

AVX2_ONLY = {"avx2": True, "avxvnni": False, "avx512vnni": False, "avx512vl": False}  # e.g. Zen 2, Haswell
ICELAKE = {"avx2": True, "avxvnni": False, "avx512vnni": True, "avx512vl": True}
ALDER_LAKE = {"avx2": True, "avxvnni": True, "avx512vnni": False, "avx512vl": False}
NO_AVX2 = {"avx2": False, "sse4.2": True}
ZEN4 = {"avx2": True, "avxvnni": False, "avx512vnni": True, "avx512vl": True, "avx512f": True, "avx512bw": True}
ALL_TARGET = "+avx2,+avxvnni,+avx512vnni,+avx512vl,+avx512f,+avx512bw"


@pytest.mark.parametrize(
    "host, target, override, expected",
    [
        (AVX2_ONLY, ALL_TARGET, None, "avx2"),
        (AVX2_ONLY, ALL_TARGET, "avx2,avxvnni,avx512vnni,avx512vl", "avx2"),  # cannot add what the CPU lacks
        (AVX2_ONLY, ALL_TARGET, "none", "portable"),
        (ICELAKE, ALL_TARGET, None, "avx-vnni"),
        (ICELAKE, ALL_TARGET, "avx2", "avx2"),
        (ICELAKE, ALL_TARGET, "avx2,avx512vnni", "avx2"),  # 256-bit vpdpbusd needs AVX512-VL too
        (ICELAKE, "+avx2,+avx512vnni,-avx512vl", None, "avx2"),  # Numba's target without VL
        (ICELAKE, "", None, "portable"),  # NUMBA_CPU_NAME=generic
        (ALDER_LAKE, ALL_TARGET, None, "avx-vnni"),
        (ALDER_LAKE, ALL_TARGET, "AVX2, avxvnni", "avx-vnni"),
        (ALDER_LAKE, "+avx2,-avxvnni", None, "avx2"),
        (ALDER_LAKE, ALL_TARGET, "avxvnni", "portable"),  # VNNI without AVX2 is not a kernel here
        (NO_AVX2, ALL_TARGET, None, "portable"),
        (NO_AVX2, ALL_TARGET, "avx2", "portable"),
    ],
)
def test_kernel_choice_under_forced_feature_sets(host, target, override, expected):
    allowed = None if override is None else avx2.allowed_features(override)
    features = avx2.select_features(host, target, allowed)
    assert features <= {name for name, present in host.items() if present}  # never a feature the CPU lacks
    assert avx2.kernel_s8_for(features) == expected
    assert not avx512.FEATURES <= features  # none of these machines / masks may run the 512-bit kernels


@pytest.mark.parametrize(
    "host, target, override, expected",
    [
        (ZEN4, ALL_TARGET, None, True),
        (ZEN4, ALL_TARGET, "avx2,avx512f,avx512bw,avx512vnni", True),
        (ZEN4, ALL_TARGET, "avx2", False),  # NANOOPT_CPU_FEATURES=avx2: the AVX2 kernel
        (ZEN4, ALL_TARGET, "avx2,avx512vnni,avx512vl", False),  # 256-bit vpdpbusd only
        (ZEN4, ALL_TARGET, "avx512f,avx512bw,avx512vnni", False),  # the rest of the x86 path needs AVX2
        (ZEN4, "+avx2,+avx512vnni,+avx512vl,-avx512f,-avx512bw", None, False),  # Numba's target without 512-bit
        (ZEN4, "", None, False),  # NUMBA_CPU_NAME=generic
        (ICELAKE, ALL_TARGET, None, False),  # the host dict lacks avx512f/bw: never assumed
    ],
)
def test_512_bit_choice_under_forced_feature_sets(host, target, override, expected):
    allowed = None if override is None else avx2.allowed_features(override)
    assert (avx512.FEATURES <= avx2.select_features(host, target, allowed)) is expected


@pytest.mark.parametrize("value", ["avx-vnni", "avx2,fma", "avx2;avxvnni", "all", "avx2,,avxvnni"])
def test_malformed_feature_override_is_a_clear_error(value):
    with pytest.raises(ValueError, match=f"NANOOPT_CPU_FEATURES must be a comma-separated list of avx2.*{value!r}"):
        avx2.allowed_features(value)


def test_feature_override_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(avx2.FEATURES_ENV, "none")
    assert avx2.usable_features() == frozenset()
    assert not avx2.target_has_avx2() and not avx2.target_has_avx_vnni()
    monkeypatch.setenv(avx2.FEATURES_ENV, "avx2")
    assert avx2.usable_features() <= {"avx2"} and not avx2.target_has_avx_vnni()
    monkeypatch.setenv(avx2.FEATURES_ENV, "avx-512")
    with pytest.raises(ValueError, match="NANOOPT_CPU_FEATURES"):
        avx2.usable_features()  # an error, never a silent "no features"
    monkeypatch.delenv(avx2.FEATURES_ENV)
    assert avx2.usable_features() <= set(avx2.CPU_FEATURES)


# ------------------------------------------------------------------------------------------ fresh processes
# One fixed workload, printed as JSON: its integer results, which kernel ran, and which compiled functions of
# the AVX2 modules (and of the Numba drivers around them) have signatures in this process.
WORKLOAD = r"""
import json, sys
import numba
import numpy as np
import nanoopt.kernels as kernels
from nanoopt.kernels import avx2, avx512, sparse, sparse_avx2, x86_glue
from nanoopt.spec import QuantSpec, quantize_multiplier

backend = sys.argv[1]
rng = np.random.default_rng(2024)
results = {}
with kernels.use_backend(backend):
    # int8 linear, M = 300: two threads split the rows (blocks of >= 64), past the AVX2 row block (252) and
    # Numba's 64 x 64 blocks; K = 301 is not a multiple of 4; N = 70 leaves partial panels and tiles
    x = rng.integers(-128, 128, (300, 301)).astype(np.int8)
    w = rng.integers(-127, 128, (70, 301)).astype(np.int8)
    m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-3, 70))
    bias = rng.integers(-5000, 5000, 70).astype(np.int32)
    linear = kernels.prepare_linear(w, bias, -5, m0, shift, 3, QuantSpec(), relu=True)
    results["linear"] = linear(x)
    results["gemm"] = kernels.gemm_s8s8s32(x, w, 7)
    # 16x8 linear (the AVX2 int16 kernel, K past its 510-value int32 partial sums)
    x16 = rng.integers(-32768, 32768, (260, 517)).astype(np.int16)
    w16 = rng.integers(-128, 128, (33, 517)).astype(np.int8)
    m0, shift = quantize_multiplier(rng.uniform(1e-8, 1e-6, 33))
    layer16 = kernels.prepare_linear(w16, None, 0, m0, shift, 0, QuantSpec(bits=16), x_dtype=np.int16)
    results["linear16"] = layer16(x16)
    # int8 conv, depth 144 and 400 pixels per image: the AVX2 im2col path (two 256-pixel items per image)
    xc = rng.integers(-128, 128, (3, 16, 20, 20)).astype(np.int8)
    wc = rng.integers(-127, 128, (24, 16, 3, 3)).astype(np.int8)
    m0, shift = quantize_multiplier(rng.uniform(1e-4, 1e-3, 24))
    conv = kernels.prepare_conv2d(wc, None, 4, m0, shift, -2, QuantSpec(), padding=1)
    results["conv"] = conv(xc)
    # the thin direct loop (few taps) and the depthwise loop
    wt = rng.integers(-128, 128, (8, 2, 3, 3)).astype(np.int8)
    m0, shift = quantize_multiplier(rng.uniform(1e-3, 1e-2, 8))
    results["thin"] = kernels.quantized_conv2d(xc[:, :2].copy(), wt, None, 0, m0, shift, 0, QuantSpec(), 1, 1)
    wd = rng.integers(-128, 128, (16, 1, 3, 3)).astype(np.int8)
    m0, shift = quantize_multiplier(rng.uniform(1e-3, 1e-2, 16))
    results["depthwise"] = kernels.quantized_conv2d(xc, wd, None, 0, m0, shift, 0, QuantSpec(), 2, 1, 1, 16)
csr = sparse.CSRMatrix.from_dense(np.where(rng.random((40, 90)) < 0.2, rng.standard_normal((40, 90)), 0)
                                  .astype(np.float32))
results["sparse"] = sparse.csr_matmul(rng.standard_normal((5, 90)).astype(np.float32), csr,
                                      "reference" if backend == "reference" else "auto")


def compiled(module):  # names of the compiled functions; the generated ones by kind and rows: _tile_vnni_6x2 ...
    names = set()
    for name, value in vars(module).items():  # the module's own functions, not those it imports by name
        if isinstance(value, numba.core.dispatcher.Dispatcher) and value.py_func.__module__ == module.__name__:
            for signature in value.signatures:
                if name in ("_tile", "_blocked_product"):
                    kind, rows = signature[0].literal_value, signature[1].literal_value
                    names.add(f"{name}_{avx2.TILE_KINDS[kind]}_{rows}x2")
                elif signature and isinstance(signature[0], numba.types.IntegerLiteral):  # the x86_glue drivers
                    kinds = {**avx2.TILE_KINDS, x86_glue.AVX512: "avx512", x86_glue.AVX2_AUTO: "avx2-auto"}
                    names.add(f"{name}_{kinds[signature[0].literal_value]}")
                else:
                    names.add(name)
    if module is x86_glue:  # the drivers bound to one kernel (closures, cached on their own): by kernel kind
        kinds = {**avx2.TILE_KINDS, x86_glue.AVX512: "avx512", x86_glue.AVX2_AUTO: "avx2-auto"}
        for kernel, kind in x86_glue.KINDS.items():
            bound = (*x86_glue.external_s8_drivers(kernel), x86_glue.linear_s8_driver(kernel))
            for label, driver in zip(("s8_rows_parallel", "conv_serial", "conv_parallel", "linear_s8"), bound):
                if driver.signatures:
                    names.add(f"{label}_{kinds[kind]}")
    return sorted(names)


print(json.dumps({
    "results": {name: [str(value.dtype), list(value.shape), value.reshape(-1).tolist()]
                for name, value in results.items()},
    "available": kernels.avx2_available(),
    "kernel": avx2.KERNEL_S8,
    "int8_kernel": kernels.int8_gemm_kernel(),
    "linear_backend": linear.backend_for(),
    "conv_backend": conv.backend_for(),
    "threads": numba.get_num_threads(),
    "compiled_avx2": compiled(avx2),
    "compiled_avx512": compiled(avx512),
    "compiled_sparse_avx2": compiled(sparse_avx2),
    "compiled_x86_glue": compiled(x86_glue),
}))
"""

MASKING = ("NANOOPT_CPU_FEATURES", "NANOOPT_DISABLE_AVX2", "NANOOPT_DISABLE_AVX_VNNI", "NUMBA_CPU_NAME",
           "NUMBA_CPU_FEATURES")


def run_workload(variables: dict[str, str], backend: str = "auto") -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in MASKING}
    environment.update(variables, PYTHONPATH=str(REPO_ROOT), NUMBA_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", WORKLOAD, backend], env=environment, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{variables}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference_results():
    """The workload on the NumPy reference kernels (in a fresh process too: the same code, nothing compiled)."""
    return run_workload({"NANOOPT_CPU_FEATURES": "none"}, backend="reference")["results"]


def vnni_functions(report: dict) -> list[str]:
    return [name for key in ("compiled_avx2", "compiled_x86_glue") for name in report[key] if "vnni" in name]


def expected_kernel(override: str | None) -> str:
    """What this machine should choose under ``override`` (never assuming its features)."""
    return avx2.kernel_s8_for(avx2.select_features(*_host_and_target(), avx2.allowed_features(override or "")))


def expected_512_bit(override: str | None) -> bool:
    """Whether this machine should run the 512-bit kernels under ``override``."""
    return avx512.FEATURES <= avx2.select_features(*_host_and_target(), avx2.allowed_features(override or ""))


def _host_and_target():
    import llvmlite.binding
    from numba.core import codegen

    return dict(llvmlite.binding.get_host_cpu_features()), codegen.get_host_cpu_features()


@pytest.mark.parametrize(
    "variables, override",
    [
        ({}, None),
        ({"NANOOPT_CPU_FEATURES": "avx2,avxvnni,avx512vnni,avx512vl"}, "avx2,avxvnni,avx512vnni,avx512vl"),
        ({"NANOOPT_CPU_FEATURES": "avx2,avx512f,avx512bw,avx512vnni"}, "avx2,avx512f,avx512bw,avx512vnni"),
        ({"NANOOPT_CPU_FEATURES": "avx2"}, "avx2"),
        ({"NANOOPT_DISABLE_AVX_VNNI": "1"}, "avx2"),
        ({"NANOOPT_CPU_FEATURES": "none"}, "none"),
        ({"NANOOPT_DISABLE_AVX2": "1"}, "none"),
    ],
    ids=["host", "256-bit-vnni", "512-bit-vnni", "avx2-only", "disable-vnni", "none", "disable-avx2"],
)
def test_forced_feature_sets_run_a_kernel_the_cpu_has_and_agree(reference_results, variables, override):
    report = run_workload(variables)
    assert report["threads"] == 2
    assert report["results"] == reference_results  # every choice gives the same integers (and sparse floats)
    choice = expected_kernel(override)
    wide = expected_512_bit(override)
    if variables.get("NANOOPT_DISABLE_AVX2"):
        choice, wide = "portable", False
    if choice == "portable":
        assert report["available"] is False and report["int8_kernel"] == "none"
        assert report["linear_backend"] == report["conv_backend"] == "numba"
        # nothing with an x86 intrinsic was compiled: no kernel of the AVX2 modules, no driver around them
        assert report["compiled_avx2"] == [] and report["compiled_sparse_avx2"] == []
        assert report["compiled_x86_glue"] == [] and report["compiled_avx512"] == []
        return
    assert report["available"] is True and report["kernel"] == choice
    assert report["linear_backend"] == report["conv_backend"] == "avx2"
    # the plain AVX2 drivers: the sign mask, the 7-bit tile and the one that picks either per call
    drivers = {f"{label}_{variant}" for label in ("s8_rows_parallel", "conv_serial", "conv_parallel", "linear_s8")
               for variant in ("avx2", "avx2-7bit", "avx2-auto")}
    if wide:  # the 512-bit kernels ran every int8 product (fused linear, raw GEMM, conv); no 256-bit driver did
        assert report["int8_kernel"] == "avx512-vnni"
        assert {"linear_s8_rows_parallel"} <= set(report["compiled_avx512"])
        assert {"s8_rows_parallel_avx512"} <= set(report["compiled_x86_glue"])
        assert {"conv_serial_avx512", "conv_parallel_avx512"} & set(report["compiled_x86_glue"])
        vnni_drivers = {"s8_rows_parallel_vnni", "conv_serial_vnni", "conv_parallel_vnni", "linear_s8_vnni"}
        assert not (drivers | vnni_drivers) & set(report["compiled_x86_glue"])
        return
    assert report["int8_kernel"] == choice
    assert report["compiled_avx512"] == []  # masked: the 512-bit kernels never compiled
    if choice == "avx2":
        assert vnni_functions(report) == []  # the VNNI kernel, its tiles and its drivers never compiled
        assert drivers & set(report["compiled_x86_glue"])  # the plain AVX2 drivers ran instead
    else:
        assert {"s8_rows_parallel_vnni"} <= set(report["compiled_x86_glue"])
        assert not drivers & set(report["compiled_x86_glue"])


def test_generic_llvm_target_runs_the_portable_kernels(reference_results):
    """Under NUMBA_CPU_NAME=generic LLVM has no x86 extension: nothing AVX2 compiles, the results are the same."""
    report = run_workload({"NUMBA_CPU_NAME": "generic"})
    assert report["results"] == reference_results
    assert report["available"] is False and report["linear_backend"] == "numba"
    assert report["compiled_avx2"] == [] and report["compiled_sparse_avx2"] == [] and report["compiled_avx512"] == []


def test_an_avx2_only_llvm_target_compiles_the_avx2_kernels_and_agrees(reference_results):
    """Compiled for an AVX2-only CPU (LLVM targets Skylake without AVX-512, so no EVEX instruction can appear, as
    on the machines without AVX-512 where users run nanoopt): the 256-bit kernels run and give the reference's
    integers. ``NANOOPT_CPU_FEATURES=avx2`` alone narrows the kernel choice but leaves LLVM on the host's CPU."""
    host = _host_and_target()[0]
    if not all(host.get(feature) for feature in ("avx2", "fma", "bmi2", "f16c", "movbe")):
        pytest.skip("this CPU cannot run code compiled for Skylake (it lacks AVX2 or one of its companions)")
    report = run_workload(dict(AVX2_TARGET))
    assert report["results"] == reference_results
    assert report["available"] is True and report["kernel"] == "avx2" and report["int8_kernel"] == "avx2"
    assert report["linear_backend"] == report["conv_backend"] == "avx2"
    assert report["compiled_avx512"] == [] and vnni_functions(report) == []


def test_reference_results_are_not_trivial(reference_results):
    """The compared workload is not all zeros or saturated (a comparison of constants could not fail)."""
    for name, (dtype, shape, values) in reference_results.items():
        values = np.array(values)
        assert values.size == np.prod(shape) and len(np.unique(values)) > 10, (name, dtype)
