"""The `Model` protocol every forecast model (physics or learned) implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

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


@dataclass(frozen=True)
class GridData:
    """What a model that runs on the grid of the case's `initial:` file is built with.

    Such a model class sets `data_grid = True` and takes `data=GridData(...)` as a keyword of its
    constructor; `global_grid(config)` then only describes its grid without `initial:`.
    """

    variables: tuple[Variable, ...]
    initial: torch.Tensor  # (variable, *local grid): the unperturbed initial field, 0 at masked points
    read_field: Callable[[str], torch.Tensor]  # a CF file's variables on this grid (variable, *local grid)
