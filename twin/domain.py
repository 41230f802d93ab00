"""Grids and the domain-decomposition facade.

A leaf module (torch and numpy only; mpi4py only inside the MPI backend) that `assim/` and
`emulators/` may import. The serial backend never imports mpi4py.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch


def _read_only(array: np.ndarray, dtype: type) -> np.ndarray:
    out = np.array(array, dtype=dtype)  # a private copy: the grid's arrays never change
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Grid:
    """A rectilinear index grid: `shape` points, `spacing` distance units per index, periodic axes.

    Distances are in the grid's distance unit (`units`): grid points for Lorenz-96 and index grids.
    `mask` (bool, `shape`, True = valid) marks the points that belong to the state (a land-sea mask,
    missing data): masked points hold a finite fill (0) inside the twin, are never observed, updated
    or used as sources, are left out of every metric and are NaN in the output files. Grids compare
    equal when their shapes, axes and arrays (mask, coordinates) are equal (`fingerprint`).
    """

    shape: tuple[int, ...]
    periodic: tuple[bool, ...]
    spacing: tuple[float, ...] = ()
    dims: tuple[str, ...] = ()
    units: str = "1"
    mask: np.ndarray | None = field(default=None, compare=False, repr=False, kw_only=True)
    fingerprint: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        nd = len(self.shape)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "periodic", tuple(bool(p) for p in self.periodic))
        if not self.spacing:
            object.__setattr__(self, "spacing", (1.0,) * nd)
        if not self.dims:
            object.__setattr__(self, "dims", ("y", "x")[-nd:] if nd <= 2 else tuple(f"x{i}" for i in range(nd)))
        if not (len(self.periodic) == len(self.spacing) == len(self.dims) == nd):
            raise ValueError("Grid: shape, periodic, spacing and dims must have the same length")
        if self.mask is not None:
            if tuple(np.shape(self.mask)) != tuple(self.shape):
                raise ValueError(f"Grid: mask has shape {np.shape(self.mask)}, the grid {tuple(self.shape)}")
            object.__setattr__(self, "mask", _read_only(self.mask, bool))
        digest = hashlib.blake2b(digest_size=16)
        for array in self._arrays():
            digest.update(repr((array.shape, array.dtype.str)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        object.__setattr__(self, "fingerprint", digest.hexdigest())

    def mask_tensor(self) -> torch.Tensor | None:
        """The mask as a (writable) bool tensor of `shape`; None when every point is valid."""
        return None if self.mask is None else torch.tensor(self.mask)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays that define the grid besides its scalar fields (they enter `fingerprint`)."""
        return () if self.mask is None else (self.mask,)

    def area_weights(self) -> np.ndarray | None:
        """Relative area of each grid point (`shape`); None: all points weigh the same (index grids)."""
        return None

    def point_weights(self) -> torch.Tensor | None:
        """Metric weights (float64, `shape`): area × mask, summing to 1; None when every point
        weighs the same (no area weights, no mask), so unweighted scores stay as they were."""
        area = self.area_weights()
        if area is None and self.mask is None:
            return None
        w = np.ones(self.shape) if area is None else np.asarray(area, dtype=np.float64)
        if self.mask is not None:
            w = np.where(self.mask, w, 0.0)
        total = w.sum()
        if not total > 0:
            raise ValueError("Grid: no valid point (the mask excludes every point)")
        return torch.from_numpy(w / total)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def lengths(self) -> tuple[float, ...]:
        """Extent of each axis in distance units (the period of periodic axes)."""
        return tuple(n * h for n, h in zip(self.shape, self.spacing))

    def axis_values(self, axis: int) -> np.ndarray:
        return np.arange(self.shape[axis]) * self.spacing[axis]

    def coordinates(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Coordinates of every grid point, C order, shape (size, ndim)."""
        axes = [torch.arange(n, dtype=dtype) * h for n, h in zip(self.shape, self.spacing)]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pairwise distances between points a (m, ndim) and b (n, ndim), wrapping periodic axes."""
        diff = (a[:, None, :] - b[None, :, :]).abs()
        for axis, (periodic, length) in enumerate(zip(self.periodic, self.lengths)):
            if periodic:
                d = torch.remainder(diff[..., axis], length)
                diff[..., axis] = torch.minimum(d, length - d)
        return diff.square().sum(-1).sqrt()


class Decomposition(Protocol):
    """What models and filters may ask of the domain: their slice of the grid and collectives."""

    grid: Grid
    rank: int
    size: int
    local_slices: tuple[slice, ...]

    @property
    def local_shape(self) -> tuple[int, ...]: ...

    def local_flat_indices(self) -> torch.Tensor: ...

    def exchange_halo(self, x: torch.Tensor, width: int | Sequence[int]) -> torch.Tensor: ...

    def gather(self, x: torch.Tensor) -> torch.Tensor | None: ...

    def scatter(self, x: torch.Tensor | None) -> torch.Tensor: ...

    def allreduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def allgather_object(self, obj: object) -> list[object]: ...

    def bcast_object(self, obj: object) -> object: ...


def _widths(width: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (width,) * ndim if isinstance(width, int) else tuple(width)


@dataclass
class SerialDomain:
    """One process owns the whole grid; halo exchange is a periodic wrap (zeros on open axes)."""

    grid: Grid
    rank: int = 0
    size: int = 1
    local_slices: tuple[slice, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.local_slices = tuple(slice(0, n) for n in self.grid.shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.grid.shape

    def local_flat_indices(self) -> torch.Tensor:
        return torch.arange(self.grid.size)

    def exchange_halo(self, x: torch.Tensor, width: int | Sequence[int]) -> torch.Tensor:
        """Pad the trailing grid axes of x (..., *grid) with `width` halo points on each side."""
        return pad_halo(x, _widths(width, self.grid.ndim), self.grid.periodic)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def scatter(self, x: torch.Tensor | None) -> torch.Tensor:
        assert x is not None
        return x

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def allgather_object(self, obj: object) -> list[object]:
        return [obj]

    def bcast_object(self, obj: object) -> object:
        return obj


def pad_halo(x: torch.Tensor, widths: Sequence[int], periodic: Sequence[bool]) -> torch.Tensor:
    """Pad the last len(widths) axes: periodic axes wrap around, open axes get zeros."""
    nd = len(widths)
    for i, (w, per) in enumerate(zip(widths, periodic)):
        if w == 0:
            continue
        dim = x.dim() - nd + i
        n = x.shape[dim]
        if per:
            if w > n:
                reps = -(-w // n)
                tiled = torch.cat([x] * (2 * reps + 1), dim=dim)
                x = tiled.narrow(dim, reps * n - w, n + 2 * w)
            else:
                x = torch.cat([x.narrow(dim, n - w, w), x, x.narrow(dim, 0, w)], dim=dim)
        else:
            shape = list(x.shape)
            shape[dim] = w
            z = x.new_zeros(shape)
            x = torch.cat([z, x, z], dim=dim)
    return x


def mpi_world():
    """COMM_WORLD when this process is one of several launched by mpiexec, else None.

    mpi4py is imported only when a launcher's environment says so (or it is already imported),
    so serial runs never load MPI.
    """
    import os
    import sys

    launched = any(k in os.environ for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "MPI_LOCALNRANKS"))
    if not (launched or "mpi4py" in sys.modules):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def make_domain(grid: Grid, decomposition: str = "auto", comm: object | None = None) -> Decomposition:
    """The serial backend unless running under mpiexec with more than one rank.

    `comm` (an mpi4py communicator) restricts the decomposition to a group of ranks, e.g. one
    forecast of a hindcast campaign; by default all ranks of COMM_WORLD share the grid.
    """
    if decomposition == "serial":
        return SerialDomain(grid)
    if comm is None:
        comm = mpi_world()
    if comm is not None and comm.Get_size() > 1:
        from twin.mpi_domain import MPIDomain

        return MPIDomain(grid, comm)
    return SerialDomain(grid)
