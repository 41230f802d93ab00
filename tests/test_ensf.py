"""EnSF: scores against autograd, fast kernels against the torch path, Kalman limit, keyed noise."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from assim.ensf import (Ensf, Schedule, analytic_likelihood_score, likelihood_score, step_coefficients)
from assim.observations import ObservationBatch
from assim.operators import ArctanOperator, SubsetOperator
from assim.registry import stage_registry
from assim.stages import AnalysisContext
from twin.config import load_case
from twin.domain import Grid, SerialDomain
from twin.random import Streams, fill_rows
from twin.twin import Twin

f64 = torch.float64
CASES = Path(__file__).resolve().parent.parent / "cases"


class Generic:
    """Wraps an operator so the stage cannot recognise it: forces the autograd path."""

    def __init__(self, op) -> None:
        self.op, self.locations = op, op.locations

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        return self.op(state)


@dataclasses.dataclass
class RowBlock:
    """A fake rank owning rows `rows` of a 2-D grid; `reduce` stands in for the MPI all-reduce."""

    grid: Grid
    rows: slice
    reduce: object = None
    rank: int = 0
    size: int = 2

    @property
    def local_slices(self) -> tuple[slice, ...]:
        return (self.rows, slice(0, self.grid.shape[1]))

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.rows.stop - self.rows.start, self.grid.shape[1])

    def local_flat_indices(self) -> torch.Tensor:
        return torch.arange(self.grid.size).reshape(self.grid.shape)[self.local_slices].reshape(-1)

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.reduce is None else self.reduce(self.rank, x)


def ctx_for(grid: Grid, cycle: int = 0, seed: int = 3, domain=None) -> AnalysisContext:
    return AnalysisContext(grid, domain or SerialDomain(grid), Streams(seed), cycle)


def problem(shape=(6, 5), variables=2, members=8, observed=None, arctan=False, sigma=None, seed=0):
    """Prior ensemble (truth + N(0,1)), observations of a subset (random σ unless given)."""
    rng = np.random.default_rng(seed)
    grid = Grid(shape, (True,) * len(shape))
    size = variables * grid.size
    truth = torch.as_tensor(rng.standard_normal((variables,) + shape) * 2.0)
    ens = truth + torch.as_tensor(rng.standard_normal((members, variables) + shape))
    idx = (torch.arange(size) if observed is None
           else torch.as_tensor(np.sort(rng.choice(size, observed, replace=False))))
    op = (ArctanOperator if arctan else SubsetOperator)(grid, idx)
    std = (torch.as_tensor(rng.uniform(0.2, 0.8, len(idx))) if sigma is None
           else torch.full((len(idx),), sigma, dtype=f64))
    y = op(truth) + std * torch.as_tensor(rng.standard_normal(len(idx)))
    return grid, truth, ens, ObservationBatch(0.0, y, std, idx, op)


def rmse(ens: torch.Tensor, truth: torch.Tensor) -> float:
    return float((ens.mean(0) - truth).square().mean().sqrt())


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("key,value", [("eps_alpha", 0.0), ("eps_alpha", 1.5), ("eps_beta", -0.1),
                                       ("steps", 0),
                                       ("variant", "both"), ("integrator", "rk4"), ("damping", "cosine"),
                                       ("score_clip", 0.0), ("chunk_size", 0), ("start", "zero"),
                                       ("likelihood_step", "newton"),
                                       ("eps_beta", float("nan")), ("steps", 2.5)])
def test_bad_config_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=key):
        Ensf(dataclasses.replace(Ensf.Config(), **{key: value}))


def test_registered_and_cases_load():
    assert stage_registry["ensf"] is Ensf
    case = load_case(CASES / "lorenz96_ensf_arctan.yaml")
    cfg = case.assimilation.stages[0].config
    assert (cfg.eps_alpha, cfg.eps_beta, cfg.steps, cfg.variant) == (0.5, 0.025, 200, "paired")
    assert case.run.cycles == 150 and case.observations.operator == "arctan"
    letkf = load_case(CASES / "lorenz96_letkf_arctan.yaml")
    assert (letkf.truth, letkf.observations, letkf.model) == (case.truth, case.observations, case.model)
    big = load_case(CASES / "lorenz96_1m_ensf.yaml")
    assert big.model.config.size == 10**6 and big.run.dtype == "float32" and big.output.members == "mean"


def test_step_coefficients_follow_the_reference_formulas():
    sched = Schedule(0.5, 0.025)
    t = 0.3
    alpha, beta2, f, g2 = sched.at(t)
    assert alpha == pytest.approx(1 - 0.5 * t) and beta2 == pytest.approx(0.025 + 0.975 * t)
    eps = 1e-6  # f = d log α/dt, g² = dβ²/dt - 2 f β² by finite differences
    after, before = sched.at(t + eps), sched.at(t - eps)
    assert f == pytest.approx((np.log(after[0]) - np.log(before[0])) / (2 * eps), rel=1e-6)
    assert g2 == pytest.approx((after[1] - before[1]) / (2 * eps) - 2 * f * beta2, rel=1e-6)
    coef = step_coefficients(sched, 10, "ode")
    t, alpha, a, b, c, d = coef[3]
    alpha, beta2, f, g2 = sched.at(t)
    assert t == pytest.approx(0.7) and d == 0.0
    q = 0.1 * 0.5 * g2  # Δt · ½ g² for the ODE
    assert (a, b, c) == pytest.approx((1 - 0.1 * f - q / beta2, q * alpha / beta2, q * 0.3))
    assert step_coefficients(sched, 10, "sde")[0][4] == 0.0  # h(1) = 0: no likelihood at the first step


# ---------------------------------------------------------------- likelihood scores and the fast path

@pytest.mark.parametrize("arctan", [False, True])
def test_analytic_score_matches_autograd(arctan):
    grid, _, _, obs = problem(observed=40, arctan=arctan)
    dup = torch.cat([obs.operator.flat_index, obs.operator.flat_index[:5]])  # repeated points add up
    op = (ArctanOperator if arctan else SubsetOperator)(grid, dup)
    obs = ObservationBatch(0.0, torch.cat([obs.values, obs.values[:5] + 0.3]),
                           torch.cat([obs.error_std, obs.error_std[:5]]), dup, op)
    z = torch.randn(3, 2, 6, 5, dtype=f64) * 2
    auto = likelihood_score(z, obs)
    assert auto.abs().max() > 1 and (auto == 0).any()  # unobserved points have zero score
    torch.testing.assert_close(analytic_likelihood_score(z, obs), auto, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError):
        analytic_likelihood_score(z, dataclasses.replace(obs, operator=Generic(op)))


@pytest.mark.parametrize("variant,integrator,step", [
    ("paired", "sde", "explicit"), ("paired", "ode", "implicit"),
    ("mixture", "sde", "implicit"), ("mixture", "ode", "explicit")])
@pytest.mark.parametrize("kind", ["subset", "arctan", "all-subset", "some-arctan"])
def test_fast_kernels_equal_the_autograd_path(variant, integrator, step, kind):
    """The chunked numpy kernels compute what the whole-tensor torch path with autograd computes."""
    if kind.startswith("all") or kind == "arctan":  # every point at one precision: w folded into c
        grid, _, ens, obs = problem(arctan=kind == "arctan", sigma=0.1)
    else:  # partial observations with their own errors: the per-point precision path
        grid, _, ens, obs = problem(observed=37, arctan=kind == "some-arctan")
    cfg = Ensf.Config(variant=variant, integrator=integrator, likelihood_step=step, steps=40, chunk_size=7)
    fast = Ensf(cfg)(ens, obs, ctx_for(grid))
    torch_path = Ensf(cfg)
    torch_path.fast_kernels = False
    torch.testing.assert_close(fast, torch_path(ens, obs, ctx_for(grid)), rtol=1e-10, atol=1e-10)
    if step == "explicit":  # an operator the stage does not know goes the same way
        generic = dataclasses.replace(obs, operator=Generic(obs.operator))
        torch.testing.assert_close(fast, Ensf(cfg)(ens, generic, ctx_for(grid)), rtol=1e-10, atol=1e-10)
    assert not torch.equal(fast, ens)


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("sigma_o,innovation", [(1.0, 1.0), (0.5, 1.5), (2.0, -1.0)])
def test_mixture_is_close_to_kalman_on_a_linear_gaussian_problem(sigma_o, innovation):
    """1-D, N = 500, prior N(0, 1), y = x̄ + innovation. The damped likelihood is an approximation:
    its gain error grows with the innovation (scratch runs: gain 0.42 vs 0.49 at σ_o = σ_b), and
    its spread is 5-15 % low; the bounds are 10 % of σ_b on the mean, 25 % on the spread."""
    grid = Grid((1,), (False,))
    ens = torch.as_tensor(np.random.default_rng(1).standard_normal((500, 1, 1)))
    xb, vb = float(ens.mean()), float(ens.var())
    y = xb + innovation
    op = SubsetOperator(grid, torch.arange(1))
    obs = ObservationBatch(0.0, torch.tensor([y], dtype=f64), torch.tensor([sigma_o], dtype=f64),
                           torch.arange(1), op)
    gain = vb / (vb + sigma_o ** 2)
    mean_k, std_k = xb + gain * (y - xb), np.sqrt((1 - gain) * vb)
    post = Ensf(Ensf.Config(variant="mixture", steps=100))(ens, obs, ctx_for(grid))
    assert abs(float(post.mean()) - mean_k) <= 0.1 * np.sqrt(vb)
    assert abs(float(post.std()) - std_k) <= 0.25 * std_k


def test_kernel_start_keeps_an_off_centre_prior_when_observations_say_nothing():
    """z_1 ~ N(0, I) (the authors' start) is not the t = 1 kernel N(α_1 x, β_1²) when ε_α > 0; with
    start: kernel the mixture reproduces a prior centred at 3 (the N(0, I) start drifts toward 0)."""
    grid = Grid((1,), (False,))
    ens = 3.0 + torch.as_tensor(np.random.default_rng(2).standard_normal((400, 1, 1)))
    op = SubsetOperator(grid, torch.arange(1))
    obs = ObservationBatch(0.0, torch.tensor([0.0], dtype=f64), torch.tensor([1e6], dtype=f64),
                           torch.arange(1), op)
    kernel = Ensf(Ensf.Config(variant="mixture", steps=100, start="kernel"))(ens, obs, ctx_for(grid))
    standard = Ensf(Ensf.Config(variant="mixture", steps=100))(ens, obs, ctx_for(grid))
    sd = float(ens.std())
    assert abs(float(kernel.mean() - ens.mean())) < 0.05 * sd and abs(float(kernel.std()) / sd - 1) < 0.1
    assert float(standard.mean() - ens.mean()) < -0.2 * sd


@pytest.mark.parametrize("integrator", ["sde", "ode"])
def test_both_integrators_reduce_the_error_of_a_consistent_prior(integrator):
    """Truth and members drawn around the same mean: the prior-mean error is about 1."""
    rng = np.random.default_rng(2)
    grid = Grid((200,), (True,))
    centre = torch.as_tensor(rng.standard_normal((1, 200)) * 3)
    truth = centre + torch.as_tensor(rng.standard_normal((1, 200)))
    ens = centre + torch.as_tensor(rng.standard_normal((20, 1, 200)))
    op = SubsetOperator(grid, torch.arange(200))
    y = op(truth) + 0.5 * torch.as_tensor(rng.standard_normal(200))
    obs = ObservationBatch(0.0, y, torch.full((200,), 0.5, dtype=f64), torch.arange(200), op)
    post = Ensf(Ensf.Config(integrator=integrator, steps=100))(ens, obs, ctx_for(grid))
    assert rmse(post, truth) < 0.85 * rmse(ens, truth)


@pytest.mark.parametrize("arctan", [False, True])
def test_tiny_observation_error_stays_finite(arctan):
    """σ_o = 1e-5 makes the likelihood term stiff (Δt g² / σ_o² ~ 10^8). The authors' clip keeps the
    explicit step finite (but it overshoots by up to Δt g² · 1000); the implicit step is also accurate."""
    grid, truth, ens, obs = problem(shape=(50,), variables=1, members=10, arctan=arctan, sigma=1e-5)
    post = Ensf(Ensf.Config(steps=50))(ens, obs, ctx_for(grid))
    assert bool(torch.isfinite(post).all()) and float(post.abs().max()) < 100
    post = Ensf(Ensf.Config(steps=50, likelihood_step="implicit"))(ens, obs, ctx_for(grid))
    assert bool(torch.isfinite(post).all())
    assert rmse(post, truth) < 0.5 * rmse(ens, truth)
    generic = dataclasses.replace(obs, operator=Generic(obs.operator))
    with pytest.raises(ValueError, match="implicit"):
        Ensf(Ensf.Config(steps=5, likelihood_step="implicit"))(ens, generic, ctx_for(grid))


def test_unobserved_points_follow_their_own_member():
    """Paired EnSF: zero likelihood score where nothing is observed, so those points do not depend on
    the observed values and end at x_i plus noise of standard deviation about sqrt(ε_β)."""
    grid, _, ens, obs = problem(shape=(200,), variables=1, members=10, observed=100)
    post = Ensf(Ensf.Config())(ens, obs, ctx_for(grid))
    moved = Ensf(Ensf.Config())(ens, dataclasses.replace(obs, values=obs.values + 1.0), ctx_for(grid))
    free = torch.ones(200, dtype=torch.bool)
    free[obs.operator.flat_index] = False
    assert torch.equal(post[..., free], moved[..., free])
    assert not torch.equal(post[..., ~free], moved[..., ~free])
    dev = float((post[..., free] - ens[..., free]).square().mean().sqrt())
    assert 0.5 * np.sqrt(0.025) < dev < 2 * np.sqrt(0.025)


# ---------------------------------------------------------------- reproducibility and rank independence

def test_deterministic_for_a_seed_and_keyed_by_cycle_and_seed():
    grid, _, ens, obs = problem()
    stage = Ensf(Ensf.Config(steps=30))
    a = stage(ens, obs, ctx_for(grid, cycle=4))
    assert torch.equal(a, stage(ens, obs, ctx_for(grid, cycle=4)))
    assert not torch.equal(a, stage(ens, obs, ctx_for(grid, cycle=5)))
    assert not torch.equal(a, stage(ens, obs, ctx_for(grid, cycle=4, seed=4)))


def test_float32_runs_in_float32_and_draws_the_same_noise():
    grid, _, ens, obs = problem(arctan=True, sigma=0.1)
    stage = Ensf(Ensf.Config(steps=50))
    a64 = stage(ens, obs, ctx_for(grid))
    a32 = stage(ens.float(), obs, ctx_for(grid))
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), a64, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arctan,observed", [(False, 41), (True, None)])
def test_paired_on_two_subdomains_equals_the_whole(arctan, observed):
    """Each fake rank holds some rows of a 2-D grid and the global observations."""
    grid, _, ens, obs = problem(arctan=arctan, observed=observed)
    stage = Ensf(Ensf.Config(steps=40, chunk_size=4))
    whole = stage(ens, obs, ctx_for(grid, cycle=2))
    halves = [stage(ens[:, :, rows], obs, ctx_for(grid, cycle=2, domain=RowBlock(grid, rows)))
              for rows in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(torch.cat(halves, dim=2), whole, rtol=1e-12, atol=1e-12)
    # the torch path's noise too (no observations: the analysis is noise and prior only)
    none = torch.zeros(0, dtype=torch.long)
    empty = ObservationBatch(0.0, torch.zeros(0, dtype=f64), torch.ones(0, dtype=f64), none,
                             Generic(SubsetOperator(grid, none)))
    whole = stage(ens, empty, ctx_for(grid))
    halves = [stage(ens[:, :, rows], empty, ctx_for(grid, domain=RowBlock(grid, rows)))
              for rows in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(torch.cat(halves, dim=2), whole, rtol=1e-12, atol=1e-12)


def test_mixture_on_two_threaded_subdomains_equals_the_whole():
    """Two threads stand in for two ranks; their all-reduce sums the partial Gram matrices."""
    grid, _, ens, obs = problem(members=6)
    stage = Ensf(Ensf.Config(variant="mixture", steps=30))
    whole = stage(ens, obs, ctx_for(grid))
    barrier, parts = threading.Barrier(2), [None, None]

    def reduce(rank: int, x: torch.Tensor) -> torch.Tensor:
        parts[rank] = x.clone()
        barrier.wait()
        total = parts[0] + parts[1]
        barrier.wait()
        return total

    rows = (slice(0, 4), slice(4, 6))
    out: list[torch.Tensor | None] = [None, None]

    def work(rank: int) -> None:
        dom = RowBlock(grid, rows[rank], reduce, rank)
        out[rank] = stage(ens[:, :, rows[rank]], obs, ctx_for(grid, domain=dom))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    torch.testing.assert_close(torch.cat(out, dim=2), whole, rtol=1e-9, atol=1e-9)


def test_normal_stream_reads_any_slice_of_the_same_numbers():
    s = Streams(11)
    full = np.empty(20_001, dtype=np.float32)
    s.normal_stream("filter", (1, 2)).fill(0, full)
    stream = s.normal_stream("filter", (1, 2))  # one object, jumping back and forth
    for a, b in [(7, 8), (5000, 20_001), (1, 2), (0, 1), (3, 9999), (12_345, 12_346)]:
        part = np.empty(b - a)
        stream.fill(a, part)
        assert np.array_equal(part, full[a:b].astype(np.float64)), (a, b)
    rows = np.empty((3, 9, 50), dtype=np.float32)[:, 4]  # strided rows, odd start, scaled
    fill_rows([s.normal_stream("filter", (1, m)) for m in range(3)], 13, rows, 2.0)
    ref = np.empty(50, dtype=np.float32)
    s.normal_stream("filter", (1, 2)).fill(13, ref, 2.0)
    np.testing.assert_allclose(rows[2], ref, rtol=1e-6)
    assert not np.array_equal(rows[0], rows[1])
    assert abs(full.mean()) < 0.03 and abs(full.std() - 1) < 0.02
    assert abs(np.corrcoef(full[:-1], full[1:])[0, 1]) < 0.03


# ---------------------------------------------------------------- the case files' acceptance numbers

@pytest.mark.parametrize("case,bound", [("lorenz96_ensf_arctan.yaml", 0.21),
                                        ("lorenz96_letkf_arctan.yaml", 0.08)])
def test_lorenz96_arctan_cases_reach_their_rmse(case, bound):
    """L96-100 with arctan observations, 150 cycles: EnSF <= 0.21 (paper 0.193), LETKF <= 0.08."""
    summary = Twin.from_yaml(CASES / case).run()
    assert summary["rmse_analysis"] is not None and summary["rmse_analysis"] <= bound
