"""A host "climate code" that embeds the twin through BMI (twin/bmi.py).

The host runs its own Lorenz-96 (numpy RK4; its truth). Each cycle it observes its truth, hands the
observations to the twin through BMI (`set_value`), calls `update()` (one assimilation cycle and the
forecast to the next one), reads the analysis mean back (`get_value`) and scores it against its
truth. At the end it prints the analysis RMSE (averaged after the case's burn-in, like `twin run`).

Modes:
  host  independent: the host's truth is spun up from its own seed; the host starts the twin's
        ensemble around it (`X_ensemble`) and observes at random points between grid points
        (interpolated linearly; error = the case's observations.error_std).
  twin  relay: the host starts its truth from the twin's own (`bmi.twin.truth`, the one read that is
        not BMI) and relays the twin's own observations through BMI: each cycle it hands the arrays
        back to the twin (observation_count = -1), reads them and sets them back. The RMSE
        equals `twin run`'s on the same case and seeds (to ~1e-15 over the case's 50 cycles; the
        host's numpy RK4 and the twin's torch RK4 differ by rounding, which chaos amplifies).

    python examples/host_coupling.py cases/bmi_lorenz96.yaml --mode host --cycles 200
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import yaml

from twin.bmi import TwinBmi

OBS_INPUTS = ("observation_value", "observation_error_std", "observation_x", "observation_variable",
              "observation_id")


def l96_step(x: np.ndarray, forcing: float, dt: float) -> np.ndarray:
    """One RK4 step of dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F on a ring."""
    def f(v: np.ndarray) -> np.ndarray:
        return (np.roll(v, -1) - np.roll(v, 2)) * np.roll(v, 1) - v + forcing

    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + dt / 6.0 * (2.0 * (k2 + k3) + k1 + k4)


def interpolate(x: np.ndarray, loc: np.ndarray) -> np.ndarray:
    """Linear interpolation of the periodic field x at fractional grid positions loc."""
    i = np.floor(loc).astype(int) % x.size
    w = loc - np.floor(loc)
    return (1.0 - w) * x[i] + w * x[(i + 1) % x.size]


def couple(case: str, mode: str = "host", cycles: int | None = None, seed: int = 11,
           overrides: tuple[str, ...] = ()) -> dict:
    """Run the coupled loop; returns the host's analysis RMSE and the run's shape."""
    cfg = yaml.safe_load(open(case, encoding="utf-8"))
    forcing, dt = float(cfg["model"].get("forcing", 8.0)), float(cfg["model"].get("dt", 0.05))
    every = int(cfg.get("observations", {}).get("every", 1))
    obs_error = float(cfg.get("observations", {}).get("error_std", 1.0))
    rng = np.random.default_rng(seed)

    bmi = TwinBmi(overrides=overrides)
    bmi.initialize(case)
    cycles = cycles if cycles is not None else round(bmi.get_end_time() / bmi.get_time_step())
    burn_in = min(bmi.twin.case.run.burn_in, cycles - 1)
    n = bmi.get_grid_size(bmi.get_var_grid("X_analysis_mean"))
    members = bmi.get_grid_shape(bmi.get_var_grid("X_ensemble"), np.empty(2, np.int32))[0]

    if mode == "twin":
        truth = bmi.twin.truth[0].double().numpy().copy()
    else:
        truth = forcing + rng.standard_normal(n)
        for _ in range(1000):  # spin-up onto the attractor
            truth = l96_step(truth, forcing, dt)
        bmi.set_value("X_ensemble", (truth + rng.standard_normal((members, n))).reshape(-1))

    mean = np.empty(n, dtype=bmi.get_var_type("X_analysis_mean"))
    rmse = []
    for k in range(cycles):
        if mode == "twin":  # relay the twin's own observations through BMI
            bmi.set_value("observation_count", np.array([-1]))  # the arrays show the twin's own again
            count = bmi.get_grid_node_count(bmi.get_var_grid("observation_value"))
            for name in OBS_INPUTS:
                values = bmi.get_value(name, np.empty(count, dtype=bmi.get_var_type(name)))
                bmi.set_value(name, values)
        else:
            loc = rng.uniform(0.0, n, n)  # a new network each cycle, between grid points
            if k == 0:
                bmi.set_value("observation_count", np.array([n]))
                bmi.set_value("observation_error_std", np.full(n, obs_error))
            bmi.set_value("observation_x", loc)
            bmi.set_value("observation_value", interpolate(truth, loc) + obs_error * rng.standard_normal(n))
        bmi.update()
        bmi.get_value("X_analysis_mean", mean)
        rmse.append(float(np.sqrt(np.mean((mean - truth) ** 2))))
        for _ in range(every):
            truth = l96_step(truth, forcing, dt)
    bmi.finalize()
    return {"rmse": float(np.mean(rmse[burn_in:])), "obs_error": obs_error, "cycles": cycles,
            "burn_in": burn_in, "mode": mode, "rmse_per_cycle": rmse}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", help="case YAML (a Lorenz-96 case, e.g. cases/bmi_lorenz96.yaml)")
    p.add_argument("--mode", choices=("host", "twin"), default="host")
    p.add_argument("--cycles", type=int, help="number of cycles (default: the case's run.cycles)")
    p.add_argument("--seed", type=int, default=11, help="the host's own random seed (host mode)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="case override")
    args = p.parse_args(argv)
    out = couple(args.case, args.mode, args.cycles, args.seed, tuple(args.set))
    print(f"mode {out['mode']}: {out['cycles']} cycles, analysis RMSE {out['rmse']:.12f} "
          f"(after {out['burn_in']} burn-in cycles; observation error {out['obs_error']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
