"""MPI backend (run by `make test` as `mpiexec -n 2 ... pytest --with-mpi -m mpi`)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from emulators.lorenz96 import Lorenz96
from twin.domain import Grid, SerialDomain, pad_halo
from twin.random import Streams

pytestmark = pytest.mark.mpi(min_size=2)

# derandomised: every rank draws the same examples, so collectives stay matched
same_on_all_ranks = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def mpi_domain(grid):
    from mpi4py import MPI

    from twin.mpi_domain import MPIDomain

    return MPIDomain(grid, MPI.COMM_WORLD)


@same_on_all_ranks
@given(n=st.integers(4, 40), w=st.integers(1, 2), members=st.integers(1, 3))
def test_halo_exchange_equals_serial_periodic_pad(n, w, members):
    grid = Grid((n,), (True,))
    dom = mpi_domain(grid)
    x = torch.arange(members * n, dtype=torch.float64).reshape(members, 1, n)
    local = x[..., dom.local_slices[0]]
    padded = dom.exchange_halo(local, w)
    s = dom.local_slices[0]
    reference = pad_halo(x, (w,), (True,))[..., s.start:s.stop + 2 * w]
    assert torch.equal(padded, reference)


@same_on_all_ranks
@given(ny=st.integers(4, 9), nx=st.integers(4, 9), periodic_y=st.booleans())
def test_2d_halo_and_gather_scatter(ny, nx, periodic_y):
    grid = Grid((ny, nx), (periodic_y, True))
    dom = mpi_domain(grid)
    x = torch.randn(2, 1, ny, nx, dtype=torch.float64, generator=torch.Generator().manual_seed(ny * 10 + nx))
    local = dom.scatter(x if dom.rank == 0 else None)
    assert torch.equal(local, x[(Ellipsis,) + dom.local_slices])
    full = dom.gather(local)
    if dom.rank == 0:
        assert torch.equal(full, x)
    else:
        assert full is None
    padded = dom.exchange_halo(local, 1)
    ref = SerialDomain(grid).exchange_halo(x, 1)
    ys, xs = dom.local_slices
    assert torch.equal(padded, ref[..., ys.start:ys.stop + 2, xs.start:xs.stop + 2])


@settings(same_on_all_ranks, max_examples=80)
@given(data=st.data())
def test_halo_exchange_of_any_width_equals_serial_pad(data):
    """Widths from 0 to 3x the axis: past the neighbour's block (several hops), past the whole
    periodic axis (wrapping more than once), zeros past open edges; uneven splits, 1-D and 2-D."""
    from mpi4py import MPI

    from twin.mpi_domain import MPIDomain

    size = MPI.COMM_WORLD.Get_size()
    nd = data.draw(st.integers(1, 2), label="ndim")
    split = data.draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]),
                      label="ranks on axis 0")
    dims = (size,) if nd == 1 else (split, size // split)
    shape = tuple(data.draw(st.integers(max(2, p), 12), label=f"n{i}") for i, p in enumerate(dims))
    periodic = tuple(data.draw(st.booleans(), label=f"periodic{i}") for i in range(nd))
    widths = tuple(data.draw(st.integers(0, 3 * n), label=f"w{i}") for i, n in enumerate(shape))
    members = data.draw(st.integers(1, 2), label="members")
    grid = Grid(shape, periodic)
    dom = MPIDomain(grid, MPI.COMM_WORLD, dims)
    x = 1 + torch.arange(members * 2 * grid.size, dtype=torch.float64).reshape(members, 2, *shape)
    padded = dom.exchange_halo(x[(..., *dom.local_slices)].clone(), widths if nd > 1 else widths[0])
    window = tuple(slice(s.start, s.stop + 2 * w) for s, w in zip(dom.local_slices, widths))
    assert torch.equal(padded, pad_halo(x, widths, periodic)[(..., *window)])


def test_decomposed_lorenz96_equals_serial():
    cfg = Lorenz96.Config(size=37, dt=0.05)
    grid = Lorenz96.global_grid(cfg)
    dom = mpi_domain(grid)
    x = 8 + Streams(4).field_normal("test", (), 3, 1, torch.arange(37), (37,))
    serial = Lorenz96(cfg, SerialDomain(grid))
    parallel = Lorenz96(cfg, dom)
    local = x[..., dom.local_slices[0]]
    ref = x
    for _ in range(20):
        local, ref = parallel.step(local), serial.step(ref)
    full = dom.gather(local)
    if dom.rank == 0:
        assert torch.equal(full, ref)


def test_allreduce_and_rank_independent_draws():
    grid = Grid((50,), (True,))
    dom = mpi_domain(grid)
    total = dom.allreduce(torch.tensor([1.0, float(dom.rank)]))
    assert total.tolist() == [float(dom.size), float(sum(range(dom.size)))]
    s = Streams(9)
    local = s.field_normal("init", (0,), 2, 1, dom.local_flat_indices(), dom.local_shape)
    whole = s.field_normal("init", (0,), 2, 1, torch.arange(50), (50,))
    assert torch.equal(local, whole[..., dom.local_slices[0]])
