"""DAPPER vs EarthTwin on the sakov2008 Lorenz-96 twin experiment, side by side in one process.

What it measures
----------------
DAPPER's ``dapper/mods/Lorenz96/sakov2008.py`` set-up: Lorenz-96 with Nx = 40, F = 8, RK4 with
dt = 0.05, all 40 variables observed at every model step with R = I. For each method it runs
DAPPER's filter and EarthTwin's ``Twin`` on the same settings and prints, per method:

* ``rmse.a`` of DAPPER (time average after burn-in of the analysis-mean RMSE, ``xp.avrgs.err.rms.a``)
  and ``rmse_analysis`` of EarthTwin (the same convention);
* cycles per second of each. DAPPER: ``cycles / wall time of xp.assimilate(HMM, xx, yy)`` (its
  per-cycle statistics included, progress bar and live plotting off; the truth and observations
  come from ``HMM.simulate()`` beforehand). EarthTwin, twice: ``summary["cycles_per_second"]``
  ("loop": the assimilate-and-forecast loop only; EarthTwin simulates its nature run before the
  loop and scores the cycles in batches after it) and the wall time of ``Twin.run()`` with the
  nature run simulated beforehand ("+score": loop plus scoring, the like-for-like number);
* the throughput ratios EarthTwin / DAPPER (above 1: EarthTwin is faster).

Methods (DAPPER's suggested tunings; ``ref`` is the rmse.a that DAPPER's file quotes):

* ``letkf``        LETKF N = 7, inflation 1.04, localisation radius 4 (GC), rotation   (ref 0.22)
* ``enkf-sqrt``    EnKF 'Sqrt' N = 24, inflation 1.013, rotation                        (ref 0.18)
* ``enkf-pertobs`` EnKF 'PertObs' N = 40, inflation 1.06                                (ref 0.22)

The two libraries draw their own truth and observations (different random generators), so the RMSEs
agree statistically, not digit for digit. DAPPER's truth and observations are simulated once with a
fixed seed and shared by all its methods; each DAPPER filter run is re-seeded identically, so its
repeats give the same RMSE. Timings are medians over ``--repeats`` runs (the DAPPER and EarthTwin
runs are interleaved) because small machines are noisy. For fairness every thread pool is pinned to
one thread: OMP/MKL/OPENBLAS/NUMEXPR_NUM_THREADS=1 are set before numpy or torch is imported,
``torch.set_num_threads(1)``, and threadpoolctl limits numpy's BLAS to one thread.

How to run
----------
DAPPER is a benchmark-only dependency (never a test dependency) and lives in its own venv::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0    # the CPU build; never a bare `torch`
    .venv-bench/bin/pip install dapper           # 1.7.1 works on Python 3.11 with numpy 2.x
    .venv-bench/bin/pip install -e .             # EarthTwin itself

    make bench-dapper     # = .venv-bench/bin/python benchmarks/dapper_l96.py
    .venv-bench/bin/python benchmarks/dapper_l96.py --cycles 1100 --burn-in 100 --repeats 3 \\
        --methods letkf enkf-sqrt

Without an importable ``twin`` (or without the case files) the EarthTwin columns say why and
DAPPER's numbers are still printed.
"""
from __future__ import annotations

import os

# Pin every thread pool before numpy / scipy / torch are imported (they read these at load time).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
for _var in THREAD_ENV:
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DT = 0.05  # sakov2008's model (and observation) step


@dataclass(frozen=True)
class MethodSpec:
    """One filter configuration, as DAPPER builds it and as an EarthTwin case file states it."""

    key: str
    label: str
    reference_rmse: float
    make_dapper: Callable[[Any], Any]  # dapper.da_methods module -> xp
    case_file: str  # relative to the repository root
    case_overrides: tuple[str, ...] = field(default_factory=tuple)


METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in (
        MethodSpec(
            "letkf", "LETKF N=7 infl=1.04 loc=4 rot", 0.22,
            lambda da: da.LETKF(N=7, infl=1.04, loc_rad=4, rot=True),
            "cases/lorenz96_letkf.yaml",
        ),
        MethodSpec(
            "enkf-sqrt", "EnKF-Sqrt N=24 infl=1.013 rot", 0.18,
            lambda da: da.EnKF("Sqrt", N=24, infl=1.013, rot=True),
            "cases/lorenz96_enkf.yaml",
        ),
        MethodSpec(
            "enkf-pertobs", "EnKF-PertObs N=40 infl=1.06", 0.22,
            lambda da: da.EnKF("PertObs", N=40, infl=1.06),
            "cases/lorenz96_enkf.yaml",
            ("ensemble.size=40", "assimilation.stages.0.inflation=1.06",
             "assimilation.stages.0.variant=pertobs", "assimilation.stages.0.rotation=false"),
        ),
    )
}


@dataclass
class Result:
    """Per-method outcome: RMSEs and throughputs of every repeat, or why a side did not run."""

    dapper_rmse: list[float] = field(default_factory=list)
    dapper_rmse_conf: float | None = None
    dapper_cps: list[float] = field(default_factory=list)
    twin_rmse: list[float] = field(default_factory=list)
    twin_cps: list[float] = field(default_factory=list)
    twin_scored_cps: list[float] = field(default_factory=list)
    twin_error: str | None = None


# ---------------------------------------------------------------- thread pinning


def pin_threads() -> str:
    """Limit torch and numpy's BLAS to one thread; return a one-line description."""
    parts = [f"{v}=1" for v in THREAD_ENV]
    try:
        import torch

        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
            torch.set_num_interop_threads(1)
        parts.append(f"torch.set_num_threads(1) -> {torch.get_num_threads()}")
    except ImportError:
        parts.append("torch not importable")
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(1)
        pools = ", ".join(f"{p['internal_api']}:{p['num_threads']}" for p in threadpool_info())
        parts.append(f"threadpoolctl [{pools}]")
    except ImportError:
        pass
    return "; ".join(parts)


# ---------------------------------------------------------------- DAPPER side


def import_dapper() -> tuple[Any, Any, Any]:
    """Import DAPPER quietly with its progress bars, keyboard interaction and live plots off.

    `dapper.tools.progressbar.progbar` checks the module global `disable_progbar` on every call
    (DAPPER sets it itself under pytest); `disable_user_interaction` stops it touching the
    terminal settings; `rc.liveplotting=False` and `assimilate(..., liveplots=False)` (the default)
    keep matplotlib out of the loop. Importing `dapper` prints a warning about live plotting on a
    non-interactive matplotlib backend, which is swallowed here.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        import dapper
        import dapper.da_methods as da
        import dapper.tools.progressbar as progressbar
        from dapper.mods.Lorenz96 import sakov2008
    progressbar.disable_progbar = True
    progressbar.disable_user_interaction = True
    dapper.rc.liveplotting = False
    return dapper, da, sakov2008


def dapper_setup(dapper: Any, sakov2008: Any, cycles: int, burn_in: int, seed: int) -> tuple[Any, Any, Any]:
    """sakov2008's HMM with `cycles` analyses (the first `burn_in` not averaged); truth and obs.

    DAPPER observes at k = 1..K (no observation at t = 0), so `Ko = cycles - 1` gives `cycles`
    analyses at t = k dt. Averages use `tto > BurnIn`; half a step past the last burn-in analysis
    avoids a floating-point tie.
    """
    import dapper.mods as modelling

    hmm = sakov2008.HMM.copy()
    hmm.tseq = modelling.Chronology(DT, dko=1, Ko=cycles - 1, BurnIn=(burn_in + 0.5) * DT,
                                    Tplot=sakov2008.Tplot)
    assert int(hmm.tseq.masko.sum()) == cycles - burn_in
    dapper.set_seed(seed)
    xx, yy = hmm.simulate()
    return hmm, xx, yy


def run_dapper(dapper: Any, da: Any, spec: MethodSpec, hmm: Any, xx: Any, yy: Any,
               seed: int) -> tuple[float, float, float]:
    """One DAPPER assimilation: (rmse.a, its 'confidence' half-width, cycles per second)."""
    xp = spec.make_dapper(da)
    dapper.set_seed(seed)  # the same filter randomness (X0 sample, rotations, perturbed obs) each repeat
    start = time.perf_counter()
    xp.assimilate(hmm, xx, yy, liveplots=False)
    seconds = time.perf_counter() - start
    xp.stats.average_in_time()
    rmse = xp.avrgs.err.rms.a
    cycles = hmm.tseq.Ko + 1
    return float(rmse.val), float(getattr(rmse, "prec", float("nan"))), cycles / seconds


# ---------------------------------------------------------------- EarthTwin side


def import_twin() -> Any:
    """`twin.Twin`, from the installed package or (failing that) this checkout."""
    try:
        from twin import Twin
    except ImportError:
        sys.path.append(str(REPO_ROOT))
        from twin import Twin
    return Twin


def run_twin(twin_cls: Any, spec: MethodSpec, cycles: int, burn_in: int) -> tuple[float, float, float]:
    """One EarthTwin run: (rmse_analysis, its cycles_per_second, cycles/s with scoring included).

    `summary["cycles_per_second"]` times the assimilate-and-forecast loop only: the truth and its
    observations are simulated before it (`tw.nature.prepare`, like DAPPER's `HMM.simulate`) and
    the per-cycle scores are computed in batches after it (in `summary()`). DAPPER scores inside
    its loop, so the third number -- the wall time of `run()` with the nature run simulated
    beforehand, i.e. loop + scoring -- is the like-for-like one. (Without a `nature` attribute
    it also includes the truth simulation.)
    """
    overrides = [f"run.cycles={cycles}", f"run.burn_in={burn_in}", "run.threads=1", *spec.case_overrides]
    tw = twin_cls.from_yaml(REPO_ROOT / spec.case_file, overrides=overrides)
    nature = getattr(tw, "nature", None)
    if nature is not None:
        nature.prepare(tw.cycle, cycles)  # what run() would do first; then a no-op inside run()
    start = time.perf_counter()
    summary = tw.run()
    seconds = time.perf_counter() - start
    rmse = summary.get("rmse_analysis")
    cps = summary.get("cycles_per_second")
    if rmse is None or cps is None:
        raise RuntimeError(f"summary lacks rmse_analysis/cycles_per_second: {sorted(summary)}")
    return float(rmse), float(cps), int(summary.get("cycles", cycles)) / seconds


# ---------------------------------------------------------------- driver


def benchmark(methods: list[str], cycles: int, burn_in: int, repeats: int, seed: int,
              skip_twin: bool, verbose: bool) -> tuple[dict[str, Result], dict[str, str]]:
    """Run every method `repeats` times on both sides; return results and version information."""
    dapper, da, sakov2008 = import_dapper()
    info = {"dapper": dapper.__version__, "numpy": np.__version__}
    hmm, xx, yy = dapper_setup(dapper, sakov2008, cycles, burn_in, seed)

    twin_cls, twin_error = None, None
    if skip_twin:
        twin_error = "skipped (--dapper-only)"
    else:
        try:
            twin_cls = import_twin()
            import twin

            info["earthtwin"] = getattr(twin, "__version__", "?") + f" ({Path(twin.__file__).parent})"
        except Exception as e:  # noqa: BLE001 - any failure here only disables the EarthTwin half
            twin_error = (f"`from twin import Twin` failed: {e.__class__.__name__}: {e} "
                          "(install EarthTwin into this venv: .venv-bench/bin/pip install -e .)")
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__

    results = {m: Result(twin_error=twin_error) for m in methods}
    for r in range(repeats):
        for m in methods:
            spec, res = METHODS[m], results[m]
            rmse, conf, cps = run_dapper(dapper, da, spec, hmm, xx, yy, seed + 1)
            res.dapper_rmse.append(rmse)
            res.dapper_rmse_conf = conf
            res.dapper_cps.append(cps)
            if verbose:
                print(f"  [{r + 1}/{repeats}] {m:13s} DAPPER    rmse.a={rmse:.4f}  {cps:8.1f} cycles/s",
                      file=sys.stderr)
            if twin_cls is None or res.twin_error is not None:
                continue
            if not (REPO_ROOT / spec.case_file).is_file():
                res.twin_error = f"no case file {spec.case_file}"
                continue
            try:
                rmse, cps, scored_cps = run_twin(twin_cls, spec, cycles, burn_in)
            except Exception as e:  # noqa: BLE001 - report and keep DAPPER's numbers
                res.twin_error = f"{e.__class__.__name__}: {e}"
                if verbose:
                    traceback.print_exc()
                continue
            res.twin_rmse.append(rmse)
            res.twin_cps.append(cps)
            res.twin_scored_cps.append(scored_cps)
            if verbose:
                print(f"  [{r + 1}/{repeats}] {m:13s} EarthTwin rmse={rmse:.4f}  {cps:8.1f} cycles/s "
                      f"({scored_cps:.1f} with scoring)",
                      file=sys.stderr)
    return results, info


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(results: dict[str, Result]) -> str:
    """The results table (medians over repeats) plus notes on anything that did not run."""
    header = ("method", "ref", "rmse.a DAPPER", "rmse EarthTwin", "cyc/s DAPPER", "cyc/s ET loop",
              "cyc/s ET+score", "ratio loop", "ratio +score")
    rows = []
    notes = []
    for key, res in results.items():
        spec = METHODS[key]
        d_rmse, t_rmse = _median(res.dapper_rmse), _median(res.twin_rmse)
        d_cps, t_cps, ts_cps = _median(res.dapper_cps), _median(res.twin_cps), _median(res.twin_scored_cps)
        conf = res.dapper_rmse_conf
        conf_text = f" ±{conf:.3f}" if conf is not None and math.isfinite(conf) else ""
        ratio = t_cps / d_cps if (t_cps is not None and d_cps) else None
        ratio_scored = ts_cps / d_cps if (ts_cps is not None and d_cps) else None
        rows.append((spec.label, f"{spec.reference_rmse:.2f}", _fmt(d_rmse, ".4f") + conf_text,
                     _fmt(t_rmse, ".4f"), _fmt(d_cps, ".1f"), _fmt(t_cps, ".1f"), _fmt(ts_cps, ".1f"),
                     _fmt(ratio, ".2f"), _fmt(ratio_scored, ".2f")))
        if res.twin_error and not res.twin_rmse:
            notes.append(f"EarthTwin {key}: {res.twin_error}")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=1100,
                   help="analyses per run, burn-in included (default 1100)")
    p.add_argument("--burn-in", type=int, default=100,
                   help="first analyses left out of the RMSE averages (default 100)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per method and library; medians reported (default 3)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="methods to run (default: all of them)")
    p.add_argument("--seed", type=int, default=3000, help="DAPPER's truth/obs seed; its filters use seed+1")
    p.add_argument("--dapper-only", action="store_true", help="skip the EarthTwin half")
    p.add_argument("--json", type=Path, help="also write the per-repeat numbers to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run as it finishes (stderr)")
    args = p.parse_args(argv)
    if args.cycles < 2 or not 0 <= args.burn_in < args.cycles:
        p.error("need --cycles >= 2 and 0 <= --burn-in < --cycles")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = pin_threads()
    load_before = os.getloadavg()
    results, info = benchmark(args.methods, args.cycles, args.burn_in, args.repeats, args.seed,
                              args.dapper_only, args.verbose)
    print("Lorenz-96 sakov2008: Nx=40, F=8, RK4 dt=0.05, every step observed, all 40 vars, R=I")
    print(f"{args.cycles} analyses, first {args.burn_in} not averaged; medians over {args.repeats} repeats")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"threads pinned to 1: {threads}")
    load_after = os.getloadavg()
    print(f"1-min load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f} "
          f"on {os.cpu_count()} CPUs (other load skews the timings)")
    print("cyc/s DAPPER: xp.assimilate, its per-cycle statistics included, progress bar off")
    print("cyc/s ET loop: EarthTwin's summary['cycles_per_second'] (scores computed after the loop)")
    print("cyc/s ET+score: wall of Twin.run() incl. the deferred scoring (nature run simulated before)")
    print("ratio = EarthTwin / DAPPER throughput (> 1: EarthTwin faster); truth simulation excluded on both")
    print()
    print(format_table(results))
    if args.json:
        payload = {"cycles": args.cycles, "burn_in": args.burn_in, "repeats": args.repeats, "versions": info,
                   "threads": threads,
                   "results": {k: vars(v) for k, v in results.items()}}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
