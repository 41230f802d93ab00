"""Classic inpainting and EnSF's fill of unobserved points."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from assim.ensf import Ensf
from assim.inpainting import ClassicInpainter, classic_fill
from assim.observations import ObservationBatch
from assim.operators import SubsetOperator
from assim.stages import AnalysisContext
from twin.domain import Grid, SerialDomain
from twin.random import Streams


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 60), seed=st.integers(0, 10_000), kind=st.sampled_from(["harmonic", "biharmonic"]))
def test_linear_profiles_are_filled_exactly_on_an_open_axis(n, seed, kind):
    """Straight lines are harmonic and biharmonic: the fill between known ends reproduces them."""
    rng = np.random.default_rng(seed)
    grid = Grid((n,), (False,))
    x = torch.arange(n, dtype=torch.float64)
    line = 2.0 - 0.3 * x
    known = torch.zeros(n, dtype=torch.bool)
    known[[0, n - 1]] = True
    known[torch.from_numpy(rng.random(n) < 0.3)] = True
    filled = classic_fill(torch.where(known, line, torch.full_like(line, 99.0)), known, grid, kind)
    if kind == "harmonic":
        assert torch.allclose(filled, line, atol=1e-9)
    assert torch.equal(filled[known], line[known])


@settings(max_examples=20, deadline=None)
@given(ny=st.integers(4, 20), nx=st.integers(4, 20), seed=st.integers(0, 10_000))
def test_harmonic_fill_obeys_the_maximum_principle(ny, nx, seed):
    rng = np.random.default_rng(seed)
    grid = Grid((ny, nx), (True, True))
    field = torch.from_numpy(rng.standard_normal((3, ny, nx)))
    known = torch.from_numpy(rng.random((ny, nx)) < 0.2)
    known[0, 0] = True
    filled = ClassicInpainter(grid)(field, known)
    lo, hi = field[:, known].min(1).values, field[:, known].max(1).values
    assert (filled.flatten(1).min(1).values >= lo - 1e-9).all() and (filled.flatten(1).max(1).values <= hi + 1e-9).all()
    assert torch.equal(filled[:, known], field[:, known])
    with pytest.raises(ValueError, match="kind"):
        ClassicInpainter(grid, "cubic")


def test_ensf_inpainting_beats_keeping_at_unobserved_points_and_leaves_unobserved_variables():
    grid = Grid((24, 24), (True, True))
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    truth = torch.stack([torch.sin(2 * math.pi * xx / 24) + torch.cos(2 * math.pi * yy / 24), 0.5 * torch.sin(
        2 * math.pi * (xx + yy) / 24)]).double()
    bias = (0.8 * torch.cos(2 * math.pi * xx / 24)).double()
    g = torch.Generator().manual_seed(0)
    prior = truth + torch.stack([bias, bias]) + 0.1 * torch.randn(12, 2, 24, 24, generator=g, dtype=torch.float64)
    observed = torch.randperm(24 * 24, generator=g)[:115]  # 20 % of level 0 only
    op = SubsetOperator(grid, observed)
    obs = ObservationBatch(0.0, op(truth) + 0.05 * torch.randn(115, generator=g, dtype=torch.float64),
                           torch.full((115,), 0.05, dtype=torch.float64), observed, op)
    ctx = AnalysisContext(grid, SerialDomain(grid), Streams(1), 0)
    unobserved = torch.ones(24 * 24, dtype=torch.bool)
    unobserved[observed] = False
    errors = {}
    for mode in ("keep", "harmonic"):
        ana = Ensf(Ensf.Config(steps=100, unobserved=mode, likelihood_step="implicit"))(prior, obs, ctx)
        errors[mode] = float((ana.mean(0)[0].reshape(-1) - truth[0].reshape(-1))[unobserved].square().mean().sqrt())
        if mode == "harmonic":
            assert torch.equal(ana[:, 1], prior[:, 1])  # level 1 unobserved: the prior stays
    prior_error = float((prior.mean(0)[0].reshape(-1) - truth[0].reshape(-1))[unobserved].square().mean().sqrt())
    assert errors["harmonic"] < 0.5 * prior_error and errors["harmonic"] < errors["keep"]
