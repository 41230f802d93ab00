"""Observation containers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class ObservationOperator(Protocol):
    """Maps a state (..., variable, *grid) to observation space (..., n_obs); differentiable."""

    locations: torch.Tensor  # (n_obs, ndim) in the grid's distance unit

    def __call__(self, state: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ObservationBatch:
    """The observations valid at one analysis time.

    values, error_std: (n_obs,); ids: (n_obs,) global observation ids (keys of the noise streams);
    operator: H with its locations; time: model time of the analysis.
    """

    time: float
    values: torch.Tensor
    error_std: torch.Tensor
    ids: torch.Tensor
    operator: ObservationOperator

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    @property
    def locations(self) -> torch.Tensor:
        return self.operator.locations
