"""The rows of ``nanoopt demo``: every technique on one dataset, one table, every number measured in the run.

* ``demo(dataset="digits")`` (the default; bundled, offline, under a minute on 2 cores): LeNet-300-100 and the
  8x8 LeNet-5 trained in float; global magnitude pruning to 90% and physical removal of half the hidden
  neurons; int8 static PTQ of both and 4-bit weight-only; int8 and W4A8 QAT; an MLP student from scratch and
  distilled from the LeNet-5 (Hinton et al. 2015); and one **combined recipe** run through
  :mod:`nanoopt.pipeline` -- one-shot pruning to 90% with finetuning by distillation from the float model, 4-bit
  QAT, conversion to integer kernels and the compact ``.nnz`` file (Deep Compression's order, Han et al. 2016).
* ``demo(dataset="fashion-mnist")``: the same rows at full size (28x28 Fashion-MNIST, 60k/10k, read from
  Debian's ``dataset-fashion-mnist`` by :func:`nanoopt.data.load_fashion_mnist`).
* :func:`gpt_demo`: a small character-level GPT trained briefly on Shakespeare, then GPTQ W4, SmoothQuant W8A8,
  SparseGPT 50% and attention-head removal, by validation loss, size and generation speed.

The distillation rows: both students have the same architecture, initialisation seed, optimiser and epochs; only
the loss differs (cross-entropy vs :class:`~nanoopt.distill.DistillConfig`'s default 0.5 CE + 0.5 KD at T = 2).
On the bundled digits the test set has 359 images, so one image is 0.28 points: the Fashion-MNIST comparison
with three seeds is ``python -m benchmarks.distillation``.

This module is the face (it uses ``report``, ``pipeline`` and every technique); no technique imports it.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import nanoopt as no
from nanoopt import data, distill, io, models, nn, optim, prune, quant, report
from nanoopt.pipeline import Recipe, run_recipe
from nanoopt.train_lm import LMTrainConfig, train_lm

__all__ = ["DemoData", "demo", "demo_data", "gpt_demo"]


@dataclass
class DemoData:
    """A dataset of the demo and the sizes of its models."""

    name: str                         # "digits" or "fashion-mnist" (the recipe's data.dataset)
    description: str
    train_set: tuple[np.ndarray, np.ndarray]
    test_set: tuple[np.ndarray, np.ndarray]
    side: int                         # image side (8 or 28)
    batch_size: int                   # training mini-batch
    calibration: int                  # images that calibrate post-training quantization

    @property
    def features(self) -> int:
        return self.side * self.side


def demo_data(dataset: str = "digits") -> DemoData:
    """The bundled 8x8 digits, or Fashion-MNIST (``FileNotFoundError`` saying how to install it when absent).

    >>> d = demo_data("digits")
    >>> d.side, len(d.train_set[1]), len(d.test_set[1])
    (8, 1438, 359)
    """
    if dataset == "digits":
        train_set, test_set = data.load_digits("train"), data.load_digits("test")
        return DemoData("digits", f"8x8 handwritten digits ({len(train_set[1]):,} train / {len(test_set[1])} test "
                        "images, bundled)", train_set, test_set, 8, 32, 256)
    if dataset == "fashion-mnist":
        train_set, test_set = data.load_fashion_mnist("train"), data.load_fashion_mnist("test")
        return DemoData("fashion-mnist", f"Fashion-MNIST 28x28 ({len(train_set[1]):,} train / {len(test_set[1]):,} "
                        "test images)", train_set, test_set, 28, 128, 1024)
    raise ValueError(f"demo: dataset must be 'digits' or 'fashion-mnist', got {dataset!r}")


def _train(model: nn.Module, train_set: tuple, epochs: int, lr: float, batch_size: int, progress: bool) -> float:
    start = time.perf_counter()
    no.fit(model, train_set, epochs=epochs, lr=lr, momentum=0.9, batch_size=batch_size, progress=progress)
    return time.perf_counter() - start


def demo(seed: int = 0, epochs: int = 20, progress: bool = False, dataset: str | DemoData = "digits"
         ) -> list[report.Row]:
    """Train the float baselines, compress them with every technique and one combined recipe; the measured rows.

    >>> rows = demo(epochs=1)                                          # doctest: +SKIP
    >>> rows[0].name                                                   # doctest: +SKIP
    'LeNet-300-100 float32'
    """
    d = dataset if isinstance(dataset, DemoData) else demo_data(dataset)
    rows = []
    baselines = {}
    mlp_name, cnn_name = "LeNet-300-100 float32", f"LeNet-5 ({d.side}x{d.side}) float32"
    for name, build in ((mlp_name, lambda: models.lenet_300_100(in_features=d.features)),
                        (cnn_name, lambda: models.lenet5(input_size=d.side))):
        no.manual_seed(seed)
        model = build()
        seconds = _train(model, d.train_set, epochs, 0.05, d.batch_size, progress)
        rows.append(report.measure(name, model, d.test_set, note=f"trained {epochs} epochs in {seconds:.1f} s"))
        baselines[name] = model
    rows += _pruning_rows(baselines[mlp_name], d, seed, progress)
    rows += _quantization_rows(baselines, d, progress)
    rows += _qat_rows(baselines[cnn_name], d, seed, progress)
    rows += _distillation_rows(baselines[cnn_name], d, seed, epochs, progress)
    rows.append(_recipe_row(baselines[mlp_name], d, seed, progress))
    return rows


def _qat_rows(trained: nn.Module, d: DemoData, seed: int, progress: bool) -> list[report.Row]:
    """Two epochs of quantization-aware training (int8, and 4-bit weights) from the float LeNet-5, converted."""
    rows = []
    steps_per_epoch = -(-len(d.train_set[1]) // d.batch_size)
    for label, config in (("int8", None), ("W4A8", quant.qat_config(weight=quant.weight_spec(4)))):
        no.manual_seed(seed)
        prepared = quant.prepare_qat(copy.deepcopy(trained), config, example_input=d.train_set[0][:1])
        start = time.perf_counter()
        no.fit(prepared, d.train_set, epochs=2, lr=0.01, batch_size=d.batch_size, progress=progress,
               callbacks=[quant.QATSchedule(freeze_observers_after=steps_per_epoch)])
        seconds = time.perf_counter() - start
        rows.append(report.measure(f"LeNet-5 ({d.side}x{d.side}) {label} QAT", quant.convert(prepared), d.test_set,
                                   note=f"+2 QAT epochs in {seconds:.1f} s, then converted to integers"))
    return rows


def _quantization_rows(baselines: dict[str, nn.Module], d: DemoData, progress: bool) -> list[report.Row]:
    """int8 post-training quantization of both baselines (calibration images), and 4-bit weight-only."""
    rows = []
    calibration = d.train_set[0][:d.calibration]
    for name, model in baselines.items():
        start = time.perf_counter()
        integer_model = quant.quantize_static(model, calibration, progress=progress)
        quant.tune_backends(integer_model, d.test_set[0][:256])
        seconds = time.perf_counter() - start
        short = name.replace(" float32", "")
        rows.append(report.measure(f"{short} int8 PTQ (static, per-channel)", integer_model, d.test_set,
                                   note=f"calibrated + converted in {seconds:.1f} s; integer kernels"))
    model = baselines["LeNet-300-100 float32"]
    rows.append(report.measure("LeNet-300-100 4-bit weights (groups of 16)",
                               quant.quantize_weights(model, bits=4, group_size=16), d.test_set,
                               note="weight-only; int4 packed two per byte"))
    return rows


def _pruning_rows(trained: nn.Module, d: DemoData, seed: int, progress: bool) -> list[report.Row]:
    """Global magnitude pruning to 90% with a short finetune, and 50% of the hidden neurons removed physically."""
    finetune = 3
    rows = []
    no.manual_seed(seed)
    model = copy.deepcopy(trained)
    prune.global_unstructured(prune.prunable_parameters(model), amount=0.9)
    seconds = _train(model, d.train_set, finetune, 0.01, d.batch_size, progress)
    prune.remove_all(model)
    rows.append(report.measure("LeNet-300-100 pruned 90% (global L1)", model, d.test_set,
                               note=f"+{finetune} finetune epochs in {seconds:.1f} s; zeros stored densely"))
    no.manual_seed(seed)
    model = copy.deepcopy(trained)
    for index in (1, 3):  # the two hidden Linear layers
        prune.ln_structured(model[index], "weight", amount=0.5, n=1, dim=0)
    seconds = _train(model, d.train_set, finetune, 0.01, d.batch_size, progress)
    prune.shrink(model, d.test_set[0][:32])
    prune.remove_all(model)
    widths = "-".join(str(model[i].out_features) for i in (1, 3))
    rows.append(report.measure(f"LeNet-300-100 50% neurons removed ({widths})", model, d.test_set,
                               note=f"+{finetune} finetune epochs in {seconds:.1f} s; physically smaller"))
    return rows


def _distillation_rows(teacher: nn.Module, d: DemoData, seed: int, epochs: int, progress: bool,
                       hidden: int = 16) -> list[report.Row]:
    """An MLP (``hidden`` units) trained from scratch and by KD from ``teacher`` (see the module docstring)."""
    teacher_accuracy = no.evaluate(teacher, d.test_set)["accuracy"]
    rows = []
    for name, distilled in (("from scratch", False), ("KD from the teacher", True)):
        no.manual_seed(seed)
        student = models.mlp(d.features, (hidden,), num_classes=int(d.train_set[1].max()) + 1)
        trained = distill.Distiller(student, teacher, distill.DistillConfig(), cache_teacher=True) if distilled \
            else student
        optimizer = optim.SGD(list(trained.parameters()), lr=0.05, momentum=0.9)
        start = time.perf_counter()
        no.fit(trained, d.train_set, epochs, optimizer=optimizer, batch_size=d.batch_size,
               scheduler=optim.CosineAnnealingLR(optimizer, epochs), progress=progress,
               compute_loss=trained.compute_loss if distilled else None)
        seconds = time.perf_counter() - start
        if distilled:
            trained.remove_hooks()
        note = f"{epochs} epochs in {seconds:.1f} s"
        if distilled:
            note += f"; teacher {teacher_accuracy:.1%}, 0.5 CE + 0.5 KD, T=2"
        rows.append(report.measure(f"MLP-{hidden} student, {name}", student, d.test_set, note=note))
    return rows


def combined_recipe(d: DemoData, float_file: str, seed: int = 0) -> dict[str, Any]:
    """The demo's combined recipe (a recipe table): from the trained float LeNet-300-100 in ``float_file``, one-shot
    global pruning to 90% with 2 epochs of finetuning by distillation, 4-bit QAT (1 epoch, distilling), convert,
    and the compact file.

    >>> [step["kind"] for step in combined_recipe(demo_data("digits"), "float.npz")["steps"]]
    ['prune', 'qat', 'convert', 'save']
    """
    return {"name": "prune 90% + KD -> W4A8 QAT -> convert -> .nnz",
            "model": {"architecture": "lenet_300_100", "args": {"in_features": d.features}, "file": float_file},
            "data": {"dataset": d.name},
            "run": {"seed": seed, "batch_size": d.batch_size, "reference": False, "latency_repeats": 1,
                    "large_batch": 32},
            "steps": [{"kind": "prune", "sparsity": 0.9, "schedule": "one_shot", "epochs": 2, "lr": 0.01,
                       "distill": True},
                      {"kind": "qat", "bits": 4, "epochs": 1, "lr": 0.01, "distill": True},
                      {"kind": "convert"}, {"kind": "save", "format": "compact"}]}


def _recipe_row(trained: nn.Module, d: DemoData, seed: int, progress: bool) -> report.Row:
    """The combined recipe run through :func:`nanoopt.pipeline.run_recipe`; its size is the ``.nnz`` file's."""
    with tempfile.TemporaryDirectory(prefix="nanoopt-demo-") as folder:
        io.save(trained, Path(folder) / "float.npz")
        recipe = Recipe.from_dict(combined_recipe(d, "float.npz", seed), base=folder)
        start = time.perf_counter()
        result = run_recipe(recipe, output=folder, progress=progress)
        seconds = time.perf_counter() - start
        stored = report.file_bytes(result["files"]["model"])
        float_bytes = report.file_bytes(result["files"]["float"])
    row = report.measure(f"LeNet-300-100 recipe: {recipe.name}", result["model"], d.test_set,
                         note=f"nanoopt.pipeline, {seconds:.1f} s; size: the .nnz file, {float_bytes / stored:.1f}x "
                              "smaller than the float .npz")
    row.size_bytes = stored
    return row


# ============================================================================ the transformer demo
GPT_SIZES = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64}   # a small character-level GPT
GPT_IGNORE = ["lm_head"]    # the head is tied to the token embedding: it stays float


def gpt_demo(seed: int = 0, iters: int = 300, progress: bool = False, validation_windows: int = 256,
             calibration_windows: int = 64, sizes: dict[str, int] | None = None) -> list[report.Row]:
    """Train a small GPT on Shakespeare for ``iters`` steps, compress it, return rows (validation loss, size,
    tokens/s of generation at batch 1 with the KV cache).

    Calibration: ``calibration_windows`` random windows of the training text (seed ``seed``); validation loss:
    ``validation_windows`` fixed windows of the last 10% of the text (:func:`nanoopt.data.validation_windows`).

    >>> rows = gpt_demo(iters=1, validation_windows=4, calibration_windows=8,
    ...                 sizes={"block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16})
    >>> [row.name for row in rows][:2], rows[0].val_loss > rows[0].val_loss / 2
    (['GPT float32', 'GPTQ W4 (groups of 16)'], True)
    """
    sizes = dict(GPT_SIZES if sizes is None else sizes)
    tokenizer = data.CharTokenizer.from_text(data.load_shakespeare())
    train_ids = tokenizer.encode(data.load_shakespeare("train"))
    validation = data.validation_windows(tokenizer.encode(data.load_shakespeare("val")), sizes["block_size"],
                                         count=validation_windows)
    calibration, _ = data.sample_windows(train_ids, sizes["block_size"], calibration_windows,
                                         np.random.default_rng(seed))
    no.manual_seed(seed)
    model = models.gpt(tokenizer.vocab_size, **sizes)
    config = LMTrainConfig(max_iters=iters, lr_decay_iters=iters, warmup_iters=min(100, iters // 10), seed=seed,
                           batch_size=16)
    start = time.perf_counter()
    train_lm(model, train_ids, config, progress=progress)
    seconds = time.perf_counter() - start
    group = math.gcd(32, sizes["n_embd"])   # divides every in_features (n_embd and 4 n_embd)

    def measure(name: str, compressed: nn.Module, note: str) -> report.Row:
        return report.measure_lm(name, compressed, validation, note=note)

    rows = [measure("GPT float32", model, f"{iters} steps of AdamW (batch 16 x {sizes['block_size']}) in "
                                          f"{seconds:.1f} s")]
    timed = _timed(lambda: quant.gptq(model, calibration, bits=4, group_size=group, ignore=GPT_IGNORE,
                                      progress=progress))
    rows.append(measure(f"GPTQ W4 (groups of {group})", timed[0], f"{timed[1]:.1f} s; weight-only, int4 packed; "
                                                                  "head float (tied)"))
    timed = _timed(lambda: quant.quantize_w8a8(model, calibration, alpha=0.5))
    rows.append(measure("SmoothQuant W8A8", timed[0], f"{timed[1]:.1f} s; int8 Linears and integer attention"))
    timed = _timed(lambda: prune.remove_all(prune.sparsegpt(copy.deepcopy(model), calibration, sparsity=0.5,
                                                            ignore=GPT_IGNORE, progress=progress)))
    rows.append(measure("SparseGPT 50%", timed[0], f"{timed[1]:.1f} s; zeros stored densely"))
    windows, targets = data.sample_windows(train_ids, sizes["block_size"], calibration_windows,
                                           np.random.default_rng(seed + 1))
    heads = copy.deepcopy(model)
    start = time.perf_counter()
    chosen = prune.select_heads(prune.head_importance(heads, (windows, targets)), amount=0.25)
    prune.prune_heads(heads, chosen)
    count = sum(len(h) for h in chosen.values())
    rows.append(measure(f"{count} of {sizes['n_layer'] * sizes['n_head']} heads removed", heads,
                        f"{time.perf_counter() - start:.1f} s; Michel et al. importance, no finetuning"))
    return rows


def _timed(make: Any) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    model = make()
    return model, time.perf_counter() - start
