"""Great-circle distances and a latitude–longitude grid whose distance unit is the kilometre.

A `GeoGrid` is a `twin.domain.Grid` (so decompositions, halos and every `grid.distance` user work
unchanged) whose coordinates are (latitude, longitude) in degrees and whose `distance` is the
haversine great-circle distance in km. Longitude is periodic by construction (the sphere needs no
wrap rule) and the poles are ordinary points: all grid points of a pole row are at distance 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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

    def axis_values(self, axis: int):  # type: ignore[override]
        import numpy as np

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
