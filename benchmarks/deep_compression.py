"""Deep Compression (Han, Mao & Dally 2016) of LeNet-300-100 on Fashion-MNIST from one recipe:
``examples/recipes/deep_compression_lenet300.toml`` (train 20 epochs -> gradual pruning to 92% while distilling
-> 4-bit QAT while distilling -> convert -> sparse, entropy-coded file), run through ``nanoopt.pipeline``.

Target: the file is >= 40x smaller than the float32 checkpoint, and the compressed model is <= 0.5 points below a
float model trained for the same number of epochs (from scratch, same schedule). Prints the recipe's report.

    python -m benchmarks.deep_compression
    python -m benchmarks.deep_compression --output runs/deep_compression   # keep the model, report.json and PNGs
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import git_revision, machine_description  # noqa: E402
from nanoopt import data  # noqa: E402
from nanoopt.pipeline import Recipe, run_recipe  # noqa: E402
from nanoopt.pipeline.runner import markdown  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "recipes" / "deep_compression_lenet300.toml"


def main() -> None:
    if not data.fashion_mnist_available():
        print("Fashion-MNIST is not installed (Debian's dataset-fashion-mnist); nothing measured")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None,
                        help="folder to keep the compressed model, its report.json and the report's plots in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output or Path(scratch)
        result = run_recipe(Recipe.from_file(RECIPE), output=str(folder), progress=False)
        if args.output is not None:
            from nanoopt.pipeline.plot import plot_report  # optional extra "plot" (matplotlib)

            plot_report(folder / "report.json", folder)
    ratio = result["baseline"]["stored_bytes"] / result["compressed"]["stored_bytes"]
    drop = 100 * (result["reference"]["accuracy"] - result["compressed"]["accuracy"])
    print(f"## Deep Compression, LeNet-300-100 on Fashion-MNIST (`{RECIPE.relative_to(RECIPE.parents[2])}`)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print(f"Target: >= 40x smaller and <= 0.5 points below the float model trained as long: {ratio:.1f}x, "
          f"{drop:+.2f} points below: {'met' if ratio >= 40 and drop <= 0.5 else 'NOT met'}\n")
    print(markdown(result).split("\n", 2)[2])


if __name__ == "__main__":
    main()
