"""Localised ensemble regression of observed increments onto unobserved state (Anderson 2003, step 2).

A filter that updates only the observed points (pointwise EnSF) leaves the rest of the state
untouched; with sparse observations that wastes the ensemble's cross-covariances. This fill treats
the observed increments Δy (member, p) as given and spreads them by the prior ensemble's localised
regression, jointly for all observations:

    Δx = (ρ_xy ∘ C_xy) (ρ_yy ∘ C_yy + ε I)⁻¹ Δy,

with C the sample covariances of the prior (observations are state values at grid points),
ρ the Gaspari–Cohn taper of the horizontal distance (every variable of a grid point shares its
location, so an unobserved level is updated through its cross-level covariance), and ε a ridge:
`ridge` times the mean observed prior variance. A tiny ridge (1e-8) reproduces the conditional mean
exactly where the localised C_yy is well conditioned; a larger one (~0.1) damps its poorly sampled
small eigen-directions, which otherwise amplify the parts of Δy the prior cannot explain (SQG
perfect model: 1.15 → 1.07 K, cases/sqg_perfect_model.yaml). The solve is global and dense in the
observations: under MPI the prior and increments are gathered to rank 0 and the result scattered;
sizes with more than `MAX_PRODUCT` (state values × observations) are refused.
"""
from __future__ import annotations

import torch

from assim.localization import node_taper
from assim.observations import ObservationBatch
from assim.obsspace import observed_points
from assim.stages import AnalysisContext

MAX_PRODUCT = 2 * 10**8  # state values x observations (a 1.6 GB float64 cross-covariance)


def regression_fill(prior: torch.Tensor, analysis: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext,
                    radius: float, ridge: float = 1e-8) -> torch.Tensor:
    """`analysis` at observed points, prior + regressed increment elsewhere; (member, variable, *grid)."""
    grid, dom = ctx.grid, ctx.domain
    n_var = prior.shape[1]
    known = observed_points(obs, dom, n_var, grid.size).reshape(-1)
    index = known.nonzero().flatten()
    if index.numel() * n_var * grid.size > MAX_PRODUCT:
        raise ValueError(f"ensf: unobserved: regression is dense in the observations; {index.numel()} observations "
                         f"x {n_var * grid.size} state values is too large (use harmonic)")
    x, increment = dom.gather(prior), dom.gather(analysis - prior)
    if x is not None and index.numel():
        members = x.shape[0]
        anomalies = x.reshape(members, -1).double()
        anomalies = anomalies - anomalies.mean(0)
        observed = anomalies[:, index]
        taper = node_taper(grid, index % grid.size, radius)  # (grid point, obs)
        c_xy = (anomalies.t() @ observed).div_(members - 1).mul_(taper.repeat(n_var, 1))
        c_yy = c_xy[index].clone()
        c_yy.diagonal().add_(ridge * float(c_yy.diagonal().mean().clamp_min(1e-300)))
        flat = increment.reshape(members, -1).double()
        weights = torch.linalg.solve(c_yy, flat[:, index].t())  # (p, member)
        filled = (c_xy @ weights).t()
        flat[:, ~known] = filled[:, ~known]
        increment = flat.to(prior.dtype).reshape(increment.shape)
    return prior + dom.scatter(increment)
