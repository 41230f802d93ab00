"""Latitude-longitude grids in the twin: regional and curvilinear grids, masks that no stage reads or
writes, area-weighted metrics, and analyses that are continuous across the dateline and the poles."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings, strategies as st

from assim.blending import Blend
from assim.enkf import Enkf
from assim.ensf import Ensf
from assim.geo import CurvilinearGrid, GeoGrid, great_circle_km
from assim.letkf import Letkf
from assim.observations import ObservationBatch
from assim.points import PointsOperator, fractional_index, wrap_locations
from assim.stages import AnalysisContext
from twin.cli import main
from twin.domain import Grid, SerialDomain
from twin.random import Streams
from twin.record import RunRecorder, state_weights

from latlon_data import GLOBAL_LAT, LON_180, LON_360, case_dict, land_of, rotated_grid, run, write_field, write_stations

f64 = torch.float64
HYP = settings(max_examples=25, deadline=None)


# ------------------------------------------------------------ grids and the points operator

def test_regional_longitudes_are_taken_modulo_360():
    grid = GeoGrid((9, 17), (False, False), (2.5, 2.5), ("lat", "lon"), "km", (-10.0, -20.0))  # -20..20
    loc = torch.tensor([[0.0, 350.0], [0.0, -10.0], [0.0, 30.0], [0.0, 200.0], [5.0, 380.0]], dtype=f64)
    u, inside = fractional_index(grid, loc)
    assert inside.tolist() == [True, True, False, False, True]
    torch.testing.assert_close(u[0], u[1])
    torch.testing.assert_close(wrap_locations(grid, loc)[0][[0, 4]], torch.tensor([[0.0, -10.0], [5.0, 20.0]],
                                                                                     dtype=f64))


def test_polar_caps_of_a_global_grid_take_the_outer_rows():
    grid = GeoGrid.regular(18, 36, poles=False)  # rows at ±85 (cell centres): no pole row
    field = torch.randn(1, 1, *grid.shape, dtype=f64)
    op = PointsOperator(grid, torch.tensor([[89.0, 5.0], [-90.0, 15.0], [85.0, 5.0]], dtype=f64), 0)
    y = op(field)[0]
    torch.testing.assert_close(y[0], y[2])
    torch.testing.assert_close(y[1], field[0, 0, 0, 1] * 0.5 + field[0, 0, 0, 2] * 0.5)
    regional = GeoGrid((5, 8), (False, False), (1.0, 1.0), ("lat", "lon"), "km", (80.0, 0.0))
    assert not bool(fractional_index(regional, torch.tensor([[84.5, 3.0]], dtype=f64))[1][0])


@HYP
@given(st.integers(0, 2**31 - 1), st.integers(1, 30))
def test_the_operator_never_reads_masked_points(seed, n_obs):
    """Changing the values at masked points never changes H(x); locations with no valid corner are outside."""
    rng = np.random.default_rng(seed)
    mask = rng.random((13, 24)) > 0.4
    grid = dataclasses.replace(GeoGrid.regular(13, 24), mask=mask)
    loc = np.stack([rng.uniform(-90, 90, n_obs), rng.uniform(-180, 540, n_obs)], -1)
    inside = fractional_index(grid, torch.from_numpy(loc))[1].numpy()
    if not inside.any():
        return
    op = PointsOperator(grid, loc[inside], 0)
    x = torch.from_numpy(rng.standard_normal((2, 1, 13, 24)))
    garbage = x.clone()
    garbage[..., torch.from_numpy(~mask)] = 1e6
    torch.testing.assert_close(op(x), op(garbage), rtol=0, atol=1e-9)
    torch.testing.assert_close(op.weights.sum(0), torch.ones(op.size, dtype=f64))


def test_curvilinear_grid_locates_points_and_measures_km():
    lat, lon = rotated_grid(10, 14)
    grid = CurvilinearGrid.from_arrays(lat, lon)
    nodes = torch.from_numpy(np.stack([lat.ravel(), lon.ravel()], -1))
    u, inside = fractional_index(grid, nodes)
    assert bool(inside.all())
    expect = torch.from_numpy(np.stack(np.divmod(np.arange(lat.size), 14), -1).astype(float))
    torch.testing.assert_close(u, expect, rtol=0, atol=1e-7)
    mid = torch.tensor([[lat[3:5, 6:8].mean(), lon[3:5, 6:8].mean()], [0.0, 0.0]], dtype=f64)
    u, inside = fractional_index(grid, mid)
    assert inside.tolist() == [True, False] and torch.allclose(u[0], torch.tensor([3.5, 6.5], dtype=f64), atol=0.02)
    assert grid.resolution == pytest.approx(111.2, rel=0.02)  # 1 degree
    assert grid.lengths[0] == pytest.approx(9 * 111.2, rel=0.02)
    d = grid.distance(nodes[:1], nodes[1:2])
    assert float(d) == pytest.approx(float(great_circle_km(lat[0, 0], lon[0, 0], lat[0, 1], lon[0, 1])))
    assert grid == CurvilinearGrid.from_arrays(lat, lon) != CurvilinearGrid.from_arrays(lat + 1e-3, lon)


# ------------------------------------------------------------ area weights and masks in the metrics

def test_area_weights_change_the_rmse_as_expected():
    """An error confined to one latitude row weighs by that row's share of the sphere's area."""
    grid = GeoGrid.regular(19, 36)
    truth = torch.zeros(1, *grid.shape, dtype=f64)
    for row in (0, 9, 15):
        analysis = torch.zeros(4, 1, *grid.shape, dtype=f64)
        analysis[:, 0, row] = 2.0
        weighted = score(grid, analysis, truth)
        lat = math.radians(grid.axis_values(0)[row])
        half = math.radians(5.0)
        share = (math.sin(min(lat + half, math.pi / 2)) - math.sin(max(lat - half, -math.pi / 2))) / 2.0
        assert weighted == pytest.approx(2.0 * math.sqrt(share), rel=1e-12)
        plain = score(Grid(grid.shape, grid.periodic), analysis, truth)
        assert plain == pytest.approx(2.0 * math.sqrt(1 / 19), rel=1e-12)
    assert score(grid, torch.ones(4, 1, *grid.shape, dtype=f64), truth) == pytest.approx(1.0)  # weights sum to 1


def test_masked_points_are_left_out_of_every_metric():
    grid = GeoGrid.regular(19, 36)
    mask = np.ones(grid.shape, dtype=bool)
    mask[5:9, 3:20] = False
    masked = dataclasses.replace(grid, mask=mask)
    truth = torch.zeros(1, *grid.shape, dtype=f64)
    analysis = torch.randn(5, 1, *grid.shape, dtype=f64, generator=torch.Generator().manual_seed(0))
    garbage = analysis.clone()
    garbage[..., torch.from_numpy(~mask)] = 1e6
    rec = [recorder(masked, a, truth) for a in (analysis, garbage)]
    for key in ("rmse_analysis", "spread_analysis", "crps_analysis"):
        assert rec[0].summary()[key] == pytest.approx(rec[1].summary()[key], rel=1e-12)
    assert int(rec[0].rank_counts.sum()) == int(mask.sum())


def recorder(grid, analysis, truth) -> RunRecorder:
    weights, valid = state_weights(grid, 1)
    rec = RunRecorder(members=analysis.shape[0], weights=weights, valid=valid)
    rec.record(0, 0.0, analysis, analysis, truth, None)
    rec.flush()
    return rec


def score(grid, analysis, truth) -> float:
    return recorder(grid, analysis, truth).summary()["rmse_analysis"]


def test_index_grids_are_scored_as_before():
    grid = Grid((6, 8), (True, True))
    assert state_weights(grid, 2) == (None, None)
    ens = torch.randn(5, 2, 6, 8, dtype=f64, generator=torch.Generator().manual_seed(1))
    rec = RunRecorder(members=5)
    rec.record(0, 0.0, ens, ens, ens[0], None)
    from assim import metrics

    assert rec.series()["rmse_analysis"][0] == float(metrics.rmse(ens.mean(0).reshape(-1), ens[0].reshape(-1)))


# ------------------------------------------------------------ masks in the stages

OCEAN = dataclasses.replace(GeoGrid.regular(19, 36, lon0=-180.0),
                            mask=~((GeoGrid.regular(19, 36).axis_values(0)[:, None] > 15)
                                   & (np.abs(np.arange(36) * 10.0 - 180.0)[None] < 45)))


def stage_input(grid: GeoGrid, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ens = 2.0 + torch.randn(8, 1, *grid.shape, dtype=f64, generator=gen)
    ens = torch.where(grid.mask_tensor(), ens, torch.zeros((), dtype=f64))
    loc = torch.tensor([[0.0, 0.0], [-30.0, 100.0], [40.0, -100.0], [70.0, 170.0]], dtype=f64)
    op = PointsOperator(grid, loc, 0)
    obs = ObservationBatch(0.0, torch.tensor([3.0, 1.0, 2.5, 0.0], dtype=f64), torch.full((4,), 0.3, dtype=f64),
                           torch.arange(4), op)
    ctx = AnalysisContext(grid, SerialDomain(grid), Streams(4), 0)
    return ens, obs, ctx


STAGES = {"letkf": lambda: Letkf(Letkf.Config(localization_radius=1500.0)), "enkf": lambda: Enkf(Enkf.Config()),
          "ensf": lambda: Ensf(Ensf.Config(steps=30, start="kernel")), "blend": lambda: Blend(Blend.Config())}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_stages_leave_masked_points_alone_and_never_read_them(method):
    ens, obs, ctx = stage_input(OCEAN)
    land = torch.from_numpy(~OCEAN.mask)
    out = STAGES[method]()(ens, obs, ctx)
    assert torch.isfinite(out).all() and torch.equal(out[..., land], ens[..., land])
    assert float((out - ens)[..., ~land].abs().max()) > 1e-3  # the sea did get increments
    garbage = ens.clone()
    garbage[..., land] = 1e6
    again = STAGES[method]()(garbage, obs, ctx)
    torch.testing.assert_close(again[..., ~land], out[..., ~land], rtol=0, atol=1e-9)
    assert torch.equal(again[..., land], garbage[..., land])


def test_masked_ocean_twin_writes_nan_on_land_only(tmp_path):
    """EnSF, LETKF and blending through the twin on a land-masked grid: no NaN at sea, NaN on land
    (analysis, background mean and spread, restart), land stations rejected."""
    lsm = xr.Variable(("lat", "lon"), land_of(GLOBAL_LAT, LON_360).astype(np.int8), {"long_name": "land fraction"})
    path = write_field(tmp_path / "sst.nc", GLOBAL_LAT, LON_360, np.full((len(GLOBAL_LAT), len(LON_360)), 288.0),
                       extra={"lsm": lsm})
    obs = write_stations(tmp_path / "obs.csv", [(0.0, 179.5, 290.0), (-30.0, 60.0, 287.0), (45.0, 10.0, 280.0)], 3)
    land = land_of(GLOBAL_LAT, LON_180)  # the twin's longitudes run from -180
    stages = {"ensf": {"method": "ensf", "steps": 30, "start": "kernel"},
              "letkf": {"method": "letkf", "localization_radius": 1500.0}, "blend": {"method": "blend"}}
    for method, stage in stages.items():
        initial = {"path": str(path), "variables": ["sst"], "spread": 0.8, "mask_variable": "lsm", "mask_valid": "zero"}
        ds, summary = run(tmp_path, case_dict(initial, obs, [stage], output={"figures": method == "blend"}), method)
        for name in ("sst", "sst_background_mean", "sst_background_spread"):
            values = ds[name].values
            assert np.isnan(values[..., land]).all() and np.isfinite(values[..., ~land]).all(), (method, name)
        restart = xr.open_dataset(tmp_path / f"out_{method}" / "restart.nc")["sst"].values
        assert np.isnan(restart[..., land]).all() and np.isfinite(restart[..., ~land]).all()
        assert summary["obs_rejected"]["out_of_domain"] == 3 and summary["obs_used"] == 6
        increment = ds["sst"].values[0].mean(0) - ds["sst_background_mean"].values[0]
        assert np.nanmax(np.abs(increment)) > 0.1, method


# ------------------------------------------------------------ continuity across the dateline and the poles

LAT5, LON5 = np.arange(-90.0, 90.1, 5.0), np.arange(0.0, 360.0, 5.0)
STATIONS = [(40.0, 179.0, 283.0), (-20.0, 180.0, 277.0), (90.0, 0.0, 284.0), (-86.0, 123.0, 276.0)]


def continuity_run(tmp_path, stage: dict, tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Increments of the analysis mean of a constant field whose members differ by a constant
    (members_from: times), so every increment is a smooth function of the station distances."""
    members = np.stack([np.full((len(LAT5), len(LON5)), 280.0 + k - 2.5) for k in range(6)])
    path = write_field(tmp_path / "const.nc", LAT5, LON5, members)
    obs = write_stations(tmp_path / "obs.csv", STATIONS, cycles=1)
    initial = {"path": str(path), "variables": ["sst"], "members_from": "times"}
    ds, _ = run(tmp_path, case_dict(initial, obs, [stage], cycles=1), tag)
    inc = ds["sst"].values[0].mean(0) - ds["sst_background_mean"].values[0]
    return inc, ds["lat"].values, ds["lon"].values


@pytest.mark.parametrize("stage", [{"method": "blend", "r_max": 500.0, "r_min": 100.0},
                                   {"method": "letkf", "localization_radius": 400.0}], ids=["blend", "letkf"])
def test_increments_are_continuous_across_the_dateline_and_the_poles(tmp_path, stage):
    inc, lat, lon = continuity_run(tmp_path, stage, stage["method"])
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    # the station on the dateline: the increments around it are mirror images about 180 degrees
    rows = np.abs(lat + 20.0) <= 15.0  # farther away the other stations' Gaussian tails show (blend)
    for offset in (5.0, 10.0):
        west, east = inc[rows, lon == 180.0 - offset], inc[rows, lon == -180.0 + offset]
        np.testing.assert_allclose(west, east, rtol=0, atol=1e-6)
        assert np.abs(west).max() > 0.1
    # the station on the pole: every ring of latitude around it gets one increment
    for row in (-1, -2, -3):
        np.testing.assert_allclose(inc[row], inc[row, 0], rtol=1e-9, atol=1e-12)
    assert abs(inc[-2, 0]) > 0.1
    # near the dateline (179E) and near the south pole: the increment decreases with the great-circle
    # distance, and reaches across the seam (to the east) and over the pole (the far side)
    for (s_lat, s_lon, *_), across in ((STATIONS[0], lo < 0), (STATIONS[3], np.abs((lo - 123.0 + 180.0) % 360.0 - 180.0) > 90)):
        d = great_circle_km(torch.from_numpy(la), torch.from_numpy(lo), s_lat, s_lon).numpy()
        near = d < 1500.0
        size = np.abs(inc[near])[np.argsort(d[near])]
        assert (np.diff(size) <= 1e-9).all()
        assert np.abs(inc[near & across]).max() > 0.05


# ------------------------------------------------------------ curvilinear grids through the twin

def test_curvilinear_file_runs_and_writes_two_dimensional_coordinates(tmp_path):
    lat, lon = rotated_grid(14, 18)
    values = 280.0 + (lat - 50.0) / 5.0
    values[:3, :4] = np.nan  # missing data: masked
    ds = xr.Dataset({"t2m": (("time", "nj", "ni"), values[None], {"units": "K", "coordinates": "la lo"})},
                    coords={"time": ("time", [0.0], {"units": "hours since 2000-01-01", "standard_name": "time"}),
                            "la": (("nj", "ni"), lat, {"standard_name": "latitude", "units": "degrees_north"}),
                            "lo": (("nj", "ni"), lon, {"standard_name": "longitude", "units": "degrees_east"})})
    ds.to_netcdf(tmp_path / "curv.nc", encoding={"t2m": {"_FillValue": 1e20}})
    obs = write_stations(tmp_path / "obs.csv", [(50.0, 10.0, 282.0), (53.0, 14.0, 281.0), (20.0, 10.0, 0.0)],
                         3, variable="t2m")
    stages = [{"method": "blend"}, {"method": "letkf", "localization_radius": 200.0}]
    out, summary = run(tmp_path, case_dict({"path": str(tmp_path / "curv.nc"), "variables": ["t2m"], "spread": 0.5},
                                           obs, stages), "curv")
    assert out["t2m"].dims == ("time", "member", "y", "x")
    assert out["lat"].dims == ("y", "x") and out["lat"].attrs["standard_name"] == "latitude"
    np.testing.assert_allclose(out["lon"].values, lon)
    a = out["t2m"].values
    assert np.isnan(a[..., :3, :4]).all() and np.isfinite(a[..., 3:, :]).all()
    assert summary["obs_used"] == 6 and summary["obs_rejected"]["out_of_domain"] == 3
    assert np.nanmax(np.abs(a[0].mean(0) - out["t2m_background_mean"].values[0])) > 0.1
    written = xr.open_dataset(tmp_path / "out_curv" / "observations.nc")
    assert set(written["lat"].attrs.items()) >= {("standard_name", "latitude"), ("units", "degrees_north")}


def test_example_case_runs_in_seconds(tmp_path):
    root = Path(__file__).parents[1]
    data = root / "cases" / "data"
    out = tmp_path / "example"
    args = ["run", str(root / "cases" / "latlon_blend_synthetic.yaml"), "--out", str(out), "--quiet",
            "--set", f"initial.path={data / 'latlon_sst.nc'}", "--set", f"observations.path={data / 'latlon_stations.csv'}",
            "--set", "output.figures=false"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "blend+letkf" and summary["rmse_analysis"] is None
    assert summary["obs_used"] == 40 and summary["oma_rms"] < summary["omb_rms"]
