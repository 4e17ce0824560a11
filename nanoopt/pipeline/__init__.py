"""Compression pipelines: recipes of steps over a model and a dataset, compact storage, one report, sweeps, plots.

The top layer of nanoopt: it uses the techniques (``prune``, ``quant``, ``distill``), ``io`` and ``report``;
nothing below imports it.

* :mod:`~nanoopt.pipeline.recipe`: :class:`Recipe` from TOML/JSON, checked whole before any work starts;
* :mod:`~nanoopt.pipeline.steps`: the step registry (:func:`register_step`), one small function per kind;
  :mod:`~nanoopt.pipeline.steps_calibrated`: the one-shot steps from calibration data (GPTQ, AWQ, RTN,
  SmoothQuant and W8A8, Wanda, SparseGPT, heads, blocks), for the image classifiers and the GPT on Shakespeare;
* :mod:`~nanoopt.pipeline.runner`: :func:`run_recipe`, :func:`load_model`;
* :mod:`~nanoopt.pipeline.storage`: sparse, entropy-coded, lossless storage (Deep Compression's last stage);
* :mod:`~nanoopt.pipeline.sweep`: grids of configurations through any ``concurrent.futures.Executor``;
* :mod:`~nanoopt.pipeline.plot`: PNG plots from a report file (optional extra ``plot``: matplotlib).

>>> from nanoopt import pipeline
>>> "prune" in pipeline.STEPS
True
"""

from nanoopt.pipeline.recipe import Recipe
from nanoopt.pipeline.runner import load_data, load_model, run_recipe
from nanoopt.pipeline.schema import RecipeError
from nanoopt.pipeline.steps import STEPS, Context, StepKind, register_step

__all__ = ["STEPS", "Context", "Recipe", "RecipeError", "StepKind", "load_data", "load_model", "register_step",
           "run_recipe"]
