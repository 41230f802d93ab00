"""`twin run` as a plain function: case file in, complete output folder out.

The run writes into `DIR.partial/` and renames it to `DIR` only when every file is written, so a
folder without `.partial` is always whole.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from twin import io
from twin.config import CaseConfig, case_to_dict, load_case
from twin.twin import Twin


CHECKPOINT = "checkpoint.pt"


class UserError(Exception):
    """A user mistake outside the case file (output folder exists, missing input)."""


def output_dir(case: CaseConfig, out: str | Path | None) -> Path:
    """`--out` wins over `run.out`, which defaults to out/<name>."""
    return Path(out or case.run.out or f"out/{case.name}")


def prepare_output(outdir: Path, overwrite: bool) -> Path:
    """Refuse an existing complete run unless overwrite; start a fresh `.partial` folder."""
    if outdir.exists() and not overwrite:
        raise UserError(f"{outdir}: output folder exists (pass --overwrite to replace it)")
    partial = partial_dir(outdir)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def finish_output(partial: Path, outdir: Path) -> None:
    if outdir.exists():
        shutil.rmtree(outdir)
    partial.rename(outdir)


def partial_dir(outdir: Path) -> Path:
    return outdir.with_name(outdir.name + ".partial")


def run_case(path: str | Path, overrides: tuple[str, ...] = (), out: str | Path | None = None,
             overwrite: bool = False, quiet: bool = False, resume: bool = False, comm: object | None = None) -> dict:
    """Run a case end to end and return its summary (also written as summary.json).

    A checkpoint is kept in `DIR.partial/checkpoint.pt` every `run.restart_every` cycles;
    `resume=True` continues from it and ends with the same files as an uninterrupted run.
    """
    start = time.perf_counter()
    case = load_case(path, overrides)
    outdir = output_dir(case, out)
    checkpoint = partial_dir(outdir) / CHECKPOINT
    if outdir.exists() and not overwrite:  # every rank sees the same file system: all refuse together
        raise UserError(f"{outdir}: output folder exists (pass --overwrite to replace it)")
    if resume and not checkpoint.is_file():
        raise UserError(f"{checkpoint}: no checkpoint to resume from")
    tw = Twin(case, comm)
    if resume:
        tw.restore(checkpoint)
        partial = partial_dir(outdir) if tw.domain.rank == 0 else None
    else:
        partial = prepare_output(outdir, overwrite) if tw.domain.rank == 0 else None
    try:
        tw.run(progress=not quiet, checkpoint=lambda t: t.checkpoint(checkpoint),
               checkpoint_every=case.run.restart_every)
        summary = summarise(tw)
        final = tw.domain.gather(tw.ensemble)
        if partial is not None:
            write_outputs(tw, partial, final)
            summary["wall_seconds"] = time.perf_counter() - start
            (partial / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if case.output.figures:
                from twin.plots import plot_run

                plot_run(partial)
            for f in partial.glob(checkpoint.stem + "*" + checkpoint.suffix):
                f.unlink()
            finish_output(partial, outdir)
    except Exception:
        if partial is not None and partial.exists() and not checkpoint.exists():
            shutil.rmtree(partial, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise
    summary["wall_seconds"] = time.perf_counter() - start
    summary["out"] = str(outdir)
    return summary


def summarise(tw: Twin) -> dict:
    """summary.json: DESIGN's keys plus seeds, versions and the resolved config."""
    from twin import __version__

    s = tw.summary()
    case = tw.case
    return {
        **{k: s[k] for k in ("case", "method", "members", "cycles", "burn_in")},
        **{k: s[k] for k in ("rmse_analysis", "rmse_forecast", "spread_analysis", "spread_forecast",
                             "crps_analysis", "omb_rms", "oma_rms")},
        "obs_used": int(tw.recorder.series()["obs_count"].sum()),
        "obs_rejected": tw.file_observations.rejected if tw.file_observations is not None else {},
        "stations": tw.stations.summary() if tw.stations is not None else None,
        "wall_seconds": None,
        "cycles_per_second": s["cycles_per_second"],
        "ranks": s["ranks"],
        "version": __version__,
        "seeds": {"truth": case.truth.seed, "ensemble": case.ensemble.seed, "observations": case.observations.seed},
        "versions": {"earthtwin": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "config": case_to_dict(case),
    }


def write_outputs(tw: Twin, folder: Path, final: torch.Tensor) -> None:
    """analysis.nc, truth.nc, observations.nc from the recorder; restart.nc from the final ensemble."""
    rec, case, model = tw.recorder, tw.case, tw.model
    common = dict(time_unit_seconds=model.time_unit_seconds, start=case.run.start,
                  attrs={"case": case.name, "method": case.method})
    times = np.array([rec.times[rec.cycles.index(c)] for c in rec.out_cycles])
    series = rec.series()
    extra: dict = {"cycle": (("cycle",), np.array(rec.cycles), {"long_name": "analysis cycle index"}),
                   "cycle_model_time": (("cycle",), np.array(rec.times), {"long_name": "model time of the cycle"})}
    for k, v in series.items():
        extra[k] = (("cycle",), v, {"long_name": k.replace("_", " ")})
    for i, var in enumerate(model.variables):
        bm = torch.stack(rec.background_mean)[:, i].double().numpy()
        bs = torch.stack(rec.background_spread)[:, i].double().numpy()
        extra[f"{var.name}_background_mean"] = (("time",) + tw.grid.dims, bm,
                                                {"long_name": f"background (prior) mean of {var.long_name}", "units": var.units})
        extra[f"{var.name}_background_spread"] = (("time",) + tw.grid.dims, bs,
                                                  {"long_name": f"background (prior) spread of {var.long_name}", "units": var.units})
    if rec.rank_counts is not None:
        extra["rank_histogram"] = (("rank",), rec.rank_counts.numpy(), {"long_name": "rank of the truth among members"})
    if rec.keep_members:
        ens = torch.stack(rec.analysis).double().numpy()
        ds = io.state_dataset(ens, times, tw.grid, model.variables, members="all", extra=extra, **common)
    else:
        ens = torch.stack(rec.analysis).double().numpy()[:, None]
        ds = io.state_dataset(ens, times, tw.grid, model.variables, members="mean", extra=extra, **common)
        spread = torch.stack(rec.analysis_spread).double().numpy()
        for i, var in enumerate(model.variables):
            ds[f"{var.name}_spread"].values[...] = spread[:, i]
    io.write_netcdf_atomic(ds, folder / "analysis.nc")
    if rec.truth:
        truth = torch.stack(rec.truth).double().numpy()[:, None]
        tds = io.state_dataset(truth, times, tw.grid, model.variables, members="mean", **common)
        tds = tds.drop_vars([f"{v.name}_spread" for v in model.variables])
        for v in model.variables:
            tds[v.name].attrs["long_name"] = f"true {v.long_name}"
        io.write_netcdf_atomic(tds, folder / "truth.nc")
    write_observations(tw, folder / "observations.nc", common)
    if tw.stations is not None:
        io.write_netcdf_atomic(tw.stations.dataset(model.variables, **common), folder / "stations.nc")
    io.write_restart(folder / "restart.nc", final.double().numpy(), tw.time, tw.cycle, tw.grid,
                     model.variables, case_name=case.name, config_yaml=yaml.safe_dump(case_to_dict(case)))


def write_observations(tw: Twin, path: Path, common: dict) -> None:
    """observations.nc: the observations of the written cycles with their O-B and O-A."""
    obs = tw.recorder.observations

    def column(key: str, dtype: type = np.float64) -> np.ndarray:
        return torch.cat([torch.as_tensor(o[key]) for o in obs]).numpy().astype(dtype) if obs else np.zeros(0, dtype)

    times = np.concatenate([np.full(o["ids"].shape[0], o["time"]) for o in obs]) if obs else np.zeros(0)
    extra = {"omb": (("obs",), column("omb"), {"long_name": "observation minus background mean"}),
             "oma": (("obs",), column("oma"), {"long_name": "observation minus analysis mean"})}
    ds = io.observations_dataset(times, column("locations").reshape(-1, tw.grid.ndim), column("variable", np.int64),
                                 column("values"), column("error_std"), column("ids", np.int64),
                                 tw.grid, tw.model.variables, extra=extra, **common)
    io.write_netcdf_atomic(ds, path)


def summary_table(summary: dict) -> str:
    """The final table `twin run` prints."""
    rows = [("case", summary["case"]), ("method", summary["method"]), ("members", summary["members"]),
            ("cycles (burn-in)", f"{summary['cycles']} ({summary['burn_in']})")]
    for k in ("rmse_analysis", "rmse_forecast", "spread_analysis", "crps_analysis"):
        v = summary.get(k)
        rows.append((k, "n/a" if v is None else f"{v:.4f}"))
    held = summary.get("stations") or {}
    if held.get("withheld_rmse_analysis") is not None:
        rows.append(("withheld stations rmse", f"{held['withheld_rmse_background']:.4f} (background) -> "
                                                f"{held['withheld_rmse_analysis']:.4f} (analysis)"))
    cps = summary.get("cycles_per_second")
    rows.append(("cycles/s", "n/a" if cps is None else f"{cps:.1f}"))
    rows.append(("wall seconds", f"{summary.get('wall_seconds') or 0:.1f}"))
    if "out" in summary:
        rows.append(("output", summary["out"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
