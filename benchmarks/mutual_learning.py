"""Deep mutual learning (Zhang et al. 2018) on Fashion-MNIST: does each peer beat itself trained alone, and why not?

    python -m benchmarks.mutual_learning [--seeds 3] [--epochs 60]

The protocol is the distillation benchmark's (``benchmarks/distillation.py``): SGD (momentum 0.9, lr 0.05),
cosine decay over ``--epochs``, batch 128, seeds 0, 1, 2; accuracies on the 10,000 test images, mean +- standard
deviation over the seeds. For seed s the peers are built one after the other right after ``manual_seed(s)``, and
the baseline trains exactly those initial weights *alone*, on the same batches in the same order: each Δ compares
one initialisation with and without its peer (peer 1 alone is the distillation benchmark's from-scratch student).

Besides each peer's accuracy the table shows the accuracy of the two peers' ensemble (mean of their softmax
outputs) and how often the two peers predict the same class on the test set: the knowledge a peer could pass on
is what it knows that the other does not, and these two columns measure how much of it there is.
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import fashion_mnist, git_revision, machine_description  # noqa: E402
from benchmarks.distillation import Schedule, summary, train_run  # noqa: E402
from nanoopt import distill, models, nn  # noqa: E402
from nanoopt.nn import functional as F  # noqa: E402
from nanoopt.train import predict  # noqa: E402

PAPER = distill.DistillConfig(temperature=1.0, hard_weight=1.0, soft_weight=1.0)   # Zhang et al. 2018, eq. 1-2


def build(widths: tuple[int, ...]) -> list[nn.Module]:
    """The peers, MLP 784-w-10 each, built in order (so peer k's initial weights depend on widths[:k + 1] only)."""
    return [models.mlp(784, (width,)) for width in widths]


def probabilities(model: nn.Module, images: np.ndarray) -> np.ndarray:
    return F.softmax(predict(model, images).astype(np.float64), dim=1).data


def measure(peers: list[nn.Module], test) -> tuple[float, float, float, float]:
    """(peer 1 accuracy, peer 2 accuracy, ensemble accuracy, agreement) on the test set."""
    images, labels = test
    first, second = (probabilities(peer, images) for peer in peers)
    return ((first.argmax(1) == labels).mean(), (second.argmax(1) == labels).mean(),
            ((first + second).argmax(1) == labels).mean(), (first.argmax(1) == second.argmax(1)).mean())


_ALONE: dict[tuple[tuple[int, ...], int], nn.Module] = {}


def alone(widths: tuple[int, ...], seed: int, train, schedule: Schedule) -> list[nn.Module]:
    """Each peer's initial weights trained by themselves (memoised on the widths that fix them)."""
    trained = []
    for k in range(len(widths)):
        memo = (widths[:k + 1], seed)
        if memo not in _ALONE:
            no.manual_seed(seed)
            model = build(widths[:k + 1])[k]
            train_run(model, model, train, schedule, seed)
            _ALONE[memo] = model
        trained.append(_ALONE[memo])
    return trained


def mutual(widths: tuple[int, ...], seed: int, train, schedule: Schedule, config: distill.DistillConfig,
           start: int = 0) -> list[nn.Module]:
    no.manual_seed(seed)
    peers = build(widths)
    model = distill.MutualLearning(peers, config)
    callbacks = [distill.SoftWeightSchedule(start_epoch=start)] if start else []
    train_run(model, model, train, schedule, seed, model.compute_loss, callbacks)
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    begin = time.perf_counter()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    schedule, seeds = Schedule(epochs=args.epochs), list(range(args.seeds))
    late = args.epochs // 2
    defaults = distill.DistillConfig()
    plan = [
        ((64, 64), "alone (independent peers)", None, 0),
        ((64, 64), "DML, the paper's 1 CE + 1 KL, T=1", PAPER, 0),
        ((64, 64), "DML, 1 CE + 1 KD at T=3 (T^2-scaled)", dataclasses.replace(PAPER, temperature=3.0), 0),
        ((64, 64), f"DML, the KD defaults {defaults.hard_weight:g} CE + {defaults.soft_weight:g} KD, "
                   f"T={defaults.temperature:g}", defaults, 0),
        ((64, 64), f"DML (paper), KL switched on at epoch {late} (SoftWeightSchedule)", PAPER, late),
        ((256, 256), "alone (independent peers)", None, 0),
        ((256, 256), "DML, the paper's 1 CE + 1 KL, T=1", PAPER, 0),
        ((256, 256), f"DML (paper), KL switched on at epoch {late} (SoftWeightSchedule)", PAPER, late),
        ((64, 256), "alone (independent peers)", None, 0),
        ((64, 256), "DML, the paper's 1 CE + 1 KL, T=1", PAPER, 0),
        ((64, 256), f"DML (paper), KL switched on at epoch {late} (SoftWeightSchedule)", PAPER, late),
    ]
    print(f"## Deep mutual learning (Fashion-MNIST, two MLP peers, {len(seeds)} seeds; {schedule.describe()})\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print("Δ vs alone: mean over the seeds, then (in brackets) each seed's paired difference, seed 0 first.\n")
    print("| peers | training | peer 1 | Δ vs alone | peer 2 | Δ vs alone | ensemble of the two | "
          "test images the peers agree on |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    baselines: dict[tuple[int, ...], np.ndarray] = {}
    for widths, label, config, start in plan:
        clock = time.perf_counter()
        if config is None:
            results = np.array([measure(alone(widths, seed, train, schedule), test) for seed in seeds])
            baselines[widths] = results
        else:
            results = np.array([measure(mutual(widths, seed, train, schedule, config, start), test)
                                for seed in seeds])
        print(f"  ({widths} {label}: {time.perf_counter() - clock:.0f} s)", file=sys.stderr, flush=True)
        base = baselines[widths]
        cells = []
        for k in (0, 1):
            cells.append(summary(list(results[:, k])))
            paired = " ".join(f"{value:+.2f}" for value in (results[:, k] - base[:, k]) * 100)
            cells.append("-" if config is None else
                         f"{(results[:, k].mean() - base[:, k].mean()) * 100:+.2f} ({paired})")
        names = " + ".join(f"MLP-{w}" for w in widths)
        print(f"| {names} | {label} | {' | '.join(cells)} | {summary(list(results[:, 2]))} | "
              f"{results[:, 3].mean():.2%} |")
    print(f"\n(total {time.perf_counter() - begin:.0f} s)")


if __name__ == "__main__":
    main()
