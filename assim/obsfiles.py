"""Observation files: CF discrete sampling geometry netCDF (point, timeSeries) and CSV tables.

`read_observations` returns an `ObservationTable` of numpy arrays in model time and grid coordinates.
Station ids come from a CSV column `station` or a netCDF variable with `cf_role: timeseries_id`;
station altitudes (m) from a CSV column `altitude` (or `elevation`, `height`, ...) in metres, or a
netCDF variable with `standard_name: altitude` (or named so) in m or km.
Every problem with a file raises `ObservationFileError` whose message is one line starting with the
path and naming the variable or column at fault. Only `twin/domain.py` is imported from `twin/`.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from assim.observations import ObservationBatch
from assim.points import PointsOperator
from twin.domain import Decomposition, Grid

DEFAULT_START = _dt.datetime(2000, 1, 1)
_SECONDS = {**dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
            **dict.fromkeys(("min", "mins", "minute", "minutes"), 60.0),
            **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
            **dict.fromkeys(("d", "day", "days"), 86400.0)}
_LENGTH = {**dict.fromkeys(("m", "meter", "meters", "metre", "metres"), 1.0), "km": 1000.0}
_DEGREES = {"lat": {"degrees_north", "degree_north", "degree_n", "degrees_n", "degrees", "degree"},
            "lon": {"degrees_east", "degree_east", "degree_e", "degrees_e", "degrees", "degree"}}
_ALIASES = {"lat": ("lat", "latitude"), "lon": ("lon", "longitude", "long")}
_ALTITUDE_NAMES = ("altitude", "station_altitude", "alt", "elevation", "station_elevation", "height")
_ALTITUDE_STD = ("altitude", "surface_altitude", "height_above_mean_sea_level")


class ObservationFileError(ValueError):
    """An observation file that cannot be used; the message is one line: '<path>: <what is wrong>'."""


def _fail(path: Any, msg: str) -> ObservationFileError:
    text = " ".join(f"{path}: {msg}".split())
    return ObservationFileError(text if len(text) <= 300 else text[:297] + "...")


@dataclass(frozen=True)
class ObservationTable:
    """Observations as parallel numpy arrays (n rows); `station` is '' where the file names none,
    `height` (station altitude, m) NaN where it gives none (None builds that NaN column)."""

    time: np.ndarray  # (n,) float64 model time
    locations: np.ndarray  # (n, ndim) float64 grid coordinates
    variable: np.ndarray  # (n,) int64 index of the model variable
    value: np.ndarray  # (n,) float64
    error_std: np.ndarray  # (n,) float64
    ids: np.ndarray  # (n,) int64 observation ids
    station: np.ndarray  # (n,) str (object array)
    height: np.ndarray | None = None  # (n,) float64 station altitude in m, NaN where unknown

    def __post_init__(self) -> None:
        if self.height is None:
            object.__setattr__(self, "height", np.full(self.value.shape[0], np.nan))

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def subset(self, index: np.ndarray) -> "ObservationTable":
        """The rows `index` (integer indices or a boolean mask)."""
        return ObservationTable(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def replace(self, **arrays: np.ndarray) -> "ObservationTable":
        return ObservationTable(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **arrays})

    def batch(self, index: np.ndarray, time: float, grid: Grid, domain: Decomposition | None = None,
              dtype: torch.dtype = torch.float64) -> ObservationBatch:
        """The rows `index` as an `ObservationBatch` at cycle `time` with a `PointsOperator`.

        With a decomposed domain the batch holds this rank's share (`operator.index`). Ids are the
        table's ids when unique among the rows, else the row numbers (unique, rank-independent).
        """
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        op = PointsOperator(grid, self.locations[idx], self.variable[idx], domain)
        ids = self.ids[idx] if np.unique(self.ids[idx]).size == idx.size else idx
        mine = op.index.numpy()
        return ObservationBatch(time=float(time), values=torch.as_tensor(self.value[idx][mine], dtype=dtype),
                                error_std=torch.as_tensor(self.error_std[idx][mine], dtype=dtype),
                                ids=torch.as_tensor(ids[mine], dtype=torch.long), operator=op)


def read_observations(path: str | Path, grid: Grid, variables: Sequence[Any], *,
                      start: _dt.datetime | str | None = None, time_unit_seconds: float,
                      default_error_std: float | None = None,
                      variable_units: Mapping[str, str] | None = None) -> ObservationTable:
    """Read a CF DSG netCDF (featureType point or timeSeries) or a CSV file of observations.

    variables: the model's variable names in state order (or objects with `.name`, `.units`,
    `.standard_name`); variable_units: name -> units, checked against the file's `units` attributes.
    Times become model time (datetime - start) / time_unit_seconds (start: naive UTC, default
    2000-01-01); plain numbers in a CSV time column are model times already.
    """
    path = Path(path)
    names = [v if isinstance(v, str) else v.name for v in variables]
    units = {v.name: v.units for v in variables if getattr(v, "units", None)}
    units.update(variable_units or {})
    std = {v.standard_name: i for i, v in enumerate(variables) if getattr(v, "standard_name", None)}
    if not path.is_file():
        raise _fail(path, "no such file")
    with path.open("rb") as f:
        head = f.read(8)
    if not head.strip():
        raise _fail(path, "empty file")
    args = (path, grid, names, _as_datetime(start), time_unit_seconds, default_error_std)
    is_nc = head[:3] == b"CDF" or head[:4] == b"\x89HDF"
    table = _read_netcdf(*args, units, std) if is_nc else _read_csv(*args)
    if len(table) == 0:
        raise _fail(path, "no observations")
    return table


def _as_datetime(start: _dt.datetime | _dt.date | str | None) -> _dt.datetime:
    """A naive UTC datetime (default 2000-01-01)."""
    if start is None:
        return DEFAULT_START
    start = _dt.datetime.fromisoformat(start) if isinstance(start, str) else start
    if not isinstance(start, _dt.datetime):
        start = _dt.datetime(start.year, start.month, start.day)
    return start.astimezone(_dt.timezone.utc).replace(tzinfo=None) if start.tzinfo else start


def _same_units(found: str, want: str) -> bool:
    found, want = found.strip(), want.strip()
    return found == want or (found in ("", "1") and want in ("", "1"))


def _geo(dim: str) -> str | None:
    return {"lat": "lat", "latitude": "lat", "lon": "lon", "longitude": "lon"}.get(dim.lower())


def _coord_scale(path: Path, name: str, found: Any, grid: Grid, dim: str) -> float:
    """Factor from the file's coordinate units to the grid's; refuses units that contradict them."""
    if found is None or _same_units(str(found), grid.units):
        return 1.0
    found, geo = str(found).strip(), _geo(dim)
    if geo and found.lower() in _DEGREES[geo]:
        return 1.0
    if not geo and found in _LENGTH and grid.units.strip() in _LENGTH:  # lat/lon are degrees, always
        return _LENGTH[found] / _LENGTH[grid.units.strip()]
    raise _fail(path, f"{name}: units {found!r} do not match the grid's {grid.units!r} for axis {dim}")


def _metres(path: Path, name: str, found: Any) -> float:
    """Factor from a station altitude's units to metres (no units: metres)."""
    units = "m" if found is None else str(found).strip()
    if units in _LENGTH:
        return _LENGTH[units]
    raise _fail(path, f"{name}: station altitude units {found!r} are not a length (m or km)")


# ------------------------------------------------------------------------------------------ netCDF
def _attr(var: Any, key: str) -> str:
    return str(var.attrs.get(key, "")).strip()


def _axis_letter(grid: Grid, a: int) -> str | None:
    letter = {"x": "X", "lon": "X", "longitude": "X", "y": "Y", "lat": "Y", "latitude": "Y", "z": "Z"}.get(
        grid.dims[a].lower())
    if letter is None and a >= grid.ndim - 2:
        letter = "XY"[a - grid.ndim + 2] if grid.ndim >= 2 else "X"
    return letter


def _find(ds: Any, tests: Sequence[Callable[[str, Any], bool]], skip: Sequence[str] = ()) -> str | None:
    """The first variable (coordinates included, `skip` not) passing the earliest test that any passes."""
    for test in tests:
        hits = [str(n) for n, v in ds.variables.items() if str(n) not in skip and test(str(n), v)]
        if hits:
            return hits[0]
    return None


def _coord_name(path: Path, ds: Any, grid: Grid, a: int, skip: Sequence[str]) -> str:
    dim, letter, geo = grid.dims[a], _axis_letter(grid, a), _geo(grid.dims[a])
    std = {"lat": ("latitude", "grid_latitude"), "lon": ("longitude", "grid_longitude")}.get(geo or "", ())
    std += (f"projection_{letter.lower()}_coordinate",) if letter in ("X", "Y") else ()
    aliases = _ALIASES.get(geo or "", (dim.lower(),))
    name = _find(ds, [lambda n, v: n == dim, lambda n, v: _attr(v, "axis").upper() == letter,
                      lambda n, v: _attr(v, "standard_name") in std, lambda n, v: n.lower() in aliases], skip)
    if name is None:
        raise _fail(path, f"no coordinate variable for axis {dim!r} (name {dim!r}, axis {letter!r} or a "
                          "matching standard_name)")
    return name


def _cf_time(path: Path, name: str, raw: np.ndarray, units: str, calendar: str, start: _dt.datetime,
             tus: float) -> np.ndarray:
    """Model times of CF times `raw` ('<unit> since <date>' in `calendar`)."""
    import cftime

    m = re.fullmatch(r"\s*([A-Za-z]+)\s+since\s+(.+?)\s*", units)
    if not m or m.group(1).lower() not in _SECONDS:
        raise _fail(path, f"{name}: cannot decode time units {units!r} (want '<seconds|minutes|hours|days> "
                          "since <date>')")
    try:
        origin = cftime.datetime(*start.timetuple()[:6], start.microsecond, calendar=calendar)
        offset = float(cftime.date2num(origin, units, calendar=calendar))
    except Exception as exc:  # noqa: BLE001 - cftime raises ValueError/TypeError on bad units/calendars
        raise _fail(path, f"{name}: cannot decode time (units {units!r}, calendar {calendar!r}: "
                          f"{exc})") from exc
    return (raw - offset) * (_SECONDS[m.group(1).lower()] / tus)


def _read_netcdf(path: Path, grid: Grid, names: list[str], start: _dt.datetime, tus: float,
                 default_error_std: float | None, units: Mapping[str, str],
                 std: Mapping[str, int]) -> ObservationTable:
    import xarray as xr

    try:
        with xr.open_dataset(path, engine="netcdf4", decode_times=False, decode_timedelta=False) as f:
            ds = f.load()
    except Exception as exc:  # noqa: BLE001 - netCDF4/HDF5 raise many types on corrupt files
        raise _fail(path, f"not a readable netCDF file ({exc})") from exc
    data = [("value", None)] if "value" in ds.variables else [
        (str(n), names.index(str(n)) if str(n) in names else std[_attr(v, "standard_name")])
        for n, v in ds.data_vars.items() if str(n) in names or _attr(v, "standard_name") in std]
    if not data:
        raise _fail(path, f"no observed variable: expected 'value' or one of {', '.join(names)}")
    skip = [n for n, _ in data]
    time_name = _find(ds, [lambda n, v: _attr(v, "standard_name") == "time" and "since" in _attr(v, "units"),
                           lambda n, v: _attr(v, "axis").upper() == "T",
                           lambda n, v: n.lower() == "time"], skip)
    if time_name is None:
        raise _fail(path, "no time variable (standard_name 'time', axis 'T' or name 'time')")
    coords = [_coord_name(path, ds, grid, a, skip) for a in range(grid.ndim)]
    parts = [_read_block(path, ds, name, var, time_name, coords, grid, names, units, start, tus,
                         default_error_std, dense=len(data) > 1) for name, var in data]
    table = ObservationTable(*(np.concatenate([getattr(p, f.name) for p in parts])
                               for f in fields(ObservationTable)))
    return table.replace(ids=np.arange(len(table), dtype=np.int64)) if len(parts) > 1 else table


def _station_map(ds: Any, dims: tuple[str, ...]) -> tuple[str, np.ndarray] | None:
    """(station dimension, station index of every observation) for CF ragged arrays on dims (obs,)."""
    for v in ds.variables.values() if len(dims) == 1 else ():
        if _attr(v, "sample_dimension") == dims[0] and v.ndim == 1:  # contiguous ragged array
            return str(v.dims[0]), np.repeat(np.arange(v.shape[0]), np.asarray(v.values, dtype=np.int64))
        if _attr(v, "instance_dimension") and v.dims == dims:  # indexed ragged array
            return _attr(v, "instance_dimension"), np.asarray(v.values, dtype=np.int64)
    return None


def _read_block(path: Path, ds: Any, name: str, var: int | None, time_name: str, coords: list[str],
                grid: Grid, names: list[str], units: Mapping[str, str], start: _dt.datetime, tus: float,
                default_error_std: float | None, dense: bool) -> ObservationTable:
    """One observed data variable, flattened with its time, coordinates, errors, ids and stations."""
    dv = ds[name]
    ragged = _station_map(ds, dv.dims)

    def expand(other: str) -> np.ndarray:  # `other` on the observations of `name`, flattened
        v = ds[other]
        if set(v.dims) <= set(dv.dims):
            full = v.variable.set_dims(dict(zip(dv.dims, dv.shape))).transpose(*dv.dims)
            return np.asarray(full.values).ravel()
        if ragged is not None and v.dims == (ragged[0],):
            if ragged[1].size != dv.size or (ragged[1].size and ragged[1].max() >= v.shape[0]):
                raise _fail(path, f"{other}: ragged-array station index does not fit {name}")
            return np.asarray(v.values)[ragged[1]]
        raise _fail(path, f"{other}: dimensions {tuple(v.dims)} do not match {name}'s {tuple(dv.dims)}")

    value = np.asarray(dv.values, dtype=np.float64).ravel()
    variable = _variable_index(path, ds, name, names, expand) if var is None else np.full(value.size, var)
    found = dv.attrs.get("units")
    for v in np.unique(variable):
        want = units.get(names[int(v)])
        if found is not None and want is not None and not _same_units(str(found), want):
            raise _fail(path, f"{name}: units {found!r}, but model variable {names[int(v)]!r} is in {want!r}")
    tv = ds[time_name]
    if "units" not in tv.attrs or not np.issubdtype(tv.dtype, np.number):
        raise _fail(path, f"{time_name}: time needs numeric values with CF units '<unit> since <date>'")
    time = _cf_time(path, time_name, expand(time_name).astype(np.float64), _attr(tv, "units"),
                    _attr(tv, "calendar") or "standard", start, tus)
    exact = ds.variables.get("model_time")  # EarthTwin's own files: exact model times, where they agree
    if exact is not None and f"({tus:g} s per model time unit)" in _attr(exact, "long_name"):
        mt = expand("model_time").astype(np.float64)
        time = mt if np.all(np.abs(mt - time) * tus <= 1e-3) else time
    locs = np.stack([expand(c).astype(np.float64) * _coord_scale(path, c, ds[c].attrs.get("units"), grid, d)
                     for c, d in zip(coords, grid.dims)], -1)
    err = [n for n in _attr(dv, "ancillary_variables").split() if n in ds.variables]
    err += [n for n in (f"{name}_error_std", f"{name}_error", "error_std") if n in ds.variables]
    if err:
        error = expand(err[0]).astype(np.float64)
    elif default_error_std is not None:
        error = np.full(value.shape, float(default_error_std))
    else:
        raise _fail(path, f"{name}: no error variable ({name}_error_std, error_std or ancillary_variables) "
                          "and no default error std")
    sid = _find(ds, [lambda n, v: _attr(v, "cf_role") in ("timeseries_id", "station_id")])
    station = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in expand(sid)] if sid else
                       [""] * value.size, dtype=object)
    ids = expand("obs_id").astype(np.int64) if "obs_id" in ds.variables else np.arange(value.size)
    alt = _find(ds, [lambda n, v: _attr(v, "standard_name") in _ALTITUDE_STD,
                     lambda n, v: n.lower() in _ALTITUDE_NAMES and not _attr(v, "standard_name")],
                [*coords, time_name, name, *names])
    height = np.full(value.size, np.nan) if alt is None else \
        expand(alt).astype(np.float64) * _metres(path, alt, ds[alt].attrs.get("units"))
    keep = np.isfinite(value) if dense or dv.ndim > 1 else slice(None)  # fill values of dense arrays
    return ObservationTable(time[keep], locs[keep], variable[keep].astype(np.int64), value[keep], error[keep],
                            ids[keep], station[keep], height[keep])


def _variable_index(path: Path, ds: Any, name: str, names: list[str], expand: Callable) -> np.ndarray:
    """Model variable of each `value`: `variable_index` through its flag meanings, else the only one."""
    if "variable_index" not in ds.variables:
        if len(names) == 1:
            return np.zeros(ds[name].size, dtype=np.int64)
        raise _fail(path, f"variable_index: missing; it says which of {', '.join(names)} each {name} "
                          "observes")
    vi = ds["variable_index"]
    meanings = _attr(vi, "flag_meanings").split()
    flags = np.atleast_1d(vi.attrs.get("flag_values", np.arange(len(meanings)))).astype(np.int64).tolist()
    lookup = {f: ([i for i, n in enumerate(names) if n.replace(" ", "_") == m] or [-1])[0]
              for f, m in zip(flags, meanings)}
    raw = expand("variable_index")
    out = np.array([lookup.get(int(r), -1) if np.isfinite(r) else -1 for r in raw], dtype=np.int64)
    if (out < 0).any():
        bad = raw[np.argmax(out < 0)]
        what = dict(zip(flags, meanings)).get(int(bad), bad) if np.isfinite(bad) else "missing"
        raise _fail(path, f"variable_index: {what!r} is not a model variable (have {', '.join(names)})")
    return out


# --------------------------------------------------------------------------------------------- CSV
def _numbers(path: Path, df: Any, col: str) -> np.ndarray:
    """A column as floats (empty cells NaN); anything else that is not a number is an error."""
    import pandas as pd

    out = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    text = df[col].fillna("").astype(str).str.strip().str.lower()
    bad = np.isnan(out) & ~text.isin(["", "nan"]).to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise _fail(path, f"column {col!r}, data row {row + 1}: {df[col].iloc[row]!r} is not a number")
    return out


def _csv_times(path: Path, col: str, cells: list[Any], start: _dt.datetime, tus: float) -> np.ndarray:
    """Model times from ISO datetimes (naive = UTC) or model-time numbers; not both in one column."""
    out, kinds = np.full(len(cells), np.nan), set()
    for i, text in enumerate("" if c is None or c != c else str(c).strip() for c in cells):
        if not text:
            continue
        try:
            out[i], kind = float(text), "number"
        except ValueError:
            try:
                t = _dt.datetime.fromisoformat(text)
            except ValueError:
                raise _fail(path, f"column {col!r}, data row {i + 1}: cannot parse {text!r} as an ISO "
                                  "datetime or a model-time number") from None
            t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None) if t.tzinfo else t
            out[i], kind = (t - start).total_seconds() / tus, "date"
        kinds.add(kind)
    if len(kinds) > 1:
        raise _fail(path, f"column {col!r} mixes ISO datetimes and model-time numbers")
    return out


def _read_csv(path: Path, grid: Grid, names: list[str], start: _dt.datetime, tus: float,
              default_error_std: float | None) -> ObservationTable:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise _fail(path, "empty file") from None
    except Exception as exc:  # noqa: BLE001 - the parser's errors name no column; report them on one line
        raise _fail(path, f"not a readable CSV file ({exc})") from exc
    header = {str(c).strip().lower(): str(c) for c in df.columns}

    def column(what: str, aliases: Sequence[str] = (), required: bool = True, hint: str = "") -> str | None:
        hit = next((header[a] for a in (what, *aliases) if a in header), None)
        if hit is None and required:
            raise _fail(path, f"missing column {what!r}{hint} (have: {', '.join(header.values())})")
        return hit

    t_col = column("time", ("datetime", "date", "valid_time"))
    coords = [column(d.lower(), _ALIASES.get(_geo(d) or "", ())) for d in grid.dims]
    v_col = column("value", ("observation", "obs"))
    var_col = column("variable", ("var",), required=len(names) > 1)
    e_col = column("error", ("error_std", "sigma"), default_error_std is None, " and no default error std")
    s_col = column("station", ("station_id",), required=False)
    h_col = column(_ALTITUDE_NAMES[0], _ALTITUDE_NAMES[1:], required=False)
    n = len(df)
    variable = np.zeros(n, dtype=np.int64)
    if var_col is not None:
        cells = df[var_col].fillna("").astype(str).str.strip()
        variable = np.array([names.index(c) if c in names else -1 for c in cells], dtype=np.int64)
        if (variable < 0).any():
            row = int(np.argmax(variable < 0))
            raise _fail(path, f"column {var_col!r}, data row {row + 1}: unknown variable {cells.iloc[row]!r} "
                              f"(model variables: {', '.join(names)})")
    error = np.full(n, np.nan) if e_col is None else _numbers(path, df, e_col)
    if default_error_std is not None:
        error = np.where(np.isnan(error), float(default_error_std), error)
    locations = np.stack([_numbers(path, df, c) for c in coords], -1).reshape(n, grid.ndim)
    station = np.full(n, "", dtype=object) if s_col is None else \
        df[s_col].fillna("").astype(str).to_numpy(dtype=object)
    height = np.full(n, np.nan) if h_col is None else _numbers(path, df, h_col)
    return ObservationTable(_csv_times(path, t_col, df[t_col].tolist(), start, tus), locations, variable,
                            _numbers(path, df, v_col), error, np.arange(n, dtype=np.int64), station, height)
