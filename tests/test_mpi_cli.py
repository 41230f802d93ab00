"""A real `mpiexec -n 2 twin run` writes one set of files equal to the serial run's."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

CASE = Path(__file__).parents[1] / "cases" / "lorenz96_letkf.yaml"
SETS = ["--set", "run.cycles=20", "--set", "run.burn_in=5", "--set", "truth.spinup_steps=100",
        "--set", "output.figures=false"]


def twin_cmd(*args):
    return [sys.executable, "-m", "twin.cli", *args]


@pytest.mark.parametrize("ranks, layout", [
    (2, []), (2, ["--set", "domain.ranks_per_member=1"]),  # grid split; members split (still one writer)
    pytest.param(4, [], marks=pytest.mark.slow)])  # 4 oversubscribes 2 cores
def test_mpiexec_run_equals_serial(tmp_path, ranks, layout):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))  # from the mpich wheel
    assert mpiexec is not None, "the test extra installs mpich, which provides mpiexec"
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    subprocess.run(twin_cmd("run", str(CASE), "--out", str(serial), "--quiet", *SETS), check=True, timeout=300)
    parallel_cmd = twin_cmd("run", str(CASE), "--out", str(parallel), "--quiet", *SETS, *layout)
    subprocess.run([mpiexec, "-n", str(ranks), *parallel_cmd], check=True, timeout=300)
    for name in ("analysis.nc", "truth.nc", "observations.nc", "restart.nc"):
        a, b = xr.open_dataset(serial / name), xr.open_dataset(parallel / name)
        for var in a.data_vars:
            np.testing.assert_allclose(a[var].values, b[var].values, atol=1e-12, rtol=0, err_msg=f"{name}:{var}")
    s, p = (json.loads((d / "summary.json").read_text()) for d in (serial, parallel))
    assert p["ranks"] == ranks and s["ranks"] == 1
    for key in ("rmse_analysis", "rmse_forecast", "spread_analysis", "crps_analysis"):
        assert p[key] == pytest.approx(s[key], abs=1e-12)
    assert not list(tmp_path.glob("*.partial"))
