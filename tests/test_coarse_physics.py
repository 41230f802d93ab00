"""The spectral resampling behind benchmarks/coarse_physics.py: refining then coarsening is the identity,
coarsening keeps exactly the modes the coarse grid holds."""
import importlib.util
from pathlib import Path

import torch
from hypothesis import given, settings, strategies as st

spec = importlib.util.spec_from_file_location(
    "coarse_physics", Path(__file__).parents[1] / "benchmarks" / "coarse_physics.py")
coarse_physics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(coarse_physics)
resample = coarse_physics.resample


@settings(max_examples=20, deadline=None)
@given(n=st.sampled_from([8, 12, 16]), factor=st.sampled_from([2, 3]), seed=st.integers(0, 999))
def test_refine_then_coarsen_is_the_identity_on_resolved_modes(n, factor, seed):
    g = torch.Generator().manual_seed(seed)
    x = resample(torch.randn(2, n, n, generator=g, dtype=torch.float64), n)  # drop the Nyquist modes
    fine = resample(x, n * factor)
    torch.testing.assert_close(resample(fine, n), x)
    # a refined field takes the coarse values at the coarse points (band-limited interpolation)
    torch.testing.assert_close(fine[:, ::factor, ::factor], x)


def test_coarsening_keeps_the_long_waves_and_drops_the_short_ones():
    axis = torch.arange(32, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    long_wave = torch.cos(2 * torch.pi * 3 * x / 32) * torch.sin(2 * torch.pi * 2 * y / 32)
    short_wave = torch.cos(2 * torch.pi * 12 * x / 32)
    coarse = resample(long_wave + short_wave, 16)
    torch.testing.assert_close(coarse, long_wave[::2, ::2])
