"""Registries of observation operators and assimilation stages, extensible from user code.

A registered class carries a `Config` dataclass (its YAML keys and defaults); the case loader parses
a stage's keys strictly into that dataclass and builds the stage with it.
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

operator_registry: dict[str, type] = {}
stage_registry: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorate(cls: type[T]) -> type[T]:
        if not hasattr(cls, "Config"):
            raise TypeError(f"{kind} {name!r}: class {cls.__name__} needs a nested Config dataclass")
        table[name] = cls
        return cls

    return decorate


def register_operator(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make an observation operator available as `observations.operator: name`."""
    return _register(operator_registry, "operator", name)


def register_stage(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make an assimilation stage available as `assimilation.stages: [{method: name}]`."""
    return _register(stage_registry, "stage", name)
