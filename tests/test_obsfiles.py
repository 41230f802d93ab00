"""Observation files (CF DSG netCDF, CSV), their one-line errors, and quality control."""
import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings, strategies as st

from assim.geo import GeoGrid
from assim.obsfiles import ObservationFileError, ObservationTable, read_observations
from assim.points import PointsOperator
from assim.qc import gross_error, screen, select_window
from emulators.base import Variable
from twin import io
from twin.domain import Grid, SerialDomain

L96_UNIT = 432000.0
X = [Variable("X", "1", "Lorenz-96 state variable")]  # as emulators.lorenz96 (grid dim "x")
SQG = [Variable("theta", "K", "potential temperature", "air_potential_temperature"),
       Variable("u", "m s-1", "eastward wind")]


def write(ds: xr.Dataset, path: Path) -> Path:
    io.write_netcdf_atomic(ds, path)
    return path


# ------------------------------------------------------------------------------- netCDF round trip
def test_round_trip_of_a_run_observation_file(tmp_path):
    grid = Grid((40,), (True,))
    times, t = [], 0.0
    for _ in range(7):  # accumulated model times, as a run produces them (0.15000000000000002 ...)
        t += 0.05
        times += [t] * 5
    times = np.array(times)
    rng = np.random.default_rng(0)
    locs = rng.integers(0, 40, (35, 1)).astype(float)
    values, ids = rng.normal(size=35), np.tile(np.arange(5), 7)
    ds = io.observations_dataset(times, locs, 0, values, 1.5, ids, grid, X, time_unit_seconds=L96_UNIT,
                                 start="2010-06-01T06:00", extra={"omb": (("obs",), values, {})})
    path = write(ds, tmp_path / "observations.nc")
    table = read_observations(path, grid, X, start=dt.datetime(2010, 6, 1, 6), time_unit_seconds=L96_UNIT)
    assert np.array_equal(table.time, times) and np.array_equal(table.locations, locs)
    assert np.array_equal(table.value, values) and np.array_equal(table.ids, ids)
    assert np.array_equal(table.error_std, np.full(35, 1.5)) and np.array_equal(table.variable, np.zeros(35))
    later = read_observations(path, grid, ["X"], start="2010-06-01T12:00", time_unit_seconds=L96_UNIT)
    assert np.allclose(later.time, times - 0.05)  # another origin: from CF time, not model_time


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 10**6), unit=st.sampled_from([1.0, 600.0, L96_UNIT]))
def test_round_trip_two_variables_2d(n, seed, unit):
    grid = Grid((8, 16), (False, True), (1000.0, 1000.0), units="m")
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(0, 50, n)) * rng.choice([0.05, 1200.0, 1.0])
    locs = rng.uniform(0, 1, (n, 2)) * [7000.0, 16000.0]
    var, values = rng.integers(0, 2, n), rng.normal(size=n)
    err, ids = rng.uniform(0.1, 2, n), rng.permutation(n)
    ds = io.observations_dataset(times, locs, var, values, err, ids, grid, SQG, time_unit_seconds=unit)
    with tempfile.TemporaryDirectory() as d:
        table = read_observations(write(ds, Path(d) / "o.nc"), grid, SQG, time_unit_seconds=unit)
    for got, want in [(table.time, times), (table.locations, locs), (table.variable, var),
                      (table.value, values), (table.error_std, err), (table.ids, ids)]:
        assert np.array_equal(got, want)


def time_series_file(path: Path, **overrides) -> Path:
    """A timeSeries file (station, time) whose variables are found by their CF attributes."""
    values = np.array([[280.0, 281.0, np.nan, 283.0], [270.0, 271.0, 272.0, 273.0], [290.0] * 4])
    ds = xr.Dataset(
        {"theta": (("stn", "t"), values, {"units": "K", "ancillary_variables": "theta_sigma"}),
         "theta_sigma": (("stn",), [0.5, 0.6, 0.7], {"units": "K"}),
         "easting": (("stn",), [-10.0, 40.0, 355.0], {"axis": "X", "units": "degrees_east"}),
         "northing": (("stn",), [10.0, -20.0, 0.0], {"standard_name": "latitude", "units": "degrees_north"}),
         "obs_time": (("t",), [6.0, 12.0, 18.0, 24.0], {"standard_name": "time", "calendar": "noleap",
                                                        "units": "hours since 1999-12-31 00:00"}),
         "name": (("stn",), ["A", "B", "C"], {"cf_role": "timeseries_id"})},
        attrs={"featureType": "timeSeries", "Conventions": "CF-1.11"})
    for k, v in overrides.items():
        if v is None:
            ds = ds.drop_vars(k)
        else:
            ds[k].attrs.update(v)
    ds.to_netcdf(path)
    return path


def test_time_series_found_by_attributes_and_flattened(tmp_path):
    grid = GeoGrid.regular(19, 36)
    table = read_observations(time_series_file(tmp_path / "ts.nc"), grid, SQG, start="2000-01-01",
                              time_unit_seconds=3600.0)
    assert len(table) == 11  # the missing value (NaN fill in the dense array) is no observation
    assert table.time.tolist() == [-18.0, -12.0, 0.0] + [-18.0, -12.0, -6.0, 0.0] * 2
    assert table.station.tolist() == ["A"] * 3 + ["B"] * 4 + ["C"] * 4
    assert table.locations[0].tolist() == [10.0, -10.0] and table.locations[-1].tolist() == [0.0, 355.0]
    assert table.value[2] == 283.0 and np.all(table.variable == 0)
    assert table.error_std.tolist() == [0.5] * 3 + [0.6] * 4 + [0.7] * 4


def test_contiguous_ragged_time_series(tmp_path):
    ds = xr.Dataset({"X": (("obs",), [1.0, 2.0, 3.0]),
                     "rowSize": (("station",), [1, 2], {"sample_dimension": "obs"}),
                     "pos": (("station",), [3.0, 7.5], {"axis": "X"}),
                     "time": (("obs",), [0.0, 1.0, 2.0], {"units": "days since 2000-01-01"})},
                    attrs={"featureType": "timeSeries"})
    ds.to_netcdf(tmp_path / "r.nc")
    table = read_observations(tmp_path / "r.nc", Grid((10,), (True,)), X, time_unit_seconds=86400.0,
                              default_error_std=0.3)
    assert table.locations[:, 0].tolist() == [3.0, 7.5, 7.5] and table.time.tolist() == [0.0, 1.0, 2.0]
    assert table.error_std.tolist() == [0.3] * 3 and table.ids.tolist() == [0, 1, 2]


def test_indexed_ragged_time_series(tmp_path):
    ds = xr.Dataset({"X": (("obs",), [1.0, 2.0, 3.0], {"ancillary_variables": "sd"}),
                     "sd": (("obs",), [0.1, 0.2, 0.3]),
                     "stationIndex": (("obs",), [1, 0, 1], {"instance_dimension": "station"}),
                     "pos": (("station",), [3.0, 7.5], {"axis": "X"}),
                     "id": (("station",), ["a", "b"], {"cf_role": "timeseries_id"}),
                     "time": (("obs",), [0.0, 1.0, 2.0], {"units": "days since 2000-01-01"})},
                    attrs={"featureType": "timeSeries"})
    ds.to_netcdf(tmp_path / "r.nc")
    table = read_observations(tmp_path / "r.nc", Grid((10,), (True,)), X, time_unit_seconds=86400.0)
    assert table.locations[:, 0].tolist() == [7.5, 3.0, 7.5] and table.station.tolist() == ["b", "a", "b"]
    assert table.error_std.tolist() == [0.1, 0.2, 0.3] and table.value.tolist() == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_with_iso_times_and_variable_names(tmp_path):
    path = tmp_path / "obs.csv"
    path.write_text("Time, y, x, variable, value, error, station\n"
                    "2000-01-01T01:00:00Z, 1.5, 2, theta, 280.5, 0.5, S1\n"
                    "2000-01-01T01:00:00+02:00, 0, 15.5, u, -3, , S2\n"
                    "2000-01-01 00:20, 7, 0, theta, 1e2, 2,\n")
    grid = Grid((8, 16), (False, True))
    table = read_observations(path, grid, SQG, start=dt.datetime(2000, 1, 1), time_unit_seconds=1200.0,
                              default_error_std=9.0)
    assert table.time.tolist() == [3.0, -3.0, 1.0]
    assert table.locations.tolist() == [[1.5, 2.0], [0.0, 15.5], [7.0, 0.0]]
    assert table.variable.tolist() == [0, 1, 0] and table.value.tolist() == [280.5, -3.0, 100.0]
    assert table.error_std.tolist() == [0.5, 9.0, 2.0] and table.station.tolist() == ["S1", "S2", ""]


def test_csv_model_time_numbers_and_lat_lon_names(tmp_path):
    path = tmp_path / "obs.csv"
    path.write_text("time,latitude,longitude,value\n0.05,10,-170,1.0\n0.1,-80,359,2.0\n")
    table = read_observations(path, GeoGrid.regular(19, 36), X, time_unit_seconds=L96_UNIT,
                              default_error_std=1.0)
    assert table.time.tolist() == [0.05, 0.1] and table.locations.tolist() == [[10.0, -170.0], [-80.0, 359.0]]


# ------------------------------------------------------------------------------------------- errors
def one_line_error(path, *names, **kw):
    with pytest.raises(ObservationFileError) as info:
        read_observations(path, kw.pop("grid", Grid((8, 16), (False, True))), kw.pop("variables", SQG),
                          time_unit_seconds=kw.pop("unit", 3600.0), **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for name in names:
        assert name in msg, msg
    return msg


CSV_HEAD = "time,y,x,variable,value,error\n"
CSV_ROW = "2000-01-01T00:00,1,2,theta,280,1\n"


@pytest.mark.parametrize("text,names", [
    ("", ["empty"]), (CSV_HEAD, ["no observations"]),
    ("time,y,variable,value,error\n2000-01-01,1,theta,1,1\n", ["'x'"]),
    ("time,y,x,variable,error\n2000-01-01,1,2,theta,1\n", ["'value'"]),
    ("time,y,x,value,error\n2000-01-01,1,2,1,1\n", ["'variable'"]),
    ("time,y,x,variable,value\n2000-01-01,1,2,theta,1\n", ["'error'"]),
    (CSV_HEAD + CSV_ROW + "yesterday,1,2,theta,1,1\n", ["'time'", "data row 2", "yesterday"]),
    (CSV_HEAD + CSV_ROW + "2000-13-01,1,2,theta,1,1\n", ["'time'", "data row 2"]),
    (CSV_HEAD + "2000-01-01,1,2,rain,1,1\n", ["'variable'", "rain"]),
    (CSV_HEAD + CSV_ROW + "0.5,1,2,theta,1,1\n", ["'time'", "mixes"]),
    (CSV_HEAD + "2000-01-01,1,two,theta,1,1\n", ["'x'", "data row 1"]),
])
def test_csv_errors_are_one_line(tmp_path, text, names):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    one_line_error(path, *names)


def test_missing_and_corrupt_files(tmp_path):
    one_line_error(tmp_path / "nothere.nc", "no such file")
    (tmp_path / "junk.nc").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    one_line_error(tmp_path / "junk.nc", "not a readable netCDF")


def test_netcdf_errors_are_one_line(tmp_path):
    ts = dict(grid=GeoGrid.regular(19, 36), start="2000-01-01")
    one_line_error(time_series_file(tmp_path / "a.nc", theta={"units": "degC"}), "theta", "degC", "'K'", **ts)
    one_line_error(time_series_file(tmp_path / "b.nc", easting={"units": "m"}), "easting", "'m'", **ts)
    one_line_error(time_series_file(tmp_path / "c.nc", obs_time={"units": "fortnights since 2000-01-01"}),
                   "obs_time", "fortnights", **ts)
    one_line_error(time_series_file(tmp_path / "d.nc", obs_time={"calendar": "martian"}), "obs_time", **ts)
    one_line_error(time_series_file(tmp_path / "e.nc", northing=None), "lat", **ts)
    one_line_error(time_series_file(tmp_path / "f.nc", obs_time=None), "time", **ts)
    one_line_error(time_series_file(tmp_path / "g.nc", theta=None, theta_sigma=None), "value", "theta", **ts)
    ds = xr.open_dataset(time_series_file(tmp_path / "h.nc")).load()
    no_error = ds.drop_vars("theta_sigma").assign(theta=ds.theta.assign_attrs(ancillary_variables=""))
    write(no_error, tmp_path / "i.nc")
    one_line_error(tmp_path / "i.nc", "theta", "error", **ts)
    g = Grid((40,), (True,))
    empty = io.observations_dataset(np.zeros(0), np.zeros((0, 1)), 0, np.zeros(0), 1.0, np.zeros(0), g, X,
                                    time_unit_seconds=1.0)
    one_line_error(write(empty, tmp_path / "empty.nc"), "no observations", grid=g, variables=X)
    ds = io.observations_dataset([1.0], [[2.0]], 0, [3.0], 1.0, [0], g, X, time_unit_seconds=1.0)
    km = Grid((40,), (True,), units="km")
    one_line_error(write(ds, tmp_path / "units.nc"), "units", grid=km, variables=X)
    one_line_error(tmp_path / "units.nc", "variable_index", "'X'", grid=g, variables=["a", "b"])
    one_line_error(tmp_path / "units.nc", "value", "'m'", grid=g, variables=X, variable_units={"X": "m"})


# --------------------------------------------------------------------------------------- QC + batch
def table_of(time, locs, value, err, var=None) -> ObservationTable:
    n = len(value)
    locs = np.asarray(locs, float).reshape(n, -1) if n else np.zeros((0, 1))
    var = np.zeros(n, np.int64) if var is None else np.asarray(var)
    return ObservationTable(np.asarray(time, float), locs, var, np.asarray(value, float),
                            np.asarray(err, float), np.arange(n), np.full(n, "", dtype=object))


def test_screen_counts_are_exact():
    grid = Grid((10, 40), (False, True))  # y open in [0, 9], x periodic with period 40
    rows = [  # (time, y, x, value, err, expected reason)
        (0, 1, 1, 1.0, 1, ""), (0, 2, 2, np.nan, 1, "nonfinite"), (0, np.inf, 2, 1.0, 1, "nonfinite"),
        (np.nan, 3, 3, 1.0, 0, "nonfinite"), (0, 3, 3, 1.0, 0, "bad_error"),
        (0, -0.5, 3, 1.0, 1, "out_of_domain"), (0, 9.5, 3, 1.0, 1, "out_of_domain"),
        (0, 1e9, 3, 1.0, -1, "bad_error"), (0, 50, 3, 1.0, 1, "out_of_domain"),
        (0, 9, -1, 2.0, 1, ""), (0, 1, 41, 5.0, 1, "duplicate"), (0, 9, 39, 2.5, 1, "duplicate"),
        (1, 1, 1, 1.0, 1, ""), (0, 0, 0, 1.0, np.nan, "bad_error"),
    ]
    t = table_of([r[0] for r in rows], [r[1:3] for r in rows], [r[3] for r in rows], [r[4] for r in rows])
    kept, counts = screen(t, grid)
    want = [r[5] for r in rows]
    assert counts == {"nonfinite": 3, "bad_error": 3, "out_of_domain": 3, "duplicate": 2, "kept": 3}
    assert kept.ids.tolist() == [i for i, w in enumerate(want) if w == ""]
    assert kept.locations.tolist() == [[1.0, 1.0], [9.0, 39.0], [1.0, 1.0]]  # x = -1 wrapped to 39


def test_screen_keeps_other_variables_at_the_same_place():
    t = table_of([0, 0, 0], [[1.0], [1.0], [1.0]], [1, 2, 3], [1, 1, 1], var=[0, 1, 0])
    kept, counts = screen(t, Grid((5,), (False,)))
    assert kept.ids.tolist() == [0, 1] and counts["duplicate"] == 1


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), periodic=st.booleans())
def test_screen_fuzz(data, n, periodic):
    grid = Grid((6,), (periodic,), (2.0,))
    pick = st.sampled_from([0.0, 1.0, 2.5, 10.0, 11.9, -3.0, 12.0, np.nan, np.inf, -np.inf])
    t = table_of(data.draw(st.lists(st.sampled_from([0.0, 1.0, np.nan]), min_size=n, max_size=n)),
                 data.draw(st.lists(pick, min_size=n, max_size=n)),
                 data.draw(st.lists(st.sampled_from([1.0, np.nan, np.inf]), min_size=n, max_size=n)),
                 data.draw(st.lists(st.sampled_from([1.0, 0.0, -1.0, np.nan, np.inf]),
                                    min_size=n, max_size=n)))
    kept, counts = screen(t, grid)
    assert sum(counts.values()) == n and counts["kept"] == len(kept)
    assert np.isfinite(kept.value).all() and np.isfinite(kept.locations).all()
    assert np.isfinite(kept.time).all()
    assert (kept.error_std > 0).all() and np.isfinite(kept.error_std).all()
    assert ((kept.locations >= 0) & (kept.locations <= (12.0 if periodic else 10.0))).all()
    if periodic:
        assert (kept.locations < 12.0).all()
    keys = {(a, b, c) for a, b, c in zip(kept.time, kept.variable, kept.locations[:, 0])}
    assert len(keys) == len(kept)
    PointsOperator(grid, kept.locations, kept.variable)  # everything kept is on the grid


def test_select_window_inclusive_with_rounding():
    times = np.cumsum(np.full(10, 0.1))  # 0.30000000000000004 ...
    t = table_of(times, np.zeros((10, 1)), np.ones(10), np.ones(10))
    assert select_window(t, 0.3, 0.0).tolist() == [2]
    assert select_window(t, 0.5, 0.1).tolist() == [3, 4, 5]
    assert select_window(t, 0.5, 0.1, closed="left").tolist() == [3, 4]
    assert select_window(t, 5.0, 0.1).tolist() == []


def test_gross_error_numpy_and_torch():
    hx = np.array([0.0, 0.0, 0.0, 0.0, np.nan])
    y = np.array([2.9, 3.1, -5.0, 4.9, 0.0])
    keep = gross_error(hx, y, np.array([1.0, 1.0, 1.0, 0.6, 1.0]), np.array([0.0, 0.0, 4 / 3, 0.8, 0.0]), 3.0)
    assert keep.tolist() == [True, False, True, False, False]  # bounds 3, 3, 5, 3
    tk = gross_error(*(torch.as_tensor(a) for a in (hx, y)), torch.ones(5), torch.zeros(5), 3.0)
    assert tk.tolist() == [True, False, False, False, False]


def test_batch_builds_points_operator_and_unique_ids():
    grid = Grid((10,), (True,))
    t = table_of([0, 0, 1], [[9.5], [1.0], [9.5]], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    t = ObservationTable(**{**t.__dict__, "ids": np.array([7, 7, 8])})
    b = t.batch(np.array([0, 1]), 0.0, grid, SerialDomain(grid))
    assert b.ids.tolist() == [0, 1] and b.values.tolist() == [1.0, 2.0]  # duplicate ids -> row numbers
    assert t.batch(np.array([1, 2]), 1.0, grid).ids.tolist() == [7, 8]
    x = torch.arange(10.0, dtype=torch.float64).reshape(1, 1, 10)
    assert b.operator(x).tolist() == [[4.5, 1.0]] and b.locations.tolist() == [[9.5], [1.0]]


def test_projection_coordinates_in_metres_on_a_km_grid(tmp_path):
    ds = xr.Dataset({"theta": (("obs",), [280.0], {"units": "K"}),
                     "e": (("obs",), [1500.0], {"standard_name": "projection_x_coordinate", "units": "m"}),
                     "n": (("obs",), [250.0], {"standard_name": "projection_y_coordinate", "units": "m"}),
                     "t": (("obs",), [30.0], {"axis": "T", "units": "minutes since 2000-01-01"})},
                    attrs={"featureType": "point"})
    ds.to_netcdf(tmp_path / "p.nc")
    grid = Grid((8, 16), (False, True), units="km")
    table = read_observations(tmp_path / "p.nc", grid, SQG, time_unit_seconds=1.0, default_error_std=1.0)
    assert table.locations.tolist() == [[0.25, 1.5]] and table.time.tolist() == [1800.0]
