"""examples/host_coupling.py: a host code drives the twin through BMI."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from twin.runner import run_case

ROOT = Path(__file__).parents[1]
CASE = ROOT / "cases" / "bmi_lorenz96.yaml"


def _example():
    spec = importlib.util.spec_from_file_location("host_coupling", ROOT / "examples" / "host_coupling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relay_mode_equals_twin_run(tmp_path):
    """Relaying the twin's own observations through BMI gives `twin run`'s rmse_analysis.

    The host's numpy RK4 truth and the twin's torch one differ by rounding, which chaos amplifies
    (~1e-10 after 200 cycles); over the case's 50 cycles the two agree to ~1e-15.
    """
    summary = run_case(CASE, (), out=tmp_path / "run", quiet=True)
    out = _example().couple(str(CASE), mode="twin")
    assert out["cycles"] == summary["cycles"] == 50 and out["burn_in"] == summary["burn_in"]
    assert out["rmse"] == pytest.approx(summary["rmse_analysis"], abs=1e-10, rel=0)


def test_independent_host_beats_the_observation_error(capsys):
    """The host's own truth, ensemble start and off-grid observations: RMSE well below sigma_o."""
    example = _example()
    assert example.main([str(CASE), "--mode", "host", "--cycles", "100", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "analysis RMSE" in printed
    out = example.couple(str(CASE), mode="host", cycles=100, seed=7)
    assert out["rmse"] < 0.5 * out["obs_error"]
    assert max(out["rmse_per_cycle"][out["burn_in"]:]) < out["obs_error"]
