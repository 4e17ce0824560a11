"""Run a checked :class:`~nanoopt.pipeline.recipe.Recipe`: load the data and model, run the steps in order,
save, measure against the float baseline, and write ``report.json`` and ``report.md``.

What the report attributes to each step: after every step that leaves a float or integer model, the size the
model would take in the compact format *without* entropy coding (sparse layout and bit packing only); the
final file adds the entropy coding. The compression ratio (float32 ``.npz`` file / final file) is then the
product of one factor per step and one for the entropy coding.

Loading (:func:`load_model`): a compact file records the architecture and the structural steps; the model is
rebuilt empty (the same structure, no training) and the stored state is loaded into it, so its outputs are
those of the compressed model bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import nanoopt as no
from nanoopt import data, io, models, nn, optim, prune, report
from nanoopt.pipeline import storage
from nanoopt.pipeline.analysis import layer_analysis
from nanoopt.pipeline.recipe import LANGUAGE_MODELS, Recipe, shakespeare_tokenizer
from nanoopt.pipeline.steps import STEPS, Context
from nanoopt.quant.packing import pack_int4
from nanoopt.train_lm import evaluate_lm

__all__ = ["load_data", "load_model", "run_recipe"]


def load_data(recipe: Recipe) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) arrays of the recipe's dataset (images (N, C, H, W) float32 in [0, 1], labels int64); for the
    text, train = (ids[:-1], ids[1:]) of the first 90% (inputs and next characters) and test = the fixed
    validation windows (x, y) of the last 10%, each (validation_windows, block_size)."""
    spec = recipe.data
    if spec.dataset == "shakespeare":
        tokenizer = shakespeare_tokenizer()
        ids = tokenizer.encode(data.load_shakespeare("train"))
        if spec.train_limit is not None:
            ids = ids[:spec.train_limit]
        validation = data.validation_windows(tokenizer.encode(data.load_shakespeare("val")),
                                             recipe.model.args["block_size"], count=spec.validation_windows)
        return (ids[:-1], ids[1:]), validation
    if spec.dataset == "digits":
        train, test = data.load_digits("train"), data.load_digits("test")
    elif spec.dataset == "fashion-mnist":
        folder = None if spec.path is None else recipe.resolve(spec.path)
        train, test = data.load_fashion_mnist("train", folder), data.load_fashion_mnist("test", folder)
    else:
        def images(key: str) -> np.ndarray:
            raw = data.load_idx(recipe.resolve(getattr(spec, key)))
            return (raw.astype(np.float32) / 255.0)[:, None]                    # (N, 1, H, W)

        def labels(key: str) -> np.ndarray:
            return data.load_idx(recipe.resolve(getattr(spec, key))).astype(np.int64)

        train = (images("train_images"), labels("train_labels"))
        test = (images("test_images"), labels("test_labels"))
    if spec.train_limit is not None:
        train = (train[0][:spec.train_limit], train[1][:spec.train_limit])
    return train, test


def _build(architecture: str, args: dict[str, Any]) -> nn.Module:
    if architecture in LANGUAGE_MODELS and "vocab_size" not in args:
        args = {"vocab_size": shakespeare_tokenizer().vocab_size, **args}
    return getattr(models, architecture)(**args)


def _score(context: Context) -> dict[str, float]:
    """Accuracy on the test images, or the validation loss of a language model."""
    if context.task == "lm":
        return {"val_loss": evaluate_lm(context.model, *context.test_set)}
    return {"accuracy": no.evaluate(context.model, context.test_set)["accuracy"]}


def _baked_state(model: nn.Module) -> Any:
    """The state dict with pruning masks baked in (what saving writes)."""
    return prune.remove_all(copy.deepcopy(model)).state_dict()


def _info(recipe: Recipe, context: Context, structure: list[dict[str, Any]]) -> dict[str, Any]:
    if context.task == "lm":   # token windows of the model's block size
        args = {"vocab_size": shakespeare_tokenizer().vocab_size, **recipe.model.args}
        return {"architecture": recipe.model.architecture, "args": args, "task": "lm",
                "input_shape": [args["block_size"]], "structure": structure}
    return {"architecture": recipe.model.architecture, "args": recipe.model.args,
            "input_shape": list(context.train_set[0].shape[1:]), "structure": structure}


def _example(info: dict[str, Any]) -> np.ndarray:
    """A batch of inputs to rebuild a model with: uniform images, or token windows."""
    rng = np.random.default_rng(0)
    if info.get("task") == "lm":
        return rng.integers(0, info["args"]["vocab_size"], size=(4, *info["input_shape"]))
    return rng.uniform(size=(4, *info["input_shape"])).astype(np.float32)


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model saved by a recipe in the compact format, rebuilt and loaded (outputs equal bit for bit).

    >>> import os, tempfile
    >>> recipe = Recipe.from_dict({"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits",
    ...     "train_limit": 64}, "run": {"output": tempfile.mkdtemp(), "reference": False, "latency_repeats": 1},
    ...     "steps": [{"kind": "prune", "sparsity": 0.8, "schedule": "one_shot"},
    ...               {"kind": "weight_only", "bits": 4}, {"kind": "save"}]})
    >>> result = run_recipe(recipe)
    >>> type(load_model(result["files"]["model"])[1]).__name__
    'WeightOnlyLinear'
    """
    state, info = storage.load_state(path)
    if "architecture" not in info:
        raise ValueError(f"{os.fspath(path)}: this compact file does not say how to rebuild its model")
    model = _build(info["architecture"], info["args"])
    example = _example(info)
    for entry in info["structure"]:
        kind = STEPS.get(entry["kind"])
        if kind is None:
            raise ValueError(f"{os.fspath(path)}: step kind {entry['kind']!r} is not registered here")
        if kind.rebuild is not None:
            params = kind.schema(**{k: v for k, v in entry["params"].items()})
            model = kind.rebuild(model, params, entry["record"], example)
    model = prune.remove_all(model) if not hasattr(model, "input_scale") else model
    _match_packing(model, state)
    model.load_state_dict(state)
    return model.eval()


def _match_packing(model: nn.Module, state: Any) -> None:
    """An integer layer packs its codes two per byte when they fit in 4 bits, which depends on the values (a
    layer pruned to nothing has only zeros): give each rebuilt layer the layout its stored state has."""
    for name, module in model.named_modules():
        if not hasattr(module, "packed") or not hasattr(module, "weight_bits"):
            continue
        packed = f"{name}.weight_packed" in state
        if packed == module.packed:
            continue
        weight = np.zeros_like(module._buffers["weight"])     # the values come with the state
        if packed:
            module.register_buffer("weight_packed", pack_int4(weight))
            module.register_buffer("weight", weight, persistent=False)
        else:
            del module._buffers["weight_packed"]
            module.register_buffer("weight", weight)
        module.packed = packed


def _save(recipe: Recipe, context: Context, step: Any, structure: list[dict[str, Any]], output: Path,
          files: dict[str, str]) -> None:
    if step.format == "npz":
        path = output / f"{step.name}.npz"
        io.save(context.model, path)
    else:
        path = output / f"{step.name}.nnz"
        storage.save_state(context.model.state_dict(), path, info=_info(recipe, context, structure))
    files["model"] = str(path)


def _progress(enabled: bool) -> bool:
    """Progress bars only when asked for and the output is a terminal."""
    return enabled and sys.stderr.isatty()


def run_recipe(recipe: Recipe, output: str | os.PathLike | None = None, progress: bool | None = None
               ) -> dict[str, Any]:
    """Run ``recipe``; write the model, ``report.json`` and ``report.md`` into ``output`` (default: the
    recipe's ``run.output``, relative to the recipe file); return the report as a dict (what ``report.json``
    holds), plus the compressed model under ``"model"``."""
    start = time.perf_counter()
    output = Path(output) if output is not None else recipe.resolve(recipe.run.output)
    output.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_data(recipe)
    no.manual_seed(recipe.run.seed)
    model = _build(recipe.model.architecture, recipe.model.args)
    if recipe.model.file is not None:
        io.load_into(model, recipe.resolve(recipe.model.file))
    show = _progress(recipe.run.progress if progress is None else progress)
    files: dict[str, str] = {}
    context = Context(model, train_set, test_set, recipe.run.seed, recipe.run.batch_size, show, task=recipe.task,
                      output=str(output), files=files)
    structure: list[dict[str, Any]] = []
    context.saver = lambda ctx, step: _save(recipe, ctx, step, structure, output, files)
    log: list[dict[str, Any]] = []
    float_bytes = None
    teacher_epochs = 0
    for index, step in enumerate(recipe.steps):
        kind = STEPS[step.kind]
        if context.teacher is None and step.kind != "train" and float_bytes is None:
            teacher_epochs = context.epochs_trained
        records_before = len(context.records)
        began = time.perf_counter()
        kind.run(context, step.params)
        seconds = time.perf_counter() - began
        record = context.records[-1] if len(context.records) > records_before else {}
        structure.append({"kind": step.kind, "params": asdict(step.params), "record": record})
        context.state = kind.state_after(step.params, context.state)
        entry: dict[str, Any] = {"index": index, "kind": step.kind, "seconds": round(seconds, 2)}
        if context.state in ("float", "integer"):
            state = _baked_state(context.model)
            entry["compact_bytes_raw"] = len(storage.encode_state(state, entropy=False))
            entry.update(_score(context))
        elif context.state == "qat":
            entry.update(_score(context))
        log.append(entry)
    # the float baseline: the model before the first compression step (after any train steps)
    baseline_model = context.teacher if context.teacher is not None else context.model
    float_path = output / "float.npz"
    io.save(prune.remove_all(copy.deepcopy(baseline_model)), float_path)
    float_bytes = report.file_bytes(float_path)
    run = recipe.run
    language_model = recipe.task == "lm"
    baseline = report.measure_model("float32 baseline", baseline_model, test_set, str(float_path),
                                    run.large_batch, run.latency_repeats, language_model=language_model)
    compressed = report.measure_model(recipe.name, context.model, test_set, files.get("model"), run.large_batch,
                                      run.latency_repeats, language_model=language_model)
    result: dict[str, Any] = {"recipe": recipe.as_dict(), "baseline": baseline.as_dict(),
                              "compressed": compressed.as_dict(), "steps": log, "files": dict(files)}
    compression_epochs = context.epochs_trained - teacher_epochs
    if run.reference and compression_epochs > 0:
        result["reference"] = _reference(recipe, baseline_model, train_set, test_set, teacher_epochs,
                                         compression_epochs, show)
    if not language_model:   # per-layer sensitivity by accuracy (the plots)
        result["analysis"] = layer_analysis(baseline_model, context.model, test_set, result["recipe"]["steps"])
    result["attribution"] = _attribution(float_bytes, log, compressed.stored_bytes, files.get("model", ""))
    if files.get("model", "").endswith(".nnz"):
        with open(files["model"], "rb") as handle:
            result["streams"] = storage.stored_streams(handle.read())
    result["seconds"] = round(time.perf_counter() - start, 1)
    files["float"] = str(float_path)
    files["report_json"] = str(output / "report.json")
    files["report_md"] = str(output / "report.md")
    result["files"] = dict(files)
    with open(files["report_json"], "w") as handle:
        json.dump(result, handle, indent=1, default=float)
    with open(files["report_md"], "w") as handle:
        handle.write(markdown(result))
    result["model"] = context.model
    return result


def _reference(recipe: Recipe, baseline_model: nn.Module, train_set: tuple, test_set: tuple, float_epochs: int,
               extra_epochs: int, show: bool) -> dict[str, Any]:
    """The float model trained for as many epochs as the compressed one: from scratch with the train steps'
    learning rate and schedule over all the epochs (``scratch``; needs a train step), else the baseline trained
    ``extra_epochs`` more at lr 0.01."""
    run = recipe.run
    train_steps = [step.params for step in recipe.steps if step.kind == "train"]
    if run.reference_mode == "scratch" and train_steps and recipe.model.file is None:
        epochs, lr, cosine = float_epochs + extra_epochs, train_steps[0].lr, train_steps[0].cosine
        no.manual_seed(run.seed)
        model = _build(recipe.model.architecture, recipe.model.args)
        note = (f"a fresh float model trained {epochs} epochs (SGD lr {lr:g}{', cosine' if cosine else ''}), as "
                f"many as the compressed model ({float_epochs} float + {extra_epochs} compression)")
    else:
        epochs, lr, cosine = extra_epochs, 0.01, False
        model = copy.deepcopy(baseline_model)
        note = f"the float baseline trained {epochs} more epochs (SGD lr 0.01), as many as the compression steps"
    no.manual_seed(run.seed + 1)
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = optim.CosineAnnealingLR(optimizer, T_max=epochs) if cosine else None
    no.fit(model, train_set, epochs=epochs, optimizer=optimizer, scheduler=scheduler, batch_size=run.batch_size,
           progress=show)
    return {"epochs": epochs, "accuracy": no.evaluate(model, test_set)["accuracy"], "note": note}


def _attribution(float_bytes: int, log: list[dict[str, Any]], final_bytes: int | None, model_path: str
                 ) -> list[dict[str, Any]]:
    """One factor per size-changing step (previous size / size after it), then the entropy coding."""
    rows, previous = [], float_bytes
    for entry in log:
        size = entry.get("compact_bytes_raw")
        if size is None or entry["kind"] in ("save", "train", "train_lm"):   # training does not change the size
            continue
        rows.append({"step": f"{entry['index']}: {entry['kind']}", "bytes": size, "factor": previous / size})
        previous = size
    if final_bytes is not None:
        what = "entropy coding (zlib/lzma where it pays)" if model_path.endswith(".nnz") else "npz container"
        rows.append({"step": what, "bytes": final_bytes, "factor": previous / final_bytes})
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report of a :func:`run_recipe` result."""
    base = report.Measurement(**result["baseline"])
    compressed = report.Measurement(**result["compressed"])
    lines = [f"# Compression report: {result['recipe']['name']}", "",
             f"Model {result['recipe']['model']['architecture']} on {result['recipe']['data']['dataset']}; "
             f"{len(result['steps'])} steps in {result['seconds']} s. Sizes are the bytes of the files written; "
             "latencies are medians on 1 thread."
             + (" Validation loss: mean cross-entropy per character (nats) on the fixed validation windows."
                if base.val_loss is not None else ""), "",
             report.comparison_table(base, [compressed]), ""]
    if "reference" in result:
        reference = result["reference"]
        drop = 100 * (reference["accuracy"] - compressed.accuracy)
        lines += [f"Float reference ({reference['note']}): {100 * reference['accuracy']:.2f}%; the compressed model "
                  f"is {abs(drop):.2f} points {'below' if drop > 0 else 'above'} it.", ""]
    metric = "validation loss" if base.val_loss is not None else "accuracy"
    lines += ["## Steps", "", f"| step | kind | {metric} after | compact bytes (no entropy coding) | seconds |",
              "|---:|---|---:|---:|---:|"]
    for entry in result["steps"]:
        accuracy = f"{100 * entry['accuracy']:.2f}%" if "accuracy" in entry else "-"
        if "val_loss" in entry:
            accuracy = f"{entry['val_loss']:.4f}"
        size = f"{entry['compact_bytes_raw']:,}" if "compact_bytes_raw" in entry else "-"
        lines.append(f"| {entry['index']} | {entry['kind']} | {accuracy} | {size} | {entry['seconds']} |")
    lines += ["", "## Where the compression ratio comes from", "",
              f"Float32 file: {base.stored_bytes:,} bytes. Each factor is the size before the step over the size "
              "after it; their product is the total ratio.", "", "| step | bytes after | factor |", "|---|---:|---:|"]
    total = 1.0
    for row in result["attribution"]:
        total *= row["factor"]
        lines.append(f"| {row['step']} | {row['bytes']:,} | {row['factor']:.2f}x |")
    lines += [f"| **total** | {compressed.stored_bytes or 0:,} | **{total:.2f}x** |", "",
              "## Layers", "", "| layer | kind | shape | bits | sparsity | non-zero MACs |",
              "|---|---|---|---:|---:|---:|"]
    for layer in compressed.layers:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(f"| {layer['name']} | {layer['kind']} | {shape} | {layer['bits']} | "
                     f"{100 * layer['sparsity']:.1f}% | {layer['nonzero_macs']:,} |")
    if "streams" in result:
        lines += ["", "## Stored streams", "", "| array | layout | bytes |", "|---|---|---:|"]
        lines += [f"| {row['key']} | {row['layout']} | {row['bytes']:,} |" for row in result["streams"]]
    return "\n".join(lines) + "\n"
