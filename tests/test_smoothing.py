"""The Shapiro filter: its exact response, locality (tiles with halos equal the global filter), open axes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.diffusion.smoothing import shapiro, shapiro_halo, shapiro_wrapped
from twin.domain import pad_halo


def periodic_pad(x, h):
    return pad_halo(x, (h, h), (True, True))


@settings(max_examples=40, deadline=None)
@given(ny=st.integers(8, 40), nx=st.integers(8, 40), data=st.data(), order=st.sampled_from([2, 4, 8, 16]))
def test_response_to_a_fourier_mode_is_one_minus_sin_to_the_order(ny, nx, data, order):
    """cos(2π k x / nx + φ) cos(2π l y / ny) comes back times (1 − sin^order(π k / nx)) (1 − sin^order(π l / ny))."""
    k, l = data.draw(st.integers(0, nx // 2)), data.draw(st.integers(0, ny // 2))
    phase = data.draw(st.floats(0, 2 * math.pi))
    y, x = torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64)
    field = torch.cos(2 * math.pi * l * y / ny)[:, None] * torch.cos(2 * math.pi * k * x / nx + phase)[None, :]
    out = shapiro(field[None], order, (True, True), periodic_pad)[0]
    gain = (1 - math.sin(math.pi * k / nx) ** order) * (1 - math.sin(math.pi * l / ny) ** order)
    torch.testing.assert_close(out, gain * field, atol=1e-10, rtol=0)


def test_constants_pass_and_the_grid_scale_is_removed():
    c = torch.full((2, 16, 16), 3.5, dtype=torch.float64)
    torch.testing.assert_close(shapiro(c, 16, (True, True), periodic_pad), c)
    checker = (-1.0) ** (torch.arange(16)[:, None] + torch.arange(16)[None, :]).double()
    assert float(shapiro(checker, 8, (True, True), periodic_pad).abs().max()) < 1e-12


def test_order_zero_and_open_axes_leave_the_field_alone():
    x = torch.randn(2, 12, 10, dtype=torch.float64)
    assert shapiro(x, 0, (True, True), periodic_pad) is x
    assert shapiro(x, 8, (False, False), periodic_pad) is x
    along_x = shapiro(x, 8, (False, True), lambda z, h: pad_halo(z, (h, h), (False, True)))
    # each row is filtered on its own: a change in one row leaves the others as they were
    y = x.clone()
    y[:, 3] += 1.0
    changed = shapiro(y, 8, (False, True), lambda z, h: pad_halo(z, (h, h), (False, True))) - along_x
    assert float(changed[:, [0, 1, 2, 4, 5]].abs().max()) == 0.0 and float(changed[:, 3].abs().max()) > 0


@pytest.mark.parametrize("order", [-2, 3, 5])
def test_odd_or_negative_orders_are_refused(order):
    with pytest.raises(ValueError, match="even"):
        shapiro_halo(order)


@settings(max_examples=30, deadline=None)
@given(ny=st.integers(4, 20), nx=st.integers(4, 20), data=st.data(), order=st.sampled_from([2, 8, 16]))
def test_a_tile_with_its_halo_equals_the_global_filter(ny, nx, data, order):
    """Tiles of any size, also thinner than the halo (which then wraps round the grid)."""
    g = torch.Generator().manual_seed(ny * 100 + nx)
    x = torch.randn(2, ny, nx, generator=g, dtype=torch.float64)
    whole = shapiro(x, order, (True, True), periodic_pad)
    y0 = data.draw(st.integers(0, ny - 1))
    y1 = data.draw(st.integers(y0 + 1, ny))
    x0 = data.draw(st.integers(0, nx - 1))
    x1 = data.draw(st.integers(x0 + 1, nx))

    def tile_pad(z, h):  # the neighbours' data, as a halo exchange gives it
        full = periodic_pad(x, h)
        return full[..., y0:y1 + 2 * h, x0:x1 + 2 * h]

    tile = shapiro(x[..., y0:y1, x0:x1], order, (True, True), tile_pad)
    torch.testing.assert_close(tile, whole[..., y0:y1, x0:x1], atol=1e-12, rtol=0)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit:DeprecationWarning")
@settings(max_examples=15, deadline=None)
@given(ny=st.integers(3, 20), nx=st.integers(3, 20), order=st.sampled_from([2, 4, 8, 16]),
       periodic=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_wrapped_form_equals_the_halo_form_bit_for_bit(ny, nx, order, periodic):
    """`shapiro_wrapped` (TorchScript, `twin export`) is the same filter as `shapiro` with periodic padding."""
    x = torch.randn(2, 3, ny, nx, generator=torch.Generator().manual_seed(ny * nx), dtype=torch.float64)
    axes = [axis for axis, on in zip((2, 3), periodic) if on]
    halo = shapiro(x, order, periodic, lambda z, h: pad_halo(z, (h, h), periodic))
    assert torch.equal(shapiro_wrapped(x, shapiro_halo(order), axes), halo)
    assert torch.equal(torch.jit.script(shapiro_wrapped)(x, shapiro_halo(order), axes), halo)
