"""The local ensemble transform Kalman filter (Hunt, Kostelich & Szunyogh 2007), batched.

Every grid point gets its own ensemble-space analysis with the observations' R⁻¹ tapered by
Gaspari–Cohn; all grid points are solved at once with one batched symmetric eigendecomposition, and
all variables at a grid point share the weights. With no localisation the same code is the global
ETKF (one weight set for the whole state), which is also the EnKF 'Sqrt' baseline.

Notation: N members, n = N-1. The work happens in the reduced ensemble space of `assim.inflation`
(anomalies in an orthonormal zero-sum basis B), where P̃⁻¹ = n/ρ I + Y' R̃⁻¹ Y'ᵀ is (n, n): the
direction of the vector of ones carries no anomaly, so dropping it loses nothing and saves work.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from assim.inflation import (PostProcessing, anomaly_map, check_config, ensemble_projector,
                             observation_projector, relax, rotation_draw)
from assim.localization import taper_matrix
from assim.observations import ObservationBatch
from assim.obsspace import ObsSpace, gather_obs_space
from assim.registry import register_stage
from assim.stages import AnalysisContext


_SMALL = 1 << 17  # below this many products, broadcast-multiply-sum beats einsum's batched matmul


@functools.lru_cache(maxsize=32)
def _diagonal(n_members: int, value: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(n N, 1) column holding `value` at the (j, j) entries of an (n, N) block, zero elsewhere."""
    n = n_members - 1
    out = torch.zeros(n, n_members, dtype=dtype, device=device)
    out[:, :n].fill_diagonal_(value)
    return out.reshape(-1, 1)


def ensemble_space(hx: torch.Tensor, y: torch.Tensor, precision: torch.Tensor,
                   prior_inflation: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigendecomposition of each group's P̃⁻¹ and its innovation term, in the reduced space.

    hx (N, p) = H(ensemble), y (p,), precision (G, p): the diagonal of each group's tapered R⁻¹.
    Returns d (G, n) and V (G, n, n) with V diag(d) Vᵀ = P̃⁻¹ = n/ρ I + Y' R̃⁻¹ Y'ᵀ, and
    b (n, G) = Y' R̃⁻¹ (y - ȳ); then w̄' = V diag(1/d) Vᵀ b and W' = V diag(sqrt(n/d)) Vᵀ.
    """
    n_members, p = hx.shape
    n = n_members - 1
    proj = observation_projector(n_members, hx.dtype, hx.device)
    yd = proj @ torch.cat([hx, y[None].to(hx.dtype)])  # rows: Y' (n), y - ȳ
    # products Y'_j Y'_k and Y'_j (y - ȳ) per observation, then one matmul with the tapered R⁻¹
    outer = (yd[:n, None, :] * yd[None, :, :]).view(n * n_members, p)
    diag = _diagonal(n_members, n / prior_inflation, hx.dtype, str(hx.device))
    cb = torch.addmm(diag, outer, precision.t()).view(n, n_members, -1)  # (n, N, G)
    d, v = torch.linalg.eigh(cb[:, :n].permute(2, 0, 1))
    return d, v, cb[:, n]


def letkf_analysis(ens: torch.Tensor, hx: torch.Tensor, y: torch.Tensor, precision: torch.Tensor, *,
                   prior_inflation: float = 1.0, inflation: float = 1.0, rotation: torch.Tensor | None = None,
                   rtps: float = 0.0, rtpp: float = 0.0) -> torch.Tensor:
    """LETKF analysis of ens (N, V, *grid) given hx = H(ens) (N, p) and observations y (p,).

    precision: (G, p) tapered R⁻¹ diagonals, one row per grid point (G = prod(grid)), or (1, p) for
    a global analysis (every point shares the weights: the ETKF). `prior_inflation` is Hunt's ρ;
    `inflation` multiplies the analysis anomalies and `rotation` (a reduced Q' from
    `assim.inflation.rotation_draw`) rotates them, after RTPP/RTPS (DAPPER's post-processing).
    """
    n_members = ens.shape[0]
    if n_members < 2:
        raise ValueError("the LETKF needs at least 2 members")
    n = n_members - 1
    groups = precision.shape[0]
    flat = ens.reshape(n_members, -1)
    red = ensemble_projector(n_members, ens.dtype, ens.device) @ flat  # [x̄; A'], (N, X)
    anom = red[1:]
    d, v, b = ensemble_space(hx, y, precision, prior_inflation)
    # out: (N, X), rows A'_a / sqrt(n) (the reduced analysis anomalies) and, last, the mean increment
    if groups == 1:  # global: one weight set, plain matrix products
        v0, d0 = v[0], d[0]
        w = v0 @ ((b[:, 0] @ v0) / d0)  # w̄' = P̃ b
        out = torch.cat([(v0 * d0.rsqrt()) @ v0.t(), w[None]]) @ anom
    else:
        npoints = flat.shape[1] // ens.shape[1]
        if groups != npoints:
            raise ValueError(f"precision has {groups} rows for {npoints} grid points")
        # per point g: q = diag(d^-1/2) Vᵀ [A' | b], then [V; q_bᵀ] q_A = [A'_a / sqrt(n); δx̄]
        vp = v.permute(1, 2, 0).contiguous()  # (k, j, g); contiguous g makes the products fast
        aug = torch.cat([anom.view(n, -1, groups), b.unsqueeze(1)], dim=1)  # (k, V+1, g)
        big = n * n * aug.shape[1] * groups > _SMALL
        q = torch.einsum("kjg,kvg->jvg", vp, aug) if big else (vp.unsqueeze(2) * aug.unsqueeze(1)).sum(0)
        q.mul_(d.t().rsqrt().unsqueeze(1))
        lhs = torch.cat([vp, q[:, -1:].permute(1, 0, 2)])  # (N, n, g)
        qa = q[:, :-1]
        out = torch.einsum("ljg,jvg->lvg", lhs, qa) if big else (lhs.unsqueeze(2) * qa.unsqueeze(0)).sum(1)
        out = out.reshape(n_members, -1)
    scale = inflation * math.sqrt(n)
    if rtpp or rtps:
        out = torch.cat([relax(out[:n] * math.sqrt(n), anom, rtpp, rtps), out[n:]])
        scale = inflation
    mix = anomaly_map(n_members, scale, rotation, ens.dtype, ens.device)
    return torch.addmm(red[:1], mix, out).reshape(ens.shape)


@register_stage("letkf")
class Letkf:
    """LETKF stage: Gaspari–Cohn localised R⁻¹, DAPPER's inflation/rotation conventions."""

    @dataclass(frozen=True)
    class Config(PostProcessing):
        prior_inflation: float = field(default=1.0, metadata={
            "min": 1.0, "help": "Hunt's rho inside P~ (multiplicative prior inflation)"})
        localization_radius: float | None = field(default=None, metadata={
            "gt": 0.0, "help": "distance where the Gaspari-Cohn taper is exp(-1/2); null = global ETKF"})

    def __init__(self, config: "Letkf.Config") -> None:
        check_config("letkf", inflation=config.inflation, prior_inflation=config.prior_inflation,
                     rotation=config.rotation, rtps=config.rtps, rtpp=config.rtpp)
        r = config.localization_radius
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf):
            raise ValueError(f"letkf: localization_radius must be a positive number or null, got {r!r}")
        self.config = config
        self._cache: tuple | None = None  # (grid, domain, locations, error_std, dtype, precision)

    def precision(self, obs: ObservationBatch | ObsSpace, ctx: AnalysisContext, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
        """Tapered R⁻¹ (G, p) for this rank's G valid points, or (1, p); reused while the grid
        (mask included), locations and errors are unchanged."""
        cache = self._cache
        if (cache is not None and cache[0] == ctx.grid and cache[1] is ctx.domain and cache[4] == dtype
                and torch.equal(cache[2], obs.locations) and torch.equal(cache[3], obs.error_std)):
            return cache[5]
        inv_var = obs.error_std.to(dtype=dtype, device=device).square().reciprocal()
        radius = self.config.localization_radius
        if radius is None:
            prec = inv_var[None].contiguous()
        else:
            points = ctx.grid.coordinates(torch.float64)[ctx.domain.local_flat_indices()]
            if ctx.valid is not None:  # one row per valid point: masked points get no analysis
                points = points[ctx.valid]
            taper = taper_matrix(ctx.grid, points, obs.locations, float(radius))
            prec = (taper.to(dtype=dtype, device=device) * inv_var).contiguous()
        self._cache = (ctx.grid, ctx.domain, obs.locations.clone(), obs.error_std.clone(), dtype, prec)
        return prec

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor:
        cfg = self.config
        space = gather_obs_space(ens, obs, ctx.domain)
        prec = self.precision(space, ctx, ens.dtype, ens.device)
        rot = rotation_draw(ctx.streams.seed, ctx.cycle, ens.shape[0], ens.dtype) if cfg.rotation else None
        valid = ctx.valid
        state = ens if valid is None else ens.flatten(2)[:, :, valid]  # masked points: no analysis
        analysis = letkf_analysis(state, space.hx, space.values, prec,
                                  prior_inflation=cfg.prior_inflation, inflation=cfg.inflation,
                                  rotation=rot, rtps=cfg.rtps, rtpp=cfg.rtpp)
        if valid is None:
            return analysis
        out = ens.flatten(2).clone()
        out[:, :, valid] = analysis
        return out.view(ens.shape)
