"""How accurate is the SQG model itself on a coarser grid at 12 h, per wavenumber band? The yardstick for a
hybrid emulator (a network correcting a cheap coarse physics forecast) against the learned emulators'
band errors (`python -m emulators.diffusion.skill CKPT --bands 4 10 16 22`, the same truth runs and starts).

    python benchmarks/coarse_physics.py                       # the table in BENCHMARKS.md
    python benchmarks/coarse_physics.py --sizes 40:1200 48:1200

Each start is the 64 x 64 truth spectrally truncated to the coarse grid; the 12 h forecast is padded back
to 64 x 64 (its missing wavenumbers are zero) and compared with the truth: RMSE per band of total wavenumber
k <= 4 / 5-10 / 11-16 / 17-22 / >= 23, beside persistence's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import emulators.sqg  # noqa: E402,F401  (registers the sqg model)
from assim.metrics import band_mse  # noqa: E402
from emulators.diffusion.skill import truth_runs  # noqa: E402
from emulators.registry import model_registry  # noqa: E402
from twin.domain import SerialDomain  # noqa: E402

EDGES = (4, 10, 16, 22)
LEAD_S, STRIDE_S, STEP_S = 43200.0, 2 * 86400.0, 6 * 3600.0


def resample(x: torch.Tensor, n: int) -> torch.Tensor:
    """A doubly periodic (..., m, m) field on an n x n grid: its Fourier modes |k_y|, |k_x| < min(m, n)/2
    kept, the rest dropped (coarsening) or zero (refining)."""
    m = x.shape[-1]
    s = torch.fft.rfft2(x, norm="forward")
    k = min(m, n) // 2
    out = s.new_zeros(x.shape[:-2] + (n, n // 2 + 1))
    out[..., :k, :k] = s[..., :k, :k]
    out[..., n - k + 1:, :k] = s[..., m - k + 1:, :k]
    return torch.fft.irfft2(out, s=(n, n), norm="forward")


def band_rmse(error: torch.Tensor, edges: tuple[int, ...] | list[int] = EDGES) -> list[float]:
    """RMSE per total-wavenumber band of fields (..., y, x), over all leading dimensions."""
    return [float(v) for v in band_mse(error.double(), edges).flatten(0, -2).mean(0).sqrt()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["32:2400", "48:1200", "64:1200"],
                   help="grid size:time step in s of the coarse SQG model")
    p.add_argument("--seed", type=int, default=9000, help="first truth seed (as the skill module's)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--inits", type=int, default=6, help="starts per run, 2 days apart")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sqg = model_registry["sqg"]
    stride, lead = round(STRIDE_S / STEP_S), round(LEAD_S / STEP_S)
    truth = truth_runs("sqg", sqg.Config(size=64), list(range(args.seed, args.seed + args.runs)), 50 * 86400,
                       STEP_S, (args.inits - 1) * stride + lead + 1)
    starts = truth[:, 0:args.inits * stride:stride].reshape(-1, 2, 64, 64)
    verifying = truth[:, lead:lead + args.inits * stride:stride].reshape(-1, 2, 64, 64)
    persistence = band_rmse(starts - verifying)
    print(f"12 h forecasts from {len(starts)} truth states (seeds {args.seed}..{args.seed + args.runs - 1}); "
          f"RMSE per band k <= 4 / 5-10 / 11-16 / 17-22 / >= 23 [K]")
    print(f"{'model':>22} | {'total':>6} | bands")
    total = float((starts - verifying).square().mean().sqrt())
    print(f"{'persistence':>22} | {total:6.2f} | " + " / ".join(f"{v:.2f}" for v in persistence))
    for spec in args.sizes:
        size, dt = int(spec.split(":")[0]), float(spec.split(":")[1])
        cfg = sqg.Config(size=size, dt=dt)
        model = sqg(cfg, SerialDomain(sqg.global_grid(cfg)), torch.float64)
        t0 = time.perf_counter()
        forecast = resample(model.integrate(resample(starts, size), round(LEAD_S / dt)), 64)
        seconds = (time.perf_counter() - t0) / len(starts)
        error = forecast - verifying
        total = float(error.square().mean().sqrt())
        label = f"SQG {size}x{size}, dt {dt:.0f} s"
        print(f"{label:>22} | {total:6.2f} | " + " / ".join(f"{v:.2f}" for v in band_rmse(error))
              + f"   ({seconds:.3f} s per state, 1 thread)")


if __name__ == "__main__":
    main()
