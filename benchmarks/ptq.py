"""Post-training quantization of LeNet-300-100 and LeNet-5 on Fashion-MNIST: accuracy of the converted integer
models against float, their speed and stored size, and PyTorch's eager int8 PTQ on the same work.

Protocol (every number measured in this run; accuracies are means over ``--seeds`` seeds):

* float: SGD (lr 0.05, momentum 0.9, batch 128) for ``--epochs`` epochs (10) from ``nanoopt.manual_seed(seed)``.
* calibration: ``--calibration`` (1024) training images drawn with the seed; every accuracy is that of the
  *converted integer model* (``quant.convert``) on the 10,000 test images.
* rows: int8 (asymmetric activations with the L2 histogram range search, per-channel int8 weights: the default
  ``QuantConfig()``); int8 with per-tensor weights; int16 activations ("16x8"); 4-bit weights / 8-bit
  activations (W4A8) rounded to nearest per tensor and per channel (min/max ranges); W4A8 per-tensor after
  cross-layer equalization + bias correction (data-free-style, Nagel et al. 2019); W4A8 per channel with L2
  weight ranges + AdaRound (``--adaround-iterations`` per layer, 1024 calibration images).
* speed: the float model and the converted int8 model over the 10,000 test images in batches of 256, one
  thread, best of 3 -- the int8 model with the dispatch's automatic backend choice, then after
  ``quant.tune_backends`` (each layer timed on one batch under every backend, the fastest kept; all backends
  give the same integers); size: bytes of ``state_dict()``.
* PyTorch (when installed): the same architecture and training protocol in PyTorch, eager-mode PTQ with the
  ``x86`` qconfig (histogram observers, per-channel int8 weights), conv/linear + ReLU fused, calibrated on the
  same images; its speed on the same batches, one thread.

    python -m benchmarks.ptq [--seeds 2] [--epochs 10]
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import best_seconds, fashion_mnist, git_revision, machine_description  # noqa: E402
from nanoopt import models, quant  # noqa: E402
from nanoopt.quant.algorithms import adaround, bias_correction, cross_layer_equalization  # noqa: E402
from nanoopt.quant.config import weight_spec  # noqa: E402
from nanoopt.quant.observers import MinMaxObserver  # noqa: E402
from nanoopt.tensor import Tensor, no_grad  # noqa: E402

LR, MOMENTUM, BATCH, EVAL_BATCH = 0.05, 0.9, 128, 256
MODELS = {"LeNet-300-100": models.lenet_300_100, "LeNet-5": models.lenet5}
TARGETS = {"int8, per-channel weights": 0.15, "int16 activations, int8 weights (16x8)": 0.05,
           "W4A8 per-channel, L2 ranges + AdaRound": 0.30}


def w4(per_channel: bool) -> quant.QuantConfig:
    return quant.QuantConfig(weight=weight_spec(4, per_channel), weight_observer=MinMaxObserver)


def ptq_rows(model, calibration, example, adaround_iterations):
    """``{method: converted integer model}`` for one trained float model."""
    def static(source, config):
        return quant.calibrate(quant.prepare(source, config, example), calibration, progress=False)

    rows = {
        "int8, per-channel weights": static(model, quant.QuantConfig()),
        "int8, per-tensor weights": static(model, quant.QuantConfig(weight=weight_spec(8, per_channel=False))),
        "int16 activations, int8 weights (16x8)": static(model, quant.QuantConfig.int16_activations()),
        "W4A8 per-tensor, round to nearest": static(model, w4(False)),
        "W4A8 per-channel, round to nearest": static(model, w4(True)),
    }
    equalized = static(cross_layer_equalization(model, example), w4(False))
    bias_correction(equalized, calibration)
    rows["W4A8 per-tensor, CLE + bias correction"] = equalized
    rounded = static(model, quant.QuantConfig.weights4())
    adaround(rounded, calibration, iterations=adaround_iterations, progress=False)
    rows["W4A8 per-channel, L2 ranges + AdaRound"] = rounded
    return {name: quant.convert(prepared) for name, prepared in rows.items()}


def seconds_over_test_set(model, images):
    def run():
        with no_grad():
            for start in range(0, len(images), EVAL_BATCH):
                model(Tensor(images[start:start + EVAL_BATCH]))
    return best_seconds(run, repeats=3, min_time=0.0)


# ------------------------------------------------------------------------------------------------ PyTorch
def torch_rows(name, seeds, epochs, train, test, calibration_indices):
    """Accuracies (float, int8) per seed and the float/int8 seconds over the test set, or None without torch."""
    try:
        import torch
        from torch import nn
        from torch.ao import quantization as tq
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "x86"
    images, labels = torch.from_numpy(train[0].copy()), torch.from_numpy(train[1].astype(np.int64))
    test_images, test_labels = torch.from_numpy(test[0].copy()), torch.from_numpy(test[1].astype(np.int64))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            if name == "LeNet-5":
                self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                              nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                              nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                              nn.Linear(84, 10))
                self.fuse = [["0", "1"], ["3", "4"], ["7", "8"], ["9", "10"]]
            else:
                self.features = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                                              nn.ReLU(), nn.Linear(100, 10))
                self.fuse = [["1", "2"], ["3", "4"]]

        def forward(self, x):
            return self.dequant(self.features(self.quant(x)))

    def accuracy(model):
        with torch.no_grad():
            return float((model(test_images).argmax(1) == test_labels).float().mean())

    def seconds(model):
        def run():
            with torch.no_grad():
                for start in range(0, len(test_images), EVAL_BATCH):
                    model(test_images[start:start + EVAL_BATCH])
        return best_seconds(run, repeats=3, min_time=0.0)

    results = {"float": [], "int8": []}
    timing = None
    for seed in range(seeds):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = Net()
        common.torch_sgd_epochs(model, images, labels, epochs, LR, rng, MOMENTUM, BATCH)
        model.eval()
        results["float"].append(accuracy(model))
        quantized = copy.deepcopy(model)
        tq.fuse_modules(quantized.features, quantized.fuse, inplace=True)
        quantized.qconfig = tq.get_default_qconfig("x86")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tq.prepare(quantized, inplace=True)
            with torch.no_grad():
                quantized(images[torch.from_numpy(calibration_indices[seed])])
            tq.convert(quantized, inplace=True)
        results["int8"].append(accuracy(quantized))
        if seed == 0:
            timing = (seconds(model), seconds(quantized))
    return results, timing


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--adaround-iterations", type=int, default=1000)
    args = parser.parse_args()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    started = time.perf_counter()
    calibration_indices = [np.random.default_rng(1000 + seed).choice(len(train[1]), args.calibration, replace=False)
                           for seed in range(args.seeds)]
    accuracy: dict[str, dict[str, list[float]]] = {}
    speed, torch_results = {}, {}
    for name, make in MODELS.items():
        accuracy[name] = {}
        for seed in range(args.seeds):
            no.manual_seed(seed)
            model = make()
            no.fit(model, train, epochs=args.epochs, lr=LR, momentum=MOMENTUM, batch_size=BATCH, progress=False)
            model.eval()
            accuracy[name].setdefault("float32", []).append(no.evaluate(model, test)["accuracy"])
            calibration = train[0][calibration_indices[seed]]
            converted = ptq_rows(model, calibration, calibration[:1], args.adaround_iterations)
            for method, qmodel in converted.items():
                accuracy[name].setdefault(method, []).append(no.evaluate(qmodel, test)["accuracy"])
            if seed == 0:
                int8 = converted["int8, per-channel weights"]
                automatic = seconds_over_test_set(int8, test[0])
                backends = quant.tune_backends(int8, test[0][:EVAL_BATCH])
                speed[name] = (seconds_over_test_set(model, test[0]), automatic, seconds_over_test_set(int8, test[0]),
                               no.report.stored_bytes(model), no.report.stored_bytes(int8),
                               no.report.stored_bytes(converted["W4A8 per-channel, L2 ranges + AdaRound"]), backends)
        torch_results[name] = torch_rows(name, args.seeds, args.epochs, train, test, calibration_indices)

    print(f"## Post-training quantization on Fashion-MNIST ({args.seeds} seeds, mean; {args.epochs} epochs of SGD; "
          f"{args.calibration} calibration images; accuracy of the converted integer models)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print("| model | method | test accuracy | change vs float | per seed | target |")
    print("|---|---|---:|---:|---|---|")
    for name, rows in accuracy.items():
        float_mean = float(np.mean(rows["float32"]))
        for method, values in rows.items():
            mean = float(np.mean(values))
            change = "" if method == "float32" else f"{100 * (mean - float_mean):+.2f}"
            target = TARGETS.get(method)
            verdict = "" if target is None else (f"drop <= {target:.2f}: "
                                                 f"{'met' if float_mean - mean <= target / 100 else 'MISSED'}")
            per_seed = " / ".join(f"{100 * v:.2f}" for v in values)
            print(f"| {name} | {method} | {100 * mean:.2f}% | {change} | {per_seed} | {verdict} |")
    print("\nPyTorch eager PTQ (x86 engine, histogram observers, per-channel int8 weights), same protocol:\n")
    print("| model | float | int8 | change | per seed (float -> int8) |")
    print("|---|---:|---:|---:|---|")
    for name, result in torch_results.items():
        if result is None:
            print(f"| {name} | torch not installed | | | |")
            continue
        values, _ = result
        pairs = " / ".join(f"{100 * f:.2f} -> {100 * q:.2f}" for f, q in zip(values["float"], values["int8"],
                                                                            strict=True))
        print(f"| {name} | {100 * np.mean(values['float']):.2f}% | {100 * np.mean(values['int8']):.2f}% | "
              f"{100 * (np.mean(values['int8']) - np.mean(values['float'])):+.2f} | {pairs} |")
    print("\nSpeed over the 10,000 test images (batch 256, 1 thread, best of 3) and stored size (state_dict bytes):\n")
    print("| model | float32 | int8, auto backend | int8, tuned backends | int8 speed-up, tuned (target >= 1.5x) | "
          "PyTorch float -> int8 speed-up | float32 size | int8 size | ratio | W4A8 size | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (float_s, auto_s, int8_s, float_bytes, int8_bytes, w4_bytes, _) in speed.items():
        result = torch_results[name]
        torch_speed = "-" if result is None else f"{result[1][0] / result[1][1]:.2f}x"
        print(f"| {name} | {1e3 * float_s:.0f} ms | {1e3 * auto_s:.0f} ms ({float_s / auto_s:.2f}x) | "
              f"{1e3 * int8_s:.0f} ms | {float_s / int8_s:.2f}x | {torch_speed} | {float_bytes / 1024:.1f} KiB | "
              f"{int8_bytes / 1024:.1f} KiB | {float_bytes / int8_bytes:.2f}x | {w4_bytes / 1024:.1f} KiB | "
              f"{float_bytes / w4_bytes:.2f}x |")
    for name, values in speed.items():
        print(f"\n{name}: backends chosen by quant.tune_backends: {values[-1]}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
