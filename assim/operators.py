"""Observation operators: identity, subset of the state, arctan of a subset. All differentiable."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from assim.registry import register_operator
from twin.domain import Grid


@register_operator("identity")
class SubsetOperator:
    """Observes the state at flat indices of (variable, *grid); `identity` when all are chosen."""

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, grid: Grid, flat_index: torch.Tensor) -> None:
        self.grid = grid
        self.flat_index = flat_index.to(torch.long)
        self.variable = torch.div(self.flat_index, grid.size, rounding_mode="floor")
        self.point = self.flat_index % grid.size
        self.locations = grid.coordinates()[self.point]

    def select(self, state: torch.Tensor) -> torch.Tensor:
        """The observed state values, (..., n_obs)."""
        return state.flatten(-1 - self.grid.ndim)[..., self.flat_index]

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        return self.select(state)


register_operator("subset")(SubsetOperator)


@register_operator("arctan")
class ArctanOperator(SubsetOperator):
    """y = arctan(x) at the observed points (the EnSF papers' nonlinear test)."""

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        return torch.atan(self.select(state))
