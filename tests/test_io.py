"""Tests of twin.io: CF state/observation datasets, atomic writes, restarts, robust reading."""
from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from unittest import mock

import netCDF4
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin import io
from twin.domain import Grid

VARS = (io.VariableInfo("u", "m s-1", "eastward_wind", "zonal wind"),
        io.VariableInfo("theta", "K", "air_potential_temperature", "potential temperature"),
        io.VariableInfo("q", "1", None, "tracer"))
L96_UNIT = 432000.0  # 1 model time unit = 5 days


def _grid(shape: tuple[int, ...]) -> Grid:
    return Grid(shape, (True,) * len(shape))


def _ens(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


shapes = st.one_of(st.tuples(st.integers(1, 12)), st.tuples(st.integers(1, 6), st.integers(1, 7)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, n_time=st.integers(1, 4), n_mem=st.integers(1, 5), n_var=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "float64"]), members=st.sampled_from(["all", "mean"]),
       unit=st.sampled_from([1.0, L96_UNIT]), seed=st.integers(0, 2**16))
def test_state_round_trip(shape, n_time, n_mem, n_var, dtype, members, unit, seed):
    rng = np.random.default_rng(seed)
    grid, variables = _grid(shape), VARS[:n_var]
    ens = _ens(rng, (n_time, n_mem, n_var, *shape), dtype)
    times = np.sort(rng.uniform(0, 3, n_time).round(2))
    start = dt.datetime(2001, 3, 4, 5)
    ds = io.state_dataset(ens, times, grid, variables, time_unit_seconds=unit, start=start,
                          members=members, attrs={"case": "demo", "method": "letkf"})
    with tempfile.TemporaryDirectory() as d:
        path = io.write_netcdf_atomic(ds, Path(d) / "analysis.nc")
        back = io.read_dataset(path)
        with netCDF4.Dataset(path) as nc:
            assert nc["time"].calendar == "proleptic_gregorian"
            assert nc["time"].units.startswith("hours since 2001-03-04")
    assert back.attrs["Conventions"] == "CF-1.11"
    assert back.attrs["institution"] == "EarthTwin" and back.attrs["source"].startswith("EarthTwin ")
    assert back.attrs["case"] == "demo" and back.attrs["method"] == "letkf" and "history" in back.attrs
    expected_t = [np.datetime64(start + dt.timedelta(seconds=float(t) * unit), "ms") for t in times]
    error = (back["time"].values - np.array(expected_t, dtype="datetime64[ns]")) / np.timedelta64(1, "ms")
    assert np.all(np.abs(error) < 1)  # float hours in the file: exact to well under a millisecond
    np.testing.assert_array_equal(back["model_time"].values, times)
    for a, dim in enumerate(grid.dims):
        assert back[dim].attrs["axis"] == dim.upper() and back[dim].attrs["units"] == "1"
        assert "standard_name" not in back[dim].attrs
        np.testing.assert_array_equal(back[dim].values, grid.axis_values(a))
    for i, v in enumerate(variables):
        da = back[v.name]
        assert da.dtype == np.dtype(dtype)
        assert da.attrs["units"] == v.units
        assert da.attrs.get("standard_name") == v.standard_name
        if members == "all":
            assert da.dims == ("time", "member", *grid.dims)
            np.testing.assert_array_equal(da.values, ens[:, :, i])
        else:
            assert da.dims == ("time", *grid.dims)
            np.testing.assert_allclose(da.values, ens[:, :, i].mean(1), rtol=1e-6, atol=1e-6)
            spread = ens[:, :, i].std(1, ddof=1) if n_mem > 1 else np.zeros_like(ens[:, 0, i])
            np.testing.assert_allclose(back[f"{v.name}_spread"].values, spread, rtol=1e-5, atol=1e-6)
    if members == "all":
        assert back.sizes["member"] == n_mem
        assert back["member"].attrs["standard_name"] == "realization"
    else:
        assert "member" not in back.dims


def test_lorenz96_time_is_six_hours_per_step(tmp_path):
    grid = _grid((8,))
    ens = np.zeros((3, 2, 1, 8))
    ds = io.state_dataset(ens, [0.0, 0.05, 0.1], grid, VARS[:1], time_unit_seconds=L96_UNIT, attrs={})
    back = io.read_dataset(io.write_netcdf_atomic(ds, tmp_path / "a.nc"))
    hours = (back["time"].values - np.datetime64("2000-01-01")) / np.timedelta64(1, "h")
    np.testing.assert_allclose(hours, [0, 6, 12])
    with netCDF4.Dataset(tmp_path / "a.nc") as nc:
        np.testing.assert_allclose(nc["time"][:], [0, 6, 12])


def test_extra_variables_round_trip(tmp_path):
    grid = _grid((4, 5))
    ens = np.ones((2, 3, 1, 4, 5), dtype=np.float32)
    extra = {"rmse_analysis": (("time",), np.array([0.5, np.nan]), {"long_name": "RMSE", "units": "1"}),
             "u_background": (("time", "y", "x"), np.zeros((2, 4, 5)), {"units": "m s-1"})}
    ds = io.state_dataset(ens, [0, 1], grid, VARS[:1], time_unit_seconds=1.0,
                          attrs={"flag": True, "none": None}, extra=extra)
    back = io.read_dataset(io.write_netcdf_atomic(ds, tmp_path / "a.nc"))
    np.testing.assert_array_equal(back["rmse_analysis"].values, [0.5, np.nan])
    assert back["u_background"].dims == ("time", "y", "x")
    assert back.attrs["flag"] == 1 and "none" not in back.attrs
    assert back["model_time"].attrs["units"] == "s"


def test_state_validates_shapes_and_names():
    grid = _grid((4,))
    with pytest.raises(ValueError, match="expected"):
        io.state_dataset(np.zeros((2, 3, 1, 5)), [0, 1], grid, VARS[:1], time_unit_seconds=1, attrs={})
    with pytest.raises(ValueError, match="clash"):
        io.state_dataset(np.zeros((2, 3, 1, 4)), [0, 1], grid, [io.VariableInfo("x", "1", None, "x")],
                         time_unit_seconds=1, attrs={})
    with pytest.raises(ValueError, match="members"):
        io.state_dataset(np.zeros((2, 3, 1, 4)), [0, 1], grid, VARS[:1], time_unit_seconds=1, members="some")


# --------------------------------------------------------------------------------------- atomicity
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_unencodable_leaves_nothing(tmp_path):
    ds = xr.Dataset({"bad": ("n", np.array([object(), {"a": 1}], dtype=object))})
    with pytest.raises(Exception):
        io.write_netcdf_atomic(ds, tmp_path / "out.nc")
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.nc"
    io.write_netcdf_atomic(xr.Dataset({"a": ("n", np.arange(3.0))}), path)
    before = path.read_bytes()

    def partial_then_fail(self, target, *args, **kwargs):
        Path(target).write_bytes(b"CDF\x01partial")
        raise RuntimeError("disk full")

    with mock.patch.object(xr.Dataset, "to_netcdf", partial_then_fail), pytest.raises(RuntimeError):
        io.write_netcdf_atomic(xr.Dataset({"a": ("n", np.arange(5.0))}), path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == ["out.nc"]


def test_atomic_write_interrupt_leaves_no_file(tmp_path):
    with mock.patch.object(xr.Dataset, "to_netcdf", side_effect=KeyboardInterrupt), \
            pytest.raises(KeyboardInterrupt):
        io.write_netcdf_atomic(xr.Dataset({"a": ("n", np.arange(3.0))}), tmp_path / "sub" / "out.nc")
    assert _leftovers(tmp_path / "sub") == []


# --------------------------------------------------------------------------------------- restarts
@settings(max_examples=15, deadline=None)
@given(shape=shapes, n_mem=st.integers(1, 4), n_var=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "float64"]), model_time=st.floats(0, 1e6, allow_nan=False),
       cycle=st.integers(0, 10**6))
def test_restart_round_trip(shape, n_mem, n_var, dtype, model_time, cycle):
    grid = _grid(shape)
    ens = _ens(np.random.default_rng(cycle), (n_mem, n_var, *shape), dtype)
    yaml = "name: demo\nmodel: {kind: lorenz96, size: 40}\n# ünïcode\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "restart.nc"
        io.write_restart(path, ens, model_time, cycle, grid, VARS[:n_var], case_name="demo", config_yaml=yaml,
                         version="0.1.0")
        r = io.read_restart(path, grid, VARS[:n_var], version="0.3.1")
    np.testing.assert_array_equal(r.ens, ens)
    assert r.ens.dtype == np.dtype(dtype)
    assert (r.model_time, r.cycle, r.case_name, r.config_yaml) == (model_time, cycle, "demo", yaml)


@pytest.fixture
def restart_file(tmp_path) -> Path:
    path = tmp_path / "restart.nc"
    ens = np.random.default_rng(0).standard_normal((4, 2, 6, 8))
    io.write_restart(path, ens, 2.5, 7, _grid((6, 8)), VARS[:2], case_name="c", config_yaml="a: 1\n",
                     version="0.1.0")
    return path


def _restart_error(path: Path, **kwargs) -> str:
    with pytest.raises(io.RestartError) as info:
        io.read_restart(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    return msg


def test_restart_truncated(restart_file, tmp_path):
    data = restart_file.read_bytes()
    for n in (0, 8, len(data) // 2, len(data) - 100):
        bad = tmp_path / f"trunc{n}.nc"
        bad.write_bytes(data[:n])
        _restart_error(bad)


def test_restart_garbage_missing_and_foreign(tmp_path):
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    _restart_error(garbage)
    text = tmp_path / "yaml.nc"
    text.write_text("name: not a netcdf file\n")
    _restart_error(text)
    assert "no such file" in _restart_error(tmp_path / "missing.nc")
    foreign = tmp_path / "foreign.nc"
    xr.Dataset({"a": ("n", np.arange(3.0))}).to_netcdf(foreign)
    assert "not an EarthTwin restart" in _restart_error(foreign)


def test_restart_mismatches(restart_file):
    assert "(6, 8)" in _restart_error(restart_file, grid=_grid((6, 9)))
    assert "variables" in _restart_error(restart_file, grid=_grid((6, 8)), variables=VARS[:1])
    assert "variables" in _restart_error(restart_file, variables=["theta", "u"])
    assert "incompatible" in _restart_error(restart_file, version="1.0.0")
    r = io.read_restart(restart_file, _grid((6, 8)), ["u", "theta"], version="0.9")
    assert r.ens.shape == (4, 2, 6, 8) and r.cycle == 7 and r.model_time == 2.5


def test_read_dataset_errors_name_the_path(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(io.DatasetError) as info:
        io.read_dataset(bad)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)
    with pytest.raises(OSError, match="no such file"):
        io.read_dataset(tmp_path / "nope.nc")


# ------------------------------------------------------------------------------------- observations
@pytest.mark.parametrize("shape", [(40,), (6, 8)])
def test_observations_dataset_is_dsg_point(tmp_path, shape):
    grid = _grid(shape)
    rng = np.random.default_rng(3)
    n = 11
    loc = rng.uniform(0, 5, (n, len(shape)))
    var = rng.integers(0, 2, n)
    vals = rng.standard_normal(n)
    ds = io.observations_dataset(np.repeat([0.0, 0.05], [5, 6]), loc, var, vals, 0.5, np.arange(100, 100 + n),
                                 grid, VARS[:2], time_unit_seconds=L96_UNIT, attrs={"case": "demo"},
                                 extra={"omb": (("obs",), vals - 1, {"long_name": "obs minus background"})})
    path = io.write_netcdf_atomic(ds, tmp_path / "observations.nc")
    back = io.read_dataset(path)
    assert back.attrs["featureType"] == "point" and back.attrs["Conventions"] == "CF-1.11"
    assert set(back.dims) == {"obs"} and back.sizes["obs"] == n
    np.testing.assert_array_equal(back["value"].values, vals)
    np.testing.assert_array_equal(back["error_std"].values, np.full(n, 0.5))
    np.testing.assert_array_equal(back["obs_id"].values, np.arange(100, 100 + n))
    np.testing.assert_array_equal(back["variable_index"].values, var)
    np.testing.assert_array_equal(back["omb"].values, vals - 1)
    assert back["variable_index"].attrs["flag_meanings"] == "u theta"
    np.testing.assert_array_equal(back["variable_index"].attrs["flag_values"], [0, 1])
    for a, dim in enumerate(grid.dims):
        assert back[dim].dims == ("obs",) and back[dim].attrs["axis"] == dim.upper()
        np.testing.assert_array_equal(back[dim].values, loc[:, a])
    hours = (back["time"].values - np.datetime64("2000-01-01")) / np.timedelta64(1, "h")
    np.testing.assert_allclose(hours, np.repeat([0.0, 6.0], [5, 6]))
    with netCDF4.Dataset(path) as nc:
        assert set(nc["value"].coordinates.split()) >= {"time", *grid.dims}
        assert nc.featureType == "point"


def test_observations_empty_and_bad_index(tmp_path):
    grid = _grid((10,))
    ds = io.observations_dataset(np.zeros(0), np.zeros((0, 1)), np.zeros(0, int), np.zeros(0), np.zeros(0),
                                 np.zeros(0, int), grid, VARS[:1], time_unit_seconds=1.0, attrs={})
    back = io.read_dataset(io.write_netcdf_atomic(ds, tmp_path / "o.nc"))
    assert back.sizes["obs"] == 0
    with pytest.raises(ValueError, match="variable index"):
        io.observations_dataset([0.0], [[1.0]], [3], [1.0], 1.0, [0], grid, VARS[:1], time_unit_seconds=1.0)
