"""The model registry: `model.kind` in a case file names a class registered here."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

model_registry: dict[str, type] = {}


def register_model(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a model available as `model: {kind: name, ...}`.

    The class needs a nested `Config` dataclass (its YAML keys), a static method `global_grid(config)`
    returning the global Grid, and a constructor `(config, domain, dtype)`.
    """

    def decorate(cls: type[T]) -> type[T]:
        for attr in ("Config", "global_grid"):
            if not hasattr(cls, attr):
                raise TypeError(f"model {name!r}: class {cls.__name__} needs `{attr}`")
        model_registry[name] = cls
        return cls

    return decorate
