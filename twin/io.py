"""CF-1.11 netCDF writers and readers: ensemble states, observations (DSG points), restarts.

xarray appears only here, at the edges: inputs are numpy arrays, outputs are `xarray.Dataset`s.
Every file is written atomically (temp file in the same folder, then `os.replace`). Latitude-
longitude grids get CF latitude/longitude coordinates (2-D `lat`/`lon` on a curvilinear grid), and
fields are NaN (the CF _FillValue) at the grid's masked points.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import xarray as xr

from assim.geo import CurvilinearGrid, GeoGrid
from twin.domain import Grid

CONVENTIONS = "CF-1.11"
RESTART_FORMAT = 1
DEFAULT_START = _dt.datetime(2000, 1, 1)
CALENDAR = "proleptic_gregorian"

Extra = Mapping[str, tuple[tuple[str, ...], Any, Mapping[str, Any]]]


class VariableLike(Protocol):
    name: str
    units: str
    standard_name: str | None
    long_name: str


@dataclass(frozen=True)
class VariableInfo:
    """CF description of a model variable (any object with these four fields is accepted)."""

    name: str
    units: str
    standard_name: str | None
    long_name: str


class DatasetError(OSError, ValueError):
    """A file that is missing, truncated or not netCDF; the message is one line naming the path."""


class RestartError(Exception):
    """A restart file that cannot be used here; the message is one line starting with the path."""


@dataclass(frozen=True)
class Restart:
    ens: np.ndarray  # (member, variable, *grid)
    model_time: float
    cycle: int
    case_name: str
    config_yaml: str


def package_version() -> str:
    """The EarthTwin version (twin.__version__; "+unknown" when running from an uninstalled tree)."""
    from twin import __version__

    return str(__version__)


# ----------------------------------------------------------------------------------------- writing
@contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file name next to `path`; rename it over `path` on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_netcdf_atomic(ds: xr.Dataset, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Write `ds` to a temp file next to `path`, then rename it over `path`; never a partial file."""
    encoding = {}
    if compress:
        encoding = {name: {"zlib": True, "complevel": 4} for name, v in ds.data_vars.items()
                    if v.ndim > 0 and v.dtype.kind in "fiub"}
    with atomic_output(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return Path(path)


def _cf_time(model_times: np.ndarray, time_unit_seconds: float, start: _dt.datetime) -> np.ndarray:
    """datetime64[ms] of start + model_time * time_unit_seconds."""
    ms = np.round(np.asarray(model_times, dtype=np.float64) * time_unit_seconds * 1000.0)
    return np.datetime64(start, "ms") + ms.astype("timedelta64[ms]")


def _as_datetime(start: _dt.datetime | _dt.date | str | None) -> _dt.datetime:
    """A naive UTC datetime from a datetime, date, ISO string or None (2000-01-01)."""
    if start is None:
        return DEFAULT_START
    if isinstance(start, str):
        start = _dt.datetime.fromisoformat(start)
    if not isinstance(start, _dt.datetime):
        start = _dt.datetime(start.year, start.month, start.day)
    if start.tzinfo is not None:
        start = start.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return start


def _time_coords(model_times: np.ndarray, dim: str, time_unit_seconds: float, start: Any,
                 model_time_units: str | None) -> dict[str, xr.Variable]:
    start = _as_datetime(start)
    time = xr.Variable(dim, _cf_time(model_times, time_unit_seconds, start),
                       {"standard_name": "time", "long_name": "time", "axis": "T"})
    time.encoding.update(units=f"hours since {start:%Y-%m-%d %H:%M:%S}", calendar=CALENDAR,
                         dtype="float64", _FillValue=None)
    if model_time_units is None:
        model_time_units = "s" if time_unit_seconds == 1.0 else "1"
    mt = xr.Variable(dim, np.asarray(model_times, dtype=np.float64),
                     {"long_name": f"model time ({time_unit_seconds:g} s per model time unit)",
                      "units": model_time_units})
    mt.encoding["_FillValue"] = None
    return {"time": time, "model_time": mt}


_GEO = {"lat": {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"},
        "lon": {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}}


def _geographic(grid: Grid) -> bool:
    return isinstance(grid, (GeoGrid, CurvilinearGrid))


def location_dims(grid: Grid) -> tuple[str, ...]:
    """Names of the coordinates of an observation location: (lat, lon) on a curvilinear grid, whose
    dimensions are grid indices; the grid's dimensions otherwise."""
    return tuple(getattr(grid, "location_dims", grid.dims))


def _axis_attrs(grid: Grid, axis: int, what: str = "grid") -> dict[str, str]:
    dim = grid.dims[axis]
    if isinstance(grid, CurvilinearGrid):
        return {"long_name": f"{what} {dim} index", "units": "1"}
    if isinstance(grid, GeoGrid):
        return {"long_name": f"{what} {_GEO[dim]['standard_name']}", **_GEO[dim]}
    letter = {"x": "X", "lon": "X", "y": "Y", "lat": "Y", "z": "Z"}.get(dim.lower())
    if letter is None and axis >= grid.ndim - 2:
        letter = "XY"[axis - grid.ndim + 2] if grid.ndim >= 2 else "X"
    attrs = {"long_name": f"{what} {dim} coordinate", "units": grid.units}
    if letter:
        attrs["axis"] = letter
    if grid.units not in ("1", "", "index") and letter in ("X", "Y"):
        attrs["standard_name"] = f"projection_{letter.lower()}_coordinate"
    return attrs


def grid_coordinates(grid: Grid) -> dict[str, xr.Variable]:
    """CF coordinates of the grid: one per dimension, plus 2-D `lat`/`lon` on a curvilinear grid."""
    out = {}
    for a, dim in enumerate(grid.dims):
        v = xr.Variable(dim, grid.axis_values(a), _axis_attrs(grid, a))
        v.encoding["_FillValue"] = None
        out[dim] = v
    if isinstance(grid, CurvilinearGrid):
        for name in ("lat", "lon"):
            v = xr.Variable(grid.dims, getattr(grid, name), {"long_name": _GEO[name]["standard_name"],
                                                             "standard_name": _GEO[name]["standard_name"],
                                                             "units": _GEO[name]["units"]})
            v.encoding["_FillValue"] = None
            out[name] = v
    return out


def mask_fields(ds: xr.Dataset, grid: Grid) -> xr.Dataset:
    """NaN (the CF _FillValue) at the grid's masked points in every float variable on the grid."""
    if grid.mask is None:
        return ds
    n = grid.ndim
    for name, v in ds.data_vars.items():
        if v.dims[len(v.dims) - n:] == tuple(grid.dims) and v.dtype.kind == "f":
            ds[name] = v.where(xr.DataArray(grid.mask, dims=grid.dims))
    return ds


def _member_coord(n: int) -> xr.Variable:
    v = xr.Variable("member", np.arange(n, dtype=np.int32),
                    {"long_name": "ensemble member", "standard_name": "realization", "units": "1"})
    v.encoding["_FillValue"] = None
    return v


def _var_attrs(v: VariableLike, prefix: str = "") -> dict[str, str]:
    attrs = {"long_name": f"{prefix}{v.long_name}", "units": v.units}
    if v.standard_name and not prefix:
        attrs["standard_name"] = v.standard_name
    return attrs


def _global_attrs(title: str, attrs: Mapping[str, Any] | None, version: str | None) -> dict[str, Any]:
    version = version or package_version()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out: dict[str, Any] = {"Conventions": CONVENTIONS, "title": title, "institution": "EarthTwin",
                           "source": f"EarthTwin {version}",
                           "history": f"{now} created by EarthTwin {version}"}
    for key, value in (attrs or {}).items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        elif not isinstance(value, (str, int, float, np.number, np.ndarray, list, tuple)):
            value = str(value)
        out[key] = value
    return out


def _check_names(variables: Sequence[VariableLike], taken: Sequence[str]) -> None:
    names = [v.name for v in variables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variable names: {names}")
    clash = sorted(set(names) & set(taken))
    if clash:
        raise ValueError(f"variable name(s) {clash} clash with coordinate names {list(taken)}")


def _add_extra(ds: xr.Dataset, extra: Extra | None) -> xr.Dataset:
    for name, (dims, values, attrs) in (extra or {}).items():
        ds[name] = xr.Variable(tuple(dims), np.asarray(values), dict(attrs))
    return ds


def state_dataset(ens: np.ndarray, times: Sequence[float] | np.ndarray, grid: Grid,
                  variables: Sequence[VariableLike], *, time_unit_seconds: float,
                  start: _dt.datetime | str | None = None, members: str = "all",
                  attrs: Mapping[str, Any] | None = None, extra: Extra | None = None,
                  model_time_units: str | None = None, version: str | None = None) -> xr.Dataset:
    """Ensemble states ens (time, member, variable, *grid) at model `times` as a CF dataset.

    members="all": one variable per model variable, dims (time, member, *grid.dims);
    members="mean": the ensemble mean (time, *grid.dims) plus `<name>_spread` (std, ddof=1).
    """
    ens = np.asarray(ens)
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    if members not in ("all", "mean"):
        raise ValueError(f"members must be 'all' or 'mean', not {members!r}")
    want = (len(times), None, len(variables), *grid.shape)
    if ens.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, ens.shape)):
        raise ValueError(f"ens has shape {ens.shape}; expected (time={len(times)}, member, "
                         f"variable={len(variables)}, *grid={grid.shape})")
    coords: dict[str, xr.Variable] = {**_time_coords(times, "time", time_unit_seconds,
                                                     start, model_time_units),
                                      **grid_coordinates(grid)}
    _check_names(variables, [*coords, "member", *(f"{v.name}_spread" for v in variables)])
    dims = ("time", *grid.dims)
    data: dict[str, xr.Variable] = {}
    if members == "all":
        coords["member"] = _member_coord(ens.shape[1])
        for i, v in enumerate(variables):
            data[v.name] = xr.Variable(("time", "member", *grid.dims), ens[:, :, i], _var_attrs(v))
    else:
        m = ens.shape[1]
        mean = ens.mean(axis=1)
        spread = ens.std(axis=1, ddof=1) if m > 1 else np.zeros_like(mean)
        for i, v in enumerate(variables):
            data[v.name] = xr.Variable(dims, mean[:, i], _var_attrs(v, ""))
            data[v.name].attrs["long_name"] = f"ensemble mean of {v.long_name}"
            data[f"{v.name}_spread"] = xr.Variable(dims, spread[:, i], _var_attrs(v, "ensemble spread of "))
    g = _global_attrs("EarthTwin ensemble state", attrs, version)
    g["earthtwin_variables"] = " ".join(v.name for v in variables)
    ds = xr.Dataset(data, coords=coords, attrs=g)
    return mask_fields(_add_extra(ds, extra), grid)


def observations_dataset(times: np.ndarray, locations: np.ndarray, variable: np.ndarray, values: np.ndarray,
                         error_std: np.ndarray | float, ids: np.ndarray, grid: Grid,
                         variables: Sequence[VariableLike], *, time_unit_seconds: float,
                         start: _dt.datetime | str | None = None, attrs: Mapping[str, Any] | None = None,
                         extra: Extra | None = None, model_time_units: str | None = None,
                         version: str | None = None) -> xr.Dataset:
    """Observations as a CF discrete sampling geometry (featureType "point", one dimension `obs`)."""
    values = np.asarray(values)
    n = values.shape[0]
    times = np.broadcast_to(np.asarray(times, dtype=np.float64), (n,))
    locations = np.asarray(locations, dtype=np.float64).reshape(n, grid.ndim)
    variable = np.broadcast_to(np.asarray(variable, dtype=np.int32), (n,))
    if n and (variable.min() < 0 or variable.max() >= len(variables)):
        raise ValueError(f"variable index out of range 0..{len(variables) - 1}")
    coords = _time_coords(times, "obs", time_unit_seconds, start, model_time_units)
    for a, dim in enumerate(location_dims(grid)):
        axis_attrs = ({"long_name": f"observation {_GEO[dim]['standard_name']}", **_GEO[dim]} if _geographic(grid)
                      else _axis_attrs(grid, a, "observation"))
        coords[dim] = xr.Variable("obs", locations[:, a], axis_attrs)
        coords[dim].encoding["_FillValue"] = None
    units = {variables[int(i)].units for i in np.unique(variable)} if n else set()
    value_attrs = {"long_name": "observed value"}
    if len(units) == 1:
        value_attrs["units"] = units.pop()
    value = xr.Variable("obs", values, value_attrs)
    value.encoding["coordinates"] = " ".join(coords)
    flags = {"long_name": "index of the observed model variable",
             "flag_values": np.arange(len(variables), dtype=np.int32),
             "flag_meanings": " ".join(v.name.replace(" ", "_") for v in variables)}
    std = np.broadcast_to(np.asarray(error_std, dtype=values.dtype), (n,)).copy()
    std_attrs = {"long_name": "observation error standard deviation"}
    if "units" in value_attrs:
        std_attrs["units"] = value_attrs["units"]
    ids = np.asarray(ids, dtype=np.int64).reshape(n)
    data = {"value": value, "error_std": xr.Variable("obs", std, std_attrs),
            "obs_id": xr.Variable("obs", ids, {"long_name": "observation id"}),
            "variable_index": xr.Variable("obs", variable.copy(), flags)}
    g = _global_attrs("EarthTwin observations", attrs, version)
    g["featureType"] = "point"
    ds = xr.Dataset(data, coords=coords, attrs=g)
    return _add_extra(ds, extra)


# ----------------------------------------------------------------------------------------- reading
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_dataset(path: str | os.PathLike[str]) -> xr.Dataset:
    """Open, fully load and close a netCDF file; a bad file raises `DatasetError` naming the path."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return ds.load()
    except Exception as exc:  # noqa: BLE001 - netCDF4/HDF5 raise many types on corrupt files
        raise DatasetError(f"{path}: not a readable netCDF file ({_one_line(exc)})") from exc


def write_restart(path: str | os.PathLike[str], ens: np.ndarray, model_time: float, cycle: int, grid: Grid,
                  variables: Sequence[VariableLike], *, case_name: str, config_yaml: str,
                  version: str | None = None) -> Path:
    """Write the ensemble (member, variable, *grid) at `model_time` after `cycle` analyses, atomically."""
    ens = np.asarray(ens)
    if ens.ndim != 2 + grid.ndim or ens.shape[1] != len(variables) or ens.shape[2:] != tuple(grid.shape):
        raise ValueError(f"ens has shape {ens.shape}; expected (member, {len(variables)}, *{grid.shape})")
    coords = {**grid_coordinates(grid), "member": _member_coord(ens.shape[0])}
    _check_names(variables, [*coords, "model_time", "cycle"])
    data = {v.name: xr.Variable(("member", *grid.dims), ens[:, i], _var_attrs(v))
            for i, v in enumerate(variables)}
    data["model_time"] = xr.Variable((), np.float64(model_time), {"long_name": "model time of the state"})
    data["cycle"] = xr.Variable((), np.int64(cycle), {"long_name": "number of completed analysis cycles"})
    version = version or package_version()
    g = _global_attrs("EarthTwin restart", {"case_name": case_name, "config_yaml": config_yaml}, version)
    g.update(earthtwin_restart_format=RESTART_FORMAT, earthtwin_version=version,
             earthtwin_variables=" ".join(v.name for v in variables))
    return write_netcdf_atomic(mask_fields(xr.Dataset(data, coords=coords, attrs=g), grid), path, compress=False)


def _major(version: str) -> str:
    return str(version).split(".")[0].split("+")[0]


def read_restart(path: str | os.PathLike[str], grid: Grid | None = None,
                 variables: Sequence[VariableLike | str] | None = None, *,
                 version: str | None = None) -> Restart:
    """Read a restart; raise `RestartError("<path>: ...")` if it is unreadable or does not fit here."""
    try:
        ds = read_dataset(path)
    except DatasetError as exc:
        raise RestartError(str(exc)) from exc
    if "earthtwin_restart_format" not in ds.attrs or "earthtwin_variables" not in ds.attrs:
        raise RestartError(f"{path}: not an EarthTwin restart file")
    if int(ds.attrs["earthtwin_restart_format"]) != RESTART_FORMAT:
        raise RestartError(f"{path}: restart format {ds.attrs['earthtwin_restart_format']}, "
                           f"this version reads format {RESTART_FORMAT}")
    expected = version or package_version()
    found = str(ds.attrs.get("earthtwin_version", "?"))
    if "unknown" not in expected and "unknown" not in found and _major(found) != _major(expected):
        raise RestartError(f"{path}: written by EarthTwin {found}, incompatible with {expected}")
    names = str(ds.attrs["earthtwin_variables"]).split()
    if variables is not None:
        want = [v if isinstance(v, str) else v.name for v in variables]
        if want != names:
            raise RestartError(f"{path}: restart has variables {names}, the case expects {want}")
    missing = [n for n in [*names, "model_time", "cycle"] if n not in ds]
    if missing:
        raise RestartError(f"{path}: restart lacks variable(s) {missing}")
    fields = [ds[n] for n in names]
    if grid is not None:
        shape = fields[0].shape[1:] if fields else ()
        if tuple(shape) != tuple(grid.shape):
            raise RestartError(f"{path}: restart grid has shape {tuple(shape)}, "
                               f"the case expects {grid.shape}")
    try:
        ens = np.stack([f.values for f in fields], axis=1)
    except ValueError as exc:
        raise RestartError(f"{path}: inconsistent variable shapes ({_one_line(exc)})") from exc
    return Restart(ens=ens, model_time=float(ds["model_time"].values), cycle=int(ds["cycle"].values),
                   case_name=str(ds.attrs.get("case_name", "")),
                   config_yaml=str(ds.attrs.get("config_yaml", "")))
