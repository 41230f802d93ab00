"""Partial observations: classic inpainting (baseline) against learned RePaint inpainting, side by side.

Runs cases/sqg_partial_obs.yaml and cases/sqg_partial_obs_learned.yaml (same truth, observations and
ensemble) cycle by cycle and accumulates, after burn-in, the analysis-mean RMSE against the truth over
three regions: theta_bottom where it is observed (x < 32), theta_bottom where it is not (x ≥ 32), and
theta_top (never observed). Prints a table with the ratio learned / baseline (< 1: learned is better).

    python benchmarks/partial_obs.py [--cycles 60] [--burn-in 10] [--set truth.seed=2 ...]

`--set KEY=VALUE` overrides both cases alike (other seeds: another realisation of the comparison).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from twin.twin import Twin  # noqa: E402

CASES = Path(__file__).resolve().parents[1] / "cases"
REGIONS = ("theta_bottom observed half", "theta_bottom unobserved half", "theta_top (unobserved)")


def region_errors(mean: torch.Tensor, truth: torch.Tensor, west: int) -> list[float]:
    """Mean squared error of the analysis mean per region; mean, truth (variable, y, x)."""
    err = (mean - truth).double().square()
    return [float(err[0, :, :west].mean()), float(err[0, :, west:].mean()), float(err[1].mean())]


def run(case: str, cycles: int, burn_in: int, overrides: list[str]) -> dict:
    tw = Twin.from_yaml(CASES / case, [f"run.cycles={cycles}", f"run.burn_in={burn_in}", *overrides])
    region = tw.case.observations.region
    west = region[1][1] if region else tw.grid.shape[1]
    total, n, t0 = [0.0, 0.0, 0.0], 0, time.perf_counter()
    for cycle in range(cycles):
        tw.assimilate()
        if cycle >= burn_in:
            total = [a + b for a, b in zip(total, region_errors(tw.ensemble.mean(0), tw.truth, west))]
            n += 1
        tw.forecast()
    return {"rmse": [math.sqrt(t / n) for t in total], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=60)
    p.add_argument("--burn-in", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of both cases")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = run("sqg_partial_obs.yaml", args.cycles, args.burn_in, args.set)
    learned = run("sqg_partial_obs_learned.yaml", args.cycles, args.burn_in, args.set)
    settings = "".join(" " + o for o in args.set)
    print(f"analysis-mean RMSE (K), cycles {args.burn_in}..{args.cycles - 1}{settings}; "
          f"wall {base['seconds']:.0f} s (baseline), {learned['seconds']:.0f} s (learned)")
    print(f"{'region':<30} {'baseline':>9} {'learned':>9} {'learned/baseline':>17}")
    for name, b, le in zip(REGIONS, base["rmse"], learned["rmse"]):
        print(f"{name:<30} {b:>9.3f} {le:>9.3f} {le / b:>17.2f}")
    print(json.dumps({"baseline": base, "learned": learned}))


if __name__ == "__main__":
    main()
