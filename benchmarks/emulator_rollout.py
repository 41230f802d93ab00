"""Free-running the diffusion emulator for many steps: bounded? no NaN? the truth's climate? flat memory?

One member starts from a spun-up truth state (a seed unseen in training) and steps freely `--steps`
emulator steps (default 1000 = 250 days at 6 h). Every `--every` steps it prints the spatial θ variance
per level against the truth run's climatological variance (the mean over a truth run of the same
length from the same start), the domain mean, max |θ| and resident memory; at the end whether any NaN
appeared, the range and mean of the variance ratios after `--after` days, and resident / peak memory
at step 100 and at the end.
`--plot FILE` draws the variance ratio and the domain mean against time.

    python benchmarks/emulator_rollout.py [CHECKPOINT] [--sampler single_step|heun] [--steps 1000]
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from long_run import peak_mib, rss_mib  # noqa: E402  (benchmarks/ is on the path when run as a script)

from emulators.diffusion.emulator import SAMPLERS, DiffusionEmulator  # noqa: E402
from emulators.diffusion.skill import truth_runs  # noqa: E402
from emulators.registry import model_registry  # noqa: E402
from twin.domain import SerialDomain  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default=DiffusionEmulator.Config().checkpoint)
    p.add_argument("--sampler", default="single_step", choices=SAMPLERS)
    p.add_argument("--heun-steps", type=int, default=18)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=40)
    p.add_argument("--after", type=float, default=20.0, help="days after which the variance band is judged")
    p.add_argument("--seed", type=int, default=9501, help="truth seed (keep clear of training seeds)")
    p.add_argument("--plot", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = DiffusionEmulator.Config(checkpoint=args.checkpoint, sampler=args.sampler, steps=args.heun_steps)
    em = DiffusionEmulator(cfg, SerialDomain(DiffusionEmulator.global_grid(cfg)), torch.float32)
    truth = truth_runs("sqg", model_registry["sqg"].Config(size=em.grid.shape[0]), [args.seed], 50 * 86400,
                       em.dt, args.steps + 1).float()[0]
    climate = truth[1:].flatten(2).var(2).mean(0)  # (variables,)
    x = truth[0][None].clone()
    rows, rss_at_100, finite = [], None, True
    print(f"{'day':>6} {'var ratio per level':>22} {'domain mean K':>16} {'max |θ| K':>10} {'RSS MiB':>8}")
    for k in range(1, args.steps + 1):
        x = em.step(x, (10**6 + k) * em.dt)
        if not torch.isfinite(x).all():
            finite = False
            print(f"NaN/inf at step {k}")
            break
        if k == 100:
            rss_at_100 = (rss_mib(), peak_mib())
        if k % args.every == 0 or k == args.steps:
            ratio = (x[0].flatten(1).var(1) / climate).tolist()
            mean = x[0].flatten(1).mean(1).tolist()
            row = {"day": k * em.dt / 86400, "variance_ratio": ratio, "mean": mean, "max_abs": float(x.abs().max()),
                   "rss_mib": rss_mib()}
            rows.append(row)
            print(f"{row['day']:6.1f} {' '.join(f'{r:10.2f}' for r in ratio):>22} "
                  f"{' '.join(f'{m:7.2f}' for m in mean):>16} {row['max_abs']:10.1f} {row['rss_mib']:8.1f}")
    late = [r for v in rows if v["day"] >= args.after for r in v["variance_ratio"]]
    summary = {"checkpoint": args.checkpoint, "sampler": args.sampler, "steps": args.steps,
               "days": args.steps * em.dt / 86400, "finite": finite,
               "variance_ratio_after": {"days": args.after, "min": min(late), "max": max(late),
                                        "mean": sum(late) / len(late)} if late else None,
               "truth_max_abs": float(truth.abs().max()), "max_abs": max(r["max_abs"] for r in rows) if rows else None,
               "rss_at_100_mib": rss_at_100, "rss_at_end_mib": (rss_mib(), peak_mib())}
    print(json.dumps(summary))
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        days = [r["day"] for r in rows]
        for v, name in enumerate(("bottom", "top")):
            a.plot(days, [r["variance_ratio"][v] for r in rows], label=f"θ {name}")
            b.plot(days, [r["mean"][v] for r in rows], label=f"θ {name}")
        a.axhspan(0.7, 1.3, color="0.9", label="±30 %")
        a.set(xlabel="day", ylabel="variance / truth's", title=f"free run, {args.sampler}")
        b.set(xlabel="day", ylabel="domain mean (K)", title="domain mean")
        a.legend(fontsize=8)
        b.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
