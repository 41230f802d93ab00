"""Observations at arbitrary locations: n-linear interpolation of one state variable per observation.

Locations are in the grid's coordinate unit (what `Grid.coordinates()` returns: grid distance units
from index 0 for index grids, (lat, lon) degrees for a `GeoGrid`, whose `origin` is honoured, and
for a `CurvilinearGrid`, which finds the cell itself). Periodic axes wrap; on open axes a location
must lie within the first and last grid point (a hair outside is clamped). On a `GeoGrid` longitudes
are taken modulo 360° (a regional grid in -180..180 takes stations given in 0..360) and the polar
caps of a global grid beyond its outermost latitude rows take those rows' values. Masked grid points
(`Grid.mask`) are never interpolated from: the weights of the valid corners are renormalised, and a
location with no valid corner is outside. The operator is a fixed weighted sum of 2**ndim state
values, so autograd works through it.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from assim.geo import GeoGrid
from assim.registry import register_operator
from twin.domain import Decomposition, Grid

f64 = torch.float64
SNAP = 1e-9  # fractional indices this close to an integer are that integer (exact at grid points)


def grid_origin(grid: Grid) -> tuple[float, ...]:
    """Coordinate of index (0, ..., 0): `grid.origin` where the grid has one (GeoGrid), else zeros."""
    return tuple(float(o) for o in getattr(grid, "origin", (0.0,) * grid.ndim))


def fractional_index(grid: Grid, locations: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, inside): fractional global indices (p, ndim) and whether each location is on the grid.

    Periodic axes wrap into [0, n); open axes must lie in [0, n - 1] (within SNAP, then clamped).
    Non-finite locations, and locations whose interpolation corners are all masked, are never inside.
    """
    loc = torch.as_tensor(locations, dtype=f64).reshape(-1, grid.ndim)
    own = getattr(grid, "fractional_index", None)
    u, inside = own(loc) if own is not None else _regular_index(grid, loc)
    if grid.mask is not None:
        lower, upper, frac = _corners(grid, u)
        valid = grid.mask_tensor().reshape(-1)[_corner_flat(lower, upper, grid.shape)]
        inside &= (_corner_weights(frac) * valid).sum(0) > SNAP
    return u, inside


def _regular_index(grid: Grid, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.empty_like(loc)
    inside = torch.isfinite(loc).all(-1)
    geo = isinstance(grid, GeoGrid)
    for a, (n, h, o, per) in enumerate(zip(grid.shape, grid.spacing, grid_origin(grid), grid.periodic)):
        x = loc[:, a]
        if geo and a == 1 and not per:  # a regional longitude axis: the location's longitude nearest the grid
            margin = max(0.0, 0.5 * (360.0 - (n - 1) * h))
            x = o + torch.remainder(x - o + margin, 360.0) - margin
        ua = (x - o) / h
        near = torch.round(ua)
        ua = torch.where((ua - near).abs() < SNAP, near, ua)
        if per:
            ua = torch.remainder(ua, n)
            ua = torch.where(ua >= n, ua - n, ua)  # remainder of a tiny negative number can give n
        else:
            lo, hi = -SNAP, n - 1 + SNAP
            if geo and a == 0 and grid.periodic[1]:  # a global grid: the polar caps take the outer rows
                lo, hi = (-90.0 - o) / h - SNAP, (90.0 - o) / h + SNAP
            inside &= (ua >= lo) & (ua <= hi)
            ua = ua.clamp(0.0, n - 1)
        u[:, a] = ua
    return u, inside


def _corners(grid: Grid, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower, upper, frac), each (p, ndim): the global corner indices of fractional indices u."""
    lower = torch.floor(u).to(torch.long)
    for a, (n, per) in enumerate(zip(grid.shape, grid.periodic)):
        if not per:
            lower[:, a] = lower[:, a].clamp(0, max(n - 2, 0))
    frac = u - lower
    upper = torch.stack([(lower[:, a] + 1) % n if per else (lower[:, a] + 1).clamp(max=n - 1)
                         for a, (n, per) in enumerate(zip(grid.shape, grid.periodic))], -1)
    return lower, upper, frac


def _corner_flat(lower: torch.Tensor, upper: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(2**ndim, p) flat indices into `shape` of the corners, corner (0, ..., 0) first."""
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    corners = []
    for corner in itertools.product((0, 1), repeat=len(shape)):
        flat = torch.zeros(lower.shape[0], dtype=torch.long)
        for a, c in enumerate(corner):
            flat = flat + (upper[:, a] if c else lower[:, a]) * strides[a]
        corners.append(flat)
    return torch.stack(corners)


def _corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """(2**ndim, p) n-linear weights of the corners, in `_corner_flat`'s order."""
    weights = []
    for corner in itertools.product((0, 1), repeat=frac.shape[1]):
        w = torch.ones(frac.shape[0], dtype=f64)
        for a, c in enumerate(corner):
            w = w * (frac[:, a] if c else 1.0 - frac[:, a])
        weights.append(w)
    return torch.stack(weights)


def _wraps(grid: Grid) -> torch.Tensor:
    """Axes whose locations are rewritten from the fractional index: periodic, and GeoGrid longitude."""
    return torch.tensor([per or (isinstance(grid, GeoGrid) and a == 1) for a, per in enumerate(grid.periodic)])


def wrap_locations(grid: Grid, locations: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(locations wrapped into the domain (p, ndim), inside (p,)): the coordinates of `fractional_index`."""
    u, inside = fractional_index(grid, locations)
    origin = torch.tensor(grid_origin(grid), dtype=f64)
    spacing = torch.tensor(grid.spacing, dtype=f64)
    loc = torch.as_tensor(locations, dtype=f64).reshape(-1, grid.ndim)
    wrapped = torch.where(_wraps(grid), origin + u * spacing, loc)
    return wrapped + 0.0, inside  # + 0.0 turns -0.0 into 0.0


def _is_domain(obj: Any) -> bool:
    return hasattr(obj, "exchange_halo") and hasattr(obj, "local_slices")


@register_operator("points")
class PointsOperator:
    """y_j = n-linear interpolation of state[..., variable[j], *grid] at locations[j].

    `PointsOperator(grid, locations (p, ndim), variable (p,) or int, domain=None)`. Also accepts the
    `SubsetOperator` call `PointsOperator(grid, flat_index, domain)` (1-D integer flat indices of
    (variable, *grid): observations at grid points). With a decomposed `domain` (size > 1) this rank
    keeps the observations whose lower-left interpolation corner lies in its subdomain: `index` (the
    kept rows of the input) selects the matching values/errors/ids; the call then interpolates on
    `domain.exchange_halo(state, 1)` (a collective: every rank must call it).
    """

    observes_value = True

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, grid: Grid, locations: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
                 variable: torch.Tensor | np.ndarray | int | Decomposition | None = None,
                 domain: Decomposition | None = None) -> None:
        if _is_domain(variable) and domain is None:  # SubsetOperator-style positional call
            variable, domain = None, variable  # type: ignore[assignment]
        self.grid = grid
        self.domain = domain
        loc = torch.as_tensor(np.asarray(locations) if not torch.is_tensor(locations) else locations)
        self.flat_index: torch.Tensor | None = None
        if variable is None and loc.dim() == 1 and not loc.is_floating_point():
            self.flat_index = loc.to(torch.long)
            var = torch.div(self.flat_index, grid.size, rounding_mode="floor")
            loc = grid.coordinates(f64)[self.flat_index % grid.size]
        else:
            loc = loc.to(f64).reshape(-1, grid.ndim)
            var = torch.as_tensor(0 if variable is None else variable, dtype=torch.long)
            var = var.expand(loc.shape[0]).clone() if var.dim() == 0 else var.reshape(-1)
        if var.shape[0] != loc.shape[0]:
            raise ValueError(f"points: {loc.shape[0]} locations but {var.shape[0]} variable indices")
        if bool((var < 0).any()):
            raise ValueError("points: negative variable index")
        u, inside = fractional_index(grid, loc)
        if not bool(inside.all()):
            bad = int((~inside).sum())
            raise ValueError(f"points: {bad} location(s) outside the grid (non-finite, beyond an open axis, "
                             "or on masked points only); screen them out first (assim.qc.screen)")
        lower, upper, frac = _corners(grid, u)
        weights = _corner_weights(frac)
        if grid.mask is not None:  # masked corners are no source: renormalise over the valid ones
            weights = weights * grid.mask_tensor().reshape(-1)[_corner_flat(lower, upper, grid.shape)]
            weights = weights / weights.sum(0)
        if domain is not None and domain.size > 1:
            start = torch.tensor([s.start or 0 for s in domain.local_slices])
            stop = torch.tensor([s.stop for s in domain.local_slices])
            own = ((lower >= start) & (lower < stop)).all(-1)
            shape = tuple(int(b - a) + 2 for a, b in zip(start, stop))  # local grid with a halo of 1
            lower, weights, var, loc = (lower[own] - start + 1), weights[:, own], var[own], loc[own]
            upper = lower + torch.tensor([1 if n > 1 else 0 for n in grid.shape])
            self.index = own.nonzero().flatten()
            if self.flat_index is not None:
                self.flat_index = self.flat_index[own]
        else:
            own = torch.ones(loc.shape[0], dtype=torch.bool)
            shape = grid.shape
            self.index = torch.arange(loc.shape[0])
        self.serial = domain is None or domain.size == 1
        self.keep = own
        self.variable = var
        self.locations = wrap_locations(grid, loc)[0]
        # (2**ndim, p) into the flattened (variable, *shape), corner (0, ..., 0) first, and the weights
        self.corner_index = var * math.prod(shape) + _corner_flat(lower, upper, shape)
        self.weights = weights

    @property
    def size(self) -> int:
        return int(self.variable.shape[0])

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        """(..., variable, *local grid) -> (..., p); differentiable in `state`."""
        field = state if self.serial else self.domain.exchange_halo(state, 1)  # type: ignore[union-attr]
        flat = field.flatten(-1 - self.grid.ndim)
        w = self.weights.to(dtype=state.dtype, device=state.device)
        return (flat[..., self.corner_index.to(state.device)] * w).sum(-2)
