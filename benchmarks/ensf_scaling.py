"""Analysis wall time of EnSF (SDE, ODE) and LETKF against a measured memory-bandwidth floor.

For each state size n (Lorenz-96-like ring, one variable, all points observed through arctan with
σ_o = 0.05, N members, float32 by default) it times one analysis of

- `ensf-sde`: paired EnSF, reverse SDE (2 N n keyed normals per pseudo-step),
- `ensf-ode`: paired EnSF, probability-flow ODE (normals only for z_1),
- `letkf`: inflation 1.03, Gaspari–Cohn radius 6 (its taper is dense (n, n): sizes above
  `--letkf-max` are skipped; the taper build is excluded, it is cached between cycles),

and, interleaved with them in the same run, the floor: one in-place axpy over the (N, n) float32
ensemble per pseudo-step, i.e. `steps` axpys. Medians over `--repeats`; ratio = time / floor.
Threads are pinned to one (torch and numpy's BLAS); run it on an otherwise idle machine.

    python benchmarks/ensf_scaling.py [--sizes 40 1000 ...] [--members 20] [--steps 100] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

from assim.ensf import Ensf  # noqa: E402
from assim.letkf import Letkf  # noqa: E402
from assim.observations import ObservationBatch  # noqa: E402
from assim.operators import ArctanOperator  # noqa: E402
from assim.stages import AnalysisContext  # noqa: E402
from twin.domain import Grid, SerialDomain  # noqa: E402
from twin.random import Streams  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


Problem = tuple[torch.Tensor, ObservationBatch, AnalysisContext]


def problem(n: int, members: int, dtype: torch.dtype) -> Problem:
    """A random L96-like truth (8 + 3.5 ξ), prior members truth + ξ, arctan observations of every point."""
    grid = Grid((n,), (True,), dims=("x",))
    streams = Streams(7)
    idx = torch.arange(n)
    truth = (8.0 + 3.5 * streams.normal("test", (0,), idx)).to(dtype).view(1, n)
    ens = torch.empty(members, 1, n, dtype=dtype)
    for m in range(members):
        ens[m, 0] = truth[0] + streams.normal("test", (1, m), idx).to(dtype)
    op = ArctanOperator(grid, idx)
    y = op(truth) + 0.05 * streams.normal("test", (2,), idx).to(dtype)
    obs = ObservationBatch(0.0, y, torch.full((n,), 0.05, dtype=dtype), idx, op)
    return ens, obs, AnalysisContext(grid, SerialDomain(grid), streams, 0)


def floor(ens: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` in-place axpys over the ensemble (the memory-bandwidth floor)."""
    z = ens.reshape(ens.shape[0], -1).clone()
    x = ens.reshape(ens.shape[0], -1)
    start = time.perf_counter()
    for _ in range(steps):
        z.add_(x, alpha=1e-3)
    return time.perf_counter() - start


def timed(fn, *args) -> float:
    start = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - start
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("non-finite analysis")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[40, 1000, 10_000, 100_000, 1_000_000])
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--letkf-max", type=int, default=10_000, help="largest size the LETKF is timed at")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    methods = {
        "ensf-sde": Ensf(Ensf.Config(steps=args.steps, integrator="sde")),
        "ensf-ode": Ensf(Ensf.Config(steps=args.steps, integrator="ode")),
        "letkf": Letkf(Letkf.Config(inflation=1.03, localization_radius=6.0)),
    }
    print(f"members {args.members}, pseudo-steps {args.steps}, {args.dtype}, repeats {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f}")
    head = f"{'n':>9} {'floor ms':>9} " + " ".join(f"{m + ' ms':>12} {'x floor':>8}" for m in methods)
    print(head)
    for n in args.sizes:
        ens, obs, ctx = problem(n, args.members, DTYPES[args.dtype])
        active = {k: v for k, v in methods.items() if k != "letkf" or n <= args.letkf_max}
        if "letkf" in active:
            active["letkf"](ens, obs, ctx)  # builds and caches the taper (not timed)
        times: dict[str, list[float]] = {k: [] for k in ["floor", *active]}
        for _ in range(args.repeats):
            times["floor"].append(floor(ens, args.steps))
            for name, stage in active.items():
                times[name].append(timed(stage, ens, obs, ctx))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = []
        for name in methods:
            if name in med:
                cells.append(f"{med[name] * 1e3:>12.1f} {med[name] / med['floor']:>8.1f}")
            else:
                cells.append(f"{'skipped':>12} {'-':>8}")
        print(f"{n:>9} {med['floor'] * 1e3:>9.1f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
