"""The MPI backend of the domain facade: a Cartesian communicator over the grid axes.

Each rank owns a block of the global grid (uneven splits allowed: the first `n % p` blocks get one
more point). Halos are exchanged axis by axis with the two neighbours (corners come along because
later axes send the already padded array). A halo of any width works: where it reaches past the
neighbour's block, further hops pass on what the previous hop brought (the same hop count on every
rank, so no rank waits), wrapping more than once round a periodic axis narrower than the halo. The
result equals the serial `pad_halo` of the global field. Only imported when running under mpiexec.
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


def hop_counts(sizes: Sequence[int], periodic: bool, width: int, index: int, step: int) -> list[int]:
    """Points block `index` receives at hops 1, 2, ... for its halo of `width` on the side `step`
    (-1 below, +1 above), blocks of `sizes` along an axis: hop k brings the edge of block index + k·step
    nearest to it; past an open edge nothing comes (the rest of the halo is zeros)."""
    counts, left, parts = [], width, len(sizes)
    while left > 0:
        j = index + step * (len(counts) + 1)
        if not periodic and not 0 <= j < parts:
            break
        counts.append(min(left, sizes[j % parts]))
        left -= counts[-1]
    return counts


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
        self._hops: dict[tuple[int, int], tuple[list[int], ...]] = {}

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
        """Pad the trailing grid axes with `width` points from the neighbours (zeros at open edges);
        any width, over as many hops as the widest halo of any rank needs."""
        widths = (width,) * self.grid.ndim if isinstance(width, int) else tuple(width)
        nd = self.grid.ndim
        for axis, w in enumerate(widths):
            if w == 0:
                continue
            dim = x.dim() - nd + axis
            lo_src, hi_dst = self.comm.Shift(axis, 1)  # receive from lower, send to upper
            from_lo, from_hi, to_hi, to_lo = self._hop_plan(axis, w)
            below: list[torch.Tensor] = []
            above: list[torch.Tensor] = []
            up = down = x  # what the next hop passes on: the own block, then what the last hop brought
            for k in range(len(from_lo)):
                up = self._sendrecv(up.narrow(dim, up.shape[dim] - to_hi[k], to_hi[k]), hi_dst, lo_src,
                                    from_lo[k], dim, axis * 2)
                down = self._sendrecv(down.narrow(dim, 0, to_lo[k]), lo_src, hi_dst, from_hi[k], dim,
                                      axis * 2 + 1)
                below.insert(0, up)
                above.append(down)
            zeros = [list(x.shape), list(x.shape)]
            zeros[0][dim], zeros[1][dim] = w - sum(from_lo), w - sum(from_hi)
            x = torch.cat([x.new_zeros(zeros[0]), *below, x, *above, x.new_zeros(zeros[1])], dim=dim)
        return x

    def _hop_plan(self, axis: int, width: int) -> tuple[list[int], ...]:
        """Points per hop along `axis` that this rank receives from below and from above, and sends
        up and down (what the upper / lower neighbour receives). The hop count, the longest any rank
        needs, depends only on the grid, the split and the width, so every rank makes as many calls."""
        key = (axis, width)
        if key not in self._hops:
            parts, periodic, c = self.dims[axis], self.grid.periodic[axis], self.coords[axis]
            sizes = [b - a for a, b in (block_range(self.grid.shape[axis], parts, i) for i in range(parts))]
            lo = [hop_counts(sizes, periodic, width, i, -1) for i in range(parts)]
            hi = [hop_counts(sizes, periodic, width, i, +1) for i in range(parts)]
            hops = max(len(counts) for counts in lo + hi)

            def of(counts: list[list[int]], i: int) -> list[int]:  # none for a rank past an open edge
                own = counts[i % parts] if periodic or 0 <= i < parts else []
                return own + [0] * (hops - len(own))

            self._hops[key] = (of(lo, c), of(hi, c), of(lo, c + 1), of(hi, c - 1))
        return self._hops[key]

    def _sendrecv(self, send: torch.Tensor, dest: int, source: int, count: int, dim: int,
                  tag: int) -> torch.Tensor:
        """Send `send` to `dest` while receiving `count` points along `dim` from `source`."""
        shape = list(send.shape)
        shape[dim] = count
        buf = np.ascontiguousarray(send.numpy())
        recv = np.empty(shape, dtype=buf.dtype)
        self.comm.Sendrecv(buf, dest=dest, sendtag=tag, recvbuf=recv, source=source, recvtag=tag)
        return torch.from_numpy(recv)

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
