"""Recipes: a model, a dataset and a sequence of compression steps, read from TOML or JSON and checked whole
before any work starts (the llm-compressor idea of a recipe as a list of modifiers, as data).

A recipe file (TOML; the same keys in JSON)::

    name = "deep-compression"
    [model]
    architecture = "lenet_300_100"      # a function of nanoopt.models
    args = { in_features = 784 }        # its keyword arguments
    file = "float.npz"                  # optional: start from this checkpoint (relative to the recipe file)
    [data]
    dataset = "fashion-mnist"           # "digits", "fashion-mnist", "idx" (then four IDX paths) or "shakespeare"
    [run]
    seed = 0
    output = "out"                      # the folder for the model, report.json and report.md
    [[steps]]
    kind = "prune"
    sparsity = 0.9
    epochs = 2
    [[steps]]
    kind = "save"

Refused before anything runs, naming the key or the step: unknown keys, wrong types, values out of range,
missing files, an unknown architecture or argument, a step for the other kind of model (the image classifiers
vs the GPT, ``architecture = "gpt"`` with ``dataset = "shakespeare"``: a language model, scored by validation
loss), a step whose optional extra is not installed, and impossible orders (a step whose model state it cannot
start from: QAT or pruning after convert, convert without QAT, anything after save).

>>> recipe = Recipe.from_dict({"model": {"architecture": "tiny_mlp"}, "data": {"dataset": "digits"},
...                            "steps": [{"kind": "prune", "sparsity": 0.5, "schedule": "one_shot"},
...                                      {"kind": "save"}]})
>>> [step.kind for step in recipe.steps]
['prune', 'save']
>>> try:
...     Recipe.from_dict({"model": {"architecture": "tiny_mlp"}, "steps": [{"kind": "convert"}]})
... except RecipeError as error:
...     print(error)
steps[0] (convert): cannot run on a float model (the model is float at the start); convert needs a qat model
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from nanoopt import data, models
from nanoopt.pipeline import steps_calibrated  # noqa: F401  (registers the one-shot steps)
from nanoopt.pipeline.schema import RecipeError, build
from nanoopt.pipeline.steps import STEPS

LANGUAGE_MODELS = ("gpt",)           # architectures that are language models (dataset "shakespeare")
TRAINING_KINDS = ("train", "train_lm")

__all__ = ["DataSpec", "ModelSpec", "Recipe", "RecipeError", "RunSpec", "Step", "shakespeare_tokenizer"]


@functools.cache
def shakespeare_tokenizer() -> data.CharTokenizer:
    """The character tokenizer of the whole bundled Shakespeare text (84 characters)."""
    return data.CharTokenizer.from_text(data.load_shakespeare())


@dataclass
class ModelSpec:
    architecture: str                          # a function of nanoopt.models (e.g. "lenet_300_100")
    args: dict = field(default_factory=dict)   # keyword arguments of that function
    file: str | None = None                    # a checkpoint to start from (nanoopt.io.save format)

    def check(self) -> None:
        build_fn = getattr(models, self.architecture, None)
        public = [name for name, value in vars(models).items() if inspect.isfunction(value)
                  and value.__module__ == models.__name__]
        if self.architecture.startswith("_") or not callable(build_fn):
            raise ValueError(f"architecture: unknown {self.architecture!r}; nanoopt.models has {', '.join(public)}")
        parameters = inspect.signature(build_fn).parameters
        for key in self.args:
            if key not in parameters:
                raise ValueError(f"args: {self.architecture} takes no argument {key!r} (it takes "
                                 f"{', '.join(parameters)})")
        supplied = ("vocab_size",) if self.architecture in LANGUAGE_MODELS else ()   # from the text's characters
        for key, parameter in parameters.items():
            if parameter.default is inspect.Parameter.empty and key not in self.args and key not in supplied:
                raise ValueError(f"args: {self.architecture} needs the argument {key!r}")


@dataclass
class DataSpec:
    dataset: Literal["digits", "fashion-mnist", "idx", "shakespeare"] = "digits"   # bundled digits, Fashion-MNIST,
    #   IDX files, or the bundled Shakespeare text (character-level, for the GPT)
    path: str | None = None               # fashion-mnist: the folder (default: Debian's)
    train_images: str | None = None       # idx: the four files
    train_labels: str | None = None
    test_images: str | None = None
    test_labels: str | None = None
    train_limit: int | None = None        # use only the first N training images (characters of the text)
    validation_windows: int = 256         # shakespeare: fixed windows of the last 10% that score validation loss

    def check(self) -> None:
        idx_keys = ("train_images", "train_labels", "test_images", "test_labels")
        if self.dataset == "idx":
            for key in idx_keys:
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: the idx dataset needs all of {', '.join(idx_keys)}")
        elif any(getattr(self, key) is not None for key in idx_keys):
            raise ValueError(f"{', '.join(idx_keys)} are for dataset = 'idx', not {self.dataset!r}")
        if self.path is not None and self.dataset != "fashion-mnist":
            raise ValueError(f"path is for dataset = 'fashion-mnist', not {self.dataset!r}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1, got {self.train_limit}")
        if self.validation_windows < 1:
            raise ValueError(f"validation_windows must be >= 1, got {self.validation_windows}")


@dataclass
class RunSpec:
    seed: int = 0                         # seeds training, shuffling and the float reference
    batch_size: int = 128                 # training mini-batch
    output: str = "compressed"            # folder for the model, report.json, report.md (relative to the recipe)
    reference: bool = True                # also train a float reference for as many epochs in total (see below)
    reference_mode: Literal["scratch", "continue"] = "scratch"   # scratch: a fresh float model trained like the
    #   train steps for all the epochs of the recipe; continue: the baseline trained further at lr 0.01
    latency_repeats: int = 20             # latency: median over this many runs
    large_batch: int = 256                # latency at batch 1 and at this batch size
    progress: bool = False                # progress bars (only shown on a terminal)

    def check(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("batch_size", "latency_repeats", "large_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Step:
    """One checked step: its kind and its schema instance."""

    kind: str
    params: Any

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self.params)}


@dataclass
class Recipe:
    model: ModelSpec
    data: DataSpec
    run: RunSpec
    steps: list[Step]
    name: str = "recipe"
    base: str = "."                       # the folder that relative paths start from

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, table: Any, base: str | os.PathLike = ".") -> Recipe:
        """Check a parsed recipe completely; raise :class:`RecipeError` naming the first problem."""
        if not isinstance(table, dict):
            raise RecipeError(f"recipe: expected a table at the top level, got {type(table).__name__}")
        known = ("name", "model", "data", "run", "steps")
        for key in table:
            if key not in known:
                raise RecipeError(f"recipe: unknown key {key!r}; known keys: {', '.join(known)}")
        for key in ("model", "steps"):
            if key not in table:
                raise RecipeError(f"recipe: missing required key {key!r}")
        name = table.get("name", "recipe")
        if not isinstance(name, str):
            raise RecipeError(f"recipe.name: expected str, got {type(name).__name__} {name!r:.60}")
        model = build(ModelSpec, table["model"], "model")
        data_spec = build(DataSpec, table.get("data", {}), "data")
        run = build(RunSpec, table.get("run", {}), "run")
        raw_steps = table["steps"]
        if not isinstance(raw_steps, list) or not raw_steps:
            raise RecipeError(f"recipe.steps: expected a non-empty list of step tables, got {raw_steps!r:.60}")
        steps = []
        for index, raw in enumerate(raw_steps):
            where = f"steps[{index}]"
            if not isinstance(raw, dict):
                raise RecipeError(f"{where}: expected a table, got {type(raw).__name__}")
            kind = raw.get("kind")
            if kind not in STEPS:
                raise RecipeError(f"{where}: unknown step kind {kind!r}; known kinds: {', '.join(sorted(STEPS))}")
            params = build(STEPS[kind].schema, {k: v for k, v in raw.items() if k != "kind"}, f"{where} ({kind})")
            steps.append(Step(kind, params))
        recipe = cls(model, data_spec, run, steps, name, os.fspath(base))
        recipe.check_task()
        recipe.check_order()
        recipe.check_extras()
        recipe.check_files()
        return recipe

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Recipe:
        """Read a ``.toml`` or ``.json`` recipe; relative paths in it start from the file's folder."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        text = path.read_bytes()
        try:
            if path.suffix == ".json":
                table = json.loads(text)
            elif path.suffix == ".toml":
                table = tomllib.loads(text.decode("utf-8"))
            else:
                raise RecipeError(f"{path}: a recipe is a .toml or .json file, got suffix {path.suffix!r}")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecipeError(f"{path}: not valid {path.suffix[1:].upper()} ({error})") from None
        return cls.from_dict(table, base=path.parent)

    # ------------------------------------------------------------------ checks
    @property
    def task(self) -> str:
        """``"lm"`` for a language model on text, ``"classify"`` for an image classifier."""
        return "lm" if self.data.dataset == "shakespeare" else "classify"

    def check_task(self) -> None:
        """The model fits the data, and every step serves this kind of model."""
        language_model = self.model.architecture in LANGUAGE_MODELS
        if language_model != (self.task == "lm"):
            raise RecipeError(f"model.architecture: {self.model.architecture!r} does not fit data.dataset = "
                              f"{self.data.dataset!r} (the language models {', '.join(LANGUAGE_MODELS)} train on "
                              "'shakespeare'; the image classifiers on 'digits', 'fashion-mnist' or 'idx')")
        what = {"lm": "a language model (the GPT on Shakespeare)", "classify": "an image classifier"}
        for index, step in enumerate(self.steps):
            tasks = STEPS[step.kind].tasks
            if self.task not in tasks:
                serves = " or ".join(what[task] for task in sorted(tasks))
                raise RecipeError(f"steps[{index}] ({step.kind}): runs on {serves}, not on {what[self.task]}")

    def check_extras(self) -> None:
        """Steps that need an optional package are refused before any work when it is missing."""
        for index, step in enumerate(self.steps):
            requires = STEPS[step.kind].requires
            if requires is not None and importlib.util.find_spec(requires[0]) is None:
                raise RecipeError(f"steps[{index}] ({step.kind}): needs the optional extra {requires[1]!r} (the "
                                  f"{requires[0]} package is not installed): pip install 'nanoopt[{requires[1]}]'")

    def check_order(self) -> None:
        """Walk the model states through the steps; refuse the first step that cannot start from its state."""
        state, previous = "float", None
        for index, step in enumerate(self.steps):
            kind = STEPS[step.kind]
            if state not in kind.accepts:
                after = f"after steps[{index - 1}] ({previous}) the model is {state}" if previous \
                    else f"the model is {state} at the start"
                needs = " or ".join(sorted(kind.accepts))
                article = "an" if state[0] in "aeiou" else "a"
                raise RecipeError(f"steps[{index}] ({step.kind}): cannot run on {article} {state} model ({after}); "
                                  f"{step.kind} needs a {needs} model")
            for earlier in self.steps[:index]:
                if earlier.kind in kind.not_after:
                    raise RecipeError(f"steps[{index}] ({step.kind}): cannot follow {earlier.kind} "
                                      f"({kind.not_after[earlier.kind]})")
            if step.kind in TRAINING_KINDS and previous not in (None, *TRAINING_KINDS):
                raise RecipeError(f"steps[{index}] ({step.kind}): {step.kind} comes before compression starts; after "
                                  f"steps[{index - 1}] ({previous}) use finetune")
            state = kind.state_after(step.params, state)
            previous = step.kind
        if state == "qat":
            raise RecipeError(f"steps[{len(self.steps) - 1}] ({previous}): the recipe ends with a QAT model; "
                              "add a convert step")

    def resolve(self, path: str) -> Path:
        return Path(self.base) / path

    def check_files(self) -> None:
        if self.model.file is not None and not self.resolve(self.model.file).is_file():
            raise RecipeError(f"model.file: {self.resolve(self.model.file)} does not exist")
        if self.data.dataset == "idx":
            for key in ("train_images", "train_labels", "test_images", "test_labels"):
                if not self.resolve(getattr(self.data, key)).is_file():
                    raise RecipeError(f"data.{key}: {self.resolve(getattr(self.data, key))} does not exist")
        if self.data.dataset == "fashion-mnist":
            folder = None if self.data.path is None else self.resolve(self.data.path)
            if not data.fashion_mnist_available(folder):
                where = folder or "/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)"
                raise RecipeError(f"data.dataset: Fashion-MNIST is not in {where}")
        if self.task == "lm":
            vocab = shakespeare_tokenizer().vocab_size
            given = self.model.args.get("vocab_size", vocab)
            if given != vocab:
                raise RecipeError(f"model.args.vocab_size: the Shakespeare text has {vocab} distinct characters, got "
                                  f"{given!r} (leave it out: it is taken from the text)")

    def as_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what the report records)."""
        return {"name": self.name, "model": asdict(self.model), "data": asdict(self.data), "run": asdict(self.run),
                "steps": [step.as_dict() for step in self.steps]}
