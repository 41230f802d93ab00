"""Observation operators: identity, subset of the state, arctan of a subset. All differentiable."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from assim.registry import register_operator
from twin.domain import Decomposition, Grid


@register_operator("identity")
class SubsetOperator:
    """Observes the state at flat indices of (variable, *grid); `identity` when all are chosen.

    `flat_index` is global; with a decomposed `domain` the operator applies to this rank's local
    state and every observed point must lie in its subdomain (`local_index` maps into it).
    """

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, grid: Grid, flat_index: torch.Tensor, domain: Decomposition | None = None) -> None:
        self.grid = grid
        self.flat_index = flat_index.to(torch.long)
        self.variable = torch.div(self.flat_index, grid.size, rounding_mode="floor")
        self.point = self.flat_index % grid.size
        self.locations = grid.coordinates()[self.point]
        self.local_index = self.flat_index
        if domain is not None and domain.size > 1:
            local = domain.local_flat_indices()
            position = torch.full((grid.size,), -1, dtype=torch.long)
            position[local] = torch.arange(local.numel())
            local_point = position[self.point]
            if bool((local_point < 0).any()):
                raise ValueError("observation outside this rank's subdomain")
            self.local_index = self.variable * local.numel() + local_point

    def select(self, state: torch.Tensor) -> torch.Tensor:
        """The observed state values, (..., n_obs)."""
        return state.flatten(-1 - self.grid.ndim)[..., self.local_index]

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        return self.select(state)


register_operator("subset")(SubsetOperator)


@register_operator("arctan")
class ArctanOperator(SubsetOperator):
    """y = arctan(x) at the observed points (the EnSF papers' nonlinear test)."""

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        return torch.atan(self.select(state))
