"""Climatology: the state relaxes towards a climatological mean field c (damped persistence),
the forecast model for data without dynamics and a baseline:

    x(t + dt) = c + (x(t) - c) exp(-dt / timescale),   timescale 0: x(t + dt) = c (a reset).

c is read from a CF netCDF file on the grid of the case's `initial:` file (its time axis averaged),
or is the initial field itself. Masked points hold 0 in c, so they stay at their fill.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emulators.base import GridData
from emulators.registry import register_model
from twin.domain import Decomposition, Grid

NEEDS_INITIAL = "climatology runs on the grid of the case's `initial:` file; add an initial: section"


@register_model("climatology")
class Climatology:
    """x(t + dt) = c + (x(t) - c) exp(-dt / timescale) on the `initial:` grid."""

    @dataclass(frozen=True)
    class Config:
        path: str | None = field(default=None, metadata={
            "help": "CF netCDF of the climatological mean of the state's variables on the initial grid (a time "
                    "axis is averaged); null = the initial field"})
        timescale: float = field(default=0.0, metadata={
            "min": 0, "help": "e-folding time of the relaxation in seconds; 0 = reset to the climatology every step"})
        dt: float = field(default=3600.0, metadata={"gt": 0, "help": "step length in seconds"})

    halo = 0
    time_unit_seconds = 1.0
    data_grid = True

    def __init__(self, config: "Climatology.Config", domain: Decomposition, dtype: torch.dtype = torch.float64,
                 data: GridData | None = None):
        if data is None:
            raise ValueError(NEEDS_INITIAL)
        self.config = config
        self.domain = domain
        self.grid = domain.grid
        self.dt = float(config.dt)
        self.variables = data.variables
        self.mean = (data.initial if config.path is None else data.read_field(config.path)).to(dtype)
        self.keep = math.exp(-self.dt / config.timescale) if config.timescale > 0 else 0.0

    @staticmethod
    def global_grid(config: "Climatology.Config") -> Grid:
        raise ValueError(NEEDS_INITIAL)

    @staticmethod
    def validate(config: "Climatology.Config") -> None:
        if config.path is not None and not Path(config.path).is_file():
            raise ValueError(f"{config.path}: no such file")

    def step(self, ens: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        return self.mean + self.keep * (ens - self.mean)
