"""Knowledge distillation end to end: a CNN teacher, an MLP student, and the strategies of ``nanoopt.distill``.

Runs offline in well under a minute on the bundled 8x8 digits (``--fashion`` uses Fashion-MNIST if installed,
which takes several minutes; the full comparison with 3 seeds is ``python -m benchmarks.distillation``):

    python examples/distillation.py [--fashion]

1. train the teacher (LeNet-5) and, as the baseline, the student (an MLP) from scratch;
2. Hinton KD with the library's defaults (``DistillConfig``), the teacher's outputs cached per example;
3. cross-model KD: the MLP's hidden layer also learns the CNN's convolutional maps through a learned adapter;
4. deep mutual learning: two MLPs trained together from scratch, each distilled from the other;
5. a 90 %-pruned student recovered by distilling from its own dense original.
"""

from __future__ import annotations

import argparse
import copy

import nanoopt as no
from nanoopt import data, distill, models, optim, prune


def train(model: no.nn.Module, train_set, epochs: int, batch_size: int, distiller=None) -> None:
    """SGD with momentum and a cosine schedule, the same for every model (``distiller`` supplies the loss)."""
    trained = distiller if distiller is not None else model
    optimizer = optim.SGD([p for p in trained.parameters()], lr=0.05, momentum=0.9)
    scheduler = optim.CosineAnnealingLR(optimizer, T_max=epochs)
    loader = data.DataLoader(*train_set, batch_size=batch_size, shuffle=True, seed=0)
    compute_loss = distiller.compute_loss if distiller is not None else None
    no.fit(trained, loader, epochs, optimizer=optimizer, scheduler=scheduler, compute_loss=compute_loss,
           progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fashion", action="store_true", help="use Fashion-MNIST instead of the bundled digits")
    args = parser.parse_args()
    if args.fashion:
        train_set, test_set = data.load_fashion_mnist("train"), data.load_fashion_mnist("test")
        size, epochs, batch_size = 28, 15, 128
    else:
        train_set, test_set = data.load_digits("train"), data.load_digits("test")
        size, epochs, batch_size = 8, 30, 32
    pixels = size * size

    def accuracy(model: no.nn.Module) -> str:
        return f"{no.evaluate(model, test_set)['accuracy']:.2%}"

    # 1. teacher and from-scratch student
    no.manual_seed(0)
    teacher = models.lenet5(input_size=size)
    train(teacher, train_set, epochs, batch_size)
    no.manual_seed(1)
    scratch = models.mlp(pixels, (32,))
    train(scratch, train_set, epochs, batch_size)
    print(f"teacher LeNet-5: {accuracy(teacher)}   student MLP-32 from scratch: {accuracy(scratch)}")

    # 2. Hinton KD: CE + KD with the defaults; the frozen teacher runs once per training example
    no.manual_seed(1)
    student = models.mlp(pixels, (32,))
    kd = distill.Distiller(student, teacher, distill.DistillConfig(), cache_teacher=True)
    train(student, train_set, epochs, batch_size, distiller=kd)
    print(f"KD student ({kd.config.hard_weight:g} CE + {kd.config.soft_weight:g} KD, T={kd.config.temperature:g}):"
          f" {accuracy(student)}")

    # 3. cross-model: the MLP's hidden layer ("2", after the ReLU) regresses the CNN's second conv block ("5",
    #    (16, H, W) maps) through a trained flatten-linear adapter; the adapter is dropped afterwards
    no.manual_seed(1)
    student = models.mlp(pixels, (32,))
    cross = distill.cross_model_distiller(student, teacher, {"2": "5"}, example_input=train_set[0][:2],
                                          hint_weight=0.5, cache_teacher=True)
    train(student, train_set, epochs, batch_size, distiller=cross)
    print(f"cross-model KD + FitNets hint ({cross.adapters[0].kind} adapter {cross.adapters[0].student_shape} -> "
          f"{cross.adapters[0].teacher_shape}): {accuracy(student)}")

    # 4. deep mutual learning: no pretrained teacher at all
    no.manual_seed(1)
    mutual = distill.MutualLearning([models.mlp(pixels, (32,)), models.mlp(pixels, (32,))])
    train(mutual, train_set, epochs, batch_size, distiller=mutual)
    print(f"mutual learning peers: {accuracy(mutual.peers[0])}, {accuracy(mutual.peers[1])}")

    # 5. compressed student: prune the from-scratch MLP to 90 % and recover it from its own dense original
    pruned = copy.deepcopy(scratch)
    prune.global_unstructured(prune.prunable_parameters(pruned), amount=0.9)
    print(f"90% pruned, before recovery: {accuracy(pruned)}")
    recovery = distill.Distiller(pruned, scratch, cache_teacher=True)
    train(pruned, train_set, max(epochs // 3, 1), batch_size, distiller=recovery)
    print(f"90% pruned, recovered by distillation from the dense model: {accuracy(pruned)}")


if __name__ == "__main__":
    main()
