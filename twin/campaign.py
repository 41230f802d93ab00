"""Hindcast campaigns: ensemble forecasts from many initial times, spread over MPI rank groups.

A campaign names a base case and the initial times. Each forecast is the base case started at its
initial time (the nature run spun up that much further), with the ensemble drawn around the truth and
no assimilation, run for `lead_cycles` cycles; it writes its own run folder. Ranks are split into
groups of `ranks_per_forecast` (`Comm.Split`), the groups take forecasts in turn. A finished forecast
folder (no `.partial`) is skipped on rerun, so an interrupted campaign only computes what is missing.
Skill per lead time goes to `campaign_summary.json` and `.csv` (dims `init_time`, `lead_time`).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin.config import ConfigError, load_case, parse_dataclass, read_yaml
from twin.domain import mpi_world

SCORES = ("rmse_forecast", "spread_forecast", "crps_analysis")


@dataclass(frozen=True)
class InitTimes:
    start: float = field(default=0.0, metadata={"min": 0, "help": "first initial time (model time after spin-up)"})
    stop: float = field(default=1.0, metadata={"help": "last initial time (inclusive)"})
    every: float = field(default=1.0, metadata={"gt": 0, "help": "interval between initial times"})


@dataclass(frozen=True)
class CampaignConfig:
    name: str
    base: str = field(metadata={"help": "base case file (relative to the campaign file)"})
    init_times: InitTimes = InitTimes()
    lead_cycles: int = field(default=10, metadata={"min": 1, "help": "forecast length in cycles"})
    members: int | None = field(default=None, metadata={"min": 2, "help": "ensemble size (null: the base case's)"})
    ranks_per_forecast: int = field(default=1, metadata={"min": 1, "help": "MPI ranks that share one forecast"})
    overrides: tuple[str, ...] = field(default=(), metadata={"help": "extra key=value overrides of the base case"})
    out: str = field(default="", metadata={"help": "output folder (default out/<name>)"})


def load_campaign(path: str | Path) -> CampaignConfig:
    file = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "a campaign file must be a YAML mapping")
    cfg = parse_dataclass(CampaignConfig, raw, "", file)
    if cfg.init_times.stop < cfg.init_times.start:
        raise ConfigError(file, "init_times.stop", "must be >= init_times.start")
    return cfg


def init_times(cfg: CampaignConfig) -> list[float]:
    it = cfg.init_times
    count = int(np.floor((it.stop - it.start) / it.every + 1e-9)) + 1
    return [it.start + i * it.every for i in range(count)]


def forecast_overrides(cfg: CampaignConfig, base_case: Any, init_time: float) -> list[str]:
    """The base case turned into one free ensemble forecast from `init_time`."""
    steps = int(round(init_time / base_case.model.config.dt))
    spinup = base_case.truth.spinup_steps + steps
    members = cfg.members or base_case.ensemble.size
    return [*cfg.overrides, f"truth.spinup_steps={spinup}", "assimilation.stages=[]",
            f"run.cycles={cfg.lead_cycles + 1}", "run.burn_in=0", f"ensemble.size={members}",
            "output.figures=false", "run.restart_every=0"]


def run_campaign(path: str | Path, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Run (or finish) a campaign; returns the campaign summary (rank 0; {} elsewhere)."""
    from twin.runner import run_case

    path = Path(path)
    cfg = load_campaign(path)
    base = (path.parent / cfg.base) if not Path(cfg.base).is_absolute() else Path(cfg.base)
    base_case = load_case(base, cfg.overrides)
    outdir = Path(out or cfg.out or f"out/{cfg.name}")
    times = init_times(cfg)
    world = mpi_world()
    rank, size = (world.Get_rank(), world.Get_size()) if world is not None else (0, 1)
    if size % cfg.ranks_per_forecast:
        raise ConfigError(str(path), "ranks_per_forecast", f"must divide the number of ranks ({size})")
    groups = size // cfg.ranks_per_forecast
    group = rank // cfg.ranks_per_forecast
    comm = world.Split(group, rank) if world is not None else None
    folders = [outdir / f"init_{i:04d}" for i in range(len(times))]
    todo = [i for i in range(len(times)) if not folders[i].is_dir()]
    mine = [i for i in todo if i % groups == group]
    bar = None
    if rank == 0 and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(times), initial=len(times) - len(todo), desc=cfg.name, unit="forecast")
    for i in mine:  # run_case restarts a leftover `.partial` folder from scratch
        run_case(base, tuple(forecast_overrides(cfg, base_case, times[i])), folders[i], quiet=True, comm=comm)
        if bar is not None:
            bar.update(min(groups, bar.total - bar.n))
    if world is not None:
        world.Barrier()
    if bar is not None:
        bar.close()
    if rank != 0:
        return {}
    summary = summarise(cfg, base_case, times, folders)
    write_summary(summary, outdir)
    return summary


def summarise(cfg: CampaignConfig, base_case: Any, times: list[float], folders: list[Path]) -> dict:
    """Skill per (init_time, lead_time) from the forecast folders, and its mean over init times."""
    from twin.io import read_dataset

    per_init = {s: [] for s in SCORES}
    for folder in folders:
        ds = read_dataset(folder / "analysis.nc")
        for s in SCORES:
            per_init[s].append(ds[s].values.astype(float))
    dt = base_case.model.config.dt * base_case.observations.every
    leads = [k * dt for k in range(cfg.lead_cycles + 1)]
    return {
        "campaign": cfg.name, "base": cfg.base, "init_time": times, "lead_time": leads,
        "lead_time_units": "model time units", "members": cfg.members or base_case.ensemble.size,
        "scores": {s: np.stack(v).tolist() for s, v in per_init.items()},
        "mean_over_init": {s: np.stack(v).mean(0).tolist() for s, v in per_init.items()},
    }


def write_summary(summary: dict, outdir: Path) -> None:
    from twin.io import atomic_output

    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_output(outdir / "campaign_summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_output(outdir / "campaign_summary.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["init_time", "lead_time", *SCORES])
        for i, t0 in enumerate(summary["init_time"]):
            for k, lead in enumerate(summary["lead_time"]):
                w.writerow([t0, lead, *(summary["scores"][s][i][k] for s in SCORES)])
