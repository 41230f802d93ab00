"""Strong and weak scaling of the decomposed twin under mpiexec, side by side in one run.

Run: `.venv/bin/python benchmarks/mpi_scaling.py [--part all|l96|sqg] [--size 1000000] [--cycles 3]
[--repeats 3]`. Every layout is run once per repeat, layouts interleaved (A B C A B C ...), and the
median is reported; one torch thread per rank unless a row says otherwise.

L96: EnSF (paired, 100 pseudo-steps, float32, 20 members, subdomains across ranks) at `--size`
variables, on 1 rank x 1 thread, 1 rank x 2 threads and 2 ranks x 1 thread, through `twin run`
(cycles/s: the assimilate-and-forecast loop, DESIGN's definition). Weak scaling: `--size / 2`
variables per rank on 1, 2 and 4 ranks (4 ranks oversubscribe the 2 cores: marked). One rank at
`--size / 64` and `--size / 1024` variables gives the per-rank compute of a 64- and 1024-rank run.

SQG emulator: the diffusion emulator (the shipped weights, `SHIPPED_SQG`; its
single-step sampler if the checkpoint has one, else Heun with 4 steps) as forecast and truth model on
the 64 x 64 x 2 grid, float32, 8 members, paired EnSF (100 pseudo-steps, implicit) of 10 % of the
points every 6 h step. Layouts: 1 rank x 1 and x 2 threads; 2 ranks with the members split
(`domain.ranks_per_member: 1`) or the grid split (`ranks_per_member: 2`); weak scaling with 4
members per rank on 1, 2, 4 ranks (members split). Timed in-process (`--worker`, 20 cycles after 2
untimed ones): loop cycles/s and
rank 0's seconds per cycle in the forecast (including the members' all-gather) and in the rest (the
analysis). The cluster estimates at the end combine these measured times with message sizes from the
code paths and an assumed network (2 us latency, 10 GB/s per link).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
L96_CASE = ROOT / "cases" / "lorenz96_1m_ensf.yaml"
WEIGHTS = ROOT / "emulators" / "weights"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
LATENCY, BANDWIDTH = 2e-6, 10e9  # assumed cluster interconnect (not measured here)
WARM_UP = 2  # SQG emulator: untimed first cycles
SQG_CASE = """
name: sqg-emulator-scaling
model: {{kind: diffusion, checkpoint: {checkpoint}, sampler: {sampler}, steps: 4, seed: 7}}
truth: {{seed: 1, spinup_steps: 2}}
observations: {{operator: identity, every: 1, error_std: 1.0, fraction: 0.1, seed: 3}}
ensemble: {{size: 8, init_spread: 2.0, seed: 2}}
assimilation: {{stages: [{{method: ensf, steps: 100, likelihood_step: implicit}}]}}
run: {{cycles: 22, burn_in: 1, dtype: float32}}
output: {{every: 1000, members: mean, figures: false}}
"""


def launch(ranks: int, threads: int, cmd: list[str]) -> None:
    if ranks > 1:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)


def l96_rate(ranks: int, threads: int, size: int, cycles: int) -> float:
    """cycles/s of one `twin run` of the L96 EnSF case."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = [f"model.size={size}", f"run.cycles={cycles}", "run.burn_in=1", f"run.threads={threads}",
                "truth.spinup_steps=50", "assimilation.stages.0.steps=100", "output.every=1000"]
        cmd = [sys.executable, "-m", "twin.cli", "run", str(L96_CASE), "--out", str(out), "--quiet"]
        for s in sets:
            cmd += ["--set", s]
        launch(ranks, threads, cmd)
        return json.loads((out / "summary.json").read_text())["cycles_per_second"]


def sqg_case(folder: Path) -> tuple[Path, str, int, int]:
    """The SQG emulator case file (written into `folder`), a description of its sampler, the network's
    receptive halo and its calls per step."""
    import torch

    from emulators.diffusion.checkpoint import SHIPPED_SQG, load_checkpoint
    from emulators.diffusion.emulator import DiffusionEmulator
    from twin.domain import SerialDomain

    name = SHIPPED_SQG
    sampler = "single_step" if load_checkpoint(name).single_step else "heun"
    path = folder / "sqg_emulator.yaml"
    path.write_text(SQG_CASE.format(checkpoint=name, sampler=sampler))
    config = DiffusionEmulator.Config(checkpoint=name, sampler=sampler, steps=4)
    em = DiffusionEmulator(config, SerialDomain(DiffusionEmulator.global_grid(config)), torch.float32)
    calls = 1 if sampler == "single_step" else 2 * config.steps - 1
    return path, f"{name}, {sampler}, {calls} network call(s) a step", em.receptive_halo, calls


def sqg_times(case: Path, ranks: int, threads: int, ranks_per_member: int, members: int) -> dict:
    """{cycles_per_second, forecast, analysis} (s per cycle, rank 0) of one `--worker` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        sets = [f"run.threads={threads}", f"domain.ranks_per_member={ranks_per_member}",
                f"ensemble.size={members}"]
        launch(ranks, threads, [sys.executable, __file__, "--worker", str(case), str(out),
                                *(arg for s in sets for arg in ("--set", s))])
        return json.loads(out.read_text())


def worker(case: str, out: str, overrides: list[str]) -> None:
    """Run the case in-process (under mpiexec or alone), the first `WARM_UP` cycles untimed; rank 0
    writes its timings to `out`."""
    from twin.twin import Twin

    tw = Twin.from_yaml(case, overrides)
    tw.run(WARM_UP)  # first calls (allocator, kernel selection) are slower
    spent, warm_loop = [0.0], tw.loop_seconds
    forecast = tw.forecast

    def timed_forecast():
        start = time.perf_counter()
        result = forecast()
        spent[0] += time.perf_counter() - start
        return result

    tw.forecast = timed_forecast
    tw.run()
    if tw.domain.rank == 0:
        cycles = tw.cycle - WARM_UP
        per_cycle, f = (tw.loop_seconds - warm_loop) / cycles, spent[0] / cycles
        Path(out).write_text(json.dumps({"cycles_per_second": 1.0 / per_cycle, "forecast": f,
                                         "analysis": per_cycle - f}))


def medians(layouts: dict, repeats: int, measure) -> dict:
    """Median over repeats of measure(*layout) per layout, the layouts interleaved in each repeat."""
    runs: dict = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, args in layouts.items():
            runs[name].append(measure(*args))
    if isinstance(next(iter(runs.values()))[0], dict):
        return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    return {name: statistics.median(rs) for name, rs in runs.items()}


def comm_seconds(messages: int, total_bytes: float) -> float:
    return messages * LATENCY + total_bytes / BANDWIDTH


def l96_part(n: int, cycles: int, repeats: int) -> None:
    strong = medians({"1 rank x 1 thread": (1, 1, n, cycles), "1 rank x 2 threads": (1, 2, n, cycles),
                      "2 ranks x 1 thread": (2, 1, n, cycles)}, repeats, l96_rate)
    base = strong["1 rank x 1 thread"]
    print(f"Strong scaling, L96 n={n} EnSF (paired, 100 steps, float32, 20 members), {cycles} cycles, "
          f"median of {repeats}")
    print(f"{'layout':<22} {'cycles/s':>9} {'speed-up':>9}")
    for name, rate in strong.items():
        print(f"{name:<22} {rate:>9.4f} {rate / base:>9.2f}")
    per_rank = n // 2
    weak = medians({k: (k, 1, per_rank * k, cycles) for k in (1, 2, 4)}, repeats, l96_rate)
    print(f"\nWeak scaling, {per_rank} variables per rank (4 ranks oversubscribe the 2 cores)")
    print(f"{'ranks':>5} {'cycles/s':>9} {'efficiency':>10}")
    for k, rate in weak.items():
        mark = "  (oversubscribed)" if k > 2 else ""
        print(f"{k:>5} {rate:>9.4f} {rate / weak[1]:>10.2f}{mark}")
    # per cycle a rank exchanges 2 halo points each side per RK4 stage per member (10 steps a cycle)
    members, steps, stages, halo, itemsize = 20, 10, 4, 2, 4
    messages = 2 * stages * steps
    halo_bytes = messages * halo * members * itemsize
    small = medians({p: (1, 1, n // p, 20) for p in (64, 1024)}, repeats, l96_rate)
    print(f"\nPer rank per cycle: {halo_bytes / 1024:.1f} KiB of halo in {messages} messages, plus one "
          f"all-reduce of the scores (log2(ranks) latencies); network assumed {LATENCY * 1e6:.0f} us, "
          f"{BANDWIDTH / 1e9:.0f} GB/s")
    t_full = 1.0 / base
    for p in (64, 1024):
        comm = comm_seconds(messages + math.ceil(math.log2(p)), halo_bytes)
        t_weak = 1.0 / weak[1]
        t_local = 1.0 / small[p]
        print(f"{p:>5} ranks: weak ({per_rank} points/rank) efficiency ~{t_weak / (t_weak + comm):.4f} "
              f"(comm {comm * 1e3:.2f} ms vs compute {t_weak * 1e3:.0f} ms); strong (n={n}: {n // p} "
              f"points/rank, measured {t_local * 1e3:.1f} ms/cycle on 1 rank) efficiency "
              f"~{t_full / (p * (t_local + comm)):.3f}")


def sqg_part(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        case, what, halo, calls = sqg_case(Path(tmp))
        layouts = {"1 rank x 1 thread": (case, 1, 1, 1, 8), "1 rank x 2 threads": (case, 1, 2, 1, 8),
                   "2 ranks, members split": (case, 2, 1, 1, 8), "2 ranks, grid split": (case, 2, 1, 2, 8)}
        strong = medians(layouts, repeats, sqg_times)
        weak = medians({k: (case, k, 1, 1, 4 * k) for k in (1, 2, 4)}, repeats, sqg_times)
    base = strong["1 rank x 1 thread"]
    print(f"\nSQG emulator ({what}), 64 x 64 x 2, float32, 8 members, paired EnSF 100 steps, "
          f"median of {repeats}; seconds per cycle on rank 0")
    print(f"{'layout':<24} {'cycles/s':>9} {'speed-up':>9} {'forecast s':>11} {'analysis s':>11}")
    for name, t in strong.items():
        rate = t["cycles_per_second"]
        print(f"{name:<24} {rate:>9.3f} {rate / base['cycles_per_second']:>9.2f} {t['forecast']:>11.3f} "
              f"{t['analysis']:>11.3f}")
    print("\nWeak scaling, 4 members per rank, members split (4 ranks oversubscribe the 2 cores)")
    print(f"{'ranks':>5} {'members':>7} {'cycles/s':>9} {'efficiency':>10} {'forecast s':>11} "
          f"{'analysis s':>11}")
    for k, t in weak.items():
        mark = "  (oversubscribed)" if k > 2 else ""
        print(f"{k:>5} {4 * k:>7} {t['cycles_per_second']:>9.3f} "
              f"{t['cycles_per_second'] / weak[1]['cycles_per_second']:>10.2f} {t['forecast']:>11.3f} "
              f"{t['analysis']:>11.3f}{mark}")
    # the grid split's halo: the receptive halo, no alignment slack for 32-row tiles (multiples of 4); one rank
    # holding the whole periodic grid (1 rank, members split) wraps its convolutions and reads no halo
    ny, nx, variables, itemsize = 64, 64, 2, 4
    window, whole = (ny // 2 + 2 * halo) * (nx + 2 * halo), ny * nx
    print(f"\nGrid split: a 32-row tile reads {2 * halo} halo rows (+{2 * halo / (ny // 2):.0%} rows); its "
          f"input window is {window} points against the {whole} of the whole grid, which one rank evaluates "
          f"with wrapped convolutions (no halo): 2 tiles read {2 * window / whole:.2f}x the serial input (less "
          f"in deeper layers: valid convolutions shrink it)")
    member_bytes = variables * ny * nx * itemsize
    halo_msg = halo * nx * variables * itemsize  # one member, one side, one exchange
    f1 = base["forecast"] / 8  # measured forecast seconds per member and cycle
    a1 = base["analysis"] / 8  # measured analysis seconds per member and cycle (every group runs all members)
    print(f"Measured on 1 rank: forecast {f1 * 1e3:.0f} ms and analysis {a1 * 1e3:.1f} ms per member and "
          f"cycle; grid split: {2 * (calls + 1)} halo messages a step, {halo_msg / 1024:.1f} KiB per member "
          f"each")
    for p in (64, 1024):
        m = 4 * p  # weak scaling: 4 members per rank, members split (one rank per group)
        gather = comm_seconds(math.ceil(math.log2(p)), (m - 4) * member_bytes)
        t = 4 * f1 + m * a1 + gather
        local_analysis = 4 * f1 + 4 * a1 + gather
        print(f"{p:>5} ranks, {m} members: all-gather {gather * 1e3:.1f} ms, redundant analysis of all "
              f"members {m * a1:.2f} s -> efficiency ~{(4 * f1 + 4 * a1) / t:.3f}; with the analysis split "
              f"over members too ~{(4 * f1 + 4 * a1) / local_analysis:.3f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        case, out, *rest = sys.argv[2:]
        worker(case, out, [v for flag, v in zip(rest[::2], rest[1::2]) if flag == "--set"])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "l96", "sqg"), default="all")
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.part in ("all", "l96"):
        l96_part(args.size, args.cycles, args.repeats)
    if args.part in ("all", "sqg"):
        sqg_part(args.repeats)


if __name__ == "__main__":
    main()
