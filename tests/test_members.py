"""`domain.ranks_per_member` without MPI: the layout checks, member-keyed streams, serial runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twin import Twin
from twin.config import ConfigError, load_case
from twin.members import LayoutError, member_groups

CASE = Path(__file__).parents[1] / "cases" / "lorenz96_letkf.yaml"


def test_member_groups_checks_ranks_and_members():
    assert member_groups(8, 2, 7) == 4
    assert member_groups(4, 4, 2) == 1
    with pytest.raises(LayoutError, match=r"must divide the number of ranks \(6\), got 4"):
        member_groups(6, 4, 20)
    with pytest.raises(LayoutError, match=r"4 member groups, more than the 3 members \(ensemble.size\)"):
        member_groups(8, 2, 3)


def test_ranks_per_member_is_checked_and_ignored_when_serial():
    with pytest.raises(ConfigError, match=r"domain\.ranks_per_member: must be >= 1"):
        load_case(CASE, ["domain.ranks_per_member=0"])
    overrides = ["run.cycles=6", "run.burn_in=1", "truth.spinup_steps=20"]
    plain = Twin.from_yaml(CASE, overrides)
    keyed = Twin.from_yaml(CASE, overrides + ["domain.ranks_per_member=3"])
    assert keyed.split is None and keyed.domain.size == 1
    plain.run(), keyed.run()
    assert torch.equal(plain.ensemble, keyed.ensemble)


def test_serial_run_with_ranks_per_member_never_imports_mpi4py():
    code = (f"import sys; from twin import Twin; Twin.from_yaml({str(CASE)!r}, ['domain.ranks_per_member=2', "
            "'truth.spinup_steps=5', 'run.cycles=3', 'run.burn_in=1']).run(); "
            "assert 'mpi4py' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=CASE.parents[1],
                   env={k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI", "MPI_"))})


def test_emulator_step_keys_members_by_global_index(tmp_path):
    """Members 3.. of a block, stepped with first_member=3, draw what those members draw in one block."""
    from test_diffusion import make_emulator, write_checkpoint

    em = make_emulator(write_checkpoint(tmp_path / "c.pt"))
    x = torch.randn(5, 2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(em.step(x[3:], 0.0, first_member=3), em.step(x, 0.0)[3:], rtol=1e-12, atol=1e-12)
