"""Pruning LeNet-300-100 on Fashion-MNIST: accuracy against a float model trained for the same total epochs,
and the measured inference speed of the physically shrunk model.

Protocol (every number measured in this run, mean over ``--seeds`` seeds):

* float: SGD (lr 0.05, momentum 0.9, batch 128) for 10 epochs; "+3" rows continue 3 more epochs at lr 0.01.
* every pruned row starts from that 10-epoch model and trains 3 more epochs at lr 0.01, so it is compared with
  the float model at 13 epochs (same total). Pruning covers the three weight matrices (classifier included).
  - one-shot global L1 to 90 / 92 / 95 %, then 3 epochs of finetuning;
  - the same one-shot 92 / 95 % with a finetune that restarts at the training rate and decays it (lr 0.05, cosine
    to 0 over the 3 epochs), compared with the float model given the same 3 epochs (its own row): a pruned network
    has more to re-learn than a converged one, and the low constant rate leaves it short;
  - iterative 50 -> 75 -> 90 %: prune, 1 epoch, prune, 1 epoch, prune, 1 epoch;
  - gradual after training (Zhu & Gupta cubic) 50 -> 95 % over the first 2 extra epochs (pruning every 47 steps),
    then 1 epoch at the final sparsity;
  - gradual during training, as Zhu & Gupta do: the same 10 + 3 epochs and learning rates as the float model from
    the same initialisation, with the cubic schedule 0 -> 92 / 95 / 98 % from epoch 1 to epoch 8 (every 47 steps);
  - structured: ln_structured (L1, dim 0) removes 50 % of the neurons of both hidden layers, 3 epochs, then
    ``prune.shrink`` builds the physically smaller network (784-150-50-10) and ``remove_all`` bakes the masks in.
* PyTorch (when ``torch`` is installed): the same protocol with ``torch.nn.utils.prune`` in the same run, for
  the rows it can express (its own initialisation and data order, so per-seed numbers differ).
* speed: median latency of the unpruned and shrunk models (eval, no_grad, 1 thread) at batch 1 and 256, and of
  the 90 % one-shot model run with CSR kernels (``prune.to_sparse``).

    python -m benchmarks.pruning [--seeds 3]
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
from benchmarks import common  # noqa: E402
from benchmarks.common import best_seconds, fashion_mnist, git_revision, machine_description  # noqa: E402
from nanoopt import models, optim, prune  # noqa: E402
from nanoopt.tensor import Tensor, no_grad  # noqa: E402

BASE_EPOCHS, EXTRA_EPOCHS = 10, 3
LR, FINETUNE_LR, MOMENTUM, BATCH = 0.05, 0.01, 0.9, 128


def finetune(model, train, epochs=EXTRA_EPOCHS, callbacks=()):
    no.fit(model, train, epochs=epochs, lr=FINETUNE_LR, momentum=MOMENTUM, batch_size=BATCH, callbacks=callbacks,
           progress=False)
    return model


def finetune_cosine(model, train, epochs=EXTRA_EPOCHS):
    optimizer = optim.SGD(list(model.parameters()), lr=LR, momentum=MOMENTUM)
    no.fit(model, train, epochs=epochs, optimizer=optimizer, scheduler=optim.CosineAnnealingLR(optimizer, epochs),
           batch_size=BATCH, progress=False)
    return model


COSINE = "3 epochs at lr 0.05 decayed to 0 (cosine)"
FLOAT_COSINE = f"float, 10 epochs + {COSINE}"


def weights(model):
    return prune.prunable_parameters(model)


def one_shot(base, train, sparsity):
    model = copy.deepcopy(base)
    prune.prune_to_sparsity(weights(model), sparsity)
    return finetune(model, train)


def iterative(base, train):
    model = copy.deepcopy(base)
    prune.iterative(model, train, [0.5, 0.75, 0.9], epochs_per_step=1, lr=FINETUNE_LR, momentum=MOMENTUM,
                    batch_size=BATCH, progress=False)
    return model


def gradual(base, train, final):
    model = copy.deepcopy(base)
    steps_per_epoch = -(-len(train[1]) // BATCH)
    frequency = 47
    pruning_steps = (2 * steps_per_epoch - 1) // frequency
    schedule = prune.GradualPruning(weights(model), 0.5, final, begin_step=0, frequency=frequency,
                                    pruning_steps=pruning_steps)
    return finetune(model, train, callbacks=[schedule])


def gradual_from_scratch(seed, train, final):
    no.manual_seed(seed)
    model = models.lenet_300_100()
    steps_per_epoch = -(-len(train[1]) // BATCH)
    frequency = 47
    schedule = prune.GradualPruning(weights(model), 0.0, final, begin_step=steps_per_epoch, frequency=frequency,
                                    pruning_steps=7 * steps_per_epoch // frequency)
    no.fit(model, train, epochs=BASE_EPOCHS, lr=LR, momentum=MOMENTUM, batch_size=BATCH, callbacks=[schedule],
           progress=False)
    return finetune(model, train)


def structured(base, train, example, test_images):
    model = copy.deepcopy(base)
    for index in (1, 3):
        prune.ln_structured(model[index], "weight", amount=0.5, n=1, dim=0)
    finetune(model, train)
    masked_outputs = no.train.predict(model, test_images)
    report = prune.shrink(model, example)
    prune.remove_all(model)
    difference = float(np.abs(no.train.predict(model, test_images) - masked_outputs).max())
    return model, report, difference


def sparsity_of(model):
    return prune.mask_sparsity(weights(model)) if any(prune.is_pruned(m) for m in model.modules()) \
        else no.report.weight_sparsity(model)


def latency_ms(model, batch):
    model.eval()
    x = Tensor(batch)

    def run():
        with no_grad():
            model(x)
    return best_seconds(run, repeats=5, min_time=0.1) * 1e3


def torch_accuracies(seeds: int, train, test) -> dict[str, list[float]] | None:
    """The same protocol in PyTorch with torch.nn.utils.prune (None when torch is not installed)."""
    try:
        import torch
        from torch.nn.utils import prune as torch_prune
    except ImportError:
        return None
    torch.set_num_threads(1)
    nn = torch.nn
    images, labels = torch.from_numpy(train[0].copy()), torch.from_numpy(train[1].astype(np.int64))
    test_images, test_labels = torch.from_numpy(test[0].copy()), torch.from_numpy(test[1].astype(np.int64))

    def build():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))

    def train_epochs(model, epochs, lr, rng, on_step=None):
        return common.torch_sgd_epochs(model, images, labels, epochs, lr, rng, MOMENTUM, BATCH, on_step)

    def accuracy(model):
        with torch.no_grad():
            return float((model(test_images).argmax(1) == test_labels).float().mean())

    def pairs(model):
        return [(model[1], "weight"), (model[3], "weight"), (model[5], "weight")]

    def prune_to(model, target):
        total = sum(module.weight.numel() for module, _ in pairs(model))
        zeros = sum(int((module.weight == 0).sum()) for module, _ in pairs(model))
        torch_prune.global_unstructured(pairs(model), pruning_method=torch_prune.L1Unstructured,
                                        amount=max(0, round(target * total) - zeros))

    rows: dict[str, list[float]] = {}
    steps_per_epoch = -(-len(labels) // BATCH)
    for seed in range(seeds):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        base = train_epochs(build(), BASE_EPOCHS, LR, rng)
        rows.setdefault("float, 10 epochs", []).append(accuracy(base))
        rows.setdefault("float, 13 epochs", []).append(accuracy(train_epochs(copy.deepcopy(base), 3, FINETUNE_LR,
                                                                            rng)))
        for sparsity in (0.9, 0.92, 0.95):
            model = copy.deepcopy(base)
            prune_to(model, sparsity)
            rows.setdefault(f"one-shot global L1 {sparsity:.0%} + 3 epochs", []).append(
                accuracy(train_epochs(model, 3, FINETUNE_LR, rng)))
        for final in (0.92, 0.95, 0.98):
            torch.manual_seed(seed)
            model = build()
            frequency, span = 47, 7 * steps_per_epoch // 47

            def on_step(step, model=model, final=final, frequency=frequency, span=span):
                offset = step - steps_per_epoch
                if 0 <= offset and offset % frequency == 0 and offset // frequency <= span:
                    prune_to(model, prune.cubic_sparsity(step, 0.0, final, steps_per_epoch, frequency, span))
            train_epochs(model, BASE_EPOCHS, LR, rng, on_step)
            rows.setdefault(f"gradual cubic 0 -> {final:.0%} during training (epochs 1-8), 13 epochs", []).append(
                accuracy(train_epochs(model, 3, FINETUNE_LR, rng)))
        model = copy.deepcopy(base)
        for index in (1, 3):
            torch_prune.ln_structured(model[index], "weight", amount=0.5, n=1, dim=0)
        rows.setdefault("structured: 50% of hidden neurons removed + 3 epochs, shrunk", []).append(
            accuracy(train_epochs(model, 3, FINETUNE_LR, rng)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    example = test[0][:64]
    rows: dict[str, list[tuple[float, float]]] = {}
    timing: dict[str, tuple[float, float, int]] = {}
    start = time.perf_counter()
    reports, differences = [], []
    for seed in range(args.seeds):
        no.manual_seed(seed)
        base = models.lenet_300_100()
        no.fit(base, train, epochs=BASE_EPOCHS, lr=LR, momentum=MOMENTUM, batch_size=BATCH, progress=False)

        def record(name, model, _seed=seed):
            rows.setdefault(name, []).append((no.evaluate(model, test)["accuracy"], sparsity_of(model)))

        record("float, 10 epochs", base)
        float13 = finetune(copy.deepcopy(base), train)
        record("float, 13 epochs", float13)
        for sparsity in (0.9, 0.92, 0.95):
            record(f"one-shot global L1 {sparsity:.0%} + 3 epochs", one_shot(base, train, sparsity))
            if sparsity == 0.9 and seed == 0:
                sparse90 = copy.deepcopy(one_shot(base, train, 0.9))
        record(FLOAT_COSINE, finetune_cosine(copy.deepcopy(base), train))
        for sparsity in (0.92, 0.95):
            model = copy.deepcopy(base)
            prune.prune_to_sparsity(weights(model), sparsity)
            record(f"one-shot global L1 {sparsity:.0%} + {COSINE}", finetune_cosine(model, train))
        record("iterative 50 -> 75 -> 90% (1 epoch each)", iterative(base, train))
        record("gradual cubic 50 -> 95% after training (2 epochs) + 1 epoch", gradual(base, train, 0.95))
        for final in (0.92, 0.95, 0.98):
            record(f"gradual cubic 0 -> {final:.0%} during training (epochs 1-8), 13 epochs",
                   gradual_from_scratch(seed, train, final))
        shrunk, report, difference = structured(base, train, example, test[0])
        differences.append(difference)
        rows.setdefault("structured: 50% of hidden neurons removed + 3 epochs, shrunk", []).append(
            (no.evaluate(shrunk, test)["accuracy"], 1 - shrunk.num_parameters() / base.num_parameters()))
        reports.append(report)
        if seed == 0:
            for batch in (1, 256):
                images = test[0][:batch]
                timing[f"dense float32 (266,610 params), batch {batch}"] = (latency_ms(float13, images), 1.0, batch)
                dense = timing[f"dense float32 (266,610 params), batch {batch}"][0]
                timing[f"shrunk 784-150-50-10 ({shrunk.num_parameters():,} params), batch {batch}"] = (
                    latency_ms(shrunk, images), dense, batch)
                csr = copy.deepcopy(sparse90)
                prune.to_sparse(csr, min_sparsity=0.5)
                timing[f"90% unstructured, CSR kernels, batch {batch}"] = (latency_ms(csr, images), dense, batch)

    reference = torch_accuracies(args.seeds, train, test)
    print(f"## Pruning LeNet-300-100 on Fashion-MNIST ({args.seeds} seeds, mean; SGD lr {LR} momentum {MOMENTUM}, "
          f"batch {BATCH}; finetune lr {FINETUNE_LR})\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    float13 = np.mean([a for a, _ in rows["float, 13 epochs"]])
    print("| method | weight sparsity | test accuracy | float, same epochs | difference | per seed | PyTorch, same "
          "protocol (pruned / float) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, values in rows.items():
        accuracy = float(np.mean([a for a, _ in values]))
        sparsity = float(np.mean([s for _, s in values]))
        baseline = "float, 10 epochs" if name == "float, 10 epochs" else FLOAT_COSINE if COSINE in name else None
        same = float(np.mean([a for a, _ in rows[baseline]])) if baseline else float13
        per_seed = " / ".join(f"{100 * a:.2f}" for a, _ in values)
        if reference is None:
            torch_text = "torch not installed"
        elif name in reference:
            float_key = "float, 10 epochs" if name == "float, 10 epochs" else "float, 13 epochs"
            torch_text = f"{100 * np.mean(reference[name]):.2f} / {100 * np.mean(reference[float_key]):.2f}"
        else:
            torch_text = "-"
        print(f"| {name} | {100 * sparsity:.1f}% | {100 * accuracy:.2f}% | {100 * same:.2f}% | "
              f"{100 * (accuracy - same):+.2f} | {per_seed} | {torch_text} |")
    print("\n(structured row: sparsity = fraction of parameters physically removed; largest |logit difference| "
          f"between the masked and the shrunk model over the 10,000 test images: {max(differences):.2e})\n")
    print("| model | latency | speed-up vs dense, same batch |")
    print("|---|---:|---:|")
    for name, (milliseconds, dense, _) in timing.items():
        ratio = "1.00x (baseline)" if dense == 1.0 else f"{dense / milliseconds:.2f}x"
        print(f"| {name} | {milliseconds:.3f} ms | {ratio} |")
    print(f"\nShrink report (seed 0):\n\n```\n{reports[0]}\n```")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
