"""The `Model` protocol every forecast model (physics or learned) implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from twin.domain import Grid


@dataclass(frozen=True)
class Variable:
    """A prognostic variable with its CF metadata."""

    name: str
    units: str
    long_name: str
    standard_name: str | None = None


class Model(Protocol):
    """Advances the local ensemble (member, variable, *local_grid) by one model step `dt`.

    The model holds its domain object and exchanges halos itself; `halo` is the width it needs.
    `time_unit_seconds` maps the model's time unit to seconds (for CF time).
    """

    dt: float
    halo: int
    grid: Grid
    variables: tuple[Variable, ...]
    time_unit_seconds: float

    def step(self, ens: torch.Tensor, t: float) -> torch.Tensor: ...
