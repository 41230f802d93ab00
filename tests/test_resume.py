"""Interrupted runs: kill -9 mid-run, `twin run --resume`, same files as an uninterrupted run."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import xarray as xr

from twin.cli import main

CASE = """
name: resume-test
model: {kind: lorenz96, size: 100, forcing: 8.0, dt: 0.05}
truth: {seed: 1, spinup_steps: 100}
observations: {operator: identity, every: 1, error_std: 1.0, fraction: FRACTION}
ensemble: {size: 10, seed: 2}
assimilation:
  stages: [{method: letkf, inflation: 1.04, localization_radius: 4, rotation: true}]
run: {cycles: CYCLES, burn_in: 10, restart_every: 20}
output: {figures: false}
"""
TIMING = {"wall_seconds", "cycles_per_second"}


def same_outputs(a, b):
    for name in ("analysis.nc", "truth.nc", "observations.nc", "restart.nc"):
        da, db = xr.open_dataset(a / name), xr.open_dataset(b / name)
        assert set(da.data_vars) == set(db.data_vars)
        for var in da.data_vars:
            np.testing.assert_array_equal(da[var].values, db[var].values, err_msg=f"{name}:{var}")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}


def test_resume_in_process_equals_uninterrupted(tmp_path, monkeypatch):
    case = tmp_path / "case.yaml"
    case.write_text(CASE.replace("CYCLES", "60").replace("FRACTION", "0.5"))
    assert main(["run", str(case), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    import twin.twin as tt

    original, calls = tt.Twin.step, {"n": 0}

    def crashing_step(self, obs=None):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after cycle 39
        return original(self, obs)

    monkeypatch.setattr(tt.Twin, "step", crashing_step)
    assert main(["run", str(case), "--out", str(tmp_path / "cut"), "--quiet"]) == 2
    assert (tmp_path / "cut.partial" / "checkpoint.pt").is_file() and not (tmp_path / "cut").exists()
    monkeypatch.setattr(tt.Twin, "step", original)
    assert main(["run", str(case), "--out", str(tmp_path / "cut"), "--quiet", "--resume"]) == 0
    assert not (tmp_path / "cut.partial").exists() and not (tmp_path / "cut" / "checkpoint.pt").exists()
    same_outputs(tmp_path / "whole", tmp_path / "cut")


def test_kill_9_then_resume_gives_the_same_files(tmp_path):
    case = tmp_path / "case.yaml"
    case.write_text(CASE.replace("CYCLES", "1500").replace("FRACTION", "1.0"))
    cmd = [sys.executable, "-m", "twin.cli", "run", str(case), "--quiet"]
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")])
    checkpoint = tmp_path / "cut.partial" / "checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut").exists()
    subprocess.run(cmd + ["--out", str(tmp_path / "cut"), "--resume"], check=True, timeout=600)
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, timeout=600)
    same_outputs(tmp_path / "whole", tmp_path / "cut")


def test_resume_errors_are_one_line(tmp_path, capsys):
    case = tmp_path / "case.yaml"
    case.write_text(CASE.replace("CYCLES", "30").replace("FRACTION", "1.0"))
    assert main(["run", str(case), "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "x.partial" / "checkpoint.pt").write_bytes(b"garbage")
    assert main(["run", str(case), "--out", str(tmp_path / "x"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and err.count("\n") == 1


def test_same_case_and_seed_give_bit_identical_outputs(tmp_path):
    case = tmp_path / "case.yaml"
    case.write_text(CASE.replace("CYCLES", "40").replace("FRACTION", "0.7"))
    for name in ("a", "b"):
        assert main(["run", str(case), "--out", str(tmp_path / name), "--quiet"]) == 0
    same_outputs(tmp_path / "a", tmp_path / "b")
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["seeds"] == {"truth": 1, "ensemble": 2, "observations": 3}
    assert {"earthtwin", "torch", "numpy"} <= set(s["versions"]) and s["config"]["name"] == "resume-test"
