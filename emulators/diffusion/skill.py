"""Forecast skill of a diffusion emulator against held-out truth runs (for checkpoints and reports).

`python -m emulators.diffusion.skill CHECKPOINT [--sampler single_step] [--members 8] [--leads 12]
[--rollout-days 100] [--bands 4 10 16 22] ...` starts ensembles from exact truth states of fresh truth
runs (seeds unseen in training), steps them `leads` emulator steps, and prints per lead: RMSE of the
ensemble mean, of persistence, the spread (root mean ensemble variance), the spread/skill ratio
√((M+1)/M)·spread/RMSE, fair CRPS, and the fair CRPS of a climatological ensemble (M truth states ≥ 10
days apart from a separate run) on the same verifying states; `--bands` splits the mean's and
persistence's RMSE by wavenumber band (where an emulator's error lies). `--rollout-days` adds a free run
of one member from a truth state: the spatial θ variance per level over its last fifth against the truth
run's.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Sequence

import torch

from assim.metrics import band_mse
from emulators.diffusion.consistency import fair_crps_loss
from emulators.diffusion.emulator import SAMPLERS, SYMMETRIES, DiffusionEmulator
from emulators.registry import model_registry
from twin.domain import SerialDomain
from twin.random import Streams


def truth_runs(kind: str, config: object, seeds: list[int], spinup_s: float, every_s: float, count: int,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(runs, count, variables, y, x): spun-up truth runs sampled every `every_s` seconds."""
    cls = model_registry[kind]
    model = cls(config, SerialDomain(cls.global_grid(config)), dtype)
    shape = model.grid.shape
    noise = torch.cat([Streams(s).field_normal("truth", (0,), 1, len(model.variables), torch.arange(math.prod(shape)),
                                               shape, dtype) for s in seeds])
    x = model.initial_state(noise)
    advance = getattr(model, "integrate", None) or (lambda z, n: _steps(model, z, n))
    x = advance(x, math.ceil(spinup_s / model.dt))
    every = round(every_s / model.dt)
    out = [x]
    for _ in range(count - 1):
        x = advance(x, every)
        out.append(x)
    return torch.stack(out, dim=1)


def _steps(model: object, x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = model.step(x)  # type: ignore[attr-defined]
    return x


def ensemble_skill(emulator: DiffusionEmulator, truth: torch.Tensor, members: int, leads: int,
                   init_stride: int = 1, climatology: torch.Tensor | None = None,
                   bands: Sequence[int] = ()) -> list[dict]:
    """Scores per lead (1..leads) averaged over runs and initial times i = 0, stride, ... of `truth`;
    `climatology` (M', variables, y, x) adds the fair CRPS of that fixed ensemble per lead; `bands`
    (wavenumber edges) adds the RMSE per band of the ensemble mean and of persistence
    (`assim.metrics.band_mse`)."""
    runs, count = truth.shape[:2]
    acc = [dict(mse=0.0, mse_persistence=0.0, variance=0.0, crps=0.0, crps_climatology=0.0,
                band=torch.zeros(len(bands) + 1, dtype=torch.float64),
                band_persistence=torch.zeros(len(bands) + 1, dtype=torch.float64)) for _ in range(leads)]
    n = 0
    for r in range(runs):
        for i in range(0, count - leads, init_stride):
            ens = truth[r, i].expand(members, *truth.shape[2:]).clone()
            for k in range(leads):
                ens = emulator.step(ens, ((r * count + i) * leads + k) * emulator.dt)
                y = truth[r, i + k + 1]
                a = acc[k]
                error, persistence = ens.mean(0) - y, truth[r, i] - y
                a["mse"] += float(error.square().mean())
                a["mse_persistence"] += float(persistence.square().mean())
                if bands:
                    a["band"] += band_mse(error, bands).double().mean(0)
                    a["band_persistence"] += band_mse(persistence, bands).double().mean(0)
                a["variance"] += float(ens.var(0).mean())
                a["crps"] += float(fair_crps_loss(ens, y))
                if climatology is not None:
                    a["crps_climatology"] += float(fair_crps_loss(climatology, y))
            n += 1
    out = []
    for k, a in enumerate(acc):
        rmse, spread = math.sqrt(a["mse"] / n), math.sqrt(a["variance"] / n)
        row = {"lead_hours": (k + 1) * emulator.dt / 3600, "rmse": rmse,
               "rmse_persistence": math.sqrt(a["mse_persistence"] / n), "spread": spread,
               "spread_skill": math.sqrt((members + 1) / members) * spread / rmse, "crps": a["crps"] / n,
               "forecasts": n}
        if climatology is not None:
            row["crps_climatology"] = a["crps_climatology"] / n
        if bands:
            row["rmse_bands"] = (a["band"] / n).sqrt().tolist()
            row["rmse_persistence_bands"] = (a["band_persistence"] / n).sqrt().tolist()
        out.append(row)
    return out


def free_rollout(emulator: DiffusionEmulator, start: torch.Tensor, truth: torch.Tensor, steps: int) -> dict:
    """Run one member `steps` emulator steps from `start` (variables, y, x); compare the spatial variance
    per variable over the last fifth of the run with that of `truth` (times, variables, y, x)."""
    x = start[None].clone()
    variances, finite = [], True
    tail = max(1, steps // 5)
    for k in range(steps):
        x = emulator.step(x, (10**6 + k) * emulator.dt)
        if not torch.isfinite(x).all():
            finite = False
            break
        if k >= steps - tail:
            variances.append(x[0].flatten(1).var(1))
    truth_var = truth[-tail:].flatten(2).var(2).mean(0)
    ratio = (torch.stack(variances).mean(0) / truth_var).tolist() if finite else None
    return {"days": steps * emulator.dt / 86400, "finite": finite, "variance_ratio_per_variable": ratio,
            "max_abs": float(x.abs().max()) if finite else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--sampler", default="heun", choices=SAMPLERS)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--inits", type=int, default=6, help="initial times per run (2 days apart)")
    p.add_argument("--leads", type=int, default=2)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--churn", type=float, default=0.0)
    p.add_argument("--sigma-max", type=float, default=20.0)
    p.add_argument("--symmetries", default="none", choices=SYMMETRIES, help="members: conjugated members")
    p.add_argument("--symmetry-mean", type=int, default=1, help="conjugated samples averaged per member")
    p.add_argument("--residual-scale", type=float, default=1.0, help="scale of the sampled residual")
    p.add_argument("--rollout-days", type=float, default=0.0, help="free run length (0: none)")
    p.add_argument("--bands", type=int, nargs="*", default=[],
                   help="wavenumber edges: the mean's and persistence's RMSE per band, e.g. --bands 4 10 16 22")
    p.add_argument("--seed", type=int, default=9000, help="first truth seed (keep clear of training seeds)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DiffusionEmulator.Config(checkpoint=args.checkpoint, sampler=args.sampler, steps=args.steps,
                                   churn=args.churn, sigma_max=args.sigma_max, symmetries=args.symmetries,
                                   symmetry_mean=args.symmetry_mean, residual_scale=args.residual_scale)
    em = DiffusionEmulator(cfg, SerialDomain(DiffusionEmulator.global_grid(cfg)), torch.float32)
    truth_cfg = model_registry["sqg"].Config(size=em.grid.shape[0])
    stride = round(2 * 86400 / em.dt)
    t0 = time.perf_counter()
    truth = truth_runs("sqg", truth_cfg, list(range(args.seed, args.seed + args.runs)), 50 * 86400, em.dt,
                       (args.inits - 1) * stride + args.leads + 1).float()
    climate = truth_runs("sqg", truth_cfg, [args.seed + 500], 50 * 86400, 10 * 86400, args.members).float()[0]
    t1 = time.perf_counter()
    scores = ensemble_skill(em, truth, args.members, args.leads, stride, climate, args.bands)
    result = {"checkpoint": args.checkpoint, "sampler": args.sampler, "symmetries": args.symmetries,
              "symmetry_mean": args.symmetry_mean,
              "steps": args.steps, "churn": args.churn,
              "sigma_max": args.sigma_max, "members": args.members, "truth_seconds": round(t1 - t0, 1),
              "forecast_seconds": round(time.perf_counter() - t1, 1), "scores": scores}
    if args.rollout_days > 0:
        n = round(args.rollout_days * 86400 / em.dt)
        long_truth = truth_runs("sqg", truth_cfg, [args.seed + 501], 50 * 86400, em.dt, n + 1).float()[0]
        result["rollout"] = free_rollout(em, long_truth[0], long_truth, n)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
