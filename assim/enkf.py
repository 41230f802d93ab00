"""Global (unlocalised) ensemble Kalman filters: the EnKF baselines of DAPPER's `EnKF`.

* `sqrt` — the symmetric square-root filter (ETKF): a deterministic transform in ensemble space,
  the global case of `assim.letkf.letkf_analysis` (DAPPER's `EnKF('Sqrt')`).
* `pertobs` — the stochastic filter with perturbed observations (Burgers et al. 1998; DAPPER's
  `EnKF('PertObs')`): each member assimilates y - D_m, where the perturbations D ~ N(0, R) are
  centred over the members (DAPPER's `mean0`), so the analysis mean is the Kalman mean of the
  ensemble's sample covariance. Draws come from the keyed "filter" streams, keyed by
  (cycle, member) over the observation ids, so they do not depend on the MPI layout.

Post-processing (RTPP, RTPS, inflation of the analysis anomalies, random rotation) follows DAPPER's
`post_process`; see `assim.inflation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from assim.inflation import PostProcessing, check_config, post_process, rotation_draw
from assim.letkf import letkf_analysis
from assim.observations import ObservationBatch
from assim.obsspace import gather_obs_space
from assim.registry import register_stage
from assim.stages import AnalysisContext, keep_masked
from twin.random import BLOCK, Streams, generator

VARIANTS = ("pertobs", "sqrt")


def observation_perturbations(streams: Streams, cycle: int, n_members: int, ids: torch.Tensor,
                              error_std: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """D (N, p): N(0, R) draws keyed by (cycle, member) over observation ids, centred over members.

    Row m equals `streams.normal("filter", (cycle, m), ids)` (tested), drawn here without that
    method's per-call bookkeeping: one generator per member and id block, and nothing else.
    """
    idx = ids.reshape(-1).cpu().numpy().astype(np.int64)
    blocks = idx // BLOCK
    offsets = idx - blocks * BLOCK
    z = np.empty((n_members, idx.size))
    unique = np.unique(blocks).tolist()
    for block in unique:
        sel = slice(None) if len(unique) == 1 else blocks == block
        off = offsets[sel]
        count = int(off.max()) + 1
        for m in range(n_members):
            z[m, sel] = generator(streams.seed, "filter", cycle, m, block).standard_normal(count)[off]
    d = torch.from_numpy(z).to(dtype) * error_std.to(dtype)
    return d - d.mean(0)


def pertobs_analysis(ens: torch.Tensor, hx: torch.Tensor, y: torch.Tensor, error_std: torch.Tensor,
                     perturbations: torch.Tensor) -> torch.Tensor:
    """Perturbed-observation EnKF update of ens (N, ...) with hx = H(ens) (N, p), diagonal R.

    E_a[m] = E[m] + K (y - D_m - H(E[m])) with the ensemble's gain K = Aᵀ Y (Yᵀ Y + (N-1) R)⁻¹
    (DAPPER's row convention: A, Y are (N, ·) anomalies). Solved in ensemble space when N <= p, in
    observation space otherwise (the same matrix by the push-through identity).
    """
    n_members = ens.shape[0]
    n = n_members - 1
    dtype = ens.dtype
    flat = ens.reshape(n_members, -1)
    anom = flat - flat.mean(0)
    inv_std = error_std.to(dtype).reciprocal()
    ys = (hx - hx.mean(0)) * inv_std  # Y R^-1/2, (N, p)
    innov = (y.to(dtype) - perturbations - hx) * inv_std  # (N, p): R^-1/2 (y - D_m - H x_m)
    p = ys.shape[1]
    if n_members <= p:  # (Y R⁻¹ Yᵀ + n I)⁻¹ Y R⁻¹ (..)ᵀ, an (N, N) solve
        gram = ys @ ys.t()
        gram.diagonal().add_(n)
        weights = torch.linalg.solve(gram, ys @ innov.t())
    else:  # Y R^-1/2 (R^-1/2 Yᵀ Y R^-1/2 + n I)⁻¹ (..)ᵀ, a (p, p) solve
        gram = ys.t() @ ys
        gram.diagonal().add_(n)
        weights = ys @ torch.linalg.solve(gram, innov.t())
    return torch.addmm(flat, weights.t(), anom).reshape(ens.shape)


@register_stage("enkf")
class Enkf:
    """Global EnKF stage: `variant` pertobs (stochastic) or sqrt (deterministic ETKF)."""

    @dataclass(frozen=True)
    class Config(PostProcessing):
        variant: Literal["pertobs", "sqrt"] = field(default="sqrt", metadata={
            "help": "pertobs (perturbed observations) or sqrt (symmetric square root, ETKF)"})

    def __init__(self, config: "Enkf.Config") -> None:
        if config.variant not in VARIANTS:
            raise ValueError(f"enkf: variant must be one of {', '.join(VARIANTS)}, got {config.variant!r}")
        check_config("enkf", inflation=config.inflation, rotation=config.rotation, rtps=config.rtps,
                     rtpp=config.rtpp)
        self.config = config

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor:
        cfg = self.config
        n_members = ens.shape[0]
        if n_members < 2:
            raise ValueError("enkf: needs at least 2 members")
        rot = rotation_draw(ctx.streams.seed, ctx.cycle, n_members, ens.dtype) if cfg.rotation else None
        space = gather_obs_space(ens, obs, ctx.domain)
        hx, y, error_std = space.hx, space.values, space.error_std
        if cfg.variant == "sqrt":
            precision = error_std.to(ens.dtype).square().reciprocal()[None]
            analysis = letkf_analysis(ens, hx, y, precision, inflation=cfg.inflation, rotation=rot,
                                      rtps=cfg.rtps, rtpp=cfg.rtpp)
        else:
            pert = observation_perturbations(ctx.streams, ctx.cycle, n_members, space.ids, error_std, ens.dtype)
            analysis = post_process(pertobs_analysis(ens, hx, y, error_std, pert), ens, inflation=cfg.inflation,
                                    rotation=rot, rtpp=cfg.rtpp, rtps=cfg.rtps)
        return keep_masked(ens, analysis, ctx)
