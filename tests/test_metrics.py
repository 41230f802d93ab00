"""Verification scores against their textbook definitions."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from assim import metrics


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_fair_crps_matches_pairwise_definition(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    ens = torch.randn(m, 1, n, generator=g, dtype=torch.float64)
    truth = torch.randn(1, n, generator=g, dtype=torch.float64)
    skill = (ens - truth).abs().mean(0)
    pairs = (ens[:, None] - ens[None, :]).abs().sum((0, 1)) / (2 * m * (m - 1))
    assert torch.allclose(metrics.crps_fair(ens, truth), (skill - pairs).mean(), atol=1e-12)


def test_crps_of_a_point_ensemble_is_absolute_error_and_fair_crps_is_unbiased():
    truth = torch.zeros(1, 5, dtype=torch.float64)
    ens = torch.full((4, 1, 5), 2.0, dtype=torch.float64)
    assert torch.isclose(metrics.crps_fair(ens, truth), torch.tensor(2.0, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    # members and truth from the same N(0,1): the fair CRPS expectation is 1/sqrt(pi), for any M.
    for m in (2, 5):
        vals = torch.stack([metrics.crps_fair(torch.randn(m, 1, 2000, generator=g, dtype=torch.float64),
                                              torch.randn(1, 2000, generator=g, dtype=torch.float64))
                            for _ in range(20)])
        assert abs(float(vals.mean()) - 1 / torch.pi ** 0.5) < 0.02


def test_rmse_spread_and_rank_histogram():
    ens = torch.tensor([[[0.0, 2.0]], [[2.0, 4.0]]], dtype=torch.float64)
    truth = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert torch.isclose(metrics.rmse(ens.mean(0), truth), torch.tensor((1 + 9) / 2, dtype=torch.float64).sqrt())
    assert torch.isclose(metrics.spread(ens), torch.tensor(2.0, dtype=torch.float64).sqrt())
    ranks = metrics.truth_rank(ens, truth)
    hist = metrics.rank_histogram(ranks, 2)
    assert hist.tolist() == [2, 0, 0]
    w = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    assert torch.isclose(metrics.rmse(ens.mean(0), truth, w), torch.tensor(0.25 * 1 + 0.75 * 9, dtype=torch.float64).sqrt())


def test_batched_scores_equal_per_cycle_scores():
    g = torch.Generator().manual_seed(1)
    ens = torch.randn(6, 5, 1, 30, generator=g, dtype=torch.float64)  # (cycle, member, variable, x)
    truth = torch.randn(6, 1, 30, generator=g, dtype=torch.float64)
    flat, tflat = ens.flatten(2), truth.flatten(1)
    batched = [metrics.rmse(flat.mean(1), tflat, dims=-1), metrics.spread(flat, member_dim=1, dims=-1),
               metrics.crps_fair(flat, tflat, member_dim=1, dims=-1)]
    single = [torch.stack([metrics.rmse(ens[c].mean(0), truth[c]) for c in range(6)]),
              torch.stack([metrics.spread(ens[c]) for c in range(6)]),
              torch.stack([metrics.crps_fair(ens[c], truth[c]) for c in range(6)])]
    for b, s in zip(batched, single):
        assert torch.allclose(b, s, atol=1e-12)
    assert torch.equal(metrics.truth_rank(flat, tflat, member_dim=1).reshape(6, 1, 30),
                       torch.stack([metrics.truth_rank(ens[c], truth[c]) for c in range(6)]))


@settings(max_examples=25, deadline=None)
@given(ny=st.integers(4, 24), nx=st.integers(4, 24), seed=st.integers(0, 2**31 - 1),
       edges=st.lists(st.integers(0, 20), min_size=1, max_size=4, unique=True).map(sorted))
def test_band_mse_splits_the_mean_square_by_wavenumber(ny, nx, seed, edges):
    err = torch.randn(3, ny, nx, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bands = metrics.band_mse(err, edges)
    assert bands.shape == (3, len(edges) + 1) and (bands >= 0).all()
    assert torch.allclose(bands.sum(-1), err.square().mean((-2, -1)), rtol=1e-10)


def test_band_mse_puts_a_wave_in_the_band_of_its_total_wavenumber():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    wave = 2.0 * torch.cos(2 * torch.pi * (3 * x + 4 * y) / 32)  # |k| = 5, mean square 2
    assert metrics.band_mse(wave, [4, 10]).tolist() == pytest.approx([0.0, 2.0, 0.0], abs=1e-5)
    assert metrics.band_mse(wave, [5, 10]).tolist() == pytest.approx([2.0, 0.0, 0.0], abs=1e-5)
