"""Synthetic observations drawn from a truth state (twin experiments)."""
from __future__ import annotations

import torch

from assim.observations import ObservationBatch
from assim.registry import operator_registry
from twin.domain import Grid
from twin.random import Streams


class SyntheticObserver:
    """Observes a truth state (variable, *grid) with operator `operator`, a fraction of the state
    chosen afresh each cycle (all of it when fraction is 1), and Gaussian error `error_std`.

    Observation ids are flat indices of (variable, *grid), so the noise stream of an observation
    depends only on (seed, cycle, id): the same numbers under any rank count.
    """

    def __init__(self, grid: Grid, n_variables: int, operator: str, error_std: float, fraction: float,
                 streams: Streams, dtype: torch.dtype) -> None:
        self.grid = grid
        self.n_state = n_variables * grid.size
        self.operator_cls = operator_registry[operator]
        self.error_std = error_std
        self.fraction = fraction
        self.streams = streams
        self.dtype = dtype
        self._all = torch.arange(self.n_state)
        self._fixed = self.operator_cls(grid, self._all) if fraction >= 1.0 else None

    def select(self, cycle: int) -> torch.Tensor:
        """Flat state indices observed at this cycle."""
        if self.fraction >= 1.0:
            return self._all
        keep = self.streams.uniform("obs_select", (cycle,), self._all) < self.fraction
        return self._all[keep]

    def observe(self, truth: torch.Tensor, cycle: int, time: float) -> ObservationBatch:
        ids = self.select(cycle)
        op = self._fixed if self._fixed is not None else self.operator_cls(self.grid, ids)
        noise = self.streams.normal("obs_noise", (cycle,), ids, self.dtype)
        values = op(truth) + self.error_std * noise
        error_std = torch.full_like(values, self.error_std)
        return ObservationBatch(time=time, values=values, error_std=error_std, ids=ids, operator=op)
