"""Grid distances and the serial halo exchange."""
import torch
from hypothesis import given, settings, strategies as st

from twin.domain import Grid, SerialDomain, pad_halo


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 30), w=st.integers(0, 40))
def test_periodic_halo_equals_wrapped_indexing(n, w):
    x = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
    padded = pad_halo(x, (w,), (True,))
    expected = x[..., torch.remainder(torch.arange(-w, n + w), n)]
    assert torch.equal(padded, expected)


@settings(max_examples=30, deadline=None)
@given(ny=st.integers(1, 8), nx=st.integers(1, 8), wy=st.integers(0, 3), wx=st.integers(0, 3))
def test_2d_halo_periodic_and_open(ny, nx, wy, wx):
    x = torch.randn(2, 1, ny, nx, dtype=torch.float64)
    padded = SerialDomain(Grid((ny, nx), (False, True))).exchange_halo(x, (wy, wx))
    assert padded.shape == (2, 1, ny + 2 * wy, nx + 2 * wx)
    cols = torch.remainder(torch.arange(-wx, nx + wx), nx)
    assert torch.equal(padded[:, :, wy:wy + ny], x[..., cols])
    assert torch.all(padded[:, :, :wy] == 0) and torch.all(padded[:, :, wy + ny:] == 0)


def test_periodic_distance_wraps():
    g = Grid((40,), (True,))
    d = g.distance(torch.tensor([[0.0], [39.0]]), torch.tensor([[1.0], [20.0], [38.0]]))
    assert torch.allclose(d, torch.tensor([[1.0, 20.0, 2.0], [2.0, 19.0, 1.0]], dtype=d.dtype))
    open_grid = Grid((40,), (False,))
    assert float(open_grid.distance(torch.tensor([[0.0]]), torch.tensor([[39.0]]))) == 39.0


def test_coordinates_are_c_order():
    g = Grid((2, 3), (True, True), spacing=(10.0, 1.0))
    c = g.coordinates()
    assert c.shape == (6, 2)
    assert torch.equal(c[4], torch.tensor([10.0, 1.0], dtype=c.dtype))
