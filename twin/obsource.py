"""Observations read from a file: screened once, matched to cycles by time window, and checked
against the background (gross errors) at each analysis. Counts every rejection by reason."""
from __future__ import annotations

import numpy as np
import torch

from assim.obsfiles import read_observations
from assim.observations import ObservationBatch
from assim.qc import gross_error, screen, select_window
from twin.domain import Decomposition, Grid

REASONS = ("nonfinite", "bad_error", "out_of_domain", "duplicate", "gross_error")


def _location_grid(grid: Grid) -> Grid:
    """The grid as the file reader sees it: a curvilinear grid's locations are (lat, lon) in degrees,
    not its (y, x) indices, so the reader looks for latitude and longitude."""
    dims = tuple(getattr(grid, "location_dims", grid.dims))
    if dims == tuple(grid.dims):
        return grid
    return Grid(grid.shape, grid.periodic, dims=dims, units="degrees")


class FileObservations:
    """Observations of a CF DSG netCDF or CSV file for the cycles of a run."""

    def __init__(self, path: str, grid: Grid, domain: Decomposition, variables, *, start: str,
                 time_unit_seconds: float, default_error_std: float, half_width: float,
                 gross_error_k: float | None, dtype: torch.dtype) -> None:
        table = read_observations(path, _location_grid(grid), variables, start=start,
                                  time_unit_seconds=time_unit_seconds, default_error_std=default_error_std)
        self.table, counts = screen(table, grid)
        self.rejected = {r: int(counts.get(r, 0)) for r in REASONS}
        self.grid, self.domain, self.dtype = grid, domain, dtype
        self.half_width = half_width
        self.gross_error_k = gross_error_k
        self.rows: np.ndarray = np.zeros(0, dtype=np.int64)  # table rows of the current batch

    def at(self, time: float) -> ObservationBatch:
        """This rank's share of the observations in [time - h, time + h)."""
        self.rows = select_window(self.table, time, self.half_width, closed="left")
        return self.table.batch(self.rows, time, self.grid, self.domain, self.dtype)

    def screen_background(self, obs: ObservationBatch, prior: torch.Tensor) -> ObservationBatch:
        """Drop gross errors against the prior ensemble (decided per observation, gathered)."""
        if self.gross_error_k is None or obs.size == 0 and self.domain.size == 1:
            return obs
        hx = obs.operator(prior)
        keep = gross_error(hx.mean(0), obs.values, obs.error_std, hx.std(0), self.gross_error_k)
        mine = self.rows[obs.operator.index.numpy()]
        bad = mine[~keep.numpy()]
        if self.domain.size > 1:
            bad = np.concatenate([np.asarray(b, dtype=np.int64) for b in self.domain.allgather_object(bad)])
        if bad.size == 0:
            return obs
        self.rejected["gross_error"] += int(bad.size)
        self.rows = np.setdiff1d(self.rows, bad)
        return self.table.batch(self.rows, obs.time, self.grid, self.domain, self.dtype)

    def global_batch(self, time: float) -> ObservationBatch:
        """The current batch on the whole grid (rank 0 records with it under MPI)."""
        return self.table.batch(self.rows, time, self.grid, None, self.dtype)
