"""EnSF for sparse observations of large-variance states: the spread-relative kernel, RTPS, and the
localised regression of observed increments onto unobserved points."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from assim.ensf import Ensf
from assim.observations import ObservationBatch
from assim.regression import regression_fill
from test_ensf import ctx_for, problem

torch.set_num_threads(1)


def scaled(obs: ObservationBatch, factor: float) -> ObservationBatch:
    return dataclasses.replace(obs, values=obs.values * factor, error_std=obs.error_std * factor)


@settings(max_examples=8, deadline=None)
@given(factor=st.sampled_from([0.01, 7.0, 300.0]), seed=st.integers(0, 50))
def test_spread_kernel_is_scale_equivariant(factor, seed):
    """With kernel: spread the analysis of (c·x, c·y, c·σ_o) is c times the analysis of (x, y, σ_o)."""
    grid, _, ens, obs = problem(observed=20, seed=seed)
    stage = Ensf(Ensf.Config(steps=40, kernel="spread", eps_beta=0.5, likelihood_step="implicit"))
    a = stage(ens, obs, ctx_for(grid))
    b = stage(ens * factor, scaled(obs, factor), ctx_for(grid))
    torch.testing.assert_close(b, a * factor, rtol=1e-6, atol=1e-9 * factor)


def test_spread_kernel_gain_follows_the_prior_spread_and_absolute_does_not():
    """Prior spread 5, σ_o 1: the spread kernel (eps_beta 0.5) moves observed points ~0.93 of the way to
    the observations (0.5·25/(0.5·25 + 1)); the absolute kernel (eps_beta 0.025) only ~0.024."""
    grid, _, ens, obs = problem(shape=(20, 20), variables=1, members=20, observed=200, sigma=1.0, seed=1)
    ens = ens.mean(0) + (ens - ens.mean(0)) * 5.0
    prior = obs.operator(ens).mean(0)
    gains = {}
    for kernel, eps in (("spread", 0.5), ("absolute", 0.025)):
        ana = Ensf(Ensf.Config(steps=100, kernel=kernel, eps_beta=eps, likelihood_step="implicit"))(
            ens, obs, ctx_for(grid))
        moved = obs.operator(ana).mean(0) - prior
        gains[kernel] = float((moved * (obs.values - prior)).sum() / (obs.values - prior).square().sum())
    assert 0.8 < gains["spread"] < 1.0, gains
    assert gains["absolute"] < 0.1, gains


def test_spread_kernel_needs_the_implicit_likelihood_step():
    with pytest.raises(ValueError, match="implicit"):
        Ensf(Ensf.Config(kernel="spread"))


def test_spread_kernel_refuses_nonlinear_observations():
    grid, _, ens, obs = problem(observed=10, arctan=True)
    with pytest.raises(ValueError, match="kernel: spread"):
        Ensf(Ensf.Config(steps=5, kernel="spread", likelihood_step="implicit"))(ens, obs, ctx_for(grid))


def test_rtps_restores_part_of_the_prior_spread():
    grid, _, ens, obs = problem(observed=60, sigma=0.1, seed=2)
    plain = Ensf(Ensf.Config(steps=50, kernel="spread", eps_beta=0.5, likelihood_step="implicit"))(ens, obs, ctx_for(grid))
    relaxed = Ensf(Ensf.Config(steps=50, kernel="spread", eps_beta=0.5, rtps=0.5, likelihood_step="implicit"))(ens, obs, ctx_for(grid))
    sp, sr, sb = (float(x.std(0).mean()) for x in (plain, relaxed, ens))
    assert sp < sr < sb
    torch.testing.assert_close(relaxed.mean(0), plain.mean(0))


def test_regression_fill_equals_the_linear_regression_with_a_wide_taper():
    """With a taper ≈ 1 everywhere the fill is Δx_u = C_uo C_oo⁻¹ Δy_o, the Kalman update of unobserved
    points given the observed ones' increments; observed points keep the filter's analysis."""
    grid, _, ens, obs = problem(shape=(5, 4), variables=2, members=30, observed=12, seed=3)
    analysis = ens.clone()
    idx = obs.operator.flat_index
    flat = analysis.reshape(30, -1)
    flat[:, idx] += torch.randn(30, len(idx), dtype=flat.dtype, generator=torch.Generator().manual_seed(0))
    out = regression_fill(ens, analysis, obs, ctx_for(grid), radius=1e5)
    a = ens.reshape(30, -1) - ens.reshape(30, -1).mean(0)
    c = a.t() @ a / 29
    dy = (analysis - ens).reshape(30, -1)[:, idx]
    expect = ens.reshape(30, -1) + (c[:, idx] @ torch.linalg.solve(c[idx][:, idx], dy.t())).t()
    expect[:, idx] = analysis.reshape(30, -1)[:, idx]
    torch.testing.assert_close(out.reshape(30, -1), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ridge", [1e-3, 0.1, 1.0])
def test_regression_fill_ridge_is_a_fraction_of_the_mean_observed_variance(ridge):
    """Δx_u = C_uo (C_oo + ε I)⁻¹ Δy_o with ε = ridge · mean(diag C_oo); a larger ridge shrinks the fill."""
    grid, _, ens, obs = problem(shape=(5, 4), variables=2, members=30, observed=12, seed=5)
    analysis = ens.clone()
    idx = obs.operator.flat_index
    flat = analysis.reshape(30, -1)
    flat[:, idx] += torch.randn(30, len(idx), dtype=flat.dtype, generator=torch.Generator().manual_seed(1))
    out = regression_fill(ens, analysis, obs, ctx_for(grid), radius=1e5, ridge=ridge)
    a = ens.reshape(30, -1) - ens.reshape(30, -1).mean(0)
    c = a.t() @ a / 29
    c_oo = c[idx][:, idx]
    c_oo = c_oo + ridge * c_oo.diagonal().mean() * torch.eye(len(idx), dtype=c.dtype)
    dy = (analysis - ens).reshape(30, -1)[:, idx]
    expect = ens.reshape(30, -1) + (c[:, idx] @ torch.linalg.solve(c_oo, dy.t())).t()
    expect[:, idx] = analysis.reshape(30, -1)[:, idx]
    torch.testing.assert_close(out.reshape(30, -1), expect, rtol=1e-5, atol=1e-6)
    tiny = regression_fill(ens, analysis, obs, ctx_for(grid), radius=1e5)
    assert float((out - ens).norm()) < float((tiny - ens).norm())


def test_regression_fill_is_local():
    """Points beyond the taper's support (3.65 r) from every observation keep the prior."""
    grid, _, ens, obs = problem(shape=(30,), variables=1, members=10, observed=None, seed=4)
    idx = torch.tensor([3])
    op = type(obs.operator)(grid, idx)
    obs = ObservationBatch(0.0, obs.values[:1], obs.error_std[:1], idx, op)
    analysis = ens.clone()
    analysis[:, 0, 3] += 1.0
    out = regression_fill(ens, analysis, obs, ctx_for(grid), radius=1.0)
    far = [i for i in range(30) if min(abs(i - 3), 30 - abs(i - 3)) > 3.66]
    assert torch.equal(out[:, 0, far], ens[:, 0, far])
    assert float((out - ens)[:, 0, 4].abs().max()) > 0
