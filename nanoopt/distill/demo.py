"""The distillation rows of ``nanoopt demo``: a small MLP student from scratch and distilled from a CNN teacher.

Both students have the same architecture, initialisation seed, optimiser and epochs; only the loss differs
(cross-entropy vs :class:`~nanoopt.distill.DistillConfig`'s default 0.5 CE + 0.5 KD at T = 2). On the bundled
digits the test set has 360 images, so one image is 0.28 points: the Fashion-MNIST comparison with three seeds
is ``python -m benchmarks.distillation``.
"""

from __future__ import annotations

import time

import nanoopt as no
from nanoopt import models, optim, report
from nanoopt.distill.strategies import DistillConfig, Distiller
from nanoopt.nn import Module


def demo_rows(teacher: Module, train_set: tuple, test_set: tuple, seed: int = 0, epochs: int = 20,
              hidden: int = 16, progress: bool = False) -> list[report.Row]:
    """Train an MLP (``hidden`` units) from scratch and by KD from ``teacher``; return their report rows.

    >>> from nanoopt import data
    >>> train_set, test_set = data.load_digits("train"), data.load_digits("test")
    >>> teacher = models.lenet5(input_size=8)
    >>> _ = no.fit(teacher, train_set, epochs=2, batch_size=32, progress=False)
    >>> [row.name for row in demo_rows(teacher, train_set, test_set, epochs=1)]
    ['MLP-16 student, from scratch', 'MLP-16 student, KD from the teacher']
    """
    features = int(train_set[0][0].size)
    teacher_accuracy = no.evaluate(teacher, test_set)["accuracy"]
    rows = []
    for name, distilled in (("from scratch", False), ("KD from the teacher", True)):
        no.manual_seed(seed)
        student = models.mlp(features, (hidden,), num_classes=int(train_set[1].max()) + 1)
        trained = Distiller(student, teacher, DistillConfig(), cache_teacher=True) if distilled else student
        optimizer = optim.SGD(list(trained.parameters()), lr=0.05, momentum=0.9)
        start = time.perf_counter()
        no.fit(trained, train_set, epochs, optimizer=optimizer, batch_size=32,
               scheduler=optim.CosineAnnealingLR(optimizer, epochs), progress=progress,
               compute_loss=trained.compute_loss if distilled else None)
        seconds = time.perf_counter() - start
        if distilled:
            trained.remove_hooks()
        note = f"{epochs} epochs in {seconds:.1f} s"
        if distilled:
            note += f"; teacher {teacher_accuracy:.1%}, 0.5 CE + 0.5 KD, T=2"
        rows.append(report.measure(f"MLP-{hidden} student, {name}", student, test_set, note=note))
    return rows
