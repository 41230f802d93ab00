"""The initial state from a CF netCDF file (`initial:`): axes from CF attributes, one internal
convention for latitude order and longitude range, units, masks, members, truth-free runs and the
climatology model."""
import dataclasses
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from assim.geo import CurvilinearGrid, GeoGrid
from twin import Twin
from twin.cli import main
from twin.config import ConfigError, InitialConfig, load_case, parse_dataclass
from twin.initial import load_initial
from twin.random import Streams

from latlon_data import (GLOBAL_LAT, LAT, LON, LON_180, LON_360, land_of, rotated_grid, run, sst_of, write_field,
                         write_stations, case_dict)

# ------------------------------------------------------------ axes from CF attributes

STYLES = {"standard_name": (LAT, LON),
          "units": ({"units": "degrees_north"}, {"units": "degrees_east"}),
          "axis": ({"axis": "Y", "units": "degrees"}, {"axis": "X", "units": "degrees"})}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(STYLES)), st.sampled_from(["lat", "y_coord", "nav_a", "latitude"]),
       st.sampled_from(["lon", "x_coord", "nav_b", "longitude"]), st.booleans(), st.booleans(), st.booleans())
def test_axes_are_found_from_cf_attributes_in_any_layout(style, lat_name, lon_name, descending, east_west, transpose):
    """Renamed coordinates, descending latitudes, 0..360 or -180..180, (lon, lat) order: one grid, one field."""
    lon = LON_180 if east_west else LON_360
    lat = GLOBAL_LAT[::-1] if descending else GLOBAL_LAT
    lat_attrs, lon_attrs = STYLES[style]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_field(Path(tmp) / "f.nc", lat, lon, sst_of(lat, lon), lat_name=lat_name, lon_name=lon_name,
                           lat_attrs=lat_attrs, lon_attrs=lon_attrs, transpose=transpose)
        data = load_initial(load_initial_cfg(path), 4, 1.0, "test")
    assert data.grid == GeoGrid.regular(len(GLOBAL_LAT), 36, lon0=-180.0)
    assert data.grid.periodic == (False, True) and data.grid.mask is None
    assert data.variables[0].units == "K"
    np.testing.assert_array_equal(data.field[0], sst_of(GLOBAL_LAT, LON_180))


def load_initial_cfg(path: Path, **keys) -> InitialConfig:
    """The `initial:` section, strictly parsed (the file is read by the test)."""
    return parse_dataclass(InitialConfig, {"path": str(path), "variables": ["sst"], **keys}, "initial", "test")


def test_regional_and_seam_duplicated_grids(tmp_path):
    """A regional grid across the dateline in either convention; a global grid with a repeated seam column."""
    lat = np.arange(-10.0, 10.1, 2.5)
    a = load_initial(load_initial_cfg(write_field(tmp_path / "a.nc", lat, np.arange(170.0, 200.1, 2.5),
                                                  sst_of(lat, np.arange(170.0, 200.1, 2.5)))), 4, 1.0, "t")
    lon_b = np.concatenate([np.arange(170.0, 180.0, 2.5), np.arange(-180.0, -159.9, 2.5)])
    b = load_initial(load_initial_cfg(write_field(tmp_path / "b.nc", lat, lon_b, sst_of(lat, lon_b))), 4, 1.0, "t")
    assert a.grid == b.grid and a.grid.periodic == (False, False) and a.grid.origin == (-10.0, 170.0)
    np.testing.assert_allclose(a.field, b.field, rtol=0, atol=1e-12)
    seam = np.arange(0.0, 360.1, 10.0)  # 0 and 360 both present
    c = load_initial(load_initial_cfg(write_field(tmp_path / "c.nc", GLOBAL_LAT, seam, sst_of(GLOBAL_LAT, seam))),
                     4, 1.0, "t")
    assert c.grid.shape == (len(GLOBAL_LAT), 36) and c.grid.periodic == (False, True)


def test_two_dimensional_coordinates_give_a_curvilinear_grid(tmp_path):
    lat2, lon2 = rotated_grid(12, 16)
    ds = xr.Dataset({"t2m": (("nj", "ni"), 280.0 + lat2 / 10, {"units": "K", "coordinates": "nav_lat nav_lon"})},
                    coords={"nav_lat": (("nj", "ni"), lat2, LAT), "nav_lon": (("nj", "ni"), lon2 + 360.0, LON)})
    ds.to_netcdf(tmp_path / "c.nc")
    data = load_initial(load_initial_cfg(tmp_path / "c.nc", variables=["t2m"]), 4, 1.0, "t")
    assert isinstance(data.grid, CurvilinearGrid) and data.grid.shape == (12, 16)
    np.testing.assert_allclose(data.grid.lat, lat2)
    np.testing.assert_allclose(data.grid.lon, (lon2 + 180.0) % 360.0 - 180.0, atol=1e-9)


# ------------------------------------------------------------ the convention does not change the analysis

def test_0_360_and_descending_input_give_identical_analyses(tmp_path):
    """The same field as 0..360 ascending (lat, lon) and as -180..180 descending (lon, lat) with renamed
    axes: a short blend+letkf+ensf run on each writes identical analyses."""
    land360 = land_of(GLOBAL_LAT, LON_360)
    field360 = np.where(land360, np.nan, sst_of(GLOBAL_LAT, LON_360))
    a = write_field(tmp_path / "a.nc", GLOBAL_LAT, LON_360, field360)
    lat_d = GLOBAL_LAT[::-1]
    field180 = np.where(land_of(lat_d, LON_180), np.nan, sst_of(lat_d, LON_180))
    b = write_field(tmp_path / "b.nc", lat_d, LON_180, field180, lat_name="y_coord", lon_name="x_coord",
                    transpose=True)
    obs = write_stations(tmp_path / "obs.csv", [(0.0, 179.0, 291.0), (-40.0, 200.0, 290.0), (85.0, -120.0, 280.0),
                                                (30.0, 10.0, 280.0)], cycles=3)  # the last one is on land
    stages = [{"method": "blend", "r_max": 1500.0}, {"method": "letkf", "localization_radius": 800.0},
              {"method": "ensf", "steps": 20, "start": "kernel"}]
    runs = [run(tmp_path, case_dict({"path": str(p), "variables": ["sst"], "spread": 0.5}, obs, stages), tag)
            for p, tag in ((a, "a"), (b, "b"))]
    (da, sa), (db, sb) = runs
    np.testing.assert_array_equal(da["sst"].values, db["sst"].values)
    np.testing.assert_array_equal(da["lon"].values, db["lon"].values)
    assert da["lon"].values[0] == -180.0 and (np.diff(da["lat"].values) > 0).all()
    assert sa["obs_used"] == sb["obs_used"] == 9 and sa["obs_rejected"]["out_of_domain"] == 3
    assert sa["rmse_analysis"] is None and sa["crps_analysis"] is None and sa["spread_analysis"] > 0


# ------------------------------------------------------------ units, masks, members

def test_units_are_converted_where_declared(tmp_path):
    lat, lon = GLOBAL_LAT, LON_360
    ds_path = write_field(tmp_path / "c.nc", lat, lon, sst_of(lat, lon) - 273.15, units="degC",
                          extra={"psl": (("time", "lat", "lon"), np.full((1, len(lat), len(lon)), 101325.0),
                                         {"units": "Pa"})})
    data = load_initial(load_initial_cfg(ds_path, variables=["sst", "psl"], units=["K", "hPa"]), 4, 1.0, "t")
    np.testing.assert_allclose(data.field[0], sst_of(lat, LON_180), atol=1e-9)
    np.testing.assert_allclose(data.field[1], 1013.25)
    assert [v.units for v in data.variables] == ["K", "hPa"]
    with pytest.raises(ConfigError, match=r"initial\.units\.1: .*psl.*'Pa' to 'm'"):
        load_initial(load_initial_cfg(ds_path, variables=["sst", "psl"], units=["K", "m"]), 4, 1.0, "t")


def test_mask_from_fill_values_and_from_a_mask_variable(tmp_path):
    lat, lon = GLOBAL_LAT, LON_360
    land = land_of(lat, lon)
    lsm = xr.Variable(("lat", "lon"), land.astype(np.int8), {"long_name": "land-sea mask (1 = land)"})
    by_fill = write_field(tmp_path / "f.nc", lat, lon, np.where(land, np.nan, sst_of(lat, lon)))
    by_var = write_field(tmp_path / "v.nc", lat, lon, sst_of(lat, lon), extra={"lsm": lsm})
    a = load_initial(load_initial_cfg(by_fill), 4, 1.0, "t")
    b = load_initial(load_initial_cfg(by_var, mask_variable="lsm", mask_valid="zero"), 4, 1.0, "t")
    sea = ~land_of(lat, LON_180)
    np.testing.assert_array_equal(a.grid.mask, sea)
    assert a.grid == b.grid  # equal masks: equal grids
    assert a.grid != dataclasses.replace(a.grid, mask=None)
    assert (a.field[0][~sea] == 0).all() and np.isfinite(a.field).all()
    ens = a.ensemble(Streams(3), FakeBlock(a.grid, (slice(None), slice(None))), 5, torch.float64)
    assert (ens[:, :, torch.from_numpy(~sea)] == 0).all()


class FakeBlock:
    """The piece of a decomposition the initial ensemble uses: one block of the global grid."""

    def __init__(self, grid, slices):
        self.grid, self.local_slices = grid, slices
        idx = np.arange(grid.size).reshape(grid.shape)[slices]
        self.local_shape, self._flat = idx.shape, torch.from_numpy(idx.reshape(-1))

    def local_flat_indices(self):
        return self._flat


def test_members_are_keyed_by_global_index_not_by_rank(tmp_path):
    data = load_initial(load_initial_cfg(write_field(tmp_path / "f.nc", GLOBAL_LAT, LON_360,
                                                     sst_of(GLOBAL_LAT, LON_360)), spread=[0.7]), 5, 1.0, "t")
    whole = data.ensemble(Streams(11), FakeBlock(data.grid, (slice(None), slice(None))), 5, torch.float64)
    block = (slice(3, 11), slice(20, 31))
    part = data.ensemble(Streams(11), FakeBlock(data.grid, block), 5, torch.float64)
    torch.testing.assert_close(part, whole[(slice(None), slice(None), *block)], rtol=0, atol=0)
    assert float((whole - torch.from_numpy(data.field)).std()) == pytest.approx(0.7, rel=0.05)


def test_members_from_times_and_from_files(tmp_path):
    lat, lon = GLOBAL_LAT, LON_360
    base = sst_of(lat, lon)
    stack = np.stack([base + k for k in range(6)])
    path = write_field(tmp_path / "t.nc", lat, lon, stack)
    data = load_initial(load_initial_cfg(path, members_from="times", time="2000-01-01T06:00"), 4, 1.0, "t")
    assert data.fields.shape == (4, 1, len(lat), 36) and data.spread == (0.0,)
    np.testing.assert_allclose(data.fields[:, 0].mean((1, 2)) - data.fields[0, 0].mean(), [0, 1, 2, 3], atol=1e-9)
    assert data.fields[0, 0, 0, 0] == pytest.approx(sst_of(lat, LON_180)[0, 0] + 1)  # from 06:00 on
    files = [str(write_field(tmp_path / f"m{k}.nc", lat, lon, base + 2 * k)) for k in range(3)]
    data = load_initial(load_initial_cfg(path, members_from=files), 3, 1.0, "t")
    np.testing.assert_allclose(data.fields[:, 0].mean((1, 2)) - data.fields[0, 0].mean(), [0, 2, 4], atol=1e-9)
    with pytest.raises(ConfigError, match=r"initial\.members_from: .*fewer than the 6 members"):
        load_initial(load_initial_cfg(path, members_from="times", time="2000-01-01T06:00"), 6, 1.0, "t")


# ------------------------------------------------------------ bad files and keys: one line, exit 2

def bad_cases(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    good = write_field(tmp_path / "good.nc", GLOBAL_LAT, LON_360, sst_of(GLOBAL_LAT, LON_360))
    nolatlon = tmp_path / "nolatlon.nc"
    xr.Dataset({"sst": (("a", "b", "c"), np.zeros((2, 3, 4)))}).to_netcdf(nolatlon)
    (tmp_path / "garbage.nc").write_text("CDF\x01 not a netCDF file")
    obs = str(write_stations(tmp_path / "obs.csv", [(0.0, 0.0, 1.0)], 1))
    init = {"path": str(good), "variables": ["sst"]}
    return {
        "missing file": ({"initial": {**init, "path": str(tmp_path / "nope.nc")}}, "initial.path: .*no such file"),
        "garbage": ({"initial": {**init, "path": str(tmp_path / "garbage.nc")}}, "initial.path: .*not a readable"),
        "no variable": ({"initial": {**init, "variables": ["tos"]}}, "initial.variables.0: .*no data variable 'tos'"),
        "no lat/lon": ({"initial": {**init, "path": str(nolatlon)}}, "initial.variables.0: .*latitude"),
        "bad time": ({"initial": {**init, "time": "2001-05-01"}}, "initial.time: .*no field at 2001-05-01"),
        "bad units": ({"initial": {**init, "units": ["hPa"]}}, r"initial.units.0: .*cannot convert units 'K' to 'hPa'"),
        "unknown key": ({"initial": {**init, "sprad": 1.0}}, "initial.sprad: unknown key"),
        "members": ({"initial": {**init, "members_from": ["a.nc"]}}, "initial.members_from: lists 1 files"),
        "no spread": ({"initial": {**init, "spread": 0.0}}, "initial.spread: all members would be equal"),
        "own grid": ({"initial": init, "model": {"kind": "lorenz96"}}, "initial: model kind 'lorenz96' runs on its own"),
        "no obs": ({"initial": init, "observations": {}}, "observations.path: needed with `initial:`"),
        "climatology": ({"model": {"kind": "climatology"}, "observations": {"path": obs}}, "model: climatology runs on"),
    }


def test_bad_initial_sections_exit_2_with_one_line(tmp_path, capsys):
    for what, (change, message) in bad_cases(tmp_path).items():
        case = {"name": "bad", "model": {"kind": "persistence"}, "observations": {"path": "obs.csv"}, **change}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(case))
        assert main(["validate", str(path)]) == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (what, err)
        assert str(path) in err and re.search(message, err), (what, err)


# ------------------------------------------------------------ models on the data grid, no truth

def twin_on(tmp_path: Path, model: dict, stages: list[dict] = ()) -> Twin:
    path = write_field(tmp_path / "f.nc", GLOBAL_LAT, LON_360,
                       np.where(land_of(GLOBAL_LAT, LON_360), np.nan, sst_of(GLOBAL_LAT, LON_360)))
    obs = write_stations(tmp_path / "obs.csv", [(0.0, 0.0, 290.0)], cycles=4)
    case = case_dict({"path": str(path), "variables": ["sst"], "spread": 1.0}, obs, list(stages), model=model)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(case))
    return Twin(load_case(tmp_path / "c.yaml"))


def test_climatology_resets_or_relaxes_to_its_mean(tmp_path):
    reset = twin_on(tmp_path, {"kind": "climatology", "dt": 3600.0})
    assert reset.truth is None and reset.nature is None
    field = torch.from_numpy(reset.initial.field)
    assert not torch.equal(reset.ensemble[0], field)
    reset.forecast()
    torch.testing.assert_close(reset.ensemble, field.expand_as(reset.ensemble), rtol=0, atol=0)
    clim = write_field(tmp_path / "clim.nc", GLOBAL_LAT, LON_360, np.stack([sst_of(GLOBAL_LAT, LON_360) + d
                                                                            for d in (-2.0, 0.0, 8.0)]))
    relax = twin_on(tmp_path, {"kind": "climatology", "path": str(clim), "timescale": 7200.0, "dt": 3600.0})
    before = relax.ensemble.clone()
    relax.step()  # no stages; observations.every = 1: one model step of 3600 s
    c = torch.from_numpy(np.where(relax.grid.mask, sst_of(GLOBAL_LAT, LON_180) + 2.0, 0.0))  # the time mean
    torch.testing.assert_close(relax.ensemble, c + (before - c) * np.exp(-3600.0 / 7200.0), rtol=1e-12, atol=1e-9)


def test_truth_free_run_has_null_truth_metrics_and_no_truth_file(tmp_path):
    path = write_field(tmp_path / "f.nc", GLOBAL_LAT, LON_360, sst_of(GLOBAL_LAT, LON_360))
    obs = write_stations(tmp_path / "obs.csv", [(10.0, 20.0, 290.0), (-10.0, 200.0, 290.0)], cycles=3)
    ds, summary = run(tmp_path, case_dict({"path": str(path), "variables": ["sst"]}, obs,
                                          [{"method": "letkf", "localization_radius": 1000.0}]), "free")
    for key in ("rmse_analysis", "rmse_forecast", "crps_analysis"):
        assert summary[key] is None
    assert summary["spread_analysis"] > 0 and summary["omb_rms"] is not None
    assert not (tmp_path / "out_free" / "truth.nc").exists() and "rank_histogram" not in ds
    assert ds["lat"].attrs["standard_name"] == "latitude" and ds["lon"].attrs["units"] == "degrees_east"
