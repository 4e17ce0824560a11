"""The ``nanoopt`` command.

``nanoopt demo`` trains small models on the bundled 8x8 digits (offline, well under a minute on 2 cores) and
prints one table: accuracy, parameters, stored size, sparsity and latency of each model. Each technique of the
library adds its rows to the demo as it lands; every number is measured in the run that prints it.

``nanoopt info`` prints the versions, the kernel backend and the CPU features that nanoopt sees.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np

import nanoopt as no
from nanoopt import data, models, report


def demo(seed: int = 0, epochs: int = 20, progress: bool = False) -> list[report.Row]:
    """Train the float baselines on the bundled digits and return the measured rows."""
    train_set, test_set = data.load_digits("train"), data.load_digits("test")
    rows = []
    for name, build in (("LeNet-300-100 float32", lambda: models.lenet_300_100(in_features=64)),
                        ("LeNet-5 (8x8) float32", lambda: models.lenet5(input_size=8))):
        no.manual_seed(seed)
        model = build()
        start = time.perf_counter()
        no.fit(model, train_set, epochs=epochs, lr=0.05, momentum=0.9, batch_size=32, progress=progress)
        seconds = time.perf_counter() - start
        rows.append(report.measure(name, model, test_set, note=f"trained {epochs} epochs in {seconds:.1f} s"))
    return rows


def _info() -> str:
    lines = [f"nanoopt {no.__version__}", f"python {platform.python_version()} on {platform.machine()}",
             f"numpy {np.__version__}"]
    try:
        import llvmlite.binding as llvm
        import numba

        features = llvm.get_host_cpu_features()
        lines.append(f"numba {numba.__version__}; CPU {llvm.get_host_cpu_name()}; "
                     f"avx2={'yes' if features.get('avx2') else 'no'}")
    except Exception as error:  # pragma: no cover - information only
        lines.append(f"numba unavailable: {error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoopt", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train and compress small models on the bundled digits")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--epochs", type=int, default=20)
    demo_parser.add_argument("--progress", action="store_true", help="show progress bars")
    commands.add_parser("info", help="versions and CPU features")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(_info())
        return 0
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
