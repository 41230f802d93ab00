"""Members × subdomains (`domain.ranks_per_member`, pytest-mpi, 2 ranks): members split across the
ranks (K = 1), the grid split (K = 2) and the serial run give the same analyses."""
from pathlib import Path

import pytest
import torch
from test_diffusion import write_checkpoint

from twin import Twin
from twin.config import ConfigError
from twin.members import MemberSplitDomain

pytestmark = pytest.mark.mpi(min_size=2)
CASES = Path(__file__).parents[1] / "cases"

EMULATOR_CASE = """
name: tiny-emulator
model: {{kind: diffusion, checkpoint: {checkpoint}, sampler: heun, steps: 2, churn: 1.0, seed: 7}}
truth: {{seed: 1, spinup_steps: 1}}
observations: {{operator: identity, every: 1, error_std: 1.0, fraction: 0.3, seed: 3,
                region: [[0, 64], [0, 32]]}}
ensemble: {{size: 5, init_spread: 2.0, seed: 2}}
assimilation: {{stages: {stages}}}
run: {{cycles: 3, burn_in: 1}}
"""


def layouts(path, overrides):
    """(member split K = 1, grid split K = 2, serial) twins of one case, each run to its end."""
    twins = [Twin.from_yaml(path, overrides + [f"domain.ranks_per_member={k}"]) for k in (1, 2)]
    twins.append(Twin.from_yaml(path, overrides + ["domain.decomposition=serial"]))
    summaries = [tw.run() for tw in twins]
    split, grid, serial = twins
    assert isinstance(split.domain, MemberSplitDomain) and split.grid_domain.size == 1
    assert grid.split is None and grid.domain.size == 2
    return twins, summaries


def assert_same_run(twins, summaries, rtol):
    """Final ensembles, every recorded analysis and prior mean and the scores agree on rank 0."""
    finals = [tw.domain.gather(tw.ensemble) for tw in twins]
    if twins[0].domain.rank != 0:
        return
    serial = twins[-1]
    scale = float(serial.ensemble.abs().max())
    for tw, final, summary in zip(twins, finals, summaries):
        assert summary["ranks"] == tw.domain.size
        torch.testing.assert_close(final, serial.ensemble, rtol=0, atol=rtol * scale)
        for mine, ref in ((tw.recorder.analysis, serial.recorder.analysis),
                          (tw.recorder.background_mean, serial.recorder.background_mean)):
            assert len(mine) == len(ref) > 0
            for a, b in zip(mine, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)
        for key in ("rmse_analysis", "rmse_forecast", "spread_analysis", "crps_analysis"):
            assert summary[key] == pytest.approx(summaries[-1][key], rel=1e-12), key


@pytest.mark.parametrize("members", [7, 2])  # 4 + 3 members, and one member per rank
def test_lorenz96_letkf_members_or_subdomains_equal_serial(members):
    overrides = ["run.cycles=20", "run.burn_in=5", "truth.spinup_steps=100", f"ensemble.size={members}",
                 "output.every=3"]
    twins, summaries = layouts(CASES / "lorenz96_letkf.yaml", overrides)
    split = twins[0]
    blocks = {7: (slice(0, 4), slice(4, 7)), 2: (slice(0, 1), slice(1, 2))}[members]
    assert split.split.members == blocks[split.domain.rank]
    final = split.domain.gather(split.ensemble)
    if split.domain.rank == 0:  # the member split forecasts whole members as the serial run does
        assert torch.equal(final, twins[-1].ensemble)
    assert_same_run(twins, summaries, 1e-12)


@pytest.mark.parametrize("stages", [
    "[{method: letkf, inflation: 1.05, localization_radius: 4}]",
    "[{method: ensf, steps: 20, likelihood_step: implicit}, {method: repaint}]",  # inpaints all members
])
def test_emulator_members_or_subdomains_equal_serial(tmp_path, stages):
    """A tiny random-weight emulator on 64 x 64 (halo exchange between the two 32-row tiles), 5 members
    (3 + 2): the sampler's noise is keyed by global member index whichever group steps the member."""
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", shape=(64, 64))
    case = tmp_path / "case.yaml"
    case.write_text(EMULATOR_CASE.format(checkpoint=checkpoint, stages=stages))
    twins, summaries = layouts(case, [])
    assert_same_run(twins, summaries, 1e-10)


def test_member_split_checkpoint_restores_the_run(tmp_path):
    """Rank 0 writes the gathered state; restoring hands each group its subdomain of all members."""
    from mpi4py import MPI

    path = Path(MPI.COMM_WORLD.bcast(str(tmp_path / "checkpoint.pt"), root=0))  # rank 0's folder
    overrides = ["run.cycles=12", "run.burn_in=2", "truth.spinup_steps=50", "domain.ranks_per_member=1"]
    whole = Twin.from_yaml(CASES / "lorenz96_letkf.yaml", overrides)
    whole.run(5)
    whole.checkpoint(path)
    expected = whole.run()
    resumed = Twin.from_yaml(CASES / "lorenz96_letkf.yaml", overrides)
    resumed.restore(path)
    assert resumed.cycle == 5 and resumed.ensemble.shape[0] == 7  # every rank holds all members
    got = resumed.run()
    assert torch.equal(resumed.ensemble, whole.ensemble)
    if MPI.COMM_WORLD.rank == 0:
        assert {k: got[k] for k in ("rmse_analysis", "spread_analysis")} == \
            {k: expected[k] for k in ("rmse_analysis", "spread_analysis")}


def test_layout_errors_name_the_key():
    case = CASES / "lorenz96_letkf.yaml"
    with pytest.raises(ConfigError, match=r"domain\.ranks_per_member: must divide the number of ranks \(2\)"):
        Twin.from_yaml(case, ["domain.ranks_per_member=4"])
    # ensemble.size >= 2 gives each of 2 groups a member: the member-count check is in test_members.py
    tw = Twin.from_yaml(case, ["domain.ranks_per_member=2", "truth.spinup_steps=10"])
    assert tw.split is None and tw.domain.size == 2
