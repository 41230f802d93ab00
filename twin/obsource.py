"""Observations read from a file: screened once, matched to cycles by time window, and checked
against the background (gross errors) at each analysis. Counts every rejection by reason.

Withheld stations (`observations.withhold`) are read and screened like the rest but never
assimilated: `window_rows` holds every observation of the current window, `rows` the assimilated
ones, so that `twin.stations` can verify the analysis at the withheld stations.
"""
from __future__ import annotations

import numpy as np
import torch

from assim.obsfiles import read_observations
from assim.observations import ObservationBatch
from assim.qc import gross_error, rejection_reasons, select_window
from twin.config import ConfigError
from twin.domain import Decomposition, Grid
from twin.random import generator

REASONS = ("nonfinite", "bad_error", "out_of_domain", "duplicate", "gross_error")
WITHHOLD_KEY = 1  # key of the "obs_select" stream that draws the withheld fraction of stations


def _location_grid(grid: Grid) -> Grid:
    """The grid as the file reader sees it: a curvilinear grid's locations are (lat, lon) in degrees,
    not its (y, x) indices, so the reader looks for latitude and longitude."""
    dims = tuple(getattr(grid, "location_dims", grid.dims))
    if dims == tuple(grid.dims):
        return grid
    return Grid(grid.shape, grid.periodic, dims=dims, units="degrees")


def choose_withheld(stations: np.ndarray, withhold: tuple[str | int, ...] | float | None, seed: int,
                    where: str) -> set[str]:
    """The station ids to withhold: the listed ones (each must be in the file; numbers are ids as
    written), or that fraction of the file's named stations (rounded), drawn from the seed's
    "obs_select" stream."""
    named = sorted({str(s) for s in stations if s})
    if withhold is None:
        return set()
    if not named:
        raise ConfigError(where, "observations.withhold", "the observation file names no stations "
                          "(CSV column `station`, netCDF variable with cf_role timeseries_id)")
    if isinstance(withhold, float):
        k = int(round(withhold * len(named)))
        order = generator(seed, "obs_select", WITHHOLD_KEY).permutation(len(named))
        return {named[i] for i in order[:k]}
    listed = {str(s) for s in withhold}
    missing = sorted(listed - set(named))
    if missing:
        raise ConfigError(where, "observations.withhold", f"no station {', '.join(missing)} in the observation "
                          f"file (it has {len(named)}: {', '.join(named[:5])}{', ...' if len(named) > 5 else ''})")
    return listed


class FileObservations:
    """Observations of a CF DSG netCDF or CSV file for the cycles of a run."""

    def __init__(self, path: str, grid: Grid, domain: Decomposition, variables, *, start: str,
                 time_unit_seconds: float, default_error_std: float, half_width: float,
                 gross_error_k: float | None, dtype: torch.dtype,
                 withhold: tuple[str | int, ...] | float | None = None, seed: int = 0, where: str = "") -> None:
        table = read_observations(path, _location_grid(grid), variables, start=start,
                                  time_unit_seconds=time_unit_seconds, default_error_std=default_error_std)
        reason, wrapped = rejection_reasons(table, grid)
        keep = reason == ""
        self.table = table.subset(keep).replace(locations=wrapped[keep])
        self.rejected = {r: int((reason == r).sum()) for r in REASONS}
        self.rejected_stations = table.station[~keep]  # station of each statically rejected observation
        self.withheld_stations = choose_withheld(table.station, withhold, seed, where)
        self.withheld = np.isin(self.table.station, list(self.withheld_stations))
        self.grid, self.domain, self.dtype = grid, domain, dtype
        self.half_width = half_width
        self.gross_error_k = gross_error_k
        self.window_rows: np.ndarray = np.zeros(0, dtype=np.int64)  # table rows of the current window
        self.rows: np.ndarray = np.zeros(0, dtype=np.int64)  # the assimilated ones among them

    def at(self, time: float) -> ObservationBatch:
        """This rank's share of the observations in [time - h, time + h), withheld stations left out."""
        self.window_rows = select_window(self.table, time, self.half_width, closed="left")
        self.rows = self.window_rows[~self.withheld[self.window_rows]]
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
