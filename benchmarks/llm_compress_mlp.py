"""The LLM-era one-shot methods on a small trained MLP: weight-only RTN / GPTQ / AWQ / AWQ + GPTQ at 3 and 2 bits,
and magnitude / Wanda / SparseGPT pruning at 50 % and 2:4, all without finetuning.

Protocol (every number measured in this run, mean over ``--seeds`` training seeds):

* data: Fashion-MNIST when Debian's ``dataset-fashion-mnist`` files are present, else the bundled 8x8 digits;
* model: LeNet-300-100 (Flatten, 300, ReLU, 100, ReLU, classes), or the MLP of ``--hidden`` (e.g. 256,256),
  trained with SGD (lr 0.05, momentum 0.9, batch 128) for ``--epochs`` epochs;
* calibration: the first ``--calibration`` training images (batches of 128), the same for every method;
* every Linear layer is compressed (the classifier included); the weight grids are per output row by default
  (LeNet's widths 300 and 100 share no power-of-two group size with the inputs), or per ``--group-size``
  inputs; asymmetric (min-max) unless the row says symmetric;
* pruning: "magnitude" is ``prune.l1_unstructured`` per layer (50 %) or ``prune.nm_sparsity`` (2:4); "magnitude
  per row" prunes the same count in every row (Wanda's comparison group with |w| alone);
* reported: test accuracy and test cross-entropy, their change against the float model, and the seconds the
  method took (calibration included).

    python -m benchmarks.llm_compress_mlp [--seeds 3] [--epochs 20] [--calibration 1024]
    python -m benchmarks.llm_compress_mlp --hidden 256,256 --group-size 16     # 16 divides 784, 64 and 256
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import git_revision, machine_description  # noqa: E402
from nanoopt import data, models, nn, prune, quant  # noqa: E402
from nanoopt.prune.calibrated import row_mask  # noqa: E402


def load_data() -> tuple[str, tuple, tuple]:
    try:
        return "Fashion-MNIST", data.load_fashion_mnist("train"), data.load_fashion_mnist("test")
    except (FileNotFoundError, OSError, ValueError):
        return "digits (bundled, 8x8)", data.load_digits("train"), data.load_digits("test")


def magnitude(model: nn.Module, per_row: bool = False, nm: bool = False) -> nn.Module:
    pruned = copy.deepcopy(model)
    for layer in pruned.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if nm:
            prune.nm_sparsity(layer, "weight", n=2, m=4)
        elif per_row:
            weight = layer.weight.data
            prune.custom_from_mask(layer, "weight", row_mask(np.abs(weight), int(round(0.5 * weight.shape[1]))))
        else:
            prune.l1_unstructured(layer, "weight", amount=0.5)
    return pruned


def methods(calibration: list[np.ndarray], g: int | None) -> list[tuple[str, Callable[[nn.Module], nn.Module]]]:
    rows: list[tuple[str, Callable[[nn.Module], nn.Module]]] = []
    for bits in (3, 2):
        rows += [
            (f"W{bits} RTN symmetric", lambda m, b=bits: quant.rtn(m, b, g, symmetric=True)),
            (f"W{bits} RTN", lambda m, b=bits: quant.rtn(m, b, g)),
            (f"W{bits} GPTQ", lambda m, b=bits: quant.gptq(m, calibration, b, g)),
            (f"W{bits} GPTQ act-order", lambda m, b=bits: quant.gptq(m, calibration, b, g, act_order=True)),
            (f"W{bits} AWQ", lambda m, b=bits: quant.awq(m, calibration, b, g)),
            (f"W{bits} AWQ clip", lambda m, b=bits: quant.awq(m, calibration, b, g, clip=True)),
            (f"W{bits} AWQ + GPTQ", lambda m, b=bits: quant.awq(m, calibration, b, g, rounding="gptq")),
        ]
    rows += [
        ("50 % magnitude", lambda m: magnitude(m)),
        ("50 % magnitude per row", lambda m: magnitude(m, per_row=True)),
        ("50 % Wanda", lambda m: prune.wanda(copy.deepcopy(m), calibration, sparsity=0.5)),
        ("50 % SparseGPT", lambda m: prune.sparsegpt(copy.deepcopy(m), calibration, sparsity=0.5)),
        ("2:4 magnitude", lambda m: magnitude(m, nm=True)),
        ("2:4 Wanda", lambda m: prune.wanda(copy.deepcopy(m), calibration, n=2, m=4)),
        ("2:4 SparseGPT", lambda m: prune.sparsegpt(copy.deepcopy(m), calibration, n=2, m=4)),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--hidden", default=None, help="hidden widths of an MLP instead of LeNet-300-100, e.g. 256,256")
    parser.add_argument("--group-size", type=int, default=None, help="inputs per weight grid (default: one per row)")
    args = parser.parse_args()
    name, train, test = load_data()
    features = int(np.prod(train[0].shape[1:]))
    calibration = [train[0][start:start + 128] for start in range(0, args.calibration, 128)]
    results: dict[str, list[tuple[float, float, float]]] = {}
    for seed in range(args.seeds):
        no.manual_seed(seed)
        model = (models.lenet_300_100(in_features=features) if args.hidden is None
                 else models.mlp(features, [int(width) for width in args.hidden.split(",")]))
        no.fit(model, train, epochs=args.epochs, lr=0.05, momentum=0.9, batch_size=128, progress=False)
        scores = no.evaluate(model, test)
        results.setdefault("float", []).append((scores["accuracy"], scores["loss"], 0.0))
        for label, method in methods(calibration, args.group_size):
            start = time.perf_counter()
            compressed = method(model)
            seconds = time.perf_counter() - start
            scores = no.evaluate(compressed, test)
            results.setdefault(label, []).append((scores["accuracy"], scores["loss"], seconds))
    float_accuracy, float_loss, _ = np.mean(results["float"], axis=0)
    architecture = "LeNet-300-100" if args.hidden is None else f"an MLP {features}-{args.hidden.replace(',', '-')}"
    print(f"## One-shot LLM-style compression of {architecture} ({name}), no finetuning\n")
    print(f"Machine: {machine_description()}; git {git_revision()}\n")
    print(f"{args.seeds} training seeds, {args.epochs} epochs; calibration: {args.calibration} training images; "
          f"{'per-row' if args.group_size is None else f'group size {args.group_size}'} weight grids; every Linear "
          "layer compressed.\n")
    print("| method | test accuracy | delta | test loss | delta | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, values in results.items():
        accuracy, loss, seconds = np.mean(values, axis=0)
        print(f"| {label} | {100 * accuracy:.2f} % | {100 * (accuracy - float_accuracy):+.2f} | {loss:.4f} | "
              f"{loss - float_loss:+.4f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
