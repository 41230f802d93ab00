"""Gridded CF netCDF fields on latitude–longitude grids: axes from CF attributes, one internal layout.

Axes are found from CF attributes, never from names: time (standard_name `time`, axis `T`, or units
'<unit> since <date>'), latitude and longitude (standard_name `latitude`/`longitude`, units
`degrees_north`/`degrees_east`, or axis `Y`/`X` with units in degrees and no other standard_name).
Uniform 1-D axes give a `GeoGrid` in one internal convention: latitude ascending, longitudes
starting in [-180, 180) (a global grid at its westernmost point there, a duplicated seam column
dropped), so a file in 0..360 and one in -180..180, or with descending latitudes, give the same grid
and the same arrays. Non-uniform 1-D axes and 2-D lat/lon coordinates give a `CurvilinearGrid`
(longitudes wrapped into [-180, 180); not periodic). Singleton extra dimensions are dropped.
Every problem raises `FieldError`, one line naming the variable.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from assim.geo import CurvilinearGrid, GeoGrid
from twin.domain import Grid

_LAT_UNITS = {"degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"}
_LON_UNITS = {"degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"}
_DEGREES = {"degrees", "degree"}
# units -> (base unit, scale, offset): value in base = value * scale + offset
_CONVERTIBLE = {**dict.fromkeys(("K", "kelvin"), ("K", 1.0, 0.0)),
                **dict.fromkeys(("degC", "degree_Celsius", "degrees_Celsius", "celsius", "deg_C"), ("K", 1.0, 273.15)),
                "Pa": ("Pa", 1.0, 0.0), **dict.fromkeys(("hPa", "mbar", "millibar"), ("Pa", 100.0, 0.0)),
                "kPa": ("Pa", 1000.0, 0.0)}
SNAP_DIGITS = 9  # origins and spacings are rounded to 1e-9 degrees, so equal grids compare equal
UNIFORM = 1e-3  # 1-D axes within this fraction of a spacing of an evenly spaced one are uniform


class FieldError(ValueError):
    """A gridded field that cannot be used; one line naming the file and variable."""


@dataclass(frozen=True)
class FieldLayout:
    """Where a variable's grid lies in its file and how it maps onto the internal grid (no mask)."""

    grid: Grid
    dims: tuple[str, str]  # the file's spatial dimensions, in the grid's axis order
    order: tuple[np.ndarray, np.ndarray]  # file indices along dims[0], dims[1] in the internal order
    time_dim: str | None
    dropped: tuple[str, ...]  # singleton dimensions


def _attr(var: xr.Variable | xr.DataArray, key: str) -> str:
    return str(var.attrs.get(key, "")).strip()


def _is(var: xr.Variable | xr.DataArray, kind: str) -> bool:
    """Whether a coordinate is the latitude, longitude or time axis by its CF attributes."""
    std, units, axis = _attr(var, "standard_name"), _attr(var, "units"), _attr(var, "axis").upper()
    if kind == "time":
        return std == "time" or axis == "T" or " since " in f" {units} "
    own = {"lat": _LAT_UNITS, "lon": _LON_UNITS}[kind]
    if units.lower() in own:
        return True
    if std:
        return std == {"lat": "latitude", "lon": "longitude"}[kind]
    return axis == {"lat": "Y", "lon": "X"}[kind] and units.lower() in _DEGREES


def open_fields(path: str | Path) -> xr.Dataset:
    """Open a netCDF file lazily (times left as numbers; `_FillValue`/`missing_value` become NaN)."""
    path = Path(path)
    if not path.is_file():
        raise FieldError(f"{path}: no such file")
    try:
        return xr.open_dataset(path, engine="netcdf4", decode_times=False, decode_timedelta=False)
    except Exception as exc:  # noqa: BLE001 - netCDF4/HDF5 raise many types on corrupt files
        text = " ".join(str(exc).split())[:150] or type(exc).__name__
        raise FieldError(f"{path}: not a readable netCDF file ({text})") from None


def find_layout(ds: xr.Dataset, name: str, where: str) -> FieldLayout:
    """The layout of data variable `name` (`where` names the file in messages)."""
    if name not in ds.data_vars:
        raise FieldError(f"{where}: no data variable {name!r} (have {', '.join(map(str, ds.data_vars)) or 'none'})")
    da = ds[name]
    coord = {d: ds.variables[d] for d in da.dims if d in ds.variables and ds.variables[d].dims == (d,)}
    times = [d for d, v in coord.items() if _is(v, "time")]
    lats = [d for d, v in coord.items() if _is(v, "lat")]
    lons = [d for d, v in coord.items() if _is(v, "lon")]
    if len(times) > 1:
        raise FieldError(f"{where}: {name}: more than one time axis ({', '.join(map(str, times))})")
    time_dim = times[0] if times else None
    if len(lats) == 1 and len(lons) == 1:
        dims = (str(lats[0]), str(lons[0]))
        grid, order = _rectilinear(np.asarray(ds[dims[0]].values, np.float64),
                                   np.asarray(ds[dims[1]].values, np.float64), f"{where}: {name}")
    else:
        spatial = tuple(str(d) for d in da.dims if d != time_dim and da.sizes[d] > 1)
        if len(spatial) != 2:
            raise FieldError(f"{where}: {name}: cannot find latitude and longitude: no 1-D coordinates with "
                             f"CF attributes and not two spatial dimensions (has {tuple(map(str, da.dims))})")
        dims = spatial  # type: ignore[assignment]
        two_d = [v for v in ds.variables.values() if v.ndim == 2 and set(v.dims) == set(spatial)]
        lat2 = [v for v in two_d if _is(v, "lat")]
        lon2 = [v for v in two_d if _is(v, "lon")]
        if len(lat2) != 1 or len(lon2) != 1:
            raise FieldError(f"{where}: {name}: need one 2-D latitude and one 2-D longitude on {spatial} "
                             f"(found {len(lat2)} and {len(lon2)}; CF standard_name or units)")
        lat = np.asarray(lat2[0].transpose(*spatial).values, np.float64)
        lon = np.asarray(lon2[0].transpose(*spatial).values, np.float64)
        grid = _curvilinear(lat, lon, f"{where}: {name}")
        order = (np.arange(lat.shape[0]), np.arange(lat.shape[1]))
    used = {time_dim, *dims}
    extra = [str(d) for d in da.dims if d not in used]
    big = [d for d in extra if da.sizes[d] > 1]
    if big:
        raise FieldError(f"{where}: {name}: dimension {big[0]!r} has {da.sizes[big[0]]} entries; only 2-D "
                         "fields (with an optional time axis) can be read: pick one level")
    return FieldLayout(grid, dims, order, None if time_dim is None else str(time_dim), tuple(extra))


def _wrap(lon: np.ndarray) -> np.ndarray:
    return np.mod(lon + 180.0, 360.0) - 180.0


def _snap(x: float) -> float:
    return round(float(x), SNAP_DIGITS) + 0.0


def _uniform(x: np.ndarray) -> bool:
    step = (x[-1] - x[0]) / (len(x) - 1)
    return bool(np.abs(x - (x[0] + step * np.arange(len(x)))).max() <= UNIFORM * abs(step))


def _rectilinear(lat: np.ndarray, lon: np.ndarray, what: str) -> tuple[Grid, tuple[np.ndarray, np.ndarray]]:
    """The internal grid of 1-D axes and the file indices in its order."""
    if len(lat) < 2 or len(lon) < 2 or not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise FieldError(f"{what}: latitude and longitude need at least 2 finite values each")
    iy = np.arange(len(lat))[::-1] if lat[0] > lat[-1] else np.arange(len(lat))
    lat = lat[iy]
    if not (np.diff(lat) > 0).all() or np.abs(lat).max() > 90.0 + 1e-6:
        raise FieldError(f"{what}: latitudes must be monotonic and within [-90, 90]")
    steps = np.mod(np.diff(lon) + 180.0, 360.0) - 180.0  # the shorter way round
    ix = np.arange(len(lon))
    if (steps < 0).all():
        ix, steps = ix[::-1], -steps[::-1]
    if not (steps > 0).all():
        raise FieldError(f"{what}: longitudes must be monotonic (modulo 360)")
    unwrapped = lon[ix[0]] + np.concatenate([[0.0], np.cumsum(steps)])
    if not (_uniform(lat) and _uniform(unwrapped)):
        la, lo = np.meshgrid(lat, _wrap(lon[ix]), indexing="ij")
        return _curvilinear(la, lo, what), (iy, ix)
    dlon = (unwrapped[-1] - unwrapped[0]) / (len(lon) - 1)
    if abs(unwrapped[-1] - unwrapped[0] - 360.0) <= UNIFORM * dlon:  # the seam column repeats the first
        ix, unwrapped = ix[:-1], unwrapped[:-1]
    periodic = abs(len(ix) * dlon - 360.0) <= UNIFORM * dlon
    if periodic:
        dlon = 360.0 / len(ix)
        start = int(np.argmin(_wrap(unwrapped)))
        ix = np.roll(ix, -start)
        lon0 = _wrap(unwrapped[start])
    else:
        lon0 = _wrap(unwrapped[0])
    dlat = (lat[-1] - lat[0]) / (len(lat) - 1)
    grid = GeoGrid((len(lat), len(ix)), (False, periodic), (_snap(dlat), _snap(dlon)), ("lat", "lon"), "km",
                   (_snap(lat[0]), _snap(lon0)))
    return grid, (iy, ix)


def _curvilinear(lat: np.ndarray, lon: np.ndarray, what: str) -> CurvilinearGrid:
    try:
        return CurvilinearGrid.from_arrays(lat, _wrap(lon))
    except ValueError as e:
        raise FieldError(f"{what}: {e}") from None


def same_grid(a: Grid, b: Grid) -> bool:
    """Whether two grids are the same points (masks aside)."""
    return (type(a) is type(b) and a.shape == b.shape and a.periodic == b.periodic
            and bool(np.allclose(a.coordinates().numpy(), b.coordinates().numpy(), rtol=0.0, atol=1e-6)))


def read_values(ds: xr.Dataset, name: str, layout: FieldLayout, time: int | slice | None) -> np.ndarray:
    """Values (float64, NaN where missing) of `name` at time index `time` (int: (*grid); slice:
    (time, *grid); None: the only field of a variable without time axis) in the internal order."""
    da = ds[name].squeeze(list(layout.dropped), drop=True) if layout.dropped else ds[name]
    lead: tuple[str, ...] = ()
    if layout.time_dim is not None:
        da = da.isel({layout.time_dim: 0 if time is None else time})
        lead = (layout.time_dim,) if isinstance(time, slice) else ()
    values = np.asarray(da.transpose(*lead, *layout.dims).values, dtype=np.float64)
    return values[..., layout.order[0][:, None], layout.order[1][None, :]]


def time_index(ds: xr.Dataset, layout: FieldLayout, name: str, when: str, where: str) -> int:
    """Index of the time `when` (ISO 8601, naive = UTC) on the variable's time axis (to 1 s)."""
    import cftime

    if layout.time_dim is None:
        raise FieldError(f"{where}: {name} has no time axis")
    tv = ds.variables[layout.time_dim]
    units, calendar = _attr(tv, "units"), _attr(tv, "calendar") or "standard"
    m = re.fullmatch(r"\s*([A-Za-z]+)\s+since\s+.+", units)
    seconds = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "minute": 60, "minutes": 60, "min": 60,
               "h": 3600, "hour": 3600, "hours": 3600, "hr": 3600, "d": 86400, "day": 86400, "days": 86400}
    if not m or m.group(1).lower() not in seconds:
        raise FieldError(f"{where}: {layout.time_dim}: cannot decode time units {units!r}")
    try:
        t = _dt.datetime.fromisoformat(when)
    except ValueError:
        raise FieldError(f"{where}: time {when!r} is not an ISO 8601 date") from None
    t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None) if t.tzinfo else t
    try:
        target = float(cftime.date2num(cftime.datetime(*t.timetuple()[:6], calendar=calendar), units, calendar=calendar))
    except Exception as exc:  # noqa: BLE001 - cftime raises ValueError/TypeError on bad units/calendars
        raise FieldError(f"{where}: {layout.time_dim}: cannot decode time ({exc})") from None
    raw = np.asarray(tv.values, dtype=np.float64)
    hits = np.flatnonzero(np.abs(raw - target) * seconds[m.group(1).lower()] < 1.0)
    if not hits.size:
        first, last = (cftime.num2date(raw[i], units, calendar=calendar) for i in (0, -1))
        raise FieldError(f"{where}: {name} has no field at {when} (its {raw.size} times run from {first} to {last})")
    return int(hits[0])


def check_units(found: str, want: str, what: str) -> None:
    """FieldError unless values in `found` can be expressed in `want` (equal, K <-> degC, Pa <-> hPa/kPa)."""
    a, b = _CONVERTIBLE.get(found), _CONVERTIBLE.get(want)
    if found != want and (a is None or b is None or a[0] != b[0]):
        raise FieldError(f"{what}: cannot convert units {found!r} to {want!r} (convertible: K <-> degC, "
                         "Pa <-> hPa/kPa)")


def convert_units(values: np.ndarray, found: str, want: str, what: str) -> np.ndarray:
    """`values` in units `found` expressed in `want`."""
    check_units(found, want, what)
    if found == want:
        return values
    (_, s1, o1), (_, s2, o2) = _CONVERTIBLE[found], _CONVERTIBLE[want]
    return (values * s1 + o1 - o2) / s2
