"""PNG plots from a report file (optional extra ``plot``: matplotlib), drawn by ``nanoopt plot REPORT``.

From a recipe's ``report.json``:

* ``size_accuracy.png``: accuracy against stored bytes (log scale) for the float baseline, the model after each
  step and the compressed file, with the Pareto front (no other point is both smaller and more accurate) marked;
  for a language model, validation loss against stored bytes (the front: no other point is smaller with a lower
  loss);
* ``sensitivity.png``: per layer, the accuracy with only that layer pruned to the recipe's sparsity, and the
  SQNR of its weights on the recipe's weight grid;
* ``histograms.png``: per layer, the float weights' histogram, the compressed model's surviving weights, and
  the quantization grid (the levels of the layer's median channel scale) as vertical lines;
* ``sparsity.png``: the fraction of zero weights per layer of the compressed model.

From a sweep's JSON (a list of rows of :func:`nanoopt.pipeline.sweep.sweep`, or ``{"rows": [...]}``): the
size/accuracy plot of every point, with the Pareto front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as error:  # pragma: no cover - depends on the extra
    raise ImportError("nanoopt's plots need matplotlib: pip install 'nanoopt[plot]'") from error

__all__ = ["pareto_front", "plot_report"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, accuracy) that no other point beats on both (smaller or equal size and
    higher or equal accuracy, one strictly), sorted by size.

    >>> pareto_front([(10, 0.9), (5, 0.8), (20, 0.85), (5, 0.7)])
    [1, 0]
    """
    front = []
    for i, (size, accuracy) in enumerate(points):
        dominated = any((s <= size and a >= accuracy) and (s < size or a > accuracy)
                        for j, (s, a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _size_accuracy(labels: list[str], sizes: list[float], accuracies: list[float], title: str, path: Path,
                   loss: bool = False) -> Path:
    """Accuracy (or, with ``loss``, validation loss: lower is better) against size, with the Pareto front."""
    figure, axis = plt.subplots(figsize=(8, 5.5), dpi=120)
    shown = list(accuracies) if loss else [100 * a for a in accuracies]
    axis.scatter(sizes, shown, color="tab:blue", zorder=3, label="models")
    front = pareto_front(list(zip(sizes, [-a if loss else a for a in accuracies], strict=True)))
    axis.plot([sizes[i] for i in front], [shown[i] for i in front], color="tab:red", marker="o",
              markerfacecolor="none", markersize=12, linewidth=1.5, zorder=2, label="Pareto front")
    for index, (label, size, value) in enumerate(zip(labels, sizes, shown, strict=True)):
        offset = (6, 6) if index % 2 == 0 else (6, -14)     # alternate above/below: close points stay readable
        axis.annotate(label, (size, value), textcoords="offset points", xytext=offset, fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("stored bytes (log scale)")
    axis.set_ylabel("validation loss (nats per token)" if loss else "test accuracy (%)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="best" if loss else "lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _report_points(report: dict[str, Any], key: str = "accuracy") -> tuple[list[str], list[float], list[float]]:
    labels = ["float32 (.npz)"]
    sizes, accuracies = [report["baseline"]["stored_bytes"]], [report["baseline"][key]]
    for step in report["steps"]:
        if "compact_bytes_raw" in step and key in step and step["kind"] not in ("train", "train_lm"):
            labels.append(f"after {step['kind']} (no entropy coding)")
            sizes.append(step["compact_bytes_raw"])
            accuracies.append(step[key])
    if report["compressed"]["stored_bytes"]:
        labels.append(f"{report['recipe']['name']} (file)")
        sizes.append(report["compressed"]["stored_bytes"])
        accuracies.append(report["compressed"][key])
    return labels, sizes, accuracies


def _sensitivity(report: dict[str, Any], path: Path) -> Path:
    analysis = report["analysis"]
    layers = analysis["layers"]
    names = [layer["name"] for layer in layers]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=120)
    left.bar(names, [100 * layer["pruned_accuracy"] for layer in layers], color="tab:orange")
    left.axhline(100 * analysis["float_accuracy"], color="black", linestyle="--", label="float, unpruned")
    low = min([100 * layer["pruned_accuracy"] for layer in layers] + [100 * analysis["float_accuracy"]])
    left.set_ylim(max(0.0, low - 5), 100 * analysis["float_accuracy"] + 2)
    left.set_title(f"accuracy, only this layer pruned to {100 * analysis['sparsity']:.0f}%")
    left.set_xlabel("layer")
    left.set_ylabel("test accuracy (%)")
    left.legend(loc="upper right", fontsize=8)
    right.bar(names, [layer["sqnr_db"] for layer in layers], color="tab:green")
    right.set_title(f"weight SQNR at {analysis['bits']} bits (per channel)")
    right.set_xlabel("layer")
    right.set_ylabel("SQNR (dB)")
    for axis in (left, right):
        axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _bars_from_histogram(axis: Any, histogram: dict[str, list[float]], color: str, label: str) -> None:
    edges, counts = histogram["edges"], histogram["counts"]
    if not counts:
        return
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    axis.bar(edges[:-1], counts, width=widths, align="edge", color=color, alpha=0.55, label=label)


def _histograms(report: dict[str, Any], path: Path) -> Path:
    layers = report["analysis"]["layers"]
    figure, axes = plt.subplots(len(layers), 1, figsize=(9, 2.8 * len(layers)), dpi=120, squeeze=False)
    for axis, layer in zip(axes[:, 0], layers, strict=True):
        _bars_from_histogram(axis, layer["float_histogram"], "tab:blue", "float weights")
        if "compressed_histogram" in layer:
            _bars_from_histogram(axis, layer["compressed_histogram"], "tab:orange", "compressed, non-zero")
        for index, level in enumerate(layer.get("grid", [])):
            axis.axvline(level, color="tab:red", linewidth=0.8, alpha=0.8,
                         label=f"{layer.get('bits')}-bit grid (median channel)" if index == 0 else None)
        axis.set_yscale("log")
        axis.set_title(f"layer {layer['name']}")
        axis.set_ylabel("count (log)")
        axis.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("weight value")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _sparsity(report: dict[str, Any], path: Path) -> Path:
    layers = report["compressed"]["layers"]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    names = [layer["name"] for layer in layers]
    values = [100 * layer["sparsity"] for layer in layers]
    bars = axis.bar(names, values, color="tab:purple")
    for bar, value, layer in zip(bars, values, layers, strict=True):
        text = f"{value:.1f}%\n{layer['nonzero']:,} of {layer['size']:,} kept"
        axis.annotate(text, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    axis.set_ylim(0, 115)
    axis.set_ylabel("zero weights (%)")
    axis.set_xlabel("layer")
    axis.set_title(f"sparsity per layer: {report['recipe']['name']}")
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_report(report_path: str | os.PathLike, output: str | os.PathLike | None = None) -> list[Path]:
    """Draw every plot the file supports into ``output`` (default: the report's folder); return the paths."""
    report_path = Path(report_path)
    with open(report_path) as handle:
        try:
            report = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{report_path}: not a JSON report ({error})") from None
    folder = Path(output) if output is not None else report_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    rows = report if isinstance(report, list) else report.get("rows") if isinstance(report, dict) else None
    if rows is not None:   # a sweep table
        labels = [f"W{row['bits']} s{100 * row['sparsity']:.0f}%{' KD' if row['distill'] else ''}" for row in rows]
        return [_size_accuracy(labels, [row["stored_bytes"] for row in rows], [row["accuracy"] for row in rows],
                               "sweep: accuracy vs stored size", folder / "size_accuracy.png")]
    if not isinstance(report, dict) or "compressed" not in report:
        raise ValueError(f"{report_path}: not a nanoopt report (no 'compressed' entry) nor a sweep table")
    loss = report["baseline"].get("val_loss") is not None   # a language model
    labels, sizes, accuracies = _report_points(report, "val_loss" if loss else "accuracy")
    what = "validation loss" if loss else "accuracy"
    paths = [_size_accuracy(labels, sizes, accuracies, f"{report['recipe']['name']}: {what} vs stored size",
                            folder / "size_accuracy.png", loss)]
    if "analysis" in report:
        paths += [_sensitivity(report, folder / "sensitivity.png"), _histograms(report, folder / "histograms.png")]
    paths.append(_sparsity(report, folder / "sparsity.png"))
    return paths
