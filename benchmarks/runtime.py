"""Deployment latency: LeNet-300-100 and LeNet-5 at batch 1 and 256, nanoopt's runtime plans against PyTorch and
ONNX Runtime in the same run, one thread.

Every framework runs the same random-init weights (nanoopt's, copied into PyTorch twins), calibrated on the same
512 images. Columns: nanoopt float and int8 through ``nanoopt.runtime.compile`` (the plan), nanoopt int8 through
the converted Module (``QuantizedModel``), PyTorch int8 (eager mode, ``x86`` engine, ``torch.ao.quantization``),
ONNX Runtime float and int8 (the PyTorch twin exported with ``torch.onnx.export``, quantized with
``onnxruntime.quantization.quantize_static``, QDQ, per-channel weights). Median of 300 calls at batch 1, 30 at
batch 256, in blocks of 10 consecutive calls per framework taking turns, so that load on the machine hits every
column alike. The optional frameworks are measured when installed, else marked.

Then: the plan's kernel-only time (the boundary kernels -- input quantization with its finiteness check, output
dequantization -- and the layers' kernel calls, each timed by itself inside one call) and its overhead per layer
(the rest of that call: input checks, buffer lookup, the loop, the output allocation, median and mean);
pruned LeNet-300-100 through float plans (90% unstructured on the CSR kernels, 50% of the neurons physically
removed) against the dense float plan at batch 1; and the runtime's cold start (import, load + first call of the
int8 LeNet-5 plan in fresh interpreters: with an empty Numba cache, warm, and after ``nanoopt precompile``; on the
CPU's own features and with ``NANOOPT_CPU_FEATURES=avx2`` where that changes the int8 kernel, as on an AVX2-only
machine).

Then, like for like with PyTorch's ``reduce_range``: the int8 plans with 8-bit and with 7-bit activations
(``QuantConfig.x86_reduce_range()``) against PyTorch's int8 (whose x86 qconfig has 7-bit activations) and ONNX
Runtime's int8 without and with its ``reduce_range`` (7-bit weights).

    python -m benchmarks.runtime [--no-cold-start | --cold-start-only | --seven-bit-only]
                                 [--cold-start-features avx2] [--avx2-target]

``--avx2-target``: Numba compiles for an AVX2-only CPU (``benchmarks.common.AVX2_TARGET``: LLVM CPU ``skylake``, no
AVX-512, no VNNI), so that a newer machine runs nanoopt's code as an AVX2-only one would, and PyTorch its AVX2
kernels (``benchmarks.common.AVX2_BASELINES``). Where Linux can fault on CPUID (``cpuid_fault``; the machine line
says), CPUID itself reports an AVX2-only CPU to the whole process (``benchmarks.common.mask_cpuid_to_avx2``), so
ONNX Runtime, NumPy and OpenBLAS take their AVX2 code as well; without it, ONNX Runtime keeps the host's
instructions (its columns are then not an AVX2 baseline).
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from benchmarks.common import AVX2_TARGET_OPTION, pin_environment

    pin_environment(threads=1, avx2_target=AVX2_TARGET_OPTION in sys.argv)

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import git_revision, machine_description, torch_lenet  # noqa: E402
from nanoopt import models, prune, quant, runtime  # noqa: E402
from nanoopt.kernels import cpu_features  # noqa: E402

BATCHES = (1, 256)
CALLS = {1: 300, 256: 30}
CALIBRATION = 512


def interleaved_medians(functions: dict[str, Callable[[], object] | None], calls: int,
                        block: int = 10) -> dict[str, float | None]:
    """Median seconds per call of each function. The calls run in blocks of ``block`` consecutive calls per
    function (the first of each block is a warm-up and not counted, so caches are warm as in a serving loop), the
    blocks of the functions taking turns, so that load on a busy machine hits every column alike and the ratios of
    one run stay meaningful; ``None`` entries stay ``None``."""
    present = {name: fn for name, fn in functions.items() if fn is not None}
    for fn in present.values():
        fn()
        fn()  # compilation, buffers, caches
    times: dict[str, list[float]] = {name: [] for name in present}
    for _ in range(-(-calls // block)):
        for name, fn in present.items():
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(times[name])) if name in times else None for name in functions}


def build(name: str):
    no.manual_seed(0)
    model = models.lenet_300_100() if name == "LeNet-300-100" else models.lenet5()
    return model.eval()


# ------------------------------------------------------------------------------------------------- PyTorch
def torch_twin(name: str, model):
    """The PyTorch model with nanoopt's weights (same layer order, same state_dict keys), or None."""
    twin = torch_lenet(name)
    if twin is None:
        return None
    import torch  # installed: torch_lenet built the twin

    twin.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in model.state_dict().items()})
    return twin.eval()


def torch_int8(twin, calibration: np.ndarray):
    """PyTorch eager-mode static int8 (x86 engine, fused conv/linear + ReLU)."""
    import torch
    from torch.ao import quantization as tq

    torch.backends.quantized.engine = "x86"
    layers = list(twin)
    fuse = [[str(i), str(i + 1)] for i in range(len(layers) - 1)
            if isinstance(layers[i], torch.nn.Conv2d | torch.nn.Linear) and isinstance(layers[i + 1], torch.nn.ReLU)]
    import copy

    fused = tq.fuse_modules(copy.deepcopy(twin), fuse)
    wrapped = torch.nn.Sequential(tq.QuantStub(), fused, tq.DeQuantStub()).eval()
    wrapped.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(wrapped)
        with torch.no_grad():
            for begin in range(0, len(calibration), 128):
                prepared(torch.from_numpy(calibration[begin:begin + 128]))
        return tq.convert(prepared)


def torch_call(model, x: np.ndarray):
    import torch

    tensor = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            return model(tensor)

    return run


# ---------------------------------------------------------------------------------------------- ONNX Runtime
def onnx_sessions(twin, calibration: np.ndarray, folder: Path, reduce_range: bool = False):
    """(float session, int8 QDQ per-channel session), or None when torch/onnx/onnxruntime are missing. With
    ``reduce_range``, ONNX Runtime's ``quantize_static(reduce_range=True)``: 7-bit *weights* (its remedy for the
    saturation of ``vpmaddubsw`` on CPUs without VNNI; its activations stay 8-bit)."""
    try:
        import onnxruntime as ort
        import torch
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    except ImportError:
        return None
    float_path, int8_path = folder / "model.onnx", folder / f"model.int8{'.reduce_range' if reduce_range else ''}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(twin, (torch.from_numpy(calibration[:1]),), str(float_path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
                          opset_version=17)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calibration[i:i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    make = lambda path: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # noqa: E731
    return make(float_path), make(int8_path)


def onnx_call(session, x: np.ndarray):
    return lambda: session.run(None, {"x": x})


# --------------------------------------------------------------------------------------------------- tables
def _us(seconds: float | None) -> str:
    if seconds is None:
        return "not installed"
    return f"{seconds * 1e6:,.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _x(reference: float | None, seconds: float) -> str:
    return "" if reference is None else f" ({reference / seconds:.2f}x)"


def latency_table(images: np.ndarray, calibration: np.ndarray, folder: Path) -> list[str]:
    lines = ["| model, batch | nanoopt float plan | nanoopt int8 plan | nanoopt int8 Module | PyTorch int8 (eager, "
             "x86) | ONNX Runtime float | ONNX Runtime int8 (QDQ, per-channel) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    overhead_lines = []
    for name in ("LeNet-300-100", "LeNet-5"):
        model = build(name)
        qmodel = quant.quantize_static(model, calibration, progress=False)
        float_plan, int8_plan = runtime.compile(model, images[:1]), runtime.compile(qmodel)
        twin = torch_twin(name, model)
        torch_q = torch_int8(twin, calibration) if twin is not None else None
        sessions = onnx_sessions(twin, calibration, folder) if twin is not None else None
        for batch in BATCHES:
            x = np.ascontiguousarray(images[:batch])
            calls = CALLS[batch]
            assert np.array_equal(int8_plan(x), qmodel(x).data)  # the plan is the integer model, bit for bit
            medians = interleaved_medians({
                "plan float": lambda p=float_plan, x=x: p(x), "plan int8": lambda p=int8_plan, x=x: p(x),
                "module int8": lambda m=qmodel, x=x: m(x),
                "torch int8": torch_call(torch_q, x) if torch_q is not None else None,
                "ort float": onnx_call(sessions[0], x) if sessions else None,
                "ort int8": onnx_call(sessions[1], x) if sessions else None}, calls)
            plan_float, plan_int8, module_int8 = medians["plan float"], medians["plan int8"], medians["module int8"]
            torch_int8_s, ort_float, ort_int8 = medians["torch int8"], medians["ort float"], medians["ort int8"]
            lines.append(f"| {name}, {batch} | {_us(plan_float)}{_x(ort_float, plan_float)} | {_us(plan_int8)}"
                         f"{_x(ort_int8, plan_int8)} | {_us(module_int8)} | {_us(torch_int8_s)} | {_us(ort_float)} | "
                         f"{_us(ort_int8)} |")
            for label, plan in (("int8", int8_plan), ("float", float_plan)):
                profile = plan.profile(x, repeats=calls)
                layers = sum(1 for calls_of_step in plan._bound[x.shape].per_step if calls_of_step)
                edge = "quantize + dequantize" if label == "int8" else "input and output copies"
                overhead_lines.append(
                    f"- {name}, batch {batch}, {label} plan: {_us(profile['whole'])} per call; kernels "
                    f"{_us(profile['kernels'])} ({profile['calls']} layer kernel calls in {layers} layers, plus the "
                    f"boundary kernels, {edge}: {profile['boundary'] * 1e6:.1f} us); overhead "
                    f"{profile['overhead'] * 1e6:.1f} us = {profile['overhead'] * 1e6 / layers:.2f} us per layer "
                    f"(mean {profile['overhead_mean'] * 1e6 / layers:.2f})")
    return lines + ["", "(x): ONNX Runtime's time / nanoopt's, for the same precision (above 1: nanoopt is faster).",
                    "", "Kernel-only time and the plan's overhead (`Plan.profile`, medians of instrumented calls): "
                    "kernels = the boundary kernels (the int8 input quantization, which also checks that every "
                    "value is finite, in one pass; the output dequantization) plus every layer's kernel calls, "
                    "each timed by itself inside the call; overhead = that call's time minus its kernels: input "
                    "type/dtype/shape check, buffer lookup, the loop over the calls, taking a new output array and "
                    "the profiler's clock reads, divided by the layers that run kernels; median, and in brackets the "
                    "mean, which includes the output arrays' allocation (in runs, one call in several).", "",
                    *overhead_lines]


def seven_bit_table(images: np.ndarray, calibration: np.ndarray, folder: Path) -> list[str]:
    """Like for like with PyTorch's ``reduce_range``: our int8 plan with 7-bit activations
    (``QuantConfig.x86_reduce_range()``, codes in [-64, 63]: on AVX2 without VNNI the 3-instruction tile) beside the
    default 8-bit one, PyTorch's eager int8 (its x86 default qconfig already has ``reduce_range=True``: 7-bit
    activations) and ONNX Runtime's int8 without and with its ``reduce_range`` (7-bit weights)."""
    lines = ["| model, batch | nanoopt int8 plan, 8-bit activations | nanoopt int8 plan, 7-bit activations "
             "(x86_reduce_range) | PyTorch int8 (eager, x86: reduce_range) | ONNX Runtime int8 (QDQ, per-channel) | "
             "ONNX Runtime int8, reduce_range (7-bit weights) |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("LeNet-300-100", "LeNet-5"):
        model = build(name)
        plans = {bits: runtime.compile(quant.quantize_static(model, calibration, config, progress=False))
                 for bits, config in ((8, quant.QuantConfig()), (7, quant.QuantConfig.x86_reduce_range()))}
        twin = torch_twin(name, model)
        torch_q = torch_int8(twin, calibration) if twin is not None else None
        sessions = [onnx_sessions(twin, calibration, folder, reduce) if twin is not None else None
                    for reduce in (False, True)]
        for batch in BATCHES:
            x = np.ascontiguousarray(images[:batch])
            medians = interleaved_medians({
                "plan 8": _caller(plans[8], x), "plan 7": _caller(plans[7], x),
                "torch": torch_call(torch_q, x) if torch_q is not None else None,
                "ort": onnx_call(sessions[0][1], x) if sessions[0] else None,
                "ort rr": onnx_call(sessions[1][1], x) if sessions[1] else None}, CALLS[batch])
            seven = medians["plan 7"]
            lines.append(f"| {name}, {batch} | {_us(medians['plan 8'])}{_x(medians['ort'], medians['plan 8'])} | "
                         f"{_us(seven)}{_x(medians['ort rr'], seven)} | {_us(medians['torch'])}"
                         f"{_x(medians['torch'], seven)} | {_us(medians['ort'])} | {_us(medians['ort rr'])} |")
    return lines + ["", "(x) after a nanoopt time: the ONNX Runtime time in the same row (8-bit: without reduce_range; "
                    "7-bit: with it) / nanoopt's; after PyTorch's: PyTorch's time / nanoopt's 7-bit plan (above 1: "
                    "nanoopt is faster). ONNX Runtime's reduce_range narrows the weights, not the activations: the "
                    "nearest like-for-like it offers."]


def _caller(plan, x: np.ndarray) -> Callable[[], object]:
    return lambda: plan(x)


def pruned_table(images: np.ndarray) -> list[str]:
    x = np.ascontiguousarray(images[:1])
    dense = build("LeNet-300-100")
    sparse = build("LeNet-300-100")
    for index in (1, 3, 5):  # 90% of every layer's weights (a global ranking empties a layer of a random init)
        prune.l1_unstructured(sparse[index], "weight", amount=0.9)
    prune.sparse.to_sparse(sparse, format="csr")
    shrunk = build("LeNet-300-100")
    for index in (1, 3):
        prune.ln_structured(shrunk[index], "weight", amount=0.5, n=1, dim=0)
    prune.shrink(shrunk, images[:8])
    prune.remove_all(shrunk)
    medians = interleaved_medians({"dense": _caller(runtime.compile(dense, x), x),
                                   "sparse": _caller(runtime.compile(sparse.eval(), x), x),
                                   "shrunk": _caller(runtime.compile(shrunk.eval(), x), x)}, 300)
    dense_s, sparse_s, shrunk_s = medians["dense"], medians["sparse"], medians["shrunk"]
    return ["| LeNet-300-100 float plan, batch 1 | latency | dense time / this |", "|---|---:|---:|",
            f"| dense | {_us(dense_s)} | 1.00x |",
            f"| 90% unstructured, CSR kernels | {_us(sparse_s)} | {dense_s / sparse_s:.2f}x |",
            f"| 50% of the hidden neurons removed (shrink) | {_us(shrunk_s)} | {dense_s / shrunk_s:.2f}x |"]


COLD = """
import time
start = time.perf_counter()
import nanoopt.runtime as runtime
imported = time.perf_counter()
plan = runtime.load({path!r})
loaded = time.perf_counter()
import numpy as np
plan(np.zeros((1, 1, 28, 28), np.float32))
first = time.perf_counter()
plan(np.zeros((1, 1, 28, 28), np.float32))
second = time.perf_counter()
from nanoopt import kernels
print(imported - start, loaded - imported, first - loaded, second - first, kernels.int8_gemm_kernel())
"""


def _fresh_process(path: Path, features: str, cache: Path, precompile: bool = False) -> list[str]:
    """One row: a new interpreter with ``NANOOPT_CPU_FEATURES=features`` ("" for all the CPU has) and Numba's cache
    in ``cache`` imports the runtime, loads the plan, calls it twice (after ``nanoopt precompile`` in another new
    interpreter, if asked)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NANOOPT_")}
    env.update(NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if features:
        env["NANOOPT_CPU_FEATURES"] = features
    if precompile:
        subprocess.run([sys.executable, "-m", "nanoopt.cli", "precompile", str(path), "--batch-sizes", "1"],
                       env=env, capture_output=True, text=True, check=True)
    return subprocess.run([sys.executable, "-c", COLD.format(path=str(path))], env=env, capture_output=True,
                          text=True, check=True).stdout.split()


def cold_start(calibration: np.ndarray, folder: Path, feature_sets: list[str]) -> list[str]:
    """Import, load and first calls of the int8 LeNet-5 plan in fresh interpreters, per CPU feature set: with an
    empty Numba cache (a new directory), then warm (the same directory, after that run), then with a cache that
    only ``nanoopt precompile`` filled."""
    qmodel = quant.quantize_static(build("LeNet-5"), calibration, progress=False)
    path = folder / "lenet5.int8.plan.npz"
    runtime.save(runtime.compile(qmodel), path)
    rows = ["| int8 LeNet-5 plan, fresh process | NANOOPT_CPU_FEATURES (int8 GEMM) | import nanoopt.runtime | "
            "load plan | first call (batch 1) | second call |", "|---|---|---:|---:|---:|---:|"]
    for number, features in enumerate(feature_sets):
        cache, precompiled = folder / f"numba-cache-{number}", folder / f"numba-cache-{number}-precompiled"
        runs = [("empty Numba cache", _fresh_process(path, features, cache)),
                ("warm Numba cache (after the run above)", _fresh_process(path, features, cache)),
                ("after `nanoopt precompile` (empty cache before)",
                 _fresh_process(path, features, precompiled, precompile=True))]
        for label, out in runs:
            seconds = [float(value) for value in out[:4]]
            rows.append(f"| {label} | {features or 'unset'} ({out[4]}) | {seconds[0]:.2f} s | "
                        f"{seconds[1]:.2f} s | {seconds[2]:.2f} s | {_us(seconds[3])} |")
    rows += ["", "`nanoopt precompile plan.npz` runs a saved plan once per batch size so that a deployed process "
             "starts with the warm cache. Python's own bytecode cache is warm in every row."]
    return rows


def _feature_sets(requested: str) -> list[str]:
    """The NANOOPT_CPU_FEATURES values to measure: "" (all the CPU has), then each requested one that the CPU has
    and that changes the int8 kernel (e.g. ``avx2`` on an AVX-512 or AVX-VNNI machine)."""
    usable = cpu_features.usable_features()
    sets = [""]
    for features in filter(None, requested.split(";")):
        wanted = cpu_features.allowed_features(features)
        if wanted and wanted <= usable and wanted != usable:
            sets.append(features)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-cold-start", action="store_true", help="skip the cold-start measurements")
    parser.add_argument("--cold-start-only", action="store_true", help="only the cold-start measurements")
    parser.add_argument("--cold-start-features", default="avx2",
                        help="NANOOPT_CPU_FEATURES values (';'-separated) measured besides the CPU's own features, "
                             "where the CPU has them and they change the kernel (default: avx2)")
    parser.add_argument("--seven-bit-only", action="store_true",
                        help="only the 7-bit activation (reduce_range) table")
    parser.add_argument("--avx2-target", action="store_true",
                        help="compile nanoopt's kernels for an AVX2-only CPU (benchmarks.common.AVX2_TARGET)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(256, 1, 28, 28)).astype(np.float32)
    calibration = rng.uniform(size=(CALIBRATION, 1, 28, 28)).astype(np.float32)
    print("## Deployment runtime (1 thread; latency per call, median)\n")
    print(f"Machine: {machine_description()}; git {git_revision()}\n")
    with tempfile.TemporaryDirectory() as folder:
        if not (args.cold_start_only or args.seven_bit_only):
            print("\n".join(latency_table(images, calibration, Path(folder))))
        if not args.cold_start_only:
            print("\n### 7-bit activations (PyTorch's reduce_range), like for like\n")
            print("\n".join(seven_bit_table(images, calibration, Path(folder))))
        if args.seven_bit_only:
            return
        if not args.cold_start_only:
            print("\n### Pruned models through the plan\n")
            print("\n".join(pruned_table(images)))
        if not args.no_cold_start:
            print("\n### Cold start\n")
            print("\n".join(cold_start(calibration, Path(folder), _feature_sets(args.cold_start_features))))


if __name__ == "__main__":
    main()
