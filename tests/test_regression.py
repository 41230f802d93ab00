"""The residual emulator: a regression network of the increment's mean plus diffusion of the residual —
its checkpoint entry, the step it takes (serial and tiled), RePaint on the residual, and its training."""
import dataclasses

import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st

from emulators.diffusion import CheckpointMismatch, load_checkpoint
from emulators.diffusion.emulator import static_fields
from emulators.diffusion.regression import Regression
from test_diffusion import SINGLE_STEP, TINY, ThreadedTiles, make_emulator, random_net, train_case, write_checkpoint

WIDE = dataclasses.replace(TINY, channels=(12, 20))  # another width, the same halo and alignment
RSTD = (0.5, 0.25)


def regression_entry(config=WIDE, residual_std=RSTD, seed=3):
    return {"network": config, "state_dict": random_net(config, torch.float32, seed).state_dict(),
            "residual_std": residual_std, "training": {"note": "test"}}


def test_residual_step_is_the_mean_plus_the_scaled_sample(tmp_path):
    """With a regression R: step = x + inc_mean + inc_std · (R(cond) + s · residual_std · sample), the sample
    the same checkpoint without R draws, s the residual_scale (1); the entry round-trips."""
    plain_path = write_checkpoint(tmp_path / "p.pt")
    path = write_checkpoint(tmp_path / "r.pt", regression=regression_entry())
    ck = load_checkpoint(path)
    assert ck.residual_std() == RSTD and load_checkpoint(plain_path).residual_std() == (1.0, 1.0)
    assert ck.regression["training"] == {"note": "test"} and ck.build_regression().net.config == WIDE
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64) * 5
    plain, residual = make_emulator(plain_path), make_emulator(path)
    inc_mean, inc_std = plain.inc_mean, plain.inc_std
    sample = (plain.step(x, 21600.0) - x - inc_mean) / inc_std
    regression = Regression(random_net(WIDE, torch.float64, 3), 2)
    regression.net.wrap = True
    static = static_fields(("cos_y",), (32, 32), (0, 32), (0, 32), torch.float64)
    cond = torch.cat([(x - plain.mean) / plain.std, static.expand(3, *static.shape)], 1)
    with torch.no_grad():
        mean = regression(cond)
    assert float(mean.abs().mean()) > 0.1
    rstd = torch.tensor(RSTD, dtype=torch.float64).view(-1, 1, 1)
    expected = x + inc_mean + inc_std * (mean + rstd * sample)
    torch.testing.assert_close(residual.step(x, 21600.0), expected, atol=1e-9, rtol=1e-9)
    # residual_scale s trims the sample: s = 0 is the regression's deterministic step
    for scale in (0.0, 0.5):
        scaled = make_emulator(path, residual_scale=scale).step(x, 21600.0)
        torch.testing.assert_close(scaled, x + inc_mean + inc_std * (mean + scale * rstd * sample),
                                   atol=1e-9, rtol=1e-9)
    with pytest.raises(CheckpointMismatch, match="residual_scale 0.5 needs a checkpoint with a regression"):
        make_emulator(plain_path, residual_scale=0.5)


def test_bad_regression_entries_are_one_line_errors(tmp_path):
    deeper = dataclasses.replace(TINY, blocks=(2, 2))
    for name, entry, said in [("halo", regression_entry(deeper), "halo"),
                              ("rstd", regression_entry(residual_std=(0.5, -1.0)), "residual_std"),
                              ("count", regression_entry(residual_std=(0.5,)), "residual_std")]:
        path = write_checkpoint(tmp_path / f"{name}.pt", regression=entry)
        with pytest.raises(CheckpointMismatch, match=said) as e:
            make_emulator(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    good = torch.load(write_checkpoint(tmp_path / "g.pt", regression=regression_entry()), weights_only=True)
    torch.save({**good, "regression": {**good["regression"], "state_dict": {}}}, tmp_path / "w.pt")
    with pytest.raises(CheckpointMismatch, match="regression weights"):
        make_emulator(tmp_path / "w.pt")


@pytest.mark.parametrize("rows,cols", [((0, 14, 32), (0, 32)), ((0, 16, 32), (0, 12, 32))])
def test_decomposed_residual_step_and_repaint_equal_the_serial_ones(tmp_path, rows, cols):
    """The regression tiles with the denoiser: subdomains (unaligned, and 2x2) step and inpaint as the
    serial emulator does; inpainting keeps the known points and fills the rest."""
    path = write_checkpoint(tmp_path / "c.pt", smoothing_order=4, regression=regression_entry())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    field = torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    known = torch.rand(2, 32, 32, generator=g) < 0.3
    serial = make_emulator(path)
    step, filled = serial.step(x, 21600.0), serial.inpainter(x, 21600.0)(field, known)
    assert torch.equal(filled[:, known], field[:, known]) and not torch.equal(filled, field)
    group = ThreadedTiles(serial.grid, rows, cols)

    def run(dom):
        em, sl = make_emulator(path, dom), (..., *dom.local_slices)
        return em.step(x[sl], 21600.0), em.inpainter(x[sl], 21600.0)(field[sl], known[sl])

    results = group.run(run)
    for r, (ys, xs) in enumerate(group.tiles):
        torch.testing.assert_close(results[r][0], step[..., ys, xs], atol=1e-9, rtol=0)
        torch.testing.assert_close(results[r][1], filled[..., ys, xs], atol=1e-9, rtol=0)


REGRESSION = ("regression.iterations=2", "regression.rollout_iterations=2", "regression.channels=[12, 20]",
              "regression.batch_size=2", "regression.checkpoint_every=2", "regression.residual_pairs=4",
              "crps.validation_states=2")


def test_training_with_a_regression_ships_it_and_models_its_residual(tmp_path):
    """twin train with a regression stage: the checkpoint carries the regression (its own width) and the
    residual std it measured; the teacher learned the residual (a rerun resumes every stage to the same
    weights); the single-step residual emulator steps."""
    import twin.train as train
    from twin.trainstages import residual_std

    path = train_case(tmp_path)
    ck = load_checkpoint(train.train_from_case(path, REGRESSION + SINGLE_STEP, out=tmp_path / "o", quiet=True))
    entry = ck.regression
    assert entry["training"]["iterations"] == 2 and entry["training"]["rollout_iterations"] == 2
    assert ck.build_regression().net.config.channels == (12, 20) and ck.network_config.channels == (8, 16)
    assert all(0 < s < 10 for s in ck.residual_std())
    assert "regression" in yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["history"]
    again = load_checkpoint(train.train_from_case(path, REGRESSION + SINGLE_STEP, out=tmp_path / "o", quiet=True))
    for a, b in ((ck.state_dict, again.state_dict), (entry["state_dict"], again.regression["state_dict"])):
        assert all(torch.equal(a[k], b[k]) for k in a)
    plain = load_checkpoint(train.train_from_case(path, SINGLE_STEP, out=tmp_path / "p", quiet=True))
    assert plain.regression is None and not all(torch.equal(plain.state_dict[k], ck.state_dict[k])
                                                for k in ck.state_dict)
    em = make_emulator(tmp_path / "o" / "checkpoint.pt", sampler="single_step")
    assert torch.isfinite(em.step(torch.randn(2, 2, 32, 32, dtype=torch.float64), 0.0)).all()
    # the measured std is that of the pairs' residuals, which the pairs' own residual turns to unit scale
    case, _ = train.load_train_case(path)
    regression = ck.build_regression()
    regression.net.wrap = True
    _, pairs = _pairs(train, case, tmp_path / "o")
    rstd = residual_std(regression, pairs, 64, 0)
    pairs.set_regression(regression, rstd)
    target, cond, mask = pairs.batch(torch.arange(pairs.count))
    res = pairs.residual(target, cond, mask)
    torch.testing.assert_close(res.square().mean((0, 2, 3)).sqrt(), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(pairs.increment(cond, res, mask), target, atol=1e-5, rtol=1e-5)


def _pairs(train, case, folder):
    """The case's training and validation pairs, as `twin train` builds them (whole grid, wrapped)."""
    source = train._truth_source(case, folder, quiet=True)
    static = static_fields(case.network.static, (32, 32), (0, 32), (0, 32))
    return source.pairs(source.stats, static, 0, 4)


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.1, 3.0), seed=st.integers(0, 99))
def test_residual_and_increment_are_inverse(scale, seed):
    """pairs.residual and pairs.increment undo each other for any regression output and residual std."""
    from twin.trainpairs import TruthPairs

    g = torch.Generator().manual_seed(seed)
    data = torch.randn(1, 3, 2, 8, 8, generator=g)
    stats = {"state_mean": (0.0, 0.0), "state_std": (1.0, 2.0), "inc_mean": (0.0, 0.1), "inc_std": (1.0, 1.5)}
    pairs = TruthPairs(data, stats, torch.empty(0, 8, 8), 0, 1)
    weights = torch.randn(2, 2, generator=g)
    pairs.set_regression(lambda c: torch.einsum("vw,bwyx->bvyx", weights, c), torch.tensor([scale, 2 * scale]))
    target, cond, mask = pairs.batch(torch.arange(2))
    res = pairs.residual(target, cond, mask)
    assert not torch.allclose(res, target)
    torch.testing.assert_close(pairs.increment(cond, res, mask), target, atol=1e-5, rtol=1e-5)


def test_regression_settings_errors_name_the_key(tmp_path):
    import twin.train as train
    from twin.config import ConfigError

    path = train_case(tmp_path)
    train.train_from_case(path, ("train.iterations=1",), out=tmp_path / "base", quiet=True)
    init = f"init={tmp_path / 'base' / 'checkpoint.pt'}"
    for overrides, key in [(("regression.channels=[8]",), "regression.channels"),
                           ((init, "regression.iterations=2"), "regression.iterations"),
                           (("regression.batch_size=1",), "regression.batch_size")]:
        with pytest.raises(ConfigError) as e:
            train.load_train_case(path, overrides)
        assert e.value.key == key, (overrides, str(e.value))
