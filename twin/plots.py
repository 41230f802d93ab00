"""Figures of a finished run folder (`twin plot DIR`): error/spread curves, Hovmöller or maps, ranks,
and, with `stations.nc` on a 2-D grid, maps of background, analysis and increment with the stations.

Uses matplotlib's object API with the Agg canvas (no display, no pyplot global state). Every figure
is written atomically (temp file + rename) into `outdir/figures/`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from twin.io import atomic_output, read_dataset

_NOT_STATE = {"rmse_analysis", "rmse_forecast", "spread_analysis", "crps_analysis", "rank_histogram"}


def plot_run(outdir: str | os.PathLike[str]) -> list[Path]:
    """Read `outdir/analysis.nc` (and `truth.nc` if present); write PNGs; return their paths."""
    outdir = Path(outdir)
    ana = read_dataset(outdir / "analysis.nc")
    truth_path = outdir / "truth.nc"
    truth = read_dataset(truth_path) if truth_path.is_file() else None
    figdir = outdir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    case = _case_name(ana, outdir)
    written: list[Path] = []
    fig = _rmse_spread_figure(ana, case)
    if fig is not None:
        written.append(_save(fig, figdir / "rmse_spread.png"))
    obs_path = outdir / "observations.nc"
    obs = read_dataset(obs_path) if obs_path.is_file() else None
    state = _state_figure(ana, truth, obs, case)
    if state is not None:
        written.append(_save(state[0], figdir / state[1]))
    if "rank_histogram" in ana:
        written.append(_save(_rank_figure(ana["rank_histogram"], case), figdir / "rank_histogram.png"))
    if (outdir / "stations.nc").is_file():
        fig = _stations_figure(ana, read_dataset(outdir / "stations.nc"), case)
        if fig is not None:
            written.append(_save(fig, figdir / "stations.png"))
    return written


# ------------------------------------------------------------------------------------------ helpers
def _save(fig: Figure, path: Path) -> Path:
    """Render with the Agg canvas into a temp file next to `path`, then rename it into place."""
    FigureCanvasAgg(fig)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _case_name(ds: xr.Dataset, outdir: Path) -> str:
    for key in ("case", "case_name", "name"):
        if ds.attrs.get(key):
            return str(ds.attrs[key])
    return outdir.name


def _time_axis(ds: xr.Dataset) -> tuple[np.ndarray, str]:
    """Numeric time values for plotting and their axis label (model time when available)."""
    if "model_time" in ds.coords or "model_time" in ds:
        mt = ds["model_time"]
        units = mt.attrs.get("units", "1")
        return np.asarray(mt.values, dtype=float), "model time" + ("" if units == "1" else f" [{units}]")
    t = ds["time"].values
    if np.issubdtype(t.dtype, np.datetime64):
        return (t - t[0]) / np.timedelta64(1, "h"), "hours since first analysis"
    return np.asarray(t, dtype=float), "time"


def _series_axis(ds: xr.Dataset, da: xr.DataArray) -> tuple[np.ndarray, str]:
    """x values of a per-cycle series: model time (dim `time`, or `<dim>_model_time`), else its index."""
    dim = da.dims[0]
    if dim == "time":
        return _time_axis(ds)
    mt = ds.get(f"{dim}_model_time")
    if mt is not None and mt.dims == (dim,):
        units = ds["model_time"].attrs.get("units", "1") if "model_time" in ds.coords else "1"
        return np.asarray(mt.values, dtype=float), "model time" + ("" if units == "1" else f" [{units}]")
    if dim in ds.coords:
        return np.asarray(ds[dim].values), dim
    return np.arange(da.sizes[dim]), dim


def _label(da: xr.DataArray, default: str) -> str:
    name = da.attrs.get("long_name", default)
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units and units != "1" else name


def _state_names(ds: xr.Dataset) -> list[str]:
    listed = str(ds.attrs.get("earthtwin_variables", "")).split()
    names = [n for n in listed if n in ds]
    if names:
        return names
    return [n for n, v in ds.data_vars.items()
            if "time" in v.dims and len(set(v.dims) - {"time", "member"}) >= 1
            and not n.endswith("_spread") and n not in _NOT_STATE and not n.startswith("background")]


def _mean_spread(ds: xr.Dataset, name: str) -> tuple[xr.DataArray, xr.DataArray | None]:
    """Ensemble mean and spread of variable `name` (from members, or stored mean + `_spread`)."""
    da = ds[name]
    if "member" in da.dims:
        mean = da.mean("member", keep_attrs=True)
        spread = da.std("member", ddof=1, keep_attrs=True) if da.sizes["member"] > 1 else None
        return mean, spread
    return da, ds[f"{name}_spread"] if f"{name}_spread" in ds else None


def _truth_field(truth: xr.Dataset | None, name: str, times: xr.DataArray) -> xr.DataArray | None:
    """The truth of `name` at the analysis times (member 0 or mean), or None when unavailable."""
    if truth is None or name not in truth:
        return None
    da = truth[name]
    if "member" in da.dims:
        da = da.isel(member=0) if da.sizes["member"] == 1 else da.mean("member", keep_attrs=True)
    if "time" in da.dims:
        common = np.intersect1d(da["time"].values, times.values)
        if common.size != times.size:
            return None
        da = da.sel(time=times.values)
    return da


def _colorbar(fig: Figure, ax, mappable, da: xr.DataArray) -> None:
    cb = fig.colorbar(mappable, ax=ax)
    units = da.attrs.get("units")
    if units and units != "1":
        cb.set_label(units)


# ------------------------------------------------------------------------------------------ figures
def _rmse_spread_figure(ds: xr.Dataset, case: str) -> Figure | None:
    series = [("rmse_analysis", "analysis RMSE", "C0", "-"), ("rmse_forecast", "forecast RMSE", "C3", "-"),
              ("spread_analysis", "analysis spread", "C0", "--")]
    present = [s for s in series if s[0] in ds and ds[s[0]].ndim == 1 and np.isfinite(ds[s[0]].values).any()]
    if not present:
        return None
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, label, colour, style in present:
        t, tlabel = _series_axis(ds, ds[name])
        ax.plot(t, ds[name].values, color=colour, linestyle=style, label=label)
    names = _state_names(ds)
    units = ds[names[0]].attrs.get("units") if names else None
    ax.set_xlabel(tlabel)
    ax.set_ylabel("RMSE / spread" + (f" [{units}]" if units and units != "1" else ""))
    ax.set_title(f"{case}: analysis and forecast error")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _state_figure(ana: xr.Dataset, truth: xr.Dataset | None, obs: xr.Dataset | None,
                  case: str) -> tuple[Figure, str] | None:
    """1-D grids: a Hovmöller diagram of the first variable (hovmoller.png); 2-D grids: maps at the last
    analysis time, one row per variable (at most three): truth, mean, spread, error, observations
    (maps.png)."""
    names = _state_names(ana)
    if not names:
        return None
    mean, spread = _mean_spread(ana, names[0])
    grid_dims = [d for d in mean.dims if d != "time"]
    if len(grid_dims) == 1:
        ref = _truth_field(truth, names[0], ana["time"])
        return _hovmoller(ana, mean, spread, ref, grid_dims[0], names[0], case), "hovmoller.png"
    if len(grid_dims) != 2:
        return None
    rows = []
    for index, name in enumerate(names[:3]):
        mean, spread = _mean_spread(ana, name)
        rows.append((name, mean, spread, _truth_field(truth, name, ana["time"]), _last_observations(obs, index, mean)))
    fig = Figure(figsize=(4.2 * max(_panel_count(r) for r in rows), 3.8 * len(rows)), layout="constrained")
    when = str(rows[0][1]["time"].values[-1])[:19] if "time" in rows[0][1].coords else "last time"
    for k, row in enumerate(rows):
        _maps(fig, k, len(rows), *row, grid_dims)
    fig.suptitle(f"{case} at {when}")
    return fig, "maps.png"


def _panel_count(row: tuple) -> int:
    _, _, spread, ref, points = row
    return 1 + (spread is not None) + 2 * (ref is not None) + (points is not None)


def _last_observations(obs: xr.Dataset | None, index: int, mean: xr.DataArray) -> tuple[np.ndarray, ...] | None:
    """(x, y, value) of the observations of variable `index` at the last analysis time, on grid points."""
    if obs is None or "value" not in obs or "variable_index" not in obs or "time" not in mean.coords:
        return None
    ydim, xdim = [d for d in mean.dims if d != "time"]
    if ydim not in obs.variables or xdim not in obs.variables:
        return None
    last = mean["time"].values[-1]
    pick = (obs["variable_index"].values == index) & (obs["time"].values == last)
    if not pick.any():
        return None
    return obs[xdim].values[pick], obs[ydim].values[pick], obs["value"].values[pick]


def _hovmoller(ana: xr.Dataset, mean: xr.DataArray, spread: xr.DataArray | None, ref: xr.DataArray | None,
               dim: str, name: str, case: str) -> Figure:
    t, tlabel = _time_axis(ana)
    panels: list[tuple[str, xr.DataArray, str]] = []
    if ref is not None:
        panels += [("truth", ref, "viridis"), ("analysis mean", mean, "viridis")]
        err = (mean - ref).assign_attrs(units=mean.attrs.get("units"))
        panels.append(("analysis error", err, "RdBu_r"))
    else:
        panels.append(("analysis mean", mean, "viridis"))
        if spread is not None:
            panels.append(("analysis spread", spread, "magma"))
    fig = Figure(figsize=(4.2 * len(panels), 5), layout="constrained")
    x = ana[dim].values if dim in ana.coords else np.arange(mean.sizes[dim])
    xlabel = _label(ana[dim], dim) if dim in ana.coords else dim
    vmin = float(np.nanmin([np.nanmin(p[1].values) for p in panels[:2] if p[2] == "viridis"]))
    vmax = float(np.nanmax([np.nanmax(p[1].values) for p in panels[:2] if p[2] == "viridis"]))
    for k, (title, da, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        z = da.transpose("time", dim).values
        kw: dict = {"vmin": vmin, "vmax": vmax} if cmap == "viridis" else {}
        if cmap == "RdBu_r":
            lim = float(np.nanmax(np.abs(z))) or 1.0
            kw = {"vmin": -lim, "vmax": lim}
        m = ax.pcolormesh(x, t, z, cmap=cmap, shading="nearest", **kw)
        _colorbar(fig, ax, m, da)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(tlabel if k == 0 else "")
        ax.set_title(title)
    fig.suptitle(f"{case}: {name} (Hovmöller)")
    return fig


def _maps(fig: Figure, row: int, nrows: int, name: str, mean: xr.DataArray, spread: xr.DataArray | None,
          ref: xr.DataArray | None, points: tuple[np.ndarray, ...] | None, dims: list[str]) -> None:
    """One row of maps for variable `name` at the last time; observations share the state's colours."""
    last = {"time": -1}
    panels: list[tuple[str, xr.DataArray, str]] = []
    if ref is not None:
        panels.append(("truth", ref.isel(last), "viridis"))
    panels.append(("analysis mean", mean.isel(last), "viridis"))
    if spread is not None:
        panels.append(("analysis spread", spread.isel(last), "magma"))
    if ref is not None:
        err = (mean.isel(last) - ref.isel(last)).assign_attrs(units=mean.attrs.get("units"))
        panels.append(("analysis error", err, "RdBu_r"))
    ydim, xdim = dims
    fields = [p[1].values for p in panels if p[2] == "viridis"]
    vmin, vmax = float(np.nanmin(fields)), float(np.nanmax(fields))
    ncols = len(panels) + (points is not None)
    xc = mean[xdim] if xdim in mean.coords else xr.DataArray(np.arange(mean.sizes[xdim]), dims=xdim)
    yc = mean[ydim] if ydim in mean.coords else xr.DataArray(np.arange(mean.sizes[ydim]), dims=ydim)
    for k, (title, da, cmap) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, row * ncols + k + 1)
        z = da.transpose(ydim, xdim).values
        kw: dict = {"vmin": vmin, "vmax": vmax} if cmap == "viridis" else {}
        if cmap == "RdBu_r":
            lim = float(np.nanmax(np.abs(z))) or 1.0
            kw = {"vmin": -lim, "vmax": lim}
        m = ax.pcolormesh(xc.values, yc.values, z, cmap=cmap, shading="nearest", **kw)
        _colorbar(fig, ax, m, da)
        _frame(ax, xc, yc, xdim, ydim, first=k == 0)
        ax.set_title(f"{name}: {title}" if k == 0 else title)
    if points is not None:
        ax = fig.add_subplot(nrows, ncols, row * ncols + ncols)
        m = ax.scatter(points[0], points[1], c=points[2], cmap="viridis", vmin=vmin, vmax=vmax, s=9)
        _colorbar(fig, ax, m, mean)
        ax.set_xlim(float(xc.min()), float(xc.max()))
        ax.set_ylim(float(yc.min()), float(yc.max()))
        _frame(ax, xc, yc, xdim, ydim, first=False)
        ax.set_title(f"observations ({len(points[2])})")


def _frame(ax, xc: xr.DataArray, yc: xr.DataArray, xdim: str, ydim: str, first: bool) -> None:
    ax.set_aspect("equal")
    ax.set_xlabel(_label(xc, xdim))
    ax.set_ylabel(_label(yc, ydim) if first else "")


def _stations_figure(ana: xr.Dataset, stations: xr.Dataset, case: str) -> Figure | None:
    """Background, analysis and increment (mean, last time, first variable) with the stations on top:
    assimilated as dots, withheld as magenta-edged triangles, stations with QC rejections as crosses."""
    names = _state_names(ana)
    background = f"{names[0]}_background_mean" if names else ""
    if not names or background not in ana or "lat" not in stations or "lon" not in stations:
        return None
    mean = _mean_spread(ana, names[0])[0].isel(time=-1)
    prior = ana[background].isel(time=-1)
    dims = [d for d in mean.dims if d != "time"]
    if len(dims) != 2:
        return None
    ydim, xdim = dims
    xc, yc = ana[xdim].values, ana[ydim].values
    lon, lat = stations["lon"].values, stations["lat"].values
    withheld = stations["withheld"].values.astype(bool) if "withheld" in stations else np.zeros(len(lat), bool)
    rejected = stations["qc_rejected"].values > 0 if "qc_rejected" in stations else np.zeros(len(lat), bool)
    increment = (mean - prior).assign_attrs(units=mean.attrs.get("units"))
    vmin = float(np.nanmin([np.nanmin(prior.values), np.nanmin(mean.values)]))
    vmax = float(np.nanmax([np.nanmax(prior.values), np.nanmax(mean.values)]))
    lim = float(np.nanmax(np.abs(increment.values))) or 1.0
    fig = Figure(figsize=(13.5, 4.2), layout="constrained")
    panels = [("background", prior, "viridis", vmin, vmax), ("analysis", mean, "viridis", vmin, vmax),
              ("increment", increment, "RdBu_r", -lim, lim)]
    for k, (title, da, cmap, lo, hi) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        m = ax.pcolormesh(xc, yc, da.transpose(ydim, xdim).values, cmap=cmap, vmin=lo, vmax=hi, shading="nearest")
        _colorbar(fig, ax, m, da)
        used = ~withheld & ~rejected
        ax.scatter(lon[used], lat[used], s=12, c="k", label="assimilated")
        ax.scatter(lon[withheld], lat[withheld], s=30, marker="^", facecolors="none", edgecolors="m",
                   label="withheld")
        if rejected.any():
            ax.scatter(lon[rejected], lat[rejected], s=30, marker="x", c="r", label="QC rejected")
        ax.set_xlabel(_label(ana[xdim], xdim))
        ax.set_ylabel(_label(ana[ydim], ydim) if k == 0 else "")
        ax.set_title(title)
        if k == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{case}: {names[0]} and stations")
    return fig


def _rank_figure(hist: xr.DataArray, case: str) -> Figure:
    other = [d for d in hist.dims if d != "rank"]
    counts = np.nan_to_num(hist.sum(other).values.astype(float) if other else hist.values.astype(float))
    ranks = hist["rank"].values if "rank" in hist.coords else np.arange(counts.size)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(ranks, counts, width=0.9, color="C0")
    if counts.size:
        ax.axhline(counts.sum() / counts.size, color="k", linestyle="--", label="flat (ideal)")
        ax.legend()
    ax.set_xlabel("rank of truth within the ensemble")
    ax.set_ylabel("count")
    ax.set_title(f"{case}: rank histogram")
    return fig
