"""LETKF: exactness against the Kalman update, a brute-force per-point reference, post-processing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from assim.inflation import member_rotation, rotation_draw
from assim.letkf import Letkf, letkf_analysis
from assim.localization import taper_matrix
from assim.observations import ObservationBatch
from assim.operators import SubsetOperator
from assim.registry import stage_registry
from assim.stages import AnalysisContext
from twin.domain import Grid, SerialDomain
from twin.random import Streams

f64 = torch.float64


def problem(seed: int, n_members: int, shape: tuple[int, ...], variables: int = 1, n_obs: int | None = None,
            periodic: bool = True):
    """A random ensemble, a subset operator, observations and their error std."""
    rng = np.random.default_rng(seed)
    grid = Grid(shape, (periodic,) * len(shape))
    size = variables * grid.size
    n_obs = size if n_obs is None else n_obs
    ens = torch.as_tensor(rng.standard_normal((n_members, variables) + shape) * rng.uniform(0.5, 2.0) + 3.0)
    idx = torch.as_tensor(np.sort(rng.choice(size, n_obs, replace=False)))
    op = SubsetOperator(grid, idx)
    sigma = torch.as_tensor(rng.uniform(0.3, 1.5, n_obs))
    y = torch.as_tensor(rng.standard_normal(n_obs) * 2.0 + 3.0)
    return grid, ens, op, sigma, y


def kalman(ens: torch.Tensor, op: SubsetOperator, sigma: torch.Tensor, y: torch.Tensor, rho: float = 1.0):
    """Mean and covariance of the Kalman update built from the ensemble's (ρ-inflated) sample covariance."""
    x = ens.reshape(ens.shape[0], -1).numpy()
    xb = x.mean(0)
    a = x - xb
    pf = rho * a.T @ a / (x.shape[0] - 1)
    h = np.zeros((len(y), x.shape[1]))
    h[np.arange(len(y)), op.flat_index.numpy()] = 1.0
    k = pf @ h.T @ np.linalg.inv(h @ pf @ h.T + np.diag(sigma.numpy() ** 2))
    return xb + k @ (y.numpy() - h @ xb), (np.eye(x.shape[1]) - k @ h) @ pf


def moments(ens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = ens.reshape(ens.shape[0], -1).numpy()
    return x.mean(0), np.atleast_2d(np.cov(x.T))


def reference_letkf(ens, hx, y, sigma, taper, rho=1.0, infl=1.0):
    """Hunt et al. (2007) literally, one grid point at a time in full member space (numpy)."""
    n_members, variables = ens.shape[:2]
    e = ens.reshape(n_members, variables, -1).numpy()
    xb = e.mean(0)
    a = e - xb
    yb = hx.numpy().mean(0)
    out = np.empty_like(e)
    for g in range(e.shape[2]):
        t = taper[g].numpy() / sigma.numpy() ** 2  # tapered R^-1 diagonal
        yy = hx.numpy() - yb  # (N, p), rows are members
        pt = np.linalg.inv((n_members - 1) / rho * np.eye(n_members) + (yy * t) @ yy.T)
        d, v = np.linalg.eigh((n_members - 1) * pt)
        w = (v * np.sqrt(d)) @ v.T
        wbar = pt @ ((yy * t) @ (y.numpy() - yb))
        xa = xb[:, g][:, None] + a[:, :, g].T @ (wbar[:, None] + infl * w)  # (V, N)
        out[:, :, g] = xa.T
    return torch.as_tensor(out).reshape(ens.shape)


def global_precision(sigma: torch.Tensor) -> torch.Tensor:
    return (1.0 / sigma**2)[None]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n_members=st.integers(2, 14), size=st.integers(3, 20),
       variables=st.integers(1, 2), frac=st.floats(0.1, 1.0))
def test_global_letkf_is_the_sample_covariance_kalman_update(seed, n_members, size, variables, frac) -> None:
    n_obs = max(1, int(frac * size * variables))
    grid, ens, op, sigma, y = problem(seed, n_members, (size,), variables, n_obs)
    ea = letkf_analysis(ens, op(ens), y, global_precision(sigma))
    mean_k, cov_k = kalman(ens, op, sigma, y)
    mean_a, cov_a = moments(ea)
    assert np.abs(mean_a - mean_k).max() < 1e-10
    assert np.abs(cov_a - cov_k).max() < 1e-10


def test_prior_inflation_is_hunts_rho() -> None:
    grid, ens, op, sigma, y = problem(3, 8, (12,), n_obs=7)
    ea = letkf_analysis(ens, op(ens), y, global_precision(sigma), prior_inflation=1.3)
    mean_k, cov_k = kalman(ens, op, sigma, y, rho=1.3)
    mean_a, cov_a = moments(ea)
    assert np.abs(mean_a - mean_k).max() < 1e-10 and np.abs(cov_a - cov_k).max() < 1e-10


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), n_members=st.integers(3, 10), radius=st.floats(0.5, 6.0),
       two_d=st.booleans(), infl=st.sampled_from([1.0, 1.07]), rho=st.sampled_from([1.0, 1.2]))
def test_localised_matches_per_point_reference(seed, n_members, radius, two_d, infl, rho) -> None:
    shape, variables = ((4, 5), 2) if two_d else ((17,), 1)
    n_obs = (variables * int(np.prod(shape))) // 2
    grid, ens, op, sigma, y = problem(seed, n_members, shape, variables, n_obs)
    taper = taper_matrix(grid, grid.coordinates(), op.locations, radius)
    got = letkf_analysis(ens, op(ens), y, taper / sigma**2, inflation=infl, prior_inflation=rho)
    want = reference_letkf(ens, op(ens), y, sigma, taper, rho=rho, infl=infl)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_large_problem_path_matches_reference(monkeypatch) -> None:
    """Big grids contract with einsum instead of broadcasting; force that path on a small case."""
    import assim.letkf

    monkeypatch.setattr(assim.letkf, "_SMALL", 0)
    grid, ens, op, sigma, y = problem(21, 6, (5, 4), variables=2, n_obs=25)
    taper = taper_matrix(grid, grid.coordinates(), op.locations, 1.5)
    got = letkf_analysis(ens, op(ens), y, taper / sigma**2, inflation=1.1)
    want = reference_letkf(ens, op(ens), y, sigma, taper, infl=1.1)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_huge_radius_equals_global() -> None:
    grid, ens, op, sigma, y = problem(5, 7, (40,), n_obs=25)
    taper = taper_matrix(grid, grid.coordinates(), op.locations, 1e7)
    assert float(taper.min()) > 1 - 1e-11
    local = letkf_analysis(ens, op(ens), y, taper / sigma**2)
    glob = letkf_analysis(ens, op(ens), y, global_precision(sigma))
    assert torch.allclose(local, glob, atol=1e-9, rtol=0)


def test_points_outside_every_support_are_untouched() -> None:
    rng = np.random.default_rng(0)
    grid = Grid((60,), (False,))
    ens = torch.as_tensor(rng.standard_normal((6, 1, 60)))
    op = SubsetOperator(grid, torch.arange(0, 10))
    sigma, y = torch.ones(10, dtype=f64), torch.zeros(10, dtype=f64)
    taper = taper_matrix(grid, grid.coordinates(), op.locations, 2.0)  # support 7.3
    out = letkf_analysis(ens, op(ens), y, taper / sigma**2)
    assert torch.allclose(out[..., 17:], ens[..., 17:], atol=1e-13, rtol=0)
    assert not torch.allclose(out[..., :9], ens[..., :9], atol=1e-3)


def make_obs(op, y, sigma) -> ObservationBatch:
    return ObservationBatch(0.0, y, sigma, torch.arange(len(y)), op)


def ctx_for(grid: Grid, cycle: int = 0) -> AnalysisContext:
    return AnalysisContext(grid, SerialDomain(grid), Streams(11), cycle)


def run_stage(config: Letkf.Config, ens, op, sigma, y, grid, cycle: int = 0) -> torch.Tensor:
    return Letkf(config)(ens, make_obs(op, y, sigma), ctx_for(grid, cycle))


def test_stage_registered_and_matches_function() -> None:
    assert stage_registry["letkf"] is Letkf
    grid, ens, op, sigma, y = problem(8, 7, (40,), n_obs=20)
    out = run_stage(Letkf.Config(localization_radius=4.0, inflation=1.04), ens, op, sigma, y, grid)
    taper = taper_matrix(grid, grid.coordinates(), op.locations, 4.0)
    assert torch.allclose(out, reference_letkf(ens, op(ens), y, sigma, taper, infl=1.04), atol=1e-10, rtol=0)
    glob = run_stage(Letkf.Config(), ens, op, sigma, y, grid)
    assert torch.allclose(glob, letkf_analysis(ens, op(ens), y, global_precision(sigma)), atol=1e-13, rtol=0)


def test_taper_cache_reused_and_invalidated() -> None:
    grid, ens, op, sigma, y = problem(9, 5, (30,), n_obs=30)
    stage = Letkf(Letkf.Config(localization_radius=3.0))
    ctx = ctx_for(grid)
    p1 = stage.precision(make_obs(op, y, sigma), ctx, f64, ens.device)
    p2 = stage.precision(make_obs(SubsetOperator(grid, op.flat_index.clone()), y + 1, sigma.clone()), ctx,
                         f64, ens.device)
    assert p2 is p1  # equal locations and errors (new tensors): reused
    op2 = SubsetOperator(grid, torch.arange(1, 31) % 30)
    p3 = stage.precision(make_obs(op2, y, sigma), ctx, f64, ens.device)
    assert p3 is not p1
    assert torch.allclose(p3, taper_matrix(grid, grid.coordinates(), op2.locations, 3.0) / sigma**2)
    p4 = stage.precision(make_obs(op2, y, 2 * sigma), ctx, f64, ens.device)
    assert torch.allclose(p4, p3 / 4)


def test_rotation_preserves_mean_and_covariance() -> None:
    grid, ens, op, sigma, y = problem(12, 7, (40,), n_obs=40)
    base = Letkf.Config(localization_radius=4.0, inflation=1.04)
    plain = run_stage(base, ens, op, sigma, y, grid, cycle=3)
    rotated = run_stage(dataclasses.replace(base, rotation=True), ens, op, sigma, y, grid, cycle=3)
    again = run_stage(dataclasses.replace(base, rotation=True), ens, op, sigma, y, grid, cycle=3)
    other = run_stage(dataclasses.replace(base, rotation=True), ens, op, sigma, y, grid, cycle=4)
    (m0, c0), (m1, c1) = moments(plain), moments(rotated)
    assert np.abs(m0 - m1).max() < 1e-12 and np.abs(c0 - c1).max() < 1e-11
    assert not torch.allclose(plain, rotated, atol=1e-3)
    assert torch.equal(rotated, again) and not torch.allclose(rotated, other, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), cycle=st.integers(0, 10**5), n_members=st.integers(2, 40))
def test_rotation_draw_is_mean_preserving_orthogonal(seed, cycle, n_members) -> None:
    q = rotation_draw(seed, cycle, n_members)
    assert torch.equal(q, rotation_draw(seed, cycle, n_members))
    eye = torch.eye(n_members - 1, dtype=f64)
    assert torch.allclose(q @ q.t(), eye, atol=1e-12)
    full = member_rotation(q)
    ones = torch.ones(n_members, dtype=f64)
    assert torch.allclose(full @ ones, ones, atol=1e-12) and torch.allclose(ones @ full, ones, atol=1e-12)
    assert torch.allclose(full @ full.t(), torch.eye(n_members, dtype=f64), atol=1e-12)


def test_rotation_draws_are_haar_distributed() -> None:
    """Haar on O(n): E[Q_00] = 0, E[tr Q] = 0, Var[tr Q] = 1, det = ±1 equally often (a QR without
    the sign fix fails the first)."""
    qs = torch.stack([rotation_draw(7, c, 5) for c in range(4000)])
    assert abs(float(qs[:, 0, 0].mean())) < 0.03
    tr = qs.diagonal(dim1=1, dim2=2).sum(-1)
    assert abs(float(tr.mean())) < 0.07 and abs(float(tr.var()) - 1.0) < 0.1
    assert 0.45 < float((torch.linalg.det(qs) > 0).double().mean()) < 0.55
    assert not torch.allclose(qs[63], qs[64]) and not torch.allclose(qs[0], qs[1])


def test_inflation_multiplies_analysis_anomalies() -> None:
    grid, ens, op, sigma, y = problem(13, 9, (40,), n_obs=20)
    base = Letkf.Config(localization_radius=5.0)
    plain = run_stage(base, ens, op, sigma, y, grid)
    infl = run_stage(dataclasses.replace(base, inflation=1.3), ens, op, sigma, y, grid)
    mean = plain.mean(0)
    assert torch.allclose(infl.mean(0), mean, atol=1e-12)
    assert torch.allclose(infl - mean, 1.3 * (plain - mean), atol=1e-12)


def spread(ens: torch.Tensor) -> torch.Tensor:
    return ens.var(0, unbiased=True).sqrt()


def test_rtps_restores_spread_toward_prior() -> None:
    grid, ens, op, sigma, y = problem(14, 8, (40,), n_obs=30)
    base = Letkf.Config(localization_radius=4.0)
    plain = run_stage(base, ens, op, sigma, y, grid)
    sb, sa = spread(ens), spread(plain)
    assert bool((sa < sb).all())
    full = run_stage(dataclasses.replace(base, rtps=1.0), ens, op, sigma, y, grid)
    half = run_stage(dataclasses.replace(base, rtps=0.5), ens, op, sigma, y, grid)
    assert torch.allclose(spread(full), sb, atol=1e-12)
    assert torch.allclose(spread(half), 0.5 * (sa + sb), atol=1e-12)
    assert torch.allclose(half.mean(0), plain.mean(0), atol=1e-12)
    both = run_stage(dataclasses.replace(base, rtps=0.5, inflation=1.1), ens, op, sigma, y, grid)
    assert torch.allclose(spread(both), 1.1 * 0.5 * (sa + sb), atol=1e-12)  # inflation after RTPS


def test_rtpp_relaxes_perturbations() -> None:
    grid, ens, op, sigma, y = problem(15, 6, (40,), n_obs=40)
    base = Letkf.Config(localization_radius=4.0)
    plain = run_stage(base, ens, op, sigma, y, grid)
    full = run_stage(dataclasses.replace(base, rtpp=1.0), ens, op, sigma, y, grid)
    part = run_stage(dataclasses.replace(base, rtpp=0.3), ens, op, sigma, y, grid)
    mean = plain.mean(0)
    assert torch.allclose(full - mean, ens - ens.mean(0), atol=1e-12)
    want = 0.7 * (plain - mean) + 0.3 * (ens - ens.mean(0))
    assert torch.allclose(part - mean, want, atol=1e-12)


def test_float32_and_shapes() -> None:
    grid, ens, op, sigma, y = problem(16, 7, (6, 5), variables=2, n_obs=30)
    out64 = run_stage(Letkf.Config(localization_radius=2.0), ens, op, sigma, y, grid)
    out32 = run_stage(Letkf.Config(localization_radius=2.0), ens.float(), op, sigma.float(), y.float(), grid)
    assert out32.dtype == torch.float32 and out32.shape == ens.shape
    assert torch.allclose(out32.double(), out64, atol=1e-4)


def test_no_observations_leaves_ensemble_alone() -> None:
    grid, ens, _, _, _ = problem(17, 5, (10,))
    op = SubsetOperator(grid, torch.zeros(0, dtype=torch.long))
    empty = torch.zeros(0, dtype=f64)
    out = run_stage(Letkf.Config(localization_radius=2.0), ens, op, empty, empty, grid)
    assert torch.allclose(out, ens, atol=1e-13)


@pytest.mark.parametrize("key, value, match", [
    ("inflation", 0.9, "inflation must be >= 1"),
    ("prior_inflation", 0.5, "prior_inflation must be >= 1"),
    ("localization_radius", 0.0, "localization_radius"),
    ("localization_radius", -2.0, "localization_radius"),
    ("rotation", 1, "rotation"),
    ("rtps", 1.5, "rtps"),
    ("rtpp", -0.1, "rtpp"),
    ("inflation", "1.1", "inflation"),
])
def test_config_validation(key, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        Letkf(Letkf.Config(**{key: value}))


def test_needs_two_members() -> None:
    grid, ens, op, sigma, y = problem(18, 1, (10,))
    with pytest.raises(ValueError, match="2 members"):
        letkf_analysis(ens, op(ens), y, global_precision(sigma))
