"""Dynamic-radius blending of observations into a background field (REFERENCES, 'Dynamic-radius
blending', after WindSR, Ma et al. 2025).

Each observation k gets a radius
    r_k = clip(c d̄ (d_k/d̄)^a / (1 + s_k/τ_s) / (1 + |y_k − b(x_k)|/τ_m), r_min, r_max),
d_k the distance to its nearest other observation and d̄ their median (both floored at r_min, so
co-located stations give no zero radius), s_k the orography's std within c d̄; a single station gets
r_max. With w_k(x) = exp(−|x − x_k|²/(2 r_k²)) and W(x) = max_k w_k(x) the analysis is
    a(x) = b(x) + W(x) Σ_k w_k(x) (y_k − b(x_k)) / Σ_k w_k(x).
The normalised weights are a softmax of the log-weights and W = exp(max log w), so far from every
station (where all w_k underflow) the blend is exactly b and never 0/0. Grid × observation
matrices are built in chunks of grid points. Distances come from the grid (periodic wrap, or
great-circle km on the grids of `assim.geo`). Masked grid points (`Grid.mask`) are not blended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch

from assim.observations import ObservationBatch
from assim.operators import ArctanOperator, SubsetOperator
from assim.registry import register_stage
from assim.stages import AnalysisContext
from twin.domain import Grid

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
f64 = torch.float64
CHUNK_ELEMENTS = 1 << 22  # entries of one (batch, grid chunk, obs) block (32 MiB in float64)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (m, n) between a (m, ndim) and b (n, ndim), no wrap."""
    return (a[:, None, :] - b[None, :, :]).square().sum(-1).sqrt()


@dataclass(frozen=True)
class BlendParams:
    """Resolved blending parameters (all in the grid's distance unit except τ_s, in terrain units)."""

    r_min: float
    r_max: float
    c: float = 1.0
    a: float = 0.5
    tau_s: float = math.inf
    tau_m: float = math.inf

    def __post_init__(self) -> None:
        if not (0 < self.r_min <= self.r_max < math.inf):
            raise ValueError(f"blend: need 0 < r_min <= r_max < inf (got {self.r_min}, {self.r_max})")
        if not (self.c > 0 and self.a >= 0 and self.tau_s > 0 and self.tau_m > 0):
            raise ValueError("blend: need c > 0, a >= 0, tau_s > 0 and tau_m > 0")


class Blended(NamedTuple):
    """analysis (batch, *grid), radii (batch, p), mask W (batch, *grid)."""

    analysis: torch.Tensor
    radii: torch.Tensor
    mask: torch.Tensor


def _rows(width: int, batch: int = 1, target: int = CHUNK_ELEMENTS) -> int:
    return max(1, target // max(1, width * batch))


def nearest_neighbour(locations: torch.Tensor, distance: Distance = euclidean) -> torch.Tensor:
    """(p,) distance from each location to its nearest *other* one (inf for a lone station)."""
    p = locations.shape[0]
    out = torch.full((p,), math.inf, dtype=f64)
    step = _rows(p)
    for i in range(0, p, step):
        d = distance(locations[i:i + step], locations).to(f64)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = math.inf
        out[i:i + step] = d.amin(1)
    return out


def network_scale(locations: torch.Tensor, r_min: float,
                  distance: Distance = euclidean) -> tuple[torch.Tensor, float]:
    """d_k and their median d̄, both floored at r_min (d̄ = inf for fewer than two stations)."""
    d = nearest_neighbour(locations, distance)
    if d.numel() < 2:
        return d, math.inf
    return d.clamp_min(r_min), max(float(torch.quantile(d, 0.5)), r_min)


def terrain_roughness(terrain: torch.Tensor, points: torch.Tensor, locations: torch.Tensor, radius: float,
                      distance: Distance = euclidean) -> torch.Tensor:
    """(p,) std of `terrain` (T,) at `points` (T, ndim) within `radius` of each location (0 if none)."""
    h = terrain.reshape(-1).to(f64)
    h = h - h.mean()  # shift before the one-pass moments
    p = locations.shape[0]
    n, s1, s2 = (torch.zeros(p, dtype=f64) for _ in range(3))
    step = _rows(p)
    for i in range(0, h.shape[0], step):
        inside = (distance(points[i:i + step], locations) <= radius).to(f64)  # (t, p)
        hc = h[i:i + step, None]
        n += inside.sum(0)
        s1 += (inside * hc).sum(0)
        s2 += (inside * hc.square()).sum(0)
    count = n.clamp_min(1.0)
    var = (s2 / count - (s1 / count).square()).clamp_min(0.0)
    return torch.where(n > 0, var.sqrt(), torch.zeros_like(var))


def dynamic_radii(locations: torch.Tensor, misfit: torch.Tensor, params: BlendParams,
                  distance: Distance = euclidean,
                  terrain: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Radii r_k (..., p) for observations at `locations` (p, ndim) with misfits y − b(x_k) (..., p).

    `terrain` = (values (T,), points (T, ndim)) adds the roughness factor; leave it None for none.
    """
    misfit = misfit.to(f64)
    p = locations.shape[0]
    if p == 1:
        return torch.full_like(misfit, params.r_max)
    d, dbar = network_scale(locations, params.r_min, distance)
    r = params.c * dbar * (d / dbar) ** params.a
    if terrain is not None and p > 0:
        s = terrain_roughness(terrain[0], terrain[1], locations, params.c * dbar, distance)
        r = r / (1.0 + s / params.tau_s)
    r = r / (1.0 + misfit.abs() / params.tau_m)
    return r.clamp(params.r_min, params.r_max)


def apply_blend(background: torch.Tensor, points: torch.Tensor, locations: torch.Tensor, misfit: torch.Tensor,
                radii: torch.Tensor, distance: Distance = euclidean,
                chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend (..., G) at `points` (G, ndim) given misfits and radii (..., p): (analysis, mask W)."""
    batch = torch.broadcast_shapes(background.shape[:-1], misfit.shape[:-1], radii.shape[:-1])
    g, p = points.shape[0], locations.shape[0]
    nb = math.prod(batch)
    b = background.to(f64).broadcast_to(*batch, g).reshape(nb, g)
    m = misfit.to(f64).broadcast_to(*batch, p).reshape(nb, 1, p)
    inv = 0.5 / radii.to(f64).broadcast_to(*batch, p).reshape(nb, 1, p).square()
    out = b.clone()
    mask = torch.zeros_like(b)
    if p:
        step = _rows(p, b.shape[0], chunk_elements)
        for i in range(0, g, step):
            logw = -distance(points[i:i + step], locations).to(f64).square()[None] * inv  # (B, g, p)
            w_max = logw.amax(-1).exp()
            conv = (torch.softmax(logw, -1) * m).sum(-1)
            out[:, i:i + step] += w_max * conv
            mask[:, i:i + step] = w_max
    return out.reshape(*batch, g).to(background.dtype), mask.reshape(*batch, g)


def blend(background: torch.Tensor, grid: Grid | torch.Tensor, obs_locations: torch.Tensor,
          obs_values: torch.Tensor, background_at_obs: torch.Tensor, params: BlendParams,
          terrain: torch.Tensor | None = None, distance: Distance | None = None,
          chunk_elements: int = CHUNK_ELEMENTS) -> Blended:
    """Blend observations (p,) at `obs_locations` (p, ndim) into `background`.

    grid: a `Grid` (background (..., *grid.shape), its coordinates and distance) or a tensor of
    point coordinates (G, ndim) (background (..., G), Euclidean distance unless `distance` is given).
    background_at_obs (..., p): b interpolated at the observation locations (its batch dims broadcast
    with the background's). terrain: orography at the same points (*grid.shape or G), or None.
    """
    if isinstance(grid, torch.Tensor):
        points, spatial, dist = grid.to(f64), (grid.shape[0],), distance or euclidean
    else:
        points, spatial, dist = grid.coordinates(f64), grid.shape, distance or grid.distance
    nd = len(spatial)
    if tuple(background.shape[background.dim() - nd:]) != tuple(spatial):
        raise ValueError(f"blend: background {tuple(background.shape)} does not end with the grid "
                         f"{tuple(spatial)}")
    locs = obs_locations.to(f64)
    misfit = obs_values.to(f64) - background_at_obs.to(f64)
    ter = None if terrain is None else (terrain.reshape(-1), points)
    radii = dynamic_radii(locs, misfit, params, dist, ter)
    flat = background.reshape(*background.shape[:background.dim() - nd], -1)
    analysis, mask = apply_blend(flat, points, locs, misfit, radii, dist, chunk_elements)
    batch = analysis.shape[:-1]
    return Blended(analysis.reshape(*batch, *spatial), radii, mask.reshape(*batch, *spatial))


def default_r_min(grid: Grid) -> float:
    """One grid spacing in distance units (`resolution` of a GeoGrid, else the smallest spacing)."""
    return float(getattr(grid, "resolution", min(grid.spacing)))


def default_r_max(grid: Grid) -> float:
    """A quarter of the domain: a quarter of the longest axis extent (`Grid.lengths`)."""
    return 0.25 * max(grid.lengths)


def load_terrain(path: str, grid: Grid, variable: str | None = None) -> torch.Tensor:
    """Orography on the (global) model grid from a netCDF file: `variable`, else the variable with
    standard_name surface_altitude, else the file's only data variable."""
    import xarray as xr

    with xr.open_dataset(path) as ds:
        if variable is None:
            names = [v for v in ds.data_vars if ds[v].attrs.get("standard_name") == "surface_altitude"]
            names = names or list(ds.data_vars)
            if len(names) != 1:
                raise ValueError(f"blend: {path}: name the orography variable with terrain_variable "
                                 f"(have {names})")
            variable = names[0]
        da = ds[variable].squeeze(drop=True)
        if set(da.dims) == set(grid.dims):
            da = da.transpose(*grid.dims)
        values = torch.as_tensor(da.values, dtype=f64)
    if tuple(values.shape) != tuple(grid.shape):
        raise ValueError(f"blend: {path}:{variable} has shape {tuple(values.shape)}, the grid {grid.shape}")
    return values


class _Obs(NamedTuple):
    """Observations in state space: locations (p, nd), values, error std, variable (p,), b at obs (N, p)."""

    locations: torch.Tensor
    values: torch.Tensor
    error_std: torch.Tensor
    variable: torch.Tensor
    at_obs: torch.Tensor


def state_space(op: object, values: torch.Tensor,
                error_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observations as state values: (values, error std, kept). Identity/subset operators (and any
    operator with `observes_value = True`) pass through; arctan is inverted with tan, its errors
    mapped by the derivative (σ_x = σ_y (1 + x²)), and values with |y| >= π/2 (noise only) dropped."""
    values, error_std = values.to(f64), error_std.to(f64)
    if isinstance(op, ArctanOperator):
        keep = values.abs() < math.pi / 2
        x = torch.tan(values)
        return x, error_std * (1.0 + x.square()), keep
    if (isinstance(op, SubsetOperator) and type(op).__call__ is SubsetOperator.__call__) \
            or getattr(op, "observes_value", False):
        return values, error_std, torch.ones_like(values, dtype=torch.bool)
    raise ValueError(f"blend: cannot blend observations made by {type(op).__name__}: blending needs the "
                     "state value at each station (identity/subset operators, operators with "
                     "observes_value = True, or arctan, which it inverts with tan)")


@register_stage("blend")
class Blend:
    """Dynamic-radius blending stage (REFERENCES): pulls the ensemble towards nearby observations."""

    @dataclass(frozen=True)
    class Config:
        c: float = field(default=1.0, metadata={
            "gt": 0.0, "help": "radius of a typical station, in median station spacings"})
        a: float = field(default=0.5, metadata={
            "min": 0.0, "help": "exponent of d_k/d̄: how much further isolated stations reach"})
        tau_s: float | None = field(default=None, metadata={
            "gt": 0.0, "help": "roughness scale, in orography units; null = std of the whole orography"})
        tau_m: float | None = field(default=None, metadata={
            "gt": 0.0, "help": "misfit scale; null = 2 x median observation error std (per variable)"})
        r_min: float | None = field(default=None, metadata={
            "gt": 0.0, "help": "smallest radius; null = one grid spacing"})
        r_max: float | None = field(default=None, metadata={
            "gt": 0.0, "help": "largest radius; null = a quarter of the domain's longest axis"})
        apply_to: Literal["members", "mean"] = field(default="members", metadata={
            "help": "members: each with its own misfits; mean: blend the mean, keep the anomalies"})
        terrain: str | None = field(default=None, metadata={
            "help": "netCDF orography on the model grid; null = no terrain term"})
        terrain_variable: str | None = field(default=None, metadata={
            "help": "orography variable in that file; null = standard_name surface_altitude or the only one"})

    def __init__(self, config: "Blend.Config", terrain: torch.Tensor | None = None) -> None:
        for name in ("c", "tau_s", "tau_m", "r_min", "r_max"):
            v = getattr(config, name)
            if v is not None and not (0 < v < math.inf):
                raise ValueError(f"blend: {name} must be positive and finite, got {v!r}")
        if not 0 <= config.a < math.inf:
            raise ValueError(f"blend: a must be >= 0, got {config.a!r}")
        if config.r_min is not None and config.r_max is not None and config.r_min > config.r_max:
            raise ValueError(f"blend: r_min {config.r_min} exceeds r_max {config.r_max}")
        if config.apply_to not in ("members", "mean"):
            raise ValueError(f"blend: apply_to must be members or mean, got {config.apply_to!r}")
        self.config = config
        self._terrain = None if terrain is None else terrain.to(f64)
        self.diagnostics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # variable -> (radii, mask)

    def terrain(self, grid: Grid) -> torch.Tensor | None:
        """The global orography (*grid.shape), read once from `terrain` if given as a file."""
        if self._terrain is None and self.config.terrain is not None:
            self._terrain = load_terrain(self.config.terrain, grid, self.config.terrain_variable)
        if self._terrain is not None and tuple(self._terrain.shape) != tuple(grid.shape):
            raise ValueError(f"blend: terrain shape {tuple(self._terrain.shape)} is not the grid's "
                             f"{grid.shape}")
        return self._terrain

    def params(self, grid: Grid, error_std: torch.Tensor, terrain: torch.Tensor | None) -> BlendParams:
        """Resolve the null defaults for one variable's observations."""
        cfg = self.config
        r_min = cfg.r_min if cfg.r_min is not None else default_r_min(grid)
        r_max = cfg.r_max if cfg.r_max is not None else max(default_r_max(grid), r_min)
        tau_m = cfg.tau_m
        if tau_m is None:
            tau_m = 2.0 * float(error_std.median()) if error_std.numel() else 0.0
            tau_m = tau_m if 0 < tau_m < math.inf else math.inf
        tau_s = cfg.tau_s
        if tau_s is None:
            tau_s = float(terrain.std()) if terrain is not None and terrain.numel() > 1 else 0.0
            tau_s = tau_s if 0 < tau_s < math.inf else math.inf
        return BlendParams(r_min=r_min, r_max=r_max, c=cfg.c, a=cfg.a, tau_s=tau_s, tau_m=tau_m)

    def observations(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> _Obs:
        """All observations in state space with b at each station; under MPI gathered from every rank."""
        op = obs.operator
        values, sigma, keep = state_space(op, obs.values, obs.error_std)
        variable = getattr(op, "variable", None)
        if variable is None:
            if ens.shape[1] != 1:
                raise ValueError("blend: a multi-variable state needs an operator with `variable`")
            variable = torch.zeros(obs.size, dtype=torch.long)
        locs = obs.locations.to(f64)
        dom = ctx.domain
        if dom.size == 1:
            at = op.select(ens) if isinstance(op, SubsetOperator) else op(ens)
            return _Obs(locs[keep], values[keep], sigma[keep], variable[keep], at.to(f64)[..., keep])
        point = getattr(op, "point", None)
        if point is None:
            raise ValueError("blend: under MPI, blending needs grid-point observations "
                             "(an operator with `point`)")
        mine = {"ids": obs.ids[keep].cpu(), "loc": locs[keep].cpu(), "y": values[keep].cpu(),
                "s": sigma[keep].cpu(), "v": variable[keep].cpu(), "pt": point[keep].cpu()}
        parts = dom.allgather_object(mine)
        cat = {k: torch.cat([part[k] for part in parts]) for k in mine}  # type: ignore[index]
        order = torch.argsort(cat["ids"], stable=True)
        ids = cat["ids"][order]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]  # the same observation held by several ranks counts once
        g = {k: t[order][first] for k, t in cat.items()}
        lookup = torch.full((ctx.grid.size,), -1, dtype=torch.long)
        local = dom.local_flat_indices()
        lookup[local] = torch.arange(local.numel())
        pos = lookup[g["pt"]]
        own = pos >= 0
        flat = ens.reshape(ens.shape[0], ens.shape[1], -1).to(f64)
        at = torch.zeros(ens.shape[0], pos.numel(), dtype=f64)
        at[:, own] = flat[:, g["v"][own], pos[own]]
        return _Obs(g["loc"], g["y"], g["s"], g["v"], dom.allreduce(at))

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor:
        grid, dom = ctx.grid, ctx.domain
        data = self.observations(ens, obs, ctx)
        self.diagnostics = {}
        if data.values.numel() == 0:
            return ens
        terrain = self.terrain(grid)
        coords = grid.coordinates(f64)
        valid = ctx.valid
        idx = slice(None) if valid is None else valid.nonzero().flatten()  # masked points get no increment
        points = coords[dom.local_flat_indices()][idx]
        ter = None if terrain is None else (terrain.reshape(-1), coords)
        n_members, n_vars = ens.shape[:2]
        flat = ens.reshape(n_members, n_vars, -1).to(f64)
        sub = flat[:, :, idx]
        mean = sub.mean(0)
        out = flat.clone()
        for v in torch.unique(data.variable).tolist():
            sel = data.variable == v
            params = self.params(grid, data.error_std[sel], terrain)
            at = data.at_obs[:, sel]
            if self.config.apply_to == "mean":
                at = at.mean(0)
            misfit = data.values[sel] - at
            radii = dynamic_radii(data.locations[sel], misfit, params, grid.distance, ter)
            field_ = sub[:, v] if self.config.apply_to == "members" else mean[v]
            blended, mask = apply_blend(field_, points, data.locations[sel], misfit, radii, grid.distance)
            out[:, v, idx] = blended if self.config.apply_to == "members" else sub[:, v] + (blended - mean[v])
            self.diagnostics[int(v)] = (radii, mask)
        return out.reshape(ens.shape).to(ens.dtype)
