"""The ``nanoopt`` command.

``nanoopt demo`` trains small models on the bundled 8x8 digits (offline, under a minute on 2 cores) and
prints one table: accuracy, parameters, stored size, sparsity and latency of each model, for every technique and
one combined recipe (:mod:`nanoopt.demo`); every number is measured in the run that prints it.
``--dataset fashion-mnist`` is the full-size version, ``--model gpt`` the transformer one (a small GPT trained
briefly on Shakespeare, then GPTQ, SmoothQuant W8A8, SparseGPT and head removal, by validation loss).

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
import os
import platform
import sys
import time
from collections.abc import Sequence

import llvmlite.binding as llvm
import numba
import numpy as np

import nanoopt as no
from nanoopt import kernels, report, runtime
from nanoopt.demo import GPT_SIZES, demo, demo_data, gpt_demo
from nanoopt.interop.inspection import format_inspection, inspect_file
from nanoopt.kernels.choices import kernel_choices
from nanoopt.pipeline.cli import compress_command, plot_command

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


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    progress = sys.stderr.isatty() if args.progress is None else args.progress and sys.stderr.isatty()
    start = time.perf_counter()
    if args.model == "gpt":
        if args.iters < 1:
            parser.error(f"--iters must be >= 1, got {args.iters}")
        if args.dataset != "digits" or args.epochs is not None:
            parser.error("--model gpt trains on Shakespeare for --iters steps; --dataset and --epochs are for the "
                         "image models")
        sizes = ", ".join(f"{key} {value}" for key, value in GPT_SIZES.items())
        print(f"nanoopt demo --model gpt: a character-level GPT ({sizes}) trained {args.iters} steps on "
              "Shakespeare (bundled)\n")
        rows = gpt_demo(seed=args.seed, iters=args.iters, progress=progress)
        print(report.format_table(rows))
        print(f"\n(total {time.perf_counter() - start:.1f} s; validation loss in nats per character on "
              "256 fixed windows of the last 10% of the text; tokens/s: greedy generation, batch 1, KV cache)")
        return 0
    epochs = args.epochs if args.epochs is not None else (20 if args.dataset == "digits" else 5)
    if epochs < 1:
        parser.error(f"--epochs must be >= 1, got {epochs}")
    try:
        dataset = demo_data(args.dataset)
    except FileNotFoundError as error:
        print(f"nanoopt demo: {error}", file=sys.stderr)
        return 2
    print(f"nanoopt demo: {dataset.description}\n")
    rows = demo(seed=args.seed, epochs=epochs, progress=progress, dataset=dataset)
    print(report.format_table(rows))
    print(f"\n(total {time.perf_counter() - start:.1f} s; latency per batch of 256 test images, 1 process)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as a command (not called from Python)
        _single_threaded_blas()
    parser = argparse.ArgumentParser(prog="nanoopt", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"nanoopt {no.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train and compress small models on the bundled digits")
    demo_parser.add_argument("--seed", type=_seed, default=0, help="random seed (an integer >= 0)")
    demo_parser.add_argument("--epochs", type=int, default=None,
                             help="training epochs (default: 20 on digits, 5 on fashion-mnist)")
    demo_parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits",
                             help="digits: bundled 8x8 (default); fashion-mnist: the full-size version (Debian's "
                                  "dataset-fashion-mnist)")
    demo_parser.add_argument("--model", choices=("cnn", "gpt"), default="cnn",
                             help="cnn: the image models (default); gpt: a character-level GPT on Shakespeare")
    demo_parser.add_argument("--iters", type=int, default=300, help="--model gpt: training steps (default 300)")
    demo_parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                             help="progress bars (default: only when the output is a terminal)")
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
    return _demo(args, parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
