"""Prepare the inputs of cases/hadcm3_stations.yaml from the Met Office `iris-sample-data` package.

    pip install iris-sample-data
    python cases/prepare_hadcm3.py            # writes cases/data/hadcm3/ (or --out DIR)

The source is `A1B_north_america.nc`: HadCM3 (Met Office Unified Model 6.05) 1.5 m air temperature,
annual means of the SRES A1B scenario run, on a 1.25° x 1.875° latitude-longitude grid over North
America (15-60N, 135-45W), 360-day calendar. Written (netCDF read with xarray, no iris needed):

- `background.nc`: the 20 annual fields 1980-1999, the ensemble of the case (`members_from: times`);
  their mean is the background, their spread the year-to-year variability;
- `stations.csv`: 60 stations at seeded random points of the domain observing the year-2000 field
  (bilinear interpolation) plus Gaussian noise of std 0.5 K, stated as their error, with station ids;
  longitudes in -180..180 as station lists give them;
- `truth.nc`: the year-2000 field itself, to verify the analysis on the grid as well.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr
from scipy.interpolate import RegularGridInterpolator

SOURCE = "A1B_north_america.nc"
VARIABLE = "air_temperature"
MEMBER_YEARS = tuple(range(1980, 2000))  # the ensemble; its mean is the background
ANALYSIS_YEAR = 2000  # the stations observe this year's field
STATIONS = 100
ERROR_STD = 0.3  # K: noise added to the station values, and their stated error
SEED = 2000
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "hadcm3"


def source_path() -> Path:
    """The sample file inside the installed iris-sample-data package (FileNotFoundError if absent)."""
    try:
        import iris_sample_data
    except ImportError:
        raise FileNotFoundError("prepare_hadcm3: the iris-sample-data package is not installed "
                                "(pip install iris-sample-data)") from None
    path = Path(iris_sample_data.path) / SOURCE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this version of iris-sample-data")
    return path


def _years(ds: xr.Dataset) -> np.ndarray:
    import cftime

    t = ds["time"]
    return np.array([d.year for d in cftime.num2date(t.values, t.attrs["units"], t.attrs["calendar"])])


def _field(ds: xr.Dataset, index: list[int]) -> xr.Dataset:
    """The variable at the time indices `index`, with its coordinates and CF attributes only."""
    da = ds[VARIABLE].isel(time=index)
    keep = {k: v for k, v in da.attrs.items() if k in ("standard_name", "long_name", "units", "cell_methods")}
    out = xr.Dataset({VARIABLE: (da.dims, da.values.astype(np.float32), keep)},
                     coords={d: (d, ds[d].values[index] if d == "time" else ds[d].values,
                                 {k: v for k, v in ds[d].attrs.items() if k != "bounds"})
                             for d in da.dims})
    out.attrs = {"Conventions": "CF-1.11", "source": f"HadCM3 SRES A1B, {SOURCE} of the Met Office iris-sample-data "
                                                      "package", "history": "written by cases/prepare_hadcm3.py"}
    return out


def prepare(out: Path) -> dict[str, Path]:
    """Write background.nc, stations.csv and truth.nc into `out`; return their paths."""
    with xr.open_dataset(source_path(), decode_times=False) as f:
        ds = f.load()
    years = _years(ds)
    members = [int(np.flatnonzero(years == y)[0]) for y in MEMBER_YEARS]
    now = int(np.flatnonzero(years == ANALYSIS_YEAR)[0])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"background": out / "background.nc", "stations": out / "stations.csv", "truth": out / "truth.nc"}
    _field(ds, members).to_netcdf(paths["background"])
    truth = _field(ds, [now])
    truth.to_netcdf(paths["truth"])
    lat, lon = ds["latitude"].values.astype(np.float64), ds["longitude"].values.astype(np.float64)
    rng = np.random.default_rng(SEED)
    s_lat = rng.uniform(lat[0] + 0.5, lat[-1] - 0.5, STATIONS)
    s_lon = rng.uniform(lon[0] + 0.5, lon[-1] - 0.5, STATIONS)
    field = RegularGridInterpolator((lat, lon), truth[VARIABLE].values[0].astype(np.float64))
    values = field(np.column_stack([s_lat, s_lon])) + ERROR_STD * rng.standard_normal(STATIONS)
    when = f"{ANALYSIS_YEAR}-06-01T00:00"
    rows = ["station,time,lat,lon,variable,value,error"]
    rows += [f"HC{k:03d},{when},{la:.4f},{lo - 360.0:.4f},{VARIABLE},{v:.3f},{ERROR_STD}"
             for k, (la, lo, v) in enumerate(zip(s_lat, s_lon, values))]
    paths["stations"].write_text("\n".join(rows) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        paths = prepare(args.out)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
