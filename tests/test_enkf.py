"""Global EnKF baselines: Sqrt is the exact sample-covariance Kalman update; PertObs converges."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from assim.enkf import Enkf, observation_perturbations, pertobs_analysis
from assim.inflation import member_rotation, post_process, rotation_draw
from assim.letkf import Letkf
from assim.observations import ObservationBatch
from assim.operators import SubsetOperator
from assim.registry import stage_registry
from assim.stages import AnalysisContext
from twin.domain import Grid, SerialDomain
from twin.random import Streams

f64 = torch.float64


def problem(seed: int, n_members: int, size: int, n_obs: int):
    rng = np.random.default_rng(seed)
    grid = Grid((size,), (True,))
    ens = torch.as_tensor(rng.standard_normal((n_members, 1, size)) * rng.uniform(0.5, 2.0) - 1.0)
    op = SubsetOperator(grid, torch.as_tensor(np.sort(rng.choice(size, n_obs, replace=False))))
    sigma = torch.as_tensor(rng.uniform(0.3, 1.5, n_obs))
    y = torch.as_tensor(rng.standard_normal(n_obs) * 2.0)
    return grid, ens, op, sigma, y


def h_matrix(op: SubsetOperator, size: int) -> np.ndarray:
    h = np.zeros((len(op.flat_index), size))
    h[np.arange(len(op.flat_index)), op.flat_index.numpy()] = 1.0
    return h


def sample_kalman(ens, op, sigma, y):
    x = ens.reshape(ens.shape[0], -1).numpy()
    xb = x.mean(0)
    pf = np.atleast_2d(np.cov(x.T))
    h = h_matrix(op, x.shape[1])
    k = pf @ h.T @ np.linalg.inv(h @ pf @ h.T + np.diag(sigma.numpy() ** 2))
    return xb + k @ (y.numpy() - h @ xb), (np.eye(x.shape[1]) - k @ h) @ pf


def moments(ens):
    x = ens.reshape(ens.shape[0], -1).numpy()
    return x.mean(0), np.atleast_2d(np.cov(x.T))


def analyse(config: Enkf.Config, ens, op, sigma, y, grid, cycle=0, seed=5):
    obs = ObservationBatch(0.0, y, sigma, torch.arange(len(y)), op)
    return Enkf(config)(ens, obs, AnalysisContext(grid, SerialDomain(grid), Streams(seed), cycle))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n_members=st.integers(2, 30), size=st.integers(2, 20),
       frac=st.floats(0.1, 1.0))
def test_sqrt_is_the_sample_covariance_kalman_update(seed, n_members, size, frac) -> None:
    grid, ens, op, sigma, y = problem(seed, n_members, size, max(1, int(frac * size)))
    out = analyse(Enkf.Config(variant="sqrt"), ens, op, sigma, y, grid)
    mean_k, cov_k = sample_kalman(ens, op, sigma, y)
    mean_a, cov_a = moments(out)
    assert np.abs(mean_a - mean_k).max() < 1e-10
    assert np.abs(cov_a - cov_k).max() < 1e-10


def test_sqrt_equals_unlocalised_letkf_with_same_post_processing() -> None:
    grid, ens, op, sigma, y = problem(1, 24, 40, 40)
    obs = ObservationBatch(0.0, y, sigma, torch.arange(40), op)
    ctx = AnalysisContext(grid, SerialDomain(grid), Streams(3), 7)
    a = Enkf(Enkf.Config(variant="sqrt", inflation=1.013, rotation=True, rtps=0.2))(ens, obs, ctx)
    b = Letkf(Letkf.Config(inflation=1.013, rotation=True, rtps=0.2))(ens, obs, ctx)
    assert torch.allclose(a, b, atol=1e-13, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n_members=st.integers(2, 30), size=st.integers(2, 20),
       frac=st.floats(0.1, 1.0))
def test_pertobs_gain_and_mean(seed, n_members, size, frac) -> None:
    """Each member moves by the ensemble gain K = Aᵀ Y (Yᵀ Y + (N-1) R)⁻¹ applied to its own
    perturbed innovation (both the N <= p and N > p solves), and with centred perturbations the
    analysis mean is exactly the sample-covariance Kalman mean."""
    grid, ens, op, sigma, y = problem(seed, n_members, size, max(1, int(frac * size)))
    pert = observation_perturbations(Streams(seed), 2, n_members, torch.arange(len(y)), sigma)
    out = pertobs_analysis(ens, op(ens), y, sigma, pert)
    x = ens.reshape(n_members, -1).numpy()
    a = x - x.mean(0)
    hx = op(ens).numpy()
    yy = hx - hx.mean(0)
    gain = a.T @ yy @ np.linalg.inv(yy.T @ yy + (n_members - 1) * np.diag(sigma.numpy() ** 2))
    want = x + (gain @ (y.numpy() - pert.numpy() - hx).T).T
    assert np.abs(out.reshape(n_members, -1).numpy() - want).max() < 1e-10
    assert np.abs(moments(out)[0] - sample_kalman(ens, op, sigma, y)[0]).max() < 1e-10


def test_perturbations_keyed_centred_and_layout_independent() -> None:
    streams, ids, sigma = Streams(4), torch.arange(100, 130), torch.linspace(0.5, 2.0, 30, dtype=f64)
    d = observation_perturbations(streams, 9, 12, ids, sigma)
    # the draws are the keyed streams' ("filter", (cycle, member)) over observation ids, centred
    z = torch.stack([streams.normal("filter", (9, m), ids) for m in range(12)]) * sigma
    assert torch.allclose(d, z - z.mean(0), atol=1e-14)
    scattered = torch.tensor([9000, 3, 4095, 4096, 70000, 5, 9001])  # several id blocks, any order
    ones = torch.ones(7, dtype=f64)
    z = torch.stack([streams.normal("filter", (2, m), scattered) for m in range(5)])
    assert torch.allclose(observation_perturbations(streams, 2, 5, scattered, ones), z - z.mean(0), atol=1e-14)
    assert d.shape == (12, 30)
    assert torch.allclose(d.mean(0), torch.zeros(30, dtype=f64), atol=1e-14)
    assert torch.equal(d, observation_perturbations(streams, 9, 12, ids, sigma))
    assert not torch.allclose(d, observation_perturbations(streams, 10, 12, ids, sigma))
    # a rank holding only some observations draws exactly their columns
    part = observation_perturbations(streams, 9, 12, ids[5:17], sigma[5:17])
    assert torch.allclose(part, d[:, 5:17], atol=1e-14)
    # the draws have the observation-error scale
    big = observation_perturbations(streams, 1, 400, ids, sigma)
    assert torch.allclose(big.std(0), sigma, rtol=0.15)


def test_pertobs_converges_to_the_exact_kalman_mean() -> None:
    """Prior N(μ, B) sampled with N members: the PertObs mean error vs the exact posterior mean
    shrinks like N^-1/2 (here N = 50 vs 2000, averaged over repetitions)."""
    size, n_obs = 8, 5
    grid = Grid((size,), (True,))
    rng = np.random.default_rng(42)
    op = SubsetOperator(grid, torch.tensor([0, 2, 3, 5, 7]))
    h = h_matrix(op, size)
    dist = np.abs(np.subtract.outer(np.arange(size), np.arange(size)))
    dist = np.minimum(dist, size - dist)
    b = 2.0 * np.exp(-(dist / 2.0) ** 2) + 0.1 * np.eye(size)
    mu = rng.standard_normal(size)
    sigma = torch.full((n_obs,), 0.7, dtype=f64)
    r = np.diag(sigma.numpy() ** 2)
    chol = np.linalg.cholesky(b)
    errors = {}
    for n_members in (50, 2000):
        errs = []
        for rep in range(6):
            y = torch.as_tensor(h @ mu + rng.standard_normal(n_obs))
            exact = mu + b @ h.T @ np.linalg.solve(h @ b @ h.T + r, y.numpy() - h @ mu)
            draws = mu + rng.standard_normal((n_members, size)) @ chol.T
            ens = torch.as_tensor(draws).reshape(n_members, 1, size)
            out = analyse(Enkf.Config(variant="pertobs"), ens, op, sigma, y, grid, cycle=rep)
            errs.append(np.sqrt(np.mean((out.mean(0).reshape(-1).numpy() - exact) ** 2)))
        errors[n_members] = float(np.mean(errs))
    assert errors[2000] < 0.35 * errors[50]
    assert errors[2000] < 0.06


def test_pertobs_post_processing_follows_dapper() -> None:
    grid, ens, op, sigma, y = problem(3, 10, 12, 6)
    plain = analyse(Enkf.Config(variant="pertobs"), ens, op, sigma, y, grid, cycle=2)
    infl = analyse(Enkf.Config(variant="pertobs", inflation=1.2), ens, op, sigma, y, grid, cycle=2)
    rot = analyse(Enkf.Config(variant="pertobs", rotation=True), ens, op, sigma, y, grid, cycle=2)
    mean = plain.mean(0)
    assert torch.allclose(infl.mean(0), mean, atol=1e-12)
    assert torch.allclose(infl - mean, 1.2 * (plain - mean), atol=1e-12)
    (m0, c0), (m1, c1) = moments(plain), moments(rot)
    assert np.abs(m0 - m1).max() < 1e-12 and np.abs(c0 - c1).max() < 1e-11
    assert not torch.allclose(plain, rot, atol=1e-3)
    rtps = analyse(Enkf.Config(variant="pertobs", rtps=1.0), ens, op, sigma, y, grid, cycle=2)
    assert torch.allclose(rtps.std(0), ens.std(0), atol=1e-12)


def test_post_process_matches_member_space_formula() -> None:
    rng = np.random.default_rng(0)
    prior = torch.as_tensor(rng.standard_normal((6, 2, 5)))
    post = torch.as_tensor(rng.standard_normal((6, 2, 5)))
    q = rotation_draw(1, 3, 6)
    out = post_process(post, prior, inflation=1.1, rotation=q, rtpp=0.25)
    a_post, a_prior = post - post.mean(0), prior - prior.mean(0)
    relaxed = 0.75 * a_post + 0.25 * a_prior
    want = post.mean(0) + 1.1 * torch.einsum("mn,n...->m...", member_rotation(q), relaxed)
    assert torch.allclose(out, want, atol=1e-12)
    assert torch.equal(post_process(post, prior), post)


def test_registered_and_validated() -> None:
    assert stage_registry["enkf"] is Enkf
    assert Enkf.Config().variant == "sqrt"
    with pytest.raises(ValueError, match="variant"):
        Enkf(Enkf.Config(variant="serial"))
    with pytest.raises(ValueError, match="inflation must be >= 1"):
        Enkf(Enkf.Config(inflation=0.99))
    with pytest.raises(ValueError, match="rtps"):
        Enkf(Enkf.Config(rtps=2.0))
    with pytest.raises(ValueError, match="rotation"):
        Enkf(Enkf.Config(rotation="yes"))
    cfg = dataclasses.replace(Enkf.Config(), variant="pertobs", rotation=True, rtpp=0.5)
    assert Enkf(cfg).config is cfg
