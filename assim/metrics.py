"""Ensemble verification scores (DAPPER's conventions) on tensors (member, variable, *grid).

Optional `weights` (broadcastable to one member's state, summing to 1 over the points that count)
give area-weighted scores on latitude-longitude grids; by default every point weighs the same.
"""
from __future__ import annotations

import torch


def _wmean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if weights is None else (x * weights).sum()


def rmse(mean: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Root-mean-square error of the ensemble mean over the grid."""
    return _wmean((mean - truth).square(), weights).sqrt()


def spread(ens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Root of the grid-mean ensemble variance (unbiased, N - 1)."""
    return _wmean(ens.var(dim=0), weights).sqrt()


def crps_fair(ens: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fair CRPS averaged over grid points.

    (1/M) Σ_i |x_i - y| - 1/(2M(M-1)) Σ_{i≠j} |x_i - x_j|; the pair sum uses the sorted-members
    identity Σ_{i,j} |x_i - x_j| = 2 Σ_k (2k - M + 1) x_(k), O(M log M) instead of O(M²).
    """
    m = ens.shape[0]
    skill = (ens - truth).abs().mean(dim=0)
    ranks = torch.arange(m, dtype=ens.dtype).mul_(2).sub_(m - 1).view((m,) + (1,) * (ens.dim() - 1))
    pair_sum = 2.0 * (ens.sort(dim=0).values * ranks).sum(dim=0)
    return _wmean(skill - pair_sum / (2.0 * m * (m - 1)), weights)


def truth_rank(ens: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Rank of the truth among the members at every point (0..M), for a rank histogram."""
    return (ens < truth).sum(dim=0)


def rank_histogram(ranks: torch.Tensor, members: int) -> torch.Tensor:
    """Counts of each rank 0..members."""
    return torch.bincount(ranks.reshape(-1), minlength=members + 1)
