"""Quantization-aware training on Fashion-MNIST (LeNet-5, LeNet-300-100) against float and PTQ, same epochs.

Protocol (every number measured in this run, mean over ``--seeds`` seeds; accuracy of the *converted integer
model* on the 10,000 test images):

* float: SGD (lr 0.05, momentum 0.9, batch 128) for 10 epochs, then 2 more at lr 0.01 -- the "float, 12 epochs"
  model every row is compared with (extra epochs alone raise accuracy here, so the comparison is at equal
  total epochs).
* QAT rows start from the 10-epoch float model and train 2 epochs at lr 0.01 with ``quant.prepare_qat``;
  observers (moving-average activation ranges, per-channel weight ranges re-fitted every step) freeze after the
  first QAT epoch; then ``quant.convert``. Every layer is quantized (first and last included).
  - int8: int8 per-channel weights, int8 activations;
  - W4A8: 4-bit per-channel weights ([-7, 7]), ranges from the observers or learned steps (LSQ);
  - W2 LSQ: 2-bit per-channel weights ([-2, 1]) with learned steps (Esser et al. 2020), int8 activations.
* PTQ rows quantize the 12-epoch float model (same total epochs) with ``quant.quantize_static`` (2,048
  calibration images; the PTQ defaults: histogram-MSE activation ranges; per-channel MSE weight ranges for 4 and 2
  bits).
* targets (issue 5): int8 QAT within 0.2 points of float; W4A8 QAT within 0.5 points and better than W4 PTQ;
  W2 LSQ clearly better than W2 PTQ.

    python -m benchmarks.qat [--seeds 3] [--models lenet5 lenet_300_100]
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import fashion_mnist, git_revision, machine_description  # noqa: E402
from nanoopt import models  # noqa: E402
from nanoopt.quant.config import QuantConfig, weight_spec  # noqa: E402
from nanoopt.quant.observers import PerChannelMSEObserver  # noqa: E402
from nanoopt.quant.ptq import convert, quantize_static  # noqa: E402
from nanoopt.quant.qat import QATSchedule, prepare_qat, qat_config  # noqa: E402
from nanoopt.spec import QuantSpec  # noqa: E402

BASE_EPOCHS, QAT_EPOCHS = 10, 2
LR, FINETUNE_LR, MOMENTUM, BATCH = 0.05, 0.01, 0.9, 128
CALIBRATION_IMAGES = 2048
W2 = QuantSpec(bits=2, signed=True, symmetric=True, per_channel=True, axis=0)  # codes -2..1

QAT_ROWS = {
    "int8 QAT": dict(config=qat_config()),
    "W4A8 QAT": dict(config=qat_config(weight=weight_spec(4))),
    "W4A8 QAT, LSQ weights": dict(config=qat_config(weight=weight_spec(4)), weight_quantizer="lsq"),
    "W2A8 QAT, LSQ weights": dict(config=qat_config(weight=W2), weight_quantizer="lsq"),
}
PTQ_ROWS = {
    "int8 PTQ": QuantConfig(),
    "W4A8 PTQ": QuantConfig.weights4(),
    "W2A8 PTQ": QuantConfig(weight=W2, weight_observer=PerChannelMSEObserver),
}
# row -> (the row it must beat or match, allowed drop in points vs float 12 epochs or None)
TARGETS = {
    "int8 QAT": (None, 0.2),
    "W4A8 QAT": ("W4A8 PTQ", 0.5),
    "W4A8 QAT, LSQ weights": ("W4A8 PTQ", 0.5),
    "W2A8 QAT, LSQ weights": ("W2A8 PTQ", None),
}
BUILDERS = {"lenet5": models.lenet5, "lenet_300_100": models.lenet_300_100}


def train_float(model, train, epochs, lr):
    no.fit(model, train, epochs=epochs, lr=lr, momentum=MOMENTUM, batch_size=BATCH, progress=False)
    return model


def run_seed(build, seed, train, test):
    """Accuracies (and QAT seconds per epoch) of every row for one seed."""
    accuracies, seconds = {}, {}
    no.manual_seed(seed)
    base = train_float(build(), train, BASE_EPOCHS, LR)
    accuracies["float, 10 epochs"] = no.evaluate(base, test)["accuracy"]
    float12 = copy.deepcopy(base)
    start = time.perf_counter()
    train_float(float12, train, QAT_EPOCHS, FINETUNE_LR)
    seconds["float, 12 epochs"] = (time.perf_counter() - start) / QAT_EPOCHS
    accuracies["float, 12 epochs"] = no.evaluate(float12, test)["accuracy"]
    calibration = train[0][:CALIBRATION_IMAGES]
    for name, config in PTQ_ROWS.items():
        integer_model = quantize_static(float12, calibration, config, progress=False)
        accuracies[name] = no.evaluate(integer_model, test)["accuracy"]
    steps_per_epoch = -(-len(train[1]) // BATCH)
    for name, options in QAT_ROWS.items():
        no.manual_seed(1000 + seed)
        qat_model = prepare_qat(base, example_input=train[0][:1], **options)
        start = time.perf_counter()
        no.fit(qat_model, train, epochs=QAT_EPOCHS, lr=FINETUNE_LR, momentum=MOMENTUM, batch_size=BATCH,
               progress=False, callbacks=[QATSchedule(freeze_observers_after=steps_per_epoch)])
        seconds[name] = (time.perf_counter() - start) / QAT_EPOCHS
        integer_model = convert(qat_model)
        accuracies[name] = no.evaluate(integer_model, test)["accuracy"]
    return accuracies, seconds


def verdict(name, mean, float12):
    if name not in TARGETS:
        return ""
    rival, drop = TARGETS[name]
    checks = []
    if drop is not None:
        checks.append(("yes" if float12 - mean[name] <= drop / 100 else "NO") + f" (drop <= {drop})")
    if rival is not None:
        checks.append(("yes" if mean[name] > mean[rival] else "NO") + f" (> {rival})")
    return "; ".join(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["lenet5", "lenet_300_100"])
    args = parser.parse_args()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    start = time.perf_counter()
    print(f"## Quantization-aware training on Fashion-MNIST ({args.seeds} seeds, mean; float {BASE_EPOCHS} epochs "
          f"SGD lr {LR} momentum {MOMENTUM} batch {BATCH}, then {QAT_EPOCHS} epochs at lr {FINETUNE_LR} as float, "
          "QAT or before PTQ)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    for model_name in args.models:
        results = [run_seed(BUILDERS[model_name], seed, train, test) for seed in range(args.seeds)]
        names = list(results[0][0])
        mean = {name: float(np.mean([r[0][name] for r in results])) for name in names}
        float12 = mean["float, 12 epochs"]
        print(f"### {model_name}\n")
        print("| model | accuracy (integer model) | vs float 12 epochs | per seed | s / epoch | target met |")
        print("|---|---:|---:|---|---:|---|")
        for name in names:
            per_seed = " / ".join(f"{100 * r[0][name]:.2f}" for r in results)
            timing = np.mean([r[1][name] for r in results]) if name in results[0][1] else None
            timing_text = f"{timing:.1f}" if timing is not None else "-"
            delta = "-" if name.startswith("float") else f"{100 * (mean[name] - float12):+.2f}"
            print(f"| {name} | {100 * mean[name]:.2f}% | {delta} | {per_seed} | {timing_text} | "
                  f"{verdict(name, mean, float12)} |")
        print()
    print("PyTorch on the same work, measured by the issue's author (2 QAT epochs from a 10-epoch float model at "
          "89.3% / 88.6%): W4A8 QAT LeNet-5 90.5 / 89.9, LeNet-300-100 89.5 / 89.8; W2A8 QAT LeNet-5 83.8 / 86.6, "
          "LeNet-300-100 88.7 / 88.5; W2 PTQ 16-79%.\n")
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
