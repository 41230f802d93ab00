"""Synthetic observations drawn from a truth state (twin experiments)."""
from __future__ import annotations

import torch

from assim.observations import ObservationBatch
from assim.registry import operator_registry
from twin.domain import Decomposition, Grid
from twin.random import Streams


class SyntheticObserver:
    """Observes a truth state (variable, *grid) with operator `operator`, a fraction of the state
    chosen afresh each cycle (all of it when fraction is 1), and Gaussian error `error_std`.

    `observable` (n_variables · grid.size bool, optional) restricts the candidates (some variables, a
    region). Observation ids are global flat indices of (variable, *grid), ascending, so the noise stream of
    an observation depends only on (seed, cycle, id): the same numbers under any rank count. Under
    MPI each rank observes the points of its own subdomain (`truth` is the local state).
    """

    def __init__(self, grid: Grid, n_variables: int, operator: str, error_std: float, fraction: float,
                 streams: Streams, dtype: torch.dtype, domain: Decomposition | None = None,
                 observable: torch.Tensor | None = None) -> None:
        self.grid = grid
        self.domain = domain
        self.n_state = n_variables * grid.size
        self.operator_cls = operator_registry[operator]
        self.error_std = error_std
        self.fraction = fraction
        self.streams = streams
        self.dtype = dtype
        self._allowed = observable
        if domain is not None and domain.size > 1:
            local = torch.zeros(grid.size, dtype=torch.bool)
            local[domain.local_flat_indices()] = True
            local = local.repeat(n_variables)
            self._allowed = local if observable is None else local & observable
        self._candidates = (torch.arange(self.n_state) if self._allowed is None else
                            self._allowed.nonzero().flatten())
        self._fixed = self.operator_cls(grid, self._candidates, domain) if fraction >= 1.0 else None
        self._global = None

    def select(self, cycle: int) -> torch.Tensor:
        """Global flat state indices observed at this cycle on this rank (ascending)."""
        if self.fraction >= 1.0:
            return self._candidates
        keep = self.streams.uniform("obs_select", (cycle,), torch.arange(self.n_state)) < self.fraction
        if self._allowed is not None:
            keep &= self._allowed
        return keep.nonzero().flatten()

    def global_operator(self, ids: torch.Tensor):
        """The operator for global `ids` on the global state (rank 0 records with it); reused while
        the ids repeat, so the recorder can score a fixed network in batches."""
        if self._global is None or not torch.equal(self._global.flat_index, ids):
            self._global = self.operator_cls(self.grid, ids)
        return self._global

    def observe(self, truth: torch.Tensor, cycle: int, time: float) -> ObservationBatch:
        ids = self.select(cycle)
        op = self._fixed if self._fixed is not None else self.operator_cls(self.grid, ids, self.domain)
        noise = self.streams.normal("obs_noise", (cycle,), ids, self.dtype)
        values = op(truth) + self.error_std * noise
        error_std = torch.full_like(values, self.error_std)
        return ObservationBatch(time=time, values=values, error_std=error_std, ids=ids, operator=op)
