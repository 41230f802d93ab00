"""Members × subdomains: the 2-D process grid of `domain.ranks_per_member` (DESIGN, Parallelism).

The run's ranks form groups of K = `ranks_per_member` consecutive ranks. Group g holds the contiguous
block g of the members (uneven splits allowed: the first `members % groups` blocks get one more) and
decomposes the grid over its K ranks (the Cartesian `MPIDomain` on the group's communicator, or the
serial backend when K = 1). The ranks with the same place in their groups (the same subdomain) form
a member communicator. Only the forecast is split over members: after it, each subdomain's member
blocks are all-gathered over the member communicator, so the assimilation stages, the scores and the
output see (all members, local subdomain) exactly as with K = all ranks — computed by every group
alike (the same keyed numbers), each group then forecasting its own block. Every rank thus holds all
members of its subdomain (memory is split by subdomain only), and the truth run is repeated in each
group. Random draws are keyed by global member index: a member-keyed model (the diffusion emulator) gets
the block's first member in `step(..., first_member=...)`. No import of mpi4py here: the communicators come in
from `mpi_world()` or the caller.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from twin.domain import Decomposition, Grid, make_domain, mpi_world


class LayoutError(ValueError):
    """`ranks_per_member` does not fit the rank count or the ensemble (one line, no key)."""


def member_groups(ranks: int, ranks_per_member: int, members: int) -> int:
    """The number of member groups; LayoutError unless K divides the rank count and every group
    gets at least one member."""
    if ranks % ranks_per_member:
        raise LayoutError(f"must divide the number of ranks ({ranks}), got {ranks_per_member}")
    groups = ranks // ranks_per_member
    if members < groups:
        raise LayoutError(f"{ranks} ranks / {ranks_per_member} = {groups} member groups, more than the "
                          f"{members} members (ensemble.size)")
    return groups


def run_domain(grid: Grid, decomposition: str, ranks_per_member: int | None, members: int,
               comm: object | None = None) -> Decomposition:
    """The run's decomposition: `make_domain`'s, or a `MemberSplitDomain` when `ranks_per_member`
    makes more than one member group of the ranks of `comm` (default: COMM_WORLD under mpiexec)."""
    world = None
    if ranks_per_member is not None and decomposition != "serial":
        world = comm if comm is not None else mpi_world()
    if world is None or world.Get_size() == 1:
        return make_domain(grid, decomposition, comm)
    if member_groups(world.Get_size(), ranks_per_member, members) == 1:
        return make_domain(grid, decomposition, world)
    return MemberSplitDomain(grid, world, ranks_per_member, members)


class MemberSplitDomain:
    """The run's view under a member split: all members at this rank's subdomain.

    Grid operations (halos, all-reduce, all-gather of objects) act within the group (`sub`, the
    decomposition models and filters use); `rank` and `size` count every rank, so rank 0 alone
    records, prints and writes: `gather` collects a field on rank 0 only and `scatter` hands rank
    0's field to every group. `members` is this group's block of the ensemble.
    """

    def __init__(self, grid: Grid, world, ranks_per_member: int, members: int) -> None:
        from twin.mpi_domain import block_range

        self.grid, self.world = grid, world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        groups = member_groups(self.size, ranks_per_member, members)
        self.group = self.rank // ranks_per_member
        self.blocks = [slice(*block_range(members, groups, g)) for g in range(groups)]
        self.members = self.blocks[self.group]
        self.member_comm = world.Split(self.rank % ranks_per_member, self.rank)
        self.sub = make_domain(grid, "auto", world.Split(self.group, self.rank))
        self.local_slices = self.sub.local_slices

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.sub.local_shape

    def local_flat_indices(self) -> torch.Tensor:
        return self.sub.local_flat_indices()

    def exchange_halo(self, x: torch.Tensor, width: int | Sequence[int]) -> torch.Tensor:
        return self.sub.exchange_halo(x, width)

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub.allreduce(x)

    def allgather_object(self, obj: object) -> list[object]:
        return self.sub.allgather_object(obj)

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """The global field on rank 0 (None elsewhere) from the local blocks (..., *local)."""
        full = self.sub.gather(x)
        return full if self.rank == 0 else None

    def scatter(self, x: torch.Tensor | None) -> torch.Tensor:
        """Each rank's block of the global field given on rank 0."""
        if self.sub.rank == 0:  # the groups' first ranks, rank 0 among them
            x = self.member_comm.bcast(x if self.rank == 0 else None, root=0)
        return self.sub.scatter(x)

    def bcast_object(self, obj: object) -> object:
        return self.world.bcast(obj, root=0)

    def allgather_members(self, block: torch.Tensor) -> torch.Tensor:
        """All members (member, ...) at this subdomain from every group's block (block, ...)."""
        send = np.ascontiguousarray(block.detach().numpy())
        per_member = send[0].size
        out = np.empty((self.blocks[-1].stop,) + send.shape[1:], dtype=send.dtype)
        counts = [(b.stop - b.start) * per_member for b in self.blocks]
        self.member_comm.Allgatherv(send, [out, counts])
        return torch.from_numpy(out)
