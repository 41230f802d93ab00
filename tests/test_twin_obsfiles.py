"""Observations from files through the twin: a run's own observations.nc reproduces the run;
bad files give one-line errors; QC rejections are counted in summary.json."""
import json

import numpy as np
import xarray as xr
import yaml

from twin.cli import main

CASE = {
    "name": "obsfile",
    "model": {"kind": "lorenz96", "size": 40, "forcing": 8.0, "dt": 0.05},
    "truth": {"spinup_steps": 200},
    "observations": {"operator": "identity", "every": 2, "error_std": 1.0, "fraction": 0.6},
    "ensemble": {"size": 8, "seed": 2},
    "assimilation": {"stages": [{"method": "letkf", "inflation": 1.05, "localization_radius": 4}]},
    "run": {"cycles": 20, "burn_in": 5},
    "output": {"figures": False},
}


def write_case(tmp_path, **observations):
    data = {**CASE, "observations": {**CASE["observations"], **observations}}
    path = tmp_path / f"case{len(list(tmp_path.glob('case*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_feeding_a_runs_observations_back_reproduces_it(tmp_path):
    first = tmp_path / "synthetic"
    assert main(["run", str(write_case(tmp_path)), "--out", str(first), "--quiet"]) == 0
    again = tmp_path / "from_file"
    case = write_case(tmp_path, path=str(first / "observations.nc"))
    assert main(["run", str(case), "--out", str(again), "--quiet"]) == 0
    a, b = xr.open_dataset(first / "analysis.nc"), xr.open_dataset(again / "analysis.nc")
    np.testing.assert_allclose(a["X"].values, b["X"].values, rtol=0, atol=1e-12)
    s = json.loads((again / "summary.json").read_text())
    assert s["obs_used"] == json.loads((first / "summary.json").read_text())["obs_used"]
    assert s["obs_rejected"] == {"nonfinite": 0, "bad_error": 0, "out_of_domain": 0, "duplicate": 0, "gross_error": 0}


def test_csv_with_bad_rows_is_screened_and_counted(tmp_path):
    rows = ["time,x,variable,value,error"]
    for cycle in range(20):
        t = cycle * 0.1  # every 2 steps of 0.05
        for x in range(0, 40, 4):
            rows.append(f"{t},{x},X,{np.sin(x + t):.3f},1.0")
    rows += ["0.0,3.5,X,nan,1.0", "0.0,5.0,X,1.0,-1.0", "0.0,4.0,X,0.5,1.0", "0.1,1.0,X,40.0,0.1"]
    csv = tmp_path / "obs.csv"
    csv.write_text("\n".join(rows) + "\n")
    case = write_case(tmp_path, path=str(csv), gross_error_k=5.0)
    assert main(["run", str(case), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    rej = s["obs_rejected"]
    assert rej["nonfinite"] == 1 and rej["bad_error"] == 1 and rej["duplicate"] == 1
    assert rej["gross_error"] >= 1  # the 40.0 ± 0.1 observation
    assert s["obs_used"] == 20 * 10 + 1 - rej["gross_error"]
    analysis = xr.open_dataset(tmp_path / "o" / "analysis.nc")["X"].values
    assert np.isfinite(analysis).all()


def test_bad_observation_files_exit_2_with_one_line(tmp_path, capsys):
    cases = {
        "missing.nc": None,
        "empty.csv": "",
        "nocol.csv": "time,x,variable\n0.0,1,X\n",
        "garbage.nc": "CDF\x01 definitely not netcdf",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        case = write_case(tmp_path, path=str(path))
        rc = main(["run", str(case), "--out", str(tmp_path / f"out_{name}"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert err.count("\n") == 1 and name in err and "Traceback" not in err, err
        assert not (tmp_path / f"out_{name}").exists() and not (tmp_path / f"out_{name}.partial").exists()


def test_all_nan_observations_are_screened_and_the_analysis_stays_finite(tmp_path):
    rows = ["time,x,variable,value,error"] + [f"{c * 0.1},{x},X,nan,1.0" for c in range(20) for x in range(0, 40, 5)]
    csv = tmp_path / "nan.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert main(["run", str(write_case(tmp_path, path=str(csv))), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["obs_rejected"]["nonfinite"] == 160 and s["obs_used"] == 0
    assert np.isfinite(xr.open_dataset(tmp_path / "o" / "analysis.nc")["X"].values).all()
