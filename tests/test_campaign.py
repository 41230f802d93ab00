"""Hindcast campaigns: per-lead skill, resumable, spread over MPI rank groups."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from twin.cli import main

ROOT = Path(__file__).parents[1]
CAMPAIGN = """
name: test-campaign
base: {base}
init_times: {{start: 0.0, stop: 3.5, every: 0.5}}
lead_cycles: 12
members: 10
overrides: ["ensemble.init_spread=0.3", "truth.spinup_steps=200"]
"""


def write(tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(CAMPAIGN.format(base=ROOT / "cases" / "lorenz96_letkf.yaml"))
    return path


def test_campaign_summary_has_skill_per_init_and_lead(tmp_path):
    path = write(tmp_path)
    assert main(["validate", str(path)]) == 0
    assert main(["hindcast", str(path), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    s = json.loads((tmp_path / "c" / "campaign_summary.json").read_text())
    assert len(s["init_time"]) == 8 and len(s["lead_time"]) == 13
    rmse = np.array(s["scores"]["rmse_forecast"])
    assert rmse.shape == (8, 13)
    assert np.mean(rmse[:, -1]) > 2 * np.mean(rmse[:, 0])  # chaos: errors grow with lead time
    lines = (tmp_path / "c" / "campaign_summary.csv").read_text().splitlines()
    assert lines[0].startswith("init_time,lead_time") and len(lines) == 1 + 8 * 13
    assert len({tuple(r) for r in rmse.round(12)}) == 8  # every init time is a different forecast


def test_killed_campaign_under_mpi_reruns_only_what_is_missing(tmp_path):
    path = write(tmp_path)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "twin.cli", "hindcast", str(path), "--quiet"]
    out = tmp_path / "cut"
    proc = subprocess.Popen(cmd + ["--out", str(out)], start_new_session=True)
    deadline = time.time() + 240
    while len([p for p in out.glob("init_*") if not p.name.endswith(".partial")]) < 4 and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the campaign finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("init_*") if not p.name.endswith(".partial")}
    assert 4 <= len(done) < 8 and not (out / "campaign_summary.json").exists()
    subprocess.run(cmd + ["--out", str(out)], check=True, timeout=300)
    for name, mtime in done.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was computed again"
    assert main(["hindcast", str(path), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    a = json.loads((out / "campaign_summary.json").read_text())
    b = json.loads((tmp_path / "whole" / "campaign_summary.json").read_text())
    assert a == b
