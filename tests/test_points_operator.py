"""PointsOperator: n-linear interpolation at arbitrary locations, periodic seams, autograd, decomposition."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from assim.geo import GeoGrid
from assim.operators import SubsetOperator
from assim.points import PointsOperator, wrap_locations
from assim.registry import operator_registry
from twin.domain import Grid, SerialDomain, pad_halo

f64 = torch.float64


def hat_weights(grid: Grid, loc: torch.Tensor) -> torch.Tensor:
    """Dense (p, size) interpolation weights from tent functions — independent of the operator's code."""
    coords = grid.coordinates(f64)
    w = torch.ones(loc.shape[0], grid.size, dtype=f64)
    for a, (n, h, per) in enumerate(zip(grid.shape, grid.spacing, grid.periodic)):
        if per and n == 1:
            continue  # a single periodic point carries the whole weight
        d = (loc[:, None, a] - coords[None, :, a]).abs() / h
        if per:
            d = torch.remainder(d, n)
            d = torch.minimum(d, n - d)
        w = w * (1.0 - d).clamp_min(0.0)
    return w


def test_registered_and_flags():
    assert operator_registry["points"] is PointsOperator
    op = PointsOperator(Grid((5,), (True,)), [[1.5]], 0)
    assert op.observes_value is True and op.locations.shape == (1, 1) and op.variable.tolist() == [0]


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=2), data=st.data())
def test_exact_at_grid_points_equals_subset(shape, data):
    periodic = tuple(data.draw(st.booleans()) for _ in shape)
    spacing = tuple(data.draw(st.sampled_from([1.0, 0.5, 3.0, 1000.0])) for _ in shape)
    grid = Grid(tuple(shape), periodic, spacing)
    n_var = data.draw(st.integers(1, 3))
    flat = torch.tensor(data.draw(st.lists(st.integers(0, n_var * grid.size - 1), min_size=1, max_size=12)))
    x = torch.randn(4, n_var, *shape, dtype=f64)
    x[0, :, ...] = torch.inf if data.draw(st.booleans()) else x[0]  # member 0 may be inf everywhere
    expected = SubsetOperator(grid, flat)(x)
    by_index = PointsOperator(grid, flat)  # the SubsetOperator-style call
    by_location = PointsOperator(grid, grid.coordinates()[flat % grid.size], flat // grid.size)
    assert torch.equal(by_index(x)[1:], expected[1:]) and torch.equal(by_location(x)[1:], expected[1:])


def test_geogrid_grid_points_exact():
    grid = GeoGrid.regular(7, 12)
    x = torch.randn(2, 1, *grid.shape, dtype=f64)
    flat = torch.arange(grid.size)
    op = PointsOperator(grid, grid.coordinates()[flat], 0)
    assert torch.equal(op(x), SubsetOperator(grid, flat)(x))
    mid = PointsOperator(grid, [[-75.0, 15.0]], 0)  # lat -90 + 30 k, lon 30 k: halfway both ways
    assert torch.allclose(mid(x)[:, 0], x[:, 0, 0:2, 0:2].mean((-1, -2)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), h=st.sampled_from([1.0, 0.25, 7.0]), a=st.floats(-5, 5), b=st.floats(-5, 5),
       t=st.lists(st.floats(0, 1), min_size=1, max_size=10))
def test_linear_in_between_reproduces_linear_fields(n, h, a, b, t):
    grid = Grid((n,), (False,), (h,))
    field = a + b * torch.arange(n, dtype=f64) * h
    loc = torch.tensor(t, dtype=f64)[:, None] * (n - 1) * h
    out = PointsOperator(grid, loc, 0)(field.reshape(1, n))
    assert torch.allclose(out, a + b * loc[:, 0], atol=1e-9 * (1 + abs(a) + abs(b) * n * h))


def test_bilinear_field_reproduced_in_2d():
    grid = Grid((5, 7), (False, False), (2.0, 1.0))
    c = grid.coordinates(f64)
    field = (1.0 + 0.5 * c[:, 0] - 2.0 * c[:, 1] + 0.25 * c[:, 0] * c[:, 1]).reshape(1, 5, 7)
    g = torch.Generator().manual_seed(0)
    loc = torch.rand(50, 2, generator=g, dtype=f64) * torch.tensor([8.0, 6.0], dtype=f64)
    want = 1.0 + 0.5 * loc[:, 0] - 2.0 * loc[:, 1] + 0.25 * loc[:, 0] * loc[:, 1]
    assert torch.allclose(PointsOperator(grid, loc, 0)(field), want, atol=1e-12)


def test_periodic_wrap_at_the_seam():
    grid = Grid((10,), (True,))
    x = torch.randn(3, 1, 10, dtype=f64)
    op = PointsOperator(grid, [[9.5], [-0.5], [19.5], [9.75], [-10.0], [10.0]], 0)
    y = op(x)
    seam = 0.5 * (x[:, 0, 9] + x[:, 0, 0])
    assert torch.allclose(y[:, 0], seam) and torch.allclose(y[:, 1], seam) and torch.allclose(y[:, 2], seam)
    assert torch.allclose(y[:, 3], 0.25 * x[:, 0, 9] + 0.75 * x[:, 0, 0])
    assert torch.equal(y[:, 4], x[:, 0, 0]) and torch.equal(y[:, 5], x[:, 0, 0])
    assert op.locations[:, 0].tolist() == [9.5, 9.5, 9.5, 9.75, 0.0, 0.0]


def test_open_axis_refuses_outside_and_clamps_a_hair():
    grid = Grid((4, 6), (False, True))
    with pytest.raises(ValueError, match="outside the grid"):
        PointsOperator(grid, [[3.5, 1.0]], 0)
    with pytest.raises(ValueError, match="outside the grid"):
        PointsOperator(grid, [[math.nan, 1.0]], 0)
    x = torch.randn(1, 4, 6, dtype=f64)  # (variable, y, x): no batch dims, so the output is (p,)
    edge = PointsOperator(grid, [[3.0 + 1e-12, 2.0], [-1e-12, 5.5], [3.0, 0.0]], 0)(x)
    assert torch.equal(edge[0], x[0, 3, 2]) and torch.equal(edge[2], x[0, 3, 0])
    assert torch.allclose(edge[1], 0.5 * (x[0, 0, 5] + x[0, 0, 0]))


@settings(max_examples=25, deadline=None)
@given(ny=st.integers(1, 5), nx=st.integers(1, 6), py=st.booleans(), px=st.booleans(),
       seed=st.integers(0, 99))
def test_autograd_gradient_equals_interpolation_weights(ny, nx, py, px, seed):
    grid = Grid((ny, nx), (py, px), (1.5, 0.5))
    g = torch.Generator().manual_seed(seed)
    span = torch.tensor([(ny if py else ny - 1) * 1.5, (nx if px else nx - 1) * 0.5], dtype=f64)
    loc = torch.rand(6, 2, generator=g, dtype=f64) * span
    loc = loc + torch.tensor([3.0 * ny if py else 0.0, -nx * 0.5 if px else 0.0], dtype=f64)  # wrap
    var = torch.randint(0, 2, (6,), generator=g)
    op = PointsOperator(grid, loc, var)
    x = torch.randn(2, ny, nx, dtype=f64, requires_grad=True)
    dense = hat_weights(grid, loc)
    for j in range(6):
        (grad,) = torch.autograd.grad(op(x)[j], x)
        want = torch.zeros(2, grid.size, dtype=f64)
        want[var[j]] = dense[j]
        assert torch.allclose(grad.reshape(2, -1), want, atol=1e-12), j
    assert torch.allclose(op(x.detach()), (dense * x.detach().reshape(2, -1)[var]).sum(-1), atol=1e-12)


def test_float32_and_batch_dims():
    grid = Grid((8,), (True,))
    x = torch.randn(5, 3, 2, 8)
    y = PointsOperator(grid, [[0.5], [7.5]], [1, 0])(x)
    assert y.dtype == torch.float32 and y.shape == (5, 3, 2)
    assert torch.allclose(y[..., 1], 0.5 * (x[..., 0, 7] + x[..., 0, 0]))


def test_serial_domain_and_empty():
    grid = Grid((6,), (True,))
    op = PointsOperator(grid, torch.arange(6), SerialDomain(grid))
    x = torch.randn(2, 1, 6)
    assert torch.equal(op(x), x[:, 0]) and op.index.tolist() == list(range(6))
    empty = PointsOperator(grid, torch.zeros(0, 1, dtype=f64), 0)
    assert empty(x).shape == (2, 0)


class FakeRank:
    """One rank of a simulated decomposition: its halo exchange cuts the padded global state."""

    def __init__(self, grid, slices, size, world):
        self.grid, self.local_slices, self.size, self.rank, self.world = grid, slices, size, 0, world

    def exchange_halo(self, x, width):
        padded = pad_halo(self.world["state"], (1,) * self.grid.ndim, self.grid.periodic)
        return padded[(..., *(slice(s.start, s.stop + 2) for s in self.local_slices))]


@pytest.mark.parametrize("periodic", [(False, True), (True, True), (False, False)])
def test_simulated_decomposition_equals_serial(periodic):
    grid = Grid((6, 8), periodic)
    g = torch.Generator().manual_seed(1)
    span = torch.tensor([6.0 if periodic[0] else 5.0, 8.0 if periodic[1] else 7.0], dtype=f64)
    loc = torch.cat([torch.rand(40, 2, generator=g, dtype=f64) * span,
                     torch.tensor([[2.0, 3.0], [5.0, 7.0], [0.0, 0.0]], dtype=f64)])
    var = torch.randint(0, 2, (loc.shape[0],), generator=g)
    x = torch.randn(3, 2, 6, 8, dtype=f64)
    serial = PointsOperator(grid, loc, var)(x)
    world = {"state": x}
    seen = []
    for ys in (slice(0, 2), slice(2, 6)):
        for xs in (slice(0, 5), slice(5, 8)):
            op = PointsOperator(grid, loc, var, FakeRank(grid, (ys, xs), 4, world))
            assert torch.allclose(op(x[..., ys, xs]), serial[..., op.index], atol=1e-14)
            assert torch.equal(op.locations, wrap_locations(grid, loc[op.index])[0])
            seen += op.index.tolist()
    assert sorted(seen) == list(range(loc.shape[0]))  # every observation on exactly one rank


def test_wrap_locations_normalises_negative_zero():
    grid = Grid((4,), (True,))
    wrapped, inside = wrap_locations(grid, np.array([[-0.0], [-4.0], [4.0 - 1e-13]]))
    assert inside.all() and wrapped[:, 0].tolist() == [0.0, 0.0, 0.0]
    assert not math.copysign(1.0, float(wrapped[0, 0])) < 0
