"""The single-step (consistency, CRPS-tuned) sampler against the 18-step EDM Heun sampler, side by side.

Both samplers come from the same checkpoint. For each: wall time of one forecast step of an ensemble
(`--members`, the 64 x 64 SQG grid, float32, one torch thread), timed interleaved — Heun, single,
Heun, single, ... — with the median over `--repeats`; then skill on held-out truth runs (seeds unseen
in training, initial times 2 days apart, ensembles started from the true state): RMSE of the mean,
spread/skill and fair CRPS per lead, with the climatological CRPS for reference. Prints a table of
ratios (Heun time / single-step time; single-step CRPS / Heun CRPS).

    python benchmarks/emulator_samplers.py [CHECKPOINT] [--members 8] [--leads 4] [--runs 2] [--inits 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from emulators.diffusion.checkpoint import SHIPPED_SQG  # noqa: E402
from emulators.diffusion.emulator import DiffusionEmulator  # noqa: E402
from emulators.diffusion.skill import ensemble_skill, truth_runs  # noqa: E402
from emulators.registry import model_registry  # noqa: E402
from twin.domain import SerialDomain  # noqa: E402


def emulator(checkpoint: str, sampler: str, steps: int) -> DiffusionEmulator:
    cfg = DiffusionEmulator.Config(checkpoint=checkpoint, sampler=sampler, steps=steps)
    return DiffusionEmulator(cfg, SerialDomain(DiffusionEmulator.global_grid(cfg)), torch.float32)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default=SHIPPED_SQG)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--heun-steps", type=int, default=18)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--leads", type=int, default=4)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--inits", type=int, default=4)
    p.add_argument("--seed", type=int, default=9000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    samplers = {"heun": emulator(args.checkpoint, "heun", args.heun_steps),
                "single_step": emulator(args.checkpoint, "single_step", 1)}
    em = samplers["heun"]
    truth_cfg = model_registry["sqg"].Config(size=em.grid.shape[0])
    stride = round(2 * 86400 / em.dt)
    truth = truth_runs("sqg", truth_cfg, list(range(args.seed, args.seed + args.runs)), 50 * 86400, em.dt,
                       (args.inits - 1) * stride + args.leads + 1).float()
    climate = truth_runs("sqg", truth_cfg, [args.seed + 500], 50 * 86400, 10 * 86400, args.members).float()[0]
    x = truth[0, 0].expand(args.members, -1, -1, -1).clone()
    times: dict[str, list[float]] = {k: [] for k in samplers}
    for name, s in samplers.items():  # warm-up
        s.step(x, 0.0)
    for r in range(args.repeats):
        for name, s in samplers.items():
            t0 = time.perf_counter()
            s.step(x, (r + 1) * s.dt)
            times[name].append(time.perf_counter() - t0)
    skill = {name: ensemble_skill(s, truth, args.members, args.leads, stride, climate) for name, s in samplers.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint {args.checkpoint}; {args.members} members, 64 x 64 x 2, float32, 1 thread; "
          f"{skill['heun'][0]['forecasts']} forecasts from held-out truth")
    print(f"time per forecast step (median of {args.repeats}): Heun-{args.heun_steps} {median['heun']:.3f} s, "
          f"single-step {median['single_step']:.4f} s, speed-up {median['heun'] / median['single_step']:.1f}x")
    print(f"{'lead':>5} | {'RMSE heun':>9} {'single':>7} {'persist':>7} | {'spr/skl heun':>12} {'single':>6} | "
          f"{'CRPS heun':>9} {'single':>7} {'clim':>6} | {'CRPS single/heun':>16}")
    for h, s in zip(skill["heun"], skill["single_step"]):
        print(f"{h['lead_hours']:>4.0f}h | {h['rmse']:>9.3f} {s['rmse']:>7.3f} {h['rmse_persistence']:>7.3f} | "
              f"{h['spread_skill']:>12.2f} {s['spread_skill']:>6.2f} | {h['crps']:>9.3f} {s['crps']:>7.3f} "
              f"{h['crps_climatology']:>6.3f} | {s['crps'] / h['crps']:>16.2f}")
    print(json.dumps({"median_seconds": median, "skill": skill}))


if __name__ == "__main__":
    main()
