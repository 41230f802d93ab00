"""Great-circle distances and latitude–longitude grids whose distance unit is the kilometre.

A `GeoGrid` is a `twin.domain.Grid` (so decompositions, halos and every `grid.distance` user work
unchanged) whose coordinates are (latitude, longitude) in degrees and whose `distance` is the
haversine great-circle distance in km. Longitude is periodic by construction (the sphere needs no
wrap rule) and the poles are ordinary points: all grid points of a pole row are at distance 0.
A `CurvilinearGrid` holds 2-D latitude and longitude arrays (a rotated or projected model grid);
its distances are great-circle distances between those points and it is not periodic. Both weigh
points by area (cos latitude) in the metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from twin.domain import Grid

EARTH_RADIUS_KM = 6371.0
KM_PER_DEGREE = EARTH_RADIUS_KM * math.pi / 180.0


def great_circle_km(lat1: torch.Tensor | float, lon1: torch.Tensor | float,
                    lat2: torch.Tensor | float, lon2: torch.Tensor | float) -> torch.Tensor:
    """Haversine distance in km between points given in degrees; broadcasts like arithmetic."""
    lat1, lon1, lat2, lon2 = (torch.as_tensor(v, dtype=torch.float64) if not torch.is_tensor(v) else v
                              for v in (lat1, lon1, lat2, lon2))
    p1, p2 = torch.deg2rad(lat1), torch.deg2rad(lat2)
    dphi = p2 - p1
    dlam = torch.deg2rad(lon2 - lon1)
    h = torch.sin(dphi / 2).square() + torch.cos(p1) * torch.cos(p2) * torch.sin(dlam / 2).square()
    return 2.0 * EARTH_RADIUS_KM * torch.asin(h.clamp(0.0, 1.0).sqrt())


def pairwise_great_circle_km(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, n) great-circle distances between a (m, 2) and b (n, 2), columns (lat, lon) in degrees."""
    return great_circle_km(a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1])


@dataclass(frozen=True)
class GeoGrid(Grid):
    """A regular latitude–longitude grid: axes (lat, lon), coordinates in degrees, distances in km.

    `spacing` is in degrees per index and `origin` is the (lat, lon) of index (0, 0); `lengths`
    (and so every 'fraction of the domain' default) is in km, the longitude axis measured at the
    equator. Build one with `GeoGrid.regular(nlat, nlon)`.
    """

    origin: tuple[float, ...] = (-90.0, 0.0)

    def __post_init__(self) -> None:
        if not self.dims:
            object.__setattr__(self, "dims", ("lat", "lon"))
        super().__post_init__()
        if self.ndim != 2 or len(self.origin) != 2:
            raise ValueError("GeoGrid: needs exactly two axes (lat, lon) and a 2-value origin")
        last = self.origin[0] + (self.shape[0] - 1) * self.spacing[0]
        if self.origin[0] < -90.0 - 1e-9 or last > 90.0 + 1e-9:
            raise ValueError(f"GeoGrid: latitudes {self.origin[0]}..{last} leave [-90, 90]")

    @classmethod
    def regular(cls, nlat: int, nlon: int, poles: bool = True, lon0: float = 0.0) -> "GeoGrid":
        """Global grid: latitudes pole to pole (`poles`) or at cell centres; longitudes lon0 + k 360/nlon."""
        dlat = 180.0 / (nlat - 1) if poles else 180.0 / nlat
        lat0 = -90.0 if poles else -90.0 + dlat / 2
        dlon = 360.0 / nlon
        return cls((nlat, nlon), (False, abs(nlon * dlon - 360.0) < 1e-9), (dlat, dlon), ("lat", "lon"),
                   "km", (lat0, lon0))

    @property
    def lengths(self) -> tuple[float, ...]:
        """Extent of each axis in km (latitude at most pole to pole, longitude at the equator)."""
        nlat, nlon = self.shape
        return (min(nlat * self.spacing[0], 180.0) * KM_PER_DEGREE, nlon * self.spacing[1] * KM_PER_DEGREE)

    @property
    def resolution(self) -> float:
        """The meridional grid spacing in km (zonal spacing shrinks towards the poles)."""
        return self.spacing[0] * KM_PER_DEGREE

    def area_weights(self) -> np.ndarray:
        """Cell areas: sin φ₊ − sin φ₋ over each row's latitude band (cos φ Δφ away from the poles;
        a pole row gets its polar cap), the same for every longitude."""
        lat = self.axis_values(0)
        half = 0.5 * self.spacing[0]
        band = (np.sin(np.deg2rad(np.minimum(lat + half, 90.0))) - np.sin(np.deg2rad(np.maximum(lat - half, -90.0))))
        return np.broadcast_to(np.abs(band)[:, None], self.shape).copy()

    def axis_values(self, axis: int) -> np.ndarray:
        return self.origin[axis] + np.arange(self.shape[axis]) * self.spacing[axis]

    def coordinates(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(lat, lon) in degrees of every grid point, C order, shape (size, 2)."""
        lat = self.origin[0] + torch.arange(self.shape[0], dtype=dtype) * self.spacing[0]
        lon = self.origin[1] + torch.arange(self.shape[1], dtype=dtype) * self.spacing[1]
        la, lo = torch.meshgrid(lat, lon, indexing="ij")
        return torch.stack([la.reshape(-1), lo.reshape(-1)], dim=-1)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pairwise great-circle distances in km between a (m, 2) and b (n, 2) (lat, lon in degrees)."""
        return pairwise_great_circle_km(a, b)


def unit_vectors(lat: torch.Tensor | np.ndarray, lon: torch.Tensor | np.ndarray) -> np.ndarray:
    """(..., 3) points on the unit sphere of latitudes and longitudes in degrees."""
    phi, lam = np.deg2rad(np.asarray(lat, dtype=np.float64)), np.deg2rad(np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], -1)


@dataclass(frozen=True)
class CurvilinearGrid(Grid):
    """A grid given by 2-D latitude and longitude arrays (degrees), axes (y, x), distances in km.

    Not periodic; `lengths` are great-circle path lengths along the middle row and column.
    Build one with `CurvilinearGrid.from_arrays(lat, lon, mask=None)`.
    """

    lat: np.ndarray | None = field(default=None, compare=False, repr=False, kw_only=True)
    lon: np.ndarray | None = field(default=None, compare=False, repr=False, kw_only=True)
    location_dims = ("lat", "lon")  # observation locations are (lat, lon), not grid indices

    def __post_init__(self) -> None:
        if self.lat is None or self.lon is None:
            raise ValueError("CurvilinearGrid: needs 2-D lat and lon arrays")
        lat, lon = np.array(self.lat, dtype=np.float64), np.array(self.lon, dtype=np.float64)
        if lat.shape != tuple(self.shape) or lon.shape != tuple(self.shape) or lat.ndim != 2:
            raise ValueError(f"CurvilinearGrid: lat {lat.shape} and lon {lon.shape} must both have shape {self.shape}")
        if min(self.shape) < 2:
            raise ValueError(f"CurvilinearGrid: needs at least 2 points per axis (shape {self.shape})")
        if not (np.isfinite(lat).all() and np.isfinite(lon).all()) or np.abs(lat).max() > 90.0 + 1e-9:
            raise ValueError("CurvilinearGrid: latitudes and longitudes must be finite, |lat| <= 90")
        for name, a in (("lat", lat), ("lon", lon)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        super().__post_init__()
        if any(self.periodic):
            raise ValueError("CurvilinearGrid: not periodic")

    @classmethod
    def from_arrays(cls, lat: np.ndarray, lon: np.ndarray, mask: np.ndarray | None = None) -> "CurvilinearGrid":
        shape = tuple(np.shape(lat))
        return cls(shape, (False, False), (1.0, 1.0), ("y", "x"), "km", mask=mask, lat=lat, lon=lon)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (*super()._arrays(), self.lat, self.lon)

    def coordinates(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(lat, lon) in degrees of every grid point, C order, shape (size, 2)."""
        return torch.from_numpy(np.stack([self.lat.reshape(-1), self.lon.reshape(-1)], -1)).to(dtype)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pairwise great-circle distances in km between a (m, 2) and b (n, 2) (lat, lon in degrees)."""
        return pairwise_great_circle_km(a, b)

    def axis_values(self, axis: int) -> np.ndarray:
        return np.arange(self.shape[axis], dtype=np.float64)

    def _steps(self, axis: int) -> np.ndarray:
        """Great-circle km between neighbours along `axis` (shape with that axis one shorter)."""
        n = self.shape[axis]
        a = [np.take(c, np.arange(n - 1), axis) for c in (self.lat, self.lon)]
        b = [np.take(c, np.arange(1, n), axis) for c in (self.lat, self.lon)]
        return great_circle_km(torch.from_numpy(a[0]), torch.from_numpy(a[1]),
                               torch.from_numpy(b[0]), torch.from_numpy(b[1])).numpy()

    @property
    def lengths(self) -> tuple[float, ...]:
        """Path length in km of each axis along the middle row/column."""
        ny, nx = self.shape
        return (float(self._steps(0)[:, nx // 2].sum()), float(self._steps(1)[ny // 2].sum()))

    @property
    def resolution(self) -> float:
        """The median distance in km between neighbouring grid points."""
        return float(np.median(np.concatenate([self._steps(0).ravel(), self._steps(1).ravel()])))

    def area_weights(self) -> np.ndarray:
        """cos(latitude) of each point (the grid's own cell areas are not known)."""
        return np.clip(np.cos(np.deg2rad(self.lat)), 0.0, None)

    def fractional_index(self, locations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u (p, 2), inside (p,)): fractional (y, x) indices of (lat, lon) locations.

        The nearest grid point is found on the unit sphere; in each of the (up to four) cells around
        it the bilinear map is inverted by Newton's method in the gnomonic plane of the location;
        the first cell that holds the location gives u. Locations in no cell are outside.
        """
        from scipy.spatial import cKDTree

        loc = np.asarray(locations, dtype=np.float64).reshape(-1, 2)
        p = loc.shape[0]
        u = np.zeros((p, 2))
        inside = np.isfinite(loc).all(-1)
        if not inside.any():
            return torch.from_numpy(u), torch.from_numpy(inside)
        ny, nx = self.shape
        nodes = unit_vectors(self.lat, self.lon)  # (ny, nx, 3)
        o = unit_vectors(*np.where(inside[:, None], loc, 0.0).T)  # (p, 3)
        nearest = cKDTree(nodes.reshape(-1, 3)).query(o)[1]
        ci, cj = np.divmod(nearest, nx)
        lam, phi = np.deg2rad(np.where(inside, loc[:, 1], 0.0)), np.deg2rad(np.where(inside, loc[:, 0], 0.0))
        east = np.stack([-np.sin(lam), np.cos(lam), np.zeros(p)], -1)
        north = np.stack([-np.sin(phi) * np.cos(lam), -np.sin(phi) * np.sin(lam), np.cos(phi)], -1)
        found = np.zeros(p, dtype=bool)
        for di, dj in ((-1, -1), (-1, 0), (0, -1), (0, 0)):
            i0, j0 = np.clip(ci + di, 0, ny - 2), np.clip(cj + dj, 0, nx - 2)
            corners = nodes[[i0, i0 + 1, i0, i0 + 1], [j0, j0, j0 + 1, j0 + 1]]  # (4, p, 3): 00, 10, 01, 11
            depth = (corners * o).sum(-1)
            q = corners / np.where(depth > 0, depth, np.nan)[..., None]
            xy = np.stack([(q * east).sum(-1), (q * north).sum(-1)], -1)  # (4, p, 2) gnomonic plane
            s, t = _invert_bilinear(xy)
            ok = inside & ~found & np.isfinite(s) & np.isfinite(t)
            ok &= (s >= -1e-9) & (s <= 1 + 1e-9) & (t >= -1e-9) & (t <= 1 + 1e-9)
            u[ok] = np.stack([i0 + np.clip(s, 0, 1), j0 + np.clip(t, 0, 1)], -1)[ok]
            found |= ok
        return torch.from_numpy(u), torch.from_numpy(inside & found)


def _invert_bilinear(xy: np.ndarray, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with (1-s)(1-t) P00 + s(1-t) P10 + (1-s) t P01 + s t P11 = 0 for corners xy (4, p, 2)."""
    p00, p10, p01, p11 = xy
    a, b, c = p10 - p00, p01 - p00, p11 - p10 - p01 + p00
    s = np.full(p00.shape[0], 0.5)
    t = np.full(p00.shape[0], 0.5)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(iterations):
            f = p00 + s[:, None] * a + t[:, None] * b + (s * t)[:, None] * c
            ds, dt = a + t[:, None] * c, b + s[:, None] * c  # Jacobian columns
            det = ds[:, 0] * dt[:, 1] - ds[:, 1] * dt[:, 0]
            s = s - (f[:, 0] * dt[:, 1] - f[:, 1] * dt[:, 0]) / det
            t = t - (ds[:, 0] * f[:, 1] - ds[:, 1] * f[:, 0]) / det
        residual = np.abs(p00 + s[:, None] * a + t[:, None] * b + (s * t)[:, None] * c).max(-1)
        scale = np.abs(xy).max((0, 2))
    bad = ~(residual <= 1e-9 * np.maximum(scale, 1e-12))
    s[bad] = np.nan
    t[bad] = np.nan
    return s, t
