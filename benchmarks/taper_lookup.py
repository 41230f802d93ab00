"""The ensemble regression's localisation taper: pairwise distances against the per-offset lookup.

EnSF's `unobserved: regression` needs the Gaspari-Cohn taper between every grid node and every observed
node each cycle (the observed points change). `taper_matrix` computes the G x p distances;
`node_taper` evaluates the taper once per grid offset and gathers it (Cartesian grids). Both are timed
interleaved on the same random observation sets, median over `--repeats`, one torch thread; the table
gives each median, the ratio and the largest difference (0 where the offsets round the same).

    python benchmarks/taper_lookup.py [--sizes 64 128] [--fraction 0.1] [--radii 1.93 4] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from assim.localization import node_taper, taper_matrix
from twin.domain import Grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="points per side (periodic)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the 2-level state observed")
    p.add_argument("--radii", type=float, nargs="+", default=[1.93, 4.0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| grid | observations | radius | pairwise (s) | lookup (s) | pairwise / lookup | max difference |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        grid = Grid((n, n), (True, True))
        count = round(args.fraction * 2 * grid.size)
        gen = torch.Generator().manual_seed(n)
        for radius in args.radii:
            times: dict[str, list[float]] = {"pairwise": [], "lookup": []}
            diff = 0.0
            for _ in range(args.repeats):
                index = torch.randperm(2 * grid.size, generator=gen)[:count] % grid.size
                coords = grid.coordinates()
                t0 = time.perf_counter()
                pairwise = taper_matrix(grid, coords, coords[index], radius)
                t1 = time.perf_counter()
                lookup = node_taper(grid, index, radius)
                t2 = time.perf_counter()
                times["pairwise"].append(t1 - t0)
                times["lookup"].append(t2 - t1)
                diff = max(diff, float((pairwise - lookup).abs().max()))
            a, b = (statistics.median(times[k]) for k in ("pairwise", "lookup"))
            print(f"| {n} x {n} | {count} | {radius} | {a:.4f} | {b:.4f} | **{a / b:.1f}** | {diff:.1e} |")


if __name__ == "__main__":
    main()
