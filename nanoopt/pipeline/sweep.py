"""Sweeps: a grid of configurations (weight bits x sparsity x distillation) run as recipes through any
``concurrent.futures.Executor`` -- a process pool by default, Dask's ``distributed.Client().get_executor()``
for more machines (optional extra ``dask``), or none (serially, in this process).

Every point is a recipe (:func:`point_recipe`): from the same float checkpoint, one-shot magnitude pruning to
the sparsity with ``finetune_epochs`` of training (distilling from the float model or not), then QAT at the bit
width and conversion (bits 32: no quantization), saved in the compact format. Each point seeds its own
generator, so the table -- accuracy, stored bytes, sparsity, bits, MACs -- is the same whether the points run
serially, on a pool or on Dask, in any order (timings are left out of the table: they are not reproducible).

>>> [(p.bits, p.sparsity, p.distill) for p in grid(bits=(8, 4), sparsity=(0.5,), distill=(False,))]
[(8, 0.5, False), (4, 0.5, False)]
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from nanoopt.pipeline.recipe import Recipe
from nanoopt.pipeline.runner import run_recipe

__all__ = ["SweepPoint", "format_sweep", "grid", "point_recipe", "process_pool", "run_point", "sweep"]


@dataclass(frozen=True)
class SweepPoint:
    bits: int            # weight bits after QAT (32: float, no quantization)
    sparsity: float      # fraction of weights pruned (0: no pruning)
    distill: bool        # finetune and QAT from the float model's outputs too


def grid(bits: Sequence[int] = (32, 8, 4), sparsity: Sequence[float] = (0.0, 0.5, 0.9),
         distill: Sequence[bool] = (False, True)) -> list[SweepPoint]:
    """Every combination, in a fixed order (sparsity, then distillation, then bits vary fastest)."""
    return [SweepPoint(b, s, d) for s, d, b in itertools.product(sparsity, distill, bits)]


def point_recipe(point: SweepPoint, model: dict[str, Any], data: dict[str, Any], finetune_epochs: int = 1,
                 qat_epochs: int = 1, seed: int = 0, lr: float = 0.01) -> dict[str, Any]:
    """The recipe table of one point (``model``/``data``: the recipe's ``[model]``/``[data]`` tables)."""
    steps: list[dict[str, Any]] = []
    if point.sparsity > 0:
        steps.append({"kind": "prune", "sparsity": point.sparsity, "schedule": "one_shot",
                      "epochs": finetune_epochs, "lr": lr, "distill": point.distill})
    if point.bits < 32:
        steps += [{"kind": "qat", "bits": point.bits, "epochs": qat_epochs, "lr": lr, "distill": point.distill},
                  {"kind": "convert"}]
    steps.append({"kind": "save", "name": "model"})
    return {"name": f"W{point.bits} s{point.sparsity:g}{' KD' if point.distill else ''}", "model": model,
            "data": data, "run": {"seed": seed, "reference": False, "latency_repeats": 1, "large_batch": 1},
            "steps": steps}


def run_point(table: dict[str, Any], base: str = ".") -> dict[str, Any]:
    """Run one point's recipe in a temporary folder; the reproducible part of its report (a top-level function,
    so process pools and Dask can send it to workers)."""
    recipe = Recipe.from_dict(table, base=base)
    with tempfile.TemporaryDirectory() as folder:
        result = run_recipe(recipe, output=folder, progress=False)
    compressed, baseline = result["compressed"], result["baseline"]
    return {"name": recipe.name, "accuracy": compressed["accuracy"], "stored_bytes": compressed["stored_bytes"],
            "float_bytes": baseline["stored_bytes"], "float_accuracy": baseline["accuracy"],
            "ratio": baseline["stored_bytes"] / compressed["stored_bytes"], "measured_sparsity": compressed["sparsity"],
            "weight_bits": sorted(set(compressed["bits"].values())), "nonzero_macs": compressed["nonzero_macs"]}


def process_pool(workers: int = 2) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool whose workers are *spawned* (fresh interpreters): forking a process whose Numba kernels
    already started OpenMP threads is unsafe (GNU OpenMP aborts the child), so pass this, not a default
    ``ProcessPoolExecutor()``, where nanoopt has already run. Spawned workers import the calling script: a script
    that sweeps on a pool needs the ``if __name__ == "__main__":`` guard."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def sweep(points: Sequence[SweepPoint], model: dict[str, Any], data: dict[str, Any],
          executor: concurrent.futures.Executor | None | str = None, base: str | os.PathLike = ".",
          **options: Any) -> list[dict[str, Any]]:
    """Run every point through ``executor`` and return one row per point, in the order of ``points``.

    ``executor``: ``None`` (:func:`process_pool` of 2 workers, made and shut down here), ``"serial"`` (this process),
    or any ``concurrent.futures.Executor`` (a ``ProcessPoolExecutor``, Dask's ``client.get_executor()``, ...).
    ``model`` should name a trained checkpoint (``file``), so that every point starts from the same float model.
    ``options`` go to :func:`point_recipe` (``finetune_epochs``, ``qat_epochs``, ``seed``, ``lr``).
    """
    tables = [point_recipe(point, model, data, **options) for point in points]
    for table in tables:                      # every recipe is checked before any work starts
        Recipe.from_dict(table, base=base)
    base = os.fspath(base)
    bar = {"desc": "sweep", "total": len(tables), "disable": not sys.stderr.isatty(), "leave": False}
    if executor == "serial":
        rows = [run_point(table, base) for table in tqdm(tables, **bar)]
    elif executor is None:
        with process_pool() as pool:
            rows = _collect([pool.submit(run_point, table, base) for table in tables], bar)
    elif isinstance(executor, concurrent.futures.Executor):
        rows = _collect([executor.submit(run_point, table, base) for table in tables], bar)
    else:
        raise TypeError(f"sweep: executor must be None, 'serial' or a concurrent.futures.Executor, got "
                        f"{type(executor).__name__}")
    return [{**asdict(point), **row} for point, row in zip(points, rows, strict=True)]


def _collect(futures: list[concurrent.futures.Future], bar: dict[str, Any]) -> list[dict[str, Any]]:
    """The futures' results in submission order, with a progress bar as they complete (quiet off a terminal)."""
    for _ in tqdm(concurrent.futures.as_completed(futures), **bar):
        pass
    return [future.result() for future in futures]


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of a sweep.

    >>> print(format_sweep([{"bits": 4, "sparsity": 0.9, "distill": True, "accuracy": 0.9, "stored_bytes": 100,
    ...                      "ratio": 40.0}]).splitlines()[-1])
    | 4 | 90% | yes | 90.00% | 100 | 40.0x |
    """
    lines = ["| bits | sparsity | distillation | accuracy | stored bytes | compression |",
             "|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['bits']} | {100 * row['sparsity']:.0f}% | {'yes' if row['distill'] else 'no'} | "
                     f"{100 * row['accuracy']:.2f}% | {row['stored_bytes']:,} | {row['ratio']:.1f}x |")
    return "\n".join(lines)
