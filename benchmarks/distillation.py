"""Knowledge distillation on Fashion-MNIST: every strategy of ``nanoopt.distill`` against the same student trained
from scratch, and a controlled study of why the textbook recipe (alpha = 0.9, T = 4) can lose.

    python -m benchmarks.distillation [--seeds 3] [--epochs 60] [--teacher-epochs 30] [--section all|main|study]

Student: an MLP 784-64-10 (``models.mlp(784, (64,))``). Every student row uses the same optimiser and schedule:
SGD (momentum 0.9, lr 0.05), cosine decay over ``--epochs``, batch 128, and the same seeds (0, 1, 2, ...);
accuracies are on the 10,000 test images, mean +- standard deviation over the seeds. Teachers are trained once per
run (seed 0) and kept in memory (nothing is written to disk); their outputs are cached per training example by
``Distiller(cache_teacher=True)``. The teacher is a small CNN (conv 3x3 16 -> pool -> conv 3x3 32 -> pool ->
128 -> 10) trained with random 2-pixel shifts and horizontal flips, the strongest CNN this benchmark trains in
under 10 minutes on 2 cores (its time is printed).
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import fashion_mnist, git_revision, machine_description  # noqa: E402
from nanoopt import data, distill, models, nn, optim, prune, quant  # noqa: E402
from nanoopt.nn import functional as F  # noqa: E402
from nanoopt.tensor import Tensor, no_grad  # noqa: E402

LR, MOMENTUM, BATCH = 0.05, 0.9, 128
TEXTBOOK = distill.DistillConfig(temperature=4.0, hard_weight=0.1, soft_weight=0.9)   # (1 - a) CE + a T^2 KL


# ===================================================================== data and teachers
class ShiftFlip:
    """Shuffled batches with a random shift of up to ``pixels`` in each direction and random horizontal flips."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, pixels: int = 2) -> None:
        self.images, self.labels, self.batch_size, self.pixels = images, labels, batch_size, pixels
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        p, order = self.pixels, self.rng.permutation(len(self.images))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            padded = np.pad(self.images[index], ((0, 0), (0, 0), (p, p), (p, p)))
            dy, dx = self.rng.integers(0, 2 * p + 1, size=2)
            batch = padded[:, :, dy:dy + 28, dx:dx + 28].copy()              # (B, 1, 28, 28)
            flip = self.rng.random(len(index)) < 0.5
            batch[flip] = batch[flip][..., ::-1]
            yield batch, self.labels[index]


def cnn() -> nn.Sequential:
    """The teacher: conv 3x3 16 -> pool -> conv 3x3 32 -> pool -> 128 -> 10 (211,690 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # (N, 16, 14, 14)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # (N, 32, 7, 7)   "5"
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),             # (N, 128)        "8"
        nn.Linear(128, 10),
    )


@dataclass
class Teacher:
    name: str
    model: nn.Module
    accuracy: float
    seconds: float


def train_teachers(train, test, epochs: int) -> dict[str, Teacher]:
    teachers = {}

    def record(name, model, seconds):
        teachers[name] = Teacher(name, model, no.evaluate(model, test)["accuracy"], seconds)
        print(f"- {name}: {teachers[name].accuracy:.2%} test accuracy, trained in {seconds:.0f} s", flush=True)

    no.manual_seed(0)
    model, start = cnn(), time.perf_counter()
    optimizer = optim.SGD(list(model.parameters()), lr=LR, momentum=MOMENTUM, weight_decay=5e-4)
    no.fit(model, ShiftFlip(*train, BATCH, seed=0), epochs, optimizer=optimizer,
           scheduler=optim.CosineAnnealingLR(optimizer, epochs), progress=False)
    record(f"CNN ({epochs} epochs, shifts + flips)", model, time.perf_counter() - start)

    no.manual_seed(0)   # the textbook teacher: LeNet-5, 10 epochs of SGD at lr 0.01, batch 64
    model, start = models.lenet5(), time.perf_counter()
    no.fit(model, data.DataLoader(*train, batch_size=64, shuffle=True, seed=0), 10, lr=0.01, momentum=MOMENTUM,
           progress=False)
    record("LeNet-5 (10 epochs, textbook)", model, time.perf_counter() - start)

    no.manual_seed(0)
    model, start = models.lenet_300_100(), time.perf_counter()
    optimizer = optim.SGD(list(model.parameters()), lr=LR, momentum=MOMENTUM)
    no.fit(model, data.DataLoader(*train, batch_size=BATCH, shuffle=True, seed=0), 20, optimizer=optimizer,
           scheduler=optim.CosineAnnealingLR(optimizer, 20), progress=False)
    record("LeNet-300-100 (20 epochs)", model, time.perf_counter() - start)
    return teachers


# ===================================================================== one training run
@dataclass
class Schedule:
    epochs: int
    lr: float = LR
    batch_size: int = BATCH
    cosine: bool = True

    def describe(self) -> str:
        decay = "cosine" if self.cosine else "constant"
        return f"{self.epochs} epochs, SGD lr {self.lr:g} ({decay}), batch {self.batch_size}"


def train_run(model: nn.Module, trained: nn.Module, train, schedule: Schedule, seed: int,
              compute_loss: Callable | None = None, callbacks=()) -> None:
    """Train ``trained`` (the model itself, or a strategy wrapping it) with the shared optimiser and schedule."""
    optimizer = optim.SGD(list(trained.parameters()), lr=schedule.lr, momentum=MOMENTUM)
    scheduler = optim.CosineAnnealingLR(optimizer, schedule.epochs) if schedule.cosine else None
    loader = data.DataLoader(*train, batch_size=schedule.batch_size, shuffle=True, seed=seed)
    no.fit(trained, loader, schedule.epochs, optimizer=optimizer, scheduler=scheduler, compute_loss=compute_loss,
           callbacks=callbacks, progress=False)


def student() -> nn.Sequential:
    return models.mlp(784, (64,))


def accuracy(model: nn.Module, test) -> float:
    return no.evaluate(model, test)["accuracy"]


_SCRATCH_MODELS: dict[tuple[str, int], nn.Module] = {}   # trained from-scratch students, reused as teachers


def scratch(build: Callable[[], nn.Module], train, test, schedule: Schedule, seed: int) -> tuple[float, nn.Module]:
    memo = (f"{build.__name__} {schedule.describe()}", seed)
    if memo not in _SCRATCH_MODELS:
        no.manual_seed(seed)
        model = build()
        train_run(model, model, train, schedule, seed)
        _SCRATCH_MODELS[memo] = model
    return accuracy(_SCRATCH_MODELS[memo], test), _SCRATCH_MODELS[memo]


def key(schedule: Schedule, label: str, teacher: Teacher | None = None) -> str:
    """The memo key of a row, shared by both tables."""
    return f"{schedule.describe()} | {label} | {teacher.name if teacher else '-'}"


def distilled(teachers: list[nn.Module], config: distill.DistillConfig, train, test, schedule: Schedule, seed: int,
              features=(), build: Callable[[], nn.Module] = student) -> float:
    no.manual_seed(seed)
    model = build()
    distiller = distill.Distiller(model, teachers, config, features=features, example_input=train[0][:2],
                                  cache_teacher=True)
    try:
        train_run(model, distiller, train, schedule, seed, distiller.compute_loss)
    finally:
        distiller.remove_hooks()
    return accuracy(model, test)


# ===================================================================== tables
def summary(values: list[float]) -> str:
    return f"{np.mean(values):.2%} ± {np.std(values):.2%}".replace("%", "")


def delta(values: list[float], baseline: list[float]) -> str:
    return f"{(np.mean(values) - np.mean(baseline)) * 100:+.2f}"


class Runs:
    """Memoised results (one list of accuracies per key, one entry per seed), so rows shared by tables run once."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds, self.results = seeds, {}

    def get(self, key: str, run: Callable[[int], float]) -> list[float]:
        if key not in self.results:
            start = time.perf_counter()
            self.results[key] = [run(seed) for seed in self.seeds]
            print(f"  ({key}: {summary(self.results[key])} in {time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)   # progress, not part of the recorded tables
        return self.results[key]


def gradient_scale_table(teacher: nn.Module, train) -> str:
    """Mean per-sample norm of d loss / d student logits for a freshly initialised student: CE vs T^2 KD."""
    images, labels = train[0][:2000], train[1][:2000]
    no.manual_seed(0)
    fresh = student()
    with no_grad():
        teacher_logits = Tensor(teacher(Tensor(images)).data)
        student_logits = fresh(Tensor(images)).data

    def norm(loss_fn) -> float:
        logits = Tensor(student_logits.copy(), requires_grad=True)
        loss_fn(logits).backward()
        return float(np.linalg.norm(logits.grad * len(images), axis=1).mean())   # per sample (undo the mean)

    ce = norm(lambda z: F.cross_entropy(z, labels))
    lines = ["| loss on a fresh student | mean per-sample norm of d loss / d logits | ratio to CE |",
             "|---|---:|---:|", f"| cross-entropy with labels | {ce:.2f} | 1.00 |"]
    for temperature in (1.0, 2.0, 4.0, 8.0):
        value = norm(lambda z, t=temperature: distill.kd_loss(z, teacher_logits, t))
        lines.append(f"| T^2 KD, T = {temperature:g} | {value:.2f} | {value / ce:.2f} |")
    return "\n".join(lines)


def main_table(teachers: dict[str, Teacher], train, test, runs: Runs, schedule: Schedule) -> None:
    names = list(teachers)
    cnn_teacher, lenet, mlp_teacher = (teachers[n] for n in names)
    default = distill.DistillConfig()
    base = runs.get(key(schedule, "from scratch"), lambda s: scratch(student, train, test, schedule, s)[0])
    rows: list[tuple[str, str, str, list[float], list[float]]] = []

    def kd_row(label, config, name, features=(), chosen=(cnn_teacher,)):
        values = runs.get(name, lambda s: distilled([t.model for t in chosen], config, train, test, schedule, s,
                                                   features))
        teacher_text = ", ".join(f"{t.name.split(' (')[0]} {t.accuracy:.2%}" for t in chosen)
        rows.append((label, "MLP-64", teacher_text, base, values))

    kd_row("Hinton KD, textbook recipe: 0.1 CE + 0.9 KD, T=4", TEXTBOOK,
           key(schedule, "textbook 0.1 CE + 0.9 KD, T=4", cnn_teacher))
    kd_row(f"Hinton KD, library defaults: {default.hard_weight:g} CE + {default.soft_weight:g} KD, "
           f"T={default.temperature:g}", default, key(schedule, "defaults 0.5 CE + 0.5 KD, T=2", cnn_teacher))
    dkd = distill.DistillConfig(response="dkd", dkd_alpha=1.0, dkd_beta=1.0)
    kd_row("decoupled KD (alpha 1, beta 1), 0.5 CE + 0.5 DKD, T=2", dkd, "dkd CNN")
    hint = distill.FeaturePair("2", "5", distill.hint_loss, weight=0.5, adapter="auto")
    kd_row("cross-model: defaults + FitNets hint, MLP hidden (64) -> CNN maps (32, 7, 7) via adapter", default,
           "hint CNN", [hint])

    def rkd(s, t):
        return 25 * distill.rkd_distance_loss(s, t) + 50 * distill.rkd_angle_loss(s[:32], t[:32])

    kd_row("defaults + RKD (25 distance + 50 angle on 32 samples), hidden 64 vs CNN 128", default, "rkd CNN",
           [distill.FeaturePair("2", "8", rkd)])
    kd_row("defaults + similarity-preserving (3000), hidden 64 vs CNN 128", default, "sp CNN",
           [distill.FeaturePair("2", "8", distill.similarity_preserving_loss, weight=3000.0)])
    three = (cnn_teacher, lenet, mlp_teacher)
    kd_row("multi-teacher, averaged logits", default, "multi average", chosen=three)
    fixed = distill.DistillConfig(teacher_weighting="fixed", teacher_weights=(0.5, 0.25, 0.25))
    kd_row("multi-teacher, fixed weights 0.5 / 0.25 / 0.25", fixed, "multi fixed", chosen=three)
    confident = distill.DistillConfig(teacher_weighting="confidence")
    kd_row("multi-teacher, per-sample confidence weights", confident, "multi confidence", chosen=three)

    # self-distillation: born-again (generation 1 from generation 0 = the from-scratch student of the same seed)
    def born_again(seed):
        _, parent = scratch(student, train, test, schedule, seed)
        return distilled([parent], default, train, test, schedule, seed)
    values = runs.get("born-again", born_again)
    rows.append(("born-again generation 1 (teacher: generation 0)", "MLP-64", f"MLP-64 {np.mean(base):.2%}",
                 base, values))

    def deeper() -> nn.Module:
        return models.mlp(784, (128, 64))

    deep_base = runs.get("from scratch MLP-128-64", lambda s: scratch(deeper, train, test, schedule, s)[0])

    def deep_supervision(seed):
        no.manual_seed(seed)
        backbone = deeper()
        model = distill.DeepSupervision(backbone, distill.auxiliary_heads(backbone, ["2"], 10, train[0][:2]))
        train_run(backbone, model, train, schedule, seed, model.compute_loss)
        return accuracy(backbone, test)
    values = runs.get("deep supervision", deep_supervision)
    rows.append(("deep supervision: head on hidden layer 1 taught by the deepest", "MLP-128-64", "itself (deepest)",
                 deep_base, values))

    def second_alone(seed):
        """Peer 2's initial weights (the second student built after manual_seed(seed)) trained alone."""
        no.manual_seed(seed)
        student()
        model = student()
        train_run(model, model, train, schedule, seed)
        return accuracy(model, test)
    alone = {0: base, 1: runs.get("from scratch, peer 2's initialisation", second_alone)}
    peers: dict[int, list[float]] = {0: [], 1: []}

    def mutual(seed):
        no.manual_seed(seed)
        model = distill.MutualLearning([student(), student()])
        train_run(model, model, train, schedule, seed, model.compute_loss)
        peers[0].append(accuracy(model.peers[0], test))
        peers[1].append(accuracy(model.peers[1], test))
        return peers[0][-1]
    runs.get("mutual", mutual)
    for k in (0, 1):
        rows.append((f"deep mutual learning, peer {k + 1} of 2 (T=1, CE + KL; baseline: its initial weights "
                     "trained alone)", "MLP-64", "the other peer", alone[k], peers[k]))

    def pruned(seed, teach):
        _, dense = scratch(student, train, test, schedule, seed)
        model = copy.deepcopy(dense)
        prune.global_unstructured(prune.prunable_parameters(model), amount=0.9)
        no.manual_seed(seed)
        if teach:
            distiller = distill.Distiller(model, dense, default, cache_teacher=True)
            train_run(model, distiller, train, schedule, seed, distiller.compute_loss)
            distiller.remove_hooks()
        else:
            train_run(model, model, train, schedule, seed)
        return accuracy(model, test)
    finetuned = runs.get("pruned CE", lambda s: pruned(s, False))
    recovered = runs.get("pruned KD", lambda s: pruned(s, True))
    rows.append(("90%-pruned student recovered from its dense original (baseline: CE finetuning)",
                 "MLP-64 90% sparse", f"dense MLP-64 {np.mean(base):.2%}", finetuned, recovered))

    def quantized(seed, teach):
        """W4A8 QAT of the trained from-scratch student (observers frozen at half time), converted to integers;
        with ``teach``, the loss is the defaults' 0.5 CE + 0.5 KD from the float student it started from."""
        _, dense = scratch(student, train, test, schedule, seed)
        prepared = quant.prepare_qat(copy.deepcopy(dense), example_input=train[0][:1],
                                     config=quant.qat_config(weight=quant.weight_spec(4)))
        steps = schedule.epochs * -(-len(train[1]) // schedule.batch_size)
        callbacks = [quant.QATSchedule(freeze_observers_after=steps // 2)]
        no.manual_seed(seed)
        if teach:
            distiller = distill.Distiller(prepared, dense, default, cache_teacher=True)
            train_run(prepared, distiller, train, schedule, seed, distiller.compute_loss, callbacks)
            distiller.remove_hooks()
        else:
            train_run(prepared, prepared, train, schedule, seed, callbacks=callbacks)
        return accuracy(quant.convert(prepared), test)
    qat_ce = runs.get("W4A8 QAT CE", lambda s: quantized(s, False))
    qat_kd = runs.get("W4A8 QAT KD", lambda s: quantized(s, True))
    rows.append(("W4A8 QAT student (integer model) distilled from its float original (baseline: QAT with CE)",
                 "MLP-64 W4A8", f"float MLP-64 {np.mean(base):.2%}", qat_ce, qat_kd))

    print(f"\n### Every strategy (student accuracy, {len(runs.seeds)} seeds; {schedule.describe()})\n")
    print("| strategy | student | teacher(s) | from scratch | distilled | Δ points |")
    print("|---|---|---|---:|---:|---:|")
    for label, who, teacher_text, baseline, values in rows:
        print(f"| {label} | {who} | {teacher_text} | {summary(baseline)} | {summary(values)} | "
              f"{delta(values, baseline)} |")


def study_table(teachers: dict[str, Teacher], train, test, runs: Runs, schedule: Schedule) -> None:
    cnn_teacher, lenet = (teachers[n] for n in list(teachers)[:2])
    default = distill.DistillConfig()
    textbook_schedule = Schedule(epochs=10, lr=0.01, batch_size=64, cosine=False)
    short = Schedule(epochs=max(schedule.epochs // 2, 1))
    classes_mean = distill.DistillConfig(temperature=4.0, hard_weight=0.1, soft_weight=0.9 / 10)
    add_on = distill.DistillConfig(temperature=4.0, hard_weight=1.0, soft_weight=1.0)
    plan = [
        (textbook_schedule, "from scratch", None, None),
        (textbook_schedule, "from scratch at lr / 10", None, "lr/10"),
        (textbook_schedule, "textbook 0.1 CE + 0.9 KD, T=4", lenet, TEXTBOOK),
        (textbook_schedule, "textbook, KL also averaged over classes (KLDivLoss reduction='mean')", lenet,
         classes_mean),
        (textbook_schedule, "textbook 0.1 CE + 0.9 KD, T=4", cnn_teacher, TEXTBOOK),
        (schedule, "from scratch", None, None),
        (schedule, "textbook 0.1 CE + 0.9 KD, T=4", lenet, TEXTBOOK),
        (schedule, "defaults 0.5 CE + 0.5 KD, T=2", lenet, default),
        (schedule, "textbook 0.1 CE + 0.9 KD, T=4", cnn_teacher, TEXTBOOK),
        (schedule, "CE + KD added on top (1 CE + 1 KD), T=4", cnn_teacher, add_on),
        (schedule, "defaults 0.5 CE + 0.5 KD, T=2", cnn_teacher, default),
        (short, "from scratch", None, None),
        (short, "defaults 0.5 CE + 0.5 KD, T=2", cnn_teacher, default),
    ]
    print(f"\n### Why the textbook recipe loses (MLP-64 student, {len(runs.seeds)} seeds)\n")
    print("| schedule | recipe | teacher | student accuracy | Δ vs from scratch, same schedule |")
    print("|---|---|---|---:|---:|")
    for plan_schedule, label, teacher, config in plan:
        row_key = key(plan_schedule, label, teacher)
        if teacher is None:
            actual = plan_schedule if config is None else Schedule(plan_schedule.epochs, plan_schedule.lr / 10,
                                                                   plan_schedule.batch_size, plan_schedule.cosine)
            values = runs.get(row_key, lambda s, a=actual: scratch(student, train, test, a, s)[0])
        else:
            values = runs.get(row_key, lambda s, t=teacher, c=config, p=plan_schedule: distilled([t.model], c, train,
                                                                                              test, p, s))
        baseline = runs.results[key(plan_schedule, "from scratch")]
        teacher_text = f"{teacher.name.split(' (')[0]} {teacher.accuracy:.2%}" if teacher else "-"
        print(f"| {plan_schedule.describe()} | {label} | {teacher_text} | {summary(values)} | "
              f"{delta(values, baseline) if values is not baseline else '-'} |")
    print("\nGradient scale at the first step (2,000 training images, CNN teacher):\n")
    print(gradient_scale_table(cnn_teacher.model, train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60, help="epochs of every student row")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="epochs of the CNN teacher")
    parser.add_argument("--section", choices=("all", "main", "study"), default="all")
    args = parser.parse_args()
    start = time.perf_counter()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    print("## Knowledge distillation (Fashion-MNIST, MLP 784-64-10 student)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print("Teachers (seed 0, trained once in this run):\n")
    teachers = train_teachers(train, test, args.teacher_epochs)
    runs = Runs(list(range(args.seeds)))
    schedule = Schedule(epochs=args.epochs)
    if args.section in ("all", "main"):
        main_table(teachers, train, test, runs, schedule)
    if args.section in ("all", "study"):
        study_table(teachers, train, test, runs, schedule)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
