"""Quality control of observations: a static screen of the table, the time window, a gross-error check.

`screen` gives every rejected observation exactly one reason, checked in this order: "nonfinite"
(time, value or a coordinate NaN/inf), "bad_error" (error std NaN, inf or <= 0), "out_of_domain"
(beyond an open axis; periodic axes are wrapped into range instead), "duplicate" (same time,
location and variable as an earlier row, which is kept). counts["kept"] + the rest = len(table).
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from assim.obsfiles import ObservationTable
from assim.points import wrap_locations
from twin.domain import Grid

REASONS = ("nonfinite", "bad_error", "out_of_domain", "duplicate")
A = TypeVar("A", np.ndarray, torch.Tensor)


def screen(table: ObservationTable, grid: Grid) -> tuple[ObservationTable, dict[str, int]]:
    """(kept rows with locations wrapped into the domain, counts per reason and "kept")."""
    reason, wrapped = rejection_reasons(table, grid)
    keep = reason == ""
    kept = table.subset(keep)
    kept = kept.replace(locations=wrapped[keep])
    counts = {why: int((reason == why).sum()) for why in REASONS}
    counts["kept"] = int(keep.sum())
    return kept, counts


def rejection_reasons(table: ObservationTable, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(reason of each row, '' where kept; locations wrapped into the domain): `screen` row by row,
    so that rejections can be attributed (e.g. to stations)."""
    n = len(table)
    loc = np.asarray(table.locations, dtype=np.float64).reshape(n, grid.ndim)
    reason = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, why: str) -> None:
        reason[(reason == "") & mask] = why

    finite = np.isfinite(table.time) & np.isfinite(table.value) & np.isfinite(loc).all(-1)
    reject(~finite, "nonfinite")
    err = np.asarray(table.error_std, dtype=np.float64)
    reject(~(np.isfinite(err) & (err > 0)), "bad_error")
    wrapped, inside = wrap_locations(grid, loc)
    wrapped = wrapped.numpy()
    reject(~inside.numpy(), "out_of_domain")
    alive = np.flatnonzero(reason == "")
    if alive.size:
        rows = np.column_stack([table.time[alive], table.variable[alive], wrapped[alive]]) + 0.0
        _, first = np.unique(rows, axis=0, return_index=True)
        dup = np.ones(alive.size, dtype=bool)
        dup[first] = False
        mask = np.zeros(n, dtype=bool)
        mask[alive[dup]] = True
        reject(mask, "duplicate")
    return reason, wrapped


def select_window(table: ObservationTable, time: float, half_width: float,
                  closed: str = "both") -> np.ndarray:
    """Indices (ascending) of observations with |t - time| <= half_width, up to a tiny tolerance.

    closed="left" makes the window [time - h, time + h): consecutive windows of width 2h then
    share no observation.
    """
    tol = 1e-9 * max(1.0, abs(time), abs(half_width))
    dt = np.asarray(table.time, dtype=np.float64) - time
    inside = (dt >= -half_width - tol) & (dt <= half_width + tol)
    if closed == "left":
        inside &= dt < half_width - tol
    elif closed != "both":
        raise ValueError(f"select_window: closed must be 'both' or 'left', not {closed!r}")
    return np.flatnonzero(inside)


def gross_error(hx_mean: A, values: A, error_std: A, background_spread: A, k: float) -> A:
    """Keep mask (p,): |y - H(mean)| <= k sqrt(σ_o² + σ_b²); non-finite innovations are rejected.

    background_spread: the ensemble spread of H(x) at each observation (std over members).
    Works on numpy arrays or torch tensors (returns the same kind).
    """
    lib = torch if isinstance(values, torch.Tensor) else np
    d = lib.abs(values - hx_mean)
    bound = k * lib.sqrt(error_std * error_std + background_spread * background_spread)
    return lib.isfinite(d) & (d <= bound)
