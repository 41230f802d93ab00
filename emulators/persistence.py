"""Persistence: the forecast is the analysis. For analysis without a forecast model (blending and
filtering observations into a background, as in observation-driven downscaling), and as the
baseline every emulator must beat. Runs on an index grid of the given shape, or on the grid and
variables of the case's `initial:` file."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emulators.base import GridData, Variable
from emulators.registry import register_model
from twin.domain import Decomposition, Grid


@register_model("persistence")
class Persistence:
    """x(t + dt) = x(t) on a rectilinear index grid of the given shape, or on the `initial:` grid."""

    @dataclass(frozen=True)
    class Config:
        shape: tuple[int, ...] = field(default=(64, 64), metadata={
            "help": "grid shape, e.g. [ny, nx] (with `initial:` the file's grid is used)"})
        periodic: tuple[bool, ...] = field(default=(True, True), metadata={"help": "periodic flag per axis"})
        variables: tuple[str, ...] = field(default=("field",), metadata={
            "help": "variable names (with `initial:` the file's variables)"})
        units: str = field(default="1", metadata={"help": "units of every variable"})
        dt: float = field(default=3600.0, metadata={"gt": 0, "help": "step length in seconds"})

    halo = 0
    time_unit_seconds = 1.0
    data_grid = True

    def __init__(self, config: "Persistence.Config", domain: Decomposition, dtype: torch.dtype = torch.float64,
                 data: GridData | None = None):
        self.config = config
        self.domain = domain
        self.grid = domain.grid
        self.dt = float(config.dt)
        self.variables = (data.variables if data is not None else
                          tuple(Variable(v, config.units, v) for v in config.variables))

    @staticmethod
    def global_grid(config: "Persistence.Config") -> Grid:
        return Grid(shape=tuple(config.shape), periodic=tuple(config.periodic))

    @staticmethod
    def validate(config: "Persistence.Config") -> None:
        if len(config.shape) != len(config.periodic) or not config.shape:
            raise ValueError("shape and periodic need one entry per axis")
        if any(n < 1 for n in config.shape):
            raise ValueError(f"shape entries must be positive (got {list(config.shape)})")
        if not config.variables or len(set(config.variables)) != len(config.variables):
            raise ValueError("variables must be distinct names")

    def step(self, ens: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        return ens
