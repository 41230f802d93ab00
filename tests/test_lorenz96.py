"""Lorenz-96: equilibrium, RK4 order, batching, precision, and a 10^6-variable step."""
import torch

from emulators.lorenz96 import Lorenz96
from twin.domain import SerialDomain


def make(size=40, dt=0.05, forcing=8.0):
    cfg = Lorenz96.Config(size=size, forcing=forcing, dt=dt)
    return Lorenz96(cfg, SerialDomain(Lorenz96.global_grid(cfg)))


def reference_tendency(x, forcing):
    return (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) * torch.roll(x, 1, -1) - x + forcing


def test_tendency_matches_roll_definition_and_rest_state_is_fixed():
    m = make()
    x = torch.randn(3, 1, 40, dtype=torch.float64) + 8
    assert torch.allclose(m.tendency(x), reference_tendency(x, 8.0), atol=1e-12)
    rest = torch.full((1, 1, 40), 8.0, dtype=torch.float64)
    assert torch.allclose(m.step(rest), rest, atol=1e-13)


def test_rk4_is_fourth_order():
    x0 = torch.randn(1, 1, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 8

    def integrate(dt, steps):
        m, x = make(dt=dt), x0.clone()
        for _ in range(steps):
            x = m.step(x)
        return x

    exact = integrate(0.0025, 80)
    e1 = (integrate(0.02, 10) - exact).abs().max()
    e2 = (integrate(0.01, 20) - exact).abs().max()
    assert 10 < float(e1 / e2) < 22  # 2^4 = 16


def test_batched_members_equal_one_by_one_and_float32_tracks_float64():
    m = make()
    x = torch.randn(5, 1, 40, dtype=torch.float64) + 8
    batched = m.step(x)
    single = torch.cat([m.step(x[i:i + 1]) for i in range(5)])
    assert torch.equal(batched, single)
    y32 = x.float()
    for _ in range(10):
        x, y32 = m.step(x), m.step(y32)
    assert y32.dtype == torch.float32
    assert float((y32.double() - x).abs().max()) < 1e-3


def test_million_variables_step_is_finite_and_local():
    m = make(size=1_000_000)
    x = torch.full((2, 1, 1_000_000), 8.0)
    x[:, :, 500_000] += 1.0
    y = m.step(x)
    assert torch.isfinite(y).all()
    changed = (y - 8.0).abs() > 0
    idx = changed[0, 0].nonzero().flatten()
    # x_j enters dx_i/dt for i = j-1, j+1, j+2: four RK4 stages spread it 4 left, 8 right
    assert int(idx.min()) == 500_000 - 4 and int(idx.max()) == 500_000 + 8
