"""Ensemble verification scores (DAPPER's conventions).

Ensembles have their members on `member_dim` (default 0); scores reduce over `dims` of the
remaining tensor (default: all of them), so the same functions score one analysis
(member, variable, *grid) or a batch of cycles (cycle, member, state) with `member_dim=1, dims=-1`.
Optional `weights` (broadcastable, summing to 1 over the reduced points) give area-weighted scores
on latitude-longitude grids; by default every point weighs the same.
"""
from __future__ import annotations

from typing import Sequence

import torch

Dims = int | Sequence[int] | None


def _wmean(x: torch.Tensor, weights: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    if dims is None:
        return x.mean() if weights is None else (x * weights).sum()
    return x.mean(dims) if weights is None else (x * weights).sum(dims)


def rmse(mean: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor | None = None, dims: Dims = None) -> torch.Tensor:
    """Root-mean-square error of the ensemble mean over the grid."""
    return _wmean((mean - truth).square(), weights, dims).sqrt()


def spread(ens: torch.Tensor, weights: torch.Tensor | None = None, member_dim: int = 0, dims: Dims = None) -> torch.Tensor:
    """Root of the grid-mean ensemble variance (unbiased, N - 1)."""
    return _wmean(ens.var(dim=member_dim), weights, dims).sqrt()


def crps_fair(ens: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor | None = None,
              member_dim: int = 0, dims: Dims = None) -> torch.Tensor:
    """Fair CRPS averaged over grid points.

    (1/M) Σ_i |x_i - y| - 1/(2M(M-1)) Σ_{i≠j} |x_i - x_j|; the pair sum uses the sorted-members
    identity Σ_{i,j} |x_i - x_j| = 2 Σ_k (2k - M + 1) x_(k), O(M log M) instead of O(M²).
    """
    m = ens.shape[member_dim]
    skill = (ens - truth.unsqueeze(member_dim)).abs().mean(dim=member_dim)
    shape = [1] * ens.dim()
    shape[member_dim] = m
    ranks = torch.arange(m, dtype=ens.dtype).mul_(2).sub_(m - 1).view(shape)
    pair_sum = 2.0 * (ens.sort(dim=member_dim).values * ranks).sum(dim=member_dim)
    return _wmean(skill - pair_sum / (2.0 * m * (m - 1)), weights, dims)


def truth_rank(ens: torch.Tensor, truth: torch.Tensor, member_dim: int = 0) -> torch.Tensor:
    """Rank of the truth among the members at every point (0..M), for a rank histogram."""
    return (ens < truth.unsqueeze(member_dim)).sum(dim=member_dim)


def rank_histogram(ranks: torch.Tensor, members: int) -> torch.Tensor:
    """Counts of each rank 0..members."""
    return torch.bincount(ranks.reshape(-1), minlength=members + 1)


def band_mse(error: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """Mean square of a doubly periodic field (..., y, x) split by total wavenumber |k| (rounded to
    an integer shell): bands [0, e_0], (e_0, e_1], ..., (e_last, ∞); they sum to the field's mean square
    (Parseval), so they say at which scales an error lies. Returns (..., len(edges) + 1)."""
    ny, nx = error.shape[-2:]
    power = torch.fft.fft2(error.double()).abs().square() / (ny * nx) ** 2
    ky = torch.fft.fftfreq(ny, 1 / ny, dtype=torch.float64)
    kx = torch.fft.fftfreq(nx, 1 / nx, dtype=torch.float64)
    shell = (ky[:, None].square() + kx[None, :].square()).sqrt().round()
    band = torch.bucketize(shell, torch.tensor(list(edges), dtype=torch.float64))
    out = torch.zeros(*error.shape[:-2], len(edges) + 1, dtype=torch.float64)
    return out.index_add_(-1, band.flatten(), power.flatten(-2)).to(error.dtype)
