"""Gaspari–Cohn taper: shape of the function, the radius convention, cut-off, periodic wrap."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from assim.geo import GeoGrid
from assim.localization import CUTOFF, HALF_WIDTH_PER_RADIUS, gaspari_cohn, node_taper, support, taper_matrix
from twin.domain import Grid

f64 = torch.float64


def gc(z: float) -> float:
    return float(gaspari_cohn(torch.tensor([z], dtype=f64))[0])


def test_value_one_at_zero_and_zero_beyond_two() -> None:
    assert gc(0.0) == 1.0
    for z in (2.0, 2.0 + 1e-12, 2.5, 10.0, 1e9):
        assert gc(z) == 0.0


def test_known_values() -> None:
    # z = 1: -1/4 + 1/2 + 5/8 - 5/3 + 1 = 5/24 from the inner branch
    assert gc(1.0) == pytest.approx(5.0 / 24.0, abs=1e-14)
    z = 1.5  # outer branch written out term by term
    expected = z**5 / 12 - z**4 / 2 + 5 * z**3 / 8 + 5 * z**2 / 3 - 5 * z + 4 - 2 / (3 * z)
    assert gc(z) == pytest.approx(expected, abs=1e-14)


def test_continuity_at_branch_points() -> None:
    eps = 1e-9
    assert abs(gc(1.0 - eps) - gc(1.0 + eps)) < 1e-8
    assert abs(gc(2.0 - eps)) < 1e-8
    # the derivative is continuous too (GC is C^2 except at the origin's 5th-order term)
    h = 1e-6
    left = (gc(1.0 - h) - gc(1.0 - 2 * h)) / h
    right = (gc(1.0 + 2 * h) - gc(1.0 + h)) / h
    assert left == pytest.approx(right, abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=2, max_size=40))
def test_bounded_and_non_increasing(zs: list[float]) -> None:
    z = torch.tensor(sorted(zs), dtype=f64)
    g = gaspari_cohn(z)
    assert bool(((g >= 0) & (g <= 1)).all())
    assert bool((g[1:] <= g[:-1] + 1e-15).all())
    assert torch.equal(gaspari_cohn(-z), g)  # even in z


def test_radius_convention_matches_gaussian_sigma() -> None:
    grid = Grid((1000,), (False,))
    for r in (1.0, 4.0, 37.5):
        t = taper_matrix(grid, torch.tensor([[0.0]], dtype=f64), torch.tensor([[r]], dtype=f64), r)
        # GC matches the Gaussian exp(-d²/2r²) to second order at 0; at d = r it is 0.6354 vs 0.6065
        assert abs(float(t[0, 0]) - math.exp(-0.5)) < 0.03
        assert float(t[0, 0]) == pytest.approx(gc(1.0 / HALF_WIDTH_PER_RADIUS), abs=1e-14)
    assert HALF_WIDTH_PER_RADIUS == pytest.approx(1.8257, abs=1e-4)
    assert support(4.0) == pytest.approx(14.605, abs=1e-3)


def test_cutoff_and_support() -> None:
    grid = Grid((200,), (False,))
    pts = grid.coordinates()
    r = 4.0
    t = taper_matrix(grid, pts, pts[:1], r)[:, 0]
    d = pts[:, 0]
    assert bool((t[d >= support(r)] == 0).all())
    nonzero = t[t > 0]
    assert float(nonzero.min()) >= CUTOFF
    # the cut-off drops the tail just below the support edge, not more
    raw = gaspari_cohn(d / (HALF_WIDTH_PER_RADIUS * r))
    assert torch.equal(t, torch.where(raw < CUTOFF, torch.zeros_like(raw), raw))
    # d = 13 and 14 are inside the support 2c = 14.6 but weigh 6.8e-4 and 1.4e-5 < CUTOFF
    assert int((t > 0).sum()) == 13 and float(raw[13]) > 0 and float(raw[14]) > 0


def test_periodic_wrap() -> None:
    grid = Grid((40,), (True,))
    pts = grid.coordinates()
    t = taper_matrix(grid, pts[:1], pts, 4.0)[0]
    assert float(t[39]) == float(t[1]) > 0.8  # 0 and 39 are neighbours on the ring
    assert float(t[35]) == float(t[5])
    assert float(t[20]) == 0.0
    open_grid = Grid((40,), (False,))
    t_open = taper_matrix(open_grid, pts[:1], pts, 4.0)[0]
    assert float(t_open[39]) == 0.0 and float(t_open[1]) == float(t[1])


def test_two_dimensional_grid_and_spacing() -> None:
    grid = Grid((6, 8), (False, True), spacing=(2.0, 1.0))
    pts = grid.coordinates()
    t = taper_matrix(grid, pts, pts, 3.0)
    assert t.shape == (48, 48)
    assert torch.allclose(t, t.t())
    assert bool((t.diagonal() == 1).all())
    # (0, 0) to (1, 7): dy = 2 (spacing), dx wraps to 1 -> distance sqrt(5)
    expected = gc(math.sqrt(5.0) / (HALF_WIDTH_PER_RADIUS * 3.0))
    assert float(t[0, 1 * 8 + 7]) == pytest.approx(expected, abs=1e-14)


def test_bad_radius() -> None:
    grid = Grid((10,), (True,))
    pts = grid.coordinates()
    for r in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="radius"):
            taper_matrix(grid, pts, pts, r)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data())
def test_node_taper_equals_the_pairwise_taper(shape, data) -> None:
    """The offset-table lookup gives the pairwise taper on any Cartesian grid (periodic or not, any spacing)."""
    periodic = tuple(data.draw(st.booleans()) for _ in shape)
    spacing = tuple(data.draw(st.sampled_from([0.5, 1.0, 1.7])) for _ in shape)
    grid = Grid(tuple(shape), periodic, spacing)
    index = torch.tensor(data.draw(st.lists(st.integers(0, grid.size - 1), min_size=1, max_size=12)))
    radius = data.draw(st.floats(0.3, 4.0))
    coords = grid.coordinates()
    expected = taper_matrix(grid, coords, coords[index], radius)
    torch.testing.assert_close(node_taper(grid, index, radius), expected, atol=1e-12, rtol=0)


def test_node_taper_on_a_geographic_grid_uses_its_distances() -> None:
    grid = GeoGrid((6, 12), (False, True), (30.0, 30.0), origin=(-75.0, 0.0))
    index = torch.tensor([0, 13, 40, 71])
    coords = grid.coordinates()
    expected = taper_matrix(grid, coords, coords[index], 2000.0)
    torch.testing.assert_close(node_taper(grid, index, 2000.0), expected)
