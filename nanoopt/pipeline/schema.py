"""Typed checking of recipe tables against dataclass schemas: unknown keys, missing keys and wrong types are
refused by name, before any work starts.

A schema is a dataclass; each field's annotation is its type (``int``, ``float`` (an int is accepted),
``bool``, ``str``, ``Literal[...]``, ``X | None``, ``dict``); a field without a default is required. A schema
may define ``check(self)`` that raises ``ValueError`` for values out of range.

>>> from dataclasses import dataclass
>>> @dataclass
... class Example:
...     epochs: int = 1          # how long
>>> build(Example, {"epochs": "two"}, "steps[0] (train)")
Traceback (most recent call last):
...
nanoopt.pipeline.schema.RecipeError: steps[0] (train).epochs: expected int, got str 'two'
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["RecipeError", "build"]


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key or the step."""


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "nothing"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict or annotation is dict:
        return isinstance(value, Mapping)
    if origin is list:
        return isinstance(value, list) and all(_matches(item, typing.get_args(annotation)[0]) for item in value)
    return isinstance(value, annotation)


def build(schema: type, table: Any, where: str) -> Any:
    """An instance of the dataclass ``schema`` from ``table``, or a :class:`RecipeError` naming ``where`` and the
    key that is unknown, missing, of the wrong type or out of range."""
    if not isinstance(table, Mapping):
        raise RecipeError(f"{where}: expected a table of keys, got {type(table).__name__} {table!r:.60}")
    hints = typing.get_type_hints(schema)
    fields = {field.name: field for field in dataclasses.fields(schema)}
    for key in table:
        if key not in fields:
            raise RecipeError(f"{where}: unknown key {key!r}; known keys: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        if name not in table:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{where}: missing required key {name!r} ({_type_name(hints[name])})")
            continue
        value = table[name]
        if not _matches(value, hints[name]):
            raise RecipeError(f"{where}.{name}: expected {_type_name(hints[name])}, got {type(value).__name__} "
                              f"{value!r:.60}")
        values[name] = float(value) if hints[name] is float else value
    instance = schema(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as error:
            raise RecipeError(f"{where}: {error}") from None
    return instance
