"""Synthetic CF netCDF fields and station files on latitude-longitude grids, and short twin runs on
them, for the tests of `initial:` and of latitude-longitude grids."""
import json
from pathlib import Path

import numpy as np
import xarray as xr
import yaml

from twin.cli import main

TIME = {"units": "hours since 2000-01-01 00:00:00", "calendar": "proleptic_gregorian", "standard_name": "time"}
LAT = {"standard_name": "latitude", "units": "degrees_north"}
LON = {"standard_name": "longitude", "units": "degrees_east"}


def sst_of(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """A smooth field of true latitude and longitude (any longitude convention gives the same values)."""
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    return 285.0 + 10.0 * np.cos(la) + 2.0 * np.sin(lo) * np.cos(la) + np.sin(3 * la)


def land_of(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """A 'continent' from 20N to 60N, 30W to 40E."""
    la, lo = np.meshgrid(lat, (np.asarray(lon) + 180.0) % 360.0 - 180.0, indexing="ij")
    return (la > 20) & (la < 60) & (lo > -30) & (lo < 40)


def write_field(path: Path, lat: np.ndarray, lon: np.ndarray, values: np.ndarray, *, name: str = "sst",
                units: str = "K", lat_name: str = "lat", lon_name: str = "lon", lat_attrs: dict = LAT,
                lon_attrs: dict = LON, transpose: bool = False, times: np.ndarray | None = None,
                extra: dict | None = None) -> Path:
    """A CF file with `name` (time, lat, lon) (or (time, lon, lat) when `transpose`); NaN -> _FillValue."""
    values = np.asarray(values, dtype=np.float64)
    values = values[None] if values.ndim == 2 else values
    times = np.arange(values.shape[0]) * 6.0 if times is None else times
    dims = ("time", lat_name, lon_name)
    if transpose:
        values, dims = values.transpose(0, 2, 1), ("time", lon_name, lat_name)
    ds = xr.Dataset({name: (dims, values, {"units": units, "long_name": "sea surface temperature"})},
                    coords={"time": ("time", times, TIME), lat_name: (lat_name, lat, lat_attrs),
                            lon_name: (lon_name, lon, lon_attrs)})
    for k, v in (extra or {}).items():
        ds[k] = v
    ds.to_netcdf(path, encoding={name: {"_FillValue": -9999.0, "zlib": True}})
    return path


def write_stations(path: Path, stations: list[tuple[float, float, float]], cycles: int, hours: float = 6.0,
                   error: float = 0.5, variable: str = "sst") -> Path:
    rows = ["time,lat,lon,variable,value,error"]
    for c in range(cycles):
        t = np.datetime64("2000-01-01T00:00") + np.timedelta64(int(c * hours * 60), "m")
        rows += [f"{t},{la},{lo},{variable},{val + 0.1 * c},{error}" for la, lo, val in stations]
    path.write_text("\n".join(rows) + "\n")
    return path


def case_dict(initial: dict, obs: Path, stages: list[dict], cycles: int = 3, members: int = 6, **extra) -> dict:
    return {"name": "latlon", "model": extra.pop("model", {"kind": "persistence", "dt": 21600.0}),
            "initial": initial, "observations": {"path": str(obs), "error_std": 0.5},
            "ensemble": {"size": members, "seed": 5}, "assimilation": {"stages": stages},
            "run": {"cycles": cycles}, "output": {"figures": False}, **extra}


def run(tmp_path: Path, case: dict, tag: str) -> tuple[xr.Dataset, dict]:
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(case))
    out = tmp_path / f"out_{tag}"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return xr.open_dataset(out / "analysis.nc"), json.loads((out / "summary.json").read_text())


GLOBAL_LAT = np.arange(-90.0, 90.1, 7.5)
LON_360 = np.arange(0.0, 360.0, 10.0)
LON_180 = np.arange(-180.0, 180.0, 10.0)


def rotated_grid(ny: int, nx: int, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """2-D lat/lon of a grid rotated by 30 degrees about the point (50N, 10E)."""
    y, x = np.meshgrid((np.arange(ny) - ny / 2) * spacing, (np.arange(nx) - nx / 2) * spacing, indexing="ij")
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    lat = 50.0 + c * y - s * x
    lon = 10.0 + (s * y + c * x) / np.cos(np.deg2rad(lat))
    return lat, lon


EXAMPLE_STATIONS = [(10.0, 179.0), (-5.0, -178.0), (35.0, 160.0), (-40.0, -150.0), (78.0, -10.0),
                    (84.0, 100.0), (-60.0, 60.0), (0.0, 90.0)]


def write_example(folder: Path) -> tuple[Path, Path]:
    """The inputs of cases/latlon_blend_synthetic.yaml: a 5-degree global SST field (K, land masked
    by _FillValue, latitudes descending, longitudes 0..360) and 8 sea stations every 6 h for a day
    that see the field 1 K warmer plus a wave."""
    folder.mkdir(parents=True, exist_ok=True)
    lat, lon = np.arange(90.0, -90.1, -5.0), np.arange(0.0, 360.0, 5.0)
    field = np.where(land_of(lat, lon), np.nan, sst_of(lat, lon)).astype(np.float32)
    nc = write_field(folder / "latlon_sst.nc", lat, lon, field)
    rows = ["time,lat,lon,variable,value,error"]
    for c in range(5):
        t = np.datetime64("2000-01-01T00:00") + np.timedelta64(6 * c, "h")
        for la, lo in EXAMPLE_STATIONS:
            truth = sst_of(np.array([la]), np.array([lo]))[0, 0] + 1.0 + 0.5 * np.sin(np.deg2rad(lo) + 0.3 * c)
            rows.append(f"{t},{la},{lo},sst,{truth:.3f},0.3")
    csv = folder / "latlon_stations.csv"
    csv.write_text("\n".join(rows) + "\n")
    return nc, csv
