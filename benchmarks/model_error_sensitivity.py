"""How much forecast-model error can the SQG twin's filter absorb? The perfect-model twin
(`cases/sqg_perfect_model.yaml`) with a model error added after each 12 h forecast: a random field of
wavenumbers 5-22 (where the learned twin's analysis error lies), drawn afresh each cycle, either the same
for every member ("mean": an error the ensemble does not see) or independent per member ("spread").

    python benchmarks/model_error_sensitivity.py                  # the table in BENCHMARKS.md
    python benchmarks/model_error_sensitivity.py --runs 0.5:0.5   # one run: mean 0.5 K, spread 0.5 K
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from twin.config import load_case  # noqa: E402
from twin.twin import Twin  # noqa: E402

CASE = os.path.join(os.path.dirname(__file__), "..", "cases", "sqg_perfect_model.yaml")
DEFAULT_RUNS = ("0:0", "0.5:0", "0.5:0.5", "0:1", "1:0", "1:1", "1.5:0")


def band_mask(ny: int, nx: int, band: tuple[int, int]) -> torch.Tensor:
    """1 at the 2-D wavenumbers |k| in band[0]..band[1] of an (ny, nx) FFT, else 0."""
    ky = torch.fft.fftfreq(ny, 1 / ny)[:, None]
    kx = torch.fft.fftfreq(nx, 1 / nx)[None, :]
    k = (ky ** 2 + kx ** 2).sqrt()
    return ((k >= band[0]) & (k <= band[1])).to(torch.float32)


def band_noise(shape: tuple[int, ...], rms: float, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random fields (n, variables, y, x) of the wavenumbers `mask` keeps, each scaled to `rms`."""
    f = torch.fft.ifft2(torch.fft.fft2(torch.randn(shape, generator=gen)) * mask).real
    return f / f.square().mean(tuple(range(1, f.dim())), keepdim=True).sqrt() * rms


def run(mean_rms: float, spread_rms: float, band: tuple[int, int], seed: int, overrides: list[str]) -> dict:
    """One perfect-model twin run with the error added after every forecast; its summary scores."""
    tw = Twin(load_case(CASE, ("output.figures=false", *overrides)))
    gen = torch.Generator().manual_seed(seed)
    mask = band_mask(*tw.ensemble.shape[-2:], band)
    for _ in range(tw.case.run.cycles):
        tw.assimilate()
        ens = tw.forecast()
        one = (1, *ens.shape[1:])
        tw.ensemble = (ens + band_noise(one, mean_rms, mask, gen).to(ens.dtype)
                       + band_noise(tuple(ens.shape), spread_rms, mask, gen).to(ens.dtype))
    s = tw.summary()
    return {"mean_rms": mean_rms, "spread_rms": spread_rms,
            **{k: s[k] for k in ("rmse_analysis", "rmse_forecast", "spread_analysis")}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="MEAN:SPREAD",
                   help="rms (K) of the error added per cycle, common to all members : per member")
    p.add_argument("--band", nargs=2, type=int, default=(5, 22), metavar=("KMIN", "KMAX"))
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="case override")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [run(*map(float, r.split(":")), tuple(a.band), a.seed, a.set) for r in a.runs]
    base = next((r["rmse_analysis"] for r in rows if r["mean_rms"] == r["spread_rms"] == 0), None)
    print(f"perfect-model SQG twin, error of wavenumbers {a.band[0]}-{a.band[1]} added after each forecast")
    print(" mean K  spread K | analysis K  forecast K  spread K | / no error")
    for r in rows:
        ratio = f"{r['rmse_analysis'] / base:10.2f}" if base else "         -"
        print(f"{r['mean_rms']:7.2f} {r['spread_rms']:9.2f} | {r['rmse_analysis']:10.3f} {r['rmse_forecast']:11.3f}"
              f" {r['spread_analysis']:9.3f} | {ratio}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
