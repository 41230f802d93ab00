"""Tests of twin.plots: figures of synthetic 1-D and 2-D run folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twin import io
from twin.domain import Grid
from twin.plots import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(outdir: Path, shape: tuple[int, ...], members: str, *, with_truth: bool, cycles: int = 12,
              n_mem: int = 5, metric_dim: str = "time") -> None:
    """A run folder as `twin run` writes it: analysis.nc (+ metrics, rank histogram) and truth.nc."""
    rng = np.random.default_rng(0)
    grid = Grid(shape, (True,) * len(shape))
    variables = [io.VariableInfo("x_state", "1", None, "Lorenz-96 state")] if len(shape) == 1 else \
        [io.VariableInfo("theta", "K", "air_potential_temperature", "potential temperature")]
    times = np.arange(cycles) * 0.05
    truth = rng.standard_normal((cycles, 1, 1, *shape))
    ens = truth + 0.5 * rng.standard_normal((cycles, n_mem, 1, *shape))
    err = np.sqrt(((ens.mean(1) - truth[:, 0]) ** 2).reshape(cycles, -1).mean(1))
    rmse_f = err * 1.3
    rmse_f[0] = np.nan
    dims = (metric_dim,)
    extra = {
        "rmse_analysis": (dims, err if with_truth else np.full(cycles, np.nan), {"units": "1"}),
        "rmse_forecast": (dims, rmse_f if with_truth else np.full(cycles, np.nan), {"units": "1"}),
        "spread_analysis": (dims, np.full(cycles, 0.5), {"units": "1"}),
    }
    if metric_dim == "cycle":  # as twin.runner writes: metrics every cycle, states thinned to every 3rd
        extra["cycle"] = (dims, np.arange(cycles), {"long_name": "analysis cycle index"})
        extra["cycle_model_time"] = (dims, times, {"long_name": "model time of the cycle"})
        times, truth, ens = times[::3], truth[::3], ens[::3]
    if with_truth:
        extra["rank_histogram"] = (("rank",), rng.integers(0, 50, n_mem + 1), {"long_name": "rank histogram"})
    outdir.mkdir(parents=True)
    attrs = {"case": f"demo-{len(shape)}d", "method": "letkf"}
    ds = io.state_dataset(ens, times, grid, variables, time_unit_seconds=432000.0, members=members,
                          attrs=attrs, extra=extra)
    io.write_netcdf_atomic(ds, outdir / "analysis.nc")
    if with_truth:
        io.write_netcdf_atomic(io.state_dataset(truth, times, grid, variables, time_unit_seconds=432000.0,
                                                attrs=attrs), outdir / "truth.nc")


def _check_pngs(paths: list[Path], outdir: Path, names: set[str]) -> None:
    assert {p.name for p in paths} == names
    for p in paths:
        assert p.parent == outdir / "figures"
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert sorted(q.name for q in (outdir / "figures").iterdir()) == sorted(names)  # no temp files left


ALL = {"rmse_spread.png", "hovmoller.png", "rank_histogram.png"}
ALL_2D = {"rmse_spread.png", "maps.png", "rank_histogram.png"}


@pytest.mark.parametrize("members", ["all", "mean"])
def test_plot_run_1d(tmp_path, members):
    out = tmp_path / "run1d"
    _make_run(out, (40,), members, with_truth=True)
    _check_pngs(plot_run(out), out, ALL)


@pytest.mark.parametrize("members", ["all", "mean"])
def test_plot_run_2d(tmp_path, members):
    out = tmp_path / "run2d"
    _make_run(out, (16, 20), members, with_truth=True)
    _check_pngs(plot_run(out), out, ALL_2D)


@pytest.mark.parametrize("shape,state", [((40,), "hovmoller.png"), ((8, 10), "maps.png")])
def test_plot_run_without_truth(tmp_path, shape, state):
    out = tmp_path / "notruth"
    _make_run(out, shape, "all", with_truth=False)
    _check_pngs(plot_run(str(out)), out, {"rmse_spread.png", state})


def test_plot_run_overwrites(tmp_path):
    out = tmp_path / "again"
    _make_run(out, (40,), "mean", with_truth=True)
    first = plot_run(out)
    second = plot_run(out)
    assert first == second
    _check_pngs(second, out, ALL)


def test_plot_run_missing_analysis(tmp_path):
    with pytest.raises(OSError, match="analysis.nc"):
        plot_run(tmp_path)


def test_plot_run_metrics_per_cycle(tmp_path):
    out = tmp_path / "thinned"
    _make_run(out, (40,), "mean", with_truth=True, metric_dim="cycle")
    _check_pngs(plot_run(out), out, ALL)
