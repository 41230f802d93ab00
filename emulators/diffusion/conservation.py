"""Domain-mean conservation: a learned step must not drift a quantity the physics conserves.

The SQG truth keeps each level's domain-mean θ to ~1e-5 K over 100 days (advection and hyperdiffusion
conserve it on the doubly periodic grid; the relaxation is to a jet of zero mean), but a learned step's
small mean errors add up: a free run of the emulator drifted by −5 K on the top level in 100 days.
Like the global mass and moisture fixers of climate models (and ACE's corrector), the fix subtracts
each member's and variable's change of the domain mean over the step: the smallest (spatially uniform)
correction that restores the conservation law, which leaves every other wavenumber untouched.
"""
from __future__ import annotations

from typing import Optional

import torch


def mean_change_sums(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Σ (new − old) over the two trailing (grid) axes in float64: (..., y, x) → (...); the per-rank
    partial sums a domain's allreduce adds up."""
    return (new - old).sum(dim=(-2, -1), dtype=torch.float64)


def remove_mean_change(new: torch.Tensor, sums: torch.Tensor, points: int) -> torch.Tensor:
    """new (..., y, x) minus the domain-mean change sums / points, spread uniformly."""
    return new - (sums / points).to(new.dtype)[..., None, None]


def keep_domain_mean(new: torch.Tensor, old: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`new` with the domain mean of `old`, per leading index (member, variable), on a whole grid; with
    `valid` (bool, broadcastable to new) the mean is over valid points and only they change."""
    if valid is None:
        return remove_mean_change(new, mean_change_sums(new, old), new.shape[-2] * new.shape[-1])
    sums = torch.where(valid, new - old, torch.zeros_like(new)).sum(dim=(-2, -1), dtype=torch.float64)
    count = valid.expand(new.shape).sum(dim=(-2, -1)).clamp_min(1).to(torch.float64)
    return torch.where(valid, new - (sums / count).to(new.dtype)[..., None, None], new)
