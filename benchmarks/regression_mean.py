"""How accurate is a deterministic network of the shipped emulator's architecture, trained with the mean
square error, against the shipped single-step sampler's ensemble mean? (The CorrDiff lever: a regression
network for the mean, a diffusion model for the residual.)

    python benchmarks/regression_mean.py out/sqg-edm/data.pt --iterations 4500 1500 --save reg.pt

`DATA` is the truth data `twin train cases/sqg_train.yaml` caches (`OUT/data.pt`: runs, samples,
variables, y, x; the last two runs are held out). The network (the checkpoint's `network_config`, its
noise input fixed, the state's channels where the noisy increment would be) predicts the standardised
Δ-increment; training: Adam, warm-up 200, cosine decay to 0.1, EMA 0.999, batch 16, random symmetry
elements of the SQG model, bfloat16 autocast where the CPU has it; first 1-step pairs, then 2-step
rollouts (batch 8) scored at both steps; `--perturb` perturbs the starts. Every 500 iterations, and at
the end, it prints the RMSE (K) at 6 and 12 h from 48 held-out starts, next to persistence's and the
checkpoint's single-step 8-member ensemble mean on the same starts. Every step goes through the
checkpoint's Shapiro filter. `--bands` adds the 12 h RMSE per total-wavenumber band.

`--physics SIZE:DT` probes a hybrid: the SQG model on a coarse SIZE x SIZE grid (time step DT s) steps the
spectrally truncated state by Δ, its increment (the coarse scales' tendency, the fine scales persisting)
takes the network's noisy-input channels, and the network predicts the correction to it
(`benchmarks/coarse_physics.py` measures the coarse model alone).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from coarse_physics import band_rmse, resample
from emulators.diffusion.checkpoint import load_checkpoint
from emulators.diffusion.consistency import ConsistencyPrecond, one_step_sample
from emulators.diffusion.emulator import static_fields
from emulators.diffusion.network import UNetLite
from emulators.diffusion.smoothing import shapiro
from emulators.sqg import SQG
from twin.domain import SerialDomain
from twin.train import AugmentConfig, native_bfloat16
from twin.trainpairs import periodic_pad
from twin.trainstages import _lr, perturbation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="OUT/data.pt of `twin train cases/sqg_train.yaml`")
    ap.add_argument("--checkpoint", default="sqg_edm_v6.pt")
    ap.add_argument("--iterations", type=int, nargs=2, default=(4500, 1500), metavar=("ONE_STEP", "TWO_STEP"))
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--perturb", type=float, default=0.0, help="starts perturbed as in twin train's augment "
                    "stage, std uniform in [0, PERTURB] state stds per pair; the target stays the truth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write the EMA network's state_dict here")
    ap.add_argument("--physics", metavar="SIZE:DT", help="hybrid: condition on a coarse SQG forecast")
    ap.add_argument("--bands", type=int, nargs="*", default=[4, 10, 16, 22], help="wavenumber band edges")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.checkpoint)
    data = torch.load(args.data, weights_only=True)["data"]
    train, val = data[:-2], data[-2:]
    stat = {k: torch.tensor(v).float().view(1, -1, 1, 1) for k, v in ck.stats.items()}
    mean, std, inc_mean, inc_std = (stat[k] for k in ("state_mean", "state_std", "inc_mean", "inc_std"))
    static = static_fields(ck.static, tuple(ck.grid_shape), (0, ck.grid_shape[0]), (0, ck.grid_shape[1]))

    def cond_of(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x - mean) / std, static.expand(len(x), *static.shape)], 1)

    def finish(x: torch.Tensor, inc: torch.Tensor) -> torch.Tensor:
        return shapiro(x + inc_mean + inc_std * inc.float(), ck.smoothing_order, (True, True), periodic_pad)

    physics_increment = lambda x: torch.zeros_like(x)  # noqa: E731
    if args.physics:
        size, dt = int(args.physics.split(":")[0]), float(args.physics.split(":")[1])
        config = SQG.Config(size=size, dt=dt)
        coarse = SQG(config, SerialDomain(SQG.global_grid(config)), torch.float64)
        substeps = round(ck.dt_seconds / dt)

        @torch.no_grad()
        def physics_increment(x: torch.Tensor) -> torch.Tensor:
            """The coarse model's standardised Δ-increment of x (0 beyond its wavenumbers)."""
            c = resample(x.double(), size)
            change = resample(coarse.integrate(c, substeps) - c, x.shape[-1]).float()
            return (change - inc_mean) / inc_std

    def regression_step(net: UNetLite, x: torch.Tensor) -> torch.Tensor:
        prior = physics_increment(x.detach().float())
        return finish(x, prior + net(torch.cat([prior.to(x.dtype), cond_of(x)], 1), torch.zeros(len(x))))

    starts = [(r, s) for r in range(val.shape[0]) for s in range(10, val.shape[1] - 2, 12)]
    start = torch.stack([val[r, s] for r, s in starts])
    truth = [torch.stack([val[r, s + k] for r, s in starts]) for k in (1, 2)]

    def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).square().mean().sqrt())

    @torch.no_grad()
    def scores(step, members: int = 1) -> list[float]:
        """RMSE at 6 and 12 h, then the 12 h RMSE per band."""
        x, out = start.repeat(members, 1, 1, 1), []
        for k in range(2):
            x = torch.cat([step(x[i:i + 16]) for i in range(0, len(x), 16)])
            out.append(rmse(x.view(members, len(start), *x.shape[1:]).mean(0), truth[k]))
        error = x.view(members, len(start), *x.shape[1:]).mean(0) - truth[1]
        return out + band_rmse(error, args.bands)

    single = ConsistencyPrecond(ck.build_single_step_network(), ck.sigma_data, ck.single_step["sigma_min"])
    single.net.wrap = True
    gen = torch.Generator().manual_seed(args.seed + 5)
    sigma_max = ck.single_step["sigma_max"]
    sampled = lambda x: finish(x, one_step_sample(single, torch.randn(x.shape, generator=gen),  # noqa: E731
                                                  sigma_max, cond_of(x), periodic_pad))
    print(f"RMSE (K) at 6 / 12 h from {len(start)} held-out starts")
    print("persistence:", [round(rmse(start, t), 3) for t in truth])
    if args.physics:
        print(f"coarse SQG {args.physics} alone:",
              [round(v, 3) for v in scores(lambda x: finish(x, physics_increment(x)))], flush=True)
    v6_scores = [round(v, 3) for v in scores(sampled, 8)]
    print(f"{Path(ck.path).name} single-step, 8-member mean:", v6_scores, flush=True)

    torch.manual_seed(args.seed)
    net = UNetLite(ck.network_config)
    net.wrap = True
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    one, two = args.iterations
    total = one + two
    g = torch.Generator().manual_seed(args.seed + 1)
    per = train.shape[1]
    bf16 = native_bfloat16()

    def rollout(steps: int, b: int) -> torch.Tensor:
        index = torch.randint(train.shape[0] * (per - steps), (b,), generator=g)
        run, first = index // (per - steps), index % (per - steps)
        elements = torch.randint(SQG.symmetry_count, (b,), generator=g)
        return torch.stack([torch.stack([SQG.symmetry(int(e), train[r, f + k]) for r, f, e in
                                         zip(run, first, elements)]) for k in range(steps + 1)])

    t0, running = time.perf_counter(), []
    for it in range(total):
        steps, b = (1, 16) if it < one else (2, 8)
        for group in opt.param_groups:
            group["lr"] = _lr(args.lr, 200, total, 0.1, it)
        seq = rollout(steps, b)
        if args.perturb:
            seq[0] = seq[0] + std * perturbation(seq[0].shape, AugmentConfig(noise=args.perturb), g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x, loss = seq[0], 0.0
            for k in range(steps):
                x = regression_step(net, x)
                loss = loss + ((x - seq[k + 1]) / std).square().mean() / steps
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - min(0.999, (1 + it) / (10 + it)))
        running.append(float(loss.detach()))
        if (it + 1) % 500 == 0 or it + 1 == total:
            ema.eval()
            print(f"iteration {it + 1}: loss {sum(running) / len(running):.4f}, regression 6 / 12 h "
                  f"{[round(v, 3) for v in scores(lambda z: regression_step(ema, z))]}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            running = []
    if args.save:
        torch.save(ema.state_dict(), args.save)


if __name__ == "__main__":
    main()
