"""The MPI backend of the domain facade: a Cartesian communicator over the grid axes.

Each rank owns a block of the global grid (uneven splits allowed: the first `n % p` blocks get one
more point). Halos are exchanged axis by axis with the two neighbours (corners come along because
later axes send the already padded array). Only imported when running under mpiexec.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from mpi4py import MPI

from twin.domain import Grid


def block_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of block `index` when n points are split into `parts` nearly equal blocks."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class MPIDomain:
    """A Cartesian decomposition of `grid` over the ranks of `comm`."""

    def __init__(self, grid: Grid, comm: MPI.Comm, dims: Sequence[int] | None = None) -> None:
        self.grid = grid
        self.world = comm
        nd = grid.ndim
        dims = list(dims) if dims is not None else MPI.Compute_dims(comm.Get_size(), nd)
        for n, p in zip(grid.shape, dims):
            if p > n:
                raise ValueError(f"cannot split an axis of {n} points over {p} ranks")
        self.comm = comm.Create_cart(dims, periods=list(grid.periodic), reorder=False)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.dims = tuple(dims)
        self.coords = tuple(self.comm.Get_coords(self.rank))
        self.local_slices = tuple(slice(*block_range(n, p, c)) for n, p, c in zip(grid.shape, dims, self.coords))

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.local_slices)

    def local_flat_indices(self) -> torch.Tensor:
        axes = [torch.arange(s.start, s.stop) for s in self.local_slices]
        mesh = torch.meshgrid(*axes, indexing="ij")
        flat = torch.zeros(self.local_shape, dtype=torch.long)
        for axis, m in enumerate(mesh):
            flat = flat * self.grid.shape[axis] + m
        return flat.reshape(-1)

    def exchange_halo(self, x: torch.Tensor, width: int | Sequence[int]) -> torch.Tensor:
        """Pad the trailing grid axes with `width` points from the neighbours (zeros at open edges)."""
        widths = (width,) * self.grid.ndim if isinstance(width, int) else tuple(width)
        nd = self.grid.ndim
        for axis, w in enumerate(widths):
            if w == 0:
                continue
            dim = x.dim() - nd + axis
            n = x.shape[dim]
            smallest = min(b - a for a, b in (block_range(self.grid.shape[axis], self.dims[axis], i)
                                              for i in range(self.dims[axis])))
            if w > smallest:  # decided alike on every rank, so no rank is left waiting in Sendrecv
                raise ValueError(f"halo width {w} exceeds the smallest subdomain ({smallest} points along "
                                 f"axis {axis}): use fewer ranks")
            lo_src, hi_dst = self.comm.Shift(axis, 1)  # receive from lower, send to upper
            send_hi = np.ascontiguousarray(x.narrow(dim, n - w, w).numpy())
            send_lo = np.ascontiguousarray(x.narrow(dim, 0, w).numpy())
            recv_lo = np.zeros_like(send_hi)
            recv_hi = np.zeros_like(send_lo)
            self.comm.Sendrecv(send_hi, dest=hi_dst, sendtag=axis * 2, recvbuf=recv_lo, source=lo_src, recvtag=axis * 2)
            self.comm.Sendrecv(send_lo, dest=lo_src, sendtag=axis * 2 + 1, recvbuf=recv_hi, source=hi_dst,
                               recvtag=axis * 2 + 1)
            x = torch.cat([torch.from_numpy(recv_lo), x, torch.from_numpy(recv_hi)], dim=dim)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """The global field on rank 0 (None elsewhere), from the local blocks (..., *local)."""
        pieces = self.comm.gather((self.local_slices, x.numpy()), root=0)
        if self.rank != 0:
            return None
        lead = x.shape[: x.dim() - self.grid.ndim]
        out = np.empty(tuple(lead) + self.grid.shape, dtype=x.numpy().dtype)
        for slices, arr in pieces:
            out[(Ellipsis,) + tuple(slices)] = arr
        return torch.from_numpy(out)

    def scatter(self, x: torch.Tensor | None) -> torch.Tensor:
        """Each rank's block of the global field given on rank 0."""
        full = self.comm.bcast(x.numpy() if x is not None and self.rank == 0 else None, root=0)
        return torch.from_numpy(np.ascontiguousarray(full[(Ellipsis,) + self.local_slices]))

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        buf = np.ascontiguousarray(x.numpy())
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM)
        return torch.from_numpy(out)

    def allgather_object(self, obj: object) -> list[object]:
        return self.comm.allgather(obj)

    def bcast_object(self, obj: object) -> object:
        return self.comm.bcast(obj, root=0)
