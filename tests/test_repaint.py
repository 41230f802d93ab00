"""Learned inpainting (RePaint with the emulator) and region/variable-restricted synthetic observations."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from test_diffusion import ThreadedTiles, make_emulator, write_checkpoint
from twin.config import ConfigError
from twin.twin import Twin

torch.set_num_threads(1)


def known_mask(seed: int, shape=(2, 32, 32), fraction=0.2) -> torch.Tensor:
    known = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < fraction
    known[1] = False  # the second variable unobserved
    return known


def test_inpainter_keeps_known_points_and_fills_the_rest(tmp_path):
    em = make_emulator(write_checkpoint(tmp_path / "c.pt"))
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(3, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    field = torch.randn(3, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    known = known_mask(1)
    fill = em.inpainter(prev, 2 * em.dt)
    out = fill(field, known)
    assert torch.equal(out[:, known], field[:, known]) and torch.isfinite(out).all()
    assert float((out - field)[:, ~known].abs().min()) > 0  # every unknown point was replaced
    assert torch.equal(out, em.inpainter(prev, 2 * em.dt)(field, known))  # keyed noise: reproducible
    assert not torch.equal(out, em.inpainter(prev, 3 * em.dt)(field, known))
    same = em.inpainter(prev[:1].expand(2, -1, -1, -1), 2 * em.dt)(field[:1].expand(2, -1, -1, -1), known)
    assert float((same[0] - same[1])[~known].abs().max()) > 1e-3  # members draw their own noise


def test_inpainting_uses_the_edm_denoiser_whichever_the_sampler(tmp_path):
    """RePaint needs a denoiser at each of its noise levels: the single-step emulator fills with the EDM
    network, as the Heun one does (same keyed noise, so the same fill), not with its consistency network."""
    from test_diffusion import random_net

    single = {"state_dict": {k: v * 0.3 for k, v in random_net(seed=5).float().state_dict().items()},
              "sigma_min": 0.002, "sigma_max": 20.0}
    path = write_checkpoint(tmp_path / "c.pt", single_step=single)
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    field = torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    known = known_mask(2)
    heun, one_step = make_emulator(path, sampler="heun"), make_emulator(path, sampler="single_step")
    assert not torch.equal(heun.step(prev, 0.0), one_step.step(prev, 0.0))  # two different networks
    filled = heun.inpainter(prev, heun.dt)(field, known)
    assert torch.equal(one_step.inpainter(prev, heun.dt)(field, known), filled)


@settings(max_examples=4, deadline=None)
@given(cut=st.sampled_from([((0, 16, 32), (0, 32)), ((0, 16, 32), (0, 12, 32)), ((0, 4, 32), (0, 32))]),
       seed=st.integers(0, 100))
def test_decomposed_inpainting_equals_serial(tmp_path_factory, cut, seed):
    path = write_checkpoint(tmp_path_factory.mktemp("ck") / "c.pt")
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    field = torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64) * 5
    known = known_mask(seed)
    serial = make_emulator(path).inpainter(prev, 0.0)(field, known)
    em0 = make_emulator(path)
    group = ThreadedTiles(em0.grid, *cut)

    def work(dom):
        sl = (..., *dom.local_slices)
        return make_emulator(path, dom).inpainter(prev[sl], 0.0)(field[sl], known[sl])

    results = group.run(work)
    for r, (ys, xs) in enumerate(group.tiles):
        torch.testing.assert_close(results[r], serial[..., ys, xs], atol=1e-9, rtol=0)


def partial_case(tmp_path, stages: str, extra: str = "") -> str:
    ck = write_checkpoint(tmp_path / "c.pt")
    path = tmp_path / "case.yaml"
    path.write_text(f"""
name: partial
model: {{kind: diffusion, checkpoint: {ck}, sampler: heun, steps: 2, seed: 1}}
truth: {{seed: 1, spinup_steps: 0}}
observations: {{every: 1, error_std: 1.0, fraction: 0.3, variables: [a], region: [[0, 32], [0, 16]]}}
ensemble: {{size: 4, init_spread: 1.0}}
assimilation: {{stages: {stages}}}
run: {{cycles: 4, out: {tmp_path / 'out'}}}
{extra}""")
    return str(path)


def test_observations_respect_variables_and_region(tmp_path):
    tw = Twin.from_yaml(partial_case(tmp_path, "[]"))
    for cycle in range(3):
        op = tw.nature.observations(cycle).operator
        assert len(op.point) > 0 and bool((op.variable == 0).all())
        assert bool((op.point % 32 < 16).all())  # x < 16 (the western half)
    for override, key in [("observations.variables=[c]", "observations.variables"),
                          ("observations.region=[[0, 40], [0, 16]]", "observations.region"),
                          ("observations.region=[[0, 16]]", "observations.region")]:
        with pytest.raises(ConfigError) as e:
            Twin.from_yaml(partial_case(tmp_path, "[]"), [override])
        assert e.value.key == key


def test_twin_with_repaint_resumes_exactly_and_fills_the_unobserved_level(tmp_path):
    stages = "[{method: ensf, steps: 20}, {method: repaint}]"
    straight = Twin.from_yaml(partial_case(tmp_path, stages))
    straight.run(4)
    half = Twin.from_yaml(partial_case(tmp_path, stages))
    half.run(2)
    half.checkpoint(tmp_path / "ck.pt")
    resumed = Twin.from_yaml(partial_case(tmp_path, stages))
    resumed.restore(tmp_path / "ck.pt")
    resumed.run(2)
    assert torch.equal(straight.ensemble, resumed.ensemble)
    plain = Twin.from_yaml(partial_case(tmp_path, "[{method: ensf, steps: 20}]"))
    plain.run(3)
    straight3 = Twin.from_yaml(partial_case(tmp_path, stages))
    straight3.run(3)
    # after the first forecast the repaint stage rewrites the unobserved variable
    assert not torch.equal(plain.ensemble[:, 1], straight3.ensemble[:, 1])
    assert torch.isfinite(straight.ensemble).all()


def test_repaint_needs_a_learned_model(tmp_path):
    path = tmp_path / "l96.yaml"
    path.write_text("name: x\nmodel: {kind: lorenz96, size: 40}\nassimilation: {stages: [{method: repaint}]}\n"
                    "run: {cycles: 2}\n")
    with pytest.raises(ConfigError) as e:
        Twin.from_yaml(path)
    assert e.value.key == "assimilation.stages" and "learned prior" in e.value.message
