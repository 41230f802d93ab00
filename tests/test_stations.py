"""Station observations (CSV and CF DSG timeSeries with ids, altitudes, errors): stations.nc with
O-B and O-A per station and cycle, the summary.json `stations` block, withheld stations (verified,
never assimilated), QC rejections per station, time windows, resume, and stations.png."""
import json

import numpy as np
import pytest
import xarray as xr
import yaml
from latlon_data import GLOBAL_LAT, LON_360, sst_of, write_field

from assim.obsfiles import ObservationFileError, read_observations
from assim.geo import GeoGrid
from twin.cli import main

# (id, lat, lon, altitude m): on grid points of GLOBAL_LAT x LON_360, so H(x) is the grid value there
STATIONS = [("S0", 15.0, 40.0, 120.0), ("S1", 22.5, 50.0, 5.0), ("S2", -30.0, 100.0, 800.0),
            ("S3", 45.0, 200.0, 0.0), ("S4", -7.5, 300.0, 1500.0), ("S5", 60.0, 350.0, 30.0)]
HOURS = 6.0


def field_file(tmp_path):
    return write_field(tmp_path / "field.nc", GLOBAL_LAT, LON_360, sst_of(GLOBAL_LAT, LON_360))


def station_value(lat: float, lon: float, cycle: int) -> float:
    return float(sst_of(np.array([lat]), np.array([lon]))[0, 0]) + 1.0 + 0.2 * cycle


def write_csv(path, stations=STATIONS, cycles=3, extra_rows=()):
    rows = ["station,time,lat,lon,variable,value,error,altitude"]
    for c in range(cycles):
        t = np.datetime64("2000-01-01T00:00") + np.timedelta64(int(c * HOURS * 60), "m")
        rows += [f"{s},{t},{la},{lo},sst,{station_value(la, lo, c):.4f},0.4,{h}" for s, la, lo, h in stations]
    path.write_text("\n".join(rows + list(extra_rows)) + "\n")
    return path


def run_case(tmp_path, tag, obs: dict, cycles=3, figures=False, **extra):
    case = {"name": "stations", "model": {"kind": "persistence", "dt": HOURS * 3600.0},
            "initial": {"path": str(field_file(tmp_path)), "variables": ["sst"], "spread": 0.5},
            "observations": {"error_std": 0.4, **obs}, "ensemble": {"size": 6, "seed": 5},
            "assimilation": {"stages": [{"method": "letkf", "localization_radius": 1500.0}]},
            "run": {"cycles": cycles}, "output": {"figures": figures}, **extra}
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(case))
    out = tmp_path / f"out_{tag}"
    rc = main(["run", str(path), "--out", str(out), "--quiet"])
    return rc, out


def test_csv_stations_withheld_are_verified_not_assimilated(tmp_path):
    csv = write_csv(tmp_path / "st.csv")
    rc, out = run_case(tmp_path, "held", {"path": str(csv), "withhold": ["S1", "S4"]}, figures=True)
    assert rc == 0
    st = xr.open_dataset(out / "stations.nc")
    ana = xr.open_dataset(out / "analysis.nc")
    summary = json.loads((out / "summary.json").read_text())
    assert st.attrs["featureType"] == "timeSeries" and st["station_id"].attrs["cf_role"] == "timeseries_id"
    assert st["station_id"].values.tolist() == [s[0] for s in STATIONS]
    assert st["altitude"].values.tolist() == [s[3] for s in STATIONS]
    assert st["lat"].values.tolist() == [s[1] for s in STATIONS] and st.sizes == {"station": 6, "obs": 18}
    assert st["withheld"].values.tolist() == [0, 1, 0, 0, 1, 0]
    held = np.isin(st["station_index"].values, [1, 4])
    assert (st["status"].values == np.where(held, 1, 0)).all()
    # background and analysis: the means of analysis.nc at the stations' grid points
    for k in range(st.sizes["obs"]):
        _, la, lo, _ = STATIONS[int(st["station_index"][k])]
        at = dict(time=int(st["cycle"][k]), lat=int(np.flatnonzero(ana["lat"].values == la)[0]),
                  lon=int(np.flatnonzero(ana["lon"].values % 360.0 == lo)[0]))
        assert float(st["background"][k]) == pytest.approx(float(ana["sst_background_mean"][at]), abs=1e-9)
        assert float(st["analysis"][k]) == pytest.approx(float(ana["sst"].mean("member")[at]), abs=1e-9)
    np.testing.assert_allclose(st["omb"], st["value"] - st["background"], atol=1e-12)
    np.testing.assert_allclose(st["oma"], st["value"] - st["analysis"], atol=1e-12)
    # per-station statistics and the summary block
    assert st["count"].values.tolist() == [3] * 6 and st["qc_rejected"].values.tolist() == [0] * 6
    s1 = st["station_index"].values == 1
    assert float(st["omb_rms"][1]) == pytest.approx(np.sqrt(np.mean(st["omb"].values[s1] ** 2)))
    block = summary["stations"]
    assert block["stations"] == 6 and block["withheld_stations"] == ["S1", "S4"]
    assert block["obs"] == 12 and block["withheld_obs"] == 6 and summary["obs_used"] == 12
    assert block["withheld_rmse_background"] == pytest.approx(np.sqrt(np.mean(st["omb"].values[held] ** 2)))
    assert block["withheld_rmse_analysis"] == pytest.approx(np.sqrt(np.mean(st["oma"].values[held] ** 2)))
    assert block["oma_rms"] == pytest.approx(np.sqrt(np.mean(st["oma"].values[~held] ** 2)))
    assert xr.open_dataset(out / "observations.nc").sizes["obs"] == 12
    assert (out / "figures" / "stations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # withheld means never assimilated: the same analysis as a file without those stations
    kept = write_csv(tmp_path / "kept.csv", [s for s in STATIONS if s[0] not in ("S1", "S4")])
    rc, out2 = run_case(tmp_path, "without", {"path": str(kept)})
    assert rc == 0
    np.testing.assert_array_equal(ana["sst"].values, xr.open_dataset(out2 / "analysis.nc")["sst"].values)
    # stations.nc is itself an observation file (CF DSG timeSeries, indexed ragged array)
    table = read_observations(out / "stations.nc", GeoGrid.regular(25, 36), ["sst"], time_unit_seconds=1.0)
    assert len(table) == 18 and sorted(set(table.station)) == [s[0] for s in STATIONS]
    assert sorted(set(table.height)) == sorted(s[3] for s in STATIONS)


def dsg_file(path, offsets_h, alt_units="km"):
    """timeSeries (station, time) with ids, altitudes and per-station errors at 6-hourly cycles + offsets."""
    times = np.array([c * HOURS + o for c in range(3) for o in offsets_h])
    values = np.array([[station_value(la, lo, int(t // HOURS)) for t in times] for _, la, lo, _ in STATIONS])
    alt = np.array([s[3] for s in STATIONS]) / (1000.0 if alt_units == "km" else 1.0)
    ds = xr.Dataset(
        {"sst": (("station", "time"), values, {"units": "K", "ancillary_variables": "sst_error"}),
         "sst_error": (("station",), np.linspace(0.3, 0.8, len(STATIONS)), {"units": "K"}),
         "lat": (("station",), [s[1] for s in STATIONS], {"standard_name": "latitude", "units": "degrees_north"}),
         "lon": (("station",), [s[2] for s in STATIONS], {"standard_name": "longitude", "units": "degrees_east"}),
         "alt": (("station",), alt, {"standard_name": "altitude", "units": alt_units, "positive": "up"}),
         "station_name": (("station",), [s[0] for s in STATIONS], {"cf_role": "timeseries_id"}),
         "time": (("time",), times, {"standard_name": "time", "units": "hours since 2000-01-01 00:00"})},
        attrs={"featureType": "timeSeries", "Conventions": "CF-1.11"})
    ds.to_netcdf(path)
    return path


def test_dsg_time_series_in_a_time_window_with_altitude_and_fraction_withheld(tmp_path):
    path = dsg_file(tmp_path / "ts.nc", offsets_h=(-0.5, 0.5, 2.0))  # +2 h lies outside a 1 h window
    obs = {"path": str(path), "time_window": 3600.0, "withhold": 0.5, "seed": 11}
    rc, out = run_case(tmp_path, "dsg", obs)
    assert rc == 0
    st = xr.open_dataset(out / "stations.nc")
    assert st.sizes["obs"] == 6 * 3 * 2  # the +-30 min observations of every station and cycle
    offset = st["model_time"].values - 21600.0 * st["cycle"].values  # observation times, not cycle times
    assert sorted(set(np.round(offset).tolist())) == [-1800.0, 1800.0]
    assert st["altitude"].values.tolist() == [s[3] for s in STATIONS]  # km -> m
    np.testing.assert_allclose(st["error_std"].values, np.linspace(0.3, 0.8, 6)[st["station_index"].values])
    assert int(st["withheld"].sum()) == 3
    block = json.loads((out / "summary.json").read_text())["stations"]
    assert len(block["withheld_stations"]) == 3 and block["withheld_obs"] == 18 and block["obs"] == 18
    rc, again = run_case(tmp_path, "dsg_again", obs)  # the seed fixes the draw
    assert json.loads((again / "summary.json").read_text())["stations"]["withheld_stations"] == \
        block["withheld_stations"]


def test_qc_rejections_are_counted_per_station(tmp_path):
    bad = ["S2,2000-01-01T06:00,-30.0,100.0,sst,290.0,-1.0,800.0",  # bad error (static screen)
           "S3,2000-01-01T12:00,45.0,200.0,sst,350.0,0.4,0.0"]  # a gross error against the background
    csv = tmp_path / "qc.csv"
    write_csv(csv, [s for s in STATIONS if s[0] != "S3"], extra_rows=bad)
    rc, out = run_case(tmp_path, "qc", {"path": str(csv), "gross_error_k": 4.0})
    assert rc == 0
    st = xr.open_dataset(out / "stations.nc")
    ids = st["station_id"].values.tolist()
    assert st["qc_rejected"].values.tolist() == [1 if s in ("S2", "S3") else 0 for s in ids]
    rejected = st["status"].values == 2
    assert rejected.sum() == 1 and st["cycle"].values[rejected].tolist() == [2]
    assert st["count"].values[ids.index("S3")] == 0  # its one observation was rejected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stations"]["qc_rejected"] == 2
    assert summary["obs_rejected"]["bad_error"] == 1 and summary["obs_rejected"]["gross_error"] == 1


@pytest.mark.parametrize("obs, key", [
    ({"withhold": ["S1", "nope"]}, "observations.withhold"),
    ({"withhold": 1.5}, "observations.withhold"),
    ({"withhold": ["S1"], "path": None}, "observations.withhold"),
])
def test_bad_withhold_exits_2_with_one_line(tmp_path, capsys, obs, key):
    csv = write_csv(tmp_path / "st.csv")
    obs = {"path": str(csv), **obs}
    if obs["path"] is None:
        obs.pop("path")
    rc, out = run_case(tmp_path, "bad", obs)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and key in err, err
    assert not out.exists()


def test_numeric_station_ids_can_be_withheld_unquoted(tmp_path):
    numbered = [(str(10001 + k), *s[1:]) for k, s in enumerate(STATIONS)]
    rc, out = run_case(tmp_path, "wmo", {"path": str(write_csv(tmp_path / "wmo.csv", numbered)), "withhold": [10002]})
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["stations"]["withheld_stations"] == ["10002"]


def test_withhold_needs_station_ids(tmp_path, capsys):
    path = tmp_path / "anon.csv"
    path.write_text("time,lat,lon,value\n2000-01-01T00:00,15.0,40.0,290.0\n")
    rc, _ = run_case(tmp_path, "anon", {"path": str(path), "withhold": 0.5})
    err = capsys.readouterr().err
    assert rc == 2 and "names no stations" in err and err.count("\n") == 1


def test_station_altitude_units_must_be_a_length(tmp_path):
    path = dsg_file(tmp_path / "ts.nc", offsets_h=(0.0,), alt_units="hPa")
    with pytest.raises(ObservationFileError, match=r"alt: station altitude units 'hPa'"):
        read_observations(path, GeoGrid.regular(25, 36), ["sst"], time_unit_seconds=1.0)


def test_stations_survive_an_interrupted_run(tmp_path, monkeypatch):
    csv = write_csv(tmp_path / "st.csv", cycles=6)
    obs = {"path": str(csv), "withhold": ["S0"]}
    rc, whole = run_case(tmp_path, "whole", obs, cycles=6)
    assert rc == 0
    import twin.twin as tt

    original, calls = tt.Twin.step, {"n": 0}

    def crashing_step(self, obs=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, obs)

    monkeypatch.setattr(tt.Twin, "step", crashing_step)
    case = tmp_path / "cut.yaml"
    data = yaml.safe_load((tmp_path / "whole.yaml").read_text())
    data["run"]["restart_every"] = 2
    case.write_text(yaml.safe_dump(data))
    assert main(["run", str(case), "--out", str(tmp_path / "cut"), "--quiet"]) == 2
    monkeypatch.setattr(tt.Twin, "step", original)
    assert main(["run", str(case), "--out", str(tmp_path / "cut"), "--quiet", "--resume"]) == 0
    a, b = xr.open_dataset(whole / "stations.nc"), xr.open_dataset(tmp_path / "cut" / "stations.nc")
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert json.loads((whole / "summary.json").read_text())["stations"] == \
        json.loads((tmp_path / "cut" / "summary.json").read_text())["stations"]
