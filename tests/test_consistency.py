"""The single-step sampler: consistency parametrisation, distillation against an exact teacher, the
fair-CRPS rollout loss, checkpoints that carry it, the emulator using it, and the training stages."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from emulators.diffusion import CheckpointMismatch, load_checkpoint
from emulators.diffusion.consistency import (ConsistencyPrecond, ascending_sigmas, distillation_loss,
                                              fair_crps_loss, rollout_crps)
from test_diffusion import (TINY, interrupted_at, make_emulator, periodic, random_net, train_case,
                            write_checkpoint)

torch.set_num_threads(1)


def test_consistency_function_is_the_identity_at_sigma_min():
    net = random_net(TINY)
    f = ConsistencyPrecond(net, 1.0, 0.002)
    x = torch.randn(2, 2, 32, 32, dtype=torch.float64)
    cond = periodic(torch.randn(2, 3, 32, 32, dtype=torch.float64), net.receptive_halo)
    with torch.no_grad():
        at_min = f(x, torch.full((2,), 0.002, dtype=torch.float64), cond, periodic)
        above = f(x, torch.full((2,), 1.0, dtype=torch.float64), cond, periodic)
    assert torch.equal(at_min, x)
    assert float((above - x).abs().max()) > 0.1


def exact_gaussian(scale: float):
    """Teacher and consistency function of an unconditional N(0, scale²) target, as module-like callables."""
    def teacher(x, sigma, cond, pad):
        s2 = sigma.view(-1, *([1] * (x.dim() - 1))).square()
        return scale**2 / (scale**2 + s2) * x

    def consistency(x, sigma, cond, pad):
        s2 = sigma.view(-1, *([1] * (x.dim() - 1))).square()
        return x * scale / (scale**2 + s2).sqrt() * (scale**2 + 0.002**2) ** 0.5 / scale

    return teacher, consistency


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(0.3, 3.0), seed=st.integers(0, 1000))
def test_distillation_loss_vanishes_for_the_exact_consistency_function(scale, seed):
    """For a Gaussian target the probability-flow ODE is a rescaling: the exact consistency function's
    loss is only the teacher's Heun error (small); the teacher's own denoiser is far from consistent."""
    teacher, exact = exact_gaussian(scale)
    sigmas = ascending_sigmas(18, 0.002, 20.0, 7.0)
    target = torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
    good = distillation_loss(exact, teacher, target, None, None, sigmas, torch.Generator().manual_seed(seed))
    bad = distillation_loss(teacher, teacher, target, None, None, sigmas, torch.Generator().manual_seed(seed))
    assert float(good) < 0.05 * float(bad)


def test_fair_crps_loss_is_unbiased_for_two_members_and_differentiable():
    g = torch.Generator().manual_seed(0)
    members = torch.randn(2, 4000, 10, generator=g, dtype=torch.float64, requires_grad=True)
    truth = torch.randn(4000, 10, generator=g, dtype=torch.float64)
    loss = fair_crps_loss(members, truth)
    assert abs(float(loss.detach()) - 1 / torch.pi**0.5) < 0.01  # members and truth from one N(0,1): 1/√π
    loss.backward()
    assert members.grad is not None and torch.isfinite(members.grad).all()
    point = torch.full((3, 5), 2.0, dtype=torch.float64)
    assert float(fair_crps_loss(point[:, None].expand(3, 2, 5), torch.zeros(2, 5, dtype=torch.float64))) == 2.0


def test_rollout_crps_scores_each_unrolled_step():
    """A perfect deterministic stepper scores 0; one that drifts by d per step scores mean(k·d)/scale."""
    start = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    truth = torch.stack([start + k for k in (1, 2, 3)])
    noise = lambda k: torch.zeros(6, 2, 4, 4, dtype=torch.float64)  # noqa: E731
    assert float(rollout_crps(lambda x, z: x + 1, start, truth, 2, noise, torch.tensor(1.0))) == 0.0
    drift = rollout_crps(lambda x, z: x + 1.5, start, truth, 2, noise, torch.tensor(2.0))
    assert float(drift) == pytest.approx((0.5 + 1.0 + 1.5) / 3 / 2)


def test_checkpoint_with_single_step_round_trips_and_is_checked(tmp_path):
    other = random_net(TINY, torch.float32, seed=3).state_dict()
    path = write_checkpoint(tmp_path / "c.pt", single_step={"state_dict": other, "sigma_min": 0.002,
                                                            "sigma_max": 20.0, "training": {"note": "t"}})
    ck = load_checkpoint(path)
    assert ck.single_step["sigma_max"] == 20.0
    net = ck.build_single_step_network()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in other.items())
    raw = torch.load(path, weights_only=True)
    broken = {**raw, "single_step": {**raw["single_step"], "state_dict": {k: v for k, v in other.items()
                                                                          if "head" not in k}}}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatch, match="single-step weights do not fit"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatch, match="no single-step sampler"):
        make_emulator(write_checkpoint(tmp_path / "plain.pt"), sampler="single_step")


def test_single_step_emulator_is_deterministic_one_call_and_members_differ(tmp_path):
    other = random_net(TINY, torch.float32, seed=3).state_dict()
    path = write_checkpoint(tmp_path / "c.pt", single_step={"state_dict": {k: v * 0.3 for k, v in other.items()},
                                                            "sigma_min": 0.002, "sigma_max": 20.0})
    em = make_emulator(path, sampler="single_step")
    calls = []
    em.model.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64) * 10
    a = em.step(x, 0.0)
    assert len(calls) == 1 and torch.isfinite(a).all()
    assert torch.equal(a, em.step(x, 0.0)) and not torch.equal(a, em.step(x, em.dt))
    same = em.step(x[:1].expand(2, -1, -1, -1), 0.0)
    assert float((same[0] - same[1]).abs().max()) > 1e-3
    assert not torch.equal(a, make_emulator(path).step(x, 0.0))  # the Heun sampler uses the other network


STAGES = ["--set", "augment.iterations=4", "--set", "augment.batch_size=2", "--set", "augment.checkpoint_every=2",
          "--set", "distill.iterations=4", "--set", "distill.perturb=0.2", "--set", "crps.perturb=0.2", "--set", "distill.batch_size=2", "--set", "distill.checkpoint_every=2",
          "--set", "distill.steps=4", "--set", "crps.iterations=4", "--set", "crps.unroll=[1,2]",
          "--set", "crps.rollout_pairs=2", "--set", "crps.checkpoint_every=2", "--set", "crps.validation_states=2"]


def overrides():
    return tuple(STAGES[1::2])


def test_training_stages_write_a_single_step_sampler_and_resume_exactly(tmp_path, monkeypatch):
    import twin.train as train

    straight = train.train_from_case(train_case(tmp_path), overrides(), out=tmp_path / "a", quiet=True)
    ck = load_checkpoint(straight)
    assert ck.single_step is not None
    assert ck.training["stage_wall_seconds"].keys() == {"teacher", "augment", "distill", "crps"}
    teacher = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)["ema"]
    assert not all(torch.equal(ck.state_dict[k], teacher["net." + k]) for k in ck.state_dict)  # augment moved it
    em = make_emulator(straight, sampler="single_step")
    assert torch.isfinite(em.step(torch.randn(2, 2, 32, 32, dtype=torch.float64), 0.0)).all()
    for stage in ("augment_state.pt", "crps_state.pt"):
        interrupted_at(monkeypatch, stage,
                       lambda: train.train_from_case(train_case(tmp_path), overrides(), out=tmp_path / "b", quiet=True))
    resumed = load_checkpoint(train.train_from_case(train_case(tmp_path), overrides(), out=tmp_path / "b",
                                                    quiet=True))
    a, b = ck.single_step["state_dict"], resumed.single_step["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ck.state_dict[k], resumed.state_dict[k]) for k in ck.state_dict)
    assert not all(torch.equal(a[k], ck.state_dict[k]) for k in a)  # distilled weights moved off the teacher's


def test_crps_through_a_shapiro_filter_retrains_only_the_crps_stage(tmp_path):
    """crps.smoothing_order: the rollouts step through the filter and the checkpoint carries it; the
    earlier stages' state files (same settings) are reused as they are."""
    import twin.train as train
    from twin.config import ConfigError

    plain = load_checkpoint(train.train_from_case(train_case(tmp_path), overrides(), out=tmp_path / "a", quiet=True))
    before = {f: (tmp_path / "a" / f).stat().st_mtime_ns for f in ("train_state.pt", "augment_state.pt", "distill_state.pt")}
    (tmp_path / "a" / "crps_state.pt").unlink()  # a CRPS state of other settings is refused, not overwritten
    smooth = load_checkpoint(train.train_from_case(train_case(tmp_path), overrides() + ("crps.smoothing_order=8",),
                                                   out=tmp_path / "a", quiet=True))
    assert {f: (tmp_path / "a" / f).stat().st_mtime_ns for f in before} == before
    assert plain.smoothing_order == 0 and smooth.smoothing_order == 8
    assert all(torch.equal(plain.state_dict[k], smooth.state_dict[k]) for k in plain.state_dict)
    a, b = plain.single_step["state_dict"], smooth.single_step["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert make_emulator(smooth.path, sampler="single_step").smoothing_order == 8
    with pytest.raises(ConfigError) as e:
        train.load_train_case(train_case(tmp_path), ("crps.smoothing_order=3",))
    assert e.value.key == "crps.smoothing_order"


def test_bfloat16_training_differs_resumes_exactly_and_refuses_float32_states(tmp_path, monkeypatch):
    """train.precision: bfloat16 autocasts every stage's steps; it is part of the resume digest (a
    float32 state is refused), and an interrupted bfloat16 run resumes bit for bit."""
    import twin.train as train
    from twin.config import ConfigError

    bf16 = overrides() + ("train.precision=bfloat16",)
    fp32 = load_checkpoint(train.train_from_case(train_case(tmp_path), overrides(), out=tmp_path / "a", quiet=True))
    straight = load_checkpoint(train.train_from_case(train_case(tmp_path), bf16, out=tmp_path / "b", quiet=True))
    assert straight.training["stage_wall_seconds"].keys() == {"teacher", "augment", "distill", "crps"}
    a, b = fp32.single_step["state_dict"], straight.single_step["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].dtype == b[k].dtype for k in a)
    with pytest.raises(ConfigError, match="different training set-up"):
        train.train_from_case(train_case(tmp_path), bf16, out=tmp_path / "a", quiet=True)
    interrupted_at(monkeypatch, "distill_state.pt",
                   lambda: train.train_from_case(train_case(tmp_path), bf16, out=tmp_path / "c", quiet=True))
    resumed = load_checkpoint(train.train_from_case(train_case(tmp_path), bf16, out=tmp_path / "c", quiet=True))
    c = resumed.single_step["state_dict"]
    assert all(torch.equal(b[k], c[k]) for k in b)
    em = make_emulator(resumed.path, sampler="single_step")
    assert torch.isfinite(em.step(torch.randn(2, 2, 32, 32, dtype=torch.float64), 0.0)).all()


def test_crps_without_distillation_is_a_config_error(tmp_path):
    from twin.config import ConfigError
    from twin.train import load_train_case

    with pytest.raises(ConfigError) as e:
        load_train_case(train_case(tmp_path), ("crps.iterations=3",))
    assert e.value.key == "crps.iterations"
    with pytest.raises(ConfigError) as e:
        load_train_case(train_case(tmp_path), ("distill.iterations=3", "crps.unroll=[1,9]"))
    assert e.value.key == "crps.unroll"


def test_skill_scores_against_direct_computation(tmp_path):
    from emulators.diffusion.skill import ensemble_skill, free_rollout

    em = make_emulator(write_checkpoint(tmp_path / "c.pt"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(1, 3, 2, 32, 32, generator=g) * 5
    clim = torch.randn(4, 2, 32, 32, generator=g) * 5
    rows = ensemble_skill(em, truth, members=3, leads=2, climatology=clim, bands=[3, 8])
    assert [r["forecasts"] for r in rows] == [1, 1] and rows[1]["lead_hours"] == 12.0
    assert all(len(r["rmse_bands"]) == len(r["rmse_persistence_bands"]) == 3 for r in rows)
    persistence = sum(b * b for b in rows[1]["rmse_persistence_bands"])
    assert persistence == pytest.approx(rows[1]["rmse_persistence"] ** 2, rel=1e-4)
    assert sum(b * b for b in rows[0]["rmse_bands"]) == pytest.approx(rows[0]["rmse"] ** 2, rel=1e-4)
    assert rows[1]["rmse_persistence"] == pytest.approx(float((truth[0, 0] - truth[0, 2]).square().mean().sqrt()))
    assert rows[0]["crps_climatology"] == pytest.approx(float(fair_crps_loss(clim, truth[0, 1])), rel=1e-6)
    ens = em.step(truth[0, 0].expand(3, -1, -1, -1).clone(), 0.0)
    assert rows[0]["rmse"] == pytest.approx(float((ens.mean(0) - truth[0, 1]).square().mean().sqrt()), rel=1e-5)
    roll = free_rollout(em, truth[0, 0], truth[0], steps=5)
    assert roll["finite"] and len(roll["variance_ratio_per_variable"]) == 2 and roll["days"] == 1.25


@settings(max_examples=10, deadline=None)
@given(noise=st.floats(0.05, 2.0), offset=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_augment_perturbations_have_the_stated_size_and_a_smooth_half(noise, offset, seed):
    from twin.train import AugmentConfig
    from twin.trainstages import perturbation

    cfg = AugmentConfig(noise=noise, offset=offset, coarsening=8)
    eps = perturbation((256, 2, 32, 24), cfg, torch.Generator().manual_seed(seed))
    assert eps.shape == (256, 2, 32, 24)
    # scale ~ U(0, noise), unit-variance shape plus an offset of std `offset`: E[ε²] = noise²/3 (1 + offset²)
    assert float(eps.square().mean()) == pytest.approx(noise**2 / 3 * (1 + offset**2), rel=0.25)
    lag = (eps[..., 1:] * eps[..., :-1]).mean() / eps.square().mean()  # smooth half: correlated neighbours
    assert 0.25 < float(lag) < 0.95
    assert not perturbation((4, 2, 32, 24), AugmentConfig(noise=0.0), torch.Generator()).any()


@settings(max_examples=10, deadline=None)
@given(noise=st.one_of(st.just(0.0), st.floats(0.05, 1.0)), seed=st.integers(0, 2**31 - 1))
def test_perturbed_pairs_keep_the_next_state(noise, seed):
    """x_t + ε with target x_{t+Δ} − (x_t + ε): the perturbed condition plus the changed increment is
    still the true next state, whatever ε."""
    from twin.train import AugmentConfig
    from twin.trainpairs import TruthPairs
    from twin.trainstages import perturbed_batch

    g = torch.Generator().manual_seed(seed)
    data = torch.randn((2, 5, 2, 16, 16), generator=g) * 3 + 1
    stats = {"state_mean": [1.0, 0.5], "state_std": [3.0, 2.0], "inc_mean": [0.1, -0.1], "inc_std": [4.0, 5.0]}
    h = 3
    pairs = TruthPairs(data, stats, torch.zeros((0, 16 + 2 * h, 16 + 2 * h)), h, 4)
    index = torch.tensor([0, 3, 5, 7])
    target, cond, _ = perturbed_batch(pairs, index, (None, None), AugmentConfig(noise=noise), g)
    state = cond[:, :2, h:h + 16, h:h + 16] * pairs.std + pairs.mean
    nxt = state + target * pairs.inc_std + pairs.inc_mean
    expected = torch.stack([data[i // 4, i % 4 + 1] for i in index.tolist()])
    assert torch.allclose(nxt, expected, atol=1e-4)
    clean = torch.stack([data[i // 4, i % 4] for i in index.tolist()])
    moved = float((state - clean).abs().max())
    assert moved < 1e-5 if noise == 0 else moved > 1e-5
