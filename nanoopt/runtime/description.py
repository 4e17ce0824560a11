"""A plan description: what a model computes, as plain data (ops, attributes, NumPy arrays), saved as one file.

A description is the boundary between the module tree and the runtime: :func:`nanoopt.deploy.to_plan` writes one
from a converted integer model or a float model, :func:`save` stores it and :func:`load` reads it back without
autograd, modules or techniques, and :class:`nanoopt.runtime.Plan` executes it.

Values are numbered: value 0 is the model input (after the fused input quantization of an integer plan), value
``i + 1`` the output of step ``i``; each step names the values it reads. An integer plan (``kind="int"``) carries
the input and output grids (``scale``, ``zero_point`` and the integer spec); a float plan (``kind="float"``)
carries none.

File format (``.npz``, read with ``allow_pickle=False``): the arrays of step ``i`` under ``"s{i}.{name}"`` and a
JSON header (UTF-8 bytes as a uint8 array) under ``"__plan__"`` with ``{"format": "nanoopt-plan", "version":
FORMAT_VERSION, ...}``. A file of another format or version, or a damaged one, raises :class:`PlanFormatError`
naming what was expected, before anything runs.

>>> import numpy as np, io
>>> step = Step("relu", (0,), {}, {})
>>> plan = PlanDescription("float", (4,), None, None, [step], output=1)
>>> buffer = io.BytesIO(); save(plan, buffer); _ = buffer.seek(0)
>>> load(buffer).steps[0].op
'relu'
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from nanoopt.spec import QuantSpec

FORMAT = "nanoopt-plan"
FORMAT_VERSION = 1
HEADER_KEY = "__plan__"
KINDS = ("int", "float")

__all__ = ["FORMAT", "FORMAT_VERSION", "Grid", "PlanDescription", "PlanFormatError", "Step", "load", "save"]


class PlanFormatError(ValueError):
    """A plan file or description that is not what this version of the runtime reads."""


@dataclass(frozen=True)
class Grid:
    """A per-tensor integer grid: ``real = scale * (q - zero_point)`` with codes of ``spec``.

    >>> Grid(0.5, -3, QuantSpec()).spec.dtype
    dtype('int8')
    """

    scale: float  # a float32 value (stored exactly as a Python float)
    zero_point: int
    spec: QuantSpec

    def to_json(self) -> dict[str, Any]:
        """The grid as JSON-ready values."""
        return {"scale": float(np.float32(self.scale)), "zero_point": int(self.zero_point),
                "spec": spec_to_json(self.spec)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Grid:
        """The inverse of :meth:`to_json` (``where`` names the field in error messages)."""
        if not isinstance(data, dict) or set(data) != {"scale", "zero_point", "spec"}:
            raise PlanFormatError(f"{where}: expected {{'scale', 'zero_point', 'spec'}}, got {data!r}")
        return cls(float(data["scale"]), int(data["zero_point"]), spec_from_json(data["spec"], where))


def spec_to_json(spec: QuantSpec) -> dict[str, Any]:
    """The fields of a per-tensor :class:`QuantSpec` (``per_channel`` and ``axis`` do not apply).

    >>> spec_to_json(QuantSpec(bits=16, symmetric=True))
    {'bits': 16, 'signed': True, 'symmetric': True, 'narrow_range': False}
    """
    return {"bits": int(spec.bits), "signed": bool(spec.signed), "symmetric": bool(spec.symmetric),
            "narrow_range": bool(spec.narrow_range)}


def spec_from_json(data: Any, where: str) -> QuantSpec:
    """A :class:`QuantSpec` from :func:`spec_to_json`'s fields (``where`` names the field in errors)."""
    keys = {"bits", "signed", "symmetric", "narrow_range"}
    if not isinstance(data, dict) or set(data) != keys:
        raise PlanFormatError(f"{where}: expected an integer spec with fields {sorted(keys)}, got {data!r}")
    try:
        return QuantSpec(bits=int(data["bits"]), signed=bool(data["signed"]), symmetric=bool(data["symmetric"]),
                         narrow_range=bool(data["narrow_range"]))
    except (TypeError, ValueError) as error:
        raise PlanFormatError(f"{where}: invalid integer spec {data!r}: {error}") from error


@dataclass
class Step:
    """One operation: its name, the values it reads, scalar attributes (JSON types) and constant arrays."""

    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = ""  # the module it came from, for messages


@dataclass
class PlanDescription:
    """A whole model as a list of steps (see the module docstring)."""

    kind: str  # "int": float in -> quantize -> integer steps -> dequantize -> float out; "float": float throughout
    input_shape: tuple[int, ...] | None  # one sample's shape (without the batch axis), or None if not fixed
    input_grid: Grid | None  # integer plans: the input and output grids
    output_grid: Grid | None
    steps: list[Step]
    output: int  # the value the plan returns

    def __post_init__(self) -> None:
        check_structure(self)


def check_structure(plan: PlanDescription) -> None:
    """Refuse a description whose structure is inconsistent (kinds, grids, value numbering)."""
    if plan.kind not in KINDS:
        raise PlanFormatError(f"plan kind must be one of {KINDS}, got {plan.kind!r}")
    if plan.kind == "int" and (not isinstance(plan.input_grid, Grid) or not isinstance(plan.output_grid, Grid)):
        raise PlanFormatError("an integer plan needs an input and an output Grid")
    if plan.kind == "float" and (plan.input_grid is not None or plan.output_grid is not None):
        raise PlanFormatError("a float plan has no input or output grid")
    if plan.input_shape is not None and not all(isinstance(d, int) and d >= 1 for d in plan.input_shape):
        raise PlanFormatError(f"input_shape must be positive ints, got {plan.input_shape!r}")
    for index, step in enumerate(plan.steps):
        if not isinstance(step, Step) or not isinstance(step.op, str):
            raise PlanFormatError(f"step {index} must be a Step, got {step!r}")
        if not step.inputs or not all(isinstance(v, int) and 0 <= v <= index for v in step.inputs):
            raise PlanFormatError(f"step {index} ({step.op}) must read values in [0, {index}] (earlier outputs or "
                                  f"the input), got {step.inputs!r}")
        for key, value in step.arrays.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf" or value.dtype.hasobject:
                raise PlanFormatError(f"step {index} ({step.op}): array {key!r} must be a numeric ndarray, got "
                                      f"{type(value).__name__}")
    if not isinstance(plan.output, int) or not 0 <= plan.output <= len(plan.steps):
        raise PlanFormatError(f"output must be a value in [0, {len(plan.steps)}], got {plan.output!r}")


# ------------------------------------------------------------------------------------------- files
def save(plan: PlanDescription, file: str | os.PathLike | IO[bytes]) -> None:
    """Write ``plan`` as an ``.npz`` file (see the module docstring)."""
    header = {"format": FORMAT, "version": FORMAT_VERSION, "kind": plan.kind,
              "input_shape": None if plan.input_shape is None else list(plan.input_shape),
              "input_grid": None if plan.input_grid is None else plan.input_grid.to_json(),
              "output_grid": None if plan.output_grid is None else plan.output_grid.to_json(),
              "output": plan.output,
              "steps": [{"op": s.op, "inputs": list(s.inputs), "attrs": s.attrs, "arrays": sorted(s.arrays),
                         "name": s.name} for s in plan.steps]}
    arrays = {HEADER_KEY: np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)}
    for index, step in enumerate(plan.steps):
        for key, value in step.arrays.items():
            arrays[f"s{index}.{key}"] = np.ascontiguousarray(value)
    if isinstance(file, str | os.PathLike):  # exactly this path (np.savez would append ".npz" to other names)
        with open(file, "wb") as handle:
            np.savez(handle, **arrays)
    else:
        np.savez(file, **arrays)


def load(file: str | os.PathLike | IO[bytes]) -> PlanDescription:
    """Read a plan file written by :func:`save` (``allow_pickle=False``); :class:`PlanFormatError` if it is not
    one, is of another format version, or is damaged."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            if HEADER_KEY not in archive.files:
                raise PlanFormatError(f"{_label(file)} is not a nanoopt plan file (no {HEADER_KEY!r} entry); "
                                      "write one with nanoopt.runtime.save")
            header = json.loads(bytes(archive[HEADER_KEY]).decode("utf-8"))
            stored = {key: archive[key] for key in archive.files if key != HEADER_KEY}
    except PlanFormatError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, UnicodeDecodeError) as error:
        raise PlanFormatError(f"{_label(file)} is not a readable nanoopt plan file ({type(error).__name__}: "
                              f"{error})") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PlanFormatError(f"{_label(file)}: expected format {FORMAT!r}, got {header.get('format')!r}"
                              if isinstance(header, dict) else f"{_label(file)}: damaged header")
    if header.get("version") != FORMAT_VERSION:
        raise PlanFormatError(f"{_label(file)}: plan format version {header.get('version')!r}, this runtime reads "
                              f"version {FORMAT_VERSION}; re-export the model with this nanoopt version")
    try:
        steps = []
        for index, entry in enumerate(header["steps"]):
            arrays = {}
            for key in entry["arrays"]:
                if f"s{index}.{key}" not in stored:
                    raise PlanFormatError(f"{_label(file)}: step {index} lacks its array {key!r} (damaged file)")
                arrays[key] = stored[f"s{index}.{key}"]
            steps.append(Step(str(entry["op"]), tuple(entry["inputs"]), dict(entry["attrs"]), arrays,
                              str(entry.get("name", ""))))
        shape = header["input_shape"]
        grids = [None if header[key] is None else Grid.from_json(header[key], key)
                 for key in ("input_grid", "output_grid")]
        return PlanDescription(header["kind"], None if shape is None else tuple(shape), grids[0], grids[1], steps,
                               header["output"])
    except (KeyError, TypeError, AttributeError) as error:
        raise PlanFormatError(f"{_label(file)}: damaged plan header ({type(error).__name__}: {error})") from error


def _label(file: Any) -> str:
    return repr(os.fspath(file)) if isinstance(file, str | os.PathLike) else "the plan file"
