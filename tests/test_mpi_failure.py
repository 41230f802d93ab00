"""Under mpiexec a failure on one rank ends the whole job promptly, with its message printed once."""
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = '''
import sys
from dataclasses import dataclass
from assim import register_stage

@register_stage("explode_on_rank_1")
class Explode:
    @dataclass(frozen=True)
    class Config:
        pass
    def __init__(self, config): pass
    def __call__(self, ens, obs, ctx):
        if ctx.domain.rank == 1 and ctx.cycle == 3:
            raise RuntimeError("boom on purpose")
        return ens

from twin.cli import main
sys.exit(main(sys.argv[1:]))
'''

CASE = """
name: failing
model: {kind: lorenz96, size: 40}
truth: {spinup_steps: 10}
ensemble: {size: 4}
assimilation: {stages: [{method: explode_on_rank_1}]}
run: {cycles: 50, burn_in: 1}
output: {figures: false}
"""


def run_mpi(tmp_path, *args):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists(), "the test extra installs mpich, which provides mpiexec"
    script = tmp_path / "driver.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(script), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return proc, time.monotonic() - start


def test_one_rank_raising_ends_the_job_within_30_s(tmp_path):
    case = tmp_path / "case.yaml"
    case.write_text(CASE)
    proc, seconds = run_mpi(tmp_path, "run", str(case), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode != 0
    assert seconds < 30
    assert proc.stderr.count("boom on purpose") >= 1 and "rank 1" in proc.stderr
    assert proc.stderr.count("error (rank 1): RuntimeError: boom on purpose") == 1
    assert not (tmp_path / "out").exists()


def test_user_error_under_mpi_is_printed_once_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {kind: lorenz96, size: 40, not_a_key: 1}\n")
    proc, seconds = run_mpi(tmp_path, "run", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("not_a_key") == 1 and "Traceback" not in proc.stderr
