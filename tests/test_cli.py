"""The `twin` command in-process (main(argv)) and once as a real subprocess."""
import json
import subprocess
import sys

import pytest
import xarray as xr
import yaml

from twin.cli import main

CASE = {
    "name": "cli-test",
    "model": {"kind": "lorenz96", "size": 40, "forcing": 8.0, "dt": 0.05},
    "observations": {"operator": "identity", "every": 1, "error_std": 1.0},
    "ensemble": {"size": 7, "seed": 2},
    "assimilation": {"stages": [{"method": "letkf", "inflation": 1.04, "localization_radius": 4}]},
    "run": {"cycles": 30, "burn_in": 5},
    "truth": {"spinup_steps": 200},
}


@pytest.fixture
def case_file(tmp_path):
    p = tmp_path / "case.yaml"
    p.write_text(yaml.safe_dump(CASE))
    return p


def test_run_writes_every_promised_file(case_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(case_file), "--out", str(out), "--quiet"]) == 0
    for name in ("analysis.nc", "truth.nc", "observations.nc", "summary.json", "restart.nc"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    assert not (tmp_path / "run.partial").exists()
    s = json.loads((out / "summary.json").read_text())
    for key in ("case", "method", "members", "cycles", "burn_in", "rmse_analysis", "rmse_forecast",
                "spread_analysis", "crps_analysis", "wall_seconds", "cycles_per_second", "ranks", "version"):
        assert key in s
    assert s["case"] == "cli-test" and s["method"] == "letkf" and s["cycles"] == 30
    assert 0 < s["rmse_analysis"] < s["rmse_forecast"] + 1
    ds = xr.open_dataset(out / "analysis.nc")
    assert "CF-1.11" in ds.attrs["Conventions"] and ds.sizes["member"] == 7 and ds.sizes["time"] == 30
    obs = xr.open_dataset(out / "observations.nc")
    assert obs.attrs["featureType"] == "point" and obs.sizes["obs"] == 30 * 40
    assert "rmse_analysis" in capsys.readouterr().out


def test_existing_output_is_refused_then_overwritten(case_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(case_file), "--out", str(out), "--quiet", "--set", "run.cycles=6"]) == 0
    assert main(["run", str(case_file), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["run", str(case_file), "--out", str(out), "--quiet", "--overwrite", "--set", "run.cycles=8"]) == 0
    assert json.loads((out / "summary.json").read_text())["cycles"] == 8


@pytest.mark.parametrize("text, key", [
    ("name: x\nmodel: {kind: lorenz96, size: 40, not_a_key: 1}\n", "not_a_key"),
    ("name: x\nmodel: {kind: lorenz96, size: forty}\n", "model.size"),
    ("name: x\nmodel: {kind: lorenz96, size: -3}\n", "model.size"),
    ("name: x\nmodel: {kind: lorenz96\n", "invalid YAML"),
])
def test_bad_case_exits_2_with_one_line_and_no_output(tmp_path, capsys, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = tmp_path / "never"
    for argv in (["validate", str(bad)], ["run", str(bad), "--out", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(bad) in err and key in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_missing_file_and_validate_ok(case_file, capsys, tmp_path):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["validate", str(case_file)]) == 0
    assert main(["validate", str(case_file), "--set", "run.cycles=-1"]) == 2
    assert main(["plot", str(tmp_path)]) == 2


def test_real_subprocess_reports_user_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {kind: lorenz96, size: 40, not_a_key: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "twin.cli", "run", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not_a_key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
