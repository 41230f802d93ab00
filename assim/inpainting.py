"""Inpainting: fill the unobserved points of a field from the observed ones.

Classic fills solve a sparse linear system on the grid (scipy): harmonic (Δu = 0) or biharmonic
(Δ²u = 0) on the unknown points, with the known points as Dirichlet data; periodic axes wrap, open
axes use a zero-flux edge. A learned prior (e.g. RePaint-style sampling of a diffusion model with the
known part held fixed) plugs in through the same `Inpainter` protocol: the filter hands it in as an
object, so `assim/` never imports `emulators/`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from twin.domain import Grid

KINDS = ("harmonic", "biharmonic")


class Inpainter(Protocol):
    """Fills `field` (..., *grid) where `known` (*grid, bool) is False; known points unchanged."""

    def __call__(self, field: torch.Tensor, known: torch.Tensor) -> torch.Tensor: ...


def laplacian(grid: Grid) -> sp.csr_matrix:
    """The 5-point (2-D) / 3-point (1-D) Laplacian on the grid in index units; open edges zero-flux."""
    n = grid.size
    idx = np.arange(n).reshape(grid.shape)
    rows, cols, vals = [], [], []
    for axis, periodic in enumerate(grid.periodic):
        for shift in (-1, 1):
            nb = np.roll(idx, shift, axis=axis)
            valid = np.ones(grid.shape, dtype=bool)
            if not periodic:
                edge = [slice(None)] * grid.ndim
                edge[axis] = 0 if shift == 1 else -1
                valid[tuple(edge)] = False
            rows += [idx[valid], idx[valid]]
            cols += [nb[valid], idx[valid]]
            vals += [np.ones(valid.sum()), -np.ones(valid.sum())]
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


@lru_cache(maxsize=8)
def _operator(grid: Grid, kind: str) -> sp.csr_matrix:
    lap = laplacian(grid)
    return lap if kind == "harmonic" else (lap @ lap).tocsr()


def classic_fill(field: torch.Tensor, known: torch.Tensor, grid: Grid, kind: str = "harmonic") -> torch.Tensor:
    """Harmonic or biharmonic fill of field (..., *grid) at the points where `known` is False.

    With no known point the field is returned unchanged (nothing to extend from); the known points
    are copied exactly.
    """
    if kind not in KINDS:
        raise ValueError(f"inpainting kind must be one of {', '.join(KINDS)}, got {kind!r}")
    mask = known.reshape(-1).cpu().numpy().astype(bool)
    if mask.all() or not mask.any():
        return field
    op = _operator(grid, kind)
    unknown = ~mask
    a_uu = op[unknown][:, unknown].tocsc()
    a_uk = op[unknown][:, mask]
    flat = field.detach().reshape(-1, grid.size).double().cpu().numpy()
    rhs = -(a_uk @ flat[:, mask].T)  # (n_unknown, batch)
    solved = spla.splu(a_uu).solve(np.ascontiguousarray(rhs))
    out = flat.copy()
    out[:, unknown] = solved.T
    return torch.from_numpy(out).to(field).reshape(field.shape)


class ClassicInpainter:
    """An `Inpainter` for one grid and kind."""

    def __init__(self, grid: Grid, kind: str = "harmonic") -> None:
        if kind not in KINDS:
            raise ValueError(f"inpainting kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.grid, self.kind = grid, kind

    def __call__(self, field: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return classic_fill(field, known, self.grid, self.kind)
