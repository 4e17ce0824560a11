"""The ``nanoopt`` command.

``nanoopt demo`` trains small models on the bundled 8x8 digits (offline, well under a minute on 2 cores) and
prints one table: accuracy, parameters, stored size, sparsity and latency of each model. Each technique of the
library adds its rows to the demo as it lands; every number is measured in the run that prints it.

``nanoopt compress --recipe FILE`` runs a compression recipe (:mod:`nanoopt.pipeline`) and ``nanoopt plot REPORT``
draws its plots.

``nanoopt info`` prints the versions, the CPU features that nanoopt sees, and the kernel backend chosen for each
integer operation here (:func:`nanoopt.kernels.choices.kernel_choices`). ``nanoopt --version`` prints the version.

``nanoopt inspect FILE`` describes a checkpoint or model file (.npz, .safetensors, .pth/.pt, .onnx): layers,
parameter counts, dtypes, stored bytes, sparsity and bit-widths (``--tensors``: one row per tensor).

``nanoopt precompile plan.npz [--batch-sizes 1 256]`` loads a saved runtime plan (:mod:`nanoopt.runtime`) and runs
it once per batch size, so that Numba compiles every kernel the plan uses into its on-disk cache: a deployed
process that loads the same plan on this machine (same CPU, Python, NumPy, Numba and nanoopt installation, same
``NUMBA_CACHE_DIR`` if set) then loads compiled code instead of compiling on its first call.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Sequence

import llvmlite.binding as llvm
import numba
import numpy as np

import nanoopt as no
from nanoopt import data, kernels, models, nn, prune, quant, report, runtime
from nanoopt.distill.demo import demo_rows as distill_demo_rows
from nanoopt.interop.inspection import format_inspection, inspect_file
from nanoopt.kernels.choices import kernel_choices
from nanoopt.pipeline.cli import compress_command, plot_command


def _train(model: nn.Module, train_set: tuple, epochs: int, lr: float, progress: bool) -> float:
    start = time.perf_counter()
    no.fit(model, train_set, epochs=epochs, lr=lr, momentum=0.9, batch_size=32, progress=progress)
    return time.perf_counter() - start


def demo(seed: int = 0, epochs: int = 20, progress: bool = False) -> list[report.Row]:
    """Train the float baselines on the bundled digits, compress them, and return the measured rows."""
    train_set, test_set = data.load_digits("train"), data.load_digits("test")
    rows = []
    baselines = {}
    for name, build in (("LeNet-300-100 float32", lambda: models.lenet_300_100(in_features=64)),
                        ("LeNet-5 (8x8) float32", lambda: models.lenet5(input_size=8))):
        no.manual_seed(seed)
        model = build()
        seconds = _train(model, train_set, epochs, 0.05, progress)
        rows.append(report.measure(name, model, test_set, note=f"trained {epochs} epochs in {seconds:.1f} s"))
        baselines[name] = model
    rows += _pruning_rows(baselines["LeNet-300-100 float32"], train_set, test_set, seed, progress)
    rows += _quantization_rows(baselines, train_set, test_set)
    rows += _qat_rows(baselines["LeNet-5 (8x8) float32"], train_set, test_set, seed, progress)
    rows += distill_demo_rows(baselines["LeNet-5 (8x8) float32"], train_set, test_set, seed=seed, epochs=epochs,
                              progress=progress)
    return rows


def _qat_rows(trained: nn.Module, train_set: tuple, test_set: tuple, seed: int, progress: bool) -> list[report.Row]:
    """Two epochs of quantization-aware training (int8, and 4-bit weights) from the float LeNet-5, converted."""
    rows = []
    batch = 32
    steps_per_epoch = -(-len(train_set[1]) // batch)
    for label, config in (("int8", None), ("W4A8", quant.qat_config(weight=quant.weight_spec(4)))):
        no.manual_seed(seed)
        prepared = quant.prepare_qat(copy.deepcopy(trained), config, example_input=train_set[0][:1])
        start = time.perf_counter()
        no.fit(prepared, train_set, epochs=2, lr=0.01, batch_size=batch, progress=progress,
               callbacks=[quant.QATSchedule(freeze_observers_after=steps_per_epoch)])
        seconds = time.perf_counter() - start
        rows.append(report.measure(f"LeNet-5 (8x8) {label} QAT", quant.convert(prepared), test_set,
                                   note=f"+2 QAT epochs in {seconds:.1f} s, then converted to integers"))
    return rows


def _quantization_rows(baselines: dict[str, nn.Module], train_set: tuple, test_set: tuple) -> list[report.Row]:
    """int8 post-training quantization of both baselines (256 calibration images), and 4-bit weight-only."""
    rows = []
    calibration = train_set[0][:256]
    for name, model in baselines.items():
        start = time.perf_counter()
        integer_model = quant.quantize_static(model, calibration, progress=False)
        quant.tune_backends(integer_model, test_set[0][:256])
        seconds = time.perf_counter() - start
        short = name.replace(" float32", "")
        rows.append(report.measure(f"{short} int8 PTQ (static, per-channel)", integer_model, test_set,
                                   note=f"calibrated + converted in {seconds:.1f} s; integer kernels"))
    model = baselines["LeNet-300-100 float32"]
    rows.append(report.measure("LeNet-300-100 4-bit weights (groups of 16)",
                               quant.quantize_weights(model, bits=4, group_size=16), test_set,
                               note="weight-only; int4 packed two per byte"))
    return rows


def _pruning_rows(trained: nn.Module, train_set: tuple, test_set: tuple, seed: int,
                  progress: bool) -> list[report.Row]:
    """Global magnitude pruning to 90% with a short finetune, and 50% of the hidden neurons removed physically."""
    finetune = 3
    rows = []
    no.manual_seed(seed)
    model = copy.deepcopy(trained)
    prune.global_unstructured(prune.prunable_parameters(model), amount=0.9)
    seconds = _train(model, train_set, finetune, 0.01, progress)
    prune.remove_all(model)
    rows.append(report.measure("LeNet-300-100 pruned 90% (global L1)", model, test_set,
                               note=f"+{finetune} finetune epochs in {seconds:.1f} s; zeros stored densely"))
    no.manual_seed(seed)
    model = copy.deepcopy(trained)
    for index in (1, 3):  # the two hidden Linear layers
        prune.ln_structured(model[index], "weight", amount=0.5, n=1, dim=0)
    seconds = _train(model, train_set, finetune, 0.01, progress)
    prune.shrink(model, test_set[0][:32])
    prune.remove_all(model)
    widths = "-".join(str(model[i].out_features) for i in (1, 3))
    rows.append(report.measure(f"LeNet-300-100 50% neurons removed ({widths})", model, test_set,
                               note=f"+{finetune} finetune epochs in {seconds:.1f} s; physically smaller"))
    return rows


CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512vnni", "avxvnni")  # the ones nanoopt's kernels can use


def _info() -> str:
    lines = [f"nanoopt {no.__version__}", f"python {platform.python_version()} on {platform.machine()}",
             f"numpy {np.__version__}"]
    try:
        features = llvm.get_host_cpu_features()
        flags = ", ".join(f"{name}={'yes' if features.get(name) else 'no'}" for name in CPU_FEATURES)
        lines.append(f"numba {numba.__version__}; CPU {llvm.get_host_cpu_name()}; {flags}")
    except Exception as error:  # pragma: no cover - information only
        lines.append(f"numba unavailable: {error}")
        return "\n".join(lines)
    disabled = os.environ.get("NANOOPT_DISABLE_AVX2", "")
    lines.append(f"kernel backend: {kernels.get_backend()}"
                 + (f" (NANOOPT_DISABLE_AVX2={disabled})" if disabled not in ("", "0") else ""))
    choices = kernel_choices()
    width = max(len(choice.operation) for choice in choices)
    for choice in choices:
        why = f"  ({choice.reason})" if choice.reason else ""
        lines.append(f"  {choice.operation:<{width}}  {choice.backend}{why}")
    return "\n".join(lines)


def _seed(text: str) -> int:
    """argparse type of ``--seed``: a non-negative int (what :func:`nanoopt.manual_seed` accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _single_threaded_blas() -> None:
    """Re-run this command once with one BLAS thread (the models here are small: on a shared 2-core machine
    OpenBLAS's thread hand-offs cost far more than they gain). OpenBLAS reads the variable only at load time."""
    wanted = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    if all(name in os.environ for name in wanted):
        return
    environment = dict(os.environ)
    for name in wanted:
        environment.setdefault(name, "1")
    os.execve(sys.executable, [sys.executable, "-m", "nanoopt.cli", *sys.argv[1:]], environment)


def _precompile(path: str, batch_sizes: list[int], parser: argparse.ArgumentParser) -> int:
    if min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {batch_sizes}")
    start = time.perf_counter()
    try:
        plan = runtime.load(path)
        runtime.precompile(plan, batch_sizes)
    except (OSError, ValueError) as error:
        print(f"nanoopt precompile: {error}", file=sys.stderr)
        return 1
    print(f"{path}: {plan!r}; ran batch sizes {batch_sizes} in {time.perf_counter() - start:.1f} s (Numba cache "
          f"filled)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as a command (not called from Python)
        _single_threaded_blas()
    parser = argparse.ArgumentParser(prog="nanoopt", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"nanoopt {no.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train and compress small models on the bundled digits")
    demo_parser.add_argument("--seed", type=_seed, default=0, help="random seed (an integer >= 0)")
    demo_parser.add_argument("--epochs", type=int, default=20)
    demo_parser.add_argument("--progress", action="store_true", help="show progress bars")
    commands.add_parser("info", help="versions, CPU features and the kernel chosen for each operation")
    inspect_parser = commands.add_parser("inspect", help="layers, sizes, sparsity and bit-widths stored in a file")
    inspect_parser.add_argument("file", help=".npz, .safetensors, .pth/.pt or .onnx")
    inspect_parser.add_argument("--tensors", action="store_true", help="one row per tensor instead of per layer")
    precompile_parser = commands.add_parser("precompile", help="fill Numba's cache for a saved runtime plan")
    precompile_parser.add_argument("plan", help="a plan file written by nanoopt.runtime.save")
    precompile_parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256],
                                   help="batch sizes to run (default: 1 256)")
    compress_parser = commands.add_parser("compress", help="run a compression recipe (TOML or JSON)")
    compress_parser.add_argument("--recipe", required=True, help="the recipe file (.toml or .json)")
    compress_parser.add_argument("--output", default=None, help="output folder (default: the recipe's run.output)")
    compress_parser.add_argument("--progress", action="store_true", help="show progress bars (on a terminal)")
    plot_parser = commands.add_parser("plot", help="PNG plots from a report.json (needs the extra 'plot')")
    plot_parser.add_argument("report", help="a report.json written by compress, or a sweep's JSON table")
    plot_parser.add_argument("--output", default=None, help="folder for the PNGs (default: beside the report)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(_info())
        return 0
    if args.command == "inspect":
        if not os.path.isfile(args.file):
            parser.error(f"inspect: no such file: {args.file}")
        print(format_inspection(inspect_file(args.file), tensors=args.tensors))
        return 0
    if args.command == "precompile":
        return _precompile(args.plan, args.batch_sizes, parser)
    if args.command in ("compress", "plot"):
        return compress_command(args) if args.command == "compress" else plot_command(args)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    start = time.perf_counter()
    train_count, test_count = len(data.load_digits("train")[1]), len(data.load_digits("test")[1])
    print(f"nanoopt demo: 8x8 handwritten digits ({train_count:,} train / {test_count} test images, bundled)\n")
    rows = demo(seed=args.seed, epochs=args.epochs, progress=args.progress)
    print(report.format_table(rows))
    print(f"\n(total {time.perf_counter() - start:.1f} s; latency per batch of 256 test images, 1 process)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
