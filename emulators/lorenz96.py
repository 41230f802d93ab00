"""Lorenz-96: dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F on a periodic ring, RK4.

Vectorised over members, any size (tested to 10^6), float32 or float64. Each RK4 stage needs two
points to the left and one to the right; the model exchanges a halo of 2 per stage through its
domain object, so the same code runs on a subdomain under MPI.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emulators.base import Variable
from emulators.registry import register_model
from twin.domain import Decomposition, Grid


@register_model("lorenz96")
class Lorenz96:
    """The Lorenz (1996) model; 1 model time unit is taken as 5 days (0.05 = 6 h)."""

    @dataclass(frozen=True)
    class Config:
        size: int = field(default=40, metadata={"min": 4, "help": "number of variables (ring length)"})
        forcing: float = field(default=8.0, metadata={"help": "forcing F"})
        dt: float = field(default=0.05, metadata={"gt": 0, "help": "RK4 time step (model time units)"})

    halo = 2
    time_unit_seconds = 432000.0
    variables = (Variable("X", "1", "Lorenz-96 state variable"),)

    def __init__(self, config: "Lorenz96.Config", domain: Decomposition, dtype: torch.dtype = torch.float64):
        self.config = config
        self.domain = domain
        self.grid = domain.grid
        self.dt = float(config.dt)
        self.forcing = float(config.forcing)
        self.dtype = dtype

    @staticmethod
    def global_grid(config: "Lorenz96.Config") -> Grid:
        return Grid(shape=(config.size,), periodic=(True,), dims=("x",), units="1")

    def initial_state(self, noise: torch.Tensor) -> torch.Tensor:
        """The rest state F perturbed by unit noise (the truth run spins up from it)."""
        return self.forcing + noise

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        """dx/dt on the local subdomain (halo exchanged here)."""
        xp = self.domain.exchange_halo(x, self.halo)
        return (xp[..., 3:-1] - xp[..., :-4]).mul_(xp[..., 1:-3]).sub_(x).add_(self.forcing)

    def step(self, ens: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        """One RK4 step of length dt for the ensemble (..., 1, x)."""
        dt = self.dt
        k1 = self.tendency(ens)
        k2 = self.tendency(torch.add(ens, k1, alpha=0.5 * dt))
        k3 = self.tendency(torch.add(ens, k2, alpha=0.5 * dt))
        k4 = self.tendency(torch.add(ens, k3, alpha=dt))
        k2.add_(k3).mul_(2.0).add_(k1).add_(k4)
        return torch.add(ens, k2, alpha=dt / 6.0)
