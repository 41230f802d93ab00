"""Shapiro filter: a local, scale-selective low-pass that damps the grid-scale noise a learned step adds.

Why: the truth model's hyperdiffusion keeps almost no variance at the smallest scales (k ≥ 26 of 64 in
SQG), but a sampled emulator step leaves some there; step after step it piles up and feeds the larger
scales. Order 2p along one axis: x ← x − (−δ²/4)^p x, with δ² the centred second difference, so the
response at wavenumber k on n points is 1 − sin^(2p)(π k / n): 1 at k = 0 (constants and per-variable
affine standardisation commute with it), 0 at the grid scale, and for order 16 above 0.99 out to
k = n/4. It needs a halo of p points, so a tile with its halo equals the global filter (decomposition
safe). It acts along periodic axes only: an open boundary has no data beyond it to filter with.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

Pad = Callable[[torch.Tensor, int], torch.Tensor]


def shapiro_halo(order: int) -> int:
    """Halo (points per side) an order-`order` filter reads: order / 2."""
    if order < 0 or order % 2:
        raise ValueError(f"smoothing_order must be an even number >= 0 (0: no filter), got {order}")
    return order // 2


def shapiro(x: torch.Tensor, order: int, periodic: Sequence[bool], pad: Pad) -> torch.Tensor:
    """Filter x (..., y, x) along its periodic trailing axes; `pad(x, h)` supplies an h-point halo
    (periodic wrap, or the neighbours' data under a domain decomposition)."""
    p = shapiro_halo(order)
    if p == 0 or not any(periodic):
        return x
    x = pad(x, p)
    for i, on in enumerate(periodic):
        dim = x.dim() - len(periodic) + i
        n = x.shape[dim] - 2 * p
        if not on:
            x = x.narrow(dim, p, n)
            continue
        d = x
        for _ in range(p):  # −δ²/4, valid: one point shorter on each side per application
            m = d.shape[dim]
            d = (2 * d.narrow(dim, 1, m - 2) - d.narrow(dim, 0, m - 2) - d.narrow(dim, 2, m - 2)) / 4
        x = x.narrow(dim, p, n) - d
    return x


def shapiro_wrapped(x: torch.Tensor, passes: int, axes: List[int]) -> torch.Tensor:
    """`shapiro` of order 2 · passes on a whole periodic grid, wrapping by roll along `axes` (in order):
    the same arithmetic op for op, without a pad callable, so TorchScript can compile it (`twin export`)."""
    for axis in axes:
        d = x
        for _ in range(passes):
            d = (2 * d - torch.roll(d, 1, axis) - torch.roll(d, -1, axis)) / 4
        x = x - d
    return x
