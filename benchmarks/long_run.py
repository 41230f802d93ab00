"""Long-run stability and memory: the twin for many cycles, RSS after 100 cycles and at the end.

Run: `.venv/bin/python benchmarks/long_run.py [--case cases/lorenz96_letkf.yaml] [--cycles 2000]`.
Prints RMSE / spread over the run, whether any NaN appeared, and resident memory (current and
peak) after 100 cycles and after all cycles, so a leak shows as growth beyond what the recorder
keeps for the output files (reported alongside).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from twin import Twin


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recorded_mib(tw: Twin) -> float:
    rec = tw.recorder
    tensors = rec.analysis + rec.analysis_spread + rec.background_mean + rec.background_spread + rec.truth
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="cases/lorenz96_letkf.yaml")
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    tw = Twin.from_yaml(args.case, [f"run.cycles={args.cycles}", "run.burn_in=50", *args.set])
    rows = []
    start = time.perf_counter()
    for done in (100, args.cycles):
        tw.run(done - tw.cycle)
        rows.append((done, rss_mib(), peak_mib(), recorded_mib(tw), bool(torch.isfinite(tw.ensemble).all())))
    s = tw.summary()
    print(f"{args.case}: {args.cycles} cycles in {time.perf_counter() - start:.1f} s, "
          f"rmse_analysis {s['rmse_analysis']:.4f}, spread {s['spread_analysis']:.4f}")
    print(f"{'cycles':>7} {'RSS MiB':>8} {'peak MiB':>9} {'recorded MiB':>13} finite")
    for r in rows:
        print(f"{r[0]:>7} {r[1]:>8.1f} {r[2]:>9.1f} {r[3]:>13.2f} {r[4]}")
    rmse = tw.recorder.series()["rmse_analysis"]
    print(f"per-cycle rmse: max {np.nanmax(rmse):.3f}, last-100 mean {np.nanmean(rmse[-100:]):.3f}")


if __name__ == "__main__":
    main()
