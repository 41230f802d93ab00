"""The real-data case cases/hadcm3_stations.yaml end to end: prepared from the iris-sample-data
package (a `test` extra), the analysis beats the background at the withheld stations and on the grid
against the real year-2000 field, and the numbers match those stated in the case header."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from twin.cli import main

CASES = Path(__file__).parents[1] / "cases"


def prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_hadcm3", CASES / "prepare_hadcm3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hadcm3_stations_case_end_to_end(tmp_path):
    data = tmp_path / "data"
    assert prepare_module().main(["--out", str(data)]) == 0
    out = tmp_path / "run"
    assert main(["run", str(CASES / "hadcm3_stations.yaml"), "--out", str(out), "--quiet",
                 "--set", f"initial.path={data / 'background.nc'}",
                 "--set", f"observations.path={data / 'stations.csv'}"]) == 0
    block = json.loads((out / "summary.json").read_text())["stations"]
    assert block["stations"] == 100 and len(block["withheld_stations"]) == 25 and block["withheld_obs"] == 25
    assert block["withheld_rmse_analysis"] < 0.8 * block["withheld_rmse_background"]
    header = (CASES / "hadcm3_stations.yaml").read_text()
    stated = re.search(r"withheld-station RMSE ([0-9.]+) K \(background\) -> ([0-9.]+) K", header)
    assert stated is not None
    assert [float(v) for v in stated.groups()] == pytest.approx(
        [block["withheld_rmse_background"], block["withheld_rmse_analysis"]], abs=6e-4)
    # on the grid, against the real year-2000 field (area-weighted)
    ana = xr.open_dataset(out / "analysis.nc")
    truth = xr.open_dataset(data / "truth.nc", decode_times=False)["air_temperature"].values[0]
    w = np.cos(np.deg2rad(ana["lat"].values))[:, None] * np.ones_like(truth)

    def rmse(x):
        return float(np.sqrt((w * (x - truth) ** 2).sum() / w.sum()))

    background = rmse(ana["air_temperature_background_mean"].values[0])
    analysis = rmse(ana["air_temperature"].mean("member").values[0])
    grid = re.search(r"on the grid\s*#?\s*([0-9.]+) K -> ([0-9.]+) K", header)
    assert [float(v) for v in grid.groups()] == pytest.approx([background, analysis], abs=6e-4)
    assert analysis < 0.7 * background
    st = xr.open_dataset(out / "stations.nc")
    held = st["withheld"].values[st["station_index"].values] == 1
    assert int(st["withheld"].sum()) == 25 and (st["status"].values[held] == 1).all()
    assert {p.name for p in (out / "figures").iterdir()} >= {"stations.png", "maps.png"}
