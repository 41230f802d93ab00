"""Strong and weak scaling of the decomposed twin under mpiexec, side by side in one run.

Run: `.venv/bin/python benchmarks/mpi_scaling.py [--size 1000000] [--cycles 3] [--repeats 2]`.

Strong scaling: L96 with EnSF (paired, 100 pseudo-steps, float32, 20 members, subdomains across
ranks) at `--size` variables, on 1 rank x 1 thread, 1 rank x 2 threads and 2 ranks x 1 thread;
the speed-up is cycles/s (assimilate-and-forecast loop, DESIGN's definition) relative to 1 x 1.
Weak scaling: `--size / 2` variables per rank on 1, 2 and 4 ranks (4 ranks oversubscribe the 2
cores: marked). Also measured: the bytes one rank sends per cycle (halo exchanges of the RK4 stages),
for the cluster estimate printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "cases" / "lorenz96_1m_ensf.yaml"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def run(ranks: int, threads: int, size: int, cycles: int) -> float:
    """cycles/s of one `twin run` (median taken by the caller)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = [f"model.size={size}", f"run.cycles={cycles}", "run.burn_in=1", f"run.threads={threads}",
                "truth.spinup_steps=50", "assimilation.stages.0.steps=100", "output.every=1000"]
        cmd = [sys.executable, "-m", "twin.cli", "run", str(CASE), "--out", str(out), "--quiet"]
        for s in sets:
            cmd += ["--set", s]
        if ranks > 1:
            cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
        return json.loads((out / "summary.json").read_text())["cycles_per_second"]


def median_rate(ranks: int, threads: int, size: int, cycles: int, repeats: int) -> float:
    return statistics.median(run(ranks, threads, size, cycles) for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    n, c, r = args.size, args.cycles, args.repeats
    base = median_rate(1, 1, n, c, r)
    rows = [("1 rank x 1 thread", base), ("1 rank x 2 threads", median_rate(1, 2, n, c, r)),
            ("2 ranks x 1 thread", median_rate(2, 1, n, c, r))]
    print(f"Strong scaling, L96 n={n} EnSF (paired, 100 steps, float32, 20 members), {c} cycles, median of {r}")
    print(f"{'layout':<22} {'cycles/s':>9} {'speed-up':>9}")
    for name, rate in rows:
        print(f"{name:<22} {rate:>9.4f} {rate / base:>9.2f}")
    per_rank = n // 2
    weak = [(k, median_rate(k, 1, per_rank * k, c, r)) for k in (1, 2, 4)]
    print(f"\nWeak scaling, {per_rank} variables per rank (4 ranks oversubscribe the 2 cores)")
    print(f"{'ranks':>5} {'cycles/s':>9} {'efficiency':>10}")
    for k, rate in weak:
        mark = "  (oversubscribed)" if k > 2 else ""
        print(f"{k:>5} {rate:>9.4f} {rate / weak[0][1]:>10.2f}{mark}")
    # cluster estimate: per cycle a rank exchanges 2 halo points each side per RK4 stage per member
    members, steps, stages, halo, itemsize = 20, 10, 4, 2, 4
    halo_bytes = 2 * halo * members * itemsize * stages * steps
    compute = 1.0 / weak[0][1]
    print(f"\nPer rank per cycle: {halo_bytes / 1024:.1f} KiB of halo messages in {2 * stages * steps} exchanges; "
          f"compute {compute:.2f} s for {per_rank} points")
    for ranks in (64, 1024):
        latency, bandwidth = 5e-6, 5e9  # a typical cluster interconnect (assumed, not measured here)
        comm = 2 * stages * steps * latency + halo_bytes / bandwidth
        print(f"{ranks:>5} ranks at {per_rank} points each: communication {comm * 1e3:.2f} ms/cycle vs compute "
              f"{compute * 1e3:.0f} ms/cycle -> weak-scaling efficiency ~{compute / (compute + comm):.3f}")


if __name__ == "__main__":
    main()
